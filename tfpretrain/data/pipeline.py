"""Tokenize -> pack -> (x, y, sample_weight), deterministic and addressable by step.

Packing (``data.packing``), causal LM: every document's tokens are followed by ``eos``.
- ``concat``: the streams are concatenated and cut into rows of ``sequence_length + 1``
  tokens that overlap by one token (row r covers ``stream[r*L : r*L + L + 1]``). So every
  token of the stream is a target exactly once and appears in exactly one ``x`` row, in
  order; only the final partial row is dropped.
- ``pad``: one row per document, ``eos doc eos`` cut to L + 1 tokens and padded with ``pad``
  (padding targets have weight 0).
Masked LM (rows of L tokens, RoBERTa-style, no next-sentence task):
- ``concat``: ``bos`` + L - 1 tokens of the eos-separated stream per row ([CLS] d1 [SEP]
  d2 [SEP] ...), rows not overlapping.
- ``pad``: ``bos doc eos`` per row, the document cut to fit, padded.
Masks for masked LM are drawn per batch from (seed, step): see :mod:`.masking`.

Batches: the batch at step k holds the rows with global sample index ``k*B .. k*B+B-1``;
sample index i is row ``index_shuffle(i mod R, seed=(seed, i div R))`` - a fresh seeded
permutation per epoch. A batch is therefore a pure function of (seed, step): a run that
restarts at step k sees exactly the batches an unbroken run sees from k.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from tfpretrain.data import service as feeders
from tfpretrain.data.tokenizers import EOS_ID, PAD_ID, Tokenizer
from tfpretrain.errors import UserError

TOKENIZE_BATCH = 256


def tokenize_batches(tokenizer: Tokenizer, batches):
    """``(tags, ids)`` for each ``(tags, documents)`` of ``batches`` (tags: a tuple of ints
    passed through; documents: at most ``TOKENIZE_BATCH`` strings): the documents' ids as
    one int32 stream, each document followed by eos. One ``tf.data`` pipeline tokenizes
    the batches in parallel, in order, while the Python iterator reads ahead."""
    eos = tf.constant([[EOS_ID]], tf.int32)

    def tokenize(tags, texts):
        ragged = tokenizer.tokenize(texts)
        ends = tf.RaggedTensor.from_tensor(tf.tile(eos, [ragged.nrows(), 1]))
        return tags, tf.concat([ragged, ends], axis=1).flat_values

    failed = []

    def generate():
        try:
            for tags, docs in batches:
                yield np.asarray(tags, np.int64), np.asarray(docs, object)
        except Exception as exc:  # raised to the caller as it is, not as a TF error
            failed.append(exc)

    ds = tf.data.Dataset.from_generator(generate, output_signature=(
        tf.TensorSpec([None], tf.int64), tf.TensorSpec([None], tf.string)))
    ds = ds.map(tokenize, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    for tags, ids in ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator():
        yield tuple(int(t) for t in tags), ids.astype(np.int32, copy=False)
    if failed:
        raise failed[0]


def tokenize_documents(tokenizer: Tokenizer, docs: list[str]) -> np.ndarray:
    """All documents as one int32 stream, each followed by eos (see tokenize_batches)."""
    chunks = (((), docs[i:i + TOKENIZE_BATCH]) for i in range(0, len(docs), TOKENIZE_BATCH))
    parts = [ids for _, ids in tokenize_batches(tokenizer, chunks)]
    return np.concatenate(parts) if parts else np.zeros([0], np.int32)


@dataclass(frozen=True)
class RowFormat:
    """How a token stream becomes fixed-width rows (made by the objective, see
    ``tfpretrain.objectives``): ``width`` tokens per row; ``concat`` rows start
    ``width - overlap`` tokens apart, each prefixed with ``concat_lead`` when it is set
    (the prefix counts in the width); ``pad`` rows are ``pad_lead doc eos`` cut to
    ``width`` and padded."""
    width: int
    packing: str = "concat"
    overlap: int = 0
    concat_lead: int | None = None
    pad_lead: int = EOS_ID

    @property
    def stride(self) -> int:
        """Stream tokens consumed by one concat row (0 for pad rows: one per document)."""
        if self.packing == "pad":
            return 0
        return self.width - (self.concat_lead is not None) - self.overlap


def concat_rows(stream: np.ndarray, fmt: RowFormat) -> np.ndarray:
    """Concat rows of ``fmt`` over ``stream``; the final partial row is dropped."""
    body = fmt.width - (fmt.concat_lead is not None)
    n_rows = (len(stream) - fmt.overlap) // fmt.stride if len(stream) >= body else 0
    if n_rows == 0:
        return np.zeros([0, fmt.width], np.int32)
    idx = np.arange(n_rows)[:, None] * fmt.stride + np.arange(body)[None, :]
    rows = stream[idx].astype(np.int32, copy=False)
    if fmt.concat_lead is None:
        return rows
    lead = np.full([n_rows, 1], fmt.concat_lead, np.int32)
    return np.concatenate([lead, rows], axis=1)


def documents_of(stream: np.ndarray) -> list[np.ndarray]:
    """The eos-terminated documents of a stream (without their eos)."""
    ends = np.flatnonzero(stream == EOS_ID)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [stream[a:b] for a, b in zip(starts, ends)]


def pad_rows(stream: np.ndarray, width: int, first: int) -> np.ndarray:
    """One row per document: ``first doc eos`` cut to ``width`` and padded with pad."""
    docs = documents_of(stream)
    rows = np.full([len(docs), width], PAD_ID, np.int32)
    for i, d in enumerate(docs):
        row = np.concatenate([[first], d[: width - 2], [EOS_ID]])
        rows[i, : len(row)] = row
    return rows


def text_rows(data_cfg, seed: int, tokenizer: Tokenizer, fmt: "RowFormat", spec,
              key: str = "--data") -> tuple[np.ndarray, np.ndarray, int]:
    """(rows, unigram token counts, documents) of every document of ``spec`` (read like
    ``data.path``; errors name ``key``), tokenized and packed as training's rows are: what
    ``evaluate --data`` and ``eval.sets`` score."""
    from tfpretrain.data.sources import read_documents

    docs = read_documents(data_cfg, seed, spec, key=key)[0]
    if not docs:
        raise UserError(f"{key}: no text in {spec}")
    stream = tokenize_documents(tokenizer, docs)
    rows = make_rows(stream, fmt)
    if len(rows) == 0:
        raise UserError(f"{key}: the text of {spec} is shorter than one row of {fmt.width} "
                        "tokens")
    return np.asarray(rows), np.bincount(stream, minlength=tokenizer.vocabulary_size), len(docs)


def make_rows(stream: np.ndarray, fmt: RowFormat) -> np.ndarray:
    """Rows [R, fmt.width] of ``stream``."""
    if fmt.packing == "pad":
        return pad_rows(stream, fmt.width, fmt.pad_lead)
    return concat_rows(stream, fmt)


class RowPacker:
    """``make_rows`` over a stream that arrives in pieces, each ending at a document end:
    the tokens not yet in a full row are carried into the next piece, so the rows equal
    ``make_rows`` of the whole stream (a causal row's last token starts the next row)."""

    def __init__(self, fmt: RowFormat):
        self.fmt = fmt
        self.carry = np.zeros([0], np.int32)

    def add(self, stream: np.ndarray) -> np.ndarray:
        buf = np.concatenate([self.carry, stream]) if len(self.carry) else stream
        rows = make_rows(buf, self.fmt)
        stride = self.fmt.stride
        self.carry = buf[len(rows) * stride:] if stride else self.carry[:0]
        return rows


def too_few_rows(split: str, tokens: int, width: int) -> UserError:
    """The error for a split too small for one row (one message, two callers)."""
    fix = ("use more text or a smaller `model.sequence_length`" if split == "training" else
           "raise `data.val_fraction` or lower `model.sequence_length`")
    return UserError(f"data: the {split} split has {tokens} tokens, fewer than one row of "
                     f"{width} tokens (model.sequence_length); {fix}")


@dataclass
class PackedData:
    train_rows: np.ndarray   # [R_train, RowFormat.width] (causal L+1, masked L)
    val_rows: np.ndarray     # [R_val, RowFormat.width]
    train_tokens: int        # tokens in the train stream
    val_tokens: int
    unigram_counts: np.ndarray  # train-token counts, [V]


def pack_corpus(tokenizer: Tokenizer, train_docs: list[str], val_docs: list[str],
                fmt: RowFormat) -> PackedData:
    train_stream = tokenize_documents(tokenizer, train_docs)
    val_stream = tokenize_documents(tokenizer, val_docs)
    train_rows = make_rows(train_stream, fmt)
    val_rows = make_rows(val_stream, fmt)
    if len(train_rows) == 0:
        raise too_few_rows("training", len(train_stream), fmt.width)
    if len(val_rows) == 0:
        raise too_few_rows("validation", len(val_stream), fmt.width)
    counts = np.bincount(train_stream, minlength=tokenizer.vocabulary_size)
    return PackedData(train_rows, val_rows, len(train_stream), len(val_stream), counts)


def _split_xy(rows, seed=None):
    """Causal LM batch: inputs, next-token targets, weight 0 on padding targets."""
    x = rows[:, :-1]
    y = rows[:, 1:]
    return x, y, tf.cast(y != PAD_ID, tf.float32)


_split_xy.row_wise = True  # each row's (x, y, w) depends on that row alone


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


def read_rows(rows: np.ndarray, index: tf.Tensor) -> tf.Tensor:
    """``rows[index]`` as an int32 tensor (float32 for float rows), read from the numpy
    array (the token cache's memory-mapped file, usually) when the batch is made: the
    corpus is never copied into a TensorFlow constant, so training holds one batch of it in
    memory, not all of it."""
    dtype = tf.float32 if np.issubdtype(rows.dtype, np.floating) else tf.int32
    out = tf.numpy_function(lambda i: np.asarray(rows[i], dtype.as_numpy_dtype), [index],
                            dtype, stateful=False)
    return tf.ensure_shape(out, index.shape.concatenate(rows.shape[1:]))


def train_dataset(rows: np.ndarray, batch_size: int, seed: int, start_step: int = 0,
                  num_steps: int | None = None, poison=(), to_batch=None,
                  part: tuple | None = None, service=(), targets=()) -> tf.data.Dataset:
    """Batches for data positions start_step, start_step+1, ... (forever unless num_steps).

    ``poison``: 0-based data positions whose sample weights become NaN (fault injection,
    see ``tfpretrain.faults``), so a "bad batch" follows its data position through
    rollbacks.
    ``to_batch(rows, seed)``: rows -> (x, y, weight); default: causal LM. ``seed`` is
    ``[train seed, data position]`` (the masked-LM masks are drawn from it).
    ``part=(lo, hi)``: only rows lo..hi-1 of every batch (one worker's share of the global
    batch, the same rows it would have in it). A row-wise ``to_batch`` (causal LM) reads only
    those rows from the cache; others (masked LM draws its masks for the whole batch) make
    the whole batch and keep the part, so the part is the same either way.
    ``service``: tf.data service feeders (``grpc://host:port``) that make the batches, the
    same ones in the same order (see :mod:`.service`).
    ``targets``: arrays with one entry per row (``distill.topk``'s teacher ids and
    log-probabilities), read with the batch's rows: ``y`` becomes ``(y, *targets)``.
    Row-wise batchers (causal LM) only.
    """
    to_batch = to_batch or _split_xy
    n = int(rows.shape[0])
    if batch_size > n:
        raise UserError(f"`train.batch_size`={batch_size} is larger than the {n} training rows "
                        "of the corpus; use a smaller batch or more text")
    end = start_step + num_steps if num_steps is not None else np.iinfo(np.int64).max
    poison = tf.constant(sorted(poison) or [-1], tf.int64)
    lo, hi = part or (0, batch_size)
    early = getattr(to_batch, "row_wise", False)
    read = feeders.file_reader(rows) if service else (lambda index: read_rows(rows, index))

    def batch_for(step):
        idx = row_indices(step, batch_size, n, seed)
        if early:
            idx = idx[lo:hi]
        x, y, w = to_batch(read(idx), tf.stack([tf.constant(seed, tf.int64), step]))
        if targets:
            y = (y, *(read_rows(t, idx) for t in targets))
        if not early and (lo, hi) != (0, batch_size):
            x, y, w = tf.nest.map_structure(lambda t: t[lo:hi], (x, y, w))
        bad = tf.reduce_any(tf.equal(poison, step))
        return x, y, tf.where(bad, float("nan"), w)

    def batches(first, every=1, numbered=False):
        return tf.data.Dataset.range(first, end, every).map(
            lambda step: (step, batch_for(step)) if numbered else batch_for(step),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    if not service:
        return batches(start_step).prefetch(tf.data.AUTOTUNE)
    ds = feeders.round_robin(lambda first, every: batches(first, every, numbered=True),
                             list(service), start_step, end)
    return ds.prefetch(tf.data.AUTOTUNE)


EVAL_SEED = 0x5EED  # masked-LM validation masks: fixed, so every evaluation sees the same


def eval_dataset(rows: np.ndarray, batch_size: int, max_batches: int = 0,
                 to_batch=None) -> tf.data.Dataset:
    """Validation rows in order; the last batch may be smaller. max_batches=0: all rows."""
    to_batch = to_batch or _split_xy
    n = len(rows) if not max_batches else min(len(rows), max_batches * batch_size)

    def batch(i):
        start = i * batch_size
        index = tf.range(start, tf.minimum(start + batch_size, n))
        return to_batch(read_rows(rows, index), tf.stack([tf.constant(EVAL_SEED, tf.int64), i]))

    ds = tf.data.Dataset.range(-(-n // batch_size)).map(batch)
    return ds.prefetch(tf.data.AUTOTUNE)
