import json
import math
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from conftest import last_json_line, run_cli, tiny_config, tiny_raw, write_yaml


def read_scalars(event_dir):
    """{tag: {step: value}} from real TensorBoard event files."""
    out = {}
    files = sorted(event_dir.glob("events.out.tfevents.*"))
    assert files, f"no event files in {event_dir}"
    for f in files:
        for record in tf.data.TFRecordDataset(str(f)):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for v in event.summary.value:
                value = tf.make_ndarray(v.tensor)
                out.setdefault(v.tag, {})[event.step] = value
    return out


def test_tiny_run_learns_and_writes_summary(tiny_run):
    cfg, run_dir, summary = tiny_run
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk == summary
    for key in ("run_dir", "saved_model", "params", "steps", "tokens_seen", "wall_seconds",
                "tokens_per_second", "val_loss", "val_perplexity", "val_bits_per_byte",
                "unigram_val_loss", "sample"):
        assert key in summary, key
    assert summary["steps"] == 60
    assert summary["tokens_seen"] == 60 * 16 * 32
    assert summary["val_perplexity"] == pytest.approx(math.exp(summary["val_loss"]), rel=1e-4)
    # 60 steps on a tiny model: it must beat the unigram baseline
    assert summary["val_loss"] < summary["unigram_val_loss"]
    assert summary["sample"].startswith(cfg.eval.prompt)
    assert (run_dir / "config.yaml").is_file() and (run_dir / "tokenizer" / "spm.model").is_file()


def test_tensorboard_has_per_step_train_scalars_and_val(tiny_run):
    _, run_dir, summary = tiny_run
    train = read_scalars(run_dir / "logs" / "train")
    assert sorted(train["loss"]) == list(range(1, 61))          # every step, not per epoch
    assert sorted(train["grad_norm"]) == list(range(1, 61))
    lr = train["learning_rate"]
    assert float(lr[1]) == pytest.approx(0.0, abs=1e-7)        # warmup starts at 0
    assert float(lr[6]) == pytest.approx(1e-2, rel=1e-4)       # peak after 5 warmup steps
    assert float(lr[60]) < float(lr[30]) < float(lr[6])        # cosine decay
    losses = [float(train["loss"][s]) for s in range(1, 61)]
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.3  # the loss falls
    assert "tokens_per_second" in train
    # MFU against this CPU's measured peak, and the cost so far, logged with tokens/s
    assert 0 < float(list(train["mfu"].values())[-1]) < 1
    assert float(list(train["cost_usd"].values())[-1]) > 0
    assert 0 < summary["mfu"] < 1 and summary["cost_usd"] > 0
    # the rate after the first call (its tracing and XLA compilation) is the higher one
    assert summary["steady_tokens_per_second"] > summary["tokens_per_second"]
    assert summary["mfu"] < summary["steady_mfu"] < 1
    assert summary["model_flops_per_token"] > 6 * summary["params"] - 6 * 32 * 32
    assert summary["device"].startswith("CPU") and summary["precision"] == "float32"
    assert summary["vocabulary_size_requested"] == 320 >= summary["vocabulary_size"]
    val = read_scalars(run_dir / "logs" / "val")
    assert sorted(val["loss"]) == [20, 40, 60]
    samples = val["sample"]
    assert sorted(samples) == [20, 40, 60]
    assert samples[60].item().decode().startswith("Once upon a time")


def test_checkpoints_commit_atomically_and_keep_three(tiny_run):
    _, run_dir, _ = tiny_run
    ck = run_dir / "checkpoints"
    names = sorted(p.name for p in ck.iterdir() if p.is_dir())
    assert names == ["step-00000020", "step-00000040", "step-00000060"]
    assert (ck / "latest").read_text().strip() == "step-00000060"
    state = json.loads((ck / "step-00000060" / "state.json").read_text())
    assert state["step"] == 60 and state["files"]


def test_saved_model_reloads_in_fresh_process_with_matching_logits(tiny_run, tmp_path):
    from tfpretrain.training.runfolder import load_run

    cfg, run_dir, summary = tiny_run
    sm = summary["saved_model"]
    assert sm.endswith("/1")
    _, tokenizer, model = load_run(run_dir)
    ids = np.array([tokenizer.encode("Once upon a time there was a cat")[:20]], np.int32)
    expected = model(ids).numpy()
    np.save(tmp_path / "ids.npy", ids)
    script = tmp_path / "client.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys, numpy as np
        import tensorflow as tf, tensorflow_text  # the only imports a server needs
        assert "tfpretrain" not in sys.modules and "keras_hub" not in sys.modules
        m = tf.saved_model.load({sm!r})
        ids = np.load({str(tmp_path / 'ids.npy')!r})
        np.save({str(tmp_path / 'logits.npy')!r},
                m.signatures["logits"](token_ids=tf.constant(ids))["logits"].numpy())
        g = m.signatures["serving_default"](prompts=tf.constant(["Once upon a time", ""]))
        s = m.signatures["score"](text=tf.constant(["Once upon a time", "Lily had a cat."]))
        print(json.dumps({{"sigs": sorted(m.signatures.keys()),
                          "text": [t.decode() for t in g["text"].numpy()],
                          "ll": s["log_likelihood"].numpy().tolist(),
                          "n": s["num_tokens"].numpy().tolist()}}))
    """))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = last_json_line(r.stdout)
    assert out["sigs"] == ["generate", "logits", "sample", "score", "serving_default"]
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), expected, atol=1e-5)
    assert out["text"][0].startswith("Once upon a time") and len(out["text"]) == 2
    assert all(v < 0 for v in out["ll"])
    assert out["n"][0] == len(tokenizer.encode("Once upon a time"))


def test_generate_cli(tiny_run):
    _, run_dir, _ = tiny_run
    r = run_cli("tfpretrain.generate", "--run-dir", str(run_dir), "--prompt", "Lily",
                "--max-new-tokens", "8", "--sampler", "greedy", "--num-samples", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    samples = [s.strip() for s in r.stdout.split("--- sample")[1:]]
    assert len(samples) == 2 and all("Lily" in s for s in samples)
    # greedy is deterministic: both samples are the same text
    assert samples[0].split("\n", 1)[1] == samples[1].split("\n", 1)[1]
    long_prompt = "Lily and Tom went to the park to play with the big red ball. " * 10
    r3 = run_cli("tfpretrain.generate", "--run-dir", str(run_dir), "--prompt", long_prompt,
                 "--max-new-tokens", "40", "--sampler", "top_p", "--num-samples", "2")
    assert r3.returncode == 0, r3.stderr[-2000:]   # longer than the 32-token context: fine
    assert r3.stdout.count("--- sample") == 2 and long_prompt.strip()[:40] in r3.stdout
    bad = run_cli("tfpretrain.generate", "--run-dir", str(run_dir.parent / "nope"))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "not a tfpretrain run folder" in bad.stderr


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_both_archs_build_checkpoint_and_reload(arch, tmp_path):
    from tfpretrain.objectives import build_model
    from tfpretrain.training.checkpoints import CheckpointManager
    from tfpretrain.training.optimizers import build_optimizer

    cfg = tiny_config(tmp_path, model={"arch": arch})
    model = build_model(cfg, 100)
    opt = build_optimizer(cfg.optimizer, cfg.train.steps)
    opt.build(model.trainable_variables)
    ids = np.random.default_rng(0).integers(4, 100, size=(2, 32)).astype(np.int32)
    before = model(ids).numpy()
    assert before.shape == (2, 32, 100)
    CheckpointManager(tmp_path / "ck", model, opt).save(7)
    other = build_model(cfg, 100)
    other_opt = build_optimizer(cfg.optimizer, cfg.train.steps)
    other_opt.build(other.trainable_variables)
    assert not np.allclose(other(ids).numpy(), before)
    manager = CheckpointManager(tmp_path / "ck", other, other_opt)
    path, state = manager.latest_valid()
    manager.restore(path)
    np.testing.assert_allclose(other(ids).numpy(), before, atol=1e-6)
    assert state["step"] == 7
    if arch == "llama":
        tied = build_model(tiny_config(tmp_path, model={"arch": "llama",
                                                        "tie_embeddings": False}), 100)
        assert tied.backbone.count_params() > model.backbone.count_params()


def _cli_run(tmp_path):
    raw = tiny_raw(tmp_path, train={"steps": 20}, eval={"every": 10},
                   model={"arch": "llama", "num_key_value_heads": 1},
                   tokenizer={"kind": "char"}, export={"enabled": False})
    cfg_path = write_yaml(tmp_path / "tiny.yaml", raw)
    run = tmp_path / "run"
    r = run_cli("tfpretrain.fit", "--config", str(cfg_path), "--run-dir", str(run))
    assert r.returncode == 0, r.stderr[-3000:]
    first = last_json_line(r.stdout)
    assert first["steps"] == 20 and first["tokenizer"] == "char"
    return cfg_path, run


@pytest.mark.slow  # suite time: test_distributed's 2-worker test resumes by raising steps
def test_cli_fit_then_more_steps_resumes(tmp_path):
    cfg_path, run = _cli_run(tmp_path)
    # raising train.steps continues from the last checkpoint
    r = run_cli("tfpretrain.fit", "--config", str(cfg_path), "--run-dir", str(run),
                "--set", "train.steps=30")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "at step 20" in r.stdout
    summary = last_json_line(r.stdout)
    assert summary["steps"] == 30
    # into a log file (not a terminal): one line per interval, with the losses, no Keras
    # epoch lines
    line = re.search(r"step 30/30: loss ([0-9.]+), val_loss ([0-9.]+), lr [0-9.e+-]+ \| "
                     r"[0-9,]+ tok/s, MFU [0-9.]+%, elapsed", r.stdout)
    assert line, r.stdout
    # (the interval's validation reads eval.steps batches, the summary's the whole split)
    assert float(line.group(2)) == pytest.approx(summary["val_loss"], rel=0.1)
    assert "Epoch " not in r.stdout and "ms/step" not in r.stdout, r.stdout


@pytest.mark.slow  # suite time; run with -m slow
def test_cli_fit_refuses_bad_resumes_and_inputs(tmp_path):
    cfg_path, run = _cli_run(tmp_path)
    # --resume never refuses to touch the existing run folder
    r = run_cli("tfpretrain.fit", "--config", str(cfg_path), "--run-dir", str(run),
                "--resume", "never")
    assert r.returncode == 2 and "already exists" in r.stderr and "Traceback" not in r.stderr
    # a changed resume-critical setting is refused with the differing keys listed
    r = run_cli("tfpretrain.fit", "--config", str(cfg_path), "--run-dir", str(run),
                "--set", "model.hidden_dim=64", "--set", "train.batch_size=4")
    assert r.returncode == 2
    assert "model.hidden_dim" in r.stderr and "train.batch_size" in r.stderr
    # missing corpus: clear error, nothing created
    r = run_cli("tfpretrain.fit", "--config", str(cfg_path), "--run-dir",
                str(tmp_path / "run2"), "--set", "data.path=missing.txt")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "data.path: no such file: missing.txt" in r.stderr
    assert not (tmp_path / "run2").exists()
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n\n")
    r = run_cli("tfpretrain.fit", "--config", str(cfg_path), "--run-dir",
                str(tmp_path / "run3"), "--set", f"data.path={empty}")
    assert r.returncode == 2 and "corpus is empty" in r.stderr
    assert not (tmp_path / "run3").exists()


@pytest.mark.slow  # suite time; run with -m slow
def test_bench_fit_runs_both_paths(tmp_path):
    raw = tiny_raw(tmp_path)
    cfg_path = write_yaml(tmp_path / "tiny.yaml", raw)
    r = run_cli("tfpretrain.bench", "fit", "--config", str(cfg_path), "--steps", "8",
                "--warmup", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    result = last_json_line(r.stdout)
    assert result["keras_hub_plain_tokens_per_second"] > 0
    assert result["tfpretrain_tokens_per_second"] > 0
    assert result["ratio"] == pytest.approx(result["tfpretrain_tokens_per_second"]
                                            / result["keras_hub_plain_tokens_per_second"],
                                            rel=1e-2)


def test_eval_sets_are_scored_at_every_validation_and_match_evaluate(tmp_path, capsys):
    """eval.sets: each extra text is scored beside val_loss (progress line, TensorBoard,
    summary) with the run's tokenizer, and the final figures equal `evaluate --data`."""
    import pydoc_data.topics

    from tfpretrain.data.synthetic import generate_stories
    from tfpretrain.evaluate import evaluate_run
    from tfpretrain.fit import fit

    stories, docs = tmp_path / "stories.txt", tmp_path / "docs.txt"
    stories.write_text("\n\n".join(generate_stories(40, seed=99)))
    docs.write_text("\n\n".join(list(pydoc_data.topics.topics.values())[:6]))
    cfg = tiny_config(tmp_path, eval={"sets": {"stories": str(stories), "py_docs": str(docs)}},
                      export={"enabled": False})
    summary = fit(cfg, tmp_path / "run")
    progress = [line for line in capsys.readouterr().out.splitlines() if " step " in line]
    assert len(progress) == 3 and all("val_stories_loss" in line and "val_py_docs_loss"
                                      in line for line in progress)
    val = read_scalars(tmp_path / "run" / "logs" / "val")
    for name in ("stories", "py_docs"):
        assert sorted(val[f"{name}_loss"]) == [20, 40, 60]
        assert sorted(val[f"{name}_bits_per_byte"]) == [20, 40, 60]
        direct = evaluate_run(tmp_path / "run", str(stories if name == "stories" else docs))
        assert summary[f"val_{name}_loss"] == pytest.approx(direct["val_loss"], abs=1e-5)
        assert summary[f"val_{name}_bits_per_byte"] == pytest.approx(
            direct["val_bits_per_byte"], abs=1e-5)
    # the stories the model trained on are far easier for it than Python's reference text
    assert summary["val_stories_loss"] < summary["val_py_docs_loss"]
    from tfpretrain import runs  # the table has a column per set; --sort, --plot take them

    assert runs.main([str(tmp_path), "--json", "--sort", "val_py_docs_loss", "--plot",
                      str(tmp_path / "s.png"), "--metric", "val_stories_loss"]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    assert row["val_stories_loss"] == summary["val_stories_loss"]
    assert (tmp_path / "s.png").stat().st_size > 1000
    assert runs.main([str(tmp_path), "--metric", "val_nope"]) == 2


def test_a_missing_eval_set_is_one_message_before_the_run_folder(tmp_path):
    raw = tiny_raw(tmp_path, eval={"sets": {"old": str(tmp_path / "nope.txt")}})
    r = run_cli("tfpretrain.fit", "--config", str(write_yaml(tmp_path / "c.yaml", raw)),
                "--run-dir", str(tmp_path / "run"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "eval.sets.old" in r.stderr and "nope.txt" in r.stderr
    assert not (tmp_path / "run").exists()
