"""Masked LM (BERT/RoBERTa-style, no next-sentence task): bert."""
from __future__ import annotations

import numpy as np

from tfpretrain.data.pipeline import RowFormat
from tfpretrain.data.tokenizers import BOS_ID, EOS_ID, MASK_TOKEN, NUM_SPECIAL, PAD_ID
from tfpretrain.errors import UserError
from tfpretrain.models.lm import MaskedLM
from tfpretrain.objectives.base import (Objective, Probe, loss_metrics, new_module,
                                        unigram_log_probs)

FILL_MASK_TOP_K = 5  # predictions per [MASK] in the fill_mask signature and generate


class MaskedObjective(Objective):
    name = "mlm"
    model_class = MaskedLM
    preset_loader = "MaskedLM"
    hf_export = False

    def row_format(self, sequence_length: int, packing: str) -> RowFormat:
        """Rows of L tokens: concat rows are ``bos`` + L - 1 stream tokens ([CLS] d1 [SEP]
        d2 [SEP] ...), not overlapping; a pad row is ``bos doc eos``."""
        return RowFormat(sequence_length, packing, overlap=0, concat_lead=BOS_ID,
                         pad_lead=BOS_ID)

    def batcher(self, cfg, tokenizer):
        from tfpretrain.data.masking import Masker

        return Masker(cfg.mlm, tokenizer.vocabulary_size, cfg.model.sequence_length,
                      tokenizer.word_starts())

    def evaluator(self, cfg, model, tokenizer):
        """Loss and accuracy over the masked positions (masks fixed per batch, see
        pipeline.EVAL_SEED), plus the baselines from train-token ``counts``: always
        predicting the most frequent real token (accuracy) and the unigram distribution
        (loss)."""
        import tensorflow as tf

        from tfpretrain.data.pipeline import eval_dataset

        @tf.function(reduce_retracing=True, autograph=False)
        def batch_sums(x, y, w, best, logp):
            logits = model(x, training=False)
            w64 = tf.cast(w, tf.float64)
            losses = tf.cast(model.token_losses(y, logits), tf.float64)
            return (tf.reduce_sum(losses * w64), tf.reduce_sum(w64),
                    tf.reduce_sum(tf.cast(model.correct(y, logits), tf.float64) * w64),
                    tf.reduce_sum(tf.cast(tf.equal(y, best), tf.float64) * w64),
                    -tf.reduce_sum(tf.gather(logp, y) * w64))

        masker = self.batcher(cfg, tokenizer)

        def evaluate(rows, counts, max_batches=0):
            if counts is None:
                counts = np.ones([model.backbone.vocabulary_size])
            best = int(np.argmax(counts[NUM_SPECIAL:])) + NUM_SPECIAL
            logp = tf.constant(unigram_log_probs(counts), tf.float64)
            totals = np.zeros(5)
            for x, y, w in eval_dataset(rows, cfg.train.batch_size, max_batches,
                                        to_batch=masker):
                sums = batch_sums(x, y, w, tf.constant(best, y.dtype), logp)
                totals += np.array([float(v) for v in sums])
            nats, n, correct, baseline, unigram = totals
            n = max(n, 1.0)
            return {**loss_metrics(nats, n),
                    "val_masked_accuracy": correct / n,
                    "baseline_masked_accuracy": baseline / n,
                    "unigram_val_loss": unigram / n, "val_masked_tokens": int(n),
                    "baseline_token": best}

        return evaluate

    def describe(self, m: dict) -> str:
        return (f"val_loss {m['val_loss']:.4f} (unigram {m['unigram_val_loss']:.4f}), "
                f"masked accuracy {m['val_masked_accuracy']:.4f} (baseline "
                f"{m['baseline_masked_accuracy']:.4f}), ppl {m['val_perplexity']:.2f}")

    def sample_prompt(self, prompt: str) -> str:
        """With a [MASK] appended when the prompt has none."""
        return prompt if MASK_TOKEN in prompt else f"{prompt} {MASK_TOKEN}"

    def sampler(self, model, tokenizer):
        from tfpretrain.models.generation import FillMasker

        return FillMasker(model, tokenizer)

    def generate(self, model, tokenizer, a, cfg) -> list[str]:
        """Fill-mask: the filled text, then the top-k tokens of every mask."""
        if MASK_TOKEN not in a.prompt:
            raise UserError(f"{a.run_dir} is a masked-LM run: --prompt needs at least one "
                            f"{MASK_TOKEN} to fill, e.g. \"Once upon a {MASK_TOKEN}.\" "
                            f"Received: {a.prompt!r}")
        result = self.sampler(model, tokenizer).run([a.prompt],
                                                    top_k=a.top_k or FILL_MASK_TOP_K)[0]
        lines = [result["text"]]
        for j, preds in enumerate(result["masks"]):
            lines.append(f"{MASK_TOKEN} {j + 1}: " + "  ".join(f"{t} {p:.3f}" for t, p in preds))
        if len(result["masks"]) < a.prompt.count(MASK_TOKEN):
            lines.append(f"(masks past the model's context of {model.sequence_length} tokens "
                         "were not predicted)")
        return lines

    def serving_module(self, model, tokenizer, default_new_tokens: int):
        """Signatures: fill_mask (= serving_default), logits (every position of a row)."""
        import tensorflow as tf

        from tfpretrain.models.generation import fill_mask as run_fill_mask

        context = model.sequence_length
        module = new_module(model, tokenizer)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")],
                     autograph=False)
        def fill_mask(text):
            return run_fill_mask(model, tokenizer, text, context, FILL_MASK_TOP_K)

        @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32, name="token_ids")],
                     autograph=False)
        def logits(token_ids):
            return {"logits": model.row_logits(token_ids)}

        module.fill_mask, module.logits = fill_mask, logits
        return module, {"serving_default": fill_mask, "fill_mask": fill_mask, "logits": logits}

    def probe(self, model, tokenizer, prompt: str, sample_tokens: int) -> Probe:
        import tensorflow as tf

        from tfpretrain.models.generation import FillMasker

        L = model.sequence_length
        prompt = self.sample_prompt(prompt)
        prompts = [prompt, "", "no mask here", f"{MASK_TOKEN} and {MASK_TOKEN} " * 3,
                   f"{MASK_TOKEN} " + prompt * 60]  # the last: longer than the context
        rows = [([BOS_ID] + tokenizer.encode(p * 50))[:L - 1] + [EOS_ID]
                for p in (prompt, "Lily and")]
        rows[1] = rows[1][:L // 2]  # one padded row
        ids = np.array([r + [PAD_ID] * (L - len(r)) for r in rows], np.int32)

        def expected():
            # in a tf.function, like the SavedModel: eager Keras differs from graph mode by
            # float reordering alone (2.6e-5 on logits of magnitude 20 measured)
            logits = tf.function(model.row_logits)(ids).numpy()
            out = FillMasker(model, tokenizer)._fn(prompts, FILL_MASK_TOP_K)
            return logits, out["token_ids"].numpy()

        return Probe(ids, prompts, expected,
                     "fill-mask predictions differ from the Keras model's")

    def keras_task(self, model):
        return model.task

    def preset_features(self, model, tokenizer, prompt: str):
        L = model.sequence_length
        ids = np.array([([BOS_ID] + tokenizer.encode(prompt))[: L - 1] + [EOS_ID]], np.int32)
        features = {"token_ids": ids, "padding_mask": np.ones_like(ids, bool),
                    "segment_ids": np.zeros_like(ids),
                    "mask_positions": np.arange(ids.shape[1], dtype=np.int32)[None]}
        return features, features
