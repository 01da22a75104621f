"""Synthetic data (``python -m tfpretrain.synth``) and logit distillation in fit."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from completions_server import CompletionsServer
from conftest import run_cli, tiny_config, tiny_raw, write_yaml


def synth(*argv) -> tuple[int, dict]:
    """Run the command in-process: (exit code, its last JSON line or {})."""
    import contextlib
    import io

    from tfpretrain.synth import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main([str(a) for a in argv])
    text = out.getvalue().strip()
    return rc, (json.loads(text.splitlines()[-1]) if rc == 0 and text else {})


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# --- stories ----------------------------------------------------------------------------------
def test_stories_are_deterministic_diverse_and_have_their_features(tmp_path):
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    args = ["--count", 1000, "--level", 3, "--features", "moral,bad_ending,dialogue",
            "--required-words"]
    assert synth("stories", "--out", a, *args)[0] == 0
    assert synth("stories", "--out", b, *args)[0] == 0
    assert synth("stories", "--out", c, *args, "--seed", 7)[0] == 0
    assert a.read_bytes() == b.read_bytes() and a.read_bytes() != c.read_bytes()
    recs = read(a)
    texts = [r["text"] for r in recs]
    assert len(set(texts)) / len(texts) >= 0.95
    assert all("The moral of the story is" in t for t in texts)
    for r in recs[:200]:  # required words used, recorded, provenance complete
        assert len(r["required_words"]) == 3
        assert all(w in r["text"] for w in r["required_words"])
        assert r["mode"] == "stories" and r["seed"] == 1337 and r["params"]["level"] == 3
    report = json.loads((tmp_path / "a.report.json").read_text())["report"]
    assert report["count"] == 1000 and report["exact_duplicate_rate"] < 0.05
    assert report["distinct_3"] > 0 and report["vocabulary_size"] > 500


def test_story_levels_grow_and_the_default_is_the_embedded_corpus(tmp_path):
    from tfpretrain.data.synthetic import StorySpec, generate_stories, iter_stories

    means = [np.mean([len(t.split()) for t, _ in iter_stories(300, 1, StorySpec(level))])
             for level in (1, 2, 3)]
    assert means[0] < means[1] < means[2]
    out = tmp_path / "s.jsonl"
    assert synth("stories", "--count", 50, "--out", out)[0] == 0
    assert [r["text"] for r in read(out)] == generate_stories(50, 1337)


def test_existing_output_is_kept_without_force_and_bad_flags_exit_2(tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    out.write_text("mine\n")
    assert synth("stories", "--count", 5, "--out", out)[0] == 2
    assert out.read_text() == "mine\n"
    assert "pass --force" in capsys.readouterr().err
    assert synth("stories", "--count", 5, "--out", out, "--force")[0] == 0
    assert len(read(out)) == 5
    assert synth("stories", "--count", 5, "--out", tmp_path / "x.jsonl",
                 "--features", "dragons")[0] == 2
    assert "--features: unknown dragons" in capsys.readouterr().err


# --- augment ----------------------------------------------------------------------------------
def test_augment_counts_ops_and_metadata(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": f"d{i}", "text": t, "source": "unit"}) + "\n"
                           for i, t in enumerate(
                               ["The big dog was very happy and ran to the little house.",
                                "She looked at the old road and smiled at her friend."])))
    out, again = tmp_path / "aug.jsonl", tmp_path / "again.jsonl"
    rc, summary = synth("augment", "--in", src, "--out", out, "--n", 3, "--keep-original")
    assert rc == 0 and summary["records"] == 2 * (3 + 1)
    assert synth("augment", "--in", src, "--out", again, "--n", 3, "--keep-original")[0] == 0
    assert again.read_bytes() == out.read_bytes()  # deterministic given --seed
    recs = read(out)
    assert {r["parent"] for r in recs} == {"d0", "d1"}
    assert all(r["source"] == {"source": "unit"} for r in recs)
    assert sum(r["op"] == "original" for r in recs) == 2


@pytest.mark.parametrize("op", ["synonym", "insert", "swap", "delete", "char_noise"])
def test_each_augmentation_op_changes_the_text_its_way(op):
    from tfpretrain.data.augment import augment

    text = "The big dog was very happy and ran to the little house with a friend"
    new = augment(text, op, 0.2, random.Random(3))
    before, after = text.split(), new.split()
    assert new != text
    if op == "synonym":
        assert len(after) == len(before) and sum(a != b for a, b in zip(before, after)) >= 1
    elif op == "insert":
        assert len(after) > len(before)
    elif op == "swap":
        assert sorted(after) == sorted(before)
    elif op == "delete":
        assert len(after) < len(before) and all(w in before for w in after)
    else:
        assert sum(c.isalpha() for c in new) >= sum(c.isalpha() for c in text) - 5


# --- dedup and the report ---------------------------------------------------------------------
def test_dedup_removes_planted_copies_and_decontaminates(tmp_path):
    from tfpretrain.data.augment import augment
    from tfpretrain.data.synthetic import generate_stories

    stories = generate_stories(400, 5)
    rng = random.Random(0)
    recs = [{"id": f"s{i}", "text": t} for i, t in enumerate(stories[:300])]
    recs.append({"id": "near", "text": augment(stories[10], "swap", 0.03, rng)})
    recs.append({"id": "exact", "text": stories[20].upper()})
    recs.append({"id": "leaked", "text": stories[350]})
    src, evals, out = tmp_path / "in.jsonl", tmp_path / "eval.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    evals.write_text("".join(json.dumps({"text": t}) + "\n" for t in stories[300:]))
    rc, summary = synth("dedup", "--in", src, "--out", out, "--against", evals)
    assert rc == 0
    kept = {r["id"] for r in read(out)}
    assert {"near", "exact", "leaked"}.isdisjoint(kept)
    assert kept == {f"s{i}" for i in range(300)}  # no story of the corpus itself
    assert (summary["removed_near"], summary["removed_exact"],
            summary["removed_contaminated"]) == (1, 1, 1)
    # templated stories share 8-grams with any other story: the overlap measure says so,
    # which is why decontamination matches whole documents (MinHash), not n-grams
    assert summary["report"]["eval_documents_overlapping"] > 0.5


def test_report_measures_duplicates_and_eval_overlap(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("one two three four five six seven eight nine\n\n"
                   "one two three four five six seven eight nine\n\n"
                   "alpha beta gamma delta epsilon zeta eta theta iota\n")
    evals = tmp_path / "eval.txt"
    evals.write_text("alpha beta gamma delta epsilon zeta eta theta kappa\n")
    rc, out = synth("report", "--in", src, "--against", evals, "--overlap-ngram", 4)
    r = out["report"]
    assert rc == 0 and r["count"] == 3 and r["exact_duplicate_rate"] == pytest.approx(1 / 3)
    assert r["documents_overlapping_eval"] == pytest.approx(1 / 3)
    assert r["eval_documents_overlapping"] == 1.0 and r["p95_words"] == 9


def test_rouge_l_and_minhash_agree_with_definitions():
    from tfpretrain.data.similarity import MinHashIndex, char_shingles, lcs_length, rouge_l

    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4
    assert rouge_l("a b c d".split(), "a c d e".split()) == pytest.approx(0.75)
    a = "the quick brown fox jumps over the lazy dog " * 3
    b = a.replace("lazy", "sleepy")
    sa, sb = set(char_shingles(a, 5).tolist()), set(char_shingles(b, 5).tolist())
    exact = len(sa & sb) / len(sa | sb)
    index = MinHashIndex(threshold=0.0)
    sigs = index.signatures_of([a, b])
    assert float(np.mean(sigs[0] == sigs[1])) == pytest.approx(exact, abs=0.12)


# --- teachers ---------------------------------------------------------------------------------
def test_bootstrap_filters_each_count_against_a_completions_server(tmp_path):
    seeds = tmp_path / "seeds.txt"
    seeds.write_text("Tom went to the park with his dog and they played all day long.\n\n"
                     "Lily found a red ball under the tree and gave it to her friend.\n")
    answers = ["short",                                                       # length
               "la la la la la la la la la la la la",                         # repetition
               "zzz the moon is made of cheese and the cat sang loudly all night",  # ppl
               "went to the park with his dog and they played all day long.",  # similarity
               "found a tiny frog by the pond and took it home to show mom."]  # novel
    with CompletionsServer(answers, perplexities={"zzz": 5000.0}) as server:
        out = tmp_path / "boot.jsonl"
        rc, summary = synth("bootstrap", "--teacher", server.url, "--seeds", seeds,
                            "--out", out, "--rounds", 2, "--per-round", 5,
                            "--opening-words", 0, "--min-words", 5, "--teacher-model", "m1")
    assert rc == 0
    removed = summary["removed"]
    assert all(removed[k] >= 1 for k in ("length", "repetition", "perplexity", "similarity"))
    recs = read(out)
    assert [r["text"] for r in recs] == [answers[4]]  # the novel one, once (then similar)
    assert recs[0]["teacher"] == f"url:{server.url}#m1" and recs[0]["parent"]
    gen = [r for r in server.requests if not r.get("echo")]
    assert gen[0]["model"] == "m1" and gen[0]["stop"] == ["\n\n"]
    assert "Tom went to the park" in "".join(gen[0]["prompt"]) or \
        "Lily found" in "".join(gen[0]["prompt"])


def test_evolve_eliminates_failed_rewrites(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": f"p{i}", "text": t}) + "\n" for i, t in
                           enumerate(["Write a story about a cat.",
                                      "Explain why the sky is blue."] * 2)))
    answers = ["Write a story about a cat who learns to swim, in exactly five sentences, "
               "without using the letter z.",                        # kept
               "Sorry, I cannot do that.",                           # leak (refusal)
               "Write a story about a cat.",                         # unchanged
               "Sky?"]                                               # empty (< 3 words)
    with CompletionsServer(answers) as server:
        out = tmp_path / "evo.jsonl"
        rc, summary = synth("evolve", "--teacher", server.url, "--in", src, "--out", out,
                            "--ops", "constraint")
    assert rc == 0
    assert (summary["kept"], summary["eliminated_leak"], summary["eliminated_unchanged"],
            summary["eliminated_empty"]) == (1, 1, 1, 1)
    rec = read(out)[0]
    assert rec["parent"] == "p0" and rec["op"] == "constraint"
    assert "#The Given Prompt#:\nWrite a story about a cat." in server.requests[0]["prompt"][0]


def test_a_run_teacher_grows_the_pool_and_matches_its_saved_model(tiny_run, tmp_path):
    _, run_dir, summary = tiny_run
    seeds = tmp_path / "seeds.jsonl"
    assert synth("stories", "--count", 6, "--out", seeds, "--seed", 4)[0] == 0
    out = tmp_path / "boot.jsonl"
    args = ["bootstrap", "--teacher", run_dir, "--seeds", seeds, "--rounds", 2,
            "--per-round", 4, "--max-new-tokens", 16, "--max-perplexity", 1e9,
            "--min-perplexity", 0]
    rc, result = synth(*args, "--out", out)
    assert rc == 0 and result["records"] >= 1
    seed_texts = {r["text"] for r in read(seeds)}
    recs = read(out)
    known = {r["id"] for r in read(seeds)} | {r["id"] for r in recs}
    assert all(r["text"] not in seed_texts and r["parent"] in known for r in recs)
    assert result["rounds"][-1]["pool"] == 6 + len(recs)
    assert synth(*args, "--out", tmp_path / "again.jsonl")[0] == 0  # deterministic
    assert (tmp_path / "again.jsonl").read_text() == out.read_text()
    # greedy samples: the run folder and its exported SavedModel write the same text
    texts = {}
    for name, teacher in (("run", run_dir), ("saved", summary["saved_model"])):
        path = tmp_path / f"{name}.jsonl"
        assert synth("distill", "--teacher", teacher, "--count", 3, "--out", path,
                     "--temperature", 0, "--max-new-tokens", 8)[0] == 0
        texts[name] = [r["text"] for r in read(path)]
    assert texts["run"] == texts["saved"] and all(texts["run"])


def test_a_missing_teacher_or_server_exits_2(tmp_path, capsys):
    seeds = tmp_path / "s.txt"
    seeds.write_text("a seed text\n")
    rc, _ = synth("bootstrap", "--teacher", tmp_path / "nope", "--seeds", seeds,
                  "--out", tmp_path / "o.jsonl")
    assert rc == 2 and "not a URL" in capsys.readouterr().err
    rc, _ = synth("distill", "--teacher", "http://127.0.0.1:9/v1", "--count", 1,
                  "--out", tmp_path / "o.jsonl")
    assert rc == 2 and "no completions server answered" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


# --- logit distillation in fit ----------------------------------------------------------------
def test_distillation_loss_is_the_formula():
    import tensorflow as tf

    from tfpretrain.models import stability

    s = np.array([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]], np.float32)
    t = np.array([[0.0, 2.0, 0.0], [1.0, -1.0, 0.0]], np.float32)
    T = 2.0

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)
    p, q = softmax(t / T), softmax(s / T)
    expected = T * T * (p * (np.log(p) - np.log(q))).sum(-1)
    got = stability.distill_values(tf.constant(s), tf.constant(t), T).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert np.all(stability.distill_values(tf.constant(t), tf.constant(t), T).numpy() < 1e-6)


def test_distill_objective_mixes_ce_and_kd(tiny_run):
    """alpha * CE + (1 - alpha) * KD over the real tokens, by hand, on the tiny model."""
    import tensorflow as tf

    from tfpretrain.models import stability
    from tfpretrain.training.runfolder import load_run

    _, _, student = load_run(tiny_run[1])
    _, _, teacher = load_run(tiny_run[1])
    teacher.backbone.token_embedding.embeddings.assign(
        teacher.backbone.token_embedding.embeddings * 1.5)  # a different teacher
    student.distill_alpha, student.distill_temperature = 0.25, 3.0
    n_weights = len(student.weights)
    student.set_teacher(teacher)
    assert len(student.weights) == n_weights  # the teacher is not part of the student
    x = tf.constant(np.random.default_rng(0).integers(5, 100, (2, 8)), tf.int32)
    y, w = tf.roll(x, -1, axis=1), tf.constant([[1.0] * 7 + [0.0]] * 2)
    logits = student(x)
    ce = stability.weighted_mean(student.token_losses(y, logits), w)
    kd = stability.weighted_mean(stability.distill_values(logits, teacher(x), 3.0), w)
    got = student.distill_objective(x, logits, ce, w, tf.reduce_sum(w))
    assert float(kd) > 0.01
    np.testing.assert_allclose(float(got), 0.25 * float(ce) + 0.75 * float(kd), rtol=1e-5)


def test_fit_distils_from_a_teacher_and_refuses_another_tokenizer(tiny_run, tmp_path):
    from tfpretrain.data.tokenizers import CharTokenizer
    from tfpretrain.fit import fit

    _, teacher_dir, teacher_summary = tiny_run
    cfg = tiny_config(tmp_path, model={"hidden_dim": 16, "intermediate_dim": 32},
                      train={"steps": 20}, eval={"every": 20},
                      export={"enabled": False},
                      distill={"teacher": str(teacher_dir), "alpha": 0.5})
    summary = fit(cfg, tmp_path / "student")
    assert summary["teacher_val_loss"] == pytest.approx(teacher_summary["val_loss"], rel=1e-4)
    assert summary["distill_teacher"] == str(teacher_dir)
    saved = (tmp_path / "student" / "config.yaml").read_text()
    assert f"path: {teacher_dir / 'tokenizer'}" in saved   # the teacher's tokenizer
    # another tokenizer (a char vocabulary) is refused before anything is written
    CharTokenizer.train(["abc def"], 64).save(tmp_path / "chartok")
    raw = tiny_raw(tmp_path, distill={"teacher": str(teacher_dir)},
                   tokenizer={"kind": "char", "path": str(tmp_path / "chartok")})
    proc = run_cli("tfpretrain.fit", "--config", write_yaml(tmp_path / "other.yaml", raw),
                   "--run-dir", tmp_path / "refused")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "not the teacher's tokenizer" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "refused").exists()


def test_top_k_distillation_is_exact_over_the_whole_vocabulary_and_a_bound_below_it():
    """distill.topk's KL over the k ids and "the rest": the full KL when k is the
    vocabulary (float16 log-probabilities, as cached), smaller than it otherwise, and 0
    for a student equal to its teacher."""
    import tensorflow as tf

    from tfpretrain.models import stability

    rng = np.random.default_rng(0)
    s, t = (rng.normal(size=(2, 3, 50)).astype(np.float32) * 2 for _ in range(2))
    full = stability.distill_values(s, t, 2.0).numpy()
    log_p = tf.nn.log_softmax(t / 2.0)
    values, ids = tf.math.top_k(log_p, 50)
    exact = stability.top_k_distill_values(s, ids, tf.cast(values, tf.float16), 2.0).numpy()
    np.testing.assert_allclose(exact, full, atol=5e-3)
    values, ids = tf.math.top_k(log_p, 5)
    bound = stability.top_k_distill_values(s, ids, values, 2.0).numpy()
    assert np.all(bound <= full + 1e-5) and np.all(bound > 0)
    same = stability.top_k_distill_values(t, ids, values, 2.0).numpy()
    assert np.all(np.abs(same) < 1e-5)


def test_sampled_distillation_is_an_unbiased_estimate_of_the_kl_and_its_gradient():
    """distill.sampled: the mean log-ratio over ids drawn from the teacher at T estimates
    the full KL and its gradient without bias (4,000 draws: within a few percent, where the
    top 5 of 50 ids miss a fifth and more); a student equal to its teacher gets 0 (to the
    float16 rounding of the cached log-probabilities)."""
    import tensorflow as tf

    from tfpretrain.models import stability

    rng = np.random.default_rng(0)
    s, t = (tf.constant(rng.normal(size=(2, 3, 50)).astype(np.float32) * 2) for _ in range(2))
    log_p = tf.nn.log_softmax(t / 2.0)
    ids = tf.reshape(tf.random.stateless_categorical(tf.reshape(t / 2.0, [6, 50]), 4000,
                                                     seed=[1, 2]), [2, 3, 4000])
    drawn = tf.cast(tf.gather(log_p, ids, batch_dims=2), tf.float16)  # as cached
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(s)
        full = tf.reduce_sum(stability.distill_values(s, t, 2.0))
        estimate = tf.reduce_sum(stability.sampled_distill_values(s, ids, drawn, 2.0))
        top5 = tf.reduce_sum(stability.top_k_distill_values(s, *reversed(
            tf.math.top_k(log_p, 5)), 2.0))
    assert abs(float(estimate) / float(full) - 1) < 0.05, (float(estimate), float(full))
    assert float(top5) < 0.8 * float(full)
    g_full, g_est = tape.gradient(full, s), tape.gradient(estimate, s)
    cosine = tf.reduce_sum(g_full * g_est) / (tf.norm(g_full) * tf.norm(g_est))
    assert float(cosine) > 0.97 and abs(float(tf.norm(g_est) / tf.norm(g_full)) - 1) < 0.2
    same = stability.sampled_distill_values(t, ids, drawn, 2.0).numpy()
    assert np.all(np.abs(same) < 2e-3)  # float16 log p against float32 log q


def test_a_cached_top_k_over_the_whole_vocabulary_trains_as_the_teacher_in_the_step(
        tiny_run, tmp_path):
    """distill.topk = the vocabulary: the teacher's predictions, made once per training row
    into the token cache, are the teacher's own, and the student trains as with the teacher
    inside every step (same val loss up to float16 rounding). Another student of the same
    teacher and rows reuses the cache instead of making it again."""
    import tensorflow as tf

    from tfpretrain.data.cache import prepare
    from tfpretrain.fit import fit
    from tfpretrain.objectives import row_format
    from tfpretrain.training import distill
    from tfpretrain.training.runfolder import load_run

    _, teacher_dir, teacher_summary = tiny_run

    def student(run, **kd):
        cfg = tiny_config(tmp_path, model={"hidden_dim": 16, "intermediate_dim": 32},
                          train={"steps": 20}, eval={"every": 20}, export={"enabled": False},
                          distill={"teacher": str(teacher_dir), "alpha": 0.5, **kd})
        return cfg, fit(cfg, tmp_path / run)

    _, in_step = student("in_step")
    cfg, cached = student("cached", topk=320)
    assert cached["val_loss"] == pytest.approx(in_step["val_loss"], abs=2e-3)
    assert cached["teacher_val_loss"] == pytest.approx(teacher_summary["val_loss"], rel=1e-4)
    [ids_file] = distill._top_k_folder(cfg, tmp_path).glob("*/ids.npy")
    ids, log_p = np.load(ids_file), np.load(ids_file.with_name("log_p.npy"))
    assert ids.shape[2] == log_p.shape[2] == 320 and ids.dtype == np.uint16
    _, _, teacher = load_run(teacher_dir)
    cfg = distill.resolve(cfg)  # the teacher's tokenizer
    all_rows = prepare(cfg, row_format(cfg), log=lambda *a: None)[1].train_rows
    rows = all_rows[:4]
    expected = tf.math.top_k(tf.nn.log_softmax(teacher(rows[:, :-1]) / 2.0), 320)
    np.testing.assert_allclose(log_p[:4], expected.values.numpy(), atol=2e-2)
    assert np.mean(ids[:4, :, 0] == expected.indices.numpy()[..., 0]) > 0.98
    stamp, said = ids_file.stat().st_mtime_ns, []
    teacher.trainable = False  # as distill.load_teacher hands it to another student
    distill.teacher_top_k(cfg, teacher, all_rows, tmp_path / "another", 320, log=said.append)
    assert ids_file.stat().st_mtime_ns == stamp  # reused, not made again
    assert str(ids_file.parent) in said[0], said
    # distill.sampled: 64 ids drawn per position, in a cache of their own, with the
    # teacher's log-probabilities of the drawn ids; trains about as the teacher in the step
    cfg, sampled = student("sampled", topk=64, sampled=True)
    assert sampled["val_loss"] == pytest.approx(in_step["val_loss"], abs=1e-2)
    [drawn_file] = [f for f in distill._top_k_folder(cfg, tmp_path).glob("*/ids.npy")
                    if f != ids_file]
    drawn, drawn_log_p = np.load(drawn_file)[:4], np.load(drawn_file.with_name("log_p.npy"))[:4]
    assert drawn.shape[2] == 64
    all_log_p = tf.nn.log_softmax(teacher(rows[:, :-1]) / 2.0).numpy()
    np.testing.assert_allclose(drawn_log_p, np.take_along_axis(all_log_p, drawn, -1),
                               atol=2e-2)
    # drawn, not the top: frequencies follow the teacher (its top id in 64 draws about
    # p(top) of the time, and ids outside its top 10 drawn too)
    top = expected.indices.numpy()
    share = np.mean(drawn == top[..., :1], axis=-1)
    p_top = np.exp(expected.values.numpy()[..., 0])
    assert abs(float(np.mean(share - p_top))) < 0.02
    assert np.mean([not np.isin(drawn[i, j], top[i, j, :10]).all()
                    for i in range(4) for j in range(drawn.shape[1])]) > 0.5


@pytest.mark.parametrize("overrides", [
    ["distill.topk=8"],  # no teacher
    ["distill.topk=8", "distill.teacher=runs/t", "model.objective=mlm", "model.arch=bert"],
    ["distill.topk=8", "distill.teacher=runs/t", "data.service=grpc://h:5050"],
    ["distill.sampled=true", "distill.teacher=runs/t"],  # draws, but how many?
])
def test_a_cached_top_k_needs_a_causal_teacher_and_local_batches(overrides):
    from tfpretrain.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="distill.topk"):
        load_config(None, overrides)
