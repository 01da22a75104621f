"""Causal LM: next-token prediction (gpt2, llama)."""
from __future__ import annotations

import numpy as np

from tfpretrain.data.pipeline import RowFormat
from tfpretrain.data.tokenizers import EOS_ID
from tfpretrain.models.lm import CausalLM
from tfpretrain.objectives.base import (Objective, Probe, loss_metrics, new_module,
                                        unigram_log_probs)

EVAL_TOKENS = 8192  # tokens per batch of a whole-split evaluation, at least


class CausalObjective(Objective):
    name = "causal"
    model_class = CausalLM
    preset_loader = "CausalLM"
    hf_export = True
    writes_text = True

    def row_format(self, sequence_length: int, packing: str) -> RowFormat:
        """Rows of L + 1 tokens (x = row[:-1], y = row[1:]): concat rows overlap by one
        token; a pad row is ``eos doc eos``."""
        return RowFormat(sequence_length + 1, packing, overlap=1, pad_lead=EOS_ID)

    def model_options(self, cfg) -> dict:
        return {"document_mask": True} if cfg.data.document_mask else {}

    def evaluator(self, cfg, model, tokenizer):
        """Loss (nats/token), perplexity, bits per UTF-8 byte over the rows, and the
        unigram baseline's loss on the same targets."""
        import tensorflow as tf

        from tfpretrain.data.pipeline import eval_dataset

        table = tf.constant(tokenizer.token_bytes(), tf.float32)

        @tf.function(reduce_retracing=True, autograph=False)
        def batch_sums(x, y, w):
            losses = model.token_losses(y, model(x, training=False))
            return (tf.reduce_sum(tf.cast(losses, tf.float64) * tf.cast(w, tf.float64)),
                    tf.reduce_sum(w), tf.reduce_sum(tf.gather(table, y) * w))

        def evaluate(rows, counts, max_batches=0):
            used = rows[:max_batches * cfg.train.batch_size] if max_batches else rows
            # a row's loss does not depend on the rows beside it: batches of >= EVAL_TOKENS
            # tokens (the char recipe's whole split: 1.0 s faster than in batches of 12 rows)
            batch_size = max(cfg.train.batch_size, EVAL_TOKENS // cfg.model.sequence_length)
            nats, tokens, nbytes = 0.0, 0.0, 0.0
            for x, y, w in eval_dataset(used, batch_size):
                a, b, c = batch_sums(x, y, w)
                nats, tokens, nbytes = nats + float(a), tokens + float(b), nbytes + float(c)
            targets = np.asarray(used)[:, 1:].reshape(-1)
            return {**loss_metrics(nats, tokens),
                    "val_bits_per_byte": nats / np.log(2) / max(nbytes, 1.0),
                    "val_tokens": int(tokens), "val_bytes": int(nbytes),
                    "unigram_val_loss": float(-unigram_log_probs(counts)[targets].mean())}

        return evaluate

    def task_scorer(self, cfg, model, tokenizer):
        """Zero-shot tasks (``data.tasks``): ``f(TaskRows) -> (summed loss in nats of each
        row's weighted targets, whether each of them is the model's argmax)``, traced once."""
        import tensorflow as tf

        @tf.function(reduce_retracing=True, autograph=False)
        def row_scores(x, y, w):
            logits = model(x, training=False)
            nll = tf.cast(model.token_losses(y, logits), tf.float32) * w
            hit = tf.equal(tf.argmax(logits, -1, output_type=tf.int32), y) | (w == 0)
            return tf.reduce_sum(nll, 1), tf.reduce_all(hit, 1)

        def score(rows):
            batch = max(cfg.train.batch_size, EVAL_TOKENS // cfg.model.sequence_length)
            parts = []
            for i in range(0, len(rows.x), batch):
                w = rows.weight[i:i + batch]
                # causal: the padding after a batch's last target changes nothing before it;
                # cut it (the short prior rows), in widths of 32 so few shapes are traced
                width = min(-(-(int(np.flatnonzero(w.any(0))[-1]) + 1) // 32) * 32,
                            w.shape[1])
                parts.append(row_scores(rows.x[i:i + batch, :width],
                                        rows.y[i:i + batch, :width], w[:, :width]))
            return (np.concatenate([a.numpy() for a, _ in parts]).astype(np.float64),
                    np.concatenate([b.numpy() for _, b in parts]))

        return score

    def describe(self, m: dict) -> str:
        return (f"val_loss {m['val_loss']:.4f} (unigram {m['unigram_val_loss']:.4f}), "
                f"ppl {m['val_perplexity']:.2f}, bpb {m['val_bits_per_byte']:.4f}")

    def sampler(self, model, tokenizer):
        from tfpretrain.models.generation import Sampler

        return Sampler.of(model, tokenizer)

    def generate(self, model, tokenizer, a, cfg) -> list[str]:
        kwargs = {"greedy": dict(temperature=0.0),
                  "top_k": dict(temperature=a.temperature,
                                top_k=cfg.eval.top_k if a.top_k is None else a.top_k),
                  "top_p": dict(temperature=a.temperature, top_p=a.top_p)}[a.sampler]
        texts = self.sampler(model, tokenizer)([a.prompt] * a.num_samples,
                                               max_new_tokens=a.max_new_tokens, seed=a.seed,
                                               **kwargs)
        if a.num_samples == 1:
            return texts
        return [line for i, t in enumerate(texts) for line in (f"--- sample {i + 1}", t)]

    def serving_module(self, model, tokenizer, default_new_tokens: int):
        """Signatures: generate (= serving_default), sample, logits, score."""
        import tensorflow as tf

        from tfpretrain.models.generation import decoder_task, generate_text, has_kv_cache

        context = model.sequence_length
        if has_kv_cache(model):
            decoder_task(model)  # built eagerly, before the signatures are traced
        module = new_module(model, tokenizer)

        def run_generate(prompts, max_new_tokens, temperature, top_k, top_p, seed):
            new, text = generate_text(model, tokenizer, prompts, max_new_tokens, context,
                                      temperature, top_k, top_p, seed)
            return {"text": text, "token_ids": new}

        @tf.function(input_signature=[
            tf.TensorSpec([None], tf.string, name="prompts"),
            tf.TensorSpec([], tf.int32, name="max_new_tokens"),
            tf.TensorSpec([], tf.float32, name="temperature"),
            tf.TensorSpec([], tf.int32, name="top_k"),
            tf.TensorSpec([], tf.float32, name="top_p"),
            tf.TensorSpec([], tf.int32, name="seed")], autograph=False)
        def sample(prompts, max_new_tokens, temperature, top_k, top_p, seed):
            with tf.control_dependencies(sample_checks(max_new_tokens, temperature, top_k,
                                                       top_p)):
                max_new_tokens = tf.identity(max_new_tokens)
            return run_generate(prompts, max_new_tokens, temperature, top_k, top_p, seed)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="prompts")],
                     autograph=False)
        def generate(prompts):
            # a call of sample's graph, not a second trace of the decoding loops
            return sample(prompts, tf.constant(default_new_tokens, tf.int32), 0.0, 0, 1.0, 0)

        @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32, name="token_ids")],
                     autograph=False)
        def logits(token_ids):
            return {"logits": model(token_ids, training=False)}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")],
                     autograph=False)
        def score(text):
            return score_texts(model, tokenizer, text)

        module.generate, module.sample, module.logits, module.score = \
            generate, sample, logits, score
        return module, {"serving_default": generate, "generate": generate, "sample": sample,
                        "logits": logits, "score": score}

    def probe(self, model, tokenizer, prompt: str, sample_tokens: int) -> Probe:
        from tfpretrain.models.generation import Sampler

        L = model.sequence_length
        prompts = [prompt, "", "The", prompt * 60]  # the last: longer than the context
        rows = [([EOS_ID] + tokenizer.encode(p * 50))[:L] for p in (prompt, "Lily and Tom")]
        ids = np.array([r + [model.PAD_ID] * (L - len(r)) for r in rows], np.int32)

        def expected():
            tokens, _ = Sampler.of(model, tokenizer).run(prompts, max_new_tokens=sample_tokens)
            return model(ids, training=False).numpy(), tokens

        return Probe(ids, prompts, expected, "greedy generation differs from the Keras model's")

    def keras_task(self, model):
        from tfpretrain.models.registry import arch_of

        return arch_of(model.backbone).task_class()(backbone=model.backbone, preprocessor=None)

    def preset_features(self, model, tokenizer, prompt: str):
        ids = np.array([[EOS_ID] + tokenizer.encode(prompt)[: model.sequence_length - 1]],
                       np.int32)
        return ids, {"token_ids": ids, "padding_mask": np.ones_like(ids, bool)}


def sample_checks(max_new_tokens, temperature, top_k, top_p) -> list:
    """In-graph checks of the ``sample`` signature's arguments: a bad request fails with an
    InvalidArgument error naming the argument (TF Serving returns it to the client)."""
    import tensorflow as tf

    return [
        tf.debugging.assert_non_negative(max_new_tokens, message="max_new_tokens must be >= 0"),
        tf.debugging.assert_equal(tf.math.is_finite(temperature), True,
                                  message="temperature must be finite"),
        tf.debugging.assert_non_negative(temperature, message="temperature must be >= 0"),
        tf.debugging.assert_non_negative(top_k, message="top_k must be >= 0"),
        tf.debugging.assert_positive(top_p, message="top_p must be in (0, 1]"),
        tf.debugging.assert_less_equal(top_p, 1.0, message="top_p must be in (0, 1]"),
    ]


def score_texts(model, tokenizer, text):
    """Graph-mode log-likelihood of each text (after an end-of-text token), in chunks of
    the context: log_likelihood (nats), num_tokens, bits_per_byte."""
    import tensorflow as tf

    context = model.sequence_length
    ids = tokenizer.tokenize(text)
    batch = tf.cast(ids.nrows(), tf.int32)
    eos = tf.RaggedTensor.from_tensor(tf.fill([batch, 1], EOS_ID))
    seq = tf.concat([eos, ids], axis=1)                   # targets are seq[:, 1:]
    n_tokens = tf.cast(ids.row_lengths(), tf.int32)
    longest = tf.reduce_max(n_tokens)
    chunks = tf.maximum(1, (longest + context - 1) // context)
    dense = seq.to_tensor(default_value=0, shape=tf.stack([batch, chunks * context + 1]))
    x = tf.reshape(dense[:, :-1], [-1, context])
    y = tf.reshape(dense[:, 1:], [-1, context])
    valid = tf.reshape(tf.range(chunks * context)[None, :] < n_tokens[:, None], [-1, context])
    token_nll = model.token_losses(y, model(x, training=False))
    nll = tf.reduce_sum(tf.reshape(tf.where(valid, token_nll, 0.0), [batch, -1]), axis=1)
    n_bytes = tf.cast(tf.strings.length(text, unit="BYTE"), tf.float32)
    return {"log_likelihood": -nll, "num_tokens": n_tokens,
            "bits_per_byte": nll / tf.math.log(2.0) / tf.maximum(n_bytes, 1.0)}
