"""Tokenize -> pack -> (x, y, sample_weight), deterministic and addressable by step.

Packing: every document's tokens are followed by ``eos``; the streams are concatenated and
cut into rows of ``sequence_length + 1`` tokens that overlap by one token (row r covers
``stream[r*L : r*L + L + 1]``). So every token of the stream is a target exactly once and
appears in exactly one ``x`` row, in order; only the final partial row is dropped.

Batches: the batch at step k holds the rows with global sample index ``k*B .. k*B+B-1``;
sample index i is row ``index_shuffle(i mod R, seed=(seed, i div R))`` - a fresh seeded
permutation per epoch. A batch is therefore a pure function of (seed, step): a run that
restarts at step k sees exactly the batches an unbroken run sees from k.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from tfpretrain.data.tokenizers import EOS_ID, Tokenizer
from tfpretrain.errors import UserError

TOKENIZE_BATCH = 256


def tokenize_documents(tokenizer: Tokenizer, docs: list[str]) -> np.ndarray:
    """All documents as one int32 stream, each followed by eos. Tokenized inside tf.data."""
    if not docs:
        return np.zeros([0], np.int32)
    ds = tf.data.Dataset.from_tensor_slices(tf.constant(docs, tf.string))
    ds = ds.batch(TOKENIZE_BATCH).map(
        lambda t: tokenizer.tokenize(t), num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True)
    eos = tf.constant([[EOS_ID]], tf.int32)

    def with_eos(ragged):
        n = ragged.nrows()
        return tf.concat([ragged, tf.RaggedTensor.from_tensor(tf.tile(eos, [n, 1]))],
                         axis=1).flat_values

    ds = ds.map(with_eos, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    parts = [p.numpy() for p in ds.prefetch(tf.data.AUTOTUNE)]
    return np.concatenate(parts).astype(np.int32)


def pack_rows(stream: np.ndarray, sequence_length: int) -> np.ndarray:
    """Rows [R, L+1] overlapping by one token; the final partial row is dropped."""
    L = sequence_length
    n_rows = (len(stream) - 1) // L
    if n_rows <= 0:
        return np.zeros([0, L + 1], np.int32)
    idx = np.arange(n_rows)[:, None] * L + np.arange(L + 1)[None, :]
    return stream[idx]


@dataclass
class PackedData:
    train_rows: np.ndarray   # [R_train, L+1]
    val_rows: np.ndarray     # [R_val, L+1]
    train_tokens: int        # tokens in the train stream
    val_tokens: int
    unigram_counts: np.ndarray  # train-token counts, [V]

    @property
    def sequence_length(self) -> int:
        return self.train_rows.shape[1] - 1


def pack_corpus(tokenizer: Tokenizer, train_docs: list[str], val_docs: list[str],
                sequence_length: int) -> PackedData:
    train_stream = tokenize_documents(tokenizer, train_docs)
    val_stream = tokenize_documents(tokenizer, val_docs)
    train_rows = pack_rows(train_stream, sequence_length)
    val_rows = pack_rows(val_stream, sequence_length)
    if len(train_rows) == 0:
        raise UserError(f"data: the training split has {len(train_stream)} tokens, fewer than "
                        f"one row of model.sequence_length+1={sequence_length + 1}; use more "
                        "text or a smaller `model.sequence_length`")
    if len(val_rows) == 0:
        raise UserError(f"data: the validation split has {len(val_stream)} tokens, fewer than "
                        f"one row of model.sequence_length+1={sequence_length + 1}; raise "
                        "`data.val_fraction` or lower `model.sequence_length`")
    counts = np.bincount(train_stream, minlength=tokenizer.vocabulary_size)
    return PackedData(train_rows, val_rows, len(train_stream), len(val_stream), counts)


def _split_xy(rows):
    x = rows[:, :-1]
    y = rows[:, 1:]
    return x, y, tf.ones_like(y, dtype=tf.float32)


def _permute(pos: tf.Tensor, seed: int, epoch: tf.Tensor, num_rows: int) -> tf.Tensor:
    seed_vec = tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)])
    return tf.random.experimental.index_shuffle(pos, seed_vec,
                                                tf.constant(num_rows - 1, tf.int64))


def row_indices(step, batch_size: int, num_rows: int, seed: int) -> tf.Tensor:
    """Row ids [batch_size] of the batch at ``step``: a pure function of (seed, step).

    Sample i = step*B + b is position i mod R of epoch i div R's permutation. A batch spans
    at most two epochs because batch_size <= num_rows (checked by the caller).
    """
    step = tf.cast(step, tf.int64)
    sample = step * batch_size + tf.range(batch_size, dtype=tf.int64)
    epoch = sample // num_rows
    pos = sample % num_rows
    first = _permute(pos, seed, epoch[0], num_rows)
    last = _permute(pos, seed, epoch[-1], num_rows)
    return tf.where(epoch == epoch[0], first, last)


def train_dataset(rows: np.ndarray, batch_size: int, seed: int, start_step: int = 0,
                  num_steps: int | None = None, poison=()) -> tf.data.Dataset:
    """Batches for data positions start_step, start_step+1, ... (forever unless num_steps).

    ``poison``: 0-based data positions whose sample weights become NaN (fault injection:
    ``debug.nan_at_step``), so a "bad batch" follows its data position through rollbacks.
    """
    table = tf.constant(rows, tf.int32)
    n = int(rows.shape[0])
    if batch_size > n:
        raise UserError(f"`train.batch_size`={batch_size} is larger than the {n} training rows "
                        "of the corpus; use a smaller batch or more text")
    end = start_step + num_steps if num_steps is not None else np.iinfo(np.int64).max
    ds = tf.data.Dataset.range(start_step, end)

    poison = tf.constant(sorted(poison) or [-1], tf.int64)

    def batch_for(step):
        idx = row_indices(step, batch_size, n, seed)
        x, y, w = _split_xy(tf.gather(table, idx))
        bad = tf.reduce_any(tf.equal(poison, step))
        return x, y, tf.where(bad, float("nan"), w)

    return ds.map(batch_for, num_parallel_calls=tf.data.AUTOTUNE,
                  deterministic=True).prefetch(tf.data.AUTOTUNE)


def eval_dataset(rows: np.ndarray, batch_size: int, max_batches: int = 0) -> tf.data.Dataset:
    """Validation rows in order; the last batch may be smaller. max_batches=0: all rows."""
    if max_batches:
        rows = rows[: max_batches * batch_size]
    ds = tf.data.Dataset.from_tensor_slices(rows).batch(batch_size).map(_split_xy)
    return ds.prefetch(tf.data.AUTOTUNE)


def poisoned_positions(debug) -> list[int]:
    """0-based data positions that ``debug.nan_at_step`` / ``nan_for_steps`` poison."""
    if not debug.nan_at_step:
        return []
    return list(range(debug.nan_at_step - 1, debug.nan_at_step - 1 + debug.nan_for_steps))
