"""Masked-LM (BERT-style): masking statistics, loss on masked positions only, WordPiece, a
tiny end-to-end fit whose masked accuracy rises, fill-mask through a reloaded export."""
import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import last_json_line, run_cli
from tfpretrain.config import Config, MlmConfig, build_config
from tfpretrain.data.masking import Masker
from tfpretrain.data.pipeline import make_rows, train_dataset
from tfpretrain.objectives import get_objective
from tfpretrain.data.tokenizers import MASK_ID, NUM_SPECIAL, load_tokenizer, train_tokenizer
from tfpretrain.errors import UserError

V = 400


def random_rows(n=512, L=128, seed=0):
    rng = np.random.default_rng(seed)
    rows = rng.integers(NUM_SPECIAL, V, size=(n, L)).astype(np.int32)
    rows[:, 0] = 2                                   # [CLS]
    rows[rng.random((n, L)) < 0.05] = 3              # [SEP]s inside rows
    rows[rng.random((n, L)) < 0.02] = 1              # unk
    for i in range(0, n, 4):                         # some padded rows
        rows[i, L - rng.integers(1, L // 2):] = 0
    return rows


def test_masking_rate_split_and_specials():
    rows = random_rows()
    masker = Masker(MlmConfig(), V, rows.shape[1])
    feats, labels, weights = (t.numpy() if not isinstance(t, dict) else
                              {k: v.numpy() for k, v in t.items()}
                              for t in masker(rows, tf.constant([7, 3], tf.int64)))
    pos, w = feats["mask_positions"], weights.astype(bool)
    sel = np.zeros_like(rows, bool)
    np.put_along_axis(sel, pos, w, axis=1)
    maskable = rows >= NUM_SPECIAL
    assert not (sel & ~maskable).any(), "a special token (pad/unk/cls/sep) was selected"
    rate = sel.sum() / maskable.sum()
    assert rate == pytest.approx(0.15, abs=0.005)
    # labels are the original tokens at the selected positions
    np.testing.assert_array_equal(np.take_along_axis(rows, pos, 1)[w], labels[w])
    ids = feats["token_ids"]
    np.testing.assert_array_equal(ids[~sel], rows[~sel])           # unselected: untouched
    as_mask = (ids[sel] == MASK_ID).mean()
    kept = (ids[sel] == rows[sel]).mean()
    random = 1 - as_mask - kept
    assert as_mask == pytest.approx(0.8, abs=0.02)
    assert kept == pytest.approx(0.1 + 0.1 / V, abs=0.015)
    assert random == pytest.approx(0.1, abs=0.015)
    assert (ids[sel][(ids[sel] != MASK_ID) & (ids[sel] != rows[sel])] >= NUM_SPECIAL).all()
    assert feats["padding_mask"].tolist() == (rows != 0).tolist()


def test_masks_are_a_pure_function_of_seed_and_step():
    rows = random_rows(64)
    masker = Masker(MlmConfig(), V, rows.shape[1])
    a = masker(rows, tf.constant([1, 5], tf.int64))[0]["token_ids"].numpy()
    b = masker(rows, tf.constant([1, 5], tf.int64))[0]["token_ids"].numpy()
    c = masker(rows, tf.constant([1, 6], tf.int64))[0]["token_ids"].numpy()
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    # through the pipeline: a run resumed at step k sees the unbroken run's masked batches
    unbroken = [x["token_ids"].numpy() for x, _, _ in
                train_dataset(rows, 8, seed=3, to_batch=masker).take(12)]
    resumed = [x["token_ids"].numpy() for x, _, _ in
               train_dataset(rows, 8, seed=3, start_step=9, to_batch=masker).take(3)]
    for u, r in zip(unbroken[9:], resumed):
        np.testing.assert_array_equal(u, r)


def test_whole_word_masking_keeps_pieces_together_and_caps_predictions():
    rows = random_rows(256)
    starts = np.ones([V], bool)
    starts[200:] = False                       # ids >= 200 continue the previous word
    masker = Masker(MlmConfig(whole_word=True, max_predictions=12), V, rows.shape[1], starts)
    feats, _, weights = masker(rows, tf.constant([2, 9], tf.int64))
    pos, w = feats["mask_positions"].numpy(), weights.numpy().astype(bool)
    assert w.sum(axis=1).max() <= 12
    sel = np.zeros_like(rows, bool)
    np.put_along_axis(sel, pos, w, axis=1)
    maskable = rows >= NUM_SPECIAL
    word_start = starts[rows] | ~maskable
    word = np.cumsum(word_start, axis=1)
    checked = 0
    for r in range(len(rows)):
        for wid in np.unique(word[r][sel[r]]):
            members = (word[r] == wid) & maskable[r]
            assert sel[r][members].all(), f"row {r}: word {wid} partly masked"
            checked += members.sum() > 1
    assert checked > 50  # multi-piece words were actually selected
    # the rate still holds over words (before the cap bites)
    loose = Masker(MlmConfig(whole_word=True, max_predictions=128), V, 128, starts)
    n_sel = loose(rows, tf.constant([2, 9], tf.int64))[2].numpy().sum()
    assert 0.12 < n_sel / maskable.sum() < 0.18


def tiny_mlm_raw(tmp_path, **sections):
    from conftest import tiny_raw

    raw = tiny_raw(tmp_path, **sections)
    raw["tokenizer"] = {"kind": "wordpiece", "vocabulary_size": 400}
    raw["model"].update(arch="bert", objective="mlm")
    # masked LM sits at the unigram baseline for its first few hundred steps: 1200 tiny
    # steps (~5 ms each) get past it
    raw["optimizer"].update(learning_rate=3e-3, min_learning_rate=3e-4, warmup_steps=50)
    raw["eval"]["prompt"] = "Once upon a [MASK], there was a girl."
    raw["train"]["steps"] = 1200
    raw["eval"]["every"] = 400
    for sec, values in sections.items():
        raw.setdefault(sec, {}).update(values)
    return raw


def test_loss_counts_only_masked_positions(tmp_path):
    from tfpretrain.objectives import build_model

    cfg = build_config(tiny_mlm_raw(tmp_path))
    model = build_model(cfg, V)
    rows = random_rows(8, 32)
    x, y, w = Masker(cfg.mlm, V, 32)(rows, tf.constant([0, 1], tf.int64))
    logits = model(x)
    loss = float(model._mean_loss(y, logits, w))
    manual = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits).numpy()
    wn = w.numpy()
    assert loss == pytest.approx((manual * wn).sum() / wn.sum(), rel=1e-5)
    y_np = y.numpy()
    changed = np.where(wn == 0, (y_np + 7) % V, y_np)              # unmasked slots only
    assert (changed != y_np).any()
    assert float(model._mean_loss(changed, logits, w)) == pytest.approx(loss, rel=1e-6)
    changed[wn == 1] = (y_np[wn == 1] + 7) % V                       # masked labels
    manual = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=changed,
                                                            logits=logits).numpy()
    new_loss = float(model._mean_loss(changed, logits, w))
    assert new_loss != loss
    assert new_loss == pytest.approx((manual * wn).sum() / wn.sum(), rel=1e-5)


def test_wordpiece_round_trip_and_mask_token(tmp_path):
    texts = ["Once upon a time, Lily played in the garden.", "The dog ran to the park!"] * 50
    tok = train_tokenizer("wordpiece", texts, 200)
    ids = tok.encode("Once upon a [MASK], Lily played.")
    assert MASK_ID in ids and all(i == MASK_ID or i >= NUM_SPECIAL for i in ids)
    assert tok.decode(tok.encode("the dog ran to the park!")) == "the dog ran to the park!"
    tok.save(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    assert again.kind == "wordpiece" and again.encode("lily played") == tok.encode("lily played")
    # SentencePiece tokenizers also map the literal [MASK] to the mask id
    sp = train_tokenizer("sentencepiece_bpe", texts, 120, byte_fallback=False)
    assert MASK_ID in sp.encode("a [MASK] b")
    assert tok.word_starts()[tok.encode("played")].tolist().count(True) >= 1


def test_mlm_config_cross_checks(tmp_path):
    with pytest.raises(UserError, match="objective: mlm` goes with `model.arch: bert"):
        build_config({"model": {"objective": "mlm"}})
    with pytest.raises(UserError, match=r"\[MASK\] token"):
        build_config({"model": {"objective": "mlm", "arch": "bert"},
                      "tokenizer": {"kind": "char"}})
    cfg = build_config({"model": {"objective": "mlm", "arch": "bert"}})
    from tfpretrain.data.tokenizers import resolved_kind

    assert resolved_kind(cfg) == "wordpiece" and resolved_kind(Config()) == "sentencepiece_bpe"


def test_packing_rows_for_mlm_and_pad():
    stream = np.array([7, 8, 9, 3, 10, 11, 3, 12, 13, 14, 15, 16, 3], np.int32)
    mlm, causal = get_objective("mlm"), get_objective("causal")
    concat = make_rows(stream, mlm.row_format(5, "concat"))
    assert concat.tolist() == [[2, 7, 8, 9, 3], [2, 10, 11, 3, 12], [2, 13, 14, 15, 16]]
    pad = make_rows(stream, mlm.row_format(5, "pad"))
    assert pad.tolist() == [[2, 7, 8, 9, 3], [2, 10, 11, 3, 0], [2, 12, 13, 14, 3]]
    causal_pad = make_rows(stream, causal.row_format(4, "pad"))
    assert make_rows(stream, causal.row_format(4, "concat")).tolist() == [
        [7, 8, 9, 3, 10], [10, 11, 3, 12, 13], [13, 14, 15, 16, 3]]
    assert causal_pad.tolist() == [[3, 7, 8, 9, 3], [3, 10, 11, 3, 0], [3, 12, 13, 14, 3]]


def test_ema_averages_each_weight_that_trains_and_keeps_the_unused_pooler(tmp_path):
    """optimizer.ema with BERT: the pooler gets no gradient from masked-LM, keras drops it
    from the step, and the averages still pair with their own weights (they were paired by
    position, and the step failed with a shape error)."""
    import numpy as np

    from tfpretrain.training.optimizers import evaluation_weights
    from tfpretrain.training.runtime import build_and_compile

    cfg = build_config(tiny_mlm_raw(tmp_path, optimizer={"ema": 0.5}))
    model = build_and_compile(cfg, V, jit=False)
    before = {v.path: v.numpy().copy() for v in model.trainable_variables}
    x, y, w = Masker(cfg.mlm, V, 32)(random_rows(8, 32), tf.constant([0, 1], tf.int64))
    for _ in range(3):
        model.train_on_batch(x, y, sample_weight=w)
    trained = {v.path: v.numpy().copy() for v in model.trainable_variables}
    with evaluation_weights(model):
        averaged = {v.path: v.numpy().copy() for v in model.trainable_variables}
    pooler = [p for p in before if "pooled_dense" in p]
    assert pooler and all(np.array_equal(averaged[p], before[p]) for p in pooler)
    moved = [p for p in before if not np.array_equal(trained[p], before[p])]
    assert len(moved) > len(before) // 2
    assert all(not np.array_equal(averaged[p], trained[p]) and
               not np.array_equal(averaged[p], before[p]) for p in moved)


@pytest.fixture(scope="module")
def mlm_run(tmp_path_factory):
    from tfpretrain.fit import fit

    tmp = tmp_path_factory.mktemp("mlm_run")
    cfg = build_config(tiny_mlm_raw(tmp), name="tiny-mlm")
    run_dir = tmp / "runs" / "tiny-mlm"
    return cfg, run_dir, fit(cfg, run_dir)


def test_mlm_fit_learns_and_reports(mlm_run):
    from test_fit import read_scalars

    cfg, run_dir, summary = mlm_run
    assert summary["arch"] == "bert" and summary["tokenizer"] == "wordpiece"
    assert summary["val_masked_accuracy"] > 2 * summary["baseline_masked_accuracy"]
    assert summary["val_loss"] < summary["unigram_val_loss"]
    assert "[MASK]" not in summary["sample"].split(" | ")[0]
    series = read_scalars(run_dir / "logs" / "val")["masked_accuracy"]
    values = [float(series[k]) for k in sorted(series)]
    assert sorted(series) == [400, 800, 1200] and values[-1] > values[0]
    # evaluate reproduces fit's numbers on the same fixed validation masks
    r = run_cli("tfpretrain.evaluate", "--run-dir", str(run_dir))
    assert r.returncode == 0, r.stderr[-2000:]
    out = last_json_line(r.stdout)
    assert out["val_masked_accuracy"] == pytest.approx(summary["val_masked_accuracy"], abs=1e-5)
    assert out["baseline_masked_accuracy"] == pytest.approx(
        summary["baseline_masked_accuracy"], abs=1e-6)


@pytest.mark.slow  # suite time; run with -m slow
def test_fill_mask_export_reloaded_in_fresh_process(mlm_run, tmp_path):
    cfg, run_dir, summary = mlm_run
    path = summary["saved_model"]  # validated by fit: fresh process, logits, fill-mask, ops
    script = (
        "import json, sys, tensorflow as tf, tensorflow_text\n"
        "m = tf.saved_model.load(sys.argv[1])\n"
        "out = m.signatures['serving_default'](text=tf.constant("
        "['once upon a [MASK], there was a [MASK].', 'no mask']))\n"
        "print(json.dumps({k: v.numpy().tolist() if v.dtype != tf.string else "
        "[[[t.decode() for t in r] for r in b] if v.shape.rank == 3 else b.decode() "
        "for b in v.numpy()] for k, v in out.items()}))\n"
        "print(json.dumps(sorted(m.signatures.keys())))\n")
    r = subprocess.run([sys.executable, "-c", script, path], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-2])
    assert json.loads(r.stdout.strip().splitlines()[-1]) == ["fill_mask", "logits",
                                                             "serving_default"]
    assert out["num_masks"] == [2, 0]
    scores = np.array(out["scores"])
    assert scores.shape == (2, 2, 5)
    assert (np.diff(scores[0], axis=-1) <= 0).all() and (scores[0].sum(-1) <= 1 + 1e-5).all()
    assert (scores[1] == 0).all()
    assert all(t for t in out["tokens"][0][0]) and "[MASK]" not in out["text"][0]
    assert out["text"][0].startswith("once upon a ")
    # generate does fill-mask on a masked-LM run
    r = run_cli("tfpretrain.generate", "--run-dir", str(run_dir), "--prompt",
                "Once upon a [MASK].")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "[MASK] 1:" in r.stdout
    r = run_cli("tfpretrain.generate", "--run-dir", str(run_dir), "--prompt", "no mask")
    assert r.returncode == 2 and "[MASK]" in r.stderr and "Traceback" not in r.stderr
    # keras preset that keras_hub's MaskedLM.from_preset reloads (checked by the exporter)
    r = run_cli("tfpretrain.export", "--run-dir", str(run_dir), "--format", "keras",
                "--out", str(tmp_path / "preset"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "preset" / "task.json").is_file()


@pytest.mark.slow  # suite time; run with -m slow
def test_a_masked_student_distils_from_a_masked_teacher(mlm_run, tmp_path):
    """distill.* for masked LM: the KL term over the masked positions, the teacher's loss on
    the student's validation rows in the summary."""
    from tfpretrain.fit import fit

    _, teacher_dir, teacher_summary = mlm_run
    cfg = build_config(tiny_mlm_raw(tmp_path, model={"hidden_dim": 16,
                                                     "intermediate_dim": 32},
                                    train={"steps": 30}, eval={"every": 30},
                                    optimizer={"warmup_steps": 5},
                                    export={"enabled": False},
                                    distill={"teacher": str(teacher_dir), "alpha": 0.3}))
    summary = fit(cfg, tmp_path / "student")
    assert summary["teacher_val_loss"] == pytest.approx(teacher_summary["val_loss"], rel=1e-4)
    assert summary["skipped_steps"] == 0 and summary["val_loss"] < 10


def test_a_workers_part_of_the_batch_is_its_rows_of_the_whole_batch():
    """multi_worker's data contract (train_dataset ``part``): rows lo..hi-1 of every global
    batch, identical to slicing what one device sees: the causal batch read row by row,
    the masked one masked as a whole batch and then cut."""
    rows = random_rows(64)
    masker = Masker(MlmConfig(), V, rows.shape[1])
    for to_batch in (None, masker):
        whole = list(train_dataset(rows, 8, seed=3, start_step=4, to_batch=to_batch).take(3))
        part = list(train_dataset(rows, 8, seed=3, start_step=4, to_batch=to_batch,
                                  part=(2, 6)).take(3))
        for w, p in zip(whole, part):
            for a, b in zip(tf.nest.flatten(w), tf.nest.flatten(p)):
                assert b.shape[0] == 4
                np.testing.assert_array_equal(a.numpy()[2:6], b.numpy())
