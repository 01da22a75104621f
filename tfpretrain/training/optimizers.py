"""The optimizer (Keras's AdamW by default; Muon, Lion, Adafactor, schedule-free AdamW, SGD)
+ linear warmup + a decay schedule (cosine by default, as nanoGPT and litgpt set it; linear,
constant, inverse-sqrt or warmup-stable-decay)."""
from __future__ import annotations

import contextlib

import keras

from tfpretrain.config import Config, OptimizerConfig
from tfpretrain.models.guarded import GuardedOptimizer, innermost

# Short variable names (keras_hub): biases, LayerNorm gamma/beta, RMSNorm scale, and every
# embedding table (token, position, reverse) get no weight decay.
NO_DECAY = ["bias", "gamma", "beta", "scale", "embeddings"]


def build_schedule(cfg: OptimizerConfig, total_steps: int):
    """0 -> learning_rate over warmup_steps, then ``cfg.schedule`` (cosine: Keras's
    CosineDecay to min_learning_rate at total_steps; the others: :class:`WarmupDecay`)."""
    if cfg.resolved_schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0,
            decay_steps=max(1, total_steps - cfg.warmup_steps),
            alpha=cfg.min_learning_rate / cfg.learning_rate,
            warmup_target=cfg.learning_rate,
            warmup_steps=cfg.warmup_steps)
    return WarmupDecay(cfg.resolved_schedule, cfg.learning_rate, cfg.min_learning_rate,
                       cfg.warmup_steps, total_steps, cfg.decay_fraction, cfg.cooldown)


@keras.saving.register_keras_serializable(package="tfpretrain")
class WarmupDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup 0 -> peak over ``warmup`` steps, then ``kind``: ``linear`` (to
    ``minimum`` at ``total``), ``constant``, ``inverse_sqrt`` (peak * sqrt(warmup / step),
    floored at ``minimum``) or ``wsd`` (peak until the last ``decay_fraction`` of ``total``,
    then a ``linear`` or ``1-sqrt`` cooldown to ``minimum``). Step = optimizer steps done."""

    def __init__(self, kind: str, peak: float, minimum: float, warmup: int, total: int,
                 decay_fraction: float = 0.2, cooldown: str = "linear"):
        self.kind, self.peak, self.minimum = kind, float(peak), float(minimum)
        self.warmup, self.total = int(warmup), int(total)
        self.decay_fraction, self.cooldown = float(decay_fraction), cooldown

    def __call__(self, step):
        from keras import ops

        step = ops.cast(step, "float32")
        warm = self.peak * step / max(self.warmup, 1)
        return ops.where(step < self.warmup, warm, self._after_warmup(step))

    def _after_warmup(self, step):
        from keras import ops

        peak, low = self.peak, self.minimum
        if self.kind == "constant":
            return ops.full_like(step, peak)
        if self.kind == "inverse_sqrt":
            return ops.maximum(peak * ops.sqrt(max(self.warmup, 1) / ops.maximum(step, 1.0)),
                               low)
        if self.kind == "linear":
            start, length = self.warmup, self.total - self.warmup
        else:  # wsd: stable, then the cooldown over the last decay_fraction of the run
            length = max(1, round(self.decay_fraction * self.total))
            start = max(self.warmup, self.total - length)
        u = ops.clip((step - start) / max(self.total - start, 1), 0.0, 1.0)
        shape = ops.sqrt(u) if self.kind == "wsd" and self.cooldown == "1-sqrt" else u
        return peak + (low - peak) * shape

    def get_config(self):
        return {"kind": self.kind, "peak": self.peak, "minimum": self.minimum,
                "warmup": self.warmup, "total": self.total,
                "decay_fraction": self.decay_fraction, "cooldown": self.cooldown}


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


def build_optimizer(cfg: OptimizerConfig, total_steps: int, schedule=None):
    """``cfg.name``'s Keras optimizer on ``schedule`` (default: :func:`build_schedule`),
    wrapped in a :class:`ScaledSchedule` for rollbacks; no weight decay on NO_DECAY weights.
    Clipping and the guard are :func:`guard_optimizer`'s wrapper."""
    lr = ScaledSchedule(schedule or build_schedule(cfg, total_steps))
    opt = _constructors()[cfg.name](cfg, lr)
    opt.exclude_from_weight_decay(var_names=NO_DECAY)  # must precede opt.build()
    return opt


def guard_optimizer(cfg: Config, optimizer, guard: bool | None = None) -> GuardedOptimizer:
    """``optimizer`` behind the run's global-norm clipping (``optimizer.clipnorm``), stability
    guard (``train.guard``, ``spike_window``, ``spike_threshold``, ``rebaseline_after``) and
    moving average of the weights (``optimizer.ema``); ``guard`` overrides ``train.guard``."""
    t = cfg.train
    return GuardedOptimizer(optimizer, clipnorm=cfg.optimizer.clipnorm,
                            guard=t.guard if guard is None else guard,
                            spike_window=t.spike_window, spike_threshold=t.spike_threshold,
                            rebaseline_after=t.rebaseline_after, ema=cfg.optimizer.ema)


def _constructors() -> dict:
    """optimizer.name -> (cfg, learning rate) -> the Keras optimizer."""
    opt = keras.optimizers
    s = OptimizerConfig.setting
    wd = lambda c: c.weight_decay or None  # noqa: E731
    return {
        "adamw": lambda c, lr: opt.AdamW(lr, weight_decay=c.weight_decay, beta_1=s(c, "beta_1"),
                                         beta_2=s(c, "beta_2"), epsilon=s(c, "epsilon")),
        "muon": _muon,
        "lion": lambda c, lr: opt.Lion(lr, beta_1=s(c, "beta_1"), beta_2=s(c, "beta_2"),
                                       weight_decay=wd(c)),
        "adafactor": lambda c, lr: opt.Adafactor(lr, weight_decay=wd(c)),
        "schedule_free_adamw": lambda c, lr: ScheduleFreeAdamW(
            lr, beta_1=s(c, "beta_1"), beta_2=s(c, "beta_2"), epsilon=s(c, "epsilon"),
            decay=c.weight_decay),
        "sgd": lambda c, lr: opt.SGD(lr, momentum=s(c, "momentum"),
                                     nesterov=s(c, "nesterov"), weight_decay=wd(c)),
    }


def _muon(cfg: OptimizerConfig, lr):
    """Muon on the hidden weight matrices (attention and MLP kernels), AdamW (Keras's Muon
    keeps one) on embeddings, the (tied or reverse-embedding) output head, norms and biases;
    the matrices' peak rate is muon_learning_rate on the same schedule."""
    from tfpretrain.compat import muon

    s = cfg.setting
    scale = (s("muon_learning_rate") or cfg.learning_rate) / cfg.learning_rate
    return muon(muon_scale=scale, learning_rate=lr, adam_beta_1=s("beta_1"),
                adam_beta_2=s("beta_2"), epsilon=s("epsilon"), weight_decay=cfg.weight_decay,
                adam_weight_decay=cfg.weight_decay, momentum=s("momentum"),
                nesterov=s("nesterov"), ns_steps=s("ns_steps"), exclude_embeddings=True,
                adam_lr_ratio=1.0)


@keras.saving.register_keras_serializable(package="tfpretrain")
class ScheduleFreeAdamW(keras.optimizers.Optimizer):
    """Schedule-free AdamW (Defazio et al. 2024) as its reference implementation does it
    (facebookresearch/schedule_free, ``AdamWScheduleFree``). The weights hold y, the point
    gradients are taken at; z is the base sequence; the average x is what to evaluate, with
    y = (1 - beta_1) z + beta_1 x. Each step: v = beta_2 v + (1 - beta_2) g^2,
    u = g / (sqrt(v / bc2) + eps) + decay * y, y <- y + c (z - y) + lr (beta_1 (1 - c) - 1) u,
    z <- z - lr u, with averaging weight c_t = lr_max_t^2 / sum_i lr_max_i^2 (the largest
    rate so far, squared: warmup steps count little).

    Why not ``keras.optimizers.ScheduleFreeAdamW``: it averages uniformly (c_t = 1/t), so
    the warmup's first iterates weigh as much as the last; on the default config its x
    ended at val loss 2.97 against AdamW's 1.02 (docs/benchmarks.md). Weight decay is taken
    at y through u, as in the reference, skipping NO_DECAY weights."""

    def __init__(self, learning_rate, beta_1=0.9, beta_2=0.999, epsilon=1e-8, decay=0.0,
                 weight_lr_power=2.0, name="schedule_free_adamw", **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.beta_1, self.beta_2, self.epsilon = beta_1, beta_2, epsilon
        self.decay, self.weight_lr_power = decay, weight_lr_power
        self.no_decay = []

    def exclude_from_weight_decay(self, var_list=None, var_names=None):
        super().exclude_from_weight_decay(var_list, var_names)
        self.no_decay = list(var_names or [])

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self.z, self.v = self.add_optimizer_variables(var_list, ["z", "exp_avg_sq"])
        for z, variable in zip(self.z, var_list):
            self.assign(z, variable)
        self.lr_max = self.add_variable((), name="lr_max", aggregation="only_first_replica")
        self.weight_sum = self.add_variable((), name="weight_sum",
                                            aggregation="only_first_replica")

    def apply(self, grads, trainable_variables=None):
        """The step's averaging weight, then the per-variable updates."""
        if not self.built:
            self.build(trainable_variables)
            self.built = True
        from keras import ops

        lr_max = ops.maximum(self.lr_max, ops.cast(self.learning_rate, "float32"))
        weight = ops.power(lr_max, self.weight_lr_power)
        self.lr_max.assign(lr_max)
        self.weight_sum.assign(self.weight_sum + weight)
        self._c = ops.where(self.weight_sum > 0, weight / self.weight_sum, 0.0)
        return super().apply(grads, trainable_variables)

    def update_step(self, gradient, variable, learning_rate):
        from keras import ops

        from tfpretrain.compat import slot

        lr = ops.cast(learning_rate, variable.dtype)
        g = ops.cast(gradient, variable.dtype)
        z, v = slot(self, self.z, variable), slot(self, self.v, variable)
        bc2 = 1 - ops.power(ops.cast(self.beta_2, variable.dtype),
                            ops.cast(self.iterations + 1, variable.dtype))
        self.assign(v, self.beta_2 * v + (1 - self.beta_2) * ops.square(g))
        u = g / (ops.sqrt(v / bc2) + self.epsilon)
        if self.decay and not any(name in variable.name for name in self.no_decay):
            u = u + self.decay * variable
        c = ops.cast(self._c, variable.dtype)
        self.assign(variable, variable + c * (z - variable)
                    + lr * (self.beta_1 * (1 - c) - 1) * u)
        self.assign_sub(z, lr * u)

    def average(self, variable):
        """x = (y - (1 - beta_1) z) / beta_1: the weights to evaluate."""
        from tfpretrain.compat import slot

        z = slot(self, self.z, variable)
        return (variable - (1 - self.beta_1) * z) / self.beta_1

    def get_config(self):
        return {**super().get_config(), "beta_1": self.beta_1, "beta_2": self.beta_2,
                "epsilon": self.epsilon, "decay": self.decay,
                "weight_lr_power": self.weight_lr_power}


def is_schedule_free(optimizer) -> bool:
    return isinstance(innermost(optimizer), ScheduleFreeAdamW)


def has_evaluation_weights(optimizer) -> bool:
    """Whether the weights to evaluate are not the trained ones: an average kept by
    schedule-free AdamW or by the guard wrapper's EMA (``optimizer.ema``)."""
    return optimizer is not None and (is_schedule_free(optimizer)
                                      or bool(getattr(optimizer, "ema", 0.0)))


def to_evaluation_weights(model):
    """Give the model the weights to evaluate, sample and export: schedule-free AdamW's
    average x, not the point y it trains at (Defazio et al.), or the EMA of the weights
    (``optimizer.ema``); returns the trained values to put back (None: no average, nothing
    changed)."""
    optimizer = getattr(model, "optimizer", None)
    if not has_evaluation_weights(optimizer):
        return None
    inner = innermost(optimizer)
    variables = list(model.trainable_variables)
    averages = ([inner.average(v) for v in variables] if is_schedule_free(inner)
                else optimizer.averages)
    kept = [v.numpy() for v in variables]
    for v, average in zip(variables, averages):
        v.assign(average)
    return kept


@contextlib.contextmanager
def evaluation_weights(model):
    """Inside, the model holds :func:`to_evaluation_weights`; the training weights are put
    back bit for bit on exit, so training and checkpoints go on unchanged."""
    kept = to_evaluation_weights(model)
    try:
        yield model
    finally:
        if kept is not None:
            for v, value in zip(model.trainable_variables, kept):
                v.assign(value)
