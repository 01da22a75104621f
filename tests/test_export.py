import os
import subprocess
import sys
from pathlib import Path

import pytest
import tensorflow as tf

from conftest import last_json_line, run_cli


def versions(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.mark.slow  # suite time; run with -m slow
def test_export_versions_never_overwrite_and_atomic(tiny_run, tmp_path):
    _, run_dir, summary = tiny_run
    out = tmp_path / "models" / "tiny"
    for expected in ("1", "2"):
        r = run_cli("tfpretrain.export", "--run-dir", str(run_dir), "--out", str(out),
                    "--no-validate")
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.strip().splitlines()[-1] == str(out / expected)
    r = run_cli("tfpretrain.export", "--run-dir", str(run_dir), "--out", str(out),
                "--version", "1", "--no-validate")
    assert r.returncode == 2 and "already exists" in r.stderr and "--overwrite" in r.stderr
    assert "Traceback" not in r.stderr
    # a process killed between writing and publishing leaves no numeric version behind
    env_before = os.environ.get("TFPRETRAIN_FAULT")
    os.environ["TFPRETRAIN_FAULT"] = "export_before_rename"
    try:
        r = run_cli("tfpretrain.export", "--run-dir", str(run_dir), "--out", str(out),
                    "--no-validate")
    finally:
        os.environ.pop("TFPRETRAIN_FAULT")
        if env_before is not None:
            os.environ["TFPRETRAIN_FAULT"] = env_before
    assert r.returncode == 137
    assert [v for v in versions(out) if v.isdigit()] == ["1", "2"]
    # the next export still gets the next number
    r = run_cli("tfpretrain.export", "--run-dir", str(run_dir), "--out", str(out),
                "--no-validate")
    assert r.stdout.strip().splitlines()[-1] == str(out / "3")
    assert (out / "3" / "assets.extra" / "config.yaml").is_file()


def test_fit_export_was_validated_and_has_only_allowed_ops(tiny_run):
    from tfpretrain.serving.check import scan_ops

    _, _, summary = tiny_run
    ops, bad = scan_ops(summary["saved_model"])
    assert not bad
    assert not any(op.startswith("Xla") for op in ops)
    assert "SentencepieceTokenizeOp" in ops     # the tokenizer is in the graph


def test_the_saved_model_holds_the_weights_and_no_optimizer_state(tiny_run):
    import numpy as np

    _, _, summary = tiny_run
    reader = tf.train.load_checkpoint(str(Path(summary["saved_model"]) / "variables"
                                          / "variables"))
    shapes = reader.get_variable_to_shape_map()
    stored = sum(int(np.prod(s)) for name, s in shapes.items() if not name.startswith("_"))
    # the fit's model was compiled with AdamW: its moments would make this 3x the weights
    assert not [n for n in shapes if "optimizer" in n]
    assert summary["params"] <= stored < 1.01 * summary["params"]


def test_the_early_checker_reports_a_broken_model_and_never_outlives_its_block(tmp_path):
    """The fresh checking process starts before the save (its imports overlap it): a
    model it cannot load is a failure with the reason; an unused one is killed."""
    import time

    from tfpretrain.serving.saved_model import Checker

    request = tmp_path / "request.json"
    request.write_text('{"token_ids": [[1, 2]], "prompts": ["a"]}')
    with Checker() as checker:
        checker.send(tmp_path / "no-model", request, str(tmp_path))
        code, _, err = checker.wait()
    assert code != 0 and "no-model" in err
    with Checker() as unused:
        # never on a GPU: the training process holds its memory (docs/serving.md)
        environ = b""
        for _ in range(100):  # empty until the new program's memory is in place
            environ = Path(f"/proc/{unused.proc.pid}/environ").read_bytes()
            if environ:
                break
            time.sleep(0.05)
        assert b"CUDA_VISIBLE_DEVICES=-1" in environ.split(b"\0")
    assert unused.proc.returncode is not None


def test_the_check_runs_during_the_block_and_a_failed_verdict_publishes_nothing(
        tiny_run, tmp_path):
    """``exporting`` saves, hands the version to the fresh process and lets the caller work
    (fit's final evaluation) while that process checks it: the process is done inside the
    block, the version appears only after it. A verdict that fails (here: the Keras model
    changed after the save) raises and leaves no version and no staging folder; a dead
    early process is replaced."""
    from tfpretrain.serving.saved_model import Checker, ExportValidationError, exporting
    from tfpretrain.training.runfolder import load_run

    cfg, tokenizer, model = load_run(tiny_run[1])
    out = tmp_path / "models"
    with Checker() as checker, exporting(model, tokenizer, cfg, tiny_run[1], out=out,
                                         checker=checker) as final:
        assert (out / ".tmp-1" / "saved_model.pb").is_file() and not final.exists()
        assert checker.proc.wait(timeout=300) == 0  # the check finished within the block
    assert final == out / "1" and (final / "saved_model.pb").is_file()

    # an early process that died meanwhile (say, the OOM killer) is replaced by a new one
    weights, dead = model.get_weights(), Checker()
    dead.proc.kill()
    dead.proc.wait()
    with pytest.raises(ExportValidationError, match="differ from the Keras model"):
        with exporting(model, tokenizer, cfg, tiny_run[1], out=out, checker=dead):
            model.set_weights([w * 1.5 for w in weights])
    model.set_weights(weights)
    assert versions(out) == ["1"]


def test_fit_starts_the_check_process_with_the_run_only_where_it_exports(
        tmp_path, monkeypatch):
    """fit starts the export check's process before training, so its imports overlap the
    run's; not when nothing is validated, nor on a worker that is not the chief."""
    import json

    from conftest import tiny_config
    from tfpretrain.fit import checker_for
    from tfpretrain.serving.saved_model import Checker

    with checker_for(tiny_config(tmp_path)) as checker:
        assert isinstance(checker, Checker) and checker.proc.poll() is None
    assert checker.proc.returncode is not None  # killed, never used
    for key in ("enabled", "validate"):
        with checker_for(tiny_config(tmp_path, export={key: False})) as none:
            assert none is None
    monkeypatch.setenv("TF_CONFIG", json.dumps({
        "cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
        "task": {"type": "worker", "index": 1}}))
    with checker_for(tiny_config(tmp_path, train={"strategy": "multi_worker"})) as none:
        assert none is None


def test_op_scan_flags_python_functions(tmp_path):
    from tfpretrain.serving.check import scan_ops

    class M(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32)])
        def f(self, x):
            return tf.py_function(lambda v: v * 2, [x], tf.float32)

    tf.saved_model.save(M(), str(tmp_path / "m"))
    _, bad = scan_ops(str(tmp_path / "m"))
    assert bad & {"EagerPyFunc", "PyFunc"}


def test_export_of_run_without_checkpoint_is_a_clear_error(tiny_run, tmp_path):
    _, run_dir, _ = tiny_run
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    (broken / "tokenizer").mkdir()
    for f in (run_dir / "tokenizer").iterdir():
        (broken / "tokenizer" / f.name).write_bytes(f.read_bytes())
    r = run_cli("tfpretrain.export", "--run-dir", str(broken), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "no valid checkpoint" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "o").exists()


def test_evaluate_reproduces_the_runs_val_metrics(tiny_run, tmp_path):
    _, run_dir, summary = tiny_run
    r = run_cli("tfpretrain.evaluate", "--run-dir", str(run_dir))
    assert r.returncode == 0, r.stderr[-2000:]
    out = last_json_line(r.stdout)
    assert out["val_loss"] == pytest.approx(summary["val_loss"], abs=1e-4)
    assert out["val_bits_per_byte"] == pytest.approx(summary["val_bits_per_byte"], abs=1e-4)
    text = tmp_path / "t.txt"
    text.write_text("Lily went to the park with her friend Tom. " * 5
                    + "\n\n" + "They played all day. " * 5)
    r = run_cli("tfpretrain.evaluate", "--saved-model", summary["saved_model"], "--data",
                str(text))
    assert r.returncode == 0, r.stderr[-2000:]
    sm = last_json_line(r.stdout)
    assert sm["documents"] == 2 and sm["val_tokens"] > 10
    assert 0 < sm["val_loss"] < 20 and sm["val_bits_per_byte"] > 0
    r = run_cli("tfpretrain.evaluate", "--saved-model", str(tmp_path))
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_whole_split_evaluation_is_every_row_once_in_any_batching(tiny_run):
    """The whole-split evaluation batches rows by EVAL_TOKENS, not train.batch_size: the
    loss is still the mean over every target token (checked against one batch of all rows),
    and ``max_batches`` still counts batches of train.batch_size."""
    import numpy as np
    import tensorflow as tf

    from tfpretrain.data.pipeline import _split_xy
    from tfpretrain.objectives.causal import EVAL_TOKENS
    from tfpretrain.training.evaluation import evaluate_split
    from tfpretrain.training.runfolder import load_run

    _, run_dir, _ = tiny_run
    cfg, tokenizer, model = load_run(run_dir)
    rng = np.random.default_rng(0)
    rows = rng.integers(3, tokenizer.vocabulary_size, (EVAL_TOKENS // 32 + 7, 33))
    rows[-1, 20:] = 0  # padding targets carry no weight
    counts = np.ones(tokenizer.vocabulary_size)

    def reference(r):
        x, y, w = _split_xy(tf.constant(r, tf.int32))
        losses = model.token_losses(y, model(x, training=False)).numpy()
        return float((losses * w.numpy()).sum() / w.numpy().sum())

    out = evaluate_split(cfg, model, tokenizer, rows, counts)
    assert out["val_tokens"] == 32 * len(rows) - 13
    assert out["val_loss"] == pytest.approx(reference(rows), rel=1e-6)
    two = evaluate_split(cfg, model, tokenizer, rows, counts, max_batches=2)
    assert two["val_tokens"] == 2 * cfg.train.batch_size * 32
    assert two["val_loss"] == pytest.approx(reference(rows[:2 * cfg.train.batch_size]),
                                            rel=1e-6)


@pytest.mark.slow  # suite time; run with -m slow
@pytest.mark.parametrize("arch", ["gpt2", pytest.param("llama", marks=pytest.mark.slow)])
def test_keras_preset_export_reloads_with_keras_hub(arch, tmp_path):
    import numpy as np

    from conftest import tiny_raw, write_yaml

    raw = tiny_raw(tmp_path, model={"arch": arch}, train={"steps": 10}, eval={"every": 10},
                   export={"enabled": False})
    cfg_path = write_yaml(tmp_path / "c.yaml", raw)
    run = tmp_path / "run"
    r = run_cli("tfpretrain.fit", "--config", str(cfg_path), "--run-dir", str(run))
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "preset"
    r = run_cli("tfpretrain.export", "--run-dir", str(run), "--format", "keras", "--out",
                str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "config.json").is_file() and (out / "tfpretrain" / "tokenizer").is_dir()
    # a fresh process that knows only keras_hub loads it (safe mode) and matches our model
    script = tmp_path / "load.py"
    script.write_text(
        "import sys, numpy as np, keras_hub\n"
        f"m = keras_hub.models.CausalLM.from_preset({str(out)!r})\n"
        "ids = np.array([[3, 10, 20, 30]], np.int32)\n"
        "out = m({'token_ids': ids, 'padding_mask': np.ones_like(ids, bool)})\n"
        f"np.save({str(tmp_path / 'l.npy')!r}, np.asarray(out))\n"
        "print(type(m).__name__, m.backbone.token_embedding.tie_weights)\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-2:] == [{"gpt2": "GPT2CausalLM", "llama": "LlamaCausalLM"}[arch],
                                     "True"]
    from tfpretrain.training.runfolder import load_run

    _, _, model = load_run(run)
    expected = model(np.array([[3, 10, 20, 30]], np.int32)).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "l.npy"), expected, atol=1e-5)
    r = run_cli("tfpretrain.export", "--run-dir", str(run), "--format", "keras", "--out",
                str(out))
    assert r.returncode == 2 and "already exists" in r.stderr


@pytest.mark.slow  # suite time; run with -m slow
@pytest.mark.parametrize("arch", ["gpt2", pytest.param("llama", marks=pytest.mark.slow)])
def test_hf_export_files_and_transformers_parity(arch, tmp_path):
    import json as _json

    import numpy as np

    from conftest import tiny_raw, write_yaml

    raw = tiny_raw(tmp_path, model={"arch": arch}, train={"steps": 10}, eval={"every": 10},
                   export={"enabled": False})
    run = tmp_path / "run"
    r = run_cli("tfpretrain.fit", "--config", str(write_yaml(tmp_path / "c.yaml", raw)),
                "--run-dir", str(run))
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "hf"
    r = run_cli("tfpretrain.export", "--run-dir", str(run), "--format", "hf", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    config = _json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 320 and (out / "model.safetensors").is_file()
    assert config["architectures"] == [{"gpt2": "GPT2LMHeadModel",
                                        "llama": "LlamaForCausalLM"}[arch]]
    assert (out / "tokenizer.model").is_file()
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tfpretrain.training.runfolder import load_run

    _, tokenizer, model = load_run(run)
    text = "Once upon a time there was a little cat"
    ids = [3] + tokenizer.encode(text)
    expected = model(np.array([ids], np.int32)).numpy()
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    with torch.no_grad():
        got = hf_model(torch.tensor([ids])).logits.numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids[1:]
