"""Export a run as a SavedModel in TF Serving's layout: ``<dir>/<name>/<version>/``.

Signatures (the tokenizer is inside the graph; only TF core and TF Text ops):
- ``generate`` (also ``serving_default``): ``prompts`` string [batch] -> ``text`` (prompt +
  greedy continuation of ``eval.sample_tokens`` tokens) and ``token_ids`` (the new tokens).
- ``sample``: ``prompts``, ``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``,
  ``seed`` -> ``text``, ``token_ids``. temperature 0 = greedy.
- ``score``: ``text`` string [batch] -> ``log_likelihood`` (nats), ``num_tokens``,
  ``bits_per_byte``.
- ``logits``: ``token_ids`` int32 [batch, seq] -> ``logits`` float32 [batch, seq, vocab].
Masked-LM runs (``model.objective: mlm``) instead have:
- ``fill_mask`` (also ``serving_default``): ``text`` string [batch], each with ``[MASK]``
  tokens -> per mask the top-5 ``tokens``, ``token_ids`` and ``scores`` (probabilities)
  [batch, masks, 5], ``num_masks`` [batch] and ``text`` (masks replaced by the top token);
- ``logits``: ``token_ids`` int32 [batch, seq] (a whole row, e.g. ``[CLS] ... [SEP]``, pad
  = 0 is masked out) -> ``logits`` float32 [batch, seq, vocab] at every position.

The version is written to a hidden temporary folder and renamed into place, so a server
polling ``<dir>/<name>/`` never sees a half-written version.

    python -m tfpretrain.export --run-dir runs/default [--out saved_models/NAME] [--version N]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
from pathlib import Path

from tfpretrain.errors import UserError, cli_main, quiet_tensorflow


@contextlib.contextmanager
def staged(final: Path, overwrite: bool, hint: str = "another --out"):
    """Write into a hidden sibling ``.tmp-<name>`` and rename it to ``final`` only when the
    block succeeds, so nobody polling the parent folder sees a half-written export; an
    existing ``final`` is replaced only with ``overwrite``."""
    if final.exists() and not overwrite:
        raise UserError(f"export: {final} already exists; pass --overwrite or {hint}")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.environ.get("TFPRETRAIN_FAULT") == "export_before_rename":
        os._exit(137)  # test hook: die like kill -9 between writing and publishing
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def next_version(base: Path) -> int:
    versions = [int(p.name) for p in base.iterdir() if p.is_dir() and p.name.isdigit()] \
        if base.is_dir() else []
    return max(versions, default=0) + 1


FILL_MASK_TOP_K = 5  # predictions per [MASK] in the fill_mask signature


def mlm_logits(model, token_ids):
    """Masked-LM logits at every position of whole rows (pad = 0 is attention-masked)."""
    import tensorflow as tf

    from tfpretrain.data.tokenizers import PAD_ID

    token_ids = tf.convert_to_tensor(token_ids, tf.int32)
    shape = tf.shape(token_ids)
    positions = tf.broadcast_to(tf.range(shape[1])[None, :], shape)
    return model({"token_ids": token_ids, "padding_mask": tf.not_equal(token_ids, PAD_ID),
                  "segment_ids": tf.zeros_like(token_ids), "mask_positions": positions},
                 training=False)


def build_mlm_module(model, tokenizer, context: int):
    import tensorflow as tf

    from tfpretrain.generation import fill_mask as run_fill_mask

    module = tf.Module()
    module.model = model
    module.tokenizer_resources = tokenizer_resources(tokenizer)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
    def fill_mask(text):
        return run_fill_mask(model, tokenizer, text, context, FILL_MASK_TOP_K)

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32, name="token_ids")])
    def logits(token_ids):
        return {"logits": mlm_logits(model, token_ids)}

    module.fill_mask, module.logits = fill_mask, logits
    return module, {"serving_default": fill_mask, "fill_mask": fill_mask, "logits": logits}


def tokenizer_resources(tokenizer) -> list:
    """The tokenizer's trackable parts (tf_text ops' resources, lookup tables, keras_hub
    tokenizer layers) so tf.saved_model.save captures them."""
    import keras
    import tensorflow as tf

    return [v for v in vars(tokenizer).values()
            if isinstance(v, (tf.Module, tf.lookup.StaticHashTable, keras.layers.Layer))]


def build_module(model, tokenizer, context: int, default_new_tokens: int):
    import tensorflow as tf

    from tfpretrain.data.tokenizers import EOS_ID
    from tfpretrain.generation import decoder_task, generate_text, has_kv_cache

    if has_kv_cache(model):
        decoder_task(model)  # built eagerly, before the signatures are traced
    module = tf.Module()
    module.model = model
    module.tokenizer_resources = tokenizer_resources(tokenizer)

    def logits_fn(ids):
        return model(ids, training=False)

    def run_generate(prompts, max_new_tokens, temperature, top_k, top_p, seed):
        new, text = generate_text(model, tokenizer, prompts, max_new_tokens, context,
                                  temperature, top_k, top_p, seed)
        return {"text": text, "token_ids": new}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="prompts")])
    def generate(prompts):
        return run_generate(prompts, default_new_tokens, 0.0, 0, 1.0, 0)

    @tf.function(input_signature=[
        tf.TensorSpec([None], tf.string, name="prompts"),
        tf.TensorSpec([], tf.int32, name="max_new_tokens"),
        tf.TensorSpec([], tf.float32, name="temperature"),
        tf.TensorSpec([], tf.int32, name="top_k"),
        tf.TensorSpec([], tf.float32, name="top_p"),
        tf.TensorSpec([], tf.int32, name="seed")])
    def sample(prompts, max_new_tokens, temperature, top_k, top_p, seed):
        return run_generate(prompts, max_new_tokens, temperature, top_k, top_p, seed)

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32, name="token_ids")])
    def logits(token_ids):
        return {"logits": logits_fn(token_ids)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
    def score(text):
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
        token_nll = model.token_losses(y, logits_fn(x))
        nll = tf.reduce_sum(tf.reshape(tf.where(valid, token_nll, 0.0), [batch, -1]), axis=1)
        n_bytes = tf.cast(tf.strings.length(text, unit="BYTE"), tf.float32)
        return {"log_likelihood": -nll, "num_tokens": n_tokens,
                "bits_per_byte": nll / tf.math.log(2.0) / tf.maximum(n_bytes, 1.0)}

    module.generate, module.sample, module.logits, module.score = generate, sample, logits, score
    signatures = {"serving_default": generate, "generate": generate, "sample": sample,
                  "logits": logits, "score": score}
    return module, signatures


class ExportValidationError(RuntimeError):
    """The SavedModel does not behave like the Keras model, or uses forbidden ops."""


def validate_saved_model(path: Path, model, tokenizer, cfg) -> dict:
    """Reload ``path`` in a fresh process importing only tensorflow and tensorflow_text;
    compare logits (atol 1e-5) and greedy generation (identical tokens) with the Keras
    model, check the signatures with saved_model_cli, and scan the graph's ops."""
    import json
    import os
    import subprocess
    import tempfile

    import numpy as np

    import tensorflow as tf

    from tfpretrain.generation import FillMasker, Sampler, sample_prompt

    L = cfg.model.sequence_length
    if cfg.model.objective == "mlm":
        prompt = sample_prompt(cfg)
        prompts = [prompt, "", "no mask here", "[MASK] and [MASK] " * 3,
                   "[MASK] " + prompt * 60]  # the last: > context
        rows = [([2] + tokenizer.encode(p * 50))[:L - 1] + [3] for p in (prompt, "Lily and")]
        rows[1] = rows[1][:L // 2]  # one padded row
        ids = np.array([r + [0] * (L - len(r)) for r in rows], np.int32)
        # in a tf.function, like the SavedModel: eager Keras differs from graph mode by
        # float reordering alone (2.6e-5 on logits of magnitude 20 measured)
        expected_logits = tf.function(lambda x: mlm_logits(model, x))(ids).numpy()
        out = FillMasker(model, tokenizer, L, FILL_MASK_TOP_K)._fn(prompts, FILL_MASK_TOP_K)
        expected_tokens = out["token_ids"].numpy()
    else:
        prompts = [cfg.eval.prompt, "", "The", cfg.eval.prompt * 60]  # the last: > context
        rows = [([3] + tokenizer.encode(p * 50))[:L] for p in (cfg.eval.prompt, "Lily and Tom")]
        ids = np.array([r + [0] * (L - len(r)) for r in rows], np.int32)
        expected_logits = model(ids, training=False).numpy()
        sampler = Sampler(model, tokenizer, L)
        expected_tokens, _ = sampler.run(prompts, max_new_tokens=cfg.eval.sample_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        req = Path(tmp) / "request.json"
        req.write_text(json.dumps({"token_ids": ids.tolist(), "prompts": prompts}))
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        script = Path(__file__).with_name("serving_check.py")
        r = subprocess.run([sys.executable, str(script), str(path), str(req), tmp],
                           capture_output=True, text=True, env=env, timeout=600)
        if r.returncode != 0:
            raise ExportValidationError(f"the SavedModel at {path} failed to load or run in a "
                                        f"fresh process:\n{r.stderr[-3000:]}")
        report = json.loads(r.stdout.strip().splitlines()[-1])
        logits = np.load(Path(tmp) / "logits.npy")
        tokens = np.load(Path(tmp) / "generate.npy")
    problems = []
    if report["forbidden_ops"]:
        problems.append(f"forbidden ops in the graph: {report['forbidden_ops']}")
    if report["unexpected_modules"]:
        problems.append(f"the fresh process imported {report['unexpected_modules']}")
    # 1e-5 of the logits' scale (max |logit|, at least 1): the causal models' logits pass
    # at 1e-5 absolute; a masked LM's reach ~20 and differ by 2.5e-5 between the Keras
    # model in a tf.function and the reloaded graph (float32 op fusion and ordering alone)
    max_diff = float(np.max(np.abs(logits - expected_logits)))
    scale = max(1.0, float(np.max(np.abs(expected_logits))))
    if max_diff > 1e-5 * scale:
        problems.append(f"logits differ from the Keras model by up to {max_diff:.2e} "
                        f"(allowed 1e-5 x max |logit| = {1e-5 * scale:.2e})")
    if not np.array_equal(tokens, expected_tokens):
        problems.append("greedy generation differs from the Keras model's"
                        if cfg.model.objective == "causal" else
                        "fill-mask predictions differ from the Keras model's")
    cli = Path(sys.executable).with_name("saved_model_cli")
    if cli.exists():
        shown = subprocess.run([str(cli), "show", "--all", "--dir", str(path)],
                               capture_output=True, text=True, env=env, timeout=300)
        missing = [s for s in report["signatures"]
                   if f"signature_def['{s}']" not in shown.stdout]
        if shown.returncode != 0 or missing:
            problems.append(f"saved_model_cli show --all does not list {missing or 'it'}")
    if problems:
        raise ExportValidationError(f"export validation failed for {path}: "
                                    + "; ".join(problems))
    return {"max_logit_diff": max_diff, "num_ops": report["num_ops"],
            "signatures": report["signatures"]}


def export_saved_model(model, tokenizer, cfg, run_dir: Path, out: Path | None = None,
                       version: int | None = None, overwrite: bool = False,
                       validate: bool | None = None) -> Path:
    import tensorflow as tf

    base = Path(out) if out else Path(cfg.export.dir) / (cfg.export.name or Path(run_dir).name)
    base.mkdir(parents=True, exist_ok=True)
    final = base / str(version or next_version(base))
    if cfg.model.objective == "mlm":
        module, signatures = build_mlm_module(model, tokenizer, cfg.model.sequence_length)
    else:
        module, signatures = build_module(model, tokenizer, cfg.model.sequence_length,
                                          cfg.eval.sample_tokens)
    with staged(final, overwrite, hint="another --version") as tmp:
        tmp.rmdir()  # tf.saved_model.save creates the folder
        tf.saved_model.save(module, str(tmp), signatures=signatures)
        # the run's config and tokenizer travel with the model (assets.extra is ignored by
        # TF Serving but lets people and `evaluate --saved-model` see what made it)
        extra = tmp / "assets.extra"
        extra.mkdir(exist_ok=True)
        tokenizer.save(extra / "tokenizer")
        (extra / "config.yaml").write_text(cfg.to_yaml())
        if cfg.export.validate if validate is None else validate:
            validate_saved_model(tmp, model, tokenizer, cfg)
    return final


def export_keras_preset(model, tokenizer, cfg, run_dir: Path, out: Path | None = None,
                        overwrite: bool = False) -> Path:
    """A keras_hub preset (``task.save_to_preset``) that
    ``keras_hub.models.CausalLM.from_preset(path)`` loads in safe mode, checked by reloading.

    keras_hub's LlamaBackbone.get_config() omits ``tie_word_embeddings``, so a tied Llama
    would come back untied and fail to load its weights: we write the flag into config.json
    (LlamaBackbone's constructor accepts it). The preset has no keras_hub preprocessor (our
    tokenizers have no keras_hub task preprocessor); the run's tokenizer and config are in
    ``<preset>/tfpretrain/`` for ``tfpretrain.data.tokenizers.load_tokenizer``.
    """
    import json

    import keras_hub
    import numpy as np

    name = cfg.export.name or Path(run_dir).name
    final = Path(out) if out else Path(cfg.export.dir) / f"{name}_keras"
    with staged(final, overwrite) as tmp:
        if cfg.model.objective == "mlm":
            return _export_mlm_preset(model, tokenizer, cfg, tmp, final)
        task_cls = {"gpt2": keras_hub.models.GPT2CausalLM,
                    "llama": keras_hub.models.LlamaCausalLM}[cfg.model.arch]
        task = task_cls(backbone=model.backbone, preprocessor=None)
        task.save_to_preset(str(tmp))
        if cfg.model.arch == "llama":  # the backbone config is in config.json and task.json
            tie = bool(cfg.model.tie_embeddings)
            config = json.loads((tmp / "config.json").read_text())
            config["config"]["tie_word_embeddings"] = tie
            (tmp / "config.json").write_text(json.dumps(config, indent=4))
            task_config = json.loads((tmp / "task.json").read_text())
            task_config["config"]["backbone"]["config"]["tie_word_embeddings"] = tie
            (tmp / "task.json").write_text(json.dumps(task_config, indent=4))
        tokenizer.save(tmp / "tfpretrain" / "tokenizer")
        (tmp / "tfpretrain" / "config.yaml").write_text(cfg.to_yaml())
        reloaded = keras_hub.models.CausalLM.from_preset(str(tmp))
        ids = np.array([[3] + tokenizer.encode(cfg.eval.prompt)[: cfg.model.sequence_length - 1]],
                       np.int32)
        expected = model(ids, training=False).numpy()
        got = np.asarray(reloaded({"token_ids": ids, "padding_mask": np.ones_like(ids, bool)}))
        diff = float(np.max(np.abs(expected - got)))
        if diff > 1e-5:
            raise ExportValidationError(f"the keras_hub preset reloads with logits off by "
                                        f"{diff:.2e}")
    return final


def _export_mlm_preset(model, tokenizer, cfg, tmp: Path, final: Path) -> Path:
    """BertMaskedLM preset (our task, head included) that
    ``keras_hub.models.MaskedLM.from_preset`` reloads; checked on one row."""
    import keras_hub
    import numpy as np

    model.task.save_to_preset(str(tmp))
    tokenizer.save(tmp / "tfpretrain" / "tokenizer")
    (tmp / "tfpretrain" / "config.yaml").write_text(cfg.to_yaml())
    reloaded = keras_hub.models.MaskedLM.from_preset(str(tmp))
    L = cfg.model.sequence_length
    ids = np.array([([2] + tokenizer.encode(cfg.eval.prompt))[: L - 1] + [3]], np.int32)
    features = {"token_ids": ids, "padding_mask": np.ones_like(ids, bool),
                "segment_ids": np.zeros_like(ids),
                "mask_positions": np.arange(ids.shape[1], dtype=np.int32)[None]}
    diff = float(np.max(np.abs(np.asarray(model(features)) - np.asarray(reloaded(features)))))
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

    import numpy as np
    from keras_hub.src.utils.transformers.export import hf_exporter

    if cfg.model.objective == "mlm":
        raise UserError("--format hf supports causal runs (gpt2, llama) only; export a "
                        "masked-LM run as --format saved_model or --format keras")
    name = cfg.export.name or Path(run_dir).name
    final = Path(out) if out else Path(cfg.export.dir) / f"{name}_hf"
    try:
        from safetensors.numpy import save_file
    except ImportError:
        raise UserError("--format hf needs safetensors: pip install 'tfpretrain[hf]'") from None
    backbone = model.backbone
    key = {"GPT2Backbone": "GPT2Backbone", "LlamaBackbone": "Llama3Backbone"}[
        type(backbone).__name__]
    hf_config = hf_exporter.MODEL_CONFIGS[key](backbone)
    hf_config = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
    hf_config.update(bos_token_id=3, eos_token_id=3, pad_token_id=0)
    if key == "Llama3Backbone":
        hf_config["max_position_embeddings"] = cfg.model.sequence_length
    weights = hf_exporter.MODEL_EXPORTERS[key](backbone, include_lm_head=True)
    with staged(final, overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        arrays = {k: np.ascontiguousarray(v)
                  for k, v in hf_exporter._to_numpy_dict(weights).items()}
        save_file(arrays, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer.kind.startswith("sentencepiece"):
            (tmp / "tokenizer.model").write_bytes(tokenizer.proto)
            (tmp / "tokenizer_config.json").write_text(json.dumps({
                "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                "unk_token": "<unk>", "pad_token": "<pad>", "add_bos_token": False,
                "add_eos_token": False, "legacy": False,
                "model_max_length": cfg.model.sequence_length}, indent=2))
        tokenizer.save(tmp / "tfpretrain" / "tokenizer")
        (tmp / "tfpretrain" / "config.yaml").write_text(cfg.to_yaml())
    return final


def load_run(run_dir: Path):
    """(cfg, tokenizer, model) of a run folder, from its latest valid checkpoint."""
    from tfpretrain.config import build_config, read_yaml
    from tfpretrain.data.tokenizers import load_tokenizer
    from tfpretrain.models import build_from_config
    from tfpretrain.training.checkpoints import CheckpointManager
    from tfpretrain.training.optimizers import build_optimizer

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"--run-dir: {run_dir} is not a tfpretrain run folder "
                        "(no config.yaml)")
    cfg = build_config(read_yaml(run_dir / "config.yaml"), name=run_dir.name,
                       source=str(run_dir / "config.yaml"))
    tokenizer = load_tokenizer(run_dir / "tokenizer")
    model = build_from_config(cfg, tokenizer.vocabulary_size)
    optimizer = build_optimizer(cfg.optimizer, cfg.train.steps)
    optimizer.build(model.trainable_variables)
    manager = CheckpointManager(run_dir / "checkpoints", model, optimizer)
    found = manager.latest_valid()
    if found is None:
        raise UserError(f"--run-dir: {run_dir} has no valid checkpoint to load")
    manager.restore(found[0])
    return cfg, tokenizer, model


@cli_main
def main(argv=None) -> int:
    quiet_tensorflow()
    p = argparse.ArgumentParser(prog="python -m tfpretrain.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="run folder written by tfpretrain.fit")
    p.add_argument("--out", help="model folder (default: <export.dir>/<run name>)")
    p.add_argument("--version", type=int, help="version number (default: next free)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing version")
    p.add_argument("--format", choices=("saved_model", "keras", "hf"), default="saved_model",
                   help="saved_model: TF Serving layout (default); keras: a keras_hub preset "
                        "that keras_hub.models.CausalLM.from_preset() loads; hf: a Hugging "
                        "Face transformers folder")
    p.add_argument("--no-validate", action="store_true",
                   help="skip the fresh-process reload, parity check and op scan")
    args = p.parse_args(argv)
    if args.version is not None and args.version < 1:
        raise UserError(f"--version must be >= 1. Received: {args.version}")
    cfg, tokenizer, model = load_run(Path(args.run_dir))
    if args.format in ("keras", "hf"):
        fn = export_keras_preset if args.format == "keras" else export_hf
        print(fn(model, tokenizer, cfg, Path(args.run_dir),
                 Path(args.out) if args.out else None, args.overwrite))
        return 0
    path = export_saved_model(model, tokenizer, cfg, Path(args.run_dir),
                              Path(args.out) if args.out else None, args.version,
                              args.overwrite, False if args.no_validate else None)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
