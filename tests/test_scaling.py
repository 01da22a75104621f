"""The IsoFLOP sweep (``python -m tfpretrain.scaling``): the fit recovers a known law, the
plan spends each budget and keeps the config's head size, bad input is one message, and a
real tiny sweep trains each size once, finds its valley and reuses its finished runs."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import last_json_line, tiny_raw, write_yaml
from tfpretrain.training.scaling import Point, laws, loss_law, valley

# Chinchilla's fitted loss (approach 3): L = E + A / N^alpha + B / D^beta
E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28


def chinchilla_points(budget: float, sizes) -> list[Point]:
    out = []
    for n in sizes:
        d = budget / (6 * n)
        out.append(Point(budget, int(n), int(d), budget, E + A / n ** ALPHA + B / d ** BETA))
    return out


def test_the_valleys_and_power_laws_recover_a_known_law():
    """On losses drawn from Chinchilla's own L(N, D), the valleys put each budget's best
    size near the true optimum, and the exponents come out as beta/(alpha+beta) and
    alpha/(alpha+beta)."""
    budgets = [1e18, 1e19, 1e20]
    g = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))
    valleys = []
    for c in budgets:
        true_n = g * (c / 6) ** (BETA / (ALPHA + BETA))
        v = valley(c, chinchilla_points(c, true_n * np.logspace(-0.8, 0.8, 7)))
        assert v.usable and v.problem is None
        assert abs(math.log(v.params / true_n)) < 0.1, (v.params, true_n)
        assert v.tokens == pytest.approx(c / (6 * v.params))
        valleys.append(v)
    law = laws(valleys)
    assert law["params"].exponent == pytest.approx(BETA / (ALPHA + BETA), abs=0.02)
    assert law["tokens"].exponent == pytest.approx(ALPHA / (ALPHA + BETA), abs=0.02)
    assert law["params"].at(1e19) == pytest.approx(valleys[1].params, rel=0.05)
    # approach 3 on the same runs: the law itself, its optimum and its loss there
    every = [p for v in valleys for p in v.points]
    fitted = loss_law(every)
    assert (fitted.alpha, fitted.beta) == (ALPHA, BETA) and not fitted.at_search_edge
    assert fitted.e == pytest.approx(E) and fitted.a == pytest.approx(A, rel=1e-4)
    n, d = fitted.optimum(1e21)
    assert n == pytest.approx(g * (1e21 / 6) ** (BETA / (ALPHA + BETA)), rel=1e-4)
    assert d == pytest.approx(1e21 / (6 * n))
    assert fitted.loss(n, d) == pytest.approx(E + A / n ** ALPHA + B / d ** BETA)
    assert loss_law(every[:5]) is None  # five parameters need six runs


def test_a_valley_at_the_edge_says_which_sizes_to_add():
    c = 1e19
    falling = chinchilla_points(c, [1e6, 2e6, 4e6])        # far below the optimum
    assert "add larger sizes" in valley(c, falling).problem
    rising = chinchilla_points(c, [1e10, 2e10, 4e10])      # far above it
    assert "add smaller sizes" in valley(c, rising).problem
    assert "needs 3" in valley(c, falling[:2]).problem
    broken = falling[:2] + [Point(c, 3_000_000, 1, c, math.nan)]
    assert "needs 3" in valley(c, broken).problem          # a failed run is not a point
    assert laws([valley(c, falling)]) is None


def tiny_yaml(tmp_path):
    raw = tiny_raw(tmp_path, model={"num_heads": 2, "hidden_dim": 32},
                   data={"embedded_documents": 300, "cache_dir": str(tmp_path / "cache")},
                   eval={"every": 20, "steps": 2, "sample_tokens": 4})
    return write_yaml(tmp_path / "tiny.yaml", raw)


def test_the_plan_spends_each_budget_at_the_configs_head_size(tmp_path):
    from tfpretrain.config import build_config, load_config, load_raw
    from tfpretrain.scaling import default_sizes, plan, repetition_warning

    path = str(tiny_yaml(tmp_path))
    cfg, base = load_config(path), load_raw(path)
    planned = plan(cfg, base, [4e9, 4e8], ["2x16", "2x48"], 320, train_tokens=40_000)
    assert [(p.budget, p.size) for p in planned] == [
        (4e8, "2x16"), (4e8, "2x48"), (4e9, "2x16"), (4e9, "2x48")]
    for p in planned:
        run = build_config(p.raw, name="run")  # a valid config
        assert (run.model.hidden_dim // run.model.num_heads) == 16  # the config's head size
        assert run.model.intermediate_dim == 2 * run.model.hidden_dim  # and its ratio
        assert run.train.steps == p.steps and run.eval.every == p.steps
        assert not run.export.enabled
        assert run.optimizer.warmup_steps == min(round(5 * p.steps / 60), p.steps // 2)
        if p.problem is None:
            assert abs(p.tokens * p.flops_per_token / p.budget - 1) < 0.1
    small = [p for p in planned if p.budget == 4e8 and p.size == "2x48"][0]
    assert "fewer than 20" in small.problem
    big = [p for p in planned if p.budget == 4e9 and p.size == "2x16"][0]
    assert big.steps % 8 == 0 and big.epochs == pytest.approx(big.tokens / 40_000, abs=0.01)
    warning = repetition_warning(cfg, planned)  # said before training, with the fix
    most = max(p.epochs for p in planned if p.problem is None)
    assert f"up to {most:.1f} epochs" in warning
    assert f"data.embedded_documents={math.ceil(300 * most / 1000) * 1000}" in warning
    sizes = default_sizes(cfg, [1e12, 1e13], 320)
    assert 2 <= len(sizes) <= 5 and all(s.startswith("2x") for s in sizes)
    assert all(int(s[2:]) % 16 == 0 or int(s[2:]) in (8,) for s in sizes)
    narrow = [p for p in plan(cfg, base, [4e9], ["2x8"], 320) if p.size == "2x8"][0]
    assert build_config(narrow.raw, name="n").model.num_heads == 1  # one head, 8 wide


@pytest.mark.parametrize("argv, needle", [
    (["--sizes", "4by128"], "--sizes '4by128': expected LAYERSxWIDTH"),
    (["--sizes", "2x24"], "multiple of the config's head size 16 (model"),
    (["--set", "model.init_from=runs/x"], "trains every size from scratch"),
])
def test_bad_input_is_one_message_and_exit_2(tmp_path, capsys, argv, needle):
    from tfpretrain.scaling import main

    assert main(["--config", str(tiny_yaml(tmp_path)), "--dry-run", *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_a_real_sweep_finds_its_valley_and_reuses_finished_runs(tmp_path, capsys):
    """Three sizes on one budget, trained by fit for real: each run's loss in
    scaling.json, the valley (or why there is none), the plot; the same command again
    trains nothing, and with another learning rate is refused."""
    from tfpretrain.scaling import main

    argv = ["--config", str(tiny_yaml(tmp_path)), "--budgets", "4e9", "--sizes", "2x16",
            "2x32", "2x48", "--run-dir", str(tmp_path / "sweep")]
    assert main(argv) == 0
    out = last_json_line(capsys.readouterr().out)
    saved = json.loads((tmp_path / "sweep" / "scaling.json").read_text())
    assert saved["runs"] == out["runs"] and len(saved["runs"]) == 3
    losses = [r["val_loss"] for r in saved["runs"]]
    assert all(math.isfinite(x) and 0 < x < 6.5 for x in losses), losses
    (v,) = saved["valleys"]
    assert v["problem"] or 10_000 < v["params_opt"] < 60_000, v
    assert saved["laws"] is None  # one budget: no power law
    assert (tmp_path / "sweep" / "isoflop.png").read_bytes()[:4] == b"\x89PNG"
    ckpt = tmp_path / "sweep" / "4.00e09" / "2x32" / "checkpoints"
    before = sorted(p.name for p in ckpt.iterdir())
    assert main(argv) == 0
    again = capsys.readouterr().out
    assert again.count("done before") == 3 and "[tfpretrain] model:" not in again
    assert sorted(p.name for p in ckpt.iterdir()) == before
    assert [r["val_loss"] for r in last_json_line(again)["runs"]] == losses
    # another learning rate in the same folder: refused, not answered by the old runs
    assert main(argv + ["--set", "optimizer.learning_rate=3e-3"]) == 2
    assert "trained with other settings (optimizer.learning_rate)" in capsys.readouterr().err


def test_the_dry_run_prints_the_plan_and_its_cost_without_training(tmp_path, capsys):
    from tfpretrain.scaling import main

    argv = ["--config", str(tiny_yaml(tmp_path)), "--dry-run", "--budgets", "1e17",
            "--sizes", "2x16", "2x32", "--run-dir", str(tmp_path / "sweep")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    result = last_json_line(out)
    assert [r["size"] for r in result["plan"]] == ["2x16", "2x32"] and result["runs"] == 2
    h100 = next(r for r in result["rows"] if r["device"] == "h100")
    assert h100["hours"] == pytest.approx(result["flops"] / (989e12 * 0.3) / 3600, rel=0.01)
    assert any(r["device"] == "cpu" for r in result["rows"]) and "MFU 0.30" in out
    assert not (tmp_path / "sweep").exists()
