"""The training loss and the stability guard's in-graph decision, in ``keras.ops`` only, so
they mean the same on every Keras backend (TensorFlow here; JAX for GPU measurements).

Nothing here imports TensorFlow; ``tests/test_architecture.py`` runs it under Keras's JAX
backend with TensorFlow blocked and compares the results with the TensorFlow backend's.
"""
from __future__ import annotations

from keras import ops


def token_losses(y, logits):
    """Cross-entropy (nats) of each target id under float32 logits [..., vocab]."""
    return ops.sparse_categorical_crossentropy(y, ops.cast(logits, "float32"),
                                               from_logits=True)


def distill_values(student_logits, teacher_logits, temperature):
    """Knowledge distillation per position: T^2 * KL(softmax(teacher/T) || softmax(student/T))
    in nats (Hinton et al. 2015; the T^2 keeps its gradient's scale independent of T)."""
    t = ops.cast(temperature, "float32")
    log_p = ops.log_softmax(ops.cast(teacher_logits, "float32") / t, axis=-1)
    log_q = ops.log_softmax(ops.cast(student_logits, "float32") / t, axis=-1)
    return t * t * ops.sum(ops.exp(log_p) * (log_p - log_q), axis=-1)


def top_k_distill_values(student_logits, teacher_ids, teacher_log_p, temperature):
    """:func:`distill_values` from the teacher's top k only (``distill.topk``): ids [..., k]
    and their log-probabilities at temperature T. The KL is taken over k + 1 outcomes, the
    k ids and "any other id" (the teacher's remaining mass against the student's), so it is
    exact when k covers the vocabulary and a lower bound of the full KL otherwise."""
    t, log_q = _student_log_q(student_logits, teacher_ids, temperature)
    log_p = ops.cast(teacher_log_p, "float32")
    p = ops.exp(log_p)
    tail_p = ops.maximum(1.0 - ops.sum(p, axis=-1), 0.0)
    tail_q = ops.maximum(1.0 - ops.sum(ops.exp(log_q), axis=-1), 1e-7)
    tail = tail_p * (ops.log(ops.maximum(tail_p, 1e-7)) - ops.log(tail_q))
    return t * t * (ops.sum(p * (log_p - log_q), axis=-1) + tail)


def sampled_distill_values(student_logits, teacher_ids, teacher_log_p, temperature):
    """:func:`distill_values` estimated from k ids drawn from the teacher's distribution at
    temperature T (``distill.sampled``): T^2 * mean_k(log p(y_k) - log q(y_k)). Unbiased for
    the full KL, and so is its gradient (-mean_k grad log q(y_k)); a drawn id that repeats
    counts as often as it was drawn."""
    t, log_q = _student_log_q(student_logits, teacher_ids, temperature)
    return t * t * ops.mean(ops.cast(teacher_log_p, "float32") - log_q, axis=-1)


def _student_log_q(student_logits, ids, temperature):
    """(T, the student's log-probabilities at temperature T of ``ids`` [..., k])."""
    t = ops.cast(temperature, "float32")
    log_q_all = ops.log_softmax(ops.cast(student_logits, "float32") / t, axis=-1)
    return t, ops.take_along_axis(log_q_all, ops.cast(ids, "int32"), axis=-1)


def weighted_mean(values, weight):
    """sum(values * weight) / max(sum(weight), 1): the mean over real (weighted) tokens,
    padding (weight 0) never counts."""
    w = ops.cast(weight, values.dtype)
    return ops.sum(values * w) / ops.maximum(ops.sum(w), 1.0)


def weighted_share(values, weight, total_weight):
    """sum(values * weight) / max(total_weight, 1): one micro-batch's share of the mean over
    a whole batch whose weights sum to ``total_weight`` (the shares of all micro-batches
    add up to :func:`weighted_mean` of the batch)."""
    w = ops.cast(weight, values.dtype)
    return ops.sum(values * w) / ops.maximum(ops.cast(total_weight, values.dtype), 1.0)


def z_loss(logits, weight):
    """PaLM's z-loss term: the weighted mean of logsumexp(logits)^2."""
    return weighted_mean(z_values(logits), weight)


def z_values(logits):
    """logsumexp(logits)^2 per position (float32)."""
    return ops.square(ops.logsumexp(ops.cast(logits, "float32"), axis=-1))


def correct(y, logits):
    """1.0 where the arg-max prediction is the target, else 0.0."""
    predicted = ops.argmax(logits, axis=-1)
    return ops.cast(ops.equal(ops.cast(predicted, "int32"), ops.cast(y, "int32")), "float32")


def global_norm(grads):
    """The L2 norm of all gradients together (what ``optimizer.clipnorm`` recipes mean by
    the global norm)."""
    return ops.sqrt(sum(ops.sum(ops.square(ops.cast(g, "float32"))) for g in grads))


def clip_by_global_norm(grads, clipnorm: float, norm):
    """Every gradient scaled by clipnorm / max(norm, clipnorm)."""
    scale = clipnorm / ops.maximum(norm, clipnorm)
    return [g * ops.cast(scale, g.dtype) for g in grads]


def is_spike(history, accepted, loss, grad_norm, window: int, threshold: float):
    """Loss or gradient norm above mean + threshold * std of the window of accepted
    (loss, grad_norm) rows; never before the window is full."""
    mean = ops.mean(history, axis=0)
    std = ops.std(history, axis=0)
    limit = mean + threshold * std
    return ops.logical_and(accepted >= window,
                           ops.logical_or(loss > limit[0], grad_norm > limit[1]))


def decide(loss, grad_norm, spike, consecutive_skips, rebaseline_after: int):
    """(finite, accept, rebaseline) for one step: non-finite steps are always skipped; a
    spike is skipped unless it would make ``rebaseline_after`` skips in a row, in which case
    it is a new level: accepted, and the detector's window starts again (``rebaseline``)."""
    finite = ops.logical_and(ops.isfinite(loss), ops.isfinite(grad_norm))
    accept = ops.logical_and(finite, ops.logical_not(spike))
    if not rebaseline_after:
        return finite, accept, ops.zeros_like(accept)
    rebaseline = ops.logical_and(ops.logical_and(finite, ops.logical_not(accept)),
                                 consecutive_skips + 1 >= rebaseline_after)
    return finite, ops.logical_or(accept, rebaseline), rebaseline
