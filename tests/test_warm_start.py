"""model.init_from: a run that starts from another run's or an exported preset's weights."""
import json
import shutil

import pytest

from conftest import run_cli, tiny_config, tiny_raw, write_yaml


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
