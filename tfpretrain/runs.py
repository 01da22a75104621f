"""A table of runs, and their validation curves, without starting a server.

    python -m tfpretrain.runs [DIR] [--sort val_bits_per_byte] [--plot [PNG]]
                              [--metric val_loss|loss|grad_norm|learning_rate|...] [--json]

Finds every run folder under DIR (default ``runs/``; tune trials included): a folder with a
``config.yaml``. For each: name, key config values, parameters, tokens seen, val
loss / perplexity / bits-per-byte, tokens/s, wall time and status (``done``, ``stopped at
step N`` for a run with checkpoints but no summary, ``failed`` for a tune trial with an
error, ``empty``); where some run has them, the source of its first weights
(``init_from``, ``model.init_from``) and the loss on each extra validation set
(``val_<name>_loss``, ``eval.sets``) and the accuracy on each zero-shot task
(``task_<name>_acc``, ``eval.tasks``), which ``--sort`` (accuracies best first) and
``--metric`` also take.
``--plot`` writes a PNG of each run's curve of ``--metric`` read from its TensorBoard logs
(default ``DIR/<metric>.png``): val loss, an extra set's val loss, or a per-step train
scalar (loss and grad norm on a log scale, learning rate, tokens/s, MFU) with the steps the
stability guard skipped marked.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from tfpretrain.config import SET_LOSS, TASK_ACC, maximized
from tfpretrain.errors import UserError, cli_main, quiet_tensorflow
from tfpretrain.plots import png_path

COLUMNS = ("run", "arch", "size", "tokenizer", "params", "tokens_seen", "val_loss",
           "val_perplexity", "val_bits_per_byte", "tokens_per_second", "wall_seconds",
           "status")
TEXT_COLUMNS = ("run", "arch", "size", "tokenizer", "init_from", "status")


def find_runs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("config.yaml")
                  if not any(part.startswith(".") for part in p.parent.relative_to(root).parts)
                  and p.parent.name != "assets.extra")


def describe(run: Path, root: Path) -> dict:
    row = {"run": str(run.relative_to(root)) if run != root else run.name, "path": str(run)}
    try:
        cfg = yaml.safe_load((run / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        cfg = {}
    model = cfg.get("model", {})
    row["arch"] = model.get("arch")
    row["size"] = (f"{model.get('num_layers')}x{model.get('hidden_dim')}"
                   f"/T{model.get('sequence_length')}") if model else None
    row["tokenizer"] = cfg.get("tokenizer", {}).get("kind")
    summary_path = run / "summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        for key in COLUMNS[4:-1]:
            row[key] = summary.get(key)
        row.update({k: v for k, v in summary.items() if _extra(k)})
        row["init_from"] = (summary.get("init_from") or {}).get("source")
        row["status"] = "done"
    else:
        steps = [int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*")
                 if p.is_dir()] if (run / "checkpoints").is_dir() else []
        if (run / "error.txt").exists():
            row["status"] = "failed"
        elif steps:
            row["status"] = f"stopped at step {max(steps)}"
        else:
            row["status"] = "empty"
    return row


METRICS = {  # --metric -> (TensorBoard split, tag, axis label)
    "val_loss": ("val", "loss", "val loss (nats/token)"),
    "loss": ("train", "loss", "train loss (nats/token)"),
    "grad_norm": ("train", "grad_norm", "global gradient norm (before clipping)"),
    "learning_rate": ("train", "learning_rate", "learning rate"),
    "tokens_per_second": ("train", "tokens_per_second", "tokens/s"),
    "mfu": ("train", "mfu", "MFU"),
}


def _extra(key: str) -> bool:
    """An eval.sets loss or an eval.tasks accuracy: a column where some run has it."""
    return bool(SET_LOSS.fullmatch(key) or TASK_ACC.fullmatch(key))


def metric_of(name: str) -> tuple[str, str, str]:
    """--metric: (TensorBoard split, tag, axis label); an eval.sets loss is
    ``val_<name>_loss``, an eval.tasks accuracy ``task_<name>_acc``."""
    if name in METRICS:
        return METRICS[name]
    if TASK_ACC.fullmatch(name):
        return "val", name, f"{TASK_ACC.fullmatch(name).group(1)} accuracy"
    match = SET_LOSS.fullmatch(name)
    if match is None:
        raise UserError(f"--metric: one of {', '.join(METRICS)}, val_<name>_loss of an "
                        f"eval.sets entry or task_<name>_acc of an eval.tasks entry. "
                        f"Received: {name!r}")
    return "val", f"{match.group(1)}_loss", f"{match.group(1)} val loss (nats/token)"


def columns(rows: list[dict]) -> tuple:
    """COLUMNS, with ``init_from``, each eval.sets loss and each eval.tasks accuracy where
    some run has them."""
    sets = tuple(sorted({k for r in rows for k in r if _extra(k)}))
    origin = ("init_from",) if any(r.get("init_from") for r in rows) else ()
    return COLUMNS[:4] + origin + COLUMNS[4:9] + sets + COLUMNS[9:]


def curve(run: Path, split: str, tag: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one scalar of a run's TensorBoard logs (``logs/<split>``)."""
    import tensorflow as tf

    points = {}
    for f in sorted((run / "logs" / split).glob("events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(str(f)):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for v in event.summary.value:
                if v.tag == tag:
                    points[event.step] = float(tf.make_ndarray(v.tensor))
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def val_curve(run: Path) -> tuple[list[int], list[float]]:
    return curve(run, "val", "loss")


def skipped_steps(run: Path) -> list[int]:
    """The steps the stability guard skipped (``train/skipped`` is 1)."""
    return [s for s, v in zip(*curve(run, "train", "skipped")) if v > 0]


def _mark_skipped(ax, run: Path, steps, values, marked: bool) -> bool:
    """Red crosses on the steps the guard skipped; a non-finite value (NaN loss) is drawn
    at the top of the axes, where it cannot be plotted."""
    import math

    skipped = set(skipped_steps(run))
    at = [(s, v) for s, v in zip(steps, values) if s in skipped]
    if not at:
        return marked
    top = max((v for v in values if math.isfinite(v)), default=1.0)
    xs = [s for s, _ in at]
    ys = [v if math.isfinite(v) else top for _, v in at]
    ax.scatter(xs, ys, marker="x", s=40, color="red", zorder=3, clip_on=False,
               label=None if marked else "skipped by the guard (NaN: drawn at the top)")
    return True


def plot(rows: list[dict], root: Path, path: Path, metric: str = "val_loss") -> Path:
    """Curves of ``metric`` for every run; train metrics mark the guard's skipped steps."""
    from tfpretrain.plots import pyplot, save

    plt = pyplot()
    split, tag, label = metric_of(metric)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    marked = False
    for row in rows:
        run = Path(row["path"])
        steps, values = curve(run, split, tag)
        if not steps:
            continue
        ax.plot(steps, values, marker="o" if split == "val" else None, markersize=3,
                linewidth=1, label=row["run"])
        if split == "train":
            marked = _mark_skipped(ax, run, steps, values, marked)
    if metric in ("grad_norm", "loss"):  # a spike is orders of magnitude: log scale
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(label)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save(fig, path)
    return path


def table(rows: list[dict]) -> str:
    from tfpretrain.tables import fmt, render

    shown = columns(rows)
    return render(shown, [[fmt(r.get(c)) for c in shown] for r in rows])


@cli_main
def main(argv=None) -> int:
    quiet_tensorflow()
    p = argparse.ArgumentParser(prog="python -m tfpretrain.runs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", nargs="?", default="runs")
    p.add_argument("--sort", default="val_loss",
                   help=f"a column: {', '.join(COLUMNS)}, init_from, val_<name>_loss or "
                        "task_<name>_acc (best first)")
    p.add_argument("--plot", nargs="?", const="", help="write the runs' curves to this PNG "
                   "(default DIR/<metric>.png)")
    p.add_argument("--metric", default="val_loss",
                   help=f"what --plot draws: {', '.join(METRICS)}, val_<name>_loss of an "
                        "eval.sets entry or task_<name>_acc of an eval.tasks entry (default "
                        "val_loss; train metrics mark the steps the stability guard skipped)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON lines")
    a = p.parse_args(argv)
    root = Path(a.dir)
    metric_of(a.metric)  # a bad name is refused before anything is read
    path = png_path(a.plot or root / f"{a.metric}.png", "--plot") if a.plot is not None \
        else None
    if not root.is_dir():
        raise UserError(f"no such folder: {root}")
    runs = find_runs(root)
    if not runs:
        raise UserError(f"no run folders (with config.yaml) under {root}")
    rows = [describe(r, root) for r in runs]
    if a.sort not in columns(rows) and not _extra(a.sort):
        raise UserError(f"--sort: one of {', '.join(columns(rows))}. Received: {a.sort!r}")
    sign = -1 if maximized(a.sort) else 1
    rows.sort(key=lambda r: (r.get(a.sort) is None, sign * (r.get(a.sort) or 0))
              if a.sort not in TEXT_COLUMNS else str(r.get(a.sort)))
    if a.json:
        for r in rows:
            print(json.dumps(r))
    else:
        print(table(rows))
    if path is not None:
        print(f"wrote {plot(rows, root, path, a.metric)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
