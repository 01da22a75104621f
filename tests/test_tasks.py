"""Zero-shot tasks (eval.tasks, evaluate --tasks, synth tasks): items read and checked, the
continuation's tokens found across the tokenizer's boundary, scores equal to an independent
log-likelihood, metrics, and a run that reports them everywhere."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from conftest import last_json_line, run_cli, tiny_config


def _write(path, items):
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    return path


@pytest.mark.parametrize("line, message", [
    ('{"choices": ["a", "b"], "label": 0}', "needs a string `context`"),
    ('{"context": "x", "choices": ["a"], "label": 0}', "at least 2 non-empty strings"),
    ('{"context": "x", "choices": ["a", "b"], "label": 2}', "`label` must be the index"),
    ('{"context": "x", "choices": ["a", "b"], "label": true}', "`label` must be the index"),
    ('{"context": "x", "continuation": " "}', "non-empty string `continuation`"),
    ('{"context": "x", "choices": ["a", "b"]', "malformed JSON line"),
])
def test_a_bad_item_is_one_message_naming_the_file_and_line(tmp_path, line, message):
    from tfpretrain.data.tasks import read_task
    from tfpretrain.errors import UserError

    path = tmp_path / "t.jsonl"
    path.write_text('{"context": "ok", "choices": ["a", "b"], "label": 1}\n' + line + "\n")
    with pytest.raises(UserError) as err:
        read_task("t", path, "eval.tasks.t")
    assert f"eval.tasks.t: {path}:2" in str(err.value) and message in str(err.value)


def test_a_file_of_both_kinds_or_of_nothing_is_refused(tmp_path):
    from tfpretrain.data.tasks import read_task
    from tfpretrain.errors import UserError

    mixed = _write(tmp_path / "m.jsonl", [{"context": "a", "choices": ["b", "c"], "label": 0},
                                          {"context": "a", "continuation": " b"}])
    with pytest.raises(UserError, match="mixes choice items"):
        read_task("m", mixed)
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(UserError, match="has no items"):
        read_task("e", tmp_path / "e.jsonl")
    with pytest.raises(UserError, match="no task file"):
        read_task("x", tmp_path / "missing.jsonl")


def _tokenizer(kind="sentencepiece_bpe", size=320):
    from tfpretrain.data.synthetic import generate_stories
    from tfpretrain.data.tokenizers import train_tokenizer

    return train_tokenizer(kind, generate_stories(200, 7), size)


@pytest.mark.parametrize("kind", ["sentencepiece_bpe", "char"])
def test_the_scored_tokens_are_exactly_the_continuation_and_a_long_text_keeps_its_end(
        tmp_path, kind):
    from tfpretrain.data.tasks import read_task, task_rows
    from tfpretrain.data.tokenizers import EOS_ID

    tok = _tokenizer(kind)
    # trailing space on the context: it moves into the continuation
    items = [{"context": "Lily had a red ball. She ", "choices": ["gave it to Tom.",
                                                                  "ate the moon."], "label": 0},
             {"context": "Tom went to the park " * 40, "choices": ["and smiled.", "and sat."],
              "label": 1}]
    task = read_task("t", _write(tmp_path / "t.jsonl", items))
    rows = task_rows(task, tok, 64)
    assert rows.x.shape == (8, 64) and list(rows.item) == [0, 0, 1, 1, -1, -1, -1, -1]
    assert list(rows.prior) == [4, 5, 6, 7] and rows.scored == 4
    wants = [" gave it to Tom.", " ate the moon.", " and smiled.", " and sat."]
    for r, want in enumerate(wants * 2):  # then each alone, after end-of-text: its prior
        scored = rows.y[r][rows.weight[r] > 0]
        assert tok.decode(scored).strip() == want.strip()
        assert tok.decode(scored) in (want, want.strip())  # a word-start piece may eat the space
        end = int(np.flatnonzero(rows.weight[r])[-1]) + 1  # the continuation ends the row
        assert (rows.x[r, 1:end] == rows.y[r, :end - 1]).all()  # x is y shifted by one
    assert rows.x[0, 0] == EOS_ID  # a short text starts after end-of-text, as documents do
    assert (rows.x[4:, 0] == EOS_ID).all() and (rows.weight[4:, 0] == 1).all()
    assert rows.truncated == 2 and rows.x[2, 0] != EOS_ID  # the long context lost its start
    assert list(rows.nbytes) == [16, 14, 12, 9] * 2


def test_metrics_pick_by_sum_by_byte_and_by_prior_and_cloze_by_greedy_match():
    from tfpretrain.data.tasks import Task, TaskRows, task_metrics

    task = Task("t", "t.jsonl", "choice", ["a", "b"], [[" x", " yyyy"], [" p", " q", " r"]],
                [1, 0])
    rows = TaskRows(*(np.zeros((10, 4)),) * 3, item=np.array([0, 0, 1, 1, 1] + [-1] * 5),
                    nbytes=np.array([2.0, 5.0, 2.0, 2.0, 2.0] * 2), truncated=0,
                    prior=np.arange(5, 10))
    # item 0: the long choice has more nats in total (acc wrong), fewer per byte (acc_norm
    # right) and far more than its prior (acc_pmi right); item 1: " q" gains most over its
    # prior (acc_pmi wrong), " p" is likeliest (acc and acc_norm right)
    nll = np.array([3.0, 5.0, 1.0, 2.0, 3.0] + [1.0, 6.0, 4.0, 6.0, 2.0])
    m = task_metrics(task, rows, nll, np.zeros(10, bool))
    assert (m["acc"], m["acc_norm"], m["acc_pmi"]) == (0.5, 1.0, 0.5)
    assert m["chance"] == pytest.approx(5 / 12) and m["items"] == 2
    cloze = Task("c", "c.jsonl", "cloze", ["a", "b"], [[" x"], [" y"]], [0, 0])
    w = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
    rows = TaskRows(w, w, w, item=np.array([0, 1]), nbytes=np.array([2.0, 2.0]), truncated=0)
    m = task_metrics(cloze, rows, np.array([2.0, 1.0]), np.array([True, False]))
    assert m["acc"] == 0.5 and m["loss"] == pytest.approx(1.0)


def test_scores_equal_the_exported_score_signature_and_evaluate_tasks_prints_them(
        tiny_run, tmp_path, capsys):
    """The scorer's per-choice nats equal log p(context + choice) - log p(context) computed
    by the SavedModel's score function (its own tokenization and batching), and the
    evaluate command reports the accuracy these nats give, from the run or its export."""
    import tensorflow as tf

    from tfpretrain.data.tasks import read_task, task_rows
    from tfpretrain.objectives import get_objective
    from tfpretrain.objectives.causal import score_texts
    from tfpretrain.training.runfolder import load_run

    cfg, run_dir, _ = tiny_run
    items = [{"context": "Once upon a time, Lily", "choices": [" had a ball.", " went home.",
                                                               " saw a big dog."], "label": 2},
             {"context": "Tom and Mia played", "choices": [" in the park.", " with a kite."],
              "label": 0}]
    path = _write(tmp_path / "ending.jsonl", items)
    cfg, tokenizer, model = load_run(run_dir)
    task = read_task("ending", path)
    rows = task_rows(task, tokenizer, cfg.model.sequence_length)
    nll, greedy = get_objective(cfg).task_scorer(cfg, model, tokenizer)(rows)
    texts = [i["context"] + c for i in items for c in i["choices"]]
    contexts = [i["context"] for i in items for _ in i["choices"]]
    whole = score_texts(model, tokenizer, tf.constant(texts))["log_likelihood"].numpy()
    ctx = score_texts(model, tokenizer, tf.constant(contexts))["log_likelihood"].numpy()
    np.testing.assert_allclose(nll[:5], ctx - whole, rtol=1e-4, atol=1e-4)
    alone = score_texts(model, tokenizer, tf.constant(
        [c for i in items for c in i["choices"]]))["log_likelihood"].numpy()
    np.testing.assert_allclose(nll[5:], -alone, rtol=1e-4, atol=1e-4)  # the priors
    assert greedy.dtype == bool and len(greedy) == 10 and list(rows.prior) == [5, 6, 7, 8, 9]
    picks = [int(np.argmin(nll[:3])), 3 + int(np.argmin(nll[3:5]))]
    want = np.mean([picks[0] == 2, picks[1] == 3])

    from tfpretrain.evaluate import main as evaluate_main

    capsys.readouterr()
    assert evaluate_main(["--run-dir", str(run_dir), "--tasks", str(path), f"c={path}"]) == 0
    out = last_json_line(capsys.readouterr().out)["tasks"]
    assert out["ending"]["acc"] == pytest.approx(want) and out["c"] == out["ending"]
    assert out["ending"]["items"] == 2 and out["ending"]["chance"] == pytest.approx(5 / 12)
    # the run's export answers the same, through its logits signature and its own tokenizer
    export = tiny_run[2]["saved_model"]
    assert evaluate_main(["--saved-model", export, "--tasks", str(path)]) == 0
    served = last_json_line(capsys.readouterr().out)["tasks"]["ending"]
    assert served.keys() == out["ending"].keys()
    for key, value in out["ending"].items():
        assert served[key] == (pytest.approx(value, abs=1e-4) if isinstance(value, float)
                               else value), key
    assert evaluate_main(["--saved-model", export, "--run-dir", str(run_dir),
                          "--tasks", str(path)]) == 2
    assert "give --run-dir or --saved-model" in capsys.readouterr().err


def test_a_run_with_eval_tasks_reports_them_everywhere(tiny_run):
    """The shared tiny run answers two tasks (conftest): at every validation (TensorBoard's
    val run), in the summary (flat and whole) and in `runs` (a column, sorted best first)."""
    from tfpretrain.runs import curve, describe
    from tfpretrain.runs import main as runs_main

    _, run_dir, summary = tiny_run
    for key in ("task_ending_acc", "task_ending_acc_norm", "task_ending_acc_pmi",
                "task_cloze_acc", "task_cloze_loss"):
        assert isinstance(summary[key], float), key
    assert summary["tasks"]["ending"]["items"] == 3 and summary["tasks"]["ending"]["chance"] == 0.5
    assert summary["tasks"]["cloze"]["kind"] == "cloze"
    steps, values = curve(run_dir, "val", "task_ending_acc")
    assert steps == [20, 40, 60] and values[-1] == pytest.approx(summary["task_ending_acc"])
    assert describe(run_dir, run_dir.parent)["task_cloze_acc"] == summary["task_cloze_acc"]
    assert runs_main([str(run_dir.parent), "--sort", "task_cloze_acc"]) == 0


def test_a_bad_task_file_is_refused_by_dry_run_and_before_the_run_folder(tmp_path):
    from tfpretrain.errors import UserError
    from tfpretrain.fit import dry_run, fit

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "a", "choices": ["b", "c"], "label": 5}\n')
    cfg = tiny_config(tmp_path, eval={"tasks": {"e": str(bad)}})
    message = re.escape(f"eval.tasks.e: {bad}:1: `label` must be the index")
    with pytest.raises(UserError, match=message):
        dry_run(cfg)
    with pytest.raises(UserError, match=message):
        fit(cfg, tmp_path / "runs" / "x")
    assert not (tmp_path / "runs" / "x").exists()


def test_synth_tasks_makes_items_whose_answer_is_the_document(tmp_path):
    from tfpretrain.data.records import read_records

    r = run_cli("tfpretrain.synth", "stories", "--count", "40", "--seed", "5", "--out",
                str(tmp_path / "held.jsonl"))
    assert r.returncode == 0, r.stderr[-2000:]
    docs = {d["id"]: d["text"] for d in read_records(tmp_path / "held.jsonl")}
    for kind in ("ending", "cloze"):
        out = tmp_path / f"{kind}.jsonl"
        r = run_cli("tfpretrain.synth", "tasks", "--in", str(tmp_path / "held.jsonl"),
                    "--kind", kind, "--count", "30", "--out", str(out))
        assert r.returncode == 0, r.stderr[-2000:]
        items = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(items) == 30 and last_json_line(r.stdout)["items"] == 30
        for it in items:
            doc = docs[it["parent"]]
            if kind == "ending":
                assert len(it["choices"]) == 4 and len(set(it["choices"])) == 4
                assert it["context"] + it["choices"][it["label"]] == doc
            else:
                assert doc.startswith(it["context"] + it["continuation"])
                word = it["continuation"].strip()
                assert word.isalpha() and re.search(rf"\b{word}\b", it["context"])  # told
        labels = [it["label"] for it in items if kind == "ending"]
        assert kind == "cloze" or len(set(labels)) > 1  # the right choice is not always first
    again = run_cli("tfpretrain.synth", "tasks", "--in", str(tmp_path / "held.jsonl"),
                    "--count", "30", "--out", str(tmp_path / "ending.jsonl"))
    assert again.returncode == 2 and "--force" in again.stderr  # never overwritten silently


def test_config_checks_of_eval_tasks():
    from tfpretrain.config import ConfigError, build_config

    def problems(**eval_and_more):
        raw = {"eval": {}, **{k: v for k, v in eval_and_more.items() if k != "eval"}}
        raw["eval"].update(eval_and_more.get("eval", {}))
        try:
            build_config(raw)
        except ConfigError as err:
            return str(err)
        return ""

    assert problems(eval={"tasks": {"ending": "e.jsonl"}}) == ""
    assert "`eval.tasks` must map names" in problems(eval={"tasks": {"a-b": "e.jsonl"}})
    assert "`eval.tasks` must map names" in problems(eval={"tasks": {"a": ["x", "y"]}})
    assert "needs a causal model" in problems(
        eval={"tasks": {"a": "e.jsonl"}}, model={"arch": "bert", "objective": "mlm"},
        tokenizer={"kind": "wordpiece"})
    assert problems(eval={"tasks": {"ending": "e.jsonl"}},
                    tune={"objective": "task_ending_acc"}) == ""
    assert "task_<name>_acc" in problems(tune={"objective": "task_ending_acc"})


def test_a_search_for_a_task_accuracy_maximizes_it():
    from tfpretrain.config import build_config
    from tfpretrain.tune import make_oracle

    def oracle(objective, **eval_):
        return make_oracle(build_config({"eval": eval_, "tune": {
            "objective": objective, "space": {"optimizer.learning_rate": [1e-3, 3e-3]}}}))

    assert oracle("task_ending_acc", tasks={"ending": "e.jsonl"}).objective.direction == "max"
    assert oracle("val_loss").objective.direction == "min"


BENCHMARK_RECORDS = {  # one record of each in its published format
    "hellaswag": {"activity_label": "Home and Garden", "ctx_a": "[header] How to clean a grill "
                  "[title] Heat the grill.", "ctx_b": "then", "label": "0",
                  "endings": ["[step] scrub it with a brush.", "eat it.", "sing.", "run."]},
    "lambada": {"text": "He took the key and opened the door with the key"},
    "piqa": {"goal": "Dry wet shoes", "sol1": "Stuff them with paper.", "sol2": "Freeze them.",
             "label": 0},
    "arc": {"question": "Which is a metal?", "answerKey": "C",
            "choices": {"text": ["wood", "glass", "iron"], "label": ["A", "B", "C"]}},
}
EXPECTED_ITEMS = {  # lm-evaluation-harness's prompts
    "hellaswag": {"context": "Home and Garden: How to clean a grill. Heat the grill. Then",
                  "choices": [" scrub it with a brush.", " eat it.", " sing.", " run."],
                  "label": 0},
    "lambada": {"context": "He took the key and opened the door with the",
                "continuation": " key"},
    "piqa": {"context": "Question: Dry wet shoes\nAnswer:",
             "choices": [" Stuff them with paper.", " Freeze them."], "label": 0},
    "arc": {"context": "Question: Which is a metal?\nAnswer:",
            "choices": [" wood", " glass", " iron"], "label": 2},
}


@pytest.mark.parametrize("fmt", sorted(BENCHMARK_RECORDS))
def test_synth_tasks_converts_a_public_benchmark_to_items(tmp_path, fmt):
    from tfpretrain.data.tasks import read_task
    from tfpretrain.synth import main

    bench = _write(tmp_path / "bench.jsonl", [BENCHMARK_RECORDS[fmt]] * 2)
    assert main(["tasks", "--from", fmt, "--in", str(bench), "--out",
                 str(tmp_path / "t.jsonl")]) == 0
    task = read_task(fmt, tmp_path / "t.jsonl")
    want = EXPECTED_ITEMS[fmt]
    assert task.items == 2 and task.contexts[0] == want["context"]
    assert task.options[0] == want.get("choices", [want.get("continuation")])
    assert task.labels[0] == want.get("label", 0)
    other = "piqa" if fmt != "piqa" else "arc"
    r = run_cli("tfpretrain.synth", "tasks", "--from", other, "--in", str(bench), "--out",
                str(tmp_path / "x.jsonl"))
    assert r.returncode == 2 and f"bench.jsonl:1: not a `{other}` record" in r.stderr
