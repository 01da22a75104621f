"""Benchmarks: speed targets live here, never in timed tests.

    python -m tfpretrain.bench fit [--config PATH] [--set KEY=VALUE ...] [--data FILE]
                                   [--steps N] [--warmup N]

``fit`` trains the configured model on the configured data two ways in one process and
prints tokens/s for each and their ratio:
- ``keras_hub_plain``: keras_hub's own task (GPT2CausalLM / LlamaCausalLM, no preprocessor)
  compiled the plain way (AdamW, sparse cross-entropy, no XLA), ``model.fit``;
- ``tfpretrain``: our model and train step with the settings ``fit`` uses (XLA,
  steps_per_execution, global-norm clipping, per-step logging buffer).
Both see the same packed rows, batch size and sequence length; the first ``--warmup``
steps (tracing/compilation) are excluded. The last line is a JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from tfpretrain.errors import cli_main, quiet_tensorflow


def _timed_fit(model, ds, steps: int, warmup: int) -> float:
    """Tokens/s of model.fit over ``steps`` steps after ``warmup`` steps."""
    model.fit(ds, steps_per_epoch=warmup, epochs=1, verbose=0, shuffle=False)
    t0 = time.perf_counter()
    model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0, shuffle=False)
    return time.perf_counter() - t0


def bench_fit(cfg, steps: int, warmup: int) -> dict:
    import keras
    import keras_hub
    import tensorflow as tf

    from tfpretrain.data.pipeline import pack_corpus, train_dataset
    from tfpretrain.data.sources import load_corpus
    from tfpretrain.data.tokenizers import train_tokenizer
    from tfpretrain.models import build_backbone, build_model
    from tfpretrain.training.optimizers import build_optimizer
    from tfpretrain.training.trainer import choose_steps_per_execution, configure_tensorflow

    configure_tensorflow(cfg)
    keras.utils.set_random_seed(cfg.train.seed)
    corpus = load_corpus(cfg.data, cfg.train.seed)
    tc = cfg.tokenizer
    tok = train_tokenizer(tc.kind, corpus.train, tc.vocabulary_size, tc.character_coverage,
                          tc.byte_fallback, tc.train_bytes, cfg.train.seed)
    packed = pack_corpus(tok, corpus.train, corpus.val, cfg.model.sequence_length)
    B, L = cfg.train.batch_size, cfg.model.sequence_length
    total = steps + warmup
    tokens = steps * B * L
    results = {"config": cfg.name, "arch": cfg.model.arch, "batch_size": B,
               "sequence_length": L, "steps": steps}

    # keras_hub's task, plain compile, no XLA
    task_cls = {"gpt2": keras_hub.models.GPT2CausalLM,
                "llama": keras_hub.models.LlamaCausalLM}[cfg.model.arch]
    task = task_cls(backbone=build_backbone(cfg.model, tok.vocabulary_size), preprocessor=None)
    task.compile(optimizer=keras.optimizers.AdamW(cfg.optimizer.learning_rate),
                 loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                 jit_compile=False)
    plain_ds = train_dataset(packed.train_rows, B, cfg.train.seed, 0, total).map(
        lambda x, y, w: ({"token_ids": x, "padding_mask": tf.ones_like(x, tf.bool)}, y))
    seconds = _timed_fit(task, plain_ds.repeat(), steps, warmup)
    results["keras_hub_plain_tokens_per_second"] = round(tokens / seconds, 1)

    # tfpretrain's path
    spe = choose_steps_per_execution(cfg)
    warmup = max(spe, warmup // spe * spe)
    steps = max(spe, steps // spe * spe)
    model = build_model(cfg.model, tok.vocabulary_size, cfg.optimizer.clipnorm, spe)
    opt = build_optimizer(cfg.optimizer, cfg.train.steps)
    opt.build(model.trainable_variables)
    jit = cfg.train.jit_compile if cfg.train.jit_compile is not None else True
    model.compile(optimizer=opt, jit_compile=jit, steps_per_execution=spe)
    ds = train_dataset(packed.train_rows, B, cfg.train.seed, 0)
    seconds = _timed_fit(model, ds, steps, warmup)
    results["tfpretrain_tokens_per_second"] = round(steps * B * L / seconds, 1)
    results["tfpretrain_jit_compile"], results["steps_per_execution"] = jit, spe
    results["ratio"] = round(results["tfpretrain_tokens_per_second"]
                             / results["keras_hub_plain_tokens_per_second"], 3)
    return results


@cli_main
def main(argv=None) -> int:
    quiet_tensorflow()
    p = argparse.ArgumentParser(prog="python -m tfpretrain.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    f = sub.add_parser("fit", help="tokens/s: tfpretrain vs plain keras_hub model.fit")
    f.add_argument("--config", help="YAML config (default: configs/default.yaml)")
    f.add_argument("--set", dest="overrides", action="append", default=[])
    f.add_argument("--data", help="shortcut for --set data.path=FILE")
    f.add_argument("--steps", type=int, default=200)
    f.add_argument("--warmup", type=int, default=32)
    args = p.parse_args(argv)
    from tfpretrain.config import load_config

    overrides = args.overrides + ([f"data.path={args.data}"] if args.data else [])
    cfg = load_config(args.config, overrides)
    result = bench_fit(cfg, args.steps, args.warmup)
    for k, v in result.items():
        print(f"{k:>36}: {v}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
