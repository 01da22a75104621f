"""keras_hub presets and Hugging Face transformers folders of a run, each reloaded or
written atomically (see ``saved_model.staged``). Every export carries the run's tokenizer
and config in ``<export>/tfpretrain/``."""
from __future__ import annotations

from pathlib import Path

from tfpretrain.errors import UserError
from tfpretrain.serving.saved_model import ExportValidationError, export_name, staged


def _carry_run_files(tmp: Path, tokenizer, cfg) -> None:
    tokenizer.save(tmp / "tfpretrain" / "tokenizer")
    (tmp / "tfpretrain" / "config.yaml").write_text(cfg.to_yaml())


def export_keras_preset(model, tokenizer, cfg, run_dir: Path, out: Path | None = None,
                        overwrite: bool = False) -> Path:
    """A keras_hub preset (``task.save_to_preset``) that
    ``keras_hub.models.CausalLM.from_preset(path)`` (masked LM: ``MaskedLM``) loads in safe
    mode, checked by reloading it and comparing logits.

    The preset has no keras_hub preprocessor (our tokenizers have no keras_hub task
    preprocessor); the run's tokenizer and config are in ``<preset>/tfpretrain/`` for
    ``tfpretrain.data.tokenizers.load_tokenizer``.
    """
    import keras_hub
    import numpy as np

    from tfpretrain import compat
    from tfpretrain.objectives import get_objective

    objective = get_objective(cfg)
    final = Path(out) if out else Path(cfg.export.dir) / f"{export_name(cfg, run_dir)}_keras"
    with staged(final, overwrite) as tmp:
        objective.keras_task(model).save_to_preset(str(tmp))
        if cfg.model.arch == "llama":
            compat.fix_llama_preset_config(tmp, cfg.model.tie_embeddings)
        _carry_run_files(tmp, tokenizer, cfg)
        reloaded = getattr(keras_hub.models, objective.preset_loader).from_preset(str(tmp))
        ours, theirs = objective.preset_features(model, tokenizer, cfg.eval.prompt)
        expected = np.asarray(model(ours, training=False))
        diff = float(np.max(np.abs(expected - np.asarray(reloaded(theirs)))))
        if diff > 1e-5:
            raise ExportValidationError(f"the keras_hub preset reloads with logits off by "
                                        f"{diff:.2e}")
    return final


def export_hf(model, tokenizer, cfg, run_dir: Path, out: Path | None = None,
              overwrite: bool = False) -> Path:
    """A Hugging Face transformers folder: config.json + model.safetensors (keras_hub's
    exporters: GPT-2 as GPT2LMHeadModel; Llama as LlamaForCausalLM through keras_hub's
    Llama3 mapping, which fits LlamaBackbone's layers) and, for SentencePiece runs, the
    tokenizer as ``tokenizer.model`` + ``tokenizer_config.json`` (LlamaTokenizer).

    Our models saw an end-of-text token (``</s>``, id 3) before every document: prepend it
    to inputs (the exported tokenizer adds no BOS)."""
    import json

    from tfpretrain import compat
    from tfpretrain.data.tokenizers import EOS_ID, PAD_ID
    from tfpretrain.models.registry import get_arch
    from tfpretrain.objectives import get_objective

    arch = get_arch(cfg.model.arch)
    hf_key = arch.hf_key
    if not get_objective(cfg).hf_export or hf_key is None:
        raise UserError("--format hf supports causal runs (gpt2, llama) only; export a "
                        "masked-LM run as --format saved_model or --format keras")
    final = Path(out) if out else Path(cfg.export.dir) / f"{export_name(cfg, run_dir)}_hf"
    try:
        from safetensors.numpy import save_file
    except ImportError:
        raise UserError("--format hf needs safetensors: pip install 'tfpretrain[hf]'") from None
    hf_config, arrays = compat.hf_export(model.backbone, hf_key)
    # "architectures" picks the model class in vLLM, TGI and keras_hub's HF loader
    hf_config.update(bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                     architectures=[arch.hf_architecture])
    if not arch.learned_positions:  # RoPE: no table to size it, so say the trained context
        hf_config["max_position_embeddings"] = cfg.model.sequence_length
    with staged(final, overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        save_file(arrays, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer.kind.startswith("sentencepiece"):
            (tmp / "tokenizer.model").write_bytes(tokenizer.proto)
            (tmp / "tokenizer_config.json").write_text(json.dumps({
                "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                "unk_token": "<unk>", "pad_token": "<pad>", "add_bos_token": False,
                "add_eos_token": False, "legacy": False,
                "model_max_length": cfg.model.sequence_length}, indent=2))
        _carry_run_files(tmp, tokenizer, cfg)
    return final
