"""TensorFlow set-up and the one build-and-compile recipe every trainer of a model uses
(fit, load_run, bench)."""
from __future__ import annotations

import os

from tfpretrain.config import Config
from tfpretrain.errors import UserError


def configure_tensorflow(cfg: Config) -> None:
    import tensorflow as tf

    try:
        if cfg.train.threads:
            tf.config.threading.set_intra_op_parallelism_threads(cfg.train.threads)
        # Two cores: one inter-op thread avoids the bimodal step times seen on this CPU.
        if (os.cpu_count() or 1) <= 4:
            tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        pass  # TF already initialized in this process (tests, notebooks): keep its settings


def choose_steps_per_execution(cfg: Config) -> int:
    """Largest of 16..1 dividing every step count at which something must happen."""
    if cfg.train.steps_per_execution:
        return cfg.train.steps_per_execution
    marks = (cfg.eval.every, cfg.train.steps, cfg.train.checkpoint_every or cfg.eval.every)
    for n in (16, 8, 4, 2, 1):
        if all(m % n == 0 for m in marks):
            return n
    return 1


def jit_compile(cfg: Config) -> bool:
    """``train.jit_compile``, unset = XLA on (measured faster on CPU; keras' "auto" is off
    on CPU)."""
    return cfg.train.jit_compile if cfg.train.jit_compile is not None else True


def estimated_params(cfg: Config, vocabulary_size: int) -> int:
    """Parameters without building anything: embeddings (twice when untied), positions and
    per layer attention (4 H^2) and feed-forward (2 or 3 H I)."""
    from tfpretrain.models.registry import get_arch

    m = cfg.model
    tables = vocabulary_size * m.hidden_dim * (1 if m.tie_embeddings else 2)
    ffn = get_arch(m.arch).ffn_matrices * m.hidden_dim * m.intermediate_dim
    return tables + m.sequence_length * m.hidden_dim + m.num_layers * (
        4 * m.hidden_dim ** 2 + ffn)


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


def build_and_compile(cfg: Config, vocabulary_size: int, steps_per_execution: int = 1,
                      jit: bool | None = None):
    """The run's model compiled with its optimizer, explicitly (never keras_hub's
    fine-tuning defaults); the optimizer is built, so its variables exist for checkpoints."""
    from tfpretrain.objectives import build_model
    from tfpretrain.training.optimizers import build_optimizer

    check_memory(cfg, vocabulary_size)
    model = build_model(cfg, vocabulary_size, steps_per_execution)
    optimizer = build_optimizer(cfg.optimizer, cfg.train.steps)
    optimizer.build(model.trainable_variables)
    model.compile(optimizer=optimizer, jit_compile=jit_compile(cfg) if jit is None else jit,
                  steps_per_execution=steps_per_execution)
    return model
