"""Benchmarks: speed targets live here, never in timed tests.

    python -m tfpretrain.bench fit [--config PATH] [--set KEY=VALUE ...] [--data FILE]
                                   [--steps N] [--warmup N] [--no-plain]

    python -m tfpretrain.bench fit --backend jax [--rows ROWS.npy|CACHE_ENTRY] [--no-guard]

    python -m tfpretrain.bench gpu [--shapes ...] [--precisions ...] [--batches 64,256]
                                   [--steps N] [--warmup N] [--out table.md]

    python -m tfpretrain.bench generate --run-dir DIR [--saved-model PATH] [--new-tokens N]

    python -m tfpretrain.bench synth [--count 100000] [--dedup-count 20000] [--planted N]

    python -m tfpretrain.bench optim [--config PATH] [--set KEY=VALUE ...]
                                     [--variant NAME:KEY=VALUE,... ...] [--seeds 1337,1338]
                                     [--eval-every N] [--out table.md]

``fit`` trains the configured model on the configured data two ways in one process and
prints tokens/s for each and their ratio:
- ``keras_hub_plain``: keras_hub's own task (GPT2CausalLM / LlamaCausalLM, no preprocessor)
  compiled the plain way (AdamW, sparse cross-entropy, no XLA), ``model.fit``;
- ``tfpretrain``: our model and train step with the settings ``fit`` uses (precision, XLA,
  steps_per_execution, global-norm clipping, per-step logging buffer), with its MFU against
  this device's peak for that precision (``--no-plain``: this one only).
Both see the same packed rows, batch size and sequence length; the first ``--warmup``
steps (tracing/compilation) are excluded.

``fit --backend jax`` runs the same model, loss, optimizer, schedule, clipping and guard on
Keras's JAX backend (``training.stateless``), importing no TensorFlow; ``gpu`` runs its
matrix of shapes, precisions and batch sizes for a GPU machine (docs/jax.md).

``data`` writes a generated story corpus of ``--mb`` MB (default 100; a folder of ~100 MB
.txt shards) and prints, per tokenizer kind, the cold tokenize+pack rate on the first
``--cold-mb`` MB in memory (tokens/s, after training the tokenizer on
``tokenizer.train_bytes``, timed separately); the streaming ``python -m tfpretrain.data``
prepare of the whole folder in its own process (wall time, tokens/s, peak RSS); the cached
read rate (rows memory-mapped from that token cache and served by the training ``tf.data``
pipeline) and the training consumption rate of the config's model (``fit`` tokens/s), with
the cached/consumption ratio.

``generate`` times greedy generation at batch 1 (prompt ``eval.prompt``, N new tokens):
keras_hub's own ``CausalLM.generate()`` on the run's weights as keras_hub configures it by
default (``compile()``'s ``jit_compile="auto"``: XLA only when a GPU is visible), forced
with XLA and forced without, and the exported SavedModel's ``sample`` signature at
temperature 0 (KV-cached, no Xla ops), after one warm-up call each.

``synth`` measures the synthetic-data targets on one core (``tfpretrain.bench_synth``):
stories/s and distinct share of 100k generated stories, and dedup's recall and false
positives on planted near-duplicates.

``optim`` trains each optimizer/schedule variant with ``fit`` for the config's steps and
seeds and tables final val loss, steps to reach the first variant's final val loss,
tokens/s and peak memory (``tfpretrain.bench_optim``).

The last line of each is a JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tfpretrain.errors import UserError, cli_main, quiet_tensorflow


def bench_fit(cfg, steps: int, warmup: int, plain: bool = True) -> dict:
    import keras

    from tfpretrain.data.pipeline import pack_corpus
    from tfpretrain.data.sources import load_corpus
    from tfpretrain.data.tokenizers import train_from_config
    from tfpretrain.objectives import row_format
    from tfpretrain.training.runtime import configure_tensorflow

    configure_tensorflow(cfg)
    keras.utils.set_random_seed(cfg.train.seed)
    corpus = load_corpus(cfg.data, cfg.train.seed)
    tok = train_from_config(cfg, corpus.train)
    packed = pack_corpus(tok, corpus.train, corpus.val, row_format(cfg))
    results = {"config": cfg.name, "arch": cfg.model.arch, "batch_size": cfg.train.batch_size,
               "sequence_length": cfg.model.sequence_length, "steps": steps}
    if plain:
        results["keras_hub_plain_tokens_per_second"] = _plain_keras_hub(
            cfg, packed, tok.vocabulary_size, steps, warmup)
    results.update(_ours(cfg, packed, tok.vocabulary_size, steps, warmup))
    if plain:
        results["ratio"] = round(results["tfpretrain_tokens_per_second"]
                                 / results["keras_hub_plain_tokens_per_second"], 3)
    return results


def _plain_keras_hub(cfg, packed, vocabulary_size: int, steps: int, warmup: int) -> float:
    """keras_hub's task, plain compile (AdamW, sparse cross-entropy), no XLA."""
    import keras
    import tensorflow as tf

    from tfpretrain.data.pipeline import train_dataset
    from tfpretrain.models.registry import build_backbone, get_arch
    from tfpretrain.training.runtime import timed_fit

    B, L = cfg.train.batch_size, cfg.model.sequence_length
    task = get_arch(cfg.model.arch).task_class()(
        backbone=build_backbone(cfg.model, vocabulary_size), preprocessor=None)
    task.compile(optimizer=keras.optimizers.AdamW(cfg.optimizer.learning_rate),
                 loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                 jit_compile=False)
    plain_ds = train_dataset(packed.train_rows, B, cfg.train.seed, 0, steps + warmup).map(
        lambda x, y, w: ({"token_ids": x, "padding_mask": tf.ones_like(x, tf.bool)}, y))
    seconds = timed_fit(task, plain_ds.repeat(), steps, warmup)
    return round(steps * B * L / seconds, 1)


def _ours(cfg, packed, vocabulary_size: int, steps: int, warmup: int) -> dict:
    """Our model and train step with fit's settings; tokens/s and MFU."""
    from tfpretrain.data.pipeline import train_dataset
    from tfpretrain.hardware import detect
    from tfpretrain.training.budget import model_flops_per_token
    from tfpretrain.training.callbacks import Meter
    from tfpretrain.training.runtime import (build_and_compile, choose_steps_per_execution,
                                             jit_compile, resolve_precision, timed_fit)

    B, L = cfg.train.batch_size, cfg.model.sequence_length
    spe = choose_steps_per_execution(cfg)
    warmup, steps = max(spe, warmup // spe * spe), max(spe, steps // spe * spe)
    precision = resolve_precision(cfg, vocabulary_size)
    model = build_and_compile(cfg, vocabulary_size, spe, precision=precision)
    ds = train_dataset(packed.train_rows, B, cfg.train.seed, 0)
    tokens_per_second = steps * B * L / timed_fit(model, ds, steps, warmup)
    params = int(model.network.count_params())
    flops = model_flops_per_token(cfg, params, vocabulary_size)
    device = detect()
    u = Meter(device, flops, device.peak(precision), 0.0, steps,
              precision=precision).mfu(tokens_per_second)
    return {"tfpretrain_tokens_per_second": round(tokens_per_second, 1),
            "tfpretrain_jit_compile": jit_compile(cfg, precision), "steps_per_execution": spe,
            "precision": precision, "params": params, "model_flops_per_token": flops,
            "mfu": None if u is None else round(u, 4)}


def bench_generate(run_dir, saved_model=None, new_tokens: int = 64, repeats: int = 3) -> dict:
    import numpy as np
    import tensorflow as tf

    from tfpretrain.data.tokenizers import EOS_ID
    from tfpretrain.objectives import get_objective
    from tfpretrain.serving.saved_model import export_saved_model
    from tfpretrain.training.runfolder import load_run

    cfg, tok, model = load_run(run_dir)
    prompt = [EOS_ID] + tok.encode(cfg.eval.prompt)
    n_new = min(new_tokens, cfg.model.sequence_length - len(prompt))
    task = get_objective(cfg).keras_task(model)
    length = len(prompt) + n_new
    ids = np.zeros([1, length], np.int32)
    ids[0, :len(prompt)] = prompt
    mask = np.zeros([1, length], bool)
    mask[0, :len(prompt)] = True
    out = {"run_dir": str(run_dir), "new_tokens": n_new}
    for jit in ("default", True, False):
        task.compile(sampler="greedy")  # keras_hub's defaults: XLA only if a GPU is present
        if jit == "default":
            out["keras_hub_default_jit_compile"] = bool(task.jit_compile)
        else:
            task.jit_compile = jit
        task.generate_function = None
        inputs = {"token_ids": ids, "padding_mask": mask}
        task.generate(inputs, stop_token_ids=None)
        t0 = time.perf_counter()
        for _ in range(repeats):
            task.generate(inputs, stop_token_ids=None)
        name = "default" if jit == "default" else "xla" if jit else "no_xla"
        out[f"keras_hub_{name}_tokens_per_second"] = round(
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
    produced = int(np.sum(np.cumsum(result["token_ids"].numpy() == EOS_ID, axis=1) == 0)) + 1
    out["saved_model_tokens_per_second"] = round(
        min(produced, n_new) * repeats / (time.perf_counter() - t0), 1)
    for name in ("default", "xla"):
        out[f"ratio_vs_keras_hub_{name}"] = round(
            out["saved_model_tokens_per_second"] / out[f"keras_hub_{name}_tokens_per_second"], 3)
    return out


def bench_data(cfg, mb: float, kinds: list[str], read_batches: int, train_steps: int,
               cold_mb: float = 100.0, config_path: str | None = None,
               overrides: list[str] = ()) -> dict:
    import shutil
    import tempfile

    import keras

    from tfpretrain.training.runtime import configure_tensorflow

    configure_tensorflow(cfg)
    keras.utils.set_random_seed(cfg.train.seed)
    tmp = Path(tempfile.mkdtemp(prefix="tfpretrain-bench-data-"))
    out: dict = {}
    try:
        folder = tmp / "corpus"
        out.update(_write_corpus(folder, mb, cfg.train.seed))
        out.update(_cold_rates(cfg, folder, kinds, cold_mb))
        out.update(_prepare_in_subprocess(folder, tmp / "cache", config_path, overrides))
        out.update(_cached_read(cfg, folder, tmp / "cache", read_batches, train_steps))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_corpus(folder: Path, mb: float, seed: int) -> dict:
    """A folder of ~100 MB .txt shards of generated stories, ``mb`` MB in all."""
    from tfpretrain.data.synthetic import generate_stories

    t0 = time.perf_counter()
    written, i, shard = 0, 0, None
    folder.mkdir()
    while written < mb * 1e6:
        if shard is None or shard.tell() >= 100e6:
            shard = open(folder / f"stories-{len(list(folder.iterdir())):04d}.txt", "w",
                         encoding="utf-8")
        block = "\n\n".join(generate_stories(5000, seed + i)) + "\n\n"
        shard.write(block)
        written += len(block.encode("utf-8"))
        i += 1
    shard.close()
    return {"corpus_mb": round(written / 1e6, 1),
            "generate_seconds": round(time.perf_counter() - t0, 1)}


def _cold_rates(cfg, folder: Path, kinds: list[str], cold_mb: float) -> dict:
    """Each tokenizer kind trained and run on (the first shards of) the corpus, in memory."""
    from tfpretrain.data.pipeline import make_rows, tokenize_documents
    from tfpretrain.data.sources import load_corpus
    from tfpretrain.data.tokenizers import train_tokenizer
    from tfpretrain.objectives import row_format

    out = {}
    first = sorted(folder.iterdir())[:max(1, round(cold_mb / 100))]
    cfg.data.path = [str(f) for f in first]
    corpus = load_corpus(cfg.data, cfg.train.seed)
    for kind in kinds:
        t0 = time.perf_counter()
        tok = train_tokenizer(kind, corpus.train, cfg.tokenizer.vocabulary_size,
                              cfg.tokenizer.character_coverage, cfg.tokenizer.byte_fallback,
                              cfg.tokenizer.train_bytes, cfg.train.seed)
        trained = time.perf_counter() - t0
        t0 = time.perf_counter()
        stream = tokenize_documents(tok, corpus.train)
        make_rows(stream, row_format(cfg))
        seconds = time.perf_counter() - t0
        out[f"{kind}_train_seconds"] = round(trained, 1)
        out[f"{kind}_tokens"] = int(len(stream))
        out[f"{kind}_cold_tokens_per_second"] = round(len(stream) / seconds)
        print(f"[bench] {kind}: {len(stream):,} tokens in {seconds:.1f}s "
              f"({len(stream) / seconds:,.0f} tok/s), tokenizer trained in {trained:.1f}s",
              flush=True)
    return out


def _prepare_in_subprocess(folder: Path, cache_dir: Path, config_path, overrides) -> dict:
    """`python -m tfpretrain.data` on the whole folder, in its own process (its own RSS)."""
    import subprocess

    cmd = [sys.executable, "-m", "tfpretrain.data", "--cache-dir", str(cache_dir),
           "--set", f"data.path={folder}"] + [x for o in overrides for x in ("--set", o)]
    if config_path:
        cmd += ["--config", config_path]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"prepare failed: {proc.stderr[-2000:]}")
    prepared = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"[bench] prepare ({prepared['tokenizer']}): {prepared['train_tokens']:,} train "
          f"tokens in {seconds:.1f}s, peak RSS {prepared['peak_rss_mb']} MB", flush=True)
    return {"prepare_seconds": round(seconds, 1),
            "prepare_peak_rss_mb": prepared["peak_rss_mb"],
            "prepare_train_tokens": prepared["train_tokens"],
            "prepare_tokens_per_second": round(
                (prepared["train_tokens"] + prepared["val_tokens"]) / seconds)}


def _cached_read(cfg, folder: Path, cache_dir: Path, read_batches: int,
                 train_steps: int) -> dict:
    """Memory-mapped rows -> the training input pipeline, against what the config's model
    consumes in training (what the pipeline must keep up with)."""
    from tfpretrain.data.cache import TokenCache
    from tfpretrain.data.pipeline import train_dataset
    from tfpretrain.objectives import row_format

    cfg.data.path = str(folder)
    cfg.data.cache_dir = str(cache_dir)
    tok, packed, _ = TokenCache(cfg, row_format(cfg)).load()
    read = _read_rate(train_dataset(packed.train_rows, cfg.train.batch_size, cfg.train.seed),
                      read_batches)
    served = _served_read_rate(packed.train_rows, cfg, read_batches)
    training = round(_consumption(cfg, packed, tok.vocabulary_size, train_steps))
    return {"cached_read_tokens_per_second": read, "training_tokens_per_second": training,
            "cached_read_vs_training": round(read / training, 1),
            "service_read_tokens_per_second": served,
            "service_read_vs_training": round(served / training, 1)}


def _read_rate(ds, batches: int) -> int:
    t0, n = time.perf_counter(), 0
    for x, _, _ in ds.take(batches):
        n += int(x.shape[0] * x.shape[1])
    return round(n / (time.perf_counter() - t0))


def _served_read_rate(rows, cfg, batches: int) -> int:
    """The same batches made by one tf.data service feeder on this host (``data.service``;
    the feeder shares this machine's cores with the reader)."""
    from tfpretrain.data import service
    from tfpretrain.data.pipeline import train_dataset

    dispatcher, worker = service.serve(0, "127.0.0.1")
    target = service.addresses(f"127.0.0.1:{dispatcher.target.rpartition(':')[2]}")
    try:  # a finite job: the worker stops only once its jobs have ended
        return _read_rate(train_dataset(rows, cfg.train.batch_size, cfg.train.seed,
                                        num_steps=batches, service=target), batches)
    finally:
        worker.stop()
        dispatcher.stop()


def _consumption(cfg, packed, vocabulary_size: int, steps: int) -> float:
    from tfpretrain.data.pipeline import train_dataset
    from tfpretrain.training.runtime import (build_and_compile, choose_steps_per_execution,
                                             timed_fit)

    spe = min(choose_steps_per_execution(cfg), steps)
    model = build_and_compile(cfg, vocabulary_size, spe, jit=True)
    ds = train_dataset(packed.train_rows[:50_000], cfg.train.batch_size, cfg.train.seed)
    seconds = timed_fit(model, ds, steps, spe * 2)
    return steps * cfg.train.batch_size * cfg.model.sequence_length / seconds


def bench_fit_jax(cfg, steps: int, warmup: int, rows_path=None, guard=True) -> dict:
    """Our model, loss, optimizer, schedule, clipping and guard on Keras's JAX backend
    (training.stateless), fed numpy batches; no TensorFlow import anywhere on this path."""
    import numpy as np

    from tfpretrain.hardware import detect, mfu
    from tfpretrain.training.budget import model_flops_per_token

    trainer, precision = _jax_trainer(cfg, guard)
    B, L = cfg.train.batch_size, cfg.model.sequence_length
    rows = _bench_rows(cfg, rows_path)
    rng = np.random.default_rng(cfg.train.seed)

    def batch():
        r = np.asarray(rows[np.sort(rng.choice(len(rows), B, replace=False))], np.int32)
        return r[:, :L], r[:, 1:L + 1], np.ones((B, L), np.float32)

    state = trainer.initial_state()
    t0 = time.perf_counter()
    for _ in range(max(warmup, 1)):
        state, logs = trainer.step(state, *batch())
    logs["loss"].block_until_ready()
    compile_seconds = time.perf_counter() - t0
    data = [batch() for _ in range(min(steps, 64))]  # host work off the timed path
    t0 = time.perf_counter()
    for i in range(steps):
        state, logs = trainer.step(state, *data[i % len(data)])
    logs["loss"].block_until_ready()
    seconds = time.perf_counter() - t0
    params = int(sum(np.prod(v.shape) for v in trainer.model.network.weights))
    flops = model_flops_per_token(cfg, params, cfg.tokenizer.vocabulary_size)
    device = detect(measure_cpu=True)
    tokens_per_second = steps * B * L / seconds
    out = {"backend": "jax", "device": device.label, "precision": precision,
           "guard": guard, "params": params, "model_flops_per_token": flops,
           "batch_size": B, "sequence_length": L, "steps": steps,
           "rows": str(rows_path) if rows_path else "random ids",
           "tokens_per_second": round(tokens_per_second, 1),
           "step_ms": round(1000 * seconds / steps, 2),
           "compile_seconds": round(compile_seconds, 1),
           "loss": float(logs["loss"]), "skipped_steps": trainer.skipped(state),
           "peak_memory_bytes": _peak_device_memory()}
    for name in ("mixed_bfloat16", "float32"):
        u = mfu(tokens_per_second, flops, device.peak(name))
        out[f"mfu_vs_{'bf16' if name != 'float32' else 'fp32'}_peak"] = (
            None if u is None else round(u, 4))
    return out


def _jax_trainer(cfg, guard: bool):
    """The model (DecoderNet over the configured backbone) and a StatelessTrainer."""
    import jax

    from tfpretrain.models.network import DecoderNet
    from tfpretrain.models.registry import build_backbone
    from tfpretrain.training.stateless import StatelessTrainer

    precision = cfg.train.precision
    if precision == "auto":  # XLA's CPU backend gains nothing from bf16 (docs/cost.md)
        precision = "float32" if jax.devices()[0].platform == "cpu" else "mixed_bfloat16"
    if precision == "mixed_float16":
        raise UserError("bench fit --backend jax: mixed_float16 (loss scaling) is "
                        "TensorFlow-only here; use mixed_bfloat16 or float32")
    backbone = build_backbone(cfg.model, cfg.tokenizer.vocabulary_size, precision)
    model = DecoderNet(backbone, cfg.model.sequence_length,
                       document_mask=cfg.data.document_mask)
    model(model.example_input())
    return StatelessTrainer.from_config(model, cfg, guard), precision


def _bench_rows(cfg, rows_path):
    import numpy as np

    from tfpretrain.data.cache import packed_rows

    L, B = cfg.model.sequence_length, cfg.train.batch_size
    if rows_path is None:
        return np.random.default_rng(0).integers(
            5, cfg.tokenizer.vocabulary_size, size=(max(64, 4 * B), L + 1), dtype=np.int32)
    rows = packed_rows(rows_path)
    if rows.shape[1] < L + 1 or len(rows) < B:
        raise UserError(f"--rows: {rows_path} holds {len(rows)} rows of {rows.shape[1]} ids; "
                        f"need >= {B} rows of >= model.sequence_length + 1 = {L + 1}")
    if int(rows[: 4 * B].max()) >= cfg.tokenizer.vocabulary_size:
        raise UserError(f"--rows: {rows_path} has ids >= tokenizer.vocabulary_size="
                        f"{cfg.tokenizer.vocabulary_size}; set it to the rows' vocabulary")
    return rows


def _peak_device_memory():
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


# bench gpu: (label, config, overrides) of the shapes measured on a GPU through JAX
GPU_SHAPES = {
    "smolgpt-27m": ("tinystories-27m", ["train.grad_accumulation_steps=1"]),
    "gpt-10.7m": ("char-cpu", ["model.num_layers=6", "model.num_heads=6",
                               "model.hidden_dim=384", "model.intermediate_dim=1536",
                               "model.sequence_length=256", "tokenizer.vocabulary_size=65"]),
    "tiny": ("default", ["model.num_layers=1", "model.hidden_dim=32", "model.num_heads=2",
                         "model.intermediate_dim=64", "model.sequence_length=32",
                         "tokenizer.vocabulary_size=64"]),
}


def bench_gpu(shapes: list[str], precisions: list[str], batches: list[int], steps: int,
              warmup: int) -> list[dict]:
    """The JAX-backend matrix: each shape x precision x batch size (stopping at the first
    batch that does not fit), then the fastest batch of the first precision again without
    the guard (what the guard costs)."""
    from tfpretrain.config import load_config

    results = []
    for shape in shapes:
        name, sets = GPU_SHAPES[shape]
        best = None
        for precision in precisions:
            for batch in batches:
                cfg = load_config(name, sets + [f"train.precision={precision}",
                                                f"train.batch_size={batch}"])
                row = _gpu_row(shape, cfg, steps, warmup, guard=True)
                results.append(row)
                if row.get("error"):
                    break
                faster = best is None or row["tokens_per_second"] > best[1]["tokens_per_second"]
                if precision == precisions[0] and faster:
                    best = (cfg, row)
        if best is not None:
            results.append(_gpu_row(shape, best[0], steps, warmup, guard=False))
    return results


def _gpu_row(shape: str, cfg, steps: int, warmup: int, guard: bool) -> dict:
    row = {"shape": shape, "precision": cfg.train.precision,
           "batch_size": cfg.train.batch_size, "guard": guard}
    try:
        row.update(bench_fit_jax(cfg, steps, warmup, guard=guard))
    except Exception as exc:  # out of device memory ends this precision's batch sweep
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    print(json.dumps(row), flush=True)
    return row


def gpu_table(results: list[dict]) -> str:
    """The matrix as a markdown table, with smolGPT's 4B-token run projected from the
    fastest 27M bf16 row (hours and dollars on this device at the measured speed)."""
    from tfpretrain.hardware import detect
    from tfpretrain.training.budget import project

    lines = ["| shape | precision | batch | guard | tokens/s | step ms | MFU (bf16 peak) | "
             "MFU (fp32 peak) | peak memory GB | compile s |", "|" + "---|" * 10]
    for r in results:
        if r.get("error"):
            lines.append(f"| {r['shape']} | {r['precision']} | {r['batch_size']} | "
                         f"{r['guard']} | {r['error']} |||||")
            continue
        mem = r["peak_memory_bytes"]
        lines.append(f"| {r['shape']} | {r['precision']} | {r['batch_size']} | {r['guard']} | "
                     f"{r['tokens_per_second']:,.0f} | {r['step_ms']} | "
                     f"{r['mfu_vs_bf16_peak']} | {r['mfu_vs_fp32_peak']} | "
                     f"{'n/a' if mem is None else round(mem / 1e9, 2)} | "
                     f"{r['compile_seconds']} |")
    smol = [r for r in results if r["shape"] == "smolgpt-27m" and not r.get("error")
            and r["precision"] == "mixed_bfloat16" and r["guard"]]
    if smol:
        top = max(smol, key=lambda r: r["tokens_per_second"])
        row = project(detect(measure_cpu=False), "mixed_bfloat16", 4e9,
                      top["model_flops_per_token"], tokens_per_second=top["tokens_per_second"])
        lines.append(f"\nsmolGPT's 4B tokens at {top['tokens_per_second']:,.0f} tokens/s on "
                     f"{row.device}: {row.hours:.2f} h, ${row.cost_usd:.2f} at "
                     f"${row.price_per_hour}/h (smolGPT: ~18.5 h, ~$13 on an L4).")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tfpretrain.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    f = sub.add_parser("fit", help="tokens/s: tfpretrain vs plain keras_hub model.fit")
    f.add_argument("--config", help="YAML config (default: configs/default.yaml)")
    f.add_argument("--set", dest="overrides", action="append", default=[])
    f.add_argument("--data", help="shortcut for --set data.path=FILE")
    f.add_argument("--steps", type=int, default=200)
    f.add_argument("--warmup", type=int, default=32)
    f.add_argument("--no-plain", action="store_true",
                   help="only time tfpretrain's path (skip plain keras_hub)")
    f.add_argument("--backend", choices=("tensorflow", "jax"), default="tensorflow",
                   help="jax: Keras's JAX backend, no TensorFlow imported (GPU figures)")
    f.add_argument("--rows", help="--backend jax: packed rows, an .npy file [rows, "
                                  "sequence_length + 1] or a token-cache entry folder "
                                  "(default: random ids)")
    f.add_argument("--no-guard", action="store_true",
                   help="--backend jax: train without the stability guard (its cost)")
    u = sub.add_parser("gpu", help="the JAX-backend GPU matrix (docs/benchmarks.md)")
    u.add_argument("--shapes", default="smolgpt-27m,gpt-10.7m",
                   help=f"comma-separated, of: {', '.join(GPU_SHAPES)}")
    u.add_argument("--precisions", default="mixed_bfloat16,float32")
    u.add_argument("--batches", default="64,256",
                   help="batch sizes tried in order until one does not fit")
    u.add_argument("--steps", type=int, default=50)
    u.add_argument("--warmup", type=int, default=3)
    u.add_argument("--out", help="also write the markdown table to this file")
    g = sub.add_parser("generate", help="greedy tokens/s: SavedModel vs keras_hub generate()")
    g.add_argument("--run-dir", required=True)
    g.add_argument("--saved-model", help="default: export the run to a temporary folder")
    g.add_argument("--new-tokens", type=int, default=64)
    d = sub.add_parser("data", help="tokenize/pack and cached-read tokens/s vs training")
    d.add_argument("--config", help="YAML config (default: configs/default.yaml)")
    d.add_argument("--set", dest="overrides", action="append", default=[])
    d.add_argument("--mb", type=float, default=100.0, help="corpus size in MB (default 100)")
    d.add_argument("--kinds", default="sentencepiece_bpe,sentencepiece_unigram,wordpiece,char,"
                   "byte", help="comma-separated tokenizer kinds (the first is cached)")
    d.add_argument("--cold-mb", type=float, default=100.0,
                   help="MB of the corpus the per-kind cold rates are measured on")
    d.add_argument("--read-batches", type=int, default=2000)
    d.add_argument("--train-steps", type=int, default=64)
    y = sub.add_parser("synth", help="story generation rate/diversity, dedup recall "
                       "on planted near-duplicates")
    y.add_argument("--count", type=int, default=100_000, help="stories generated (default 100k)")
    y.add_argument("--dedup-count", type=int, default=20_000)
    y.add_argument("--planted", type=int, default=0, help="default: 1%% of --dedup-count")
    o = sub.add_parser("optim", help="optimizers/schedules: val loss, steps to AdamW's, tok/s")
    o.add_argument("--config", help="YAML config (default: configs/default.yaml)")
    o.add_argument("--set", dest="overrides", action="append", default=[])
    o.add_argument("--variant", dest="variants", action="append",
                   help="NAME:KEY=VALUE,... (repeatable; the first is the baseline; default: "
                        "adamw, muon, muon-lr1e-2, adamw-wsd, schedule_free_adamw, lion, "
                        "adafactor, sgd)")
    o.add_argument("--seeds", default="1337,1338", help="comma-separated train.seed values")
    o.add_argument("--eval-every", type=int, default=50,
                   help="validation interval, the resolution of 'reaches baseline at'")
    o.add_argument("--out", help="also write the markdown table to this file")
    return p


def _optim(args) -> int:
    from tfpretrain.bench_optim import DEFAULT_VARIANTS, bench_optim, optim_table

    seeds = [int(x) for x in args.seeds.split(",") if x]
    base = args.overrides + [f"eval.every={args.eval_every}", "export.enabled=false"]
    result = bench_optim(args.config, base, args.variants or list(DEFAULT_VARIANTS), seeds,
                         log=lambda m: print(f"[tfpretrain] {m}", flush=True))
    return _emit(optim_table(result), result, args.out)


def _emit(table: str, result, out) -> int:
    """The table, also to ``--out`` when given, then the JSON line."""
    print(table)
    if out:
        Path(out).write_text(table + "\n")
    print(json.dumps(result))
    return 0


def _select_backend(backend: str) -> None:
    """KERAS_BACKEND before keras is imported; refuse a process where it already is."""
    import os

    if "keras" in sys.modules:
        import keras

        if keras.backend.backend() != backend:
            raise UserError(f"--backend {backend}: keras is already loaded with the "
                            f"{keras.backend.backend()} backend in this process")
    os.environ["KERAS_BACKEND"] = backend


def _fit(args) -> dict:
    from tfpretrain.config import load_config

    overrides = args.overrides + ([f"data.path={args.data}"] if args.data else [])
    cfg = load_config(args.config, overrides)
    if args.backend == "jax":
        return bench_fit_jax(cfg, args.steps, args.warmup, args.rows, guard=not args.no_guard)
    if args.rows or args.no_guard:  # the TF path reads the token cache, always guarded
        raise UserError(f"{'--rows' if args.rows else '--no-guard'} is for --backend jax; "
                        "the TensorFlow benchmark reads the config's token cache (give "
                        "--data or --set data.path=...)")
    return bench_fit(cfg, args.steps, args.warmup, plain=not args.no_plain)


def _gpu(args) -> int:
    shapes = [x for x in args.shapes.split(",") if x]
    unknown = [x for x in shapes if x not in GPU_SHAPES]
    if unknown:
        raise UserError(f"--shapes: unknown {unknown}; choose from {', '.join(GPU_SHAPES)}")
    results = bench_gpu(shapes, [x for x in args.precisions.split(",") if x],
                        [int(x) for x in args.batches.split(",") if x], args.steps, args.warmup)
    return _emit(gpu_table(results), results, args.out)


@cli_main
def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.what in ("fit", "gpu"):
        _select_backend("jax" if args.what == "gpu" else args.backend)
    quiet_tensorflow()
    if args.what == "gpu":
        return _gpu(args)
    if args.what == "optim":
        return _optim(args)
    if args.what == "data":
        from tfpretrain.config import load_config

        cfg = load_config(args.config, args.overrides)
        result = bench_data(cfg, args.mb, [k for k in args.kinds.split(",") if k],
                            args.read_batches, args.train_steps, args.cold_mb, args.config,
                            args.overrides)
    elif args.what == "synth":
        from tfpretrain.bench_synth import bench_synth

        result = bench_synth(args.count, args.dedup_count, args.planted)
    elif args.what == "generate":
        result = bench_generate(Path(args.run_dir), args.saved_model, args.new_tokens)
    else:
        result = _fit(args)
    for k, v in result.items():
        print(f"{k:>36}: {v}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
