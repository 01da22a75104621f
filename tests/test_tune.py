import json
import signal
import time

import pytest
import yaml

from conftest import REPO, assert_write_refused, last_json_line, run_cli, tiny_raw, write_yaml
from test_fit import read_scalars


def tune_raw(tmp_path, **tune):
    raw = tiny_raw(tmp_path, train={"steps": 500}, eval={"final_steps": 4})
    raw["tune"] = {"steps_per_trial": 20, "max_trials": 3,
                   "space": {"optimizer.learning_rate": {"min": 1e-3, "max": 3e-2, "log": True},
                             "model.hidden_dim": [16, 32]}, **tune}
    return raw


@pytest.fixture(scope="module")
def random_search(tmp_path_factory):
    """A 3-trial random search in one process: (config path, search folder, result)."""
    tmp = tmp_path_factory.mktemp("search")
    raw = tune_raw(tmp)
    raw["track"] = {"mlflow": True, "mlflow_uri": f"sqlite:///{tmp / 'mlflow.db'}",
                    "experiment": "search-exp"}
    cfg_path = write_yaml(tmp / "t.yaml", raw)
    run = tmp / "search"
    r = run_cli("tfpretrain.tune", "--config", str(cfg_path), "--run-dir", str(run))
    assert r.returncode == 0, r.stderr[-3000:]
    return cfg_path, run, r


def trial_values(run) -> dict:
    board = json.loads((run / "leaderboard.json").read_text())
    return {row["trial"]: row["values"] for row in board}


def test_random_search_writes_leaderboard_best_yaml_plot_and_hparams(random_search):
    _, run, r = random_search
    result = last_json_line(r.stdout)
    assert result["trials"] == 3 and result["failed"] == 0
    assert "optimizer.learning_rate" in r.stdout and "val_loss" in r.stdout  # leaderboard
    board = json.loads((run / "leaderboard.json").read_text())
    objectives = [row["objective"] for row in board]
    assert objectives == sorted(objectives) and result["val_loss"] == objectives[0]
    # best.yaml: the winning values with the full step budget; fit accepts it
    best = yaml.safe_load((run / "best.yaml").read_text())
    assert best["train"]["steps"] == 500 and best["export"]["enabled"] is True
    assert best["model"]["hidden_dim"] == board[0]["values"]["model.hidden_dim"]
    assert best["optimizer"]["learning_rate"] == pytest.approx(
        board[0]["values"]["optimizer.learning_rate"])
    dry = run_cli("tfpretrain.fit", "--config", str(run / "best.yaml"), "--dry-run")
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert (run / "objective.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # every trial is a real run with its own TensorBoard logs and an HParams session
    for row in board:
        trial = run / "trials" / row["trial"]
        assert json.loads((trial / "summary.json").read_text())["steps"] == 20
        assert sorted(read_scalars(trial / "logs" / "train")["loss"]) == list(range(1, 21))
        tags = read_scalars(trial / "logs")
        assert "_hparams_/session_start_info" in tags and "final/val_loss" in tags
    assert "_hparams_/experiment" in read_scalars(run / "trials")
    # what the search spent: every trial's tokens, MFU and cost, and their sums
    assert all(row["tokens"] == 20 * 16 * 32 and row["mfu"] > 0 for row in board)
    assert result["search_tokens"] == 3 * 20 * 16 * 32 == result["projected_tokens"]
    assert result["search_cost_usd"] == pytest.approx(sum(row["cost_usd"] for row in board),
                                                      abs=1e-6)
    # MLflow: the search is a parent run, each trial a child run nested under it
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run.parent / 'mlflow.db'}")
    exp = client.get_experiment_by_name("search-exp")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [x for x in runs if x.data.tags.get("tfpretrain.kind") == "search"]
    children = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 3 and all(c.info.status == "FINISHED" for c in children)
    assert parent.info.status == "FINISHED" and parent.data.params["tune.max_trials"] == "3"
    assert parent.data.metrics["best/val_loss"] == pytest.approx(result["val_loss"])
    assert "leaderboard.json" in {a.path for a in client.list_artifacts(parent.info.run_id)}


@pytest.mark.slow  # the random search covers the tuner path by default
def test_grid_search_enumerates_exactly_the_grid(tmp_path):
    raw = tune_raw(tmp_path, tuner="grid", max_trials=50, steps_per_trial=8,
                   space={"optimizer.warmup_steps": [0, 2], "model.hidden_dim": [16, 32]})
    cfg_path = write_yaml(tmp_path / "g.yaml", raw)
    r = run_cli("tfpretrain.tune", "--config", str(cfg_path), "--run-dir", str(tmp_path / "g"))
    assert r.returncode == 0, r.stderr[-3000:]
    board = json.loads((tmp_path / "g" / "leaderboard.json").read_text())
    combos = sorted((b["values"]["optimizer.warmup_steps"], b["values"]["model.hidden_dim"])
                    for b in board)
    assert combos == [(0, 16), (0, 32), (2, 16), (2, 32)]


@pytest.mark.slow  # suite time; run with -m slow
def test_failed_trial_is_recorded_and_search_goes_on(tmp_path):
    # a NaN batch at step 5: the guarded trial skips it, the unguarded one diverges and fails
    # (an invalid config would be refused before the search starts)
    raw = tune_raw(tmp_path, tuner="grid", max_trials=10,
                   space={"train.guard": [True, False]})
    raw["debug"] = {"nan_at_step": 5}
    raw["train"]["steps_per_execution"] = 1
    cfg_path = write_yaml(tmp_path / "f.yaml", raw)
    r = run_cli("tfpretrain.tune", "--config", str(cfg_path), "--run-dir", str(tmp_path / "f"))
    assert r.returncode == 0, r.stderr[-3000:]
    result = last_json_line(r.stdout)
    assert result["trials"] == 2 and result["failed"] == 1
    assert result["best_values"] == {"train.guard": True}
    errors = list((tmp_path / "f" / "trials").glob("*/error.txt"))
    assert len(errors) == 1 and "training diverged at step 5" in errors[0].read_text()


def test_a_full_disk_stops_the_search_instead_of_failing_every_trial(tmp_path, small_disk):
    """A failed trial lets the search go on, but a write the disk refuses would fail every
    later trial too: the whole search stops with one message, exit 74, after trial one."""
    raw = tune_raw(tmp_path)
    raw["data"]["cache_dir"] = str(small_disk(tmp_path / "cache", 64))
    cfg_path = write_yaml(tmp_path / "d.yaml", raw)
    r = run_cli("tfpretrain.tune", "--config", str(cfg_path), "--run-dir", str(tmp_path / "d"))
    assert_write_refused(r, "the token cache entry")
    assert r.stdout.count("Running Trial #") == 1, r.stdout[-3000:]
    assert not list((tmp_path / "d" / "trials").glob("*/error.txt"))


@pytest.mark.slow  # the distributed kill-and-resume test is slow too; both: -m slow
def test_killed_search_resumes_without_repeating_finished_trials(tmp_path):
    import os
    import subprocess
    import sys

    raw = tune_raw(tmp_path, max_trials=3, steps_per_trial=40)
    cfg_path = write_yaml(tmp_path / "k.yaml", raw)
    run = tmp_path / "k"
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.Popen([sys.executable, "-m", "tfpretrain.tune", "--config",
                             str(cfg_path), "--run-dir", str(run)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while len(list(run.glob("trials/*/summary.json"))) < 1:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() - t0 < 300
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p.parent.name: p.stat().st_mtime_ns for p in run.glob("trials/*/summary.json")}
    assert 1 <= len(finished) < 3
    r = run_cli("tfpretrain.tune", "--config", str(cfg_path), "--run-dir", str(run))
    assert r.returncode == 0, r.stderr[-3000:]
    assert last_json_line(r.stdout)["trials"] == 3
    for trial, mtime in finished.items():   # finished trials were not run again
        assert (run / "trials" / trial / "summary.json").stat().st_mtime_ns == mtime


@pytest.mark.slow  # suite time; run with -m slow
def test_a_chief_and_two_workers_run_the_same_trials_as_one_process(random_search, tmp_path):
    """`--workers 2`: a chief serving KerasTuner's oracle over gRPC on 127.0.0.1 and two
    worker processes running the trials; the same seed gives the same trials (ids and
    values) as the one-process search, each trial a real run, results written by the
    chief only."""
    cfg_path, reference, _ = random_search
    run = tmp_path / "dist"
    r = run_cli("tfpretrain.tune", "--config", str(cfg_path), "--run-dir", str(run),
                "--workers", "2", "--set", "track.mlflow=false")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "chief (serves the oracle)" in r.stdout and last_json_line(r.stdout)["trials"] == 3
    assert trial_values(run) == trial_values(reference)
    worker_logs = [(run / "workers" / f"tuner{i}.log").read_text() for i in range(2)]
    ran = [last_json_line(log)["trials_run"] for log in worker_logs]
    assert sum(ran) == 3 and all(n >= 1 for n in ran), ran   # both workers took trials
    for trial in trial_values(run):
        assert json.loads((run / "trials" / trial / "summary.json").read_text())["steps"] == 20
    assert (run / "best.yaml").is_file() and (run / "objective.png").is_file()


@pytest.mark.slow
def test_a_worker_killed_mid_trial_resumes_it_under_the_same_id(tmp_path):
    """Chief and worker started by hand (what two machines do); the worker SIGKILLed during
    its first trial and started again with the same ID gets that trial back, resumes it
    from its checkpoint, and the search completes."""
    import os
    import subprocess
    import sys

    from test_distributed import free_ports

    raw = tune_raw(tmp_path, max_trials=2, steps_per_trial=60)
    raw["train"]["checkpoint_every"] = 10
    cfg_path = write_yaml(tmp_path / "k.yaml", raw)
    run = tmp_path / "k"
    oracle = f"127.0.0.1:{free_ports(1)[0]}"
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")
    base = [sys.executable, "-m", "tfpretrain.tune", "--config", str(cfg_path), "--run-dir",
            str(run)]
    chief = subprocess.Popen([*base, "--chief", oracle], cwd=REPO, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    worker = [*base, "--worker", "w0", "--oracle", oracle]
    first = subprocess.Popen(worker, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not list(run.glob("trials/0/checkpoints/step-*")):
        assert first.poll() is None and time.time() - t0 < 300
        time.sleep(0.2)
    first.kill()
    first.wait()
    assert not (run / "trials" / "0" / "summary.json").exists()
    again = run_cli(*worker[2:], env={})
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout and last_json_line(again.stdout)["trials_run"] == 2
    out, err = chief.communicate(timeout=120)
    assert chief.returncode == 0, err[-3000:]
    assert last_json_line(out)["trials"] == 2 and last_json_line(out)["failed"] == 0


def test_empty_space_and_bad_space_are_user_errors(tmp_path):
    raw = tune_raw(tmp_path, space={})
    r = run_cli("tfpretrain.tune", "--config", str(write_yaml(tmp_path / "e.yaml", raw)),
                "--run-dir", str(tmp_path / "e"))
    assert r.returncode == 2 and "tune.space is empty" in r.stderr
    raw = tune_raw(tmp_path, space={"optimizer.lr": [1]})
    r = run_cli("tfpretrain.tune", "--config", str(write_yaml(tmp_path / "b.yaml", raw)),
                "--run-dir", str(tmp_path / "b"))
    assert r.returncode == 2 and "not a tunable config key" in r.stderr
    assert "Traceback" not in r.stderr


def test_runs_lists_runs_with_metrics_and_plots_curves(tiny_run, tmp_path):
    import shutil

    _, run_dir, summary = tiny_run
    root = tmp_path / "runs"
    shutil.copytree(run_dir, root / "a")
    shutil.copytree(run_dir, root / "b")
    second = json.loads((root / "b" / "summary.json").read_text())
    second["val_loss"] = summary["val_loss"] - 0.5
    (root / "b" / "summary.json").write_text(json.dumps(second))
    (root / "c" / "checkpoints" / "step-00000010").mkdir(parents=True)
    (root / "c" / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    r = run_cli("tfpretrain.runs", str(root), "--json", "--plot", str(tmp_path / "v.png"))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert [row["run"] for row in rows] == ["b", "a", "c"]        # sorted by val_loss
    assert rows[1]["val_loss"] == summary["val_loss"] and rows[1]["status"] == "done"
    assert rows[1]["params"] == summary["params"] and rows[1]["arch"] == "gpt2"
    assert rows[2]["status"] == "stopped at step 10"
    assert (tmp_path / "v.png").read_bytes()[:4] == b"\x89PNG"
    r = run_cli("tfpretrain.runs", str(root))
    assert "val_bits_per_byte" in r.stdout.splitlines()[0] and "stopped at step 10" in r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("tuner", ["bayesian", "hyperband"])
def test_bayesian_and_hyperband_searches_complete(tmp_path, tuner):
    raw = tune_raw(tmp_path, tuner=tuner, max_trials=3, steps_per_trial=18)
    cfg_path = write_yaml(tmp_path / "t.yaml", raw)
    r = run_cli("tfpretrain.tune", "--config", str(cfg_path), "--run-dir", str(tmp_path / "s"))
    assert r.returncode == 0, r.stderr[-3000:]
    result = last_json_line(r.stdout)
    assert result["failed"] == 0 and result["trials"] >= 3
    board = json.loads((tmp_path / "s" / "leaderboard.json").read_text())
    if tuner == "hyperband":   # brackets: short trials first, survivors trained longer
        assert len({row["steps"] for row in board}) > 1
    assert (tmp_path / "s" / "best.yaml").exists()


def test_search_state_is_written_atomically_and_a_damaged_one_is_one_message(tmp_path):
    """KerasTuner writes oracle.json in place; a kill mid-write used to leave an empty file
    and a traceback on resume (seen once in CI). Now every state file is written to a
    temporary sibling and renamed, and a damaged one from before is exit 2."""
    from keras_tuner.src import utils

    from tfpretrain import compat

    compat.atomic_keras_tuner_saves()
    target = tmp_path / "oracle.json"
    target.write_text("old")
    before = target.stat().st_ino
    utils.save_json(str(target), {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    assert target.stat().st_ino != before                 # replaced by rename, not rewritten
    assert sorted(p.name for p in tmp_path.iterdir()) == ["oracle.json"]
    raw = tune_raw(tmp_path, max_trials=1, steps_per_trial=10)
    run = tmp_path / "k"
    (run / "tuner").mkdir(parents=True)
    (run / "tuner" / "oracle.json").write_text("")
    r = run_cli("tfpretrain.tune", "--config", str(write_yaml(tmp_path / "d.yaml", raw)),
                "--run-dir", str(run))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "is damaged" in r.stderr and (run / "tuner" / "oracle.json").read_text() == ""


def test_tune_dry_run_projects_the_search_cost(tmp_path):
    """Before it runs: trials x steps_per_trial x batch x sequence tokens, costed per
    device at the assumed MFU (the estimate's arithmetic), without training."""
    cfg_path = write_yaml(tmp_path / "t.yaml", tune_raw(tmp_path))
    big = ["model.hidden_dim=512", "model.intermediate_dim=2048", "model.num_layers=8",
           "model.num_heads=8", "tune.steps_per_trial=20000000", "tune.max_trials=5"]
    r = run_cli("tfpretrain.tune", "--config", str(cfg_path), "--dry-run",
                *[x for kv in big for x in ("--set", kv)])
    assert r.returncode == 0, r.stderr[-2000:]
    search = last_json_line(r.stdout)
    assert search["trials"] == 5 and search["tokens_per_trial"] == 20000000 * 16 * 32
    assert search["tokens"] == 5 * 20000000 * 16 * 32
    assert search["flops"] == pytest.approx(search["tokens"] * search["flops_per_token"])
    h100 = next(row for row in search["rows"] if row["device"] == "h100")
    hours = search["flops"] / (h100["mfu"] * h100["peak_tflops"] * 1e12) / 3600
    assert hours > 1 and h100["hours"] == pytest.approx(hours, rel=1e-2)
    assert h100["cost_usd"] == pytest.approx(hours * h100["price_per_hour"], rel=1e-2)
    assert not (tmp_path / "runs").exists() and "# search" in r.stdout


@pytest.mark.parametrize("flags, message", [
    (["--worker", "w0"], "--worker ID needs --oracle HOST:PORT"),
    (["--chief", "nohost"], "--chief 'nohost': expected HOST:PORT"),
    (["--worker", "chief1", "--oracle", "127.0.0.1:9"], "must not contain 'chief'"),
    (["--workers", "2", "--chief", "127.0.0.1:9"], "--workers N starts its own chief"),
])
def test_distributed_search_flags_are_checked(tmp_path, flags, message):
    cfg_path = write_yaml(tmp_path / "t.yaml", tune_raw(tmp_path))
    r = run_cli("tfpretrain.tune", "--config", str(cfg_path), "--run-dir", str(tmp_path / "s"),
                *flags)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_a_search_that_would_waste_trials_is_refused_before_it_starts(capsys):
    """A space value making a trial or the winning config invalid: exit 2 up front (the
    search used to run every trial, then fail writing best.yaml)."""
    from tfpretrain.tune import main

    assert main(["--dry-run", "--set", "tune.steps_per_trial=100"]) == 2
    assert "a trial of tune.steps_per_trial=100 steps is not a valid run" in \
        capsys.readouterr().err
    assert main(["--dry-run", "--set", "train.steps=90", "--set",
                 "optimizer.warmup_steps=20"]) == 2
    err = capsys.readouterr().err
    assert "tune.space optimizer.warmup_steps=100: the full config best.yaml" in err
