"""Hyperparameter search with KerasTuner over short proxy runs of the fit path.

    python -m tfpretrain.tune --config PATH [--tuner random|grid|bayesian|hyperband]
                              [--max-trials N] [--set KEY=VALUE ...] [--run-dir DIR]

The search space is ``tune.space`` in the YAML. Every trial is a real ``fit`` run (same data,
tokenizer, model and optimizer builders) of ``tune.steps_per_trial`` steps in
``<run-dir>/trials/<trial id>/`` with its own TensorBoard logs; the HParams dashboard
(``tensorboard --logdir <run-dir>/trials``) shows all trials side by side. A trial that fails
(bad combination, out of memory, divergence) is recorded as failed and the search goes on.
Rerunning a killed search reloads KerasTuner's state from ``<run-dir>/tuner``: finished
trials are not repeated, and an interrupted trial resumes from its last checkpoint.

At the end: a leaderboard on the console, ``<run-dir>/best.yaml`` (a complete fit config
with the winning values and the full ``train.steps``: ``python -m tfpretrain.fit --config
<run-dir>/best.yaml``), ``<run-dir>/leaderboard.json`` and ``<run-dir>/objective.png``
(the objective against each tuned value).

Several machines (KerasTuner's distributed mode: a chief serves the oracle over gRPC,
workers ask it for trials and run them; the search folder on a shared filesystem):

    python -m tfpretrain.tune --config PATH --run-dir DIR --chief HOST:PORT
    python -m tfpretrain.tune --config PATH --run-dir DIR --worker ID --oracle HOST:PORT
    python -m tfpretrain.tune --config PATH --run-dir DIR --workers N   # all on this box

(or KerasTuner's own KERASTUNER_TUNER_ID / KERASTUNER_ORACLE_IP / KERASTUNER_ORACLE_PORT).
A worker restarted with the same ID takes its unfinished trial back and resumes it from
the trial's last checkpoint; ``--workers N`` restarts a worker that dies by itself.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import yaml

from tfpretrain.config import maximized
from tfpretrain.errors import UserError, cli_main, quiet_retracing, quiet_tensorflow

HYPERBAND_MAX_EPOCHS = 9  # budget units: a trial with tuner/epochs=e trains e/9 of the steps


def _number(v):
    return float(v) if isinstance(v, str) else v


def declare(hp, space: dict) -> None:
    """Register ``tune.space`` with a KerasTuner HyperParameters object."""
    for key, spec in space.items():
        if isinstance(spec, list):
            hp.Choice(key, spec)
            continue
        lo, hi = _number(spec["min"]), _number(spec["max"])
        step = _number(spec.get("step")) if spec.get("step") is not None else None
        sampling = "log" if spec.get("log") else "linear"
        if isinstance(lo, int) and isinstance(hi, int) and (step is None or isinstance(step, int)):
            hp.Int(key, lo, hi, step=step, sampling=sampling)
        else:
            hp.Float(key, float(lo), float(hi), step=step, sampling=sampling)


def typed_values(values: dict, space: dict) -> dict:
    """KerasTuner hands back a boolean choice as 0/1: give each value its choice's type."""
    out = dict(values)
    for key, spec in space.items():
        if isinstance(spec, list) and key in out and all(isinstance(v, bool) for v in spec):
            out[key] = bool(out[key])
    return out


def trial_raw(base: dict, values: dict, steps: int, budget_fraction: float = 1.0) -> dict:
    """The base config with the trial's values, a proxy budget and no export.

    ``budget_fraction`` < 1 (Hyperband's short brackets) shrinks the warmup with the budget,
    so a 2-step trial is not all warmup."""
    raw = json.loads(json.dumps(base))
    for key, value in values.items():
        if key.startswith("tuner/"):
            continue
        sec, name = key.split(".", 1)
        raw.setdefault(sec, {})[name] = value
    if budget_fraction < 1.0:
        from tfpretrain.config import OptimizerConfig

        opt = raw.setdefault("optimizer", {})
        warmup = int(opt.get("warmup_steps", OptimizerConfig().warmup_steps))
        opt["warmup_steps"] = int(warmup * budget_fraction)
    raw.setdefault("train", {})["steps"] = steps
    raw["train"]["checkpoint_every"] = 0
    raw.setdefault("eval", {})["every"] = steps
    raw["export"] = {**raw.get("export", {}), "enabled": False}
    raw.pop("tune", None)
    return raw


def stop_if_the_disk_refused(exc: Exception, trial_id: str) -> None:
    """A write the disk refused (full, quota, read-only) would fail every later trial too:
    one message and exit 74 for the whole search (SystemExit: KerasTuner would record an
    Exception as a failed trial and go on); the rerun resumes the search."""
    from tfpretrain.errors import IOERR_EXIT, WriteError, refused_write, write_failure

    if write_failure(exc) is None:
        return
    err = exc if isinstance(exc, WriteError) else refused_write(exc, f"trial {trial_id}")
    print(f"error: {err}", file=sys.stderr, flush=True)
    raise SystemExit(IOERR_EXIT)


def make_oracle(cfg):
    """The KerasTuner oracle of ``tune.tuner`` over ``tune.space``."""
    import keras_tuner as kt

    objective = kt.Objective(cfg.tune.objective,
                             direction="max" if maximized(cfg.tune.objective) else "min")
    hp = kt.HyperParameters()
    declare(hp, cfg.tune.space)
    common = dict(objective=objective, hyperparameters=hp, seed=cfg.train.seed,
                  tune_new_entries=False, max_consecutive_failed_trials=10)
    kind = cfg.tune.tuner
    if kind == "random":
        oracle = kt.oracles.RandomSearchOracle(max_trials=cfg.tune.max_trials, **common)
    elif kind == "grid":
        oracle = kt.oracles.GridSearchOracle(max_trials=cfg.tune.max_trials, **common)
    elif kind == "bayesian":
        try:
            import scipy  # noqa: F401
            import sklearn  # noqa: F401
        except ImportError:
            raise UserError("--tuner bayesian needs scipy and scikit-learn: "
                            "pip install 'tfpretrain[tune]'") from None
        oracle = kt.oracles.BayesianOptimizationOracle(max_trials=cfg.tune.max_trials, **common)
    else:
        oracle = kt.oracles.HyperbandOracle(max_epochs=HYPERBAND_MAX_EPOCHS, factor=3, **common)
    return oracle


def check_search_state(project: Path) -> None:
    """A search folder whose KerasTuner state file is damaged (an older tfpretrain killed
    mid-write) is one message, not a traceback."""
    state = project / "oracle.json"
    if not state.is_file():
        return
    try:
        json.loads(state.read_text())
    except (ValueError, OSError):
        raise UserError(f"the search state {state} is damaged (empty or cut short); the "
                        f"finished trials are in {project.parent / 'trials'}. Move {state} "
                        "away to start the search bookkeeping again, or use another "
                        "--run-dir") from None


def make_tuner(cfg, base_raw: dict, run_dir: Path, parent_run=lambda: None):
    """KerasTuner's tuner whose trials are fit runs; ``parent_run()``: the MLflow run the
    trials nest under (None: no MLflow)."""
    import keras_tuner as kt

    from tfpretrain import compat
    from tfpretrain.config import build_config
    from tfpretrain.fit import fit
    from tfpretrain.training.preemption import Preempted

    class FitTuner(kt.engine.base_tuner.BaseTuner):
        """Each trial is one tfpretrain.fit run; KerasTuner only proposes values."""

        trials_run = 0

        def run_trial(self, trial, *args, **kwargs):
            import keras

            values = typed_values(dict(trial.hyperparameters.values), cfg.tune.space)
            steps, fraction = cfg.tune.steps_per_trial, 1.0
            if "tuner/epochs" in values:
                fraction = values["tuner/epochs"] / HYPERBAND_MAX_EPOCHS
                steps = max(1, round(steps * fraction))
            trial_dir = run_dir / "trials" / trial.trial_id
            t0 = time.time()
            try:
                raw = trial_raw(base_raw, values, steps, fraction)
                if parent_run():
                    raw.setdefault("track", {})["parent_run_id"] = parent_run()
                trial_cfg = build_config(raw, name=f"{cfg.name}-trial-{trial.trial_id}")
                keras.backend.clear_session()
                summary = fit(trial_cfg, trial_dir)
            except Preempted as exc:
                raise SystemExit(exc.exit_code)  # stop the whole search; rerun resumes
            except Exception as exc:  # a failed trial must not end the search...
                stop_if_the_disk_refused(exc, trial.trial_id)  # ...but a full disk fails all
                trial_dir.mkdir(parents=True, exist_ok=True)
                (trial_dir / "error.txt").write_text(f"{type(exc).__name__}: {exc}\n")
                print(f"[tfpretrain] trial {trial.trial_id} failed: {exc}", flush=True)
                raise kt.errors.FailedTrialError(str(exc)) from exc
            write_hparams(trial_dir / "logs", values, summary, cfg.tune.objective)
            value = summary[cfg.tune.objective]
            if not math.isfinite(value):
                raise kt.errors.FailedTrialError(f"objective is {value}")
            (trial_dir / "trial.json").write_text(json.dumps(
                {"trial_id": trial.trial_id, "values": values, "steps": steps,
                 "seconds": round(time.time() - t0, 1), **{k: summary[k] for k in (
                     "val_loss", "val_bits_per_byte", "val_masked_accuracy",
                     "tokens_per_second", "tokens_seen", "mfu", "cost_usd", "device")
                     if k in summary}}, indent=1))
            self.trials_run += 1
            return {cfg.tune.objective: value}

    compat.atomic_keras_tuner_saves()  # a killed search must leave loadable state files
    check_search_state(run_dir / "tuner")
    return FitTuner(oracle=make_oracle(cfg), directory=str(run_dir), project_name="tuner",
                    overwrite=False)


def write_hparams(log_dir: Path, values: dict, summary: dict, objective: str) -> None:
    """An HParams session for this trial (its final val loss, bits per byte or masked
    accuracy, and the search's objective, are the metrics the dashboard shows)."""
    import tensorflow as tf
    from tensorboard.plugins.hparams import api as hp_api

    clean = {k: v for k, v in values.items() if not k.startswith("tuner/")}
    with tf.summary.create_file_writer(str(log_dir)).as_default():
        hp_api.hparams(clean, trial_id=log_dir.parent.name)
        for key in dict.fromkeys(("val_loss", "val_bits_per_byte", "val_masked_accuracy",
                                  objective)):
            if key in summary:  # bits per byte: causal runs; masked accuracy: masked LM
                tf.summary.scalar(f"final/{key}", summary[key], step=summary["steps"])


def write_hparams_config(trials_dir: Path, space: dict, objective: str) -> None:
    import tensorflow as tf
    from tensorboard.plugins.hparams import api as hp_api

    hparams = []
    for key, spec in space.items():
        if isinstance(spec, list):
            hparams.append(hp_api.HParam(key, hp_api.Discrete(spec)))
        else:
            hparams.append(hp_api.HParam(key, hp_api.RealInterval(
                float(_number(spec["min"])), float(_number(spec["max"])))))
    metrics = [hp_api.Metric("final/val_loss", display_name="val_loss"),
               hp_api.Metric("final/val_bits_per_byte", display_name="val_bits_per_byte"),
               hp_api.Metric("final/val_masked_accuracy", display_name="val_masked_accuracy")]
    if objective not in ("val_loss", "val_bits_per_byte"):  # an eval.sets / eval.tasks metric
        metrics.append(hp_api.Metric(f"final/{objective}", display_name=objective))
    trials_dir.mkdir(parents=True, exist_ok=True)
    with tf.summary.create_file_writer(str(trials_dir)).as_default():
        hp_api.hparams_config(hparams=hparams, metrics=metrics)


def leaderboard(tuner, space: dict, objective: str) -> list[dict]:
    """The trials, best first (``objective``: a loss or a task accuracy)."""
    rows = []
    for trial in tuner.oracle.trials.values():
        info_path = Path(tuner.project_dir).parent / "trials" / trial.trial_id / "trial.json"
        info = json.loads(info_path.read_text()) if info_path.exists() else {}
        rows.append({"trial": trial.trial_id, "status": str(trial.status),
                     "values": typed_values({k: v for k, v in
                                             trial.hyperparameters.values.items()
                                             if not k.startswith("tuner/")}, space),
                     "objective": trial.score, "steps": info.get("steps"),
                     "seconds": info.get("seconds"), "tokens": info.get("tokens_seen"),
                     "mfu": info.get("mfu"), "cost_usd": info.get("cost_usd")})
    sign = -1.0 if maximized(objective) else 1.0
    rows.sort(key=lambda r: (r["objective"] is None, sign * (r["objective"] or 0.0)))
    return rows


def print_leaderboard(rows: list[dict], keys: list[str], objective: str) -> None:
    head = ["trial", "status"] + keys + [objective, "steps", "seconds", "tokens", "mfu",
                                         "cost $"]
    from tfpretrain.tables import fmt, render

    print(render(head, [[r["trial"], r["status"]] + [fmt(r["values"].get(k)) for k in keys]
                        + [fmt(r["objective"]), fmt(r["steps"]), fmt(r["seconds"]),
                           fmt(r["tokens"]), fmt(r["mfu"]), fmt(r["cost_usd"])]
                        for r in rows]))
    spent = search_totals(rows)
    print(f"[tfpretrain] the search spent: {len(rows)} trials, {spent['search_tokens']:,} "
          f"tokens, {spent['search_seconds'] / 3600:.3g} h of trial time, "
          f"${spent['search_cost_usd']:.4g}")


def search_totals(rows: list[dict]) -> dict:
    """What the trials spent: tokens, trial wall time (summed over workers), dollars."""
    total = lambda key: sum(r.get(key) or 0 for r in rows)  # noqa: E731
    return {"search_tokens": int(total("tokens")),
            "search_seconds": round(total("seconds"), 1),
            "search_cost_usd": round(total("cost_usd"), 6)}


def plot_objective(rows: list[dict], space: dict, objective: str, path: Path) -> None:
    """One scatter per tuned key: the objective of each finished trial against its value."""
    from tfpretrain.plots import pyplot

    plt = pyplot()

    keys = list(space)
    done = [r for r in rows if r["objective"] is not None]
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(4 * max(1, len(keys)), 3.2),
                             squeeze=False)
    for ax, key in zip(axes[0], keys or ["trial"]):
        xs = [r["values"].get(key) if keys else r["trial"] for r in done]
        ys = [r["objective"] for r in done]
        if xs and all(isinstance(x, (int, float)) for x in xs):
            ax.scatter(xs, ys)
            if isinstance(space.get(key), dict) and space[key].get("log"):
                ax.set_xscale("log")
        else:
            labels = sorted({str(x) for x in xs})
            ax.scatter([labels.index(str(x)) for x in xs], ys)
            ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel(key)
        ax.set_ylabel(objective)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def check_space(cfg, base_raw: dict | None = None) -> None:
    """A search that would waste trials is refused before it starts: an empty space, or a
    value of the space that makes a trial (``tune.steps_per_trial`` steps) or the winning
    full config (``train.steps``) no valid run, e.g. a warmup not shorter than the run."""
    if not cfg.tune.space:
        raise UserError("tune.space is empty: add keys to search, e.g. "
                        "tune: {space: {optimizer.learning_rate: [1.0e-3, 3.0e-3]}} "
                        "(see configs/tune.yaml)")
    if base_raw is None:
        return
    steps = cfg.tune.steps_per_trial
    _check_value(None, None, f"a trial of tune.steps_per_trial={steps} steps",
                 trial_raw(base_raw, {}, steps))
    for key, spec in cfg.tune.space.items():
        for value in spec if isinstance(spec, list) else [spec.get("min"), spec.get("max")]:
            _check_value(key, value, f"a trial of tune.steps_per_trial={steps} steps",
                         trial_raw(base_raw, {key: value}, steps))
            _check_value(key, value, "the full config best.yaml would hold",
                         trial_raw(base_raw, {key: value}, cfg.train.steps))


def _check_value(key, value, what: str, raw: dict) -> None:
    from tfpretrain.config import ConfigError, build_config

    where = f"tune.space {key}={value!r}: " if key else ""
    try:
        build_config(raw)
    except ConfigError as exc:
        raise UserError(f"{where}{what} is not a valid run: "
                        f"{'; '.join(exc.problems)}. Change the space or the key it names "
                        "(e.g. raise tune.steps_per_trial)") from None


def tune(cfg, base_raw: dict, run_dir: Path, role=None) -> dict:
    """The search; ``role`` (tune_workers.Role): this process's part of a distributed one
    (a worker runs trials and returns what it ran; the chief serves the oracle, then
    writes the results)."""
    from tfpretrain.tune_workers import Role

    from tfpretrain.training.tracking import SearchRun

    role = role or Role()
    check_space(cfg, base_raw)

    run_dir.mkdir(parents=True, exist_ok=True)
    search_run = SearchRun(cfg, run_dir)
    if role.is_chief:
        write_hparams_config(run_dir / "trials", cfg.tune.space, cfg.tune.objective)
        search_run.start()  # before the oracle serves a trial: workers read its id
    print(f"[tfpretrain] search: {role.describe()}", flush=True)
    tuner = make_tuner(cfg, base_raw, run_dir, search_run.parent_id)
    tuner.search()
    if not role.is_chief:
        return {"role": f"worker {role.tuner_id}", "run_dir": str(run_dir),
                "trials_run": tuner.trials_run}
    result = report(cfg, base_raw, run_dir,
                    leaderboard(tuner, cfg.tune.space, cfg.tune.objective))
    search_run.finish(result, [run_dir / n for n in ("leaderboard.json", "best.yaml",
                                                     "objective.png")])
    return result


def report(cfg, base_raw: dict, run_dir: Path, rows: list[dict]) -> dict:
    """Leaderboard (console and leaderboard.json), best.yaml, objective.png, and what the
    search spent against what ``--dry-run`` projected (tokens: the projection takes every
    trial at the base config's batch and sequence length)."""
    from tfpretrain.config import build_config
    from tfpretrain.files import write_atomic
    from tfpretrain.training.budget import search_tokens

    projected = search_tokens(cfg)
    keys = list(cfg.tune.space)
    print_leaderboard(rows, keys, cfg.tune.objective)
    spent = search_totals(rows)["search_tokens"]
    print(f"[tfpretrain] projected before the search (tune --dry-run): {projected:,} tokens; "
          f"spent {spent:,} ({spent / max(projected, 1):.0%} of it: tuned batch sizes, "
          "Hyperband brackets and failed trials move it)")
    write_atomic(run_dir / "leaderboard.json", json.dumps(rows, indent=1, default=str))
    best = next((r for r in rows if r["objective"] is not None), None)
    if best is None:
        raise UserError(f"no trial finished; see {run_dir / 'trials'}/*/error.txt")
    best_raw = json.loads(json.dumps(base_raw))
    for key, value in best["values"].items():
        sec, name = key.split(".", 1)
        best_raw.setdefault(sec, {})[name] = value
    best_raw.pop("tune", None)
    best_cfg = build_config(best_raw, name=f"{cfg.name}-best")
    best_path = run_dir / "best.yaml"
    body = {"name": best_cfg.name, **{k: v for k, v in best_cfg.to_dict().items()
                                      if k not in ("name", "tune")}}
    write_atomic(best_path, f"# best of {len(rows)} trials by {cfg.tune.objective} = "
                 f"{best['objective']:.6g} (trial {best['trial']}), with the full "
                 f"train.steps\n" + yaml.safe_dump(body, sort_keys=False))
    plot_objective(rows, cfg.tune.space, cfg.tune.objective, run_dir / "objective.png")
    return {"run_dir": str(run_dir), "best_yaml": str(best_path), "best_trial": best["trial"],
            "best_values": best["values"], cfg.tune.objective: best["objective"],
            "trials": len(rows),
            "failed": sum(1 for r in rows if r["objective"] is None), **search_totals(rows),
            "projected_tokens": projected}


def dry_run(path: str, overrides: list[str]) -> dict:
    """The search's projected cost, as ``estimate --tune`` prints it: every trial at its
    base size and batch (Hyperband's brackets train fewer steps: an upper bound there)."""
    from tfpretrain.estimate import parser as estimate_parser
    from tfpretrain.estimate import render, search_cost

    search, table = search_cost(path, estimate_parser().parse_args([]), overrides)
    print(render(search, table, f"# search {path}: {search['trials']} trials x "
                 f"{search['tokens_per_trial']:,} tokens"))
    print("  (MFU 0.30 assumed; measure yours: python -m tfpretrain.estimate --measure)")
    return search


@cli_main
def main(argv=None) -> int:
    quiet_tensorflow()
    quiet_retracing()  # trials run one after another in this process
    p = argparse.ArgumentParser(prog="python -m tfpretrain.tune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML with a tune: section (default: configs/tune.yaml)")
    p.add_argument("--tuner", choices=("random", "grid", "bayesian", "hyperband"))
    p.add_argument("--max-trials", type=int)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--run-dir", help="search folder (default: runs/<config name>)")
    dist = p.add_argument_group("a search on several processes or machines")
    dist.add_argument("--chief", metavar="HOST:PORT",
                      help="serve the oracle here; workers run the trials")
    dist.add_argument("--worker", metavar="ID", help="run trials for the chief at --oracle")
    dist.add_argument("--oracle", metavar="HOST:PORT", help="the chief's address")
    p.add_argument("--dry-run", action="store_true",
                   help="print what the search will cost (tokens, hours and dollars per "
                        "device) and exit")
    dist.add_argument("--workers", type=int, metavar="N",
                      help="start a chief and N workers on 127.0.0.1 (one machine)")
    argv = list(sys.argv[1:] if argv is None else argv)
    a = p.parse_args(argv)
    from tfpretrain.tune_workers import resolve_role, run_local

    if a.workers is not None and (a.chief or a.worker or a.oracle):
        raise UserError("--workers N starts its own chief and workers: leave out "
                        "--chief/--worker/--oracle")
    role = resolve_role(a.chief, a.worker, a.oracle)
    from tfpretrain.config import load_config, load_raw, resolve_config_path

    path = str(resolve_config_path(a.config or "tune"))
    overrides = list(a.overrides)
    if a.tuner:
        overrides.append(f"tune.tuner={a.tuner}")
    if a.max_trials is not None:
        overrides.append(f"tune.max_trials={a.max_trials}")
    cfg = load_config(path, overrides)
    base_raw = load_raw(path, overrides)
    base_raw.pop("name", None)
    run_dir = Path(a.run_dir) if a.run_dir else Path("runs") / cfg.name
    check_space(cfg, base_raw)  # before anything starts, the dry run included
    if a.dry_run:
        print(json.dumps(dry_run(path, overrides), default=str))
        return 0
    if a.workers is not None:
        rest = [x for i, x in enumerate(argv) if not (
            x == "--workers" or x.startswith("--workers=") or (i and argv[i - 1] == "--workers"))]
        return run_local(rest, a.workers, run_dir)
    result = tune(cfg, base_raw, run_dir, role)
    print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
