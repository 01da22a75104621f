"""model.init_from: a run that starts from another run's or an exported preset's weights."""
import json
import shutil

import pytest

from conftest import last_json_line, run_cli, tiny_config, tiny_raw, write_yaml


def _fresh_model(cfg):
    from tfpretrain.training.runtime import build_and_compile

    return build_and_compile(cfg, cfg_vocab(cfg), jit=False)


def cfg_vocab(cfg):
    from tfpretrain.data.tokenizers import from_path

    return from_path(cfg.tokenizer.path).vocabulary_size


def test_the_weights_of_a_run_and_of_its_presets_load_exactly(tiny_run, tmp_path):
    from tfpretrain.serving.presets import export_hf, export_keras_preset
    from tfpretrain.training import warm_start
    from tfpretrain.training.runfolder import load_run

    _, source, summary = tiny_run
    cfg = warm_start.resolve(tiny_config(tmp_path, model={"init_from": str(source)}),
                             tmp_path / "new")
    assert cfg.tokenizer.path == str(source / "tokenizer")  # the source's tokenizer
    model = _fresh_model(cfg)
    loaded = warm_start.load_weights(cfg, model)
    assert loaded == {"source": str(source), "kind": "run", "step": 60,
                      "weights_sha256": summary["weights_sha256"]}
    assert int(model.optimizer.iterations.numpy()) == 0  # a fresh optimizer
    src_cfg, tokenizer, src_model = load_run(source)
    presets = [export_keras_preset(src_model, tokenizer, src_cfg, source,
                                   out=tmp_path / "keras")]
    pytest.importorskip("safetensors")
    presets.append(export_hf(src_model, tokenizer, src_cfg, source, out=tmp_path / "hf"))
    for preset in presets:  # keras_hub loads both; the same weights come out
        pcfg = warm_start.resolve(tiny_config(tmp_path, model={"init_from": str(preset)}))
        assert pcfg.tokenizer.path == str(preset / "tfpretrain" / "tokenizer")
        loaded = warm_start.load_weights(pcfg, _fresh_model(pcfg))
        assert (loaded["kind"], loaded["weights_sha256"]) == ("preset",
                                                              summary["weights_sha256"])


def test_a_run_from_a_run_continues_its_loss_and_resumes_without_the_source(
        tiny_run, tmp_path, capsys):
    """At a learning rate too small to move the weights, the new run's loss is the source's;
    once the new run has a checkpoint, the source may go away."""
    from tfpretrain.fit import fit

    _, source, summary = tiny_run
    copy = tmp_path / "source"
    shutil.copytree(source, copy)
    cfg = tiny_config(tmp_path, model={"init_from": str(copy)},
                      optimizer={"learning_rate": 1e-7, "min_learning_rate": 1e-8},
                      train={"steps": 10}, eval={"every": 10}, export={"enabled": False})
    run_dir = tmp_path / "runs" / "continued"
    from tfpretrain.data.__main__ import main as prepare_data

    raw = tiny_raw(tmp_path, model={"init_from": str(copy)})  # the cache prepared ahead
    assert prepare_data(["--config", str(write_yaml(tmp_path / "c.yaml", raw))]) == 0
    capsys.readouterr()
    first = fit(cfg, run_dir)
    assert "from the token cache" in capsys.readouterr().out  # is the entry fit reads
    assert abs(first["val_loss"] - summary["val_loss"]) < 2e-3, (first, summary)
    assert first["init_from"]["weights_sha256"] == summary["weights_sha256"]
    assert json.loads((run_dir / "init_from.json").read_text())["step"] == 60
    shutil.rmtree(copy)
    longer = tiny_config(tmp_path, model={"init_from": str(copy)},
                         optimizer={"learning_rate": 1e-7, "min_learning_rate": 1e-8},
                         train={"steps": 20}, eval={"every": 10}, export={"enabled": False})
    second = fit(longer, run_dir)
    assert second["steps"] == 20 and second["init_from"] == first["init_from"]
    from tfpretrain.runs import columns, describe

    row = describe(run_dir, tmp_path)  # `runs` shows where the weights came from
    assert row["init_from"] == str(copy) and "init_from" in columns([row])


def test_a_source_that_does_not_fit_is_one_message_before_the_run_folder(tiny_run, tmp_path):
    _, source, _ = tiny_run
    raw = tiny_raw(tmp_path, model={"init_from": str(source), "hidden_dim": 64})
    run_dir = tmp_path / "run"
    r = run_cli("tfpretrain.fit", "--config", str(write_yaml(tmp_path / "c.yaml", raw)),
                "--run-dir", str(run_dir))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "model.init_from" in r.stderr and "model.hidden_dim is 64 here, 32 in the source" \
        in r.stderr
    assert not run_dir.exists()
    from tfpretrain.config import build_config
    from tfpretrain.errors import UserError
    from tfpretrain.fit import dry_run

    with pytest.raises(UserError, match="model.hidden_dim is 64 here"):  # the plan says so
        dry_run(build_config(raw))


def test_evaluate_init_from_a_run_is_evaluate_run_dir(tiny_run, tmp_path, capsys):
    from tfpretrain.evaluate import main as evaluate

    _, source, _ = tiny_run
    text = tmp_path / "story.txt"
    text.write_text("\n\n".join(["Lily and Tom went to the park. They played."] * 8))
    out = []
    for flag in ("--run-dir", "--init-from"):
        assert evaluate([flag, str(source), "--data", str(text)]) == 0
        out.append(last_json_line(capsys.readouterr().out))
    assert out[1]["val_loss"] == out[0]["val_loss"] and out[1]["init_from"] == str(source)


def test_what_the_source_must_share(tiny_run, tmp_path):
    from tfpretrain.errors import UserError
    from tfpretrain.training import warm_start

    _, source, _ = tiny_run
    src = warm_start.find_source(str(source)).cfg

    def differences(**model):
        return warm_start.shape_differences(src, tiny_config(tmp_path, model=model))

    assert differences() == [] and differences(dropout=0.1, z_loss=1e-4) == []
    assert differences(sequence_length=64) == [
        "model.sequence_length is 64 here, 32 in the source"]  # GPT-2's position table
    assert differences(arch="bert", objective="mlm") == [
        "the source's model.objective is 'causal', this run's 'mlm'"]
    llama = warm_start.find_source(str(source)).cfg
    llama.model.arch = "llama"
    assert warm_start.shape_differences(llama, tiny_config(
        tmp_path, model={"arch": "llama", "sequence_length": 64})) == []  # RoPE: any context
    assert warm_start.is_builtin_preset("gpt2_base_en")  # downloaded by keras_hub
    assert not warm_start.is_builtin_preset("nope")
    for bad, needle in ((tmp_path / "nope", "no such folder"),
                        (tmp_path, "not a tfpretrain run folder")):
        with pytest.raises(UserError, match=needle):
            warm_start.resolve(tiny_config(tmp_path, model={"init_from": str(bad)}))
    other = tiny_config(tmp_path, model={"init_from": str(source)},
                        tokenizer={"path": str(_byte_tokenizer(tmp_path))})
    with pytest.raises(UserError, match="is not the source's tokenizer"):
        warm_start.resolve(other)


def _byte_tokenizer(tmp_path):
    from tfpretrain.data.tokenizers import ByteTokenizer

    ByteTokenizer().save(tmp_path / "byte")
    return tmp_path / "byte"


STORY = "Once upon a time, a little dog named Max found a red ball in the park. "


def _gpt2_preset(folder):
    """A GPT-2 preset as keras_hub publishes them, not made by tfpretrain: byte-level BPE
    with <|endoftext|> as its last id, a 64-position table, bfloat16 weights."""
    import keras_hub
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([STORY] * 20, trainers.BpeTrainer(
        vocab_size=300, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = tok.to_str() and __import__("json").loads(tok.to_str())["model"]
    vocabulary = dict(model["vocab"], **{"<|endoftext|>": len(model["vocab"])})
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    tokenizer = keras_hub.models.GPT2Tokenizer(vocabulary=vocabulary, merges=merges)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=len(vocabulary), num_layers=2, num_heads=2, hidden_dim=32,
        intermediate_dim=64, max_sequence_length=64, dtype="bfloat16")
    keras_hub.models.GPT2CausalLM(backbone, keras_hub.models.GPT2CausalLMPreprocessor(
        tokenizer, sequence_length=32)).save_to_preset(str(folder))
    return folder


def _llama_preset(folder):
    """A Llama 2-style preset (SentencePiece with unk, bos, eos = 0, 1, 2 and no pad;
    untied head; GQA; rope_theta and RMSNorm epsilon other than keras_hub's defaults)."""
    import keras_hub

    tokenizer = keras_hub.models.LlamaTokenizer(proto=_llama2_sentencepiece())
    backbone = keras_hub.models.LlamaBackbone(
        vocabulary_size=tokenizer.vocabulary_size(), num_layers=2, num_query_heads=4,
        num_key_value_heads=2, hidden_dim=32, intermediate_dim=48,
        rope_max_wavelength=500000.0, layer_norm_epsilon=1e-5)
    keras_hub.models.LlamaCausalLM(backbone, keras_hub.models.LlamaCausalLMPreprocessor(
        tokenizer, sequence_length=32)).save_to_preset(str(folder))
    return folder


def _llama2_sentencepiece() -> bytes:
    """A SentencePiece BPE model with Llama 2's ids: unk, bos, eos = 0, 1, 2, no pad."""
    import io

    import sentencepiece as spm

    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([STORY] * 50), model_writer=proto, model_type="bpe",
        vocab_size=320, byte_fallback=True, hard_vocab_limit=False, minloglevel=2)
    return proto.getvalue()


@pytest.mark.parametrize("make", [_gpt2_preset, _llama_preset])
def test_a_keras_hub_preset_tfpretrain_did_not_make_gives_the_same_logits(make, tmp_path):
    """Its tokenizer moves to tfpretrain's special ids and the embedding rows (and an untied
    head's columns) follow: the same text gets the same tokens and the same logits."""
    import keras_hub
    import numpy as np

    from tfpretrain.data.foreign_tokenizers import MISSING
    from tfpretrain.data.special_ids import EOS_ID, NUM_SPECIAL
    from tfpretrain.data.tokenizers import from_path
    from tfpretrain.errors import UserError
    from tfpretrain.training import warm_start

    preset = str(make(tmp_path / "preset"))
    with pytest.raises(UserError) as error:  # a model that does not fit: what to set
        warm_start.resolve(tiny_config(tmp_path, model={"init_from": preset, "num_layers": 1,
                                                        "sequence_length": 128}))
    from tfpretrain.config import parse_overrides

    hint = str(error.value).split("to match it: ")[1].split()
    assert hint[::2] == ["--set"] * (len(hint) // 2)  # as fit's --set takes them
    model = parse_overrides(hint[1::2])["model"]
    if "sequence_length" in model:  # gpt2: 64 positions; the run uses the first 32
        assert model.pop("sequence_length") == 64
    cfg = warm_start.resolve(tiny_config(tmp_path, model={"init_from": preset, **model}))
    source = warm_start.find_source(preset)
    assert source.kind == "keras_hub"
    ours = from_path(cfg.tokenizer.path)
    theirs = keras_hub.tokenizers.Tokenizer.from_preset(preset)
    new_ids = ours.encode(STORY + "Zoë sang!")
    old_ids = np.asarray(theirs(STORY + "Zoë sang!")).tolist()
    assert [int(source.old_ids[i]) for i in new_ids] == old_ids and min(new_ids) >= NUM_SPECIAL

    net = _fresh_model(cfg)
    loaded = warm_start.load_weights(cfg, net)
    assert loaded["kind"] == "keras_hub" and loaded["source"] == preset
    original = keras_hub.models.Backbone.from_preset(preset, dtype="float32")
    n = 24
    old = np.asarray([old_ids[:n]])
    hidden = original({"token_ids": old, "padding_mask": np.ones_like(old, bool)})
    want = np.asarray(original.token_embedding(hidden, reverse=True))
    got = np.asarray(net(np.asarray([new_ids[:n]])))
    kept = source.old_ids != MISSING
    np.testing.assert_allclose(got[..., kept], want[..., source.old_ids[kept]], atol=2e-5)
    eos = source.old_ids[EOS_ID]
    assert eos != MISSING and np.allclose(got[..., EOS_ID], want[..., eos], atol=2e-5)
    # a special the source lacks (pad, mask) scores the mean row: never the top token
    assert (got[..., ~kept].max(-1) < got.max(-1)).all()
    assert ours.decode(new_ids) == theirs.detokenize(np.asarray(old_ids))


def test_a_run_starts_from_a_keras_hub_gpt2_preset_where_evaluate_said(tmp_path, capsys):
    """``evaluate --init-from`` scores the preset as it stands; a run from it, at a learning
    rate too small to move the weights, gets the same loss on the same text (eval.sets)."""
    from tfpretrain.evaluate import main as evaluate
    from tfpretrain.fit import fit

    preset = str(_gpt2_preset(tmp_path / "preset"))
    text = tmp_path / "story.txt"
    text.write_text("\n\n".join([STORY + "The end."] * 6))
    assert evaluate(["--init-from", preset, "--data", str(text)]) == 0
    before = last_json_line(capsys.readouterr().out)
    assert before["init_from"] == preset and before["documents"] == 6
    cfg = tiny_config(tmp_path, model={"init_from": preset, "sequence_length": 64},
                      optimizer={"warmup_steps": 2, "learning_rate": 1e-9,
                                 "min_learning_rate": 1e-10},
                      train={"steps": 4, "jit_compile": False},  # 4 steps: no XLA compile
                      eval={"every": 4, "steps": 1, "sample_tokens": 4,
                            "sets": {"story": str(text)}},
                      export={"enabled": False})
    summary = fit(cfg, tmp_path / "run")
    assert summary["steps"] == 4 and summary["init_from"]["kind"] == "keras_hub"
    assert summary["init_from"]["source"] == preset
    assert abs(summary["val_story_loss"] - before["val_loss"]) < 1e-4, (summary, before)
    from tfpretrain.data.tokenizers import same_tokenizer
    from tfpretrain.training import warm_start

    assert same_tokenizer(tmp_path / "run" / "tokenizer",
                          warm_start.find_source(preset).tokenizer_dir)
    from tfpretrain.config import build_config

    for bad in ({"arch": "gpt2", "rope_theta": 5e5}, {"arch": "bert", "objective": "mlm",
                                                      "norm_epsilon": 1e-5}):
        with pytest.raises(Exception, match="only used by `model.arch: llama`"):
            build_config(tiny_raw(tmp_path, model=bad))


def _hf_folder(folder, arch, model, tokenizer_files):
    """A Hugging Face transformers folder of ``model`` (tfpretrain's HF export with its
    tfpretrain/ folder removed) with the tokenizer files such a checkpoint ships."""
    from tfpretrain.data.tokenizers import ByteTokenizer
    from tfpretrain.serving.presets import export_hf

    export_hf(model, ByteTokenizer(), tiny_config(folder.parent, model=arch), folder.parent,
              out=folder)
    shutil.rmtree(folder / "tfpretrain")  # nothing in it says tfpretrain made it
    for name, content in tokenizer_files.items():
        (folder / name).write_bytes(content)
    return folder


def _gpt2_hf(tmp_path):
    """GPT-2 as the Hub has it: vocab.json + merges.txt (<|endoftext|> last)."""
    import keras_hub

    theirs = keras_hub.tokenizers.Tokenizer.from_preset(str(_gpt2_preset(tmp_path / "k")))
    arch = {"sequence_length": 64}
    files = {"vocab.json": json.dumps(dict(theirs.vocabulary)).encode(),
             "merges.txt": ("#version: 0.2\n" + "\n".join(theirs.merges) + "\n").encode()}
    return arch, theirs, lambda text: theirs(text), files


def _llama2_hf(tmp_path):
    """A Llama 2-style checkpoint: tokenizer.model with unk, bos, eos = 0, 1, 2; untied;
    GQA; rope_theta and an RMSNorm epsilon other than keras_hub's."""
    from tfpretrain.data.tokenizers import SentencePieceTokenizer

    proto = _llama2_sentencepiece()
    theirs = SentencePieceTokenizer(proto, "sentencepiece_bpe")
    arch = {"arch": "llama", "num_key_value_heads": 1, "tie_embeddings": False,
            "rope_theta": 5e5, "norm_epsilon": 1e-5}
    return arch, theirs, theirs.encode, {"tokenizer.model": proto}


@pytest.mark.parametrize("make", [_gpt2_hf, _llama2_hf])
def test_a_hugging_face_checkpoint_gives_the_same_logits(make, tmp_path):
    """keras_hub converts the weights; tfpretrain moves the tokenizer (a Llama 2's from its
    tokenizer.model) and takes the RMSNorm epsilon that keras_hub's converter drops."""
    pytest.importorskip("safetensors")
    import numpy as np

    from tfpretrain.data.foreign_tokenizers import MISSING
    from tfpretrain.data.tokenizers import from_path
    from tfpretrain.training import warm_start
    from tfpretrain.training.runtime import build_and_compile

    arch, theirs, encode, files = make(tmp_path)
    vocabulary = len(theirs.vocabulary) if hasattr(theirs, "merges") else theirs.vocabulary_size
    original = build_and_compile(tiny_config(tmp_path, model=arch), vocabulary, jit=False)
    folder = _hf_folder(tmp_path / "hf", arch, original, files)
    if arch.get("arch") == "llama":
        assert json.loads((folder / "config.json").read_text())["rms_norm_eps"] == 1e-5
    arch.pop("sequence_length", None)  # gpt2: the run's 32 of the checkpoint's 64 positions
    cfg = warm_start.resolve(tiny_config(tmp_path, model={**arch, "init_from": str(folder)}))
    source = warm_start.find_source(str(folder))
    net = _fresh_model(cfg)
    assert warm_start.load_weights(cfg, net)["kind"] == "keras_hub"
    old_ids = np.asarray(encode(STORY)).tolist()[:32]
    new_ids = from_path(cfg.tokenizer.path).encode(STORY)[:32]
    assert [int(source.old_ids[i]) for i in new_ids] == old_ids
    kept = source.old_ids != MISSING
    got, want = np.asarray(net(np.asarray([new_ids]))), np.asarray(original(np.asarray([old_ids])))
    np.testing.assert_allclose(got[..., kept], want[..., source.old_ids[kept]], atol=2e-5)


def test_what_tfpretrain_cannot_start_from_is_one_message(tmp_path, capsys):
    """Another backbone, scaled RoPE, a "byte-level" vocabulary without the byte alphabet;
    and evaluate --init-from with nothing to score."""
    import keras_hub

    from tfpretrain.data.foreign_tokenizers import convert
    from tfpretrain.errors import UserError
    from tfpretrain.evaluate import main as evaluate
    from tfpretrain.training import warm_start

    other = keras_hub.models.DistilBertBackbone(vocabulary_size=40, num_layers=1, num_heads=1,
                                                hidden_dim=8, intermediate_dim=8)
    with pytest.raises(UserError, match="DistilBertBackbone; tfpretrain starts from GPT2Backb"):
        warm_start.model_keys(other)
    segments = keras_hub.models.BertBackbone(vocabulary_size=40, num_layers=1, num_heads=1,
                                             hidden_dim=8, intermediate_dim=8, num_segments=3)
    with pytest.raises(UserError, match="3 segment types; tfpretrain's bert has 2"):
        warm_start.model_keys(segments)
    scaled = keras_hub.models.Llama3Backbone(
        vocabulary_size=40, num_layers=1, num_query_heads=1, num_key_value_heads=1,
        hidden_dim=8, intermediate_dim=8, rope_frequency_adjustment_factor=8.0,
        rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
        rope_pretraining_sequence_length=64)
    with pytest.raises(UserError, match="scales its RoPE positions"):
        warm_start.model_keys(scaled)
    not_bytes = keras_hub.tokenizers.BytePairTokenizer(
        vocabulary={"\u2581the": 0, "\u2581": 1, "t": 2, "h": 3, "e": 4, "th": 5,
                    "\u2581th": 6}, merges=["t h", "\u2581 th", "\u2581th e"])
    with pytest.raises(UserError, match="lacks .* of the 256 byte characters"):
        convert(not_bytes)
    assert evaluate(["--init-from", str(tmp_path)]) == 2
    assert "--init-from scores one source on --data PATH or on --tasks" in \
        capsys.readouterr().err


BERT_SPECIALS = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # BERT's order


def _bert_vocab(lowercase: bool) -> list:
    """A WordPiece vocabulary in BERT's layout: [PAD] first, [UNK] [CLS] [SEP] [MASK]
    later (BERT's own: 0, 100, 101, 102, 103)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator([STORY] * 20, trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=BERT_SPECIALS, show_progress=False))
    return [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]


def _bert_task(vocabulary: list):
    """A BertMaskedLM (2 x 32, 64 positions) whose head's weights are all random too."""
    import keras_hub
    import numpy as np

    from tfpretrain import compat

    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=len(vocabulary), num_layers=2, num_heads=2, hidden_dim=32,
        intermediate_dim=64, max_sequence_length=64)
    task = keras_hub.models.BertMaskedLM(backbone, preprocessor=None)
    task({"token_ids": np.zeros([1, 8], "int32"), "padding_mask": np.ones([1, 8], bool),
          "segment_ids": np.zeros([1, 8], "int32"), "mask_positions": np.zeros([1, 1], "int32")})
    rng = np.random.default_rng(0)
    for v in compat.masked_lm_head_parts(task).values():
        v.assign(rng.normal(0.5, 0.2, v.shape).astype("float32"))
    return task


def _bert_keras_preset(folder):
    """A cased Keras BERT preset with its BertMaskedLM task weights."""
    import keras_hub

    vocabulary = _bert_vocab(lowercase=False)
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=vocabulary, lowercase=False)
    task = _bert_task(vocabulary)
    task.save_to_preset(str(folder))  # backbone and head (task.weights.h5)
    tokenizer.save_to_preset(str(folder))
    return folder, task, tokenizer


def _bert_hf(folder, head=True):
    """An uncased Hugging Face BERT checkpoint (BertForMaskedLM's tensors, or BertModel's
    without ``head``) written from a keras BertMaskedLM with keras_hub's converter inverted."""
    import keras_hub
    import numpy as np
    from safetensors.numpy import save_file

    from tfpretrain import compat

    vocabulary = _bert_vocab(lowercase=True)
    task, H = _bert_task(vocabulary), 32
    b = task.backbone
    t = {"bert.embeddings.word_embeddings.weight": b.get_layer("token_embedding").embeddings,
         "bert.embeddings.position_embeddings.weight":
             b.get_layer("position_embedding").position_embeddings,
         "bert.embeddings.token_type_embeddings.weight":
             b.get_layer("segment_embedding").embeddings,
         "bert.embeddings.LayerNorm.gamma": b.get_layer("embeddings_layer_norm").gamma,
         "bert.embeddings.LayerNorm.beta": b.get_layer("embeddings_layer_norm").beta,
         "bert.pooler.dense.weight": b.get_layer("pooled_dense").kernel.numpy().T,
         "bert.pooler.dense.bias": b.get_layer("pooled_dense").bias}
    hf_names = {"query": "attention.self.query", "key": "attention.self.key",
                "value": "attention.self.value", "attention_output": "attention.output.dense",
                "self_attention_layer_norm": "attention.output.LayerNorm",
                "feedforward_intermediate_dense": "intermediate.dense",
                "feedforward_output_dense": "output.dense",
                "feedforward_layer_norm": "output.LayerNorm"}
    for i in range(2):
        for v in b.get_layer(f"transformer_layer_{i}").weights:
            layer, kind = v.path.split("/")[-2:]
            w = v.numpy()
            if w.ndim == 3:  # attention kernels: [H, heads, head_dim] or [heads, head_dim, H]
                w = w.reshape(-1, H) if layer == "attention_output" else w.reshape(H, -1)
            if kind == "kernel":  # HF Linear: [out, in]
                w = w.T
            name = {"kernel": "weight", "bias": "bias"}.get(kind, kind)  # gamma, beta
            t[f"bert.encoder.layer.{i}.{hf_names[layer]}.{name}"] = \
                w if kind == "kernel" else w.reshape(-1)
    if head:
        parts = compat.masked_lm_head_parts(task)
        t.update({"cls.predictions.transform.dense.weight": parts["dense_kernel"].numpy().T,
                  "cls.predictions.transform.dense.bias": parts["dense_bias"],
                  "cls.predictions.transform.LayerNorm.gamma": parts["norm_gamma"],
                  "cls.predictions.transform.LayerNorm.beta": parts["norm_beta"],
                  "cls.predictions.bias": parts["bias"]})
    folder.mkdir(parents=True)
    save_file({k: np.ascontiguousarray(np.asarray(v), "float32") for k, v in t.items()},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "bert", "architectures": ["BertForMaskedLM"], "vocab_size": len(vocabulary),
        "hidden_size": H, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 64, "type_vocab_size": 2,
        "hidden_act": "gelu", "layer_norm_eps": 1e-12}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    (folder / "vocab.txt").write_text("\n".join(vocabulary) + "\n")
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=vocabulary, lowercase=True)
    return folder, task, tokenizer


@pytest.mark.parametrize("make", [_bert_keras_preset, _bert_hf])
def test_a_published_bert_gives_the_same_masked_lm_logits(make, tmp_path):
    """A BERT's WordPiece vocabulary moves [PAD] [UNK] [CLS] [SEP] [MASK] to 0..4 (cased or
    uncased kept); its backbone and its masked-LM head (a Keras preset's task weights, a
    Hugging Face checkpoint's cls.predictions) load: the same text, the same logits at
    every position."""
    pytest.importorskip("safetensors")
    import numpy as np

    from tfpretrain.data.special_ids import BOS_ID, EOS_ID
    from tfpretrain.data.tokenizers import from_path
    from tfpretrain.training import warm_start

    folder, task, theirs = make(tmp_path / "bert")
    text = STORY + "Once upon a TIME."
    raw = {"arch": "bert", "objective": "mlm", "num_heads": 2, "hidden_dim": 32,
           "intermediate_dim": 64, "init_from": str(folder)}
    cfg = warm_start.resolve(tiny_config(tmp_path, model=raw))
    ours, source = from_path(cfg.tokenizer.path), warm_start.find_source(str(folder))
    assert ours.lowercase is (make is _bert_hf)
    new_ids = [BOS_ID] + ours.encode(text)[:24] + [EOS_ID]
    old_ids = [int(source.old_ids[i]) for i in new_ids]
    assert old_ids[1:-1] == np.asarray(theirs(text)).tolist()[:24]
    assert [theirs.id_to_token(old_ids[0]), theirs.id_to_token(old_ids[-1])] == \
        ["[CLS]", "[SEP]"]
    net = _fresh_model(cfg)
    loaded = warm_start.load_weights(cfg, net)
    assert (loaded["kind"], loaded["new_head"]) == ("keras_hub", False)
    got = np.asarray(net.row_logits(np.asarray([new_ids])))
    old = np.asarray([old_ids])
    want = np.asarray(task({"token_ids": old, "padding_mask": np.ones_like(old, bool),
                            "segment_ids": np.zeros_like(old),
                            "mask_positions": np.arange(len(old_ids))[None]}))
    # keras_hub's head normalizes with epsilon 1e-5 either way: the same computation
    np.testing.assert_allclose(got, want[..., source.old_ids], atol=1e-4)


def test_a_run_starts_from_a_bert_without_a_head_and_says_so(tmp_path, capsys):
    """A Hugging Face BertModel (no cls.predictions): the backbone loads, the masked-LM
    head starts new, the log and init_from.json say so, and the run trains from it;
    evaluate --init-from scores it first."""
    pytest.importorskip("safetensors")
    from tfpretrain.evaluate import main as evaluate
    from tfpretrain.fit import fit

    folder, _, _ = _bert_hf(tmp_path / "bert", head=False)
    text = tmp_path / "story.txt"
    text.write_text("\n\n".join([STORY] * 6))
    assert evaluate(["--init-from", str(folder), "--data", str(text)]) == 0
    before = last_json_line(capsys.readouterr().out)
    assert before["init_from"] == str(folder) and 0 <= before["val_masked_accuracy"] <= 1
    cfg = tiny_config(tmp_path, model={"arch": "bert", "objective": "mlm", "num_heads": 2,
                                       "hidden_dim": 32, "intermediate_dim": 64,
                                       "init_from": str(folder)},
                      optimizer={"warmup_steps": 2}, train={"steps": 4, "jit_compile": False},
                      eval={"every": 4, "steps": 1}, export={"enabled": False})
    summary = fit(cfg, tmp_path / "run")
    assert summary["init_from"]["new_head"] is True and summary["steps"] == 4
    assert summary["vocabulary_size_requested"] is None  # the source's tokenizer, as it is
    assert summary["val_masked_accuracy"] >= 0
    assert "the masked-LM head starts new: the preset has none" in capsys.readouterr().out
