"""TensorFlow set-up and the one build-and-compile recipe every trainer of a model uses
(fit, load_run, bench)."""
from __future__ import annotations

import os

from tfpretrain.config import Config
from tfpretrain.errors import UserError


def configure_tensorflow(cfg: Config) -> None:
    import tensorflow as tf

    from tfpretrain.training.distribute import split_cpu

    split_cpu(cfg.train.logical_cpu_devices)
    try:
        if cfg.train.threads:
            tf.config.threading.set_intra_op_parallelism_threads(cfg.train.threads)
        if (os.cpu_count() or 1) <= 4 and _step_is_compiled(cfg):
            tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        pass  # TF already initialized in this process (tests, notebooks): keep its settings


def _step_is_compiled(cfg: Config) -> bool:
    """Whether the run's step will be XLA-compiled (judged before the tokenizer exists, with
    the vocabulary asked for). On two cores such a step runs best with one inter-op thread
    (bimodal step times otherwise; char recipe 1.05-1.10x), a step TensorFlow runs op by op
    (bf16 on a CPU) with its default two, which overlap independent ops (1.02-1.07x at
    10.7M parameters; docs/benchmarks.md)."""
    return jit_compile(cfg, resolve_precision(cfg, cfg.tokenizer.vocabulary_size))


def choose_steps_per_execution(cfg: Config, distributed: bool = False) -> int:
    """The largest n <= 16 dividing every step count at which something must happen (so
    eval.every 250 runs 10 steps per call, not 2); 1 under a tf.distribute strategy (the
    guard's cross-replica cond cannot sit inside Keras's multi-step while loop: TensorFlow
    fails with an unfed placeholder)."""
    if distributed:
        return 1
    if cfg.train.steps_per_execution:
        return cfg.train.steps_per_execution
    marks = (cfg.eval.every, cfg.train.steps, cfg.train.checkpoint_every or cfg.eval.every)
    return next(n for n in range(16, 0, -1) if all(m % n == 0 for m in marks))


def jit_compile(cfg: Config, precision: str = "float32", distributed: bool = False) -> bool:
    """``train.jit_compile``; unset = XLA on, except for bfloat16 on a CPU, where oneDNN's
    bf16 matmuls without XLA measured 1.6x faster than with it (docs/benchmarks.md), and
    under a tf.distribute strategy (Keras's own default there; on GPUs it may be turned on
    explicitly). XLA cannot compile a distributed step on CPUs (MirroredStrategy: a
    variable on another logical device; MultiWorker: "Collectives are not yet implemented
    for CPU devices when compiling with XLA"): asking for it there is refused."""
    if distributed and cfg.train.jit_compile and not _accelerators():
        raise UserError("`train.jit_compile: true` under a strategy needs GPUs or TPUs: "
                        "TensorFlow's XLA cannot compile collectives on CPU devices "
                        "(docs/distributed.md). Leave train.jit_compile unset")
    if cfg.train.jit_compile is not None:
        return cfg.train.jit_compile
    if distributed:
        return False
    return not (precision == "mixed_bfloat16" and not _accelerators())


def _accelerators() -> bool:
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU") or tf.config.list_physical_devices("TPU"))


def estimated_params(cfg: Config, vocabulary_size: int) -> int:
    """Parameters without building anything: embeddings (twice when untied), positions and
    per layer attention (4 H^2) and feed-forward (2 or 3 H I)."""
    from tfpretrain.models.registry import get_arch

    m = cfg.model
    arch = get_arch(m.arch)
    tables = vocabulary_size * m.hidden_dim * (1 if m.tie_embeddings else 2)
    ffn = arch.ffn_matrices * m.hidden_dim * m.intermediate_dim
    kv = (m.num_key_value_heads or m.num_heads) / m.num_heads  # grouped-query attention
    attention = int((2 + 2 * kv) * m.hidden_dim ** 2)
    positions = m.sequence_length * m.hidden_dim if arch.learned_positions else 0
    return tables + positions + m.num_layers * (attention + ffn)


def check_memory(cfg: Config, vocabulary_size: int) -> None:
    """Refuse, before building anything, a config whose training state alone (float32
    weights, gradients, two Adam moments: 16 bytes a parameter, plus the logits of one
    batch and their gradient) cannot fit this machine's memory."""
    params = estimated_params(cfg, vocabulary_size)
    logits = cfg.train.batch_size * cfg.model.sequence_length * vocabulary_size
    need = 16 * params + 8 * logits
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if need > have:
        raise UserError(
            f"this config needs about {need / 2**30:,.1f} GiB to train (~{params:,} parameters "
            f"x 16 bytes for weights, gradients and Adam moments, plus logits of "
            f"{cfg.train.batch_size} x {cfg.model.sequence_length} x {vocabulary_size:,}), "
            f"more than this machine's {have / 2**30:,.1f} GiB. Lower "
            "`tokenizer.vocabulary_size`, `model.hidden_dim`, `model.num_layers` or "
            "`train.batch_size`")


# On a CPU with native bf16 (AVX512-BF16/AMX), bf16 without XLA beat float32 with XLA by
# 1.57x at 292 GFLOPs per step (10.7M parameters, 4096 tokens) and tied at 29 GFLOPs (the
# quickstart): below this much work per step, float32 keeps its exact numerics.
BF16_CPU_MIN_STEP_FLOPS = 1e11


def resolve_precision(cfg: Config, vocabulary_size: int | None = None) -> str:
    """``train.precision``, with ``auto`` resolved for this machine: mixed_bfloat16 on a
    TPU or a GPU with bf16 (Ampere and newer), mixed_float16 on older GPUs; on a CPU,
    mixed_bfloat16 when it has native bf16 and a step is at least
    BF16_CPU_MIN_STEP_FLOPS of model FLOPs, else float32."""
    if cfg.train.precision != "auto":
        return cfg.train.precision
    import tensorflow as tf

    from tfpretrain.hardware import cpu_has_bf16, gpu_supports_bf16

    if gpu_supports_bf16():
        return "mixed_bfloat16"
    if tf.config.list_physical_devices("GPU"):
        return "mixed_float16"
    if vocabulary_size and cpu_has_bf16() and step_flops(cfg, vocabulary_size) >= \
            BF16_CPU_MIN_STEP_FLOPS:
        return "mixed_bfloat16"
    return "float32"


def step_flops(cfg: Config, vocabulary_size: int) -> float:
    """Model FLOPs of one optimizer step (estimated parameters, no model built)."""
    from tfpretrain.models.registry import flops_per_token

    per_token = flops_per_token(cfg.model, estimated_params(cfg, vocabulary_size),
                                vocabulary_size)
    return float(per_token) * cfg.train.batch_size * cfg.model.sequence_length


def build_and_compile(cfg: Config, vocabulary_size: int, steps_per_execution: int = 1,
                      jit: bool | None = None, precision: str | None = None, schedule=None,
                      distributed: bool = False):
    """The run's model compiled with its optimizer, explicitly (never keras_hub's
    fine-tuning defaults); the optimizer is built, so its variables exist for checkpoints.
    ``precision``: a Keras dtype policy name (default: ``resolve_precision(cfg)``);
    mixed_float16 wraps the optimizer in Keras's LossScaleOptimizer; clipping and the
    stability guard wrap it in a GuardedOptimizer. ``schedule``: a
    learning-rate schedule instead of the config's (the range test's sweep)."""
    import keras

    from tfpretrain.compat import gradients_arrive_summed
    from tfpretrain.models.guarded import innermost
    from tfpretrain.objectives import build_model
    from tfpretrain.training.optimizers import build_optimizer, guard_optimizer

    check_memory(cfg, vocabulary_size)
    precision = precision or resolve_precision(cfg, vocabulary_size)
    model = build_model(cfg, vocabulary_size, steps_per_execution, precision)
    optimizer = build_optimizer(cfg.optimizer, cfg.train.steps, schedule)
    if precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    optimizer = guard_optimizer(cfg, optimizer)
    gradients_arrive_summed(innermost(optimizer))  # over replicas, by the train step
    optimizer.build(model.trainable_variables)
    model.compile(optimizer=optimizer,
                  jit_compile=jit_compile(cfg, precision, distributed) if jit is None else jit,
                  steps_per_execution=steps_per_execution)
    return model


class _Vocabulary:
    """What a batcher needs of a tokenizer, for timing runs on random ids."""

    def __init__(self, vocabulary_size: int):
        self.vocabulary_size = vocabulary_size

    def word_starts(self):
        return None


def measure_tokens_per_second(cfg: Config, steps: int = 32, warmup: int = 16) -> float:
    """Training tokens/s of the config's model and train step on this machine (random ids
    of ``tokenizer.vocabulary_size``, the run's precision, XLA and steps_per_execution),
    after ``warmup`` steps of compilation."""
    import numpy as np

    from tfpretrain.data.pipeline import train_dataset
    from tfpretrain.objectives import get_objective, row_format

    configure_tensorflow(cfg)
    vocab, batch = cfg.tokenizer.vocabulary_size, cfg.train.batch_size
    spe = min(choose_steps_per_execution(cfg), warmup, steps)
    model = build_and_compile(cfg, vocab, spe)
    rows = np.random.default_rng(0).integers(
        4, vocab, size=(max(4 * batch, 64), row_format(cfg).width), dtype=np.int32)
    batcher = get_objective(cfg).batcher(cfg, _Vocabulary(vocab))
    ds = train_dataset(rows, batch, cfg.train.seed, to_batch=batcher)
    n = max(spe, steps // spe * spe)
    seconds = timed_fit(model, ds, n, max(spe, warmup // spe * spe))
    return n * batch * cfg.model.sequence_length / seconds


def timed_fit(model, ds, steps: int, warmup: int) -> float:
    """Seconds of ``steps`` steps of one model.fit call, after its first ``warmup`` steps
    (tracing, XLA compilation): timed between batch ends inside the same fit, so no second
    fit() call can slip a retrace into the measurement."""
    import time

    import keras

    marks = []

    class Clock(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            marks.append((int(self.model.optimizer.iterations.numpy()), time.perf_counter()))

    model.fit(ds, steps_per_epoch=warmup + steps, epochs=1, verbose=0, shuffle=False,
              callbacks=[Clock()])
    (start_step, t0) = next((step, t) for step, t in marks if step >= warmup)
    end_step, end = marks[-1]
    return (end - t0) * steps / max(end_step - start_step, 1)
