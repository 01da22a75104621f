"""The learning rate a run will use, step by step: a table and a PNG.

    python -m tfpretrain.schedule [--config NAME|PATH] [--set KEY=VALUE ...]
        [--png schedule.png] [--points 11]

Evaluates the config's schedule (``optimizer.schedule``, warmup, min_learning_rate,
wsd's decay_fraction/cooldown; ``train.steps`` long) with the same code the optimizer
uses, prints the learning rate at evenly spaced steps, and with ``--png`` plots every step
(Muon runs show their matrices' rate, ``optimizer.muon_learning_rate``, too). The last line
is one JSON object: {"steps": [...], "learning_rates": [...]}.

    python -m tfpretrain.schedule --set optimizer.schedule=wsd --set optimizer.cooldown=1-sqrt \
        --png wsd.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from tfpretrain.errors import UserError, cli_main, quiet_tensorflow
from tfpretrain.plots import png_path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tfpretrain.schedule", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a packaged config's name or a YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override one config key (repeatable)")
    p.add_argument("--png", help="plot every step's learning rate to this PNG")
    p.add_argument("--points", type=int, default=11, help="rows of the printed table (11)")
    return p


def learning_rates(cfg) -> list[float]:
    """The learning rate of every optimizer step 0 .. train.steps - 1 (step = optimizer
    steps done before the update), evaluated in one call."""
    import numpy as np

    from tfpretrain.training.optimizers import build_schedule

    import tensorflow as tf

    schedule = build_schedule(cfg.optimizer, cfg.train.steps)
    steps = tf.range(cfg.train.steps, dtype=tf.float32)
    # element by element, in one graph: Keras's warmup schedules branch with a scalar cond
    rates = tf.function(lambda s: tf.map_fn(lambda x: tf.cast(schedule(x), tf.float32), s,
                                            fn_output_signature=tf.float32))(steps)
    return [float(x) for x in np.asarray(rates)]


def plot(cfg, lrs: list[float], path: Path) -> None:
    from tfpretrain.plots import pyplot, save

    o = cfg.optimizer
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot(range(1, len(lrs) + 1), lrs, lw=1.5, label="learning_rate")
    muon = o.setting("muon_learning_rate") if o.name == "muon" else None
    if muon:
        ax.plot(range(1, len(lrs) + 1), [x * muon / o.learning_rate for x in lrs], lw=1.2,
                ls="--", label="muon_learning_rate")
        ax.legend(fontsize=8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title(f"{cfg.name}: {o.name}, {o.resolved_schedule}, warmup {o.warmup_steps}, "
                 f"{cfg.train.steps:,} steps", fontsize=9)
    ax.grid(alpha=0.3)
    save(fig, path)


@cli_main
def main(argv=None) -> int:
    quiet_tensorflow()
    a = parser().parse_args(argv)
    if a.points < 2:
        raise UserError(f"--points must be >= 2. Received: {a.points}")
    png = png_path(a.png, "--png") if a.png else None
    from tfpretrain.config import load_config
    from tfpretrain.tables import render

    cfg = load_config(a.config, a.overrides)
    lrs = learning_rates(cfg)
    total = cfg.train.steps
    shown = sorted({round(i * (total - 1) / (a.points - 1)) for i in range(a.points)}
                   | {min(cfg.optimizer.warmup_steps, total - 1)})
    print(render(["step", "learning_rate"], [[f"{s + 1:,}", f"{lrs[s]:.4g}"] for s in shown]))
    if png:
        plot(cfg, lrs, png)
        print(f"[tfpretrain] wrote {a.png}")
    print(json.dumps({"schedule": cfg.optimizer.resolved_schedule,
                      "steps": [s + 1 for s in shown],
                      "learning_rates": [lrs[s] for s in shown],
                      "png": a.png}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
