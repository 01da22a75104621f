"""The train step on Keras's JAX backend: the same loss (mean over real tokens, z-loss,
sample weights), gradient accumulation, global-norm clipping, stability guard and optimizer
as ``models.lm.CausalLM.train_step``, as one pure function compiled by XLA through JAX.

It imports no TensorFlow: it runs where only ``keras``, ``keras_hub`` and ``jax`` are
installed (the GPU machines this project measures on). The math is ``models.stability``
(keras.ops), shared with the TensorFlow step; the optimizer is Keras's, applied with
``stateless_apply``. A skipped step keeps the weights and optimizer moments and advances
only the step counter, as on TensorFlow.
"""
from __future__ import annotations

from dataclasses import dataclass

from tfpretrain.config import Config
from tfpretrain.models import stability


@dataclass(frozen=True)
class StepSettings:
    clipnorm: float | None
    z_loss: float
    accumulation: int
    guard: bool
    spike_window: int
    spike_threshold: float
    rebaseline_after: int

    @classmethod
    def from_config(cls, cfg: Config, guard: bool | None = None) -> "StepSettings":
        t = cfg.train
        return cls(cfg.optimizer.clipnorm or None, cfg.model.z_loss, t.grad_accumulation_steps,
                   t.guard if guard is None else guard, t.spike_window, t.spike_threshold,
                   t.rebaseline_after)


class StatelessTrainer:
    """``state = trainer.initial_state()``; ``state, logs = trainer.step(state, x, y, w)``;
    ``trainer.write_back(state)`` puts the weights back into the Keras variables."""

    def __init__(self, model, optimizer, settings: StepSettings):
        import jax

        optimizer.build(model.trainable_variables)
        self.model, self.optimizer, self.s = model, optimizer, settings
        self.iterations_index = next(i for i, v in enumerate(optimizer.variables)
                                     if v is optimizer.iterations)
        self.step = jax.jit(self._step, donate_argnums=0)

    def initial_state(self):
        import jax.numpy as jnp

        guard = {"history": jnp.zeros((self.s.spike_window, 2), "float32"),
                 "accepted": jnp.zeros((), "int32"), "consecutive": jnp.zeros((), "int32"),
                 "skipped": jnp.zeros((), "int32")}
        # copies: the compiled step donates its input state, which must not be the
        # Keras variables' own buffers
        copy = lambda variables: [jnp.array(v.value, copy=True) for v in variables]  # noqa
        return (copy(self.model.trainable_variables), copy(self.model.non_trainable_variables),
                copy(self.optimizer.variables), guard)

    def write_back(self, state) -> None:
        tv, ntv, ov, _ = state
        for variables, values in ((self.model.trainable_variables, tv),
                                  (self.model.non_trainable_variables, ntv),
                                  (self.optimizer.variables, ov)):
            for var, value in zip(variables, values):
                var.assign(value)

    # -- the compiled step -----------------------------------------------------------------
    def _loss(self, tv, ntv, x, y, w, total):
        logits, ntv = self.model.stateless_call(tv, ntv, x, training=True)
        loss = stability.weighted_share(stability.token_losses(y, logits), w, total)
        objective = loss
        if self.s.z_loss:
            objective = loss + self.s.z_loss * stability.weighted_share(
                stability.z_values(logits), w, total)
        return objective, (loss, ntv)

    def _gradients(self, tv, ntv, x, y, w):
        """Loss and gradient of the whole batch, summed over its micro-batches."""
        import jax
        import jax.numpy as jnp

        k = self.s.accumulation
        total = jnp.sum(w.astype("float32"))
        size = y.shape[0] // k
        grad_fn = jax.value_and_grad(self._loss, has_aux=True)
        loss, grads = jnp.zeros((), "float32"), None
        for i in range(k):
            part = slice(i * size, (i + 1) * size)
            (_, (part_loss, ntv)), part_grads = grad_fn(tv, ntv, x[part], y[part], w[part],
                                                        total)
            loss = loss + part_loss
            grads = part_grads if grads is None else jax.tree_util.tree_map(
                jnp.add, grads, part_grads)
        return loss, grads, ntv

    def _step(self, state, x, y, w):
        import jax
        import jax.numpy as jnp

        tv, ntv, ov, g = state
        loss, grads, ntv = self._gradients(tv, ntv, x, y, w)
        norm = stability.global_norm(grads)
        if self.s.clipnorm:
            grads = stability.clip_by_global_norm(grads, self.s.clipnorm, norm)
        s = self.s
        spike = (stability.is_spike(g["history"], g["accepted"], loss, norm, s.spike_window,
                                    s.spike_threshold)
                 if s.guard and s.spike_threshold > 0 else jnp.asarray(False))
        finite, accept, rebaseline = stability.decide(
            loss, norm, spike, g["consecutive"], s.rebaseline_after if s.guard else 0)
        if not s.guard:
            accept = jnp.asarray(True)
        new_tv, new_ov = self.optimizer.stateless_apply(ov, grads, tv)
        kept_ov = list(ov)  # a skipped step: moments unchanged, the counter advances
        kept_ov[self.iterations_index] = ov[self.iterations_index] + 1
        pick = lambda new, old: jnp.where(accept, new, old)  # noqa: E731
        tv = jax.tree_util.tree_map(pick, new_tv, tv)
        ov = jax.tree_util.tree_map(pick, list(new_ov), kept_ov)
        g = self._guard_update(g, accept, rebaseline, loss, norm)
        logs = {"loss": loss, "grad_norm": norm, "skipped": jnp.logical_not(accept)}
        return (tv, ntv, ov, g), logs

    def _guard_update(self, g, accept, rebaseline, loss, norm):
        import jax.numpy as jnp

        accepted = jnp.where(rebaseline, 0, g["accepted"])
        row = accepted % self.s.spike_window
        history = jnp.where(accept, g["history"].at[row].set(jnp.stack([loss, norm])),
                            g["history"])
        return {"history": history, "accepted": jnp.where(accept, accepted + 1, accepted),
                "consecutive": jnp.where(accept, 0, g["consecutive"] + 1),
                "skipped": g["skipped"] + jnp.where(accept, 0, 1)}
