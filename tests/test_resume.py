"""Training that survives: real subprocesses killed and resumed, compared bit for bit."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, last_json_line, run_cli, tiny_config, tiny_raw, write_yaml
from test_fit import read_scalars


def resume_raw(tmp_path, **train):
    # gradient accumulation on (2 micro-batches of 8): resume stays bitwise with it
    return tiny_raw(tmp_path, train={"steps": 60, "checkpoint_every": 10, "deterministic": True,
                                     "steps_per_execution": 2, "grad_accumulation_steps": 2,
                                     **train},
                    eval={"every": 20}, export={"enabled": False})


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("unbroken")
    cfg_path = write_yaml(tmp / "r.yaml", resume_raw(tmp))
    r = run_cli("tfpretrain.fit", "--config", str(cfg_path), "--run-dir", str(tmp / "run"))
    assert r.returncode == 0, r.stderr[-3000:]
    return cfg_path, tmp / "run", last_json_line(r.stdout)


def start_fit(cfg_path, run_dir, *extra):
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.Popen([sys.executable, "-m", "tfpretrain.fit", "--config", str(cfg_path),
                             "--run-dir", str(run_dir), *extra], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, proc, timeout=240):
    t0 = time.time()
    while not predicate():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.05)


def latest_step(run_dir):
    ck = run_dir / "checkpoints"
    steps = [int(p.name.split("-")[1]) for p in ck.iterdir()
             if p.is_dir() and p.name.startswith("step-")] if ck.exists() else []
    return max(steps, default=0)


def assert_same_run(run_dir, unbroken_dir, summary, reference):
    assert summary["weights_sha256"] == reference["weights_sha256"]
    assert summary["val_loss"] == reference["val_loss"]
    ours = read_scalars(run_dir / "logs" / "train")
    theirs = read_scalars(unbroken_dir / "logs" / "train")
    for tag in ("loss", "learning_rate", "grad_norm"):
        assert sorted(ours[tag]) == list(range(1, 61)), tag
        for step in range(1, 61):
            assert float(ours[tag][step]) == float(theirs[tag][step]), (tag, step)


@pytest.mark.slow  # suite time; run with -m slow
def test_two_deterministic_runs_are_identical(unbroken, tmp_path):
    cfg_path, run_dir, reference = unbroken
    r = run_cli("tfpretrain.fit", "--config", str(cfg_path), "--run-dir", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr[-3000:]
    again = last_json_line(r.stdout)
    assert len(reference["weights_sha256"]) == 64
    assert_same_run(tmp_path / "b", run_dir, again, reference)


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_kill_9_at_a_random_step_then_resume_matches_unbroken_run(unbroken, tmp_path, seed):
    cfg_path, unbroken_dir, reference = unbroken
    raw = resume_raw(tmp_path)
    raw["debug"] = {"slow_checkpoint_seconds": 0.3}   # widen the window for kills during saves
    cfg_path = write_yaml(tmp_path / "r.yaml", raw)
    run_dir = tmp_path / "run"
    rng = random.Random(seed)
    proc = start_fit(cfg_path, run_dir)
    target = rng.choice([10, 20, 30, 40])
    wait_for(lambda: latest_step(run_dir) >= target
             or (run_dir / "checkpoints").exists() and any(
                 p.name.startswith(".tmp-") and int(p.name.split("-")[-1]) >= target
                 for p in (run_dir / "checkpoints").iterdir()), proc)
    time.sleep(rng.uniform(0.0, 0.4))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "summary.json").exists()
    r = run_cli("tfpretrain.fit", "--config", str(cfg_path), "--run-dir", str(run_dir))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout
    assert_same_run(run_dir, unbroken_dir, last_json_line(r.stdout), reference)


@pytest.mark.slow  # suite time; run with -m slow
def test_sigterm_checkpoints_exits_143_and_resumes_exactly(unbroken, tmp_path):
    cfg_path, unbroken_dir, reference = unbroken
    run_dir = tmp_path / "run"
    proc = start_fit(cfg_path, run_dir)
    wait_for(lambda: latest_step(run_dir) >= 20, proc)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-3000:]
    assert time.time() - t0 < 30
    assert "committed at step" in out
    stopped_at = latest_step(run_dir)
    assert 20 <= stopped_at < 60 and stopped_at % 2 == 0
    r = run_cli("tfpretrain.fit", "--config", str(cfg_path), "--run-dir", str(run_dir))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"at step {stopped_at}" in r.stdout
    assert_same_run(run_dir, unbroken_dir, last_json_line(r.stdout), reference)


def start_feeder(port):
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.Popen([sys.executable, "-m", "tfpretrain.data_service", "--port",
                             str(port), "--host", "127.0.0.1"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert "feeding at 127.0.0.1" in proc.stdout.readline()
    return proc


def test_a_run_fed_by_a_feeder_process_survives_losing_it_and_resumes_exactly(
        unbroken, tmp_path):
    """data.service: batches from a feeder process (python -m tfpretrain.data_service) on
    127.0.0.1. The feeder killed after step 20: the run ends with exit 75 and a message
    within seconds (data.service_timeout 5) instead of waiting for ever; with the feeder
    started again the rerun resumes, and the whole run equals the local unbroken one bit
    for bit (the same batches in the same order, accumulation on)."""
    import socket

    cfg_path, unbroken_dir, reference = unbroken
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    served = ("--set", f"data.service=127.0.0.1:{port}", "--set", "data.service_timeout=5")
    run_dir = tmp_path / "run"
    feeder = start_feeder(port)
    try:
        proc = start_fit(cfg_path, run_dir, *served)
        wait_for(lambda: latest_step(run_dir) >= 20, proc)
        feeder.kill()
        feeder.wait()
        t0 = time.time()
        out, err = proc.communicate(timeout=90)
        assert proc.returncode == 75, err[-3000:]
        assert time.time() - t0 < 30 and "Traceback" not in err
        assert f"the feeder grpc://127.0.0.1:{port} has not answered" in err
        assert latest_step(run_dir) < 60
        feeder = start_feeder(port)
        r = run_cli("tfpretrain.fit", "--config", str(cfg_path), "--run-dir", str(run_dir),
                    *served)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "resumed from" in r.stdout and "1 tf.data service feeder" in r.stdout
        summary = last_json_line(r.stdout)
        assert summary["data_service_feeders"] == 1 and reference["data_service_feeders"] == 0
        assert_same_run(run_dir, unbroken_dir, summary, reference)
    finally:
        feeder.kill()


@pytest.mark.slow  # suite time; run with -m slow
def test_corrupt_latest_checkpoint_falls_back_to_previous(unbroken, tmp_path):
    import shutil

    cfg_path, unbroken_dir, reference = unbroken
    run_dir = tmp_path / "run"
    shutil.copytree(unbroken_dir, run_dir)
    ck = run_dir / "checkpoints"
    newest = sorted(p for p in ck.iterdir() if p.name.startswith("step-"))[-1]
    data = next(f for f in newest.iterdir() if f.name.startswith("ckpt.data"))
    blob = bytearray(data.read_bytes())
    blob[len(blob) // 2] ^= 0xFF                         # one flipped byte
    data.write_bytes(bytes(blob))
    second = sorted(p for p in ck.iterdir() if p.name.startswith("step-"))[-2]
    (second / "state.json").write_text('{"step": 5')   # truncated manifest
    (run_dir / "summary.json").unlink()
    r = run_cli("tfpretrain.fit", "--config", str(cfg_path), "--run-dir", str(run_dir))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"skipping corrupt or incomplete checkpoint {newest}" in r.stderr
    assert f"skipping corrupt or incomplete checkpoint {second}" in r.stderr
    assert "at step 40" in r.stdout
    assert last_json_line(r.stdout)["weights_sha256"] == reference["weights_sha256"]
    # with every checkpoint broken, --resume must refuses
    for p in ck.iterdir():
        if p.name.startswith("step-"):
            (p / "state.json").write_text("{")
    r = run_cli("tfpretrain.fit", "--config", str(cfg_path), "--run-dir", str(run_dir),
                "--resume", "must")
    assert r.returncode == 2 and "no valid checkpoint" in r.stderr


def test_second_process_on_a_run_folder_gets_a_lock_error(unbroken, tmp_path):
    from tfpretrain.training.runfolder import RunLock

    cfg_path, _, _ = unbroken
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lock = RunLock(run_dir)
    lock.acquire()
    try:
        r = run_cli("tfpretrain.fit", "--config", str(cfg_path), "--run-dir", str(run_dir))
    finally:
        lock.release()
    assert r.returncode == 2 and "is in use by pid" in r.stderr
    assert "Traceback" not in r.stderr


def _fit_with_weights_per_step(tmp_path, debug=None, train=None, model=None, optimizer=None):
    """Train a tiny model in-process with steps_per_execution=1, recording weights and Adam
    moments after every step."""
    import keras

    from tfpretrain.data.pipeline import pack_corpus, train_dataset
    from tfpretrain.data.sources import load_corpus
    from tfpretrain.data.tokenizers import train_tokenizer
    from tfpretrain.faults import poisoned_positions
    from tfpretrain.objectives import build_model, row_format
    from tfpretrain.training.optimizers import build_optimizer, guard_optimizer

    cfg = tiny_config(tmp_path, debug=debug or {}, train={"steps": 30, **(train or {})},
                      model=model or {}, optimizer=optimizer or {})
    keras.utils.set_random_seed(0)
    corpus = load_corpus(cfg.data, 0)
    tok = train_tokenizer("byte", corpus.train, 0)
    packed = pack_corpus(tok, corpus.train, corpus.val, row_format(cfg))
    model = build_model(cfg, tok.vocabulary_size, 1)
    opt = guard_optimizer(cfg, build_optimizer(cfg.optimizer, cfg.train.steps))
    opt.build(model.trainable_variables)
    model.compile(optimizer=opt, jit_compile=True, steps_per_execution=1)
    snaps = {}

    class Snap(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            step = int(opt.iterations.numpy())
            snaps[step] = ([v.numpy().copy() for v in model.trainable_variables],
                           [v.numpy().copy() for v in opt.inner_optimizer.variables[1:]],
                           model.step_log.numpy()[0].copy())

    model.fit(train_dataset(packed.train_rows, 16, 0, poison=poisoned_positions(cfg)),
              steps_per_epoch=cfg.train.steps, epochs=1,
              callbacks=[Snap()], verbose=0)
    return model, snaps


def _same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.slow  # suite time: test_guarded_optimizer checks the same skip through CausalLM
def test_injected_nan_step_is_skipped_with_weights_and_moments_unchanged(tmp_path):
    model, snaps = _fit_with_weights_per_step(tmp_path, debug={"nan_at_step": 12})
    weights_11, moments_11, _ = snaps[11]
    weights_12, moments_12, log_12 = snaps[12]
    assert _same(weights_11, weights_12) and _same(moments_11[1:], moments_12[1:])
    assert np.isnan(log_12[0]) and log_12[3] == 1.0          # logged loss NaN, skipped
    assert not _same(snaps[12][0], snaps[13][0])              # training goes on
    assert int(model.optimizer.skipped_steps.numpy()) == 1
    assert all(np.isfinite(w).all() for w in snaps[30][0])


@pytest.mark.slow  # suite time: test_guarded_optimizer checks spike skips
def test_synthetic_loss_spike_is_skipped(tmp_path):
    model, snaps = _fit_with_weights_per_step(tmp_path, debug={"spike_at_step": 25},
                                              train={"spike_window": 10,
                                                     "spike_threshold": 20.0})
    assert snaps[25][2][3] == 1.0 and _same(snaps[24][0], snaps[25][0])
    assert int(model.optimizer.skipped_steps.numpy()) == 1
    assert snaps[24][2][3] == 0.0 and snaps[26][2][3] == 0.0


def test_consecutive_bad_batches_roll_back_and_skip_them(tmp_path):
    raw = resume_raw(tmp_path, rollback_after=3, rollback_lr_scale=0.5)
    raw["debug"] = {"nan_at_step": 25, "nan_for_steps": 4}   # batches of steps 25..28 are bad
    run_dir = tmp_path / "run"
    r = run_cli("tfpretrain.fit", "--config", str(write_yaml(tmp_path / "r.yaml", raw)),
                "--run-dir", str(run_dir))
    assert r.returncode == 0, r.stderr[-3000:]
    summary = last_json_line(r.stdout)
    assert summary["rollbacks"] == 1 and summary["lr_scale"] == 0.5
    # the 4 skips were undone by the rollback but still count: totals survive rollbacks
    assert summary["skipped_steps"] == 4 and summary["rolled_back_steps"] == 8
    # 4 skips seen at step 28 (steps_per_execution 2): back to step 20, and the stream
    # moves 8 positions on, past the bad batches; the offset is in every later checkpoint,
    # so a resume does not replay them either
    assert "rollback 1: 8 steps after step-00000020" in r.stdout
    state = json.loads((run_dir / "checkpoints" / "step-00000060" / "state.json").read_text())
    assert state["guard"] == {"data_offset": 8, "lr_scale": 0.5, "rollbacks": 1,
                              "discarded_skips": 4, "discarded_steps": 8}
    scalars = read_scalars(run_dir / "logs" / "train")
    assert float(scalars["rollbacks"][20]) == 1.0
    assert float(scalars["skipped_total"][20]) == 4.0
    from tfpretrain.config import build_config
    from tfpretrain.training.optimizers import build_schedule

    cfg = build_config(raw)
    base = build_schedule(cfg.optimizer, cfg.train.steps)
    lr = read_scalars(run_dir / "logs" / "train")["learning_rate"]
    assert float(lr[40]) == pytest.approx(0.5 * float(base(39)), rel=1e-5)  # scaled after
    assert np.isfinite(summary["val_loss"])
    # continuing the run keeps the rollback's offset, scale and count
    r = run_cli("tfpretrain.fit", "--config", str(tmp_path / "r.yaml"), "--run-dir",
                str(run_dir), "--set", "train.steps=70")
    assert r.returncode == 0, r.stderr[-3000:]
    later = last_json_line(r.stdout)
    assert later["rollbacks"] == 1 and later["lr_scale"] == 0.5 and later["steps"] == 70
    assert later["skipped_steps"] == 4   # and the skip count, across the resume


@pytest.mark.slow  # suite time; run with -m slow
def test_z_loss_changes_training_but_not_the_reported_loss_definition(tmp_path):
    model_a, snaps_a = _fit_with_weights_per_step(tmp_path)
    model_b, snaps_b = _fit_with_weights_per_step(tmp_path, model={"z_loss": 1e-2})
    assert snaps_a[1][2][0] == pytest.approx(snaps_b[1][2][0], rel=1e-6)  # same step-1 loss
    assert not _same(snaps_a[5][0], snaps_b[5][0])                        # different updates


def test_a_checkpoint_with_the_guard_state_on_the_model_still_resumes(tmp_path):
    """Checkpoints written before the guard moved into its optimizer wrapper kept the
    guard's window and counters on the model and the bare optimizer beside it."""
    import keras

    from tfpretrain.training.checkpoints import GUARD_STATE, CheckpointManager
    from tfpretrain.training.runtime import build_and_compile

    cfg = tiny_config(tmp_path, train={"spike_window": 4})
    old = build_and_compile(cfg, 100, 1)
    inner = old.optimizer.inner_optimizer
    inner.iterations.assign(7)
    values = {"guard_history": np.arange(8, dtype=np.float32).reshape(4, 2),
              "guard_accepted": 5, "skipped_steps": 2, "clipped_steps": 1,
              "consecutive_skips": 0}
    old._tracker.unlock()  # the old layout: int64 counters tracked on the built model
    for name in GUARD_STATE:
        setattr(old, name, keras.Variable(values[name], dtype="float32" if name ==
                                          "guard_history" else "int64", name=name))
    path = CheckpointManager(tmp_path / "ck", old, inner).save(7)

    new = build_and_compile(cfg, 100, 1)
    CheckpointManager(tmp_path / "ck", new, new.optimizer).restore(path)
    assert int(new.optimizer.iterations.numpy()) == 7
    for a, b in zip(old.network.get_weights(), new.network.get_weights()):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(inner.variables, new.optimizer.inner_optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    for name in GUARD_STATE:
        np.testing.assert_array_equal(getattr(new.optimizer, name).numpy(), values[name])


def test_ctrl_c_after_training_stops_at_once_cleans_up_and_the_rerun_exports(tmp_path):
    """A signal outside the training loop (here: in the export, after its save) stops the
    run at once, as a terminal's Ctrl-C to the whole process group: exit 130, one line, the
    staged version and the check's process gone, no summary; the same command then
    evaluates and exports the finished run (it is not trained again)."""
    raw = tiny_raw(tmp_path, train={"steps": 20}, eval={"every": 10, "steps": 2},
                   debug={"slow_export_seconds": 120})
    cfg = write_yaml(tmp_path / "c.yaml", raw)
    run, exports = tmp_path / "run", tmp_path / "saved_models" / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.Popen([sys.executable, "-m", "tfpretrain.fit", "--config", str(cfg),
                             "--run-dir", str(run)], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    t0 = time.time()
    while not (exports / ".tmp-1" / "assets.extra" / "config.yaml").exists():  # saved
        assert proc.poll() is None and time.time() - t0 < 300, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    checkers = [p for p in Path("/proc").glob("[0-9]*") if _child_running(p, proc.pid,
                                                                          b"check.py")]
    assert len(checkers) == 1
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    assert "stopped by signal 2 after training" in err and "Traceback" not in err, err[-3000:]
    assert not list(exports.iterdir()) and not (run / "summary.json").exists()
    assert not checkers[0].exists(), "the export check's process outlived the run"
    r = run_cli("tfpretrain.fit", "--config", str(cfg), "--run-dir", str(run),
                "--set", "debug.slow_export_seconds=0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "nothing to train" in r.stdout
    assert last_json_line(r.stdout)["saved_model"] == str(exports / "1")


def _child_running(proc_dir: Path, parent: int, needle: bytes) -> bool:
    try:
        ppid = int((proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[1])
        return ppid == parent and needle in (proc_dir / "cmdline").read_bytes()
    except (OSError, ValueError, IndexError):
        return False
