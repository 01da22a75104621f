"""Pretrain a language model end to end: the main job.

    python -m tfpretrain.fit [--config NAME|PATH] [--set KEY=VALUE ...] [--run-dir DIR]
                             [--resume auto|never|must] [--allow-config-change] [--dry-run]

With no --config the packaged default config is used (embedded story corpus, CPU, a few
minutes); ``--config char-cpu`` picks a packaged config by name. The last line of stdout is
the run summary as one JSON object.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
from pathlib import Path

from tfpretrain.errors import TEMPFAIL_EXIT, cli_main, quiet_tensorflow


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tfpretrain.fit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a packaged config's name (default, char-cpu, "
                                    "bert-mini-mlm, tune) or a YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set train.steps=200 (repeatable)")
    p.add_argument("--run-dir", help="run folder (default: runs/<config name>)")
    p.add_argument("--resume", choices=("auto", "never", "must"), default="auto",
                   help="auto: continue from the run folder's latest valid checkpoint if "
                        "there is one; never: refuse an existing run folder; must: fail "
                        "unless there is a checkpoint to resume")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume even if resume-critical settings (model, tokenizer, data, "
                        "batch size, seed) differ from the run's config.yaml")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config, parameter count, token budget and "
                        "the cost estimate per device (python -m tfpretrain.estimate); "
                        "do not train")
    return p


def planned_vocabulary(cfg) -> tuple[int, bool]:
    """The vocabulary size a run of ``cfg`` will have before its tokenizer exists, and
    whether it is exact (a byte tokenizer, or ``tokenizer.path``); otherwise
    ``tokenizer.vocabulary_size``, an upper bound until the tokenizer is trained."""
    from tfpretrain.data.tokenizers import BYTE_VOCABULARY_SIZE, from_path

    if cfg.tokenizer.path:  # an existing tokenizer (or model.init_from's): its exact size
        return from_path(cfg.tokenizer.path).vocabulary_size, True
    if cfg.tokenizer.kind == "byte":
        return BYTE_VOCABULARY_SIZE, True
    return cfg.tokenizer.vocabulary_size, False


def dry_run(cfg) -> dict:
    from tfpretrain.data.sources import resolve_paths
    from tfpretrain.data.tasks import read_task
    from tfpretrain.objectives import count_params
    from tfpretrain.training import warm_start
    from tfpretrain.training.runtime import check_memory

    if cfg.data.path is not None:
        resolve_paths(cfg.data.path)  # a missing file is reported now, not after an hour
    for name, spec in (cfg.eval.sets or {}).items():
        resolve_paths(spec, f"eval.sets.{name}")
    for name, path in (cfg.eval.tasks or {}).items():
        read_task(name, path, f"eval.tasks.{name}")  # missing or malformed: now
    cfg = warm_start.resolve(cfg)  # model.init_from: a source that does not fit, now
    vocab, exact = planned_vocabulary(cfg)
    tokens_per_step = cfg.train.batch_size * cfg.model.sequence_length
    check_memory(cfg, vocab)  # an absurd size is refused here, not by running out of memory
    print(cfg.to_yaml(), end="")
    info = {"params": count_params(cfg, vocab), "vocabulary_size": vocab,
            "tokens_per_step": tokens_per_step,
            "planned_tokens": tokens_per_step * cfg.train.steps}
    print(f"# parameters: {info['params']:,} (vocabulary_size {vocab}"
          f"{'' if exact else ', an upper bound until the tokenizer is trained'})")
    print(f"# tokens per step: {tokens_per_step:,}; planned tokens: {info['planned_tokens']:,}")
    from tfpretrain.estimate import estimate, parser as estimate_parser

    projected = estimate(cfg, estimate_parser().parse_args(["--params", str(info["params"])]))
    return {**info, **projected}


@contextlib.contextmanager
def export_after_training(model, tokenizer, cfg, run_dir, log, checker=None):
    """fit's finish hook: saves the SavedModel (``export.enabled``) and hands it to the fresh
    process's check (``checker``: started with the run), then yields the summary's fields;
    the run's final evaluation and sample run in the block while that process loads and
    runs the model. A failed check or a save the disk refused keeps the trained run and says
    why in the summary (``export_error``); the evaluation still runs."""
    import time

    from tfpretrain.errors import WriteError
    from tfpretrain.serving.saved_model import ExportValidationError, exporting

    fields = {"saved_model": None}
    if not cfg.export.enabled:
        yield fields
        return
    t0, saved, waited = time.time(), None, None
    try:
        with exporting(model, tokenizer, cfg, run_dir, checker=checker) as path:
            saved = time.time()
            yield fields
            waited = time.time()
    except (ExportValidationError, WriteError) as exc:  # the trained run is kept
        if saved is not None and waited is None:
            raise  # from the block (the evaluation), not the export
        log(f"warning: the export was not published: {exc}")
        fields["export_error"] = str(exc)
        if saved is None:  # the save failed: the evaluation runs all the same
            yield fields
        return
    fields["saved_model"] = str(path)
    log(f"exported {path} (saved in {saved - t0:.1f}s; the fresh process's check took "
        f"{time.time() - waited:.1f}s more after the final evaluation)")


def checker_for(cfg) -> contextlib.AbstractContextManager:
    """The export check's fresh process, started now so that its imports overlap the run's
    (a Checker), where this process will export; else a context of None."""
    from tfpretrain.training.distribute import worker_cluster

    if not (cfg.export.enabled and cfg.export.validate):
        return contextlib.nullcontext()
    cluster = worker_cluster(cfg)
    if cluster and not cluster.is_chief:
        return contextlib.nullcontext()
    from tfpretrain.serving.saved_model import Checker

    return Checker()


def fit(cfg, run_dir: Path, resume: str = "auto", allow_config_change: bool = False) -> dict:
    """Train ``cfg`` in ``run_dir`` and export it; returns the summary.
    Raises UserError, training.preemption.Preempted."""
    from tfpretrain.training.run import train

    with checker_for(cfg) as checker:
        return train(cfg, Path(run_dir), resume, allow_config_change,
                     finish=functools.partial(export_after_training, checker=checker))


@cli_main
def main(argv=None) -> int:
    quiet_tensorflow()
    args = parser().parse_args(argv)
    from tfpretrain.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        print(json.dumps(dry_run(cfg)))
        return 0
    from tfpretrain.training.distribute import WorkerLost
    from tfpretrain.training.guard import GuardStop
    from tfpretrain.training.preemption import Preempted

    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / cfg.name
    try:
        summary = fit(cfg, run_dir, args.resume, args.allow_config_change)
    except (Preempted, GuardStop, WorkerLost) as exc:
        # "rerun every process" (a lost or stopped peer) exits with the run's own code
        code = cfg.train.rerun_exit_code if exc.exit_code == TEMPFAIL_EXIT else exc.exit_code
        print(f"[tfpretrain] {exc}; exit {code}", file=sys.stderr)
        return code
    print(json.dumps(summary))
    if summary.get("strategy") == "multi_worker":
        # every worker passed the final barrier: leave now, all together, before
        # TensorFlow's teardown reports the first worker gone as a lost task
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
