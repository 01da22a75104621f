"""The trained models: a keras_hub backbone wrapped as a next-token LM (gpt2, llama) or a
masked LM (bert, through keras_hub's BertMaskedLM head). Backbones come from
:mod:`.registry`; which wrapper a run uses is its objective's choice (``tfpretrain.objectives``).

:class:`CausalLM` owns only the glue keras_hub's tasks would otherwise decide for us: logits
through the backbone's (reversible, optionally tied) token embedding, and a ``train_step``
that computes the loss as the mean over real tokens and its gradients, hands both to the
optimizer (clipping and the guard are its wrapper's, :mod:`.guarded`), and keeps a per-step
log (loss, grad norm, learning rate, skipped) that survives ``steps_per_execution``.
"""
from __future__ import annotations

import keras
import keras_hub
import tensorflow as tf
from keras import ops

from tfpretrain.models import fused, stability
from tfpretrain.models.guarded import GuardedOptimizer
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

    The train step computes the loss and gradients (micro-batches, z-loss, distillation,
    loss scaling, the sum over replicas) and hands them to its optimizer, a
    :class:`~tfpretrain.models.guarded.GuardedOptimizer`: clipping and the stability guard
    (skip a non-finite or spiking step) live there, as the optimizer's own decision.
    """

    # the special ids the model was trained with (see data.tokenizers)
    PAD_ID, BOS_ID, EOS_ID, MASK_ID = PAD_ID, BOS_ID, EOS_ID, MASK_ID

    def __init__(self, backbone: keras.Model, sequence_length: int,
                 steps_per_execution: int = 1, spike_steps=(0, 1), z_loss: float = 0.0,
                 document_mask: bool = False, grad_accumulation_steps: int = 1,
                 distill_alpha: float = 1.0, distill_temperature: float = 1.0,
                 distill_sampled: bool = False, **kwargs):
        super().__init__(backbone, sequence_length, document_mask=document_mask, **kwargs)
        self.distill_alpha, self.distill_temperature = distill_alpha, distill_temperature
        self.distill_sampled = distill_sampled  # cached ids drawn, not the top k
        # the distillation teacher (set_teacher); not tracked: not part of this model's
        # weights, checkpoints or exports
        object.__setattr__(self, "teacher", None)
        self.log_size = max(1, steps_per_execution)
        self.spike_steps, self.z_loss = spike_steps, z_loss
        self.accumulation = max(1, grad_accumulation_steps)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        # Per-step log for the last `log_size` steps; read by the TensorBoard callback after
        # each execution so every step is logged. Set with object.__setattr__ so it is not
        # tracked: it is not model state and its shape depends on steps_per_execution.
        object.__setattr__(self, "step_log", tf.Variable(
            tf.zeros([self.log_size, len(LOG_FIELDS)]), trainable=False, name="step_log",
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA))

    def compile(self, optimizer="adamw", **kwargs):
        """As Keras's; an optimizer that is not a GuardedOptimizer is wrapped in one with
        the guard's defaults (no clipping)."""
        optimizer = keras.optimizers.get(optimizer)
        if not isinstance(optimizer, GuardedOptimizer):
            optimizer = GuardedOptimizer(optimizer)
        super().compile(optimizer=optimizer, **kwargs)

    @property
    def metrics(self):
        return [self.loss_tracker]

    def set_teacher(self, teacher) -> None:
        """Distil from ``teacher`` (a model of the same objective and vocabulary): its logits,
        in inference mode, join the training objective (see :meth:`distill_objective`)."""
        object.__setattr__(self, "teacher", teacher)

    def distill_objective(self, x, logits, ce_share, weight, total, top_k=None):
        """alpha * CE + (1 - alpha) * T^2 * KL(teacher_T || student_T), each a share of the
        mean over the batch's real tokens; the CE share alone without a teacher. ``top_k``:
        the teacher's cached (ids, log-probabilities) for these positions
        (``distill.topk``: its most likely ids, or with ``distill.sampled`` ids drawn from
        it), used instead of running the teacher."""
        if top_k is not None:
            values = (stability.sampled_distill_values if self.distill_sampled
                      else stability.top_k_distill_values)
            kd = values(logits, *top_k, self.distill_temperature)
        elif self.teacher is not None:
            teacher_logits = tf.stop_gradient(self.teacher(x, training=False))
            kd = stability.distill_values(logits, teacher_logits, self.distill_temperature)
        else:
            return ce_share
        a = self.distill_alpha
        return a * ce_share + (1.0 - a) * stability.weighted_share(kd, weight, total)

    @staticmethod
    def token_losses(y, logits):
        return stability.token_losses(y, logits)

    def _mean_loss(self, y, logits, sample_weight):
        return stability.weighted_mean(self.token_losses(y, logits), sample_weight)

    def step_forward(self, x, training: bool):
        """The forward pass of a train or eval step: as ``self(x)``, with the activations
        and layer norms fused by XLA when the step itself is not XLA-compiled
        (:mod:`.fused`)."""
        with fused.fused_ops(self.network, enabled=not self.jit_compile):
            return self(x, training=training)

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
        """(loss, gradients) of the whole batch, summed over its micro-batches: each
        contributes its share of the mean over the batch's real tokens, so the sum is the
        unaccumulated batch's loss and gradient (up to float rounding). Micro-batch i+1
        starts after i's gradients exist, so only one micro-batch's activations live at a
        time. The objective is scaled by ``optimizer.scale_loss`` for the backward pass
        (mixed_float16's loss scale; the optimizer unscales), the returned loss is not."""
        total = replicas_sum(tf.reduce_sum(tf.cast(sample_weight, tf.float32)))
        loss, summed = tf.constant(0.0), None
        for mx, my, mw in self._micro_batches(x, y, sample_weight):
            deps = [] if summed is None else [g for g in summed if g is not None]
            # y: the labels, or (labels, the teacher's cached top-k ids, log-probabilities)
            my, top_k = (my[0], my[1:]) if isinstance(my, tuple) else (my, None)
            with tf.control_dependencies(deps), tf.GradientTape() as tape:
                logits = self.step_forward(mx, training=True)
                part = stability.weighted_share(self.token_losses(my, logits), mw, total)
                part_objective = self.distill_objective(mx, logits, part, mw, total, top_k)
                if self.z_loss:
                    part_objective += self.z_loss * stability.weighted_share(
                        stability.z_values(logits), mw, total)
                scaled = self.optimizer.scale_loss(part_objective)
            grads = tape.gradient(scaled, variables)
            if self.accumulation > 1:  # sparse embedding gradients become dense to add up
                grads = [None if g is None else tf.convert_to_tensor(g) for g in grads]
            summed = grads if summed is None else [
                a if b is None else a + b for a, b in zip(summed, grads)]
            loss = loss + part
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
        grad_norm, skipped = self.optimizer.apply([grads[i] for i in used],
                                                  [variables[i] for i in used], loss=loss)
        finite = tf.math.is_finite(loss)
        self.loss_tracker.update_state(tf.where(finite, loss, 0.0),
                                       sample_weight=tf.cast(finite, tf.float32))
        self.step_log.assign(tf.tensor_scatter_nd_update(  # (mirrored variables: no scatter)
            self.step_log, [[slot]], [tf.stack([loss, grad_norm, lr, skipped])]))
        return {"loss": self.loss_tracker.result(), "lr": lr}

    def test_step(self, data):
        x, y, sample_weight = data
        logits = self.step_forward(x, training=False)
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
        logits = self.step_forward(x, training=False)
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
