"""The learning-rate range test: which peak learning rate to train with.

    python -m tfpretrain.lr_find [--config NAME|PATH] [--set KEY=VALUE ...]
        [--min 1e-5] [--max 1] [--steps 200] [--png lr_find.png]

Trains the config's model on its data (its optimizer, clipping, precision and batch size)
for up to ``--steps`` steps while the learning rate grows exponentially from ``--min`` to
``--max``; stops early once the smoothed loss exceeds 4x its minimum (divergence). Prints
the suggested learning rate (fastai's "valley": the middle of the longest stretch over
which the smoothed loss keeps falling), the steepest-descent point and the minimum / 10,
writes a PNG of the smoothed loss against the learning rate (log scale) and a CSV of every
step, and ends with one JSON line. Any optimizer works the same:

    python -m tfpretrain.lr_find --set optimizer.name=muon

Then train at the suggestion: ``python -m tfpretrain.fit --set optimizer.learning_rate=...``.
The suggestion is a starting point for a short tune over a few values around it
(``python -m tfpretrain.tune``), not a guarantee: it comes from a few hundred steps at
growing rates, not a full run at one.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from tfpretrain.errors import UserError, cli_main, quiet_tensorflow
from tfpretrain.plots import png_path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tfpretrain.lr_find", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a packaged config's name or a YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override one config key (repeatable)")
    p.add_argument("--min", type=float, default=1e-5, help="first learning rate (1e-5)")
    p.add_argument("--max", type=float, default=1.0, help="last learning rate (1)")
    p.add_argument("--steps", type=int, default=200, help="sweep steps (200)")
    p.add_argument("--png", help="the plot (default: runs/<config name>-lr_find.png); a CSV "
                                 "of every step is written next to it")
    return p


def plot(result, path: Path, title: str) -> None:
    from tfpretrain.plots import pyplot, save

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(result.learning_rates, result.losses, color="0.75", lw=0.8, label="loss")
    ax.plot(result.learning_rates, result.smoothed, lw=1.6, label="smoothed loss")
    marks = (("suggested", result.suggestion, "tab:green"),
             ("minimum", result.learning_rates[result.best], "tab:red"))
    for label, lr, color in marks:
        ax.axvline(lr, color=color, ls="--", lw=1, label=f"{label} {lr:.2g}")
    finite = [x for x in result.smoothed if x == x]
    if finite:
        low, high = min(finite), max(finite[0], finite[-1])
        ax.set_ylim(low - 0.15 * (high - low), high + 0.1 * (high - low))
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save(fig, path)


def write_csv(result, path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "learning_rate", "loss", "smoothed_loss"])
        for i, row in enumerate(zip(result.learning_rates, result.losses, result.smoothed)):
            w.writerow([i, *(f"{x:.6g}" for x in row)])


def check_args(a) -> None:
    if not 0 < a.min < a.max:
        raise UserError(f"--min and --max must satisfy 0 < min < max. Received: "
                        f"--min {a.min:g} --max {a.max:g}")
    if a.steps < 20:
        raise UserError(f"--steps must be >= 20 (the smoothed loss needs them). "
                        f"Received: {a.steps}")


@cli_main
def main(argv=None) -> int:
    quiet_tensorflow()
    a = parser().parse_args(argv)
    check_args(a)
    from tfpretrain.config import load_config

    cfg = load_config(a.config, a.overrides)
    png = png_path(a.png or Path("runs") / f"{cfg.name}-lr_find.png", "--png")
    from tfpretrain.training.lr_range import range_test

    print(f"[tfpretrain] lr_find: {cfg.optimizer.name}, {a.min:g} -> {a.max:g} over "
          f"{a.steps} steps", flush=True)
    result = range_test(cfg, a.min, a.max, a.steps,
                        log=lambda m: print(f"[tfpretrain] {m}", flush=True))
    out = result.summary()
    plot(result, png, f"{cfg.name}: {cfg.optimizer.name}, batch {cfg.train.batch_size}")
    write_csv(result, png.with_suffix(".csv"))
    out.update(optimizer=cfg.optimizer.name, png=str(png), csv=str(png.with_suffix(".csv")))
    stop = (f"diverged at step {out['diverged_at_step']} (lr {out['diverged_at_learning_rate']})"
            if out["diverged_at_step"] is not None else "no divergence up to --max")
    print(f"[tfpretrain] {out['steps_run']} steps in {out['seconds']}s, {stop}; minimum "
          f"smoothed loss {out['min_smoothed_loss']} at lr {out['min_loss_learning_rate']} "
          f"(/10: {out['min_loss_learning_rate_over_10']}), steepest descent at lr "
          f"{out['steepest_learning_rate']}")
    print(f"[tfpretrain] suggested optimizer.learning_rate: {out['suggested_learning_rate']} "
          f"(plot: {png})")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
