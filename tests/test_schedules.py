"""optimizer.schedule: each shape against its formula; WSD extends its stable phase."""
import math

import pytest

from conftest import tiny_config


def lr_at(tmp_path, steps, schedule, at, **optimizer):
    from tfpretrain.training.optimizers import build_schedule

    cfg = tiny_config(tmp_path, train={"steps": steps},
                      optimizer={"learning_rate": 1e-2, "min_learning_rate": 1e-3,
                                 "warmup_steps": 10, "schedule": schedule, **optimizer})
    schedule = build_schedule(cfg.optimizer, cfg.train.steps)
    return [float(schedule(s)) for s in at]


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant", "inverse_sqrt", "wsd"])
def test_warmup_is_linear_from_zero_for_every_schedule(tmp_path, schedule):
    assert lr_at(tmp_path, 100, schedule, [0, 5, 10]) == pytest.approx([0.0, 5e-3, 1e-2])


def test_each_schedule_matches_its_formula(tmp_path):
    peak, low = 1e-2, 1e-3
    # cosine (Keras's CosineDecay): halfway through the decay = midpoint
    assert lr_at(tmp_path, 110, "cosine", [60, 110]) == pytest.approx([(peak + low) / 2, low])
    assert lr_at(tmp_path, 110, "linear", [35, 60, 110]) == pytest.approx(
        [peak + (low - peak) * 0.25, (peak + low) / 2, low])
    assert lr_at(tmp_path, 110, "constant", [50, 109]) == pytest.approx([peak, peak])
    inv = [peak * math.sqrt(10 / 40), peak * math.sqrt(10 / 250), low]  # floored at low
    assert lr_at(tmp_path, 5000, "inverse_sqrt", [40, 250, 4000]) == pytest.approx(inv)
    # wsd: 100 steps, decay_fraction 0.2 -> stable to step 80, then cool down to low at 100
    wsd = lr_at(tmp_path, 100, "wsd", [50, 80, 90, 100])
    assert wsd == pytest.approx([peak, peak, (peak + low) / 2, low])
    root = lr_at(tmp_path, 100, "wsd", [85, 100], cooldown="1-sqrt")
    assert root == pytest.approx([peak + (low - peak) * math.sqrt(0.25), low])


def test_wsd_resumed_with_more_steps_stays_in_the_stable_phase(tmp_path):
    """A WSD run planned for 1000 steps and resumed with train.steps=2000 before its
    cooldown (step 800) sees the same learning rates up to there, and stays stable longer."""
    short = lr_at(tmp_path, 1000, "wsd", [10, 400, 799, 900, 1600])
    longer = lr_at(tmp_path, 2000, "wsd", [10, 400, 799, 900, 1600])
    assert short[:3] == longer[:3] == pytest.approx([1e-2] * 3)
    assert short[3] < 1e-2 and longer[3] == pytest.approx(1e-2) and longer[4] == pytest.approx(1e-2)


def test_schedule_command_prints_the_run_s_rates_and_plots_them(tmp_path):
    from conftest import last_json_line, run_cli

    png = tmp_path / "wsd.png"
    r = run_cli("tfpretrain.schedule", "--set", "optimizer.schedule=wsd", "--set",
                "train.steps=1000", "--set", "optimizer.warmup_steps=100", "--points", "5",
                "--png", str(png))
    assert r.returncode == 0, r.stderr[-2000:]
    out = last_json_line(r.stdout)
    assert out["steps"] == [1, 101, 251, 501, 750, 1000]   # evenly spaced, and the warmup end
    lr = dict(zip(out["steps"], out["learning_rates"]))
    assert lr[1] == 0.0 and lr[101] == lr[501] == lr[750] == pytest.approx(3e-3)
    assert lr[1000] == pytest.approx(3e-4 + 2.7e-3 / 200)   # last step of the cooldown
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_schedule_command_evaluates_every_schedule_the_config_can_name():
    """Every schedule through the command's path (the default cosine with warmup once
    crashed there: Keras branches on a scalar condition), against the schedule itself."""
    import contextlib
    import io
    import json

    from tfpretrain.config import SCHEDULES
    from tfpretrain.schedule import main

    for name in SCHEDULES:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["--set", f"optimizer.schedule={name}", "--set", "train.steps=300",
                         "--set", "optimizer.warmup_steps=30", "--points", "4"]) == 0
        rates = json.loads(out.getvalue().strip().splitlines()[-1])["learning_rates"]
        assert rates[0] == 0.0 and max(rates) == pytest.approx(3e-3), name


@pytest.mark.slow  # suite time; run with -m slow
def test_lr_find_on_a_tiny_model_suggests_a_finite_rate_and_writes_the_plot(tmp_path):
    from conftest import last_json_line, run_cli, tiny_raw, write_yaml

    cfg = write_yaml(tmp_path / "t.yaml", tiny_raw(tmp_path))
    png = tmp_path / "out" / "lr.png"
    r = run_cli("tfpretrain.lr_find", "--config", str(cfg), "--steps", "40", "--min", "1e-4",
                "--max", "10", "--png", str(png))
    assert r.returncode == 0, r.stderr[-3000:]
    out = last_json_line(r.stdout)
    assert 1e-4 <= out["suggested_learning_rate"] <= out["min_loss_learning_rate"] <= 10
    assert math.isfinite(out["min_smoothed_loss"])
    assert out["diverged_at_step"] is not None and out["steps_run"] <= 40   # lr 10 blows up
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (png.with_suffix(".csv")).read_text().splitlines()
    assert rows[0] == "step,learning_rate,loss,smoothed_loss" and len(rows) == out["steps_run"] + 1
    assert float(rows[1].split(",")[1]) == pytest.approx(1e-4, rel=1e-3)
    bad = run_cli("tfpretrain.lr_find", "--min", "1", "--max", "0.1")
    assert bad.returncode == 2 and "--min and --max" in bad.stderr
