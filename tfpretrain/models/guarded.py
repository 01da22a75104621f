"""The stability guard as an optimizer wrapper: global-norm clipping, and an update skipped
inside ``apply`` when the step's loss or gradient norm is not finite or spikes - the way
Keras's ``LossScaleOptimizer`` skips a non-finite step. The train step of any backend hands
it the gradients and the loss; which update happens is this wrapper's decision alone.

A skipped step keeps the weights and optimizer moments as they were and advances only the
step counter (so the learning-rate schedule and the data position stay aligned). A spike is
a loss or norm above mean + k*std of the last ``spike_window`` accepted steps; a finite
spike that would make ``rebaseline_after`` skips in a row is a new level, not an outlier:
it is accepted and the window starts again (OLMo / PaLM practice: skip rare outliers,
accept a sustained shift).

The guard's state (window, counters) is optimizer state: checkpointed with the optimizer,
never part of the model's weights or exports. So is the optional exponential moving average
of the weights (``ema``): updated after each applied step, never after a skipped one, with
the momentum warmed up as TensorFlow's ``ExponentialMovingAverage(num_updates=...)`` does
it, min(ema, (1 + n) / (10 + n)) at step n, so that the starting weights are forgotten
within the first steps whatever ``ema`` is. Written in ``keras.ops``: the stateful
``apply`` is what the TensorFlow train step calls (under a tf.distribute strategy its
apply-or-skip runs in cross-replica context, as Keras's LossScaleOptimizer does it), and
``stateless_apply`` is the same decision as one pure function for the JAX backend.
"""
from __future__ import annotations

import keras
from keras import ops

from tfpretrain import compat
from tfpretrain.models import stability

COUNTERS = ("guard_accepted", "skipped_steps", "clipped_steps", "consecutive_skips")


def innermost(optimizer):
    """The Keras optimizer that does the update, under any wrappers (guard, loss scaling)."""
    while hasattr(optimizer, "inner_optimizer"):
        optimizer = optimizer.inner_optimizer
    return optimizer


class GuardedOptimizer(keras.optimizers.Optimizer):
    """``inner_optimizer`` behind clipping and the stability guard.

    ``apply(grads, variables, loss=...)`` returns ``(grad_norm, skipped)`` of the step (the
    norm before clipping; ``skipped`` 1.0 or 0.0). With ``guard=False`` every step is
    applied (only clipping and the counters remain). An inner LossScaleOptimizer
    (mixed_float16) gets scaled gradients as it expects; the guard sees them unscaled, and a
    non-finite step also halves the loss scale. ``ema`` > 0: ``averages`` holds the moving
    average of the weights (see the module's docstring)."""

    def __init__(self, inner_optimizer, clipnorm: float | None = None, guard: bool = True,
                 spike_window: int = 100, spike_threshold: float = 6.0,
                 rebaseline_after: int = 0, ema: float = 0.0, name: str = "guarded"):
        super().__init__(learning_rate=0.0, name=name)
        self.inner_optimizer = inner_optimizer
        self.clipnorm_value = clipnorm or None
        self.guard, self.spike_window = guard, spike_window
        self.spike_threshold, self.rebaseline_after = spike_threshold, rebaseline_after
        self.ema, self.averages = float(ema), []

    def build(self, var_list):
        state = dict(initializer="zeros", aggregation="only_first_replica")
        self.guard_history = self.add_variable((self.spike_window, 2), dtype="float32",
                                               name="guard_history", **state)
        for name in COUNTERS:
            setattr(self, name, self.add_variable((), dtype="int32", name=name, **state))
        if self.ema:  # starting at the weights as they are
            self.averages = [self.add_variable_from_reference(v, "ema") for v in var_list]
            for average, v in zip(self.averages, var_list):
                average.assign(v)
        self.inner_optimizer.build(var_list)
        super().build(var_list)

    # --- the wrapped optimizer's face -------------------------------------------------
    @property
    def variables(self):
        return super().variables + self.inner_optimizer.variables

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

    def scale_loss(self, loss):
        return self.inner_optimizer.scale_loss(loss)

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)

    @property
    def loss_scaled(self) -> bool:
        return isinstance(self.inner_optimizer, keras.optimizers.LossScaleOptimizer)

    # --- the decision ---------------------------------------------------------------------
    def _prepare(self, grads, loss):
        """(clipped unscaled grads, loss, norm, finite, accept, rebaseline); counts a clip."""
        if self.loss_scaled:
            scale = self.inner_optimizer.dynamic_scale
            grads = [g / ops.cast(scale, g.dtype) for g in grads]
        loss = ops.zeros((), "float32") if loss is None else ops.cast(loss, "float32")
        norm = stability.global_norm(grads)
        if self.clipnorm_value:
            grads = stability.clip_by_global_norm(grads, self.clipnorm_value, norm)
            self.clipped_steps.assign_add(ops.cast(norm > self.clipnorm_value, "int32"))
        spike = ops.convert_to_tensor(False)
        if self.guard and self.spike_threshold > 0:
            spike = stability.is_spike(self.guard_history.value, self.guard_accepted.value,
                                       loss, norm,
                                       self.spike_window, self.spike_threshold)
        finite, accept, rebaseline = stability.decide(
            loss, norm, spike, self.consecutive_skips.value,
            self.rebaseline_after if self.guard else 0)
        if not self.guard:
            accept = ops.convert_to_tensor(True)
        return grads, loss, norm, finite, accept, rebaseline

    def _record(self, accept, rebaseline, loss, norm):
        """An accepted step joins the window (a rebaseline empties it first); a skipped one
        is counted."""
        accepted = ops.where(rebaseline, 0, self.guard_accepted.value)
        row = ops.expand_dims(ops.arange(self.spike_window) == accepted % self.spike_window, 1)
        self.guard_history.assign(ops.where(ops.logical_and(accept, row),
                                            ops.expand_dims(ops.stack([loss, norm]), 0),
                                            self.guard_history.value))
        self.guard_accepted.assign(ops.where(accept, accepted + 1, accepted))
        self.consecutive_skips.assign(ops.where(accept, 0, self.consecutive_skips.value + 1))
        self.skipped_steps.assign_add(ops.where(accept, 0, 1))

    # --- stateful (the TensorFlow train step) -----------------------------------------------
    def apply(self, grads, trainable_variables=None, loss=None):
        if trainable_variables is None:
            raise ValueError("GuardedOptimizer.apply needs the trainable variables")
        if not self.built:
            self.build(trainable_variables)
        variables = list(trainable_variables)
        grads, loss, norm, finite, accept, rebaseline = self._prepare(list(grads), loss)
        self._record(accept, rebaseline, loss, norm)
        self._apply_or_skip(accept, finite, grads, variables)
        return norm, ops.cast(ops.logical_not(accept), "float32")

    def _update(self, grads, variables):
        """The inner optimizer's update with finite, clipped, unscaled gradients (scaled
        again for a LossScaleOptimizer, which unscales them and keeps its growth counter)."""
        if self.loss_scaled:
            scale = self.inner_optimizer.dynamic_scale
            grads = [g * ops.cast(scale, g.dtype) for g in grads]
        with compat.one_learning_rate_per_apply(innermost(self.inner_optimizer)):
            self.inner_optimizer.apply(grads, variables)

    def _skip(self, finite):
        """No update: only the step counter advances; an overflow halves the loss scale."""
        self.iterations.assign_add(1)
        if self.loss_scaled:
            lso = self.inner_optimizer
            lso.dynamic_scale.assign(ops.where(finite, lso.dynamic_scale,
                                               lso.dynamic_scale * 0.5))
            lso.step_counter.assign(ops.where(finite, lso.step_counter,
                                              ops.zeros_like(lso.step_counter)))

    def _ema_momentum(self, steps):
        """min(ema, (1 + n) / (10 + n)) after ``steps`` = n optimizer steps."""
        n = ops.cast(steps, "float32")
        return ops.minimum(self.ema, (1.0 + n) / (10.0 + n))

    def _average(self, variables, strategy=None):
        """The moving average takes in the weights of the step just applied (under a
        tf.distribute strategy: from cross-replica context, on every device). ``variables``
        are those that had a gradient (keras drops the others: BERT's unused pooler), so
        each average is found by its variable, not by position."""
        if not self.ema:
            return
        m = self._ema_momentum(self.iterations)
        update = lambda a, v: a.assign(m * a + (1.0 - m) * v)  # noqa: E731
        for v in variables:
            average = compat.slot(self, self.averages, v)
            if strategy is None:
                update(average, v)
            else:
                strategy.extended.update(average.value, update, args=(v.value,), group=False)

    def _apply_or_skip(self, accept, finite, grads, variables):
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            if tf.distribute.has_strategy():
                return self._cross_replica(accept, finite, grads, variables)

        def update():
            self._update(grads, variables)
            self._average(variables)
            return ops.zeros(())

        def skip():
            self._skip(finite)
            return ops.zeros(())
        ops.cond(accept, update, skip)

    def _cross_replica(self, accept, finite, grads, variables):
        """Under a tf.distribute strategy the cond runs in cross-replica context (a cond in
        replica context may not contain the optimizer's merge_call); every replica decided
        the same from all-reduced values."""
        import tensorflow as tf

        def cross_replica(strategy, accept, finite, grads):
            first = lambda v: strategy.experimental_local_results(v)[0]  # noqa: E731

            def update():
                strategy.extended.call_for_each_replica(self._update, args=(grads, variables))
                self._average(variables, strategy)
                return tf.constant(0.0)

            def skip():
                self._skip(first(finite))
                return tf.constant(0.0)
            return tf.cond(first(accept), update, skip)

        tf.distribute.get_replica_context().merge_call(cross_replica,
                                                       args=(accept, finite, grads))

    # --- stateless (the JAX train step) -------------------------------------------------
    def stateless_apply(self, optimizer_variables, grads, trainable_variables, loss=None):
        """The same step as ``apply`` as a pure function: returns (new trainable values, new
        optimizer values, grad_norm, skipped). Both updates are computed and one is kept
        (``where``), which is what XLA does with a cond on a GPU anyway."""
        if self.loss_scaled:
            raise NotImplementedError("stateless_apply with loss scaling (mixed_float16)")
        own_variables = super().variables
        inner = list(optimizer_variables[len(own_variables):])
        mapping = list(zip(own_variables, optimizer_variables[:len(own_variables)]))
        with keras.StatelessScope(state_mapping=mapping) as scope:
            grads, loss, norm, _, accept, rebaseline = self._prepare(list(grads), loss)
            self._record(accept, rebaseline, loss, norm)
        own_values = [scope.get_current_value(v) for v in own_variables]
        new_tv, new_inner = self.inner_optimizer.stateless_apply(inner, grads,
                                                                 trainable_variables)
        step = next(i for i, v in enumerate(self.inner_optimizer.variables)
                    if v is self.iterations)
        kept = list(inner)  # a skipped step: moments unchanged, the counter advances
        kept[step] = inner[step] + 1
        pick = lambda new, old: ops.where(accept, new, old)  # noqa: E731
        new_tv = [pick(n, o) for n, o in zip(new_tv, trainable_variables)]
        new_inner = [pick(n, o) for n, o in zip(new_inner, kept)]
        if self.averages:  # a skipped step keeps them: its weights are the old ones
            m = self._ema_momentum(new_inner[step])
            at = {id(v): i for i, v in enumerate(own_variables)}
            for average, w in zip(self.averages, new_tv):
                i = at[id(average)]
                own_values[i] = pick(m * own_values[i] + (1.0 - m) * w, own_values[i])
        return new_tv, own_values + new_inner, norm, ops.cast(ops.logical_not(accept),
                                                              "float32")

    def get_config(self):
        return {"name": self.name, "clipnorm": self.clipnorm_value, "guard": self.guard,
                "spike_window": self.spike_window, "spike_threshold": self.spike_threshold,
                "rebaseline_after": self.rebaseline_after, "ema": self.ema,
                "inner_optimizer": keras.saving.serialize_keras_object(self.inner_optimizer)}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        inner = keras.saving.deserialize_keras_object(config.pop("inner_optimizer"),
                                                      custom_objects=custom_objects)
        return cls(inner, **config)
