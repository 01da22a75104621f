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
