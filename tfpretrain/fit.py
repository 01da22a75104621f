"""Pretrain a causal LM end to end: the main job.

    python -m tfpretrain.fit [--config PATH] [--set KEY=VALUE ...] [--run-dir DIR]
                             [--resume auto|never|must] [--allow-config-change] [--dry-run]

With no --config the packaged configs/default.yaml is used (embedded story corpus, CPU,
a few minutes). The last line of stdout is the run summary as one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tfpretrain.errors import cli_main, quiet_tensorflow


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tfpretrain.fit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (default: the packaged configs/default.yaml)")
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
                   help="print the resolved config, parameter count and token budget; "
                        "do not train")
    return p


def dry_run(cfg) -> dict:
    from tfpretrain.data.sources import resolve_paths
    from tfpretrain.models import count_params

    if cfg.data.path is not None:
        resolve_paths(cfg.data.path)  # a missing file is reported now, not after an hour
    vocab = 261 if cfg.tokenizer.kind == "byte" else cfg.tokenizer.vocabulary_size
    tokens_per_step = cfg.train.batch_size * cfg.model.sequence_length
    print(cfg.to_yaml(), end="")
    info = {"params": count_params(cfg.model, vocab), "vocabulary_size": vocab,
            "tokens_per_step": tokens_per_step,
            "planned_tokens": tokens_per_step * cfg.train.steps}
    print(f"# parameters: {info['params']:,} (vocabulary_size {vocab}"
          f"{', an upper bound until the tokenizer is trained' if vocab != 260 else ''})")
    print(f"# tokens per step: {tokens_per_step:,}; planned tokens: {info['planned_tokens']:,}")
    return info


@cli_main
def main(argv=None) -> int:
    quiet_tensorflow()
    args = parser().parse_args(argv)
    from tfpretrain.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        print(json.dumps(dry_run(cfg)))
        return 0
    from tfpretrain.training.trainer import Preempted, fit

    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / cfg.name
    try:
        summary = fit(cfg, run_dir, args.resume, args.allow_config_change)
    except Preempted as exc:
        print(f"[tfpretrain] {exc}; exit {exc.exit_code}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
