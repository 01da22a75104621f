"""Benchmarks: speed targets live here, never in timed tests.

    python -m tfpretrain.bench fit [--config PATH] [--set KEY=VALUE ...] [--data FILE]
                                   [--steps N] [--warmup N]

    python -m tfpretrain.bench generate --run-dir DIR [--saved-model PATH] [--new-tokens N]

``fit`` trains the configured model on the configured data two ways in one process and
prints tokens/s for each and their ratio:
- ``keras_hub_plain``: keras_hub's own task (GPT2CausalLM / LlamaCausalLM, no preprocessor)
  compiled the plain way (AdamW, sparse cross-entropy, no XLA), ``model.fit``;
- ``tfpretrain``: our model and train step with the settings ``fit`` uses (XLA,
  steps_per_execution, global-norm clipping, per-step logging buffer).
Both see the same packed rows, batch size and sequence length; the first ``--warmup``
steps (tracing/compilation) are excluded.

``generate`` times greedy generation at batch 1 (prompt ``eval.prompt``, N new tokens):
keras_hub's own ``CausalLM.generate()`` on the run's weights with and without XLA, and the
exported SavedModel's ``generate`` signature (which has no Xla ops), after one warm-up call.

The last line of each is a JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

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
    from tfpretrain.data.tokenizers import train_from_config
    from tfpretrain.models import build_backbone, build_from_config
    from tfpretrain.training.optimizers import build_optimizer
    from tfpretrain.training.trainer import choose_steps_per_execution, configure_tensorflow

    configure_tensorflow(cfg)
    keras.utils.set_random_seed(cfg.train.seed)
    corpus = load_corpus(cfg.data, cfg.train.seed)
    tok = train_from_config(cfg, corpus.train)
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
    model = build_from_config(cfg, tok.vocabulary_size, spe)
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


def bench_generate(run_dir, saved_model=None, new_tokens: int = 64, repeats: int = 3) -> dict:
    import numpy as np
    import keras_hub
    import tensorflow as tf

    from tfpretrain.export import export_saved_model, load_run

    cfg, tok, model = load_run(run_dir)
    prompt = [3] + tok.encode(cfg.eval.prompt)
    n_new = min(new_tokens, cfg.model.sequence_length - len(prompt))
    task_cls = {"gpt2": keras_hub.models.GPT2CausalLM,
                "llama": keras_hub.models.LlamaCausalLM}[cfg.model.arch]
    task = task_cls(backbone=model.backbone, preprocessor=None)
    length = len(prompt) + n_new
    ids = np.zeros([1, length], np.int32)
    ids[0, :len(prompt)] = prompt
    mask = np.zeros([1, length], bool)
    mask[0, :len(prompt)] = True
    out = {"run_dir": str(run_dir), "new_tokens": n_new}
    for jit in (True, False):
        task.compile(sampler="greedy")
        task.jit_compile = jit
        task.generate_function = None
        inputs = {"token_ids": ids, "padding_mask": mask}
        task.generate(inputs, stop_token_ids=None)
        t0 = time.perf_counter()
        for _ in range(repeats):
            task.generate(inputs, stop_token_ids=None)
        out[f"keras_hub_{'xla' if jit else 'no_xla'}_tokens_per_second"] = round(
            n_new * repeats / (time.perf_counter() - t0), 1)
    if saved_model is None:
        import tempfile

        saved_model = export_saved_model(model, tok, cfg, run_dir,
                                         Path(tempfile.mkdtemp()) / "m", validate=False)
    import tensorflow_text  # noqa: F401

    fn = tf.saved_model.load(str(saved_model)).signatures["sample"]
    args = dict(prompts=tf.constant([cfg.eval.prompt]), max_new_tokens=tf.constant(n_new),
                temperature=tf.constant(0.0), top_k=tf.constant(0), top_p=tf.constant(1.0),
                seed=tf.constant(0))
    fn(**args)
    t0 = time.perf_counter()
    for _ in range(repeats):
        result = fn(**args)
    produced = int(np.sum(np.cumsum(result["token_ids"].numpy() == 3, axis=1) == 0)) + 1
    out["saved_model_tokens_per_second"] = round(
        min(produced, n_new) * repeats / (time.perf_counter() - t0), 1)
    out["ratio_vs_keras_hub_xla"] = round(out["saved_model_tokens_per_second"]
                                          / out["keras_hub_xla_tokens_per_second"], 3)
    return out


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
    g = sub.add_parser("generate", help="greedy tokens/s: SavedModel vs keras_hub generate()")
    g.add_argument("--run-dir", required=True)
    g.add_argument("--saved-model", help="default: export the run to a temporary folder")
    g.add_argument("--new-tokens", type=int, default=64)
    args = p.parse_args(argv)
    if args.what == "generate":
        result = bench_generate(Path(args.run_dir), args.saved_model, args.new_tokens)
        for k, v in result.items():
            print(f"{k:>36}: {v}")
        print(json.dumps(result))
        return 0
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
