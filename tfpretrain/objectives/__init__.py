"""One :class:`Objective` per kind of pretraining (``model.objective``): causal (next-token)
and masked (BERT-style). Everything that differs between the two lives here, so the rest of
the code asks the objective instead of branching on its name:

- how a token stream becomes rows (:meth:`Objective.row_format`) and rows become batches
  (:meth:`Objective.batcher`);
- which model class wraps the backbone (loss and metrics live on the model,
  ``tfpretrain.models.lm``);
- validation metrics (:meth:`Objective.evaluate`) and how they are logged;
- samples during training and the ``generate`` command (sampling vs fill-mask);
- which SavedModel signatures exist and how an export is checked, the keras_hub preset and
  whether a Hugging Face export exists.

A new objective is a subclass in its own module, registered in :data:`OBJECTIVES` (and its
name in ``config.OBJECTIVE_ARCHS``).
"""
from __future__ import annotations

from tfpretrain.config import Config
from tfpretrain.errors import UserError
from tfpretrain.objectives.base import Objective
from tfpretrain.objectives.causal import CausalObjective
from tfpretrain.objectives.masked import MaskedObjective

# model.objective -> its Objective (config.OBJECTIVE_ARCHS names the same keys)
OBJECTIVES: dict[str, Objective] = {"causal": CausalObjective(), "mlm": MaskedObjective()}


def get_objective(cfg_or_name) -> Objective:
    """The objective of a config (or by name)."""
    name = cfg_or_name if isinstance(cfg_or_name, str) else cfg_or_name.model.objective
    if name not in OBJECTIVES:
        raise UserError(f"`model.objective` must be one of {', '.join(OBJECTIVES)}. "
                        f"Received: {name!r}")
    return OBJECTIVES[name]


def row_format(cfg: Config):
    """The rows a config trains on: its objective's format at its context and packing."""
    return get_objective(cfg).row_format(cfg.model.sequence_length, cfg.data.packing)


def build_model(cfg: Config, vocabulary_size: int, steps_per_execution: int = 1,
                precision: str = "float32"):
    """The model of a full config: ``get_objective(cfg).build_model(...)``; ``precision``
    is a resolved ``train.precision`` (a Keras dtype policy name, never ``auto``)."""
    return get_objective(cfg).build_model(cfg, vocabulary_size, steps_per_execution,
                                          precision)


def float32_copy(model, cfg: Config, vocabulary_size: int, always: bool = False):
    """``model`` itself if it computes in float32 (and not ``always``), else a float32
    model with its weights, on one device (what evaluation, sampling and exports use after
    a mixed-precision or multi-replica run)."""
    if model.network.dtype_policy.name == "float32" and not always:
        return model
    copy = build_model(cfg, vocabulary_size)
    copy.network.set_weights(model.network.get_weights())
    return copy


def count_params(cfg: Config, vocabulary_size: int) -> int:
    """Parameters of the network a run trains and exports (no training; --dry-run)."""
    return int(build_model(cfg, vocabulary_size).network.count_params())
