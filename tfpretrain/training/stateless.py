"""The train step on Keras's JAX backend: the same loss (mean over real tokens, z-loss,
sample weights) and gradient accumulation as ``models.lm.CausalLM.train_step``, and the
same optimizer behind the same clipping and stability guard
(:class:`~tfpretrain.models.guarded.GuardedOptimizer`, through its ``stateless_apply``), as
one pure function compiled by XLA through JAX.

It imports no TensorFlow: it runs where only ``keras``, ``keras_hub`` and ``jax`` are
installed (the GPU machines this project measures on). A skipped step keeps the weights and
optimizer moments and advances only the step counter, as on TensorFlow.
"""
from __future__ import annotations

from tfpretrain.config import Config
from tfpretrain.models import stability


class StatelessTrainer:
    """``state = trainer.initial_state()``; ``state, logs = trainer.step(state, x, y, w)``;
    ``trainer.write_back(state)`` puts the weights back into the Keras variables."""

    def __init__(self, model, optimizer, z_loss: float = 0.0, accumulation: int = 1):
        import jax

        optimizer.build(model.trainable_variables)
        self.model, self.optimizer = model, optimizer
        self.z_loss, self.accumulation = z_loss, max(1, accumulation)
        self.skipped_index = next(i for i, v in enumerate(optimizer.variables)
                                  if v is optimizer.skipped_steps)
        self.step = jax.jit(self._step, donate_argnums=0)

    @classmethod
    def from_config(cls, model, cfg: Config, guard: bool | None = None) -> "StatelessTrainer":
        """The run's optimizer, schedule, clipping and guard (``guard`` overrides
        ``train.guard``), z-loss and accumulation."""
        from tfpretrain.training.optimizers import build_optimizer, guard_optimizer

        optimizer = guard_optimizer(cfg, build_optimizer(cfg.optimizer, cfg.train.steps),
                                    guard)
        return cls(model, optimizer, cfg.model.z_loss, cfg.train.grad_accumulation_steps)

    def initial_state(self):
        import jax.numpy as jnp

        # copies: the compiled step donates its input state, which must not be the
        # Keras variables' own buffers
        copy = lambda variables: [jnp.array(v.value, copy=True) for v in variables]  # noqa
        return (copy(self.model.trainable_variables), copy(self.model.non_trainable_variables),
                copy(self.optimizer.variables))

    def skipped(self, state) -> int:
        """How many steps the guard has skipped, in ``state``."""
        return int(state[2][self.skipped_index])

    def write_back(self, state) -> None:
        for variables, values in zip((self.model.trainable_variables,
                                      self.model.non_trainable_variables,
                                      self.optimizer.variables), state):
            for var, value in zip(variables, values):
                var.assign(value)

    # -- the compiled step -----------------------------------------------------------------
    def _loss(self, tv, ntv, x, y, w, total):
        logits, ntv = self.model.stateless_call(tv, ntv, x, training=True)
        loss = stability.weighted_share(stability.token_losses(y, logits), w, total)
        objective = loss
        if self.z_loss:
            objective = loss + self.z_loss * stability.weighted_share(
                stability.z_values(logits), w, total)
        return objective, (loss, ntv)

    def _gradients(self, tv, ntv, x, y, w):
        """Loss and gradient of the whole batch, summed over its micro-batches."""
        import jax
        import jax.numpy as jnp

        k = self.accumulation
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
        tv, ntv, ov = state
        loss, grads, ntv = self._gradients(tv, ntv, x, y, w)
        tv, ov, norm, skipped = self.optimizer.stateless_apply(ov, grads, tv, loss=loss)
        return (tv, ntv, ov), {"loss": loss, "grad_norm": norm, "skipped": skipped > 0}
