"""The :class:`Objective` interface and the helpers its implementations share (see the
package docstring for what an objective owns)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from tfpretrain.config import Config


@dataclass
class Probe:
    """What an export is checked against: inputs, and a function computing the Keras
    model's outputs on them (called while the fresh process runs the SavedModel)."""
    token_ids: np.ndarray        # rows for the ``logits`` signature
    prompts: list                # texts for the generating signature
    # () -> (the Keras model's logits on token_ids, its generated / predicted ids on prompts)
    expected: Callable[[], tuple[np.ndarray, np.ndarray]]
    mismatch: str                # what it means when the tokens differ


class Objective:
    name = ""
    model_class = None
    preset_loader = ""           # keras_hub.models base class that reloads the preset
    hf_export = False
    writes_text = False          # continues a prompt (a teacher for synth), vs fills masks

    # --- data -------------------------------------------------------------------------
    def row_format(self, sequence_length: int, packing: str):
        raise NotImplementedError

    def batcher(self, cfg: Config, tokenizer):
        """(rows, seed) -> (x, y, sample_weight) for the data pipeline; None: causal
        next-token batches (the pipeline's default)."""
        return None

    # --- model --------------------------------------------------------------------------
    def build_model(self, cfg: Config, vocabulary_size: int, steps_per_execution: int = 1,
                    precision: str = "float32"):
        """The run's model, all weights built (fault hooks from cfg; the guard is the
        optimizer's: ``training.optimizers.guard_optimizer``)."""
        from tfpretrain import faults
        from tfpretrain.models.registry import build_backbone

        backbone = build_backbone(cfg.model, vocabulary_size, precision)
        model = self.model_class(
            backbone, cfg.model.sequence_length, steps_per_execution=steps_per_execution,
            spike_steps=faults.spike_steps(cfg), z_loss=cfg.model.z_loss,
            grad_accumulation_steps=cfg.train.grad_accumulation_steps,
            distill_alpha=cfg.distill.alpha if cfg.distill.teacher else 1.0,
            distill_temperature=cfg.distill.temperature,
            distill_sampled=cfg.distill.sampled, **self.model_options(cfg))
        model(model.example_input())
        return model

    def model_options(self, cfg: Config) -> dict:
        return {}

    # --- evaluation ---------------------------------------------------------------------
    def evaluate(self, cfg: Config, model, tokenizer, rows, counts,
                 max_batches: int = 0) -> dict:
        """Validation metrics over ``rows`` (all of them, or ``max_batches`` batches of
        ``train.batch_size``), with baselines from the train-token ``counts``."""
        return self.evaluator(cfg, model, tokenizer)(rows, counts, max_batches)

    def evaluator(self, cfg: Config, model, tokenizer):
        """``evaluate`` bound to a model: ``f(rows, counts, max_batches=0) -> metrics``, its
        graph traced once however often and on whichever rows it is called (the validation
        split and every ``eval.sets`` entry, at every validation)."""
        raise NotImplementedError

    def task_scorer(self, cfg: Config, model, tokenizer):
        """Zero-shot tasks (``eval.tasks``, ``evaluate --tasks``; ``data.tasks``):
        ``f(TaskRows) -> (summed loss per row, whether every target is the argmax)``."""
        from tfpretrain.errors import UserError

        raise UserError(f"zero-shot tasks (`eval.tasks`, `evaluate --tasks`) score "
                        f"continuations by likelihood, which needs a causal model; this one "
                        f"is `model.objective: {self.name}`")

    def describe(self, metrics: dict) -> str:
        """One log line of the metrics ``evaluate`` returns."""
        raise NotImplementedError

    # --- sampling -----------------------------------------------------------------------
    def sample_prompt(self, prompt: str) -> str:
        return prompt

    def sampler(self, model, tokenizer):
        """Callable ``(prompt, **sample_kwargs) -> text`` for samples during training."""
        raise NotImplementedError

    def generate(self, model, tokenizer, args, cfg) -> list[str]:
        """The ``generate`` command's output lines (args: its parsed arguments)."""
        raise NotImplementedError

    # --- export -------------------------------------------------------------------------
    def serving_module(self, model, tokenizer, default_new_tokens: int):
        """(tf.Module, signatures) for tf.saved_model.save."""
        raise NotImplementedError

    def probe(self, model, tokenizer, prompt: str, sample_tokens: int) -> Probe:
        raise NotImplementedError

    def keras_task(self, model):
        """The keras_hub task whose ``save_to_preset`` makes the keras preset."""
        raise NotImplementedError

    def preset_features(self, model, tokenizer, prompt: str):
        """(input for our model, input for the reloaded keras_hub task) to compare."""
        raise NotImplementedError


def new_module(model, tokenizer):
    """A tf.Module holding the model's variables and the tokenizer's trackable parts (tf_text
    ops' resources, lookup tables, keras_hub tokenizer layers) so tf.saved_model.save
    captures them. Only the variables, not the model: a compiled model tracks its optimizer,
    whose moments would otherwise triple the SavedModel (as keras.export.ExportArchive)."""
    import keras
    import tensorflow as tf

    module = tf.Module()
    module.model_variables = list(model.variables)
    module.tokenizer_resources = [
        v for v in vars(tokenizer).values()
        if isinstance(v, (tf.Module, tf.lookup.StaticHashTable, keras.layers.Layer))]
    return module


def unigram_log_probs(counts: np.ndarray) -> np.ndarray:
    """Add-one-smoothed log-frequencies of the training tokens."""
    return np.log((counts + 1.0) / (counts.sum() + len(counts)))


def loss_metrics(nats: float, tokens: float) -> dict:
    """val_loss and val_perplexity from summed nats over ``tokens`` targets."""
    loss = nats / max(tokens, 1.0)
    return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0))}
