"""``model.init_from``: a new run that starts from another model's weights (continued
pretraining on new data, a new schedule from a finished run, a preset someone published).

The source is one of:
- a tfpretrain run folder: its latest valid checkpoint (the EMA's or schedule-free AdamW's
  average where the run kept one, as ``evaluate`` and ``export`` see it);
- a keras_hub preset that tfpretrain exported (``export --format keras`` or ``hf``);
- any other keras_hub GPT-2, Llama or BERT preset (``kind: keras_hub``): a Keras preset or
  a Hugging Face checkpoint keras_hub converts (``hf://openai-community/gpt2``,
  ``hf://google-bert/bert-base-uncased``). Its tokenizer is moved to tfpretrain's special
  ids (``data.foreign_tokenizers``) and the embedding rows follow, so the model computes
  the same logits for the same text. A BERT's masked-LM head comes from a Hugging Face
  checkpoint's ``cls.predictions`` tensors or a Keras preset's BertMaskedLM task weights;
  without either (keras_hub's published BERT presets) it starts new (``new_head`` in
  ``init_from.json``).
A preset is a local folder or a handle keras_hub downloads (``kaggle://``, ``hf://``,
``gs://``). Only the weights come from the source: the optimizer's moments, the step, the
schedule, the guard and the data position start fresh, as in a new run. The run uses the
source's tokenizer (``tokenizer.path``, set when unset; ids only mean something with it)
and its network (the shape keys, llama's ``rope_theta`` and ``norm_epsilon``). A learned
position table (gpt2, bert) may be cut to a shorter ``sequence_length``. Everything is
checked before the run folder is touched; a resumed run restores its own checkpoints and
never needs the source again.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from tfpretrain.config import Config, build_config, read_yaml
from tfpretrain.errors import UserError

KEY = "model.init_from"
# the model keys that decide the weights' shapes and what they compute (the others:
# dropout, z_loss, ... are free)
SHAPE_KEYS = ("arch", "num_layers", "num_heads", "num_key_value_heads", "hidden_dim",
              "intermediate_dim", "tie_embeddings", "rope_theta", "norm_epsilon",
              "sequence_length")
BERT_SEGMENTS = 2  # keras_hub BertBackbone's default, which models.registry builds
# a Hugging Face BERT's masked-LM head (BertForMaskedLM, BertForPreTraining), by role
HF_MLM_HEAD = {"dense_kernel": ("cls.predictions.transform.dense.weight",),
               "dense_bias": ("cls.predictions.transform.dense.bias",),
               "norm_gamma": ("cls.predictions.transform.LayerNorm.weight",
                              "cls.predictions.transform.LayerNorm.gamma"),
               "norm_beta": ("cls.predictions.transform.LayerNorm.bias",
                             "cls.predictions.transform.LayerNorm.beta"),
               "bias": ("cls.predictions.bias",)}
TASK_WEIGHTS = "task.weights.h5"  # a Keras preset's task head, when it saved one
RECORD = "init_from.json"  # in the run folder: where its first weights came from


@dataclasses.dataclass
class Source:
    """Where ``model.init_from`` points: its config, tokenizer folder and kind."""
    name: str
    kind: str           # "run", "preset" (tfpretrain exported it) or "keras_hub" (other)
    cfg: Config
    tokenizer_dir: Path
    old_ids: np.ndarray | None = None  # keras_hub: each new token id's id in the preset


def is_remote(name: str) -> bool:
    return "://" in name


def find_source(name: str) -> Source:
    """The run folder or tfpretrain-exported preset at ``name``; anything else is a
    UserError naming what it lacks."""
    path = Path(name).expanduser()
    if not is_remote(name) and (path / "config.yaml").is_file() and \
            (path / "tokenizer").is_dir():
        return Source(name, "run", _config(path / "config.yaml"), path / "tokenizer")
    if not is_remote(name) and not path.is_dir() and not is_builtin_preset(name):
        raise UserError(f"{KEY}: no such folder: {path}. Pass a tfpretrain run folder, a "
                        "keras_hub preset folder or handle (kaggle://, hf://), or a keras_hub "
                        "preset name such as gpt2_base_en")
    return _preset_source(name)


def is_builtin_preset(name: str) -> bool:
    """A preset name keras_hub knows (``gpt2_base_en``), downloaded from its Kaggle handle."""
    import keras_hub

    return "/" not in name and name in keras_hub.models.Backbone.presets


def _preset_source(name: str) -> Source:
    from tfpretrain import compat
    from tfpretrain.data.tokenizers import ASSET_FILES

    try:
        compat.preset_file(name, "config.json")
    except (FileNotFoundError, ValueError, ImportError, OSError) as exc:
        raise UserError(
            f"{KEY}: {name} is not a tfpretrain run folder (config.yaml, tokenizer/) or a "
            f"keras_hub preset (config.json): {_first_line(exc)}") from None
    try:
        config = Path(compat.preset_file(name, "tfpretrain/config.yaml"))
    except (FileNotFoundError, ValueError, OSError):
        return _foreign_source(name)
    try:
        meta = Path(compat.preset_file(name, "tfpretrain/tokenizer/tokenizer.json"))
        for asset in ASSET_FILES.get(json.loads(meta.read_text())["kind"], ()):
            compat.preset_file(name, f"tfpretrain/tokenizer/{asset}")
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise UserError(f"{KEY}: the preset {name} has tfpretrain/config.yaml but not its "
                        f"whole tokenizer: {_first_line(exc)}. Export it again with "
                        "`python -m tfpretrain.export --format keras`") from None
    return Source(name, "preset", _config(config), meta.parent)


@contextlib.contextmanager
def _loading(name: str):
    """keras_hub's errors while it reads the preset ``name``, as one UserError."""
    try:
        yield
    except (ValueError, OSError, KeyError, TypeError, ImportError) as exc:
        raise UserError(f"{KEY}: keras_hub could not load the preset {name}: "
                        f"{_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0][:200].rstrip(".") if str(exc).strip() else \
        type(exc).__name__


@functools.lru_cache(maxsize=8)  # resolve (twice in fit) and load_weights ask again
def _foreign_source(name: str) -> Source:
    """A keras_hub preset tfpretrain did not make: its backbone's config as model.* keys, and
    its tokenizer moved to tfpretrain's ids, saved once under the cache folder."""
    import keras_hub

    from tfpretrain.data import foreign_tokenizers

    hf = _hf_config(name)
    with _loading(name):
        backbone = keras_hub.models.Backbone.from_preset(name, load_weights=False)
        layer = (hf is not None and _hf_sentencepiece(name)) or \
            keras_hub.tokenizers.Tokenizer.from_preset(name)
    model = model_keys(backbone)
    # what keras_hub's Hugging Face converters drop: Llama's RMSNorm epsilon (it keeps its
    # default 1e-6) and GPT-2's n_inner (it builds 4 x hidden_dim)
    if hf and model["arch"] == "llama" and hf.get("rms_norm_eps"):
        model["norm_epsilon"] = float(hf["rms_norm_eps"])
    if hf and model["arch"] == "gpt2" and hf.get("n_inner"):
        model["intermediate_dim"] = int(hf["n_inner"])
    tokenizer, old_ids = foreign_tokenizers.convert(layer)
    cfg = build_config({"model": model}, name="init_from", source=f"{KEY} {name}")
    return Source(name, "keras_hub", cfg, _saved_tokenizer(tokenizer), old_ids)


def _hf_config(name: str) -> dict | None:
    """The config.json of a Hugging Face checkpoint; None for a Keras preset."""
    from tfpretrain import compat

    config = json.loads(Path(compat.preset_file(name, "config.json")).read_text())
    return config if "model_type" in config else None


def _hf_sentencepiece(name: str) -> bytes | None:
    """A Hugging Face checkpoint's ``tokenizer.model`` (Llama 2's SentencePiece model,
    which keras_hub's Llama converter would read from tokenizer.json as byte-level BPE)."""
    from tfpretrain import compat

    try:
        return Path(compat.preset_file(name, "tokenizer.model")).read_bytes()
    except (FileNotFoundError, ValueError, OSError):
        return None


def model_keys(backbone) -> dict:
    """The model.* keys of a keras_hub GPT-2, Llama or BERT backbone (what a run starting
    from it must set)."""
    import keras_hub

    c = backbone.get_config()
    keys = {"num_layers": c["num_layers"], "hidden_dim": c["hidden_dim"],
            "intermediate_dim": c["intermediate_dim"]}
    if isinstance(backbone, keras_hub.models.GPT2Backbone):
        return {"arch": "gpt2", **keys, "num_heads": c["num_heads"],
                "sequence_length": c["max_sequence_length"]}
    if isinstance(backbone, keras_hub.models.BertBackbone):
        if c["num_segments"] != BERT_SEGMENTS:
            raise UserError(f"{KEY}: the preset's BERT has {c['num_segments']} segment types; "
                            f"tfpretrain's bert has {BERT_SEGMENTS}")
        return {"arch": "bert", "objective": "mlm", **keys, "num_heads": c["num_heads"],
                "sequence_length": c["max_sequence_length"]}
    if not isinstance(backbone, keras_hub.models.LlamaBackbone):
        raise UserError(f"{KEY}: the preset's backbone is a {type(backbone).__name__}; "
                        "tfpretrain starts from GPT2Backbone, LlamaBackbone and BertBackbone "
                        "presets")
    if c.get("rope_position_scaling_factor", 1.0) != 1.0 or \
            c.get("rope_frequency_adjustment_factor") is not None:
        raise UserError(f"{KEY}: the preset scales its RoPE positions (Llama 3.1-style "
                        "rope_scaling), which tfpretrain's llama does not build")
    return {"arch": "llama", **keys, "num_heads": c["num_query_heads"],
            "num_key_value_heads": c["num_key_value_heads"],
            "tie_embeddings": bool(backbone.token_embedding.tie_weights),
            "rope_theta": float(c["rope_max_wavelength"]),
            "norm_epsilon": float(c["layer_norm_epsilon"])}


def _saved_tokenizer(tokenizer) -> Path:
    """``tokenizer`` saved in ``<cache>/imported/<digest>/`` (the digest of its files), so
    every run from the same preset points ``tokenizer.path`` at the same folder."""
    from tfpretrain.files import cache_root

    root = cache_root() / "imported"
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    try:
        tokenizer.save(tmp)
        digest = hashlib.sha256()
        for f in sorted(tmp.iterdir()):
            digest.update(f.name.encode() + f.read_bytes())
        final = root / digest.hexdigest()[:16]
        try:
            tmp.rename(final)
        except OSError:  # saved before, by this run or another
            if not final.is_dir():
                raise
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
    problems, fix = shape_differences(source.cfg, cfg), differing(source.cfg, cfg)
    if problems and fix:
        problems.append("to match it: " + " ".join(
            f"--set model.{k}={json.dumps(v)}" for k, v in fix.items()))
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
    from tfpretrain.objectives import get_objective

    if get_objective(source) is not get_objective(cfg):
        return [f"the source's model.objective is {source.model.objective!r}, this run's "
                f"{cfg.model.objective!r}"]
    ours = _shape(cfg)
    return [f"model.{k} is {ours.get(k)!r} here, {v!r} in the source"
            for k, v in differing(source, cfg).items()]


def differing(source: Config, cfg: Config) -> dict:
    """The model keys whose value in ``cfg`` does not fit the source's weights: the
    source's values."""
    from tfpretrain.models.registry import get_arch

    theirs, ours = _shape(source), _shape(cfg)
    # RoPE: any context fits the weights; a learned table: its first rows, for a shorter one
    if not get_arch(cfg.model.arch).learned_positions or \
            ours["sequence_length"] <= theirs["sequence_length"]:
        theirs.pop("sequence_length"), ours.pop("sequence_length")
    return {k: theirs[k] for k in SHAPE_KEYS if k in theirs and ours.get(k) != theirs[k]}


def _shape(cfg: Config) -> dict:
    m = dataclasses.asdict(cfg.model)
    shape = {k: m[k] for k in SHAPE_KEYS}
    shape["num_key_value_heads"] = m["num_key_value_heads"] or m["num_heads"]
    shape["norm_epsilon"] = cfg.model.resolved_norm_epsilon
    if cfg.model.arch != "llama":  # gpt2 and bert: always tied, LayerNorm, no RoPE
        for key in ("tie_embeddings", "num_key_value_heads", "rope_theta", "norm_epsilon"):
            shape.pop(key)
    return shape


def load_weights(cfg: Config, model) -> dict:
    """Copy the source's weights into ``model.network`` (float32 weights, any compute
    precision or strategy); returns what was loaded (source, kind, step, digest), also
    what ``record`` writes."""
    from tfpretrain.models.lm import weights_sha256

    source = find_source(cfg.model.init_from)
    loaded = {"source": source.name, "kind": source.kind, "step": None}
    if source.kind == "run":
        weights, loaded["step"] = _run_weights(Path(source.name).expanduser())
    elif source.kind == "keras_hub" and cfg.model.arch == "bert":
        weights, loaded["new_head"] = _foreign_masked_lm(source, model.network)
    else:
        weights = _preset_weights(source)
    _assign(weights, model.network.weights, source.name)
    return {**loaded, "weights_sha256": weights_sha256(model)}


def source_model(name: str):
    """(cfg, tokenizer, model) of a ``model.init_from`` source as it stands, before any
    training (``evaluate --init-from``): a run folder as ``load_run`` gives it, a preset at
    its own config (a published one: its model keys, its context), in float32."""
    from tfpretrain.data.tokenizers import from_path
    from tfpretrain.training.runfolder import load_run
    from tfpretrain.training.runtime import build_and_compile

    source = find_source(name)
    if source.kind == "run":
        return load_run(Path(name).expanduser())
    cfg = dataclasses.replace(
        source.cfg, model=dataclasses.replace(source.cfg.model, init_from=name),
        tokenizer=dataclasses.replace(source.cfg.tokenizer, path=str(source.tokenizer_dir)))
    tokenizer = from_path(source.tokenizer_dir)
    model = build_and_compile(cfg, tokenizer.vocabulary_size, jit=False, precision="float32")
    load_weights(cfg, model)
    return cfg, tokenizer, model


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

    with _loading(source.name):
        if not get_arch(source.cfg.model.arch).decoder:
            return keras_hub.models.MaskedLM.from_preset(source.name, preprocessor=None).weights
        # keras_hub's HF GPT-2 converter sizes the feed-forward as 4 x hidden_dim (it ignores
        # n_inner), so the width the source trained with is passed
        backbone = keras_hub.models.Backbone.from_preset(
            source.name, dtype="float32", intermediate_dim=source.cfg.model.intermediate_dim)
    return _moved_embeddings(source, backbone) if source.kind == "keras_hub" else \
        backbone.weights


def _foreign_masked_lm(source: Source, task) -> tuple[list, bool]:
    """A foreign BERT's weights for ``task`` (a BertMaskedLM) and whether its masked-LM head
    starts new: the backbone's with moved embedding rows; the source's head
    (``_source_bert``), or the task's own initial one without it."""
    from tfpretrain import compat
    from tfpretrain.data.foreign_tokenizers import moved_rows

    with _loading(source.name):
        backbone, head = _source_bert(source.name)
    values = dict(zip((id(v) for v in task.backbone.weights),
                      _moved_embeddings(source, backbone)))
    for role, variable in compat.masked_lm_head_parts(task).items():
        w = head.get(role)
        if role == "bias" and w is not None:
            w = moved_rows(w, source.old_ids)
        values[id(variable)] = variable.numpy() if w is None else w
    return [values[id(v)] for v in task.weights], not head


def _source_bert(name: str) -> tuple:
    """A foreign BERT's backbone (float32) and its masked-LM head by role: a Hugging Face
    checkpoint's ``cls.predictions``, a Keras preset's BertMaskedLM task weights (the task
    loaded once, backbone and head); an empty head without either."""
    import keras_hub

    from tfpretrain import compat

    hf = _hf_config(name) is not None
    if not hf and _has_file(name, TASK_WEIGHTS):
        task = keras_hub.models.MaskedLM.from_preset(name, preprocessor=None, dtype="float32")
        return task.backbone, {role: v.numpy()
                               for role, v in compat.masked_lm_head_parts(task).items()}
    backbone = keras_hub.models.Backbone.from_preset(name, dtype="float32")
    return backbone, _hf_mlm_head(name) if hf else {}


def _has_file(name: str, path: str) -> bool:
    from tfpretrain import compat

    try:
        compat.preset_file(name, path)
    except (FileNotFoundError, ValueError, OSError):
        return False
    return True


def _hf_mlm_head(name: str) -> dict:
    """A Hugging Face BERT's masked-LM head as keras arrays by role (empty when the
    checkpoint has none: a BertModel's)."""
    from tfpretrain import compat

    found = compat.hf_tensors(name, [k for keys in HF_MLM_HEAD.values() for k in keys])
    head = {role: next((found[k] for k in keys if k in found), None)
            for role, keys in HF_MLM_HEAD.items()}
    if any(w is None for w in head.values()):
        return {}
    head["dense_kernel"] = head["dense_kernel"].T  # torch Linear: [out, in]
    return head


def _moved_embeddings(source: Source, backbone) -> list:
    """A foreign backbone's weights with the token embedding (and an untied output head)
    in the rows of the tokenizer moved to tfpretrain's ids."""
    from tfpretrain.data.foreign_tokenizers import moved_rows

    embedding = backbone.token_embedding
    head = None if embedding.tie_weights else embedding.reverse_embeddings
    out = []
    for w in backbone.weights:
        if w is embedding.embeddings:
            out.append(moved_rows(w.numpy(), source.old_ids, axis=0))
        elif w is head:
            out.append(moved_rows(w.numpy(), source.old_ids, axis=1))
        else:
            out.append(w)
    return out


def _fitted(w, v):
    """``w`` for variable ``v``: a longer learned position table cut to its first rows."""
    shape, target = tuple(w.shape), tuple(v.shape)
    if shape != target and v.path.endswith("position_embedding/embeddings") and \
            shape[1:] == target[1:] and shape[0] > target[0]:
        return w[:target[0]]
    return w


def _assign(weights, variables, name: str) -> None:
    import keras

    weights = list(weights)
    weights[:len(variables)] = [_fitted(w, v) for w, v in zip(weights, variables)]
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
