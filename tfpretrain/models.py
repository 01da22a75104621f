"""Model registry: ``model.arch`` -> a keras_hub backbone, wrapped as a next-token LM.

:class:`CausalLM` owns only the glue keras_hub's tasks would otherwise decide for us: logits
through the backbone's (reversible, optionally tied) token embedding, and a ``train_step``
that computes the loss as the mean over real tokens, the global gradient norm, clipping and
a per-step log (loss, grad norm, learning rate) that survives ``steps_per_execution``.
"""
from __future__ import annotations

import keras
import keras_hub
import tensorflow as tf

from tfpretrain.config import ModelConfig
from tfpretrain.errors import UserError

LOG_FIELDS = ("loss", "grad_norm", "learning_rate")


def build_backbone(cfg: ModelConfig, vocabulary_size: int) -> keras.Model:
    """A from-scratch keras_hub backbone; no preset is downloaded."""
    if cfg.arch == "gpt2":
        return keras_hub.models.GPT2Backbone(
            vocabulary_size=vocabulary_size, num_layers=cfg.num_layers,
            num_heads=cfg.num_heads, hidden_dim=cfg.hidden_dim,
            intermediate_dim=cfg.intermediate_dim, dropout=cfg.dropout,
            max_sequence_length=cfg.sequence_length)
    if cfg.arch == "llama":
        return keras_hub.models.LlamaBackbone(
            vocabulary_size=vocabulary_size, num_layers=cfg.num_layers,
            num_query_heads=cfg.num_heads, hidden_dim=cfg.hidden_dim,
            intermediate_dim=cfg.intermediate_dim,
            num_key_value_heads=cfg.num_key_value_heads or cfg.num_heads,
            dropout=cfg.dropout, tie_word_embeddings=cfg.tie_embeddings)
    raise UserError(f"`model.arch` must be one of gpt2, llama. Received: {cfg.arch!r}")


class CausalLM(keras.Model):
    """token_ids [batch, seq] -> logits [batch, seq, vocab] over a keras_hub backbone."""

    def __init__(self, backbone: keras.Model, clipnorm: float | None = None,
                 steps_per_execution: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone
        self.clipnorm = clipnorm or None
        self.log_size = max(1, steps_per_execution)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        # Per-step (loss, grad_norm, lr) for the last `log_size` steps; read by the
        # TensorBoard callback after each execution so every step is logged. Set with
        # object.__setattr__ so it is not tracked: it is not model state and its shape
        # depends on steps_per_execution, so it must stay out of checkpoints.
        object.__setattr__(self, "step_log", tf.Variable(
            tf.zeros([self.log_size, len(LOG_FIELDS)]), trainable=False, name="step_log"))

    def call(self, token_ids, training=False):
        token_ids = tf.convert_to_tensor(token_ids)
        hidden = self.backbone(
            {"token_ids": token_ids, "padding_mask": tf.ones_like(token_ids, tf.bool)},
            training=training)
        logits = self.backbone.token_embedding(hidden, reverse=True)
        return tf.cast(logits, tf.float32)

    @property
    def metrics(self):
        return [self.loss_tracker]

    @staticmethod
    def token_losses(y, logits):
        return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)

    def _mean_loss(self, y, logits, sample_weight):
        per_token = self.token_losses(y, logits)
        weight = tf.cast(sample_weight, per_token.dtype)
        return tf.reduce_sum(per_token * weight) / tf.maximum(tf.reduce_sum(weight), 1.0)

    def train_step(self, data):
        x, y, sample_weight = data
        lr = tf.cast(self.optimizer.learning_rate, tf.float32)
        slot = tf.cast(self.optimizer.iterations % self.log_size, tf.int32)
        with tf.GradientTape() as tape:
            logits = self(x, training=True)
            loss = self._mean_loss(y, logits, sample_weight)
        variables = self.trainable_variables
        grads = tape.gradient(loss, variables)
        grad_norm = tf.linalg.global_norm(grads)
        if self.clipnorm:
            grads, _ = tf.clip_by_global_norm(grads, self.clipnorm, use_norm=grad_norm)
        self.optimizer.apply_gradients(zip(grads, variables))
        self.loss_tracker.update_state(loss)
        self.step_log.scatter_nd_update([[slot]], [tf.stack([loss, grad_norm, lr])])
        return {"loss": self.loss_tracker.result(), "lr": lr}

    def test_step(self, data):
        x, y, sample_weight = data
        logits = self(x, training=False)
        loss = self._mean_loss(y, logits, sample_weight)
        self.loss_tracker.update_state(loss, sample_weight=tf.reduce_sum(sample_weight))
        return {"loss": self.loss_tracker.result()}


def build_model(cfg: ModelConfig, vocabulary_size: int, clipnorm: float | None = None,
                steps_per_execution: int = 1) -> CausalLM:
    backbone = build_backbone(cfg, vocabulary_size)
    model = CausalLM(backbone, clipnorm=clipnorm, steps_per_execution=steps_per_execution)
    model(tf.zeros([1, cfg.sequence_length], tf.int32))  # build all weights
    return model


def count_params(cfg: ModelConfig, vocabulary_size: int) -> int:
    """Parameter count without building TF variables on a device (used by --dry-run)."""
    backbone = build_backbone(cfg, vocabulary_size)
    return int(backbone.count_params())
