"""Autoregressive sampling in plain TF ops (no XLA-only ops), shared by fit, generate and
the exported SavedModel.

When the longest prompt plus the new tokens fit the context, generation uses keras_hub's
KV-cached decoding (``call_with_cache``: one token per step), with the cache write traced as
core TF ops (pad + select) instead of ``XlaDynamicUpdateSlice``. Otherwise each step runs
the model over a window of at most ``context`` tokens ending at the current position of each
row, so prompts of any length work (a prompt longer than the context is truncated from the
left). Both give the same tokens (greedy). Every prompt is prefixed with ``eos``, the
document boundary the model saw in training, so an empty prompt starts a fresh story.

Masked LMs get fill-mask instead (:func:`fill_mask`): each ``[MASK]`` in the text is
predicted (top-k tokens and probabilities) in one forward pass.
"""
from __future__ import annotations

import tensorflow as tf

from tfpretrain import compat
from tfpretrain.data.tokenizers import BOS_ID, EOS_ID, MASK_ID, NUM_SPECIAL, PAD_ID
from tfpretrain.models.registry import arch_of

NEG_INF = -1e9


def filter_logits(logits, temperature, top_k, top_p):
    """Temperature, top-k and nucleus (top-p) filtering of logits [batch, vocab]."""
    vocab = tf.shape(logits)[-1]
    scaled = logits / tf.maximum(temperature, 1e-6)
    k = tf.clip_by_value(top_k, 1, vocab)
    kth = tf.math.top_k(scaled, k=k).values[:, -1:]
    scaled = tf.where((top_k > 0) & (scaled < kth), NEG_INF, scaled)
    sorted_logits = tf.sort(scaled, axis=-1, direction="DESCENDING")
    probs = tf.nn.softmax(sorted_logits, axis=-1)
    before = tf.cumsum(probs, axis=-1, exclusive=True)
    kept = tf.where(before < top_p, sorted_logits, tf.fill(tf.shape(sorted_logits), 1e9))
    threshold = tf.reduce_min(kept, axis=-1, keepdims=True)
    return tf.where((top_p < 1.0) & (scaled < threshold), NEG_INF, scaled)


def next_token(logits, temperature, top_k, top_p, seed, step):
    """Greedy (temperature <= 0) or a seeded sample from filtered logits [batch, vocab]."""
    return tf.cond(
        temperature > 0,
        lambda: tf.cast(tf.random.stateless_categorical(
            filter_logits(logits, temperature, top_k, top_p), 1,
            seed=tf.stack([seed, step]))[:, 0], tf.int32),
        lambda: tf.argmax(logits, axis=-1, output_type=tf.int32))


def generate_ids(logits_fn, prompts: tf.RaggedTensor, max_new_tokens, context: int,
                 temperature=0.0, top_k=0, top_p=1.0, seed=0):
    """Continue ``prompts`` (ragged int32 [batch, None], without the leading eos).

    Returns the new tokens, int32 [batch, max_new_tokens], padded with ``pad`` after a row
    emits ``eos`` (the eos itself is kept). temperature <= 0 means greedy.
    """
    max_new_tokens = tf.cast(max_new_tokens, tf.int32)
    temperature = tf.cast(temperature, tf.float32)
    top_k = tf.cast(top_k, tf.int32)
    top_p = tf.cast(top_p, tf.float32)
    seed = tf.cast(seed, tf.int32)
    prompts = tf.cast(prompts, tf.int32)
    batch = tf.cast(prompts.nrows(), tf.int32)
    eos = tf.fill([batch, 1], EOS_ID)
    prompts = tf.concat([tf.RaggedTensor.from_tensor(eos), prompts], axis=1)
    lens = tf.cast(prompts.row_lengths(), tf.int32)
    start_lens = lens
    total = tf.reduce_max(lens) + max_new_tokens
    buf = prompts.to_tensor(default_value=PAD_ID, shape=tf.stack([batch, total]))
    width = tf.minimum(tf.constant(context, tf.int32), total)
    rows = tf.range(batch)

    def step(i, buf, lens, done):
        start = tf.maximum(lens - width, 0)
        idx = tf.minimum(start[:, None] + tf.range(width)[None, :], total - 1)
        window = tf.gather(buf, idx, batch_dims=1)
        logits = tf.cast(logits_fn(window), tf.float32)
        last = tf.gather(logits, lens - 1 - start, batch_dims=1)
        nxt = next_token(last, temperature, top_k, top_p, seed, i)
        nxt = tf.where(done, PAD_ID, nxt)
        buf = tf.tensor_scatter_nd_update(buf, tf.stack([rows, lens], axis=1), nxt)
        return i + 1, buf, lens + 1, done | tf.equal(nxt, EOS_ID)

    _, buf, lens, _ = tf.while_loop(
        lambda i, buf, lens, done: (i < max_new_tokens) & ~tf.reduce_all(done), step,
        [tf.constant(0), buf, lens, tf.zeros([batch], tf.bool)])
    idx = tf.minimum(start_lens[:, None] + tf.range(max_new_tokens)[None, :], total - 1)
    new = tf.gather(buf, idx, batch_dims=1)
    valid = tf.range(max_new_tokens)[None, :] < (lens - start_lens)[:, None]
    return tf.where(valid, new, PAD_ID)


def has_kv_cache(model) -> bool:
    """A decoder whose keras_hub task has KV-cached decoding (not a masked LM)."""
    return not hasattr(model, "task") and arch_of(model.backbone).decoder


@tf.autograph.experimental.do_not_convert
def decoder_task(model):
    """keras_hub's CausalLM task over our model's backbone (no new weights): it has the
    KV-cached forward pass (``_build_cache`` / ``call_with_cache``). Create it eagerly
    (Sampler and the exporter do) before tracing anything that uses it."""
    task = getattr(model, "_decoder_task", None)
    if task is None:
        task = arch_of(model.backbone).task_class()(backbone=model.backbone, preprocessor=None)
        object.__setattr__(model, "_decoder_task", task)  # not tracked: shares the weights
    return task


def generate_ids_cached(task, prompts: tf.RaggedTensor, max_new_tokens, temperature=0.0,
                        top_k=0, top_p=1.0, seed=0):
    """:func:`generate_ids` with a KV cache: each step runs the model on one token per row.
    Needs (longest prompt + 1 + max_new_tokens) <= the context; rows share one position
    counter (keras_hub's scheme): a row still inside its prompt copies its prompt token."""
    max_new_tokens = tf.cast(max_new_tokens, tf.int32)
    temperature = tf.cast(temperature, tf.float32)
    top_k, top_p = tf.cast(top_k, tf.int32), tf.cast(top_p, tf.float32)
    seed = tf.cast(seed, tf.int32)
    prompts = tf.cast(prompts, tf.int32)
    batch = tf.cast(prompts.nrows(), tf.int32)
    prompts = tf.concat([tf.RaggedTensor.from_tensor(tf.fill([batch, 1], EOS_ID)), prompts],
                        axis=1)
    lens = tf.cast(prompts.row_lengths(), tf.int32)
    total = tf.reduce_max(lens) + max_new_tokens
    buf = prompts.to_tensor(default_value=PAD_ID, shape=tf.stack([batch, total]))
    columns = tf.range(total)[None, :]

    def step(index, cache, buf, done):
        logits, _, cache = compat.call_with_cache(task, buf[:, index - 1:index], cache,
                                                  index - 1)
        last = tf.cast(logits[:, 0, :], tf.float32)
        nxt = next_token(last, temperature, top_k, top_p, seed, index)
        in_prompt = index < lens
        nxt = tf.where(in_prompt, buf[:, index], tf.where(done, PAD_ID, nxt))
        buf = tf.where(tf.equal(columns, index), nxt[:, None], buf)
        generated = index - lens + 1          # new tokens of the row so far
        done = done | (~in_prompt & (tf.equal(nxt, EOS_ID) | (generated >= max_new_tokens)))
        return index + 1, cache, buf, done

    with compat.pure_tf_slice_update():
        _, cache = compat.build_cache(task, buf)
        index, _, buf, _ = tf.while_loop(
            lambda index, cache, buf, done: (index < total) & ~tf.reduce_all(done), step,
            [tf.reduce_min(lens), cache, buf, tf.zeros([batch], tf.bool)],
            shape_invariants=[tf.TensorShape([]), tf.TensorShape([None] * 6),
                              tf.TensorShape([None, None]), tf.TensorShape([None])])
    idx = tf.minimum(lens[:, None] + tf.range(max_new_tokens)[None, :], total - 1)
    new = tf.gather(buf, idx, batch_dims=1)
    seen_eos = tf.cumsum(tf.cast(tf.equal(new, EOS_ID), tf.int32), axis=1, exclusive=True)
    valid = (lens[:, None] + tf.range(max_new_tokens)[None, :] < index) & (seen_eos == 0)
    return tf.where(valid, new, PAD_ID)


def strip_after_eos(ids):
    """Replace everything from the first eos on with pad (ids [batch, n])."""
    seen = tf.cumsum(tf.cast(tf.equal(ids, EOS_ID), tf.int32), axis=1)
    return tf.where(seen > 0, PAD_ID, ids)


def generate_text(model, tokenizer, prompts, max_new_tokens, context: int, temperature=0.0,
                  top_k=0, top_p=1.0, seed=0, use_cache=None):
    """Graph-mode text in, (new token ids, prompt + continuation text) out. ``use_cache``:
    None decides in the graph (KV cache when prompt + continuation fit the context, else
    the sliding window); True/False when the caller already knows (traces one path)."""
    ids = tokenizer.tokenize(prompts)
    if has_kv_cache(model) and use_cache is not False:
        task = decoder_task(model)

        def cached():
            return generate_ids_cached(task, ids, max_new_tokens, temperature, top_k, top_p,
                                       seed)

        def windowed():
            return generate_ids(lambda w: model(w, training=False), ids, max_new_tokens,
                                context, temperature, top_k, top_p, seed)

        if use_cache:
            new = cached()
        else:
            fits = tf.cast(ids.bounding_shape()[1], tf.int32) + 1 \
                + tf.cast(max_new_tokens, tf.int32) <= context
            new = tf.cond(fits, cached, windowed)
    else:
        new = generate_ids(lambda w: model(w, training=False), ids, max_new_tokens, context,
                           temperature, top_k, top_p, seed)
    full = tf.concat([ids, tf.RaggedTensor.from_tensor(strip_after_eos(new))], axis=1)
    return new, tokenizer.detokenize(full)


class Sampler:
    """Eager-friendly wrapper: text in, prompt + continuation out, with the run's tokenizer."""

    def __init__(self, model, tokenizer, context: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.context = context or model.sequence_length
        if has_kv_cache(model):
            decoder_task(model)
        self._fns = {}

    @classmethod
    def of(cls, model, tokenizer):
        """The model's sampler, made once: fit's evaluation-time samples, its final sample
        and the export's check reuse its traced graphs (a trace costs seconds)."""
        sampler = getattr(model, "_tfpretrain_sampler", None)
        if sampler is None or sampler.tokenizer is not tokenizer:
            sampler = cls(model, tokenizer)
            object.__setattr__(model, "_tfpretrain_sampler", sampler)  # not tracked
        return sampler

    def _fn(self, use_cache: bool):
        """One graph per generation path, for any batch of prompts."""
        if use_cache not in self._fns:
            @tf.function(input_signature=[tf.TensorSpec([None], tf.string)]
                         + [tf.TensorSpec([], dtype) for dtype in
                            (tf.int32, tf.float32, tf.int32, tf.float32, tf.int32)],
                         autograph=False)  # explicit loops: no source conversion (seconds)
            def generate(prompts, max_new_tokens, temperature, top_k, top_p, seed):
                return generate_text(self.model, self.tokenizer, prompts, max_new_tokens,
                                     self.context, temperature, top_k, top_p, seed, use_cache)
            self._fns[use_cache] = generate
        return self._fns[use_cache]

    def run(self, prompts: list[str], max_new_tokens=64, temperature=0.0, top_k=0, top_p=1.0,
            seed=0):
        """(new token ids [batch, max_new_tokens] as numpy, prompt + continuation texts)."""
        prompts = tf.constant(list(prompts), tf.string)
        # decided here, eagerly, so only one generation path is traced (the same choice the
        # SavedModel makes in its graph)
        longest = int(self.tokenizer.tokenize(prompts).bounding_shape()[1])
        use_cache = longest + 1 + max_new_tokens <= self.context
        ids, text = self._fn(use_cache)(
            prompts, tf.constant(max_new_tokens, tf.int32), tf.constant(temperature, tf.float32),
            tf.constant(top_k, tf.int32), tf.constant(top_p, tf.float32),
            tf.constant(seed, tf.int32))
        return ids.numpy(), [t.decode("utf-8", errors="replace") for t in text.numpy()]

    def __call__(self, prompts, **kwargs):
        """Text(s) in, prompt + continuation text(s) out."""
        if isinstance(prompts, str):
            return self.run([prompts], **kwargs)[1][0]
        return self.run(prompts, **kwargs)[1]


def fill_mask(model, tokenizer, texts, context: int, top_k: int = 5):
    """Graph-mode fill-mask for a masked LM. ``texts`` string [batch], each with zero or more
    ``[MASK]``; rows are ``[CLS] text [SEP]`` cut to ``context`` tokens from the right (masks
    past the context get no prediction). Returns a dict:
    ``token_ids`` / ``tokens`` / ``scores`` [batch, masks, top_k] (probabilities, special
    tokens excluded), ``num_masks`` [batch], ``text`` [batch] (each mask replaced by its
    top-1 token). ``masks`` = the most masks in any text of the batch (at least 1); unused
    slots have id pad, token "" and score 0."""
    ids = tokenizer.tokenize(texts)[:, : context - 2]
    batch = tf.cast(ids.nrows(), tf.int32)
    bos = tf.RaggedTensor.from_tensor(tf.fill([batch, 1], BOS_ID))
    eos = tf.RaggedTensor.from_tensor(tf.fill([batch, 1], EOS_ID))
    dense = tf.concat([bos, ids, eos], axis=1).to_tensor(default_value=PAD_ID)
    width = tf.shape(dense)[1]
    is_mask = tf.equal(dense, MASK_ID)
    num_masks = tf.reduce_sum(tf.cast(is_mask, tf.int32), axis=1)
    slots = tf.maximum(1, tf.reduce_max(num_masks))
    pos = tf.broadcast_to(tf.range(width)[None, :], tf.shape(dense))
    positions = tf.argsort(tf.where(is_mask, pos, width + pos), axis=1, stable=True)[:, :slots]
    valid = tf.gather(is_mask, positions, batch_dims=1)
    features = {"token_ids": dense, "padding_mask": tf.not_equal(dense, PAD_ID),
                "segment_ids": tf.zeros_like(dense), "mask_positions": positions}
    logits = tf.cast(model(features, training=False), tf.float32)
    vocab = tf.shape(logits)[-1]
    logits = tf.where(tf.range(vocab) < NUM_SPECIAL, NEG_INF, logits)
    top = tf.math.top_k(tf.nn.softmax(logits, axis=-1), k=top_k)
    token_ids = tf.where(valid[:, :, None], top.indices, PAD_ID)
    scores = tf.where(valid[:, :, None], top.values, 0.0)
    tokens = tf.reshape(tokenizer.detokenize(tf.reshape(token_ids, [-1, 1])),
                        tf.shape(token_ids))
    rows = tf.broadcast_to(tf.range(batch)[:, None], tf.shape(positions))
    where = tf.boolean_mask(tf.stack([rows, positions], axis=-1), valid)
    filled = tf.tensor_scatter_nd_update(dense, where, tf.boolean_mask(token_ids[:, :, 0], valid))
    return {"token_ids": token_ids, "tokens": tf.strings.strip(tokens), "scores": scores,
            "num_masks": num_masks, "text": tokenizer.detokenize(filled)}


class FillMasker:
    """Eager wrapper of :func:`fill_mask`; called like :class:`Sampler` (extra sampling
    arguments are ignored) so fit can log fill-mask samples for masked LMs."""

    def __init__(self, model, tokenizer, context: int | None = None, top_k: int = 5):
        self.model, self.tokenizer = model, tokenizer
        self.context = context or model.sequence_length
        self._fn = tf.function(
            lambda texts, k: fill_mask(self.model, self.tokenizer, texts, self.context, k),
            reduce_retracing=True, autograph=False)
        self.top_k = top_k

    def run(self, texts: list[str], top_k: int | None = None) -> list[dict]:
        """Per text: {"text": filled text, "masks": [[(token, prob), ...] per mask]}."""
        out = self._fn(tf.constant(list(texts), tf.string), top_k or self.top_k)
        results = []
        for i, text in enumerate(out["text"].numpy()):
            n = int(out["num_masks"][i])
            masks = [[(t.decode("utf-8", "replace"), float(sc))
                      for t, sc in zip(out["tokens"][i, m].numpy(), out["scores"][i, m].numpy())]
                     for m in range(n)]
            results.append({"text": text.decode("utf-8", "replace"), "masks": masks})
        return results

    def __call__(self, prompts, **_ignored):
        """Text(s) with [MASK] in, "filled text | [MASK] 1: tok p, ..." out."""
        single = isinstance(prompts, str)
        results = self.run([prompts] if single else list(prompts))
        lines = [r["text"] + "".join(
            f" | [MASK] {j + 1}: " + ", ".join(f"{t} {p:.2f}" for t, p in m[:3])
            for j, m in enumerate(r["masks"])) for r in results]
        return lines[0] if single else lines
