"""The causal LM's forward pass, backend-neutral (keras.ops only; no TensorFlow import):
token_ids [batch, seq] -> float32 logits [batch, seq, vocab] over a keras_hub decoder
backbone, optionally with attention kept inside each document of a packed row.

:class:`DecoderNet` is what Keras's JAX backend trains (``training.stateless``,
``bench fit --backend jax``); :class:`tfpretrain.models.lm.CausalLM` adds the TensorFlow
train step (guard, clipping, accumulation, per-step log) on top of the same forward pass.
"""
from __future__ import annotations

import keras
from keras import ops

from tfpretrain import compat
from tfpretrain.data.special_ids import EOS_ID


class DecoderNet(keras.Model):
    """Logits through the backbone's (reversible, optionally tied) token embedding."""

    def __init__(self, backbone: keras.Model, sequence_length: int,
                 document_mask: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone
        self.sequence_length = sequence_length  # the context length
        self.document_mask = document_mask

    @property
    def network(self) -> keras.Model:
        """The weights that define the model (hashed, counted, exported)."""
        return self.backbone

    def example_input(self):
        """A one-row input that builds every weight."""
        return ops.zeros([1, self.sequence_length], "int32")

    def call(self, token_ids, training=False):
        token_ids = ops.convert_to_tensor(token_ids)
        if self.document_mask:
            hidden = self._document_forward(token_ids, training)
        else:
            hidden = self.backbone(
                {"token_ids": token_ids, "padding_mask": ops.ones_like(token_ids, "bool")},
                training=training)
        logits = self.backbone.token_embedding(hidden, reverse=True)
        return ops.cast(logits, "float32")

    def _document_forward(self, token_ids, training):
        """The backbone's own layers, with attention kept inside each document of a packed
        row (``data.document_mask``): an ``eos`` starts a new document (it is what the
        model predicts a document's first token from, as in generation); GPT-2's learned
        positions restart at every document, Llama's RoPE is relative and needs only the
        mask. The decoder layers add the causal mask themselves."""
        bb = compat.backbone_parts(self.backbone)
        doc = ops.cumsum(ops.cast(ops.equal(token_ids, EOS_ID), "int32"), axis=1)  # [B, T]
        same = ops.equal(doc[:, :, None], doc[:, None, :])                         # [B, T, T]
        x = bb["token_embedding"](token_ids)
        if "position_embedding" in bb:  # GPT-2's learned positions restart per document
            # position within the document = tokens of the same row before it in that doc
            before = ops.tril(ops.cast(same, "int32"))
            positions = ops.sum(before, axis=2) - 1
            table = bb["position_embedding"].position_embeddings
            x = bb["embeddings_add"]((x, ops.take(table, positions, axis=0)))
            x = bb["embeddings_dropout"](x, training=training)
        for layer in bb["transformer_layers"]:
            x = layer(x, decoder_attention_mask=ops.cast(same, "int32"), training=training)
        return bb["layer_norm"](x)
