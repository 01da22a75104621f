"""``model.init_from``: a new run that starts from another model's weights (continued
pretraining on new data, a new schedule from a finished run, a preset someone published).

The source is a tfpretrain run folder (its latest valid checkpoint; the EMA's or
schedule-free AdamW's average where the run kept one, as ``evaluate`` and ``export`` see
it) or a keras_hub preset that tfpretrain exported (``export --format keras`` or ``hf``):
a local folder, or a handle keras_hub downloads (``kaggle://``, ``hf://``, ``gs://``).
Only the weights come from it: the optimizer's moments, the step, the schedule, the guard
and the data position start fresh, as in a new run. The run uses the source's tokenizer
(``tokenizer.path``, set when unset; ids only mean something with it) and its network
shape. Everything is checked before the run folder is touched; a resumed run restores its
own checkpoints and never needs the source again.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from tfpretrain.config import Config, build_config, read_yaml
from tfpretrain.errors import UserError

KEY = "model.init_from"
# the model keys that decide the weights' shapes (the others: dropout, z_loss, ... are free)
SHAPE_KEYS = ("arch", "num_layers", "num_heads", "num_key_value_heads", "hidden_dim",
              "intermediate_dim", "tie_embeddings", "sequence_length")
RECORD = "init_from.json"  # in the run folder: where its first weights came from


@dataclasses.dataclass
class Source:
    """Where ``model.init_from`` points: its config, tokenizer folder and kind."""
    name: str
    kind: str           # "run" or "preset"
    cfg: Config
    tokenizer_dir: Path


def is_remote(name: str) -> bool:
    return "://" in name


def find_source(name: str) -> Source:
    """The run folder or tfpretrain-exported preset at ``name``; anything else is a
    UserError naming what it lacks."""
    path = Path(name).expanduser()
    if not is_remote(name) and (path / "config.yaml").is_file() and \
            (path / "tokenizer").is_dir():
        return Source(name, "run", _config(path / "config.yaml"), path / "tokenizer")
    if not is_remote(name) and not path.is_dir():
        raise UserError(f"{KEY}: no such folder: {path}. Pass a tfpretrain run folder or a "
                        "preset folder made by `python -m tfpretrain.export --format keras` "
                        "(or a kaggle:// / hf:// handle of one)")
    return _preset_source(name)


def _preset_source(name: str) -> Source:
    from tfpretrain import compat
    from tfpretrain.data.tokenizers import ASSET_FILES

    try:
        compat.preset_file(name, "config.json")
        config = Path(compat.preset_file(name, "tfpretrain/config.yaml"))
        meta = Path(compat.preset_file(name, "tfpretrain/tokenizer/tokenizer.json"))
        for asset in ASSET_FILES.get(json.loads(meta.read_text())["kind"], ()):
            compat.preset_file(name, f"tfpretrain/tokenizer/{asset}")
    except (FileNotFoundError, ValueError, ImportError, OSError) as exc:
        raise UserError(
            f"{KEY}: {name} is not a tfpretrain run folder (config.yaml, tokenizer/) or a "
            f"preset tfpretrain exported (config.json, tfpretrain/config.yaml, "
            f"tfpretrain/tokenizer/): {str(exc).splitlines()[0][:200].rstrip('.')}. A run "
            "starts only from weights whose tokenizer it has: other keras_hub presets use "
            "other special ids") from None
    return Source(name, "preset", _config(config), meta.parent)


def _config(path: Path) -> Config:
    return build_config(read_yaml(path), name=path.parent.resolve().name, source=str(path))


def resolve(cfg: Config, run_dir: Path | None = None) -> Config:
    """``cfg`` with the source's tokenizer (``tokenizer.path``), after checking that its
    weights fit this config's model. Without ``model.init_from``, ``cfg`` itself. A run
    folder that already trained from the same source resumes without it (its own tokenizer
    and checkpoints), so a moved or deleted source does not stop a resume."""
    from tfpretrain.data.tokenizers import same_tokenizer

    name = cfg.model.init_from
    if not name:
        return cfg
    if run_dir is not None and not is_remote(name) and not Path(name).expanduser().exists():
        earlier = _earlier_tokenizer_path(cfg, Path(run_dir))
        if earlier:
            return _with_tokenizer(cfg, earlier)
    source = find_source(name)
    problems = shape_differences(source.cfg, cfg)
    if cfg.tokenizer.path and not same_tokenizer(cfg.tokenizer.path, source.tokenizer_dir):
        problems.append(f"tokenizer.path {cfg.tokenizer.path} is not the source's tokenizer "
                        f"({source.tokenizer_dir}); unset tokenizer.path to use the source's")
    if problems:
        raise UserError(f"{KEY} {name}: this run cannot start from it: "
                        + "; ".join(problems))
    return cfg if cfg.tokenizer.path else _with_tokenizer(cfg, str(source.tokenizer_dir))


def _with_tokenizer(cfg: Config, path: str) -> Config:
    return dataclasses.replace(cfg, tokenizer=dataclasses.replace(cfg.tokenizer, path=path))


def _earlier_tokenizer_path(cfg: Config, run_dir: Path) -> str | None:
    """The resolved ``tokenizer.path`` of ``run_dir``'s config.yaml when that run started
    from the same ``model.init_from``."""
    if not (run_dir / "config.yaml").is_file():
        return None
    old = _config(run_dir / "config.yaml")
    return old.tokenizer.path if old.model.init_from == cfg.model.init_from else None


def shape_differences(source: Config, cfg: Config) -> list[str]:
    """What in ``cfg`` gives the network other weights than the source's (as sentences)."""
    from tfpretrain.models.registry import get_arch
    from tfpretrain.objectives import get_objective

    if get_objective(source) is not get_objective(cfg):
        return [f"the source's model.objective is {source.model.objective!r}, this run's "
                f"{cfg.model.objective!r}"]
    theirs, ours = _shape(source), _shape(cfg)
    if not get_arch(cfg.model.arch).learned_positions:  # RoPE: any context fits the weights
        theirs.pop("sequence_length"), ours.pop("sequence_length")
    return [f"model.{k} is {ours[k]!r} here, {theirs[k]!r} in the source"
            for k in SHAPE_KEYS if k in ours and ours[k] != theirs.get(k)]


def _shape(cfg: Config) -> dict:
    m = dataclasses.asdict(cfg.model)
    shape = {k: m[k] for k in SHAPE_KEYS}
    shape["num_key_value_heads"] = m["num_key_value_heads"] or m["num_heads"]
    if cfg.model.arch != "llama":  # gpt2 and bert always tie; the key is not read
        shape.pop("tie_embeddings")
        shape.pop("num_key_value_heads")
    return shape


def load_weights(cfg: Config, model) -> dict:
    """Copy the source's weights into ``model.network`` (float32 weights, any compute
    precision or strategy); returns what was loaded (source, kind, step, digest), also
    what ``record`` writes."""
    from tfpretrain.models.lm import weights_sha256

    source = find_source(cfg.model.init_from)
    if source.kind == "run":
        weights, step = _run_weights(Path(source.name).expanduser())
    else:
        weights, step = _preset_weights(source), None
    _assign(weights, model.network.weights, source.name)
    return {"source": source.name, "kind": source.kind, "step": step,
            "weights_sha256": weights_sha256(model)}


def _run_weights(folder: Path):
    from tfpretrain.training.checkpoints import CheckpointManager
    from tfpretrain.training.runfolder import load_run

    found = CheckpointManager(folder / "checkpoints", None, None).latest_valid()
    if found is None:
        raise UserError(f"{KEY}: {folder} has no valid checkpoint to start from; train it "
                        "first (or resume it) with `python -m tfpretrain.fit`")
    _, _, model = load_run(folder)
    return model.network.weights, int(found[1]["step"])


def _preset_weights(source: Source):
    """The preset's weights in the order of our network's: a decoder's backbone, a masked
    LM's whole task (backbone and head)."""
    import keras_hub

    from tfpretrain.models.registry import get_arch

    try:
        if not get_arch(source.cfg.model.arch).decoder:
            return keras_hub.models.MaskedLM.from_preset(source.name, preprocessor=None).weights
        # keras_hub's HF GPT-2 converter sizes the feed-forward as 4 x hidden_dim (it ignores
        # n_inner), so the width the source trained with is passed
        return keras_hub.models.Backbone.from_preset(
            source.name, intermediate_dim=source.cfg.model.intermediate_dim).weights
    except (ValueError, OSError, KeyError) as exc:
        raise UserError(f"{KEY}: keras_hub could not load the preset {source.name}: "
                        f"{str(exc).splitlines()[0][:200]}") from None


def _assign(weights, variables, name: str) -> None:
    import keras

    if len(weights) != len(variables) or any(
            tuple(w.shape) != tuple(v.shape) for w, v in zip(weights, variables)):
        first = next((f"{v.path} {tuple(v.shape)} vs {tuple(w.shape)}"
                      for w, v in zip(weights, variables) if tuple(w.shape) != tuple(v.shape)),
                     f"{len(variables)} weights vs {len(weights)}")
        raise UserError(f"{KEY} {name}: its weights do not fit this run's model ({first}); "
                        "set the model.* keys to the source's")
    for w, v in zip(weights, variables):
        v.assign(keras.ops.cast(w, v.dtype))


def record(run_dir: Path, loaded: dict) -> None:
    """``<run>/init_from.json``: the run's first weights, for its summary and later resumes."""
    from tfpretrain.files import write_atomic

    write_atomic(Path(run_dir) / RECORD, json.dumps(loaded, indent=1))


def recorded(run_dir: Path) -> dict | None:
    path = Path(run_dir) / RECORD
    return json.loads(path.read_text()) if path.is_file() else None
