"""train.strategy: mirrored over 2 logical CPU devices trains the same curve as one device
with the same global batch, and checkpoints move between replica counts. Real processes
(the CPU is split into logical devices before TensorFlow starts)."""
import numpy as np
import pytest

from conftest import last_json_line, run_cli, tiny_raw, write_yaml
from test_fit import read_scalars

MIRRORED = ["--set", "train.logical_cpu_devices=2", "--set", "train.strategy=mirrored"]


def fit(cfg_path, run_dir, steps, *extra):
    r = run_cli("tfpretrain.fit", "--config", str(cfg_path), "--run-dir", str(run_dir),
                "--set", f"train.steps={steps}", *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    return r, last_json_line(r.stdout)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The config (a constant schedule: a run of 20 steps extended to 40 sees the rates of
    a 40-step run; the batch of step 5 poisoned with NaN, for the guard), and one device's
    unbroken 40 steps."""
    tmp = tmp_path_factory.mktemp("distributed")
    raw = tiny_raw(tmp, train={"steps": 40, "checkpoint_every": 10, "deterministic": True},
                   optimizer={"schedule": "constant", "learning_rate": 1e-2},
                   eval={"every": 10, "final_steps": 2}, export={"enabled": False},
                   debug={"nan_at_step": 5})
    cfg_path = write_yaml(tmp / "d.yaml", raw)
    _, summary = fit(cfg_path, tmp / "one", 40, "--set", "train.strategy=one_device")
    return cfg_path, tmp / "one", summary


def same_curve(run_dir, reference_dir, tolerance=1e-4):
    ours = read_scalars(run_dir / "logs" / "train")["loss"]
    theirs = read_scalars(reference_dir / "logs" / "train")["loss"]
    assert sorted(ours) == sorted(theirs) == list(range(1, 41))
    assert np.isnan(float(ours[5])) and np.isnan(float(theirs[5]))   # the poisoned batch
    worst = max(abs(float(ours[s]) - float(theirs[s])) for s in ours if s != 5)
    assert worst < tolerance, worst


@pytest.mark.slow  # suite time; run with -m slow
def test_mirrored_then_resumed_on_one_device_follows_the_one_device_curve(setup, tmp_path):
    """Steps 1-20 on 2 replicas (8 rows each), then the 2-replica checkpoint resumed on one
    device for steps 21-40: every step's loss within 1e-4 of one device's 40 steps."""
    cfg_path, one_dir, one = setup
    run_dir = tmp_path / "run"
    r, first = fit(cfg_path, run_dir, 20, *MIRRORED)
    assert first["strategy"] == "mirrored" and first["replicas"] == 2
    assert first["skipped_steps"] == 1 == one["skipped_steps"]          # the guard, mirrored
    assert "mirrored over 2 devices" in r.stdout and "8 rows per replica" in r.stdout
    r, resumed = fit(cfg_path, run_dir, 40, "--set", "train.strategy=one_device")
    assert "resumed from" in r.stdout and resumed["replicas"] == 1
    same_curve(run_dir, one_dir)
    assert resumed["val_loss"] == pytest.approx(one["val_loss"], abs=1e-3)


@pytest.mark.slow
def test_one_device_checkpoint_resumes_on_two_replicas(setup, tmp_path):
    cfg_path, one_dir, one = setup
    run_dir = tmp_path / "run"
    fit(cfg_path, run_dir, 20, "--set", "train.strategy=one_device")
    _, resumed = fit(cfg_path, run_dir, 40, *MIRRORED)
    assert resumed["replicas"] == 2
    same_curve(run_dir, one_dir)
    assert np.isclose(resumed["val_loss"], one["val_loss"], atol=1e-3)


@pytest.mark.slow  # suite time; run with -m slow
def test_mirrored_without_devices_or_with_an_uneven_batch_exits_2(tmp_path):
    cfg_path = write_yaml(tmp_path / "d.yaml", tiny_raw(tmp_path))
    r = run_cli("tfpretrain.fit", "--config", str(cfg_path), "--run-dir", str(tmp_path / "a"),
                "--set", "train.strategy=mirrored")
    assert r.returncode == 2 and "needs at least 2 devices" in r.stderr
    assert "train.logical_cpu_devices: 2" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("tfpretrain.fit", "--config", str(cfg_path), "--run-dir", str(tmp_path / "b"),
                *MIRRORED, "--set", "train.batch_size=15")
    assert r.returncode == 2 and "must split evenly over 2 replicas" in r.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# --- multi_worker: MultiWorkerMirroredStrategy, real processes on 127.0.0.1 ------------

def free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def start_workers(cfg_path, run_dir, steps, *extra, worker1=()):
    """Two `python -m tfpretrain.fit` processes, worker 0 (the chief) and worker 1, with the
    TF_CONFIG Kubeflow/Vertex would set; stdout and stderr to files next to the run
    folder (<run>.worker<i>.log / .err). ``worker1``: arguments for worker 1 alone."""
    import json
    import os
    import subprocess
    import sys

    from conftest import REPO

    workers = [f"127.0.0.1:{p}" for p in free_ports(2)]
    procs = []
    for i in range(2):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}}
        env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2",
                   TF_CONFIG=json.dumps(tf_config))
        out, err = open(f"{run_dir}.worker{i}.log", "w"), open(f"{run_dir}.worker{i}.err", "w")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tfpretrain.fit", "--config", str(cfg_path), "--run-dir",
             str(run_dir), "--set", f"train.steps={steps}", *extra, *(worker1 if i else ())],
            cwd=REPO, env=env, stdout=out, stderr=err, text=True))
    return procs


def most_threads(proc, name: str, every: float = 0.2) -> list[int]:
    """While ``proc`` runs: the largest number of its threads called ``name`` at once
    (from /proc/<pid>/task/*/comm), kept up to date in the returned one-item list."""
    import threading
    import time
    from pathlib import Path

    most = [0]

    def count():
        n = 0
        for task in Path(f"/proc/{proc.pid}/task").glob("*"):
            try:
                n += (task / "comm").read_text().strip() == name
            except OSError:
                pass
        return n

    def sample():
        while proc.poll() is None:
            most[0] = max(most[0], count())
            time.sleep(every)

    threading.Thread(target=sample, daemon=True).start()
    return most


def finish_workers(procs, run_dir, timeout=300):
    from pathlib import Path

    codes = [p.wait(timeout=timeout) for p in procs]
    logs = [Path(f"{run_dir}.worker{i}.log").read_text() for i in range(2)]
    errors = [Path(f"{run_dir}.worker{i}.err").read_text()[-3000:] for i in range(2)]
    assert codes == [0, 0], "\n".join(errors)
    return codes, logs


def test_two_workers_on_loopback_train_one_devices_curve(setup, tmp_path):
    """A 2-process MultiWorkerMirroredStrategy run (TF_CONFIG, 127.0.0.1): both workers end
    with identical weights, only the chief writes results, every step's loss follows one
    device's within 1e-4 (the NaN batch skipped on both), and the 2-worker checkpoint
    resumes on one device for steps 21-40, still on one device's curve. TensorFlow's
    collective threads stay few (a per-collective timeout parked ~22 more every step)."""
    cfg_path, one_dir, one = setup
    run_dir = tmp_path / "run"
    procs = start_workers(cfg_path, run_dir, 20)
    collective_threads = most_threads(procs[0], "collective_ops")
    codes, logs = finish_workers(procs, run_dir)
    assert collective_threads[0] < 40, collective_threads
    chief, worker = (last_json_line(log) for log in logs)
    assert chief["strategy"] == "multi_worker" and chief["workers"] == 2
    assert chief["replicas"] == 2 and worker["role"] == "worker 1"
    assert chief["weights_sha256"] == worker["weights_sha256"]
    assert chief["skipped_steps"] == worker["skipped_steps"] == 1
    assert "multi_worker over 2 workers" in logs[0] and "the chief" in logs[0]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()
                  if p.name.startswith("step-")) == ["step-00000010", "step-00000020"]
    r, resumed = fit(cfg_path, run_dir, 40, "--set", "train.strategy=one_device")
    assert "resumed from" in r.stdout and resumed["replicas"] == 1
    same_curve(run_dir, one_dir)
    assert resumed["val_loss"] == pytest.approx(one["val_loss"], abs=1e-3)


@pytest.mark.parametrize("tf_config, problem", [
    ("{not json", "is not valid JSON"),
    ('{"cluster": {"ps": ["a:1"], "worker": ["b:2"]}, "task": {"type": "worker"}}',
     "only \"chief\" and \"worker\""),
    ('{"cluster": {"worker": ["a:1", "b"]}, "task": {"type": "worker", "index": 0}}',
     "'b', which is not \"host:port\""),
    ('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 2}}',
     "task.index must be 0..1"),
])
def test_malformed_tf_config_exits_2_naming_it(tmp_path, tf_config, problem):
    r = run_cli("tfpretrain.fit", "--run-dir", str(tmp_path / "run"),
                env={"TF_CONFIG": tf_config})
    assert r.returncode == 2, r.stderr[-2000:]
    assert "TF_CONFIG" in r.stderr and problem in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_killed_worker_ends_the_other_and_both_resume(setup, tmp_path):
    """Worker 1 killed (SIGKILL) mid-run: the chief exits 75 within a minute with a message
    naming the lost worker, no traceback; started again, both resume from the chief's
    last checkpoint and finish with identical weights."""
    import time

    cfg_path, _, _ = setup
    run_dir = tmp_path / "run"
    every = ("--set", "eval.every=20", "--set", "train.checkpoint_every=20")
    procs = start_workers(cfg_path, run_dir, 2000, *every)
    log0 = lambda: (tmp_path / "run.worker0.log").read_text()  # noqa: E731
    err0 = lambda: (tmp_path / "run.worker0.err").read_text()  # noqa: E731
    deadline = time.time() + 240
    while "step 40/" not in log0() and time.time() < deadline:
        time.sleep(0.5)
    assert "step 40/" in log0(), log0()[-3000:]
    procs[1].kill()
    t0 = time.time()
    code = procs[0].wait(timeout=120)
    assert code == 75 and time.time() - t0 < 90
    assert "lost contact with the other workers" in err0() and "Traceback" not in err0()
    assert "exit 75" in err0().strip().splitlines()[-1]
    codes, logs = finish_workers(start_workers(cfg_path, run_dir, 100, *every), run_dir)
    assert all("resumed from" in log for log in logs)
    chief, worker = (last_json_line(log) for log in logs)
    assert chief["steps"] == 100 and chief["weights_sha256"] == worker["weights_sha256"]


def test_xla_under_a_strategy_on_a_cpu_is_refused(tmp_path):
    """Measured: XLA cannot compile a multi-replica step on CPU devices (docs/distributed.md)."""
    from conftest import tiny_config
    from tfpretrain.errors import UserError
    from tfpretrain.training.runtime import jit_compile

    cfg = tiny_config(tmp_path, train={"jit_compile": True})
    assert jit_compile(cfg) is True
    with pytest.raises(UserError, match="needs GPUs or TPUs"):
        jit_compile(cfg, distributed=True)
    assert jit_compile(tiny_config(tmp_path), distributed=True) is False


def test_sigterm_to_one_worker_stops_every_worker_at_the_same_step(setup, tmp_path):
    """SIGTERM to worker 1 alone (its VM preempted): within seconds both workers stop
    after the same step, the chief commits that step's checkpoint, worker 1 exits 143
    (128 + 15) and the chief with train.rerun_exit_code (138 here, as under Kubeflow's
    ExitCode policy) naming worker 1, without tracebacks; started again (with the default
    75), both resume from that step and finish with identical weights."""
    import re
    import signal
    import time

    cfg_path, _, _ = setup
    run_dir = tmp_path / "run"
    procs = start_workers(cfg_path, run_dir, 2000, "--set", "train.rerun_exit_code=138")
    log0 = lambda: (tmp_path / "run.worker0.log").read_text()  # noqa: E731
    deadline = time.time() + 240
    while "step 20/" not in log0() and time.time() < deadline:
        time.sleep(0.2)
    assert "step 20/" in log0(), log0()[-3000:]
    procs[1].send_signal(signal.SIGTERM)
    t0 = time.time()
    assert [procs[1].wait(timeout=60), procs[0].wait(timeout=60)] == [143, 138]
    assert time.time() - t0 < 30
    err0, err1 = ((tmp_path / f"run.worker{i}.err").read_text() for i in range(2))
    stop = int(re.search(r"stopped at step (\d+) with worker 1, which got signal 15",
                         err0).group(1))
    assert f"stopped by signal 15 at step {stop}; exit 143" in err1
    assert "; exit 138" in err0.strip().splitlines()[-1]
    assert "Traceback" not in err0 + err1
    assert (run_dir / "checkpoints" / f"step-{stop:08d}").is_dir()
    codes, logs = finish_workers(start_workers(cfg_path, run_dir, stop + 10), run_dir)
    assert all(f"at step {stop}" in log and "resumed from" in log for log in logs)
    chief, worker = (last_json_line(log) for log in logs)
    assert chief["steps"] == stop + 10 and chief["weights_sha256"] == worker["weights_sha256"]


def test_the_stall_watch_gives_the_first_batch_of_each_kind_four_times_the_timeout(
        monkeypatch):
    """callbacks.StallWatch on its own thread, timeout 0.4 s: the first training step and
    the first evaluation batch (tracing, compiling) may wait 1.6 s; a later one that waits
    over 0.4 s aborts the collectives once, with the message naming the setting. (The
    abort itself, and what it does to a run, is the slow test below.)"""
    import time

    from tfpretrain import compat
    from tfpretrain.training.callbacks import StallWatch

    aborted = []
    monkeypatch.setattr(compat, "abort_collectives", aborted.append)
    watch = StallWatch(0.4, every=0.05)
    watch.on_train_begin()
    for begin, end in ((watch.on_train_batch_begin, watch.on_train_batch_end),
                       (watch.on_test_batch_begin, watch.on_test_batch_end)):
        begin(0)
        time.sleep(1.0)  # a first batch: over the timeout, within 4 times it
        end(0)
        assert aborted == []
    watch.on_test_batch_begin(1)
    time.sleep(0.2)
    watch.on_test_batch_end(1)
    watch.on_train_batch_begin(1)
    deadline = time.time() + 5
    while not aborted and time.time() < deadline:
        time.sleep(0.05)
    waited = time.time() - deadline + 5
    watch.on_train_end()
    assert aborted == ["a step waited over 0.4 s for the other workers, train.worker_timeout"]
    assert 0.35 < waited < 1.0, waited


@pytest.mark.slow
def test_a_stalled_worker_ends_the_run_after_worker_timeout(setup, tmp_path):
    """Worker 1 alive but not taking part: asleep for 60 s inside its checkpoint write at
    step 10 (debug.slow_checkpoint_seconds), while its process still answers the health
    check's pings. The chief, in step 11, gives up after train.worker_timeout (15 s) with
    exit 75 and a message naming that setting; worker 1 exits 75 once it wakes."""
    import time

    cfg_path, _, _ = setup
    run_dir = tmp_path / "run"
    procs = start_workers(cfg_path, run_dir, 40, "--set", "train.worker_timeout=15",
                          "--set", "eval.every=20",  # step 11 follows the save at once
                          worker1=("--set", "debug.slow_checkpoint_seconds=60"))
    log0 = lambda: (tmp_path / "run.worker0.log").read_text()  # noqa: E731
    deadline = time.time() + 240
    checkpoint = run_dir / "checkpoints" / "step-00000010"
    while not checkpoint.exists() and time.time() < deadline:
        time.sleep(0.2)
    assert checkpoint.exists(), log0()[-3000:]
    t0 = time.time()
    assert procs[0].wait(timeout=120) == 75
    waited = time.time() - t0
    err0 = (tmp_path / "run.worker0.err").read_text()
    assert 14 < waited < 45, waited
    assert "a step waited over 15 s for the other workers, train.worker_timeout" in err0
    assert "lost contact with the other workers at step 10" in err0
    assert "Traceback" not in err0
    assert procs[1].wait(timeout=180) == 75
