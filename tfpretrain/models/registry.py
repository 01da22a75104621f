"""The one registry of architectures: ``model.arch`` -> backbone builder, keras_hub task
class, Hugging Face mapping and FLOPs per token.

A new architecture is one :class:`Arch` entry here (and its name in ``config.ARCHS``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from tfpretrain.config import ModelConfig
from tfpretrain.errors import UserError


def _gpt2(cfg: ModelConfig, vocabulary_size: int, dtype=None):
    import keras_hub

    return keras_hub.models.GPT2Backbone(
        vocabulary_size=vocabulary_size, num_layers=cfg.num_layers,
        num_heads=cfg.num_heads, hidden_dim=cfg.hidden_dim,
        intermediate_dim=cfg.intermediate_dim, dropout=cfg.dropout,
        max_sequence_length=cfg.sequence_length, dtype=dtype)


def _llama(cfg: ModelConfig, vocabulary_size: int, dtype=None):
    import keras_hub

    return keras_hub.models.LlamaBackbone(
        vocabulary_size=vocabulary_size, num_layers=cfg.num_layers,
        num_query_heads=cfg.num_heads, hidden_dim=cfg.hidden_dim,
        intermediate_dim=cfg.intermediate_dim,
        num_key_value_heads=cfg.num_key_value_heads or cfg.num_heads,
        rope_max_wavelength=cfg.rope_theta,
        layer_norm_epsilon=cfg.resolved_norm_epsilon,
        dropout=cfg.dropout, tie_word_embeddings=cfg.tie_embeddings, dtype=dtype)


def _bert(cfg: ModelConfig, vocabulary_size: int, dtype=None):
    import keras_hub

    return keras_hub.models.BertBackbone(
        vocabulary_size=vocabulary_size, num_layers=cfg.num_layers,
        num_heads=cfg.num_heads, hidden_dim=cfg.hidden_dim,
        intermediate_dim=cfg.intermediate_dim, dropout=cfg.dropout,
        max_sequence_length=cfg.sequence_length, dtype=dtype)


@dataclass(frozen=True)
class Arch:
    name: str
    build_backbone: Callable[..., object]
    backbone: str             # keras_hub.models class name of the backbone
    task: str                 # keras_hub.models class name of the matching task
    hf_key: str | None        # keras_hub transformers-exporter key (None: no HF export)
    learned_positions: bool   # a position table of sequence_length rows (counted in N)
    ffn_matrices: int = 2     # H x I matrices per feed-forward block (SwiGLU: 3)
    hf_architecture: str | None = None  # transformers class in config.json "architectures"

    def task_class(self):
        import keras_hub

        return getattr(keras_hub.models, self.task)

    @property
    def decoder(self) -> bool:
        """A causal decoder (its task has keras_hub's KV-cached generation)."""
        return self.task.endswith("CausalLM")


ARCHS = {
    "gpt2": Arch("gpt2", _gpt2, "GPT2Backbone", "GPT2CausalLM", "GPT2Backbone",
                 learned_positions=True, hf_architecture="GPT2LMHeadModel"),
    # LlamaBackbone's layers match keras_hub's Llama3 HF mapping
    "llama": Arch("llama", _llama, "LlamaBackbone", "LlamaCausalLM", "Llama3Backbone",
                  learned_positions=False, ffn_matrices=3, hf_architecture="LlamaForCausalLM"),
    "bert": Arch("bert", _bert, "BertBackbone", "BertMaskedLM", None, learned_positions=True),
}


def get_arch(name: str) -> Arch:
    if name not in ARCHS:
        raise UserError(f"`model.arch` must be one of {', '.join(ARCHS)}. Received: {name!r}")
    return ARCHS[name]


def arch_of(backbone) -> Arch:
    """The registry entry of a backbone instance."""
    name = type(backbone).__name__
    for arch in ARCHS.values():
        if arch.backbone == name:
            return arch
    raise KeyError(f"{name} is not a registered backbone")


def build_backbone(cfg: ModelConfig, vocabulary_size: int, precision: str = "float32"):
    """A from-scratch keras_hub backbone of ``cfg.arch``; no preset is downloaded.
    ``precision``: a Keras dtype policy name (``mixed_bfloat16``: float32 weights, bfloat16
    compute); the output head computes its logits in float32 whatever the policy."""
    from tfpretrain import compat

    backbone = get_arch(cfg.arch).build_backbone(cfg, vocabulary_size, precision)
    if precision != "float32":
        compat.float32_output_head(backbone)
    return backbone


def flops_per_token(cfg: ModelConfig, params: int, vocabulary_size: int) -> int:
    """Training FLOPs per token, nanoGPT/PaLM convention (PaLM appendix B):
    ``6 N + 12 L H T``: ``N`` the parameters without the learned position table (a lookup,
    no matmul; a tied token embedding is counted once, as the output head's matmul, as
    nanoGPT's ``get_num_params`` does), ``L`` layers, ``H`` width, ``T`` context: the
    attention score and value matmuls, forward and backward. Same formula for every arch."""
    n = params
    if get_arch(cfg.arch).learned_positions:
        n -= cfg.sequence_length * cfg.hidden_dim
    return int(6 * n + 12 * cfg.num_layers * cfg.hidden_dim * cfg.sequence_length)
