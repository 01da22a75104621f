"""AdamW + linear warmup + cosine decay, as pretraining recipes (nanoGPT, litgpt) set it."""
from __future__ import annotations

import keras

from tfpretrain.config import OptimizerConfig

# Short variable names (keras_hub): biases, LayerNorm gamma/beta, RMSNorm scale, and every
# embedding table (token, position, reverse) get no weight decay.
NO_DECAY = ["bias", "gamma", "beta", "scale", "embeddings"]


def build_schedule(cfg: OptimizerConfig, total_steps: int):
    """0 -> learning_rate over warmup_steps, then cosine to min_learning_rate at total_steps."""
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0,
        decay_steps=max(1, total_steps - cfg.warmup_steps),
        alpha=cfg.min_learning_rate / cfg.learning_rate,
        warmup_target=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps)


class ScaledSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """``base(step) * scale``; ``scale`` is lowered at each rollback (PaLM-style)."""

    def __init__(self, base, scale: float = 1.0):
        self.base = base
        self.scale = keras.Variable(scale, trainable=False, dtype="float32", name="lr_scale")

    def __call__(self, step):
        return self.base(step) * self.scale

    def get_config(self):
        return {"base": keras.optimizers.schedules.serialize(self.base),
                "scale": float(self.scale.numpy())}


def build_optimizer(cfg: OptimizerConfig, total_steps: int) -> keras.optimizers.AdamW:
    """Clipping is done by the model's train_step on the global norm it also logs."""
    opt = keras.optimizers.AdamW(
        learning_rate=ScaledSchedule(build_schedule(cfg, total_steps)),
        weight_decay=cfg.weight_decay,
        beta_1=cfg.beta_1, beta_2=cfg.beta_2, epsilon=cfg.epsilon)
    opt.exclude_from_weight_decay(var_names=NO_DECAY)  # must precede opt.build()
    return opt
