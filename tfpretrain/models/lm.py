"""The trained models: a keras_hub backbone wrapped as a next-token LM (gpt2, llama) or a
masked LM (bert, through keras_hub's BertMaskedLM head). Backbones come from
:mod:`.registry`; which wrapper a run uses is its objective's choice (``tfpretrain.objectives``).

:class:`CausalLM` owns only the glue keras_hub's tasks would otherwise decide for us: logits
through the backbone's (reversible, optionally tied) token embedding, and a ``train_step``
that computes the loss as the mean over real tokens, the global gradient norm, clipping and
a per-step log (loss, grad norm, learning rate) that survives ``steps_per_execution``.
"""
from __future__ import annotations

import keras
import keras_hub
import tensorflow as tf
from keras import ops

from tfpretrain.models import stability
from tfpretrain.models.network import DecoderNet
from tfpretrain.data.special_ids import BOS_ID, EOS_ID, MASK_ID, PAD_ID

LOG_FIELDS = ("loss", "grad_norm", "learning_rate", "skipped")


def replicas_sum(value):
    """Sum a tensor (or list of gradients) over the replicas of a tf.distribute strategy
    (itself on one device). Sparse embedding gradients are made dense first."""
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return value
    if isinstance(value, list):
        dense = [None if g is None else tf.convert_to_tensor(g) for g in value]
        kept = [g for g in dense if g is not None]
        summed = iter(ctx.all_reduce(tf.distribute.ReduceOp.SUM, kept))
        return [None if g is None else next(summed) for g in dense]
    return ctx.all_reduce(tf.distribute.ReduceOp.SUM, value)


class CausalLM(DecoderNet):
    """token_ids [batch, seq] -> logits [batch, seq, vocab] over a keras_hub backbone.

    The train step is where the stability guard lives: a step whose loss or global gradient
    norm is not finite, or spikes above mean + k*std of the last ``spike_window`` accepted
    steps, is skipped with ``tf.cond`` - weights and Adam moments stay as they were, only
    the step counter advances (so the schedule and the data position stay aligned).
    A finite spike that ends a streak of ``rebaseline_after`` skipped steps is a new level,
    not an outlier: it is accepted and the detector starts a fresh window (OLMo / PaLM
    practice: skip rare outliers, accept a sustained shift), so a legitimate rise of the
    gradient norm cannot make every later step a "spike".
    """

    # the special ids the model was trained with (see data.tokenizers)
    PAD_ID, BOS_ID, EOS_ID, MASK_ID = PAD_ID, BOS_ID, EOS_ID, MASK_ID

    def __init__(self, backbone: keras.Model, sequence_length: int,
                 clipnorm: float | None = None,
                 steps_per_execution: int = 1, guard: bool = True, spike_window: int = 100,
                 spike_threshold: float = 6.0, spike_steps=(0, 1), z_loss: float = 0.0,
                 document_mask: bool = False, rebaseline_after: int = 0,
                 grad_accumulation_steps: int = 1, distill_alpha: float = 1.0,
                 distill_temperature: float = 1.0, **kwargs):
        super().__init__(backbone, sequence_length, document_mask=document_mask, **kwargs)
        self.distill_alpha, self.distill_temperature = distill_alpha, distill_temperature
        # the distillation teacher (set_teacher); not tracked: not part of this model's
        # weights, checkpoints or exports
        object.__setattr__(self, "teacher", None)
        self.clipnorm = clipnorm or None
        self.log_size = max(1, steps_per_execution)
        self.guard, self.spike_threshold = guard, spike_threshold
        self.spike_window = spike_window
        self.rebaseline_after = rebaseline_after
        self.spike_steps, self.z_loss = spike_steps, z_loss
        self.accumulation = max(1, grad_accumulation_steps)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        # Guard state (tracked, so it is checkpointed and survives a resume): recent
        # accepted (loss, grad_norm), how many were accepted, skipped and clipped steps.
        # Every replica computes the same values (from all-reduced gradients), so under a
        # tf.distribute strategy the first replica's write stands for all.
        state = dict(initializer="zeros", trainable=False, aggregation="only_first_replica")
        self.guard_history = self.add_weight(shape=(spike_window, 2), name="guard_history",
                                             **state)
        self.guard_accepted = self.add_weight(shape=(), dtype="int64", name="guard_accepted",
                                              **state)
        self.skipped_steps = self.add_weight(shape=(), dtype="int64", name="skipped_steps",
                                             **state)
        self.clipped_steps = self.add_weight(shape=(), dtype="int64", name="clipped_steps",
                                             **state)
        self.consecutive_skips = self.add_weight(shape=(), dtype="int64",
                                                 name="consecutive_skips", **state)
        # Per-step log for the last `log_size` steps; read by the TensorBoard callback after
        # each execution so every step is logged. Set with object.__setattr__ so it is not
        # tracked: it is not model state and its shape depends on steps_per_execution.
        object.__setattr__(self, "step_log", tf.Variable(
            tf.zeros([self.log_size, len(LOG_FIELDS)]), trainable=False, name="step_log",
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA))

    @property
    def metrics(self):
        return [self.loss_tracker]

    def set_teacher(self, teacher) -> None:
        """Distil from ``teacher`` (a model of the same objective and vocabulary): its logits,
        in inference mode, join the training objective (see :meth:`distill_objective`)."""
        object.__setattr__(self, "teacher", teacher)

    def distill_objective(self, x, logits, ce_share, weight, total):
        """alpha * CE + (1 - alpha) * T^2 * KL(teacher_T || student_T), each a share of the
        mean over the batch's real tokens; the CE share alone without a teacher."""
        if self.teacher is None:
            return ce_share
        teacher_logits = tf.stop_gradient(self.teacher(x, training=False))
        kd = stability.distill_values(logits, teacher_logits, self.distill_temperature)
        a = self.distill_alpha
        return a * ce_share + (1.0 - a) * stability.weighted_share(kd, weight, total)

    @staticmethod
    def token_losses(y, logits):
        return stability.token_losses(y, logits)

    def _mean_loss(self, y, logits, sample_weight):
        return stability.weighted_mean(self.token_losses(y, logits), sample_weight)

    def _is_spike(self, loss, grad_norm):
        if not self.guard or self.spike_threshold <= 0:
            return tf.constant(False)
        return stability.is_spike(self.guard_history, self.guard_accepted, loss, grad_norm,
                                  self.spike_window, self.spike_threshold)

    def _micro_batches(self, x, y, sample_weight):
        """The batch as ``grad_accumulation_steps`` equal slices (the batch itself if 1)."""
        k = self.accumulation
        if k == 1:
            return [(x, y, sample_weight)]
        size = tf.shape(y)[0] // k
        cut = lambda t, i: t[i * size:(i + 1) * size]  # noqa: E731
        return [tf.nest.map_structure(lambda t: cut(t, i), (x, y, sample_weight))
                for i in range(k)]

    def _loss_and_gradients(self, x, y, sample_weight, variables):
        """(loss, unscaled gradients) of the whole batch, summed over its micro-batches:
        each contributes its share of the mean over the batch's real tokens, so the sum
        is the unaccumulated batch's loss and gradient (up to float rounding). Micro-batch
        i+1 starts after i's gradients exist, so only one micro-batch's activations live
        at a time. With a LossScaleOptimizer (mixed_float16) the loss is scaled for the
        backward pass and the gradients unscaled again."""
        total = replicas_sum(tf.reduce_sum(tf.cast(sample_weight, tf.float32)))
        scale = self.optimizer.dynamic_scale if self.loss_scaled else None
        loss, summed = tf.constant(0.0), None
        for mx, my, mw in self._micro_batches(x, y, sample_weight):
            deps = [] if summed is None else [g for g in summed if g is not None]
            with tf.control_dependencies(deps), tf.GradientTape() as tape:
                logits = self(mx, training=True)
                part = stability.weighted_share(self.token_losses(my, logits), mw, total)
                part_objective = self.distill_objective(mx, logits, part, mw, total)
                if self.z_loss:
                    part_objective += self.z_loss * stability.weighted_share(
                        stability.z_values(logits), mw, total)
                scaled = part_objective * scale if scale is not None else part_objective
            grads = tape.gradient(scaled, variables)
            if self.accumulation > 1:  # sparse embedding gradients become dense to add up
                grads = [None if g is None else tf.convert_to_tensor(g) for g in grads]
            summed = grads if summed is None else [
                a if b is None else a + b for a, b in zip(summed, grads)]
            loss = loss + part
        if scale is not None:
            summed = [None if g is None else g / scale for g in summed]
        return loss, summed

    def train_step(self, data):
        x, y, sample_weight = data
        iterations = self.optimizer.iterations
        step = iterations + 1  # 1-based number of the step being taken
        lr = tf.cast(self.optimizer.learning_rate, tf.float32)
        slot = tf.cast(iterations % self.log_size, tf.int32)
        # variables outside the loss's graph (BERT's unused pooler in masked-LM) get no
        # gradient and are left out, not fed to the optimizer as None
        variables = self.trainable_variables
        loss, grads = self._loss_and_gradients(x, y, sample_weight, variables)
        loss, grads = replicas_sum(loss), replicas_sum(grads)  # the global batch's
        first, count = self.spike_steps
        if first:  # fault injection (tfpretrain.faults): the step's loss and gradient x1000
            scale = tf.where((step >= first) & (step < first + count), 1000.0, 1.0)
            loss = loss * scale
            grads = [None if g is None else g * scale for g in grads]
        used = [i for i, g in enumerate(grads) if g is not None]
        variables, grads = [variables[i] for i in used], [grads[i] for i in used]
        grad_norm = stability.global_norm(grads)
        if self.clipnorm:
            grads = stability.clip_by_global_norm(grads, self.clipnorm, grad_norm)
            self.clipped_steps.assign_add(tf.cast(grad_norm > self.clipnorm, tf.int64))
        finite, accept, rebaseline = stability.decide(
            loss, grad_norm, self._is_spike(loss, grad_norm), self.consecutive_skips,
            self.rebaseline_after if self.guard else 0)
        if not self.guard:
            accept = tf.constant(True)
        # a new level: the detector's window starts again with this step
        self.guard_accepted.assign(tf.where(rebaseline, tf.zeros_like(self.guard_accepted),
                                            self.guard_accepted))

        skipped = self._apply_or_skip(accept, finite, grads, variables, loss, grad_norm)
        self.loss_tracker.update_state(tf.where(finite, loss, 0.0),
                                       sample_weight=tf.cast(finite, tf.float32))
        self.step_log.assign(tf.tensor_scatter_nd_update(  # (mirrored variables: no scatter)
            self.step_log, [[slot]], [tf.stack([loss, grad_norm, lr, skipped])]))
        return {"loss": self.loss_tracker.result(), "lr": lr}

    def _accept(self, grads, variables, loss, grad_norm):
        """The update, and the step joins the guard's window."""
        self._apply(grads, variables)
        row = tf.cast(self.guard_accepted % self.spike_window, tf.int32)
        self.guard_history.assign(tf.tensor_scatter_nd_update(
            self.guard_history, [[row]], [tf.stack([loss, grad_norm])]))
        self.guard_accepted.assign_add(1)
        self.consecutive_skips.assign(0)

    def _skip(self, finite):
        """No update: only the step counter (hence schedule and data position) advances."""
        self.optimizer.iterations.assign_add(1)
        self.skipped_steps.assign_add(1)
        self.consecutive_skips.assign_add(1)
        if self.loss_scaled:  # an overflow: halve the loss scale, as Keras's LSO does
            self._lower_loss_scale(finite)

    def _apply_or_skip(self, accept, finite, grads, variables, loss, grad_norm):
        """``tf.cond(accept, update, skip)``; 1.0 when skipped. Under a tf.distribute
        strategy the cond runs in cross-replica context, as Keras's LossScaleOptimizer
        does it (a cond in replica context may not contain the optimizer's merge_call);
        every replica decided the same from all-reduced values."""
        if not tf.distribute.has_strategy():  # the default strategy: a plain cond
            def apply():
                self._accept(grads, variables, loss, grad_norm)
                return tf.constant(0.0)

            def skip():
                self._skip(finite)
                return tf.constant(1.0)
            return tf.cond(accept, apply, skip)

        def cross_replica(strategy, accept, finite, grads, loss, grad_norm):
            first = lambda v: strategy.experimental_local_results(v)[0]  # noqa: E731

            def apply():
                strategy.extended.call_for_each_replica(
                    self._accept, args=(grads, variables, loss, grad_norm))
                return tf.constant(0.0)

            def skip():
                self._skip(first(finite))
                return tf.constant(1.0)
            return tf.cond(first(accept), apply, skip)

        return tf.distribute.get_replica_context().merge_call(
            cross_replica, args=(accept, finite, grads, loss, grad_norm))

    @property
    def loss_scaled(self) -> bool:
        return isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer)

    def _apply(self, grads, variables):
        """One optimizer update with finite, clipped, unscaled gradients (re-scaled by the
        power-of-two loss scale for a LossScaleOptimizer, which unscales them and keeps its
        own growth counter)."""
        if self.loss_scaled:
            scale = self.optimizer.dynamic_scale
            grads = [g * scale for g in grads]
        self.optimizer.apply_gradients(zip(grads, variables))

    def _lower_loss_scale(self, finite):
        lso = self.optimizer
        lso.dynamic_scale.assign(tf.where(finite, lso.dynamic_scale, lso.dynamic_scale * 0.5))
        lso.step_counter.assign(tf.where(finite, lso.step_counter,
                                         tf.zeros_like(lso.step_counter)))

    def test_step(self, data):
        x, y, sample_weight = data
        logits = self(x, training=False)
        loss = self._mean_loss(y, logits, sample_weight)
        self.loss_tracker.update_state(loss, sample_weight=tf.reduce_sum(sample_weight))
        return {"loss": self.loss_tracker.result()}


class MaskedLM(CausalLM):
    """Masked LM: BertMaskedLM's inputs (token_ids, padding_mask, segment_ids,
    mask_positions) -> logits [batch, predictions, vocab] at the masked positions.

    Shares :class:`CausalLM`'s train step (loss = weighted mean over the predicted
    positions, so unmasked positions never contribute; guard; clipping; step log) and adds
    masked accuracy to evaluation."""

    def __init__(self, backbone: keras.Model, sequence_length: int, **kwargs):
        super().__init__(backbone, sequence_length, **kwargs)
        self.task = keras_hub.models.BertMaskedLM(backbone=backbone, preprocessor=None)
        self.accuracy_tracker = keras.metrics.Mean(name="masked_accuracy")

    @property
    def network(self) -> keras.Model:
        return self.task

    def example_input(self):
        L = self.sequence_length
        return {"token_ids": ops.zeros([1, L], "int32"),
                "padding_mask": ops.ones([1, L], "bool"),
                "segment_ids": ops.zeros([1, L], "int32"),
                "mask_positions": ops.zeros([1, 1], "int32")}

    def row_logits(self, token_ids):
        """Logits at every position of whole rows (``[CLS] ... [SEP]``; pad is masked)."""
        token_ids = ops.convert_to_tensor(token_ids, "int32")
        shape = ops.shape(token_ids)
        positions = ops.broadcast_to(ops.arange(shape[1], dtype="int32")[None, :], shape)
        return self({"token_ids": token_ids, "padding_mask": ops.not_equal(token_ids, PAD_ID),
                     "segment_ids": ops.zeros_like(token_ids), "mask_positions": positions},
                    training=False)

    def call(self, features, training=False):
        return ops.cast(self.task(features, training=training), "float32")

    @property
    def metrics(self):
        return [self.loss_tracker, self.accuracy_tracker]

    @staticmethod
    def correct(y, logits):
        return stability.correct(y, logits)

    def test_step(self, data):
        x, y, sample_weight = data
        logits = self(x, training=False)
        loss = self._mean_loss(y, logits, sample_weight)
        self.loss_tracker.update_state(loss, sample_weight=tf.reduce_sum(sample_weight))
        self.accuracy_tracker.update_state(self.correct(y, logits), sample_weight=sample_weight)
        return {"loss": self.loss_tracker.result(),
                "masked_accuracy": self.accuracy_tracker.result()}


def weights_sha256(model: keras.Model) -> str:
    """SHA-256 over every weight of the network, in a fixed order (name, shape, bytes)."""
    import hashlib

    import numpy as np

    h = hashlib.sha256()
    for i, w in enumerate(model.network.weights):
        value = np.ascontiguousarray(keras.ops.convert_to_numpy(w))
        h.update(f"{i}:{w.path}:{value.shape}:{value.dtype}".encode())
        h.update(value.tobytes())
    return h.hexdigest()
