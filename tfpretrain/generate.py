"""Sample text from a trained run with its own tokenizer.

    python -m tfpretrain.generate --run-dir runs/default --prompt "Once upon a time"
        [--max-new-tokens N] [--sampler greedy|top_k|top_p] [--temperature T]
        [--top-k K] [--top-p P] [--seed S] [--num-samples N]

A prompt longer than the model's context is truncated from the left.

Masked-LM runs do fill-mask instead: every ``[MASK]`` in the prompt is predicted, printing
the filled text and the top-k tokens with their probabilities (``--top-k``, default 5 here):

    python -m tfpretrain.generate --run-dir runs/bert-mini-mlm \
        --prompt "Once upon a [MASK], there was a little girl."
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from tfpretrain.errors import UserError, cli_main, quiet_tensorflow


def check_arguments(a) -> None:
    """Every sampling argument in range, before a model is loaded."""
    if a.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1. Received: {a.max_new_tokens}")
    t = a.temperature
    temperature_ok = t is None or (math.isfinite(t) and t >= 0)
    if not temperature_ok or not 0 < a.top_p <= 1 or (a.top_k or 0) < 0 or a.num_samples < 1:
        raise UserError("--temperature must be a finite number >= 0, --top-p in (0, 1], "
                        "--top-k >= 0 and --num-samples >= 1. Received: "
                        f"temperature={a.temperature}, top_p={a.top_p}, top_k={a.top_k}, "
                        f"num_samples={a.num_samples}")
    if a.prompt is not None:
        try:
            a.prompt.encode("utf-8")
        except UnicodeEncodeError:
            raise UserError("--prompt is not valid UTF-8 text (undecodable bytes on the "
                            "command line); pass the prompt in your terminal's UTF-8 "
                            "encoding") from None


@cli_main
def main(argv=None) -> int:
    quiet_tensorflow()
    p = argparse.ArgumentParser(prog="python -m tfpretrain.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--prompt", help="default: the run's eval.prompt")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--sampler", choices=("greedy", "top_k", "top_p"), default="top_k")
    p.add_argument("--temperature", type=float, help="default: the run's eval.temperature")
    p.add_argument("--top-k", type=int, default=None,
                   help="top-k sampling (default: the run's eval.top_k); masked LM: "
                        "predictions per mask (default 5)")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=1)
    a = p.parse_args(argv)
    check_arguments(a)
    from tfpretrain.objectives import get_objective
    from tfpretrain.training.runfolder import load_run

    cfg, tokenizer, model = load_run(Path(a.run_dir))
    a.prompt = cfg.eval.prompt if a.prompt is None else a.prompt
    a.temperature = cfg.eval.temperature if a.temperature is None else a.temperature
    for line in get_objective(cfg).generate(model, tokenizer, a, cfg):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
