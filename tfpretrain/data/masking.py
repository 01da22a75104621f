"""Masked-LM inputs from token rows, drawn with stateless RNG: a pure function of (seed, step).

This follows keras_hub's ``MaskedLMMaskGenerator`` (BERT's recipe: select ``mask_rate`` of
the maskable tokens, then replace 80% of them by [MASK], 10% by a random token, keep 10%;
outputs ``mask_positions``, ``mask_ids``, ``mask_weights`` padded to ``max_predictions``)
but is not that layer: its RNG is stateful (tf_text's RandomItemSelector), so a resumed run
would draw different masks than an unbroken one. Here every batch's masks depend only on
(seed, data position), like the batches themselves (see ``pipeline.row_indices``).

Selection is exact like BERT's: ``max(1, round(mask_rate * n))`` of a row's ``n`` maskable
units (tokens, or words with ``whole_word``) are chosen uniformly; units beyond
``max_predictions`` tokens are dropped whole. Special ids (pad, unk, bos, eos, mask) are
never selected.
"""
from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from tfpretrain.data.tokenizers import MASK_ID, NUM_SPECIAL


def max_predictions(mlm, sequence_length: int) -> int:
    return mlm.max_predictions or min(sequence_length,
                                      math.ceil(mlm.mask_rate * sequence_length) + 1)


class Masker:
    """rows int32 [B, L] + seed int64 [2] -> (features, mask_ids [B, P], mask_weights [B, P])
    where features = {token_ids, padding_mask, segment_ids, mask_positions} (BertMaskedLM's
    inputs)."""

    def __init__(self, mlm, vocabulary_size: int, sequence_length: int,
                 word_starts: np.ndarray | None = None):
        self.rate = mlm.mask_rate
        self.mask_token_rate, self.random_token_rate = mlm.mask_token_rate, mlm.random_token_rate
        self.max_predictions = max_predictions(mlm, sequence_length)
        self.vocabulary_size = vocabulary_size
        self.whole_word = bool(mlm.whole_word)
        starts = np.ones([vocabulary_size], bool) if word_starts is None else word_starts
        self.word_starts = tf.constant(starts, tf.bool)

    def select(self, rows: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        """bool [B, L]: the tokens to predict."""
        rows = tf.convert_to_tensor(rows, tf.int32)
        shape = tf.shape(rows)
        B, L = shape[0], shape[1]
        P = self.max_predictions
        maskable = rows >= NUM_SPECIAL
        pos = tf.broadcast_to(tf.range(L)[None, :], shape)
        # units: a unit starts at every maskable word start (whole_word) or token, and at
        # every special token (which is its own, never-selected unit)
        if self.whole_word:
            starts = tf.gather(self.word_starts, rows) | ~maskable
        else:
            starts = tf.ones_like(maskable)
        starts = starts | tf.equal(pos, 0)
        unit = tf.cumsum(tf.cast(starts, tf.int32), axis=1) - 1          # [B, L], 0..L-1
        unit_start = starts & maskable
        n_units = tf.reduce_sum(tf.cast(unit_start, tf.int32), axis=1)    # [B]
        k = tf.maximum(1, tf.cast(tf.round(self.rate * tf.cast(n_units, tf.float32)),
                                  tf.int32))
        k = tf.minimum(k, n_units)
        # a uniform random ranking of each row's units
        score = tf.random.stateless_uniform(shape, seed=seed)
        score = tf.where(unit_start, score, 2.0)
        rank_at_start = tf.argsort(tf.argsort(score, axis=1, stable=True), axis=1,
                                   stable=True)                              # [B, L]
        # spread each unit's rank to all its tokens: segment over (row, unit)
        seg = tf.range(B)[:, None] * L + unit
        big = tf.fill(shape, L)
        unit_rank = tf.math.unsorted_segment_min(
            tf.reshape(tf.where(unit_start, rank_at_start, big), [-1]),
            tf.reshape(seg, [-1]), B * L)
        rank = tf.reshape(tf.gather(unit_rank, tf.reshape(seg, [-1])), shape)
        chosen = maskable & (rank < k[:, None])
        # cap at P tokens, dropping whole units from the highest rank down: a unit is kept
        # iff the tokens of all units ranked up to it fit in P
        key = tf.where(chosen, rank * L + pos, L * L + pos)
        order = tf.argsort(key, axis=1, stable=True)
        cum = tf.cumsum(tf.cast(tf.gather(chosen, order, batch_dims=1), tf.int32), axis=1)
        cum_at = tf.gather(cum, tf.argsort(order, axis=1), batch_dims=1)   # back to positions
        unit_total = tf.math.unsorted_segment_max(
            tf.reshape(tf.where(chosen, cum_at, 0), [-1]), tf.reshape(seg, [-1]), B * L)
        total = tf.reshape(tf.gather(unit_total, tf.reshape(seg, [-1])), shape)
        return chosen & (total <= P)

    def __call__(self, rows: tf.Tensor, seed: tf.Tensor):
        rows = tf.convert_to_tensor(rows, tf.int32)
        seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 3)
        selected = self.select(rows, seeds[0])
        shape = tf.shape(rows)
        L = shape[1]
        P = self.max_predictions
        # positions: the selected ones in order, then filler (weight 0)
        pos = tf.broadcast_to(tf.range(L)[None, :], shape)
        key = tf.where(selected, pos, L + pos)
        positions = tf.argsort(key, axis=1, stable=True)[:, :P]
        width = tf.minimum(P, L)
        weights = tf.cast(tf.gather(selected, positions, batch_dims=1), tf.float32)
        labels = tf.gather(rows, positions, batch_dims=1)
        # replacements: [MASK] / random token / keep
        u = tf.random.stateless_uniform(shape, seed=seeds[1])
        random_ids = tf.random.stateless_uniform(shape, seed=seeds[2], minval=NUM_SPECIAL,
                                                 maxval=self.vocabulary_size, dtype=tf.int32)
        masked = tf.where(selected & (u < self.mask_token_rate), MASK_ID, rows)
        masked = tf.where(selected & (u >= self.mask_token_rate)
                          & (u < self.mask_token_rate + self.random_token_rate),
                          random_ids, masked)
        features = {"token_ids": masked, "padding_mask": rows != 0,
                    "segment_ids": tf.zeros_like(rows),
                    "mask_positions": tf.reshape(positions, [-1, width])}
        return features, tf.reshape(labels, [-1, width]), tf.reshape(weights, [-1, width])
