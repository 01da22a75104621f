"""Measure your own scaling law: an IsoFLOP sweep (Chinchilla's approach 2) on your data.

    python -m tfpretrain.scaling [--config NAME|PATH] [--set KEY=VALUE ...]
        [--budgets 2.6e12 7.7e12 2.3e13] [--sizes 4x32 4x64 4x96 4x160]
        [--target 1e18 ...] [--run-dir runs/<config name>-scaling] [--png PATH] [--dry-run]

For each compute budget (training FLOPs, ``estimate``'s 6N + 12LHT per token), every size
(``LAYERSxWIDTH``; heads and feed-forward width keep the config's head size and ratio) is
trained from scratch for budget / FLOPs-per-token tokens: a real ``fit`` run of the
config (its data, tokenizer, optimizer, schedule, warmup as the same share of the steps),
in ``<run-dir>/<budget>/<size>/``, with no export. The final validation loss against
log(parameters) is a valley per budget; the parabola through its best size and the two
either side gives that budget's compute-optimal size N_opt and tokens D_opt, and over the
budgets the power laws N_opt ~ C^a and D_opt ~ C^b (Chinchilla: a ~ b ~ 0.5, ~20 tokens
per parameter), which ``--target`` extrapolates to a budget you cannot sweep. Chinchilla's
approach 3, L(N, D) = E + A/N^alpha + B/D^beta fitted over every run, gives a second
N_opt and D_opt and the loss to expect there.

Defaults: budgets of 1/9, 1/3 and 1 times the config's own training FLOPs; up to five
sizes at the config's depth whose parameters span a third of Chinchilla's 20-tokens
optimum at the smallest budget to three times it at the largest. A run that sees its
training tokens more than once is marked (``data``: epochs): repeated tokens are worth
less than fresh ones, which biases the optimum. A finished run is reused, so
rerunning the same command after a crash (or with more sizes or budgets) trains only what
is missing; an interrupted run resumes from its last checkpoint. Writes
``<run-dir>/scaling.json`` and the plot (``--png``, default ``<run-dir>/isoflop.png``)
and ends with one JSON line.
``--dry-run`` prints the plan (parameters, tokens, steps, tokens per parameter, FLOPs)
and its hours and dollars per device at an assumed MFU, without training.

The learning rate is the config's for every size: a size that wants another rate sits
above the valley, so read a lopsided valley as a hint to tune, not as a law.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tfpretrain.errors import UserError, cli_main, quiet_retracing, quiet_tensorflow
from tfpretrain.plots import png_path
from tfpretrain.training.scaling import (MIN_LOSS_POINTS, NEAR_VALLEY, LossLaw, Point,
                                         laws, loss_law, near_valleys, valley)

SIZES = 5                # the default ladder's length (fewer where widths coincide)
BUDGET_FACTORS = (1 / 9, 1 / 3, 1.0)
MIN_WIDTH = 8           # the narrowest default size
MIN_STEPS = 20          # fewer optimizer steps measure the warmup, not the model
STEP_MULTIPLE = 8       # steps rounded to this (from 64 up): steps_per_execution stays large


@dataclass
class Planned:
    """One run of the sweep: a budget, a size and the config that trains it."""
    budget: float
    size: str
    raw: dict
    params: int
    flops_per_token: int
    steps: int
    tokens: int
    problem: Optional[str] = None   # why it is not run (too few steps)
    epochs: float = 0.0             # passes over the training tokens (0: not known yet)

    @property
    def folder(self) -> str:
        return f"{budget_label(self.budget)}/{self.size}"


def budget_label(budget: float) -> str:
    return f"{budget:.2e}".replace("+", "")


def parse_size(text: str) -> tuple[int, int]:
    layers, x, width = text.lower().partition("x")
    if not (x and layers.isdigit() and width.isdigit() and int(layers) > 0 and int(width) > 0):
        raise UserError(f"--sizes {text!r}: expected LAYERSxWIDTH, e.g. 4x128")
    return int(layers), int(width)


def default_sizes(cfg, budgets: list[float], vocab: int) -> list[str]:
    """The config's depth at SIZES widths (whole heads of its head size up to 8x its width,
    or one head of a quarter or half of it) whose parameters lie closest to log-even steps
    from a third of Chinchilla's 20-tokens optimum at the smallest budget to three times
    that at the largest: the valleys' minima should fall inside them."""
    import dataclasses

    import numpy as np

    from tfpretrain.training.budget import chinchilla_params
    from tfpretrain.training.runtime import estimated_params

    m = cfg.model
    head = m.hidden_dim // m.num_heads
    sizes = {}
    narrow = [w for w in (head // 4, head // 2) if w >= MIN_WIDTH]  # one narrow head
    for width in narrow + list(range(head, 8 * m.hidden_dim + 1, head)):
        sized = dataclasses.replace(m, **shape(m, m.num_layers, width, "default"))
        sizes[f"{m.num_layers}x{width}"] = estimated_params(
            dataclasses.replace(cfg, model=sized), vocab)
    lo, hi = chinchilla_params(min(budgets)) / 3, chinchilla_params(max(budgets)) * 3
    names, counts = list(sizes), np.log(list(sizes.values()))
    picked = {names[int(np.argmin(abs(counts - t)))]
              for t in np.linspace(np.log(lo), np.log(hi), SIZES)}
    return sorted(picked, key=sizes.get)


def shape(model, layers: int, width: int, size: str) -> dict:
    """model.* of a size: the config's head size (a width below it: one head that wide),
    feed-forward ratio and GQA group (fewer key/value heads where the heads are fewer)."""
    head = model.hidden_dim // model.num_heads
    if width % head and width > head:
        raise UserError(f"--sizes {size}: the width must be a multiple of the config's head "
                        f"size {head} (model.hidden_dim / model.num_heads), or below it")
    heads = max(1, width // head)
    out = {"num_layers": layers, "hidden_dim": width, "num_heads": heads,
           "intermediate_dim": round(width * model.intermediate_dim / model.hidden_dim)}
    if model.num_key_value_heads:
        group = model.num_heads // model.num_key_value_heads
        kv = max(1, heads // group)
        if heads % kv:
            raise UserError(f"--sizes {size}: {heads} heads do not divide into the config's "
                            f"groups of {group} (model.num_key_value_heads)")
        out["num_key_value_heads"] = kv
    return out


def run_raw(base: dict, cfg, model: dict, steps: int) -> dict:
    """The base config at one size and step count: warmup the config's share of the steps,
    one validation (the final one), checkpoints at each quarter, no export."""
    raw = json.loads(json.dumps(base))
    raw.pop("name", None)
    raw.setdefault("model", {}).update(model)
    warmup = round(cfg.optimizer.warmup_steps * steps / cfg.train.steps)
    raw.setdefault("optimizer", {})["warmup_steps"] = min(warmup, steps // 2)
    quarter = steps // 4 // STEP_MULTIPLE * STEP_MULTIPLE
    raw.setdefault("train", {}).update(steps=steps, steps_per_execution=0,
                                       checkpoint_every=quarter if steps >= 64 else 0)
    raw.setdefault("eval", {})["every"] = steps
    raw["export"] = {**raw.get("export", {}), "enabled": False}
    return raw


def plan(cfg, base: dict, budgets: list[float], sizes: list[str], vocab: int,
         train_tokens: Optional[int] = None) -> list[Planned]:
    """Every budget x size, ascending; ``train_tokens`` (known once the data is prepared)
    marks the runs that see their data more than once."""
    from tfpretrain.config import build_config
    from tfpretrain.objectives import count_params
    from tfpretrain.training.budget import model_flops_per_token

    tokens_per_step = cfg.train.batch_size * cfg.model.sequence_length
    shaped = {}
    for size in sizes:
        model = shape(cfg.model, *parse_size(size), size)
        sized = build_config(run_raw(base, cfg, model, cfg.train.steps), name="scaling")
        params = count_params(sized, vocab)
        shaped[size] = (model, params, model_flops_per_token(sized, params, vocab))
    out = []
    for budget in sorted(set(budgets)):
        for size, (model, params, fpt) in shaped.items():
            steps = int(budget / (fpt * tokens_per_step))
            if steps >= 64:
                steps = round(steps / STEP_MULTIPLE) * STEP_MULTIPLE
            problem = (f"{steps} steps: fewer than {MIN_STEPS}, raise the budget or drop the "
                       "size" if steps < MIN_STEPS else None)
            tokens = steps * tokens_per_step
            epochs = tokens / train_tokens if train_tokens else 0.0
            out.append(Planned(budget, size, run_raw(base, cfg, model, max(steps, 1)), params,
                               fpt, steps, tokens, problem, round(epochs, 2)))
    return out


def plan_table(planned: list[Planned], losses: Optional[dict] = None) -> str:
    from tfpretrain.tables import render

    rows = []
    for p in planned:
        loss = (losses or {}).get(p.folder)
        rows.append([budget_label(p.budget), p.size, f"{p.params:,}", f"{p.tokens:,}",
                     f"{p.tokens / p.params:.1f}", f"{p.steps:,}",
                     f"{p.tokens * p.flops_per_token:.2e}",
                     f"{p.epochs:.1f} epochs" if p.epochs > 1 else "",
                     p.problem or ("" if losses is None else
                                   "failed" if loss is None else f"{loss:.4f}")])
    last = "val loss" if losses is not None else "note"
    return render(["budget", "size", "params", "tokens", "tokens/param", "steps", "FLOPs",
                   "data", last], rows)


def prepared_data(cfg) -> tuple[int, int]:
    """The trained tokenizer's size and the training tokens: the data prepared once (the
    token cache every run of the sweep then reads), as ``python -m tfpretrain.data`` does."""
    import keras

    from tfpretrain.data.cache import prepare
    from tfpretrain.objectives import row_format

    keras.utils.set_random_seed(cfg.train.seed)  # as fit does, before any tokenizer exists
    tokenizer, packed, _ = prepare(cfg, row_format(cfg),
                                   log=lambda m: print(f"[tfpretrain] {m}", flush=True))
    return tokenizer.vocabulary_size, int(packed.train_tokens)


def repetition_warning(cfg, planned: list[Planned]) -> Optional[str]:
    """Before training: which runs will repeat their data, and the fix (for the embedded
    stories, the ``data.embedded_documents`` that gives every run fresh tokens)."""
    repeated = [p for p in planned if p.problem is None and p.epochs > 1]
    if not repeated:
        return None
    most = max(p.epochs for p in repeated)
    fix = "give it more text (data.path)"
    if cfg.data.path is None:  # the generated stories: as many as asked for
        enough = math.ceil(cfg.data.embedded_documents * most / 1000) * 1000
        fix = f"--set data.embedded_documents={enough} gives every run fresh stories"
    return (f"{len(repeated)} runs will see their training tokens more than once (up to "
            f"{most:.1f} epochs), which biases the optimum toward larger sizes: {fix}")


def finished(p: Planned, run_dir: Path) -> Optional[dict]:
    """The summary of a run this sweep already finished (None: not yet; an interrupted one
    resumes). A run folder of another config (a changed --set, another --config) is
    refused: reused, it would answer for a config it did not train."""
    from tfpretrain.config import build_config, read_yaml
    from tfpretrain.training.runfolder import config_differences

    try:
        old = build_config(read_yaml(run_dir / "config.yaml"), name="old").to_dict()
    except (OSError, ValueError, UserError):
        return None
    differ = config_differences(old, build_config(p.raw, name="new").to_dict())
    if differ:
        raise UserError(f"scaling run {run_dir} was trained with other settings ("
                        f"{', '.join(differ)}): give this sweep another --run-dir")
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if summary.get("steps") == p.steps else None


def train_point(p: Planned, run_dir: Path, log=print) -> Optional[dict]:
    """Train one planned run (or read it back); None when it failed (diverged, out of
    memory): the sweep goes on without it. A full disk stops the sweep (exit 74)."""
    import keras

    from tfpretrain.config import build_config
    from tfpretrain.fit import fit
    from tfpretrain.training.preemption import Preempted
    from tfpretrain.tune import stop_if_the_disk_refused

    done = finished(p, run_dir)
    if done is not None:
        log(f"[tfpretrain] scaling: {p.folder} done before: val_loss {done['val_loss']:.4f}")
        return done
    log(f"[tfpretrain] scaling: {p.folder}: {p.params:,} parameters, {p.tokens:,} tokens "
        f"({p.steps:,} steps)")
    keras.backend.clear_session()
    try:
        return fit(build_config(p.raw, name=f"scaling-{p.size}"), run_dir)
    except Preempted as exc:
        raise SystemExit(exc.exit_code)  # stop the sweep; the rerun resumes this run
    except UserError as exc:  # a config or folder problem: every run would repeat it
        stop_if_the_disk_refused(exc, p.folder)
        raise UserError(f"scaling run {run_dir}: {exc}") from None
    except Exception as exc:  # diverged (the guard gave up), out of memory: go on
        stop_if_the_disk_refused(exc, p.folder)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "error.txt").write_text(f"{type(exc).__name__}: {exc}\n")
        log(f"[tfpretrain] scaling: {p.folder} failed: {exc}")
        return None


def points(planned: list[Planned], summaries: dict) -> list[Point]:
    out = []
    for p in planned:
        s = summaries.get(p.folder)
        if s is None:
            continue
        loss = s.get("val_loss")
        out.append(Point(p.budget, int(s["params"]), int(s["tokens_seen"]),
                         float(s["tokens_seen"]) * p.flops_per_token,
                         float(loss) if loss is not None else math.nan))
    return out


@dataclass
class Fits:
    """What the finished runs say: each budget's valley, the valleys' power laws (None:
    fewer than two optima) and the loss law (None: too few runs near their valleys)."""
    valleys: list
    law: Optional[dict]
    loss_law: Optional[LossLaw]


def fit_runs(planned: list[Planned], summaries: dict) -> Fits:
    pts = points(planned, summaries)
    budgets = sorted({p.budget for p in planned})
    valleys = [valley(b, [pt for pt in pts if pt.budget == b]) for b in budgets]
    return Fits(valleys, laws(valleys), loss_law(near_valleys(pts)))


def report(planned: list[Planned], summaries: dict, fits: Fits, targets: list[float]) -> dict:
    """Every run, the valleys, the power laws, the loss law and their projections: the JSON
    written and printed."""
    law, fitted = fits.law, fits.loss_law
    return {"runs": [{"budget": p.budget, "size": p.size, "params": p.params,
                      "tokens": p.tokens, "steps": p.steps, "folder": p.folder,
                      "val_loss": (summaries.get(p.folder) or {}).get("val_loss"),
                      "epochs": p.epochs or None, "problem": p.problem} for p in planned],
            "valleys": [v.to_dict() for v in fits.valleys],
            "laws": None if law is None else {k: v.to_dict() for k, v in law.items()},
            "loss_law": None if fitted is None else fitted.to_dict(),
            "projections": [projection(t, law, fitted) for t in targets]}


def projection(target: float, law: Optional[dict], fitted) -> dict:
    """N_opt and D_opt at ``target`` by the valleys' power laws (approach 2) and by the
    loss law (approach 3, with the loss it predicts there)."""
    r = lambda v: float(f"{v:.4g}")  # noqa: E731
    out = {"budget": target, "params": None, "tokens": None, "tokens_per_param": None,
           "loss_law": None}
    if law is not None:
        n, d = law["params"].at(target), law["tokens"].at(target)
        out.update(params=r(n), tokens=r(d), tokens_per_param=round(d / n, 2))
    if fitted is not None:
        n, d = fitted.optimum(target)
        out["loss_law"] = {"params": r(n), "tokens": r(d), "tokens_per_param": round(d / n, 2),
                           "loss": round(float(fitted.loss(n, d)), 4)}
    return out


def describe(result: dict) -> list[str]:
    """The findings in words: each budget's best size, the exponents, the projections."""
    lines = []
    for v in result["valleys"]:
        head = f"budget {budget_label(v['budget'])} FLOPs: "
        if v["problem"]:
            lines.append(head + f"no optimum ({v['problem']})")
        else:
            lines.append(head + f"best size {v['params_opt']:,.0f} parameters on "
                         f"{v['tokens_opt']:,.0f} tokens ({v['tokens_per_param']:.1f} tokens "
                         f"per parameter), val loss {v['loss_opt']:.4f} at the vertex")
    repeated = [r for r in result["runs"] if (r["epochs"] or 0) > 1 and r["val_loss"]]
    if repeated:
        most = max(r["epochs"] for r in repeated)
        lines.append(f"{len(repeated)} runs saw their training tokens more than once (up to "
                     f"{most:.1f} epochs): repeated tokens teach less than fresh ones, which "
                     "favours the larger sizes; more text (data.path) removes the bias")
    law, fitted = result["laws"], result["loss_law"]
    if law is None:
        lines.append("valleys: no power law (it needs two budgets with an optimum inside the "
                     "sizes)")
    else:
        lines.append(f"valleys: N_opt ~ C^{law['params']['exponent']:.3f}, D_opt ~ C^"
                     f"{law['tokens']['exponent']:.3f} (Chinchilla: 0.50 and 0.50, ~20 "
                     "tokens per parameter)")
    if fitted is None:
        lines.append(f"loss law: not fitted (it needs {MIN_LOSS_POINTS} finished runs near "
                     "their valleys)")
    else:
        lines.append(f"loss law: L = {fitted['E']:.3f} + {fitted['A']:.4g} / N^"
                     f"{fitted['alpha']:.2f} + {fitted['B']:.4g} / D^{fitted['beta']:.2f} "
                     f"(rmse {fitted['rmse']:.4f}): N_opt ~ C^{fitted['params_exponent']:.3f}"
                     + ("; an exponent at the search's edge: these runs do not pin the law "
                        "down" if fitted["at_search_edge"] else ""))
    for p in result["projections"]:
        head = f"at {p['budget']:.2e} FLOPs: "
        if p["params"] is not None:
            lines.append(head + f"valleys {p['params']:,.0f} parameters on "
                         f"{p['tokens']:,.0f} tokens ({p['tokens_per_param']:.1f} per "
                         "parameter)")
        if p["loss_law"] is not None:
            q = p["loss_law"]
            lines.append(head + f"loss law {q['params']:,.0f} parameters on {q['tokens']:,.0f} "
                         f"tokens ({q['tokens_per_param']:.1f} per parameter), loss "
                         f"{q['loss']:.3f}")
    return lines


def plot(fits: Fits, targets: list[float], path: Path, title: str) -> None:
    """The valleys (left) and N_opt / D_opt against the budget with both laws (right)."""
    from tfpretrain.plots import pyplot, save

    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    plot_valleys(left, fits)
    plot_optima(right, fits, targets)
    fig.suptitle(title)
    save(fig, path)


def plot_valleys(ax, fits: Fits) -> None:
    """Loss against parameters per budget: the runs, the bracket's parabola, its vertex
    (*) and the loss law (dotted); runs far up a wall are drawn at the top edge (^)."""
    import numpy as np

    valleys, fitted = fits.valleys, fits.loss_law
    bests = [min(p.loss for p in v.points) for v in valleys if v.points]
    top = NEAR_VALLEY * 1.1 * max(bests) if bests else None
    for i, v in enumerate(valleys):
        color, xs = f"C{i}", [p.params for p in v.points]
        ys = np.array([p.loss for p in v.points])
        low = ys <= top if top else np.ones(len(ys), bool)
        ax.scatter(np.array(xs)[low], ys[low], color=color, s=18,
                   label=f"{budget_label(v.budget)} FLOPs")
        ax.scatter(np.array(xs)[~low], [top] * int((~low).sum()), color=color, s=18,
                   marker="^")
        if v.coefficients is not None:
            grid = np.linspace(*np.log10(v.bracket), 50)
            ax.plot(10 ** grid, np.polyval(v.coefficients, grid), color=color, lw=1)
        if v.usable:
            ax.scatter([v.params], [v.loss], color=color, marker="*", s=120)
        if fitted is not None and xs:
            ns = np.logspace(np.log10(min(xs)), np.log10(max(xs)), 50)
            ax.plot(ns, fitted.loss(ns, v.budget / (fitted.flops_per_param * ns)),
                    color=color, lw=0.8, ls=":")
    if top:
        ax.set_ylim(top=top * 1.02)
    ax.set(xscale="log", xlabel="parameters", ylabel="final val loss",
           title="IsoFLOP valleys (* best size; dotted: loss law; ^ off the scale)")
    ax.legend(fontsize=8)


def plot_optima(ax, fits: Fits, targets: list[float]) -> None:
    import numpy as np

    good = [v for v in fits.valleys if v.usable]
    ax.scatter([v.budget for v in good], [v.params for v in good], color="C0",
               label="N_opt (parameters)")
    ax.scatter([v.budget for v in good], [v.tokens for v in good], color="C1",
               label="D_opt (tokens)")
    law, fitted = fits.law, fits.loss_law
    span = [v.budget for v in fits.valleys] + list(targets)
    cs = np.logspace(np.log10(min(span)), np.log10(max(span)), 50)
    if law is not None:
        for key, color in (("params", "C0"), ("tokens", "C1")):
            ax.plot(cs, law[key].at(cs), color=color, lw=1, ls="--",
                    label=f"valleys: ~ C^{law[key].exponent:.2f}")
    if fitted is not None:
        optima = np.array([fitted.optimum(c) for c in cs])
        ax.plot(cs, optima[:, 0], color="C0", lw=0.8, ls=":", label="loss law: N_opt")
        ax.plot(cs, optima[:, 1], color="C1", lw=0.8, ls=":", label="loss law: D_opt")
    if good or fitted is not None:
        ax.set(xscale="log", yscale="log")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no optimum yet: no budget has one inside its sizes",
                ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel="training FLOPs", title="compute-optimal")


def flops(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number of FLOPs such as 1e15. "
                                         f"Received: {text!r}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tfpretrain.scaling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a packaged config's name or a YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override one config key (repeatable)")
    p.add_argument("--budgets", type=flops, nargs="+", metavar="FLOPS",
                   help="training FLOPs per IsoFLOP curve (default: 1/9, 1/3 and 1 times "
                        "the config's own)")
    p.add_argument("--sizes", nargs="+", metavar="LxW",
                   help="model sizes, LAYERSxWIDTH (default: the config's depth at 0.5-2x "
                        "its width)")
    p.add_argument("--target", type=flops, nargs="+", default=[], metavar="FLOPS",
                   help="budgets to project the compute-optimal size and tokens to")
    p.add_argument("--run-dir", help="the sweep's folder (default: runs/<config>-scaling)")
    p.add_argument("--png", help="the plot (default: <run-dir>/isoflop.png)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (parameters, tokens, steps, FLOPs) and its cost per "
                        "device, and exit")
    return p


def default_budgets(cfg) -> list[float]:
    """BUDGET_FACTORS of the config's own training FLOPs (at its nominal vocabulary), to
    two significant digits: the same folders whether or not the tokenizer exists yet."""
    from tfpretrain.estimate import plan as estimate_plan

    own = estimate_plan(cfg)["flops"]
    return [float(f"{own * f:.2g}") for f in BUDGET_FACTORS]


def sweep(cfg, base: dict, args, run_dir: Path) -> dict:
    from tfpretrain.files import write_atomic

    quiet_retracing()
    budgets = args.budgets or default_budgets(cfg)
    vocab, train_tokens = prepared_data(cfg)
    planned = plan(cfg, base, budgets, args.sizes or default_sizes(cfg, budgets, vocab), vocab,
                   train_tokens)
    print(plan_table(planned), flush=True)
    warning = repetition_warning(cfg, planned)
    if warning:
        print(f"[tfpretrain] warning: {warning}", flush=True)
    summaries = {}
    for p in planned:
        if p.problem is None:
            summaries[p.folder] = train_point(p, run_dir / p.folder)
    fits = fit_runs(planned, summaries)
    result = report(planned, summaries, fits, args.target)
    print(plan_table(planned, {k: (v or {}).get("val_loss") for k, v in summaries.items()}))
    for line in describe(result):
        print(line)
    write_atomic(run_dir / "scaling.json", json.dumps(result, indent=1) + "\n")
    png = png_path(args.png, "--png") if args.png else run_dir / "isoflop.png"
    plot(fits, args.target, png, f"{cfg.name}: IsoFLOP sweep")
    print(f"[tfpretrain] wrote {run_dir / 'scaling.json'} and {png}")
    return {"run_dir": str(run_dir), **result}


def sweep_cost(flops: float, precision: str) -> list:
    """Hours and dollars of ``flops`` on every device of the table and on this machine, at
    the MFU ``estimate`` assumes (budget.project, with each FLOP counted as one token of
    one FLOP); ``auto`` precision: bf16 on the accelerators, float32 on a CPU."""
    from tfpretrain.hardware import DEVICES, detect
    from tfpretrain.training.budget import project

    here = detect()
    table = "mixed_bfloat16" if precision == "auto" else precision
    mine = "float32" if precision == "auto" and here.name not in DEVICES else table
    rows = [project(d, table, flops, 1.0) for d in DEVICES.values() if d.name != here.name]
    return rows + [project(here, mine, flops, 1.0)]


def cost_row(r) -> dict:
    """A device's hours and dollars for the JSON (budget.Row's tokens/s would be FLOP/s
    here: left out)."""
    g = lambda v: None if v is None else float(f"{v:.4g}")  # noqa: E731
    return {"device": r.device, "precision": r.precision, "mfu": r.mfu, "hours": g(r.hours),
            "price_per_hour": r.price_per_hour, "cost_usd": g(r.cost_usd)}


def cost_table(rows: list) -> str:
    from tfpretrain.tables import fmt, render
    from tfpretrain.training.budget import ASSUMED_MFU

    out = [[r.device, r.precision, fmt(r.hours), fmt(r.cost_usd)] for r in rows]
    return (f"# its cost at MFU {ASSUMED_MFU:.2f}, estimate's assumption (small models reach "
            "less: the sweep in docs/benchmarks.md ran at 10-43% of a CPU's peak)\n"
            + render(["device", "precision", "hours", "$"], out))


def dry_run(cfg, base: dict, args) -> dict:
    from tfpretrain.fit import planned_vocabulary

    vocab, exact = planned_vocabulary(cfg)
    budgets = args.budgets or default_budgets(cfg)
    planned = plan(cfg, base, budgets, args.sizes or default_sizes(cfg, budgets, vocab), vocab)
    print(plan_table(planned))
    runnable = [p for p in planned if p.problem is None]
    total = sum(p.tokens * p.flops_per_token for p in runnable)
    bound = "" if exact else (f"; parameters at vocabulary_size {vocab}, an upper bound until "
                              "the tokenizer is trained")
    print(f"# {len(runnable)} runs, {total:.3g} training FLOPs in all{bound}")
    costs = sweep_cost(total, cfg.train.precision)
    print(cost_table(costs))
    return {"runs": len(runnable), "flops": total, "rows": [cost_row(r) for r in costs],
            "plan": [{"budget": p.budget, "size": p.size, "params": p.params,
                      "tokens": p.tokens, "steps": p.steps, "problem": p.problem}
                     for p in planned]}


@cli_main
def main(argv=None) -> int:
    quiet_tensorflow()
    args = parser().parse_args(argv)
    from tfpretrain.config import load_config, load_raw

    cfg = load_config(args.config, args.overrides)
    if cfg.model.init_from:
        raise UserError("model.init_from: a scaling sweep trains every size from scratch; "
                        "leave model.init_from unset")
    for size in args.sizes or []:
        shape(cfg.model, *parse_size(size), size)  # a bad size: now, before anything runs
    if args.png:
        png_path(args.png, "--png")
    base = load_raw(args.config, args.overrides)
    if args.dry_run:
        print(json.dumps(dry_run(cfg, base, args)))
        return 0
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / f"{cfg.name}-scaling"
    print(json.dumps(sweep(cfg, base, args, run_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
