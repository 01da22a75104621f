"""``python -m tfpretrain.bench optim``: optimizers and schedules compared on one config.

Each variant (an optimizer or schedule with its learning rate, as ``--set`` overrides of
the config) is trained by the real ``python -m tfpretrain.fit`` in its own process, for
the same steps, once per seed, with validation every ``--eval-every`` steps. The table:
final val loss (``eval.final_steps`` batches; mean over seeds, and each seed), the first
validation step at which the variant reaches the baseline's (first variant's) last
validation loss of the same seed, and that as a fraction of the baseline's steps,
tokens/s, peak RSS of the process, seconds. Variants run alternating (seed by seed), so
machine noise spreads over all of them.

A variant is ``NAME:KEY=VALUE,KEY=VALUE`` (config keys without their ``optimizer.``
prefix are read as optimizer keys), e.g. ``muon-2x:name=muon,muon_learning_rate=6e-3``.
The defaults (DEFAULT_VARIANTS) carry learning rates chosen for the default config from
``python -m tfpretrain.lr_find`` sweeps (docs/benchmarks.md), not tuned per optimizer.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tfpretrain.errors import UserError

DEFAULT_VARIANTS = (
    "adamw:",
    "muon:name=muon",
    "muon-lr1e-2:name=muon,muon_learning_rate=1e-2",
    "adamw-wsd:schedule=wsd",
    "schedule_free_adamw:name=schedule_free_adamw",
    "lion:name=lion,learning_rate=1e-3,min_learning_rate=1e-4,weight_decay=0.3",
    "adafactor:name=adafactor,learning_rate=1e-1,min_learning_rate=1e-2",
    "sgd:name=sgd,learning_rate=0.3,min_learning_rate=0.03",
)
COLUMNS = ["variant", "final val loss", "per seed", "reaches baseline at", "of baseline steps",
           "tokens/s", "peak RSS GB", "seconds"]


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``NAME:KEY=VALUE,...`` -> (name, ["optimizer.KEY=VALUE", ...])."""
    name, _, rest = text.partition(":")
    if not name:
        raise UserError(f"--variant {text!r}: expected NAME:KEY=VALUE,... (e.g. "
                        "muon:name=muon,muon_learning_rate=1e-2)")
    overrides = []
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise UserError(f"--variant {text!r}: {item!r} is not KEY=VALUE")
        overrides.append(f"{key if '.' in key else 'optimizer.' + key}={value}")
    return name, overrides


def run_variant(config, overrides: list[str], run_dir: Path) -> dict:
    """One ``tfpretrain.fit`` process: its summary, val curve and peak RSS (wait4)."""
    from tfpretrain.runs import val_curve

    cmd = [sys.executable, "-m", "tfpretrain.fit", "--run-dir", str(run_dir)]
    cmd += ["--config", str(config)] if config else []
    for o in overrides:
        cmd += ["--set", o]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    t0 = time.time()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise UserError(f"bench optim: {' '.join(cmd)} failed ({proc.returncode}):\n"
                        f"{stderr[-2000:]}")
    summary = json.loads(stdout.strip().splitlines()[-1])
    steps, losses = val_curve(run_dir)
    return {"val_loss": summary["val_loss"], "curve": list(zip(steps, losses)),
            "tokens_per_second": summary["tokens_per_second"],
            "peak_rss_gb": usage.ru_maxrss / 2**20, "seconds": time.time() - t0}


def reach_step(curve, target: float):
    """The first evaluated step whose val loss is <= target (None: never)."""
    return next((s for s, v in curve if v <= target), None)


def bench_optim(config, base: list[str], variants: list[str], seeds: list[int],
                log=print) -> dict:
    parsed = [parse_variant(v) for v in variants]
    names = [n for n, _ in parsed]
    if len(set(names)) != len(names):
        raise UserError(f"--variant names must differ. Received: {names}")
    results = {n: [] for n in names}
    with tempfile.TemporaryDirectory(prefix="tfpretrain-bench-optim-") as tmp:
        for seed in seeds:
            for name, overrides in parsed:
                run_dir = Path(tmp) / f"{name}-{seed}"
                log(f"bench optim: {name}, seed {seed}: {' '.join(overrides) or '(config)'}")
                r = run_variant(config, base + overrides + [f"train.seed={seed}"], run_dir)
                log(f"  val_loss {r['val_loss']:.4f}, {r['tokens_per_second']:,.0f} tok/s, "
                    f"{r['seconds']:.0f}s")
                results[name].append(r)
    return {"seeds": seeds, "variants": dict(parsed), "baseline": names[0],
            "rows": _rows(results, names[0])}


def _rows(results: dict, baseline: str) -> list[dict]:
    base_runs = results[baseline]
    rows = []
    for name, runs in results.items():
        # the baseline's last in-training validation (same batches as every curve point;
        # the final val loss column is the larger final evaluation)
        reached = [reach_step(r["curve"], b["curve"][-1][1]) for r, b in zip(runs, base_runs)]
        base_steps = [b["curve"][-1][0] for b in base_runs]
        fractions = [None if s is None else s / t for s, t in zip(reached, base_steps)]
        mean = lambda xs: None if any(x is None for x in xs) else sum(xs) / len(xs)  # noqa
        rows.append({"variant": name, "val_loss": mean([r["val_loss"] for r in runs]),
                     "val_loss_per_seed": [r["val_loss"] for r in runs],
                     "reaches_baseline_at": reached, "fraction_of_baseline_steps":
                     mean(fractions),
                     "tokens_per_second": mean([r["tokens_per_second"] for r in runs]),
                     "peak_rss_gb": max(r["peak_rss_gb"] for r in runs),
                     "seconds": mean([r["seconds"] for r in runs])})
    return rows


def optim_table(result: dict) -> str:
    from tfpretrain.tables import render

    def fmt(x, spec):
        return "never" if x is None else format(x, spec)

    out = []
    for r in result["rows"]:
        reached = ", ".join("never" if s is None else f"{s:,}" for s in r["reaches_baseline_at"])
        out.append([r["variant"], fmt(r["val_loss"], ".4f"),
                    " / ".join(f"{x:.4f}" for x in r["val_loss_per_seed"]), reached,
                    fmt(r["fraction_of_baseline_steps"], ".0%"),
                    fmt(r["tokens_per_second"], ",.0f"), fmt(r["peak_rss_gb"], ".2f"),
                    fmt(r["seconds"], ".0f")])
    return render(COLUMNS, out)
