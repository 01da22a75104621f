"""Zero-shot tasks: multiple-choice and cloze items that a causal LM answers by likelihood,
as lm-evaluation-harness's ``loglikelihood`` requests and nanochat's CORE tasks do.

A task is a JSONL file, one item per line, of one of two kinds:

- choice: ``{"context": "...", "choices": ["...", "..."], "label": 0}``. The model picks
  the continuation it gives the highest log-likelihood after the context: ``acc`` (summed
  over the choice's tokens), ``acc_norm`` (per UTF-8 byte of the choice, which does not
  favour short choices) and ``acc_pmi`` (the gain over the choice's likelihood with no
  context, which does not favour choices that are likely anyway; lm-evaluation-harness's
  ``acc_mutual_info``); ``chance`` is the mean of 1 / number of choices.
- cloze: ``{"context": "...", "continuation": "..."}``. ``acc`` counts items whose every
  continuation token is the model's greedy (argmax) prediction, as LAMBADA is scored;
  ``loss`` is the continuation's mean loss in nats per token.

Other fields (``id``, provenance) are ignored. Whitespace at the end of a context moves to
the start of its continuation, and the continuation's tokens are those after the longest
common prefix of the context's and the whole text's tokens, so a tokenizer that merges
across the boundary still scores exactly the continuation. Each scored text starts after
an end-of-text token, as documents do in the packed training rows; one longer than the
model's context keeps its end (the continuation) and loses the start of its context.

``synth tasks`` makes both kinds from held-out documents (:func:`make_items`), or converts
a public benchmark's own file (:func:`convert`: HellaSwag, LAMBADA, PIQA, ARC).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tfpretrain.data.records import json_lines
from tfpretrain.errors import UserError


@dataclass(frozen=True)
class Task:
    name: str
    path: str
    kind: str                      # "choice" | "cloze"
    contexts: list                 # per item its context
    options: list                  # per item its continuations (a cloze item: one)
    labels: list                   # per item the index of the right continuation

    @property
    def items(self) -> int:
        return len(self.contexts)


def _item(rec, where: str) -> tuple[str, str, list, int]:
    """(kind, context, continuations, label) of one JSON line, or a UserError naming it."""
    if not isinstance(rec, dict) or not isinstance(rec.get("context"), str):
        raise UserError(f"{where}: an item needs a string `context` and either `choices` "
                        "with `label` or `continuation`")
    if "choices" in rec:
        choices, label = rec["choices"], rec.get("label")
        if (not isinstance(choices, list) or len(choices) < 2
                or not all(isinstance(c, str) and c.strip() for c in choices)):
            raise UserError(f"{where}: `choices` must be a list of at least 2 non-empty "
                            f"strings. Received: {choices!r}")
        if isinstance(label, bool) or not isinstance(label, int) \
                or not 0 <= label < len(choices):
            raise UserError(f"{where}: `label` must be the index of the right choice, 0 to "
                            f"{len(choices) - 1}. Received: {label!r}")
        return "choice", rec["context"], choices, label
    if isinstance(rec.get("continuation"), str) and rec["continuation"].strip():
        return "cloze", rec["context"], [rec["continuation"]], 0
    raise UserError(f"{where}: an item needs `choices` (a list) and `label`, or a non-empty "
                    "string `continuation`")


def read_task(name: str, path, key: str = "--tasks") -> Task:
    """The items of a task file (``key``: the config key or flag, for messages)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{key}: no task file {path} (a .jsonl of items; make one with "
                        "`python -m tfpretrain.synth tasks`)")
    kinds, items = set(), []
    for lineno, rec in json_lines(path, key):
        kind, *item = _item(rec, f"{key}: {path}:{lineno}")
        kinds.add(kind)
        items.append(item)
    if not items:
        raise UserError(f"{key}: {path} has no items")
    if len(kinds) > 1:
        raise UserError(f"{key}: {path} mixes choice items (`choices`) and cloze items "
                        "(`continuation`): put each kind in its own file")
    contexts, options, labels = (list(x) for x in zip(*items))
    return Task(name, str(path), kinds.pop(), contexts, options, labels)


@dataclass(frozen=True)
class TaskRows:
    """One row per (item, continuation), then (choice tasks) one per distinct continuation
    with no context, for its prior: x, y (int32) and weight (float32, 1 on the
    continuation's targets) of shape [rows, sequence_length]."""
    x: np.ndarray
    y: np.ndarray
    weight: np.ndarray
    item: np.ndarray               # the item of each row (-1: a prior row)
    nbytes: np.ndarray             # UTF-8 bytes of each row's continuation
    truncated: int                 # rows whose text was cut to fit the context
    prior: np.ndarray = None       # per (item, continuation) row: its prior row (choice)

    @property
    def scored(self) -> int:
        """The (item, continuation) rows: the prior rows follow them."""
        return int(np.sum(self.item >= 0))


def _split(context: str, continuation: str) -> tuple[str, str]:
    stripped = context.rstrip()
    return stripped, context[len(stripped):] + continuation


def _common_prefix(a: list, b: list) -> int:
    n = 0
    for u, v in zip(a, b):
        if u != v:
            break
        n += 1
    return n


def task_rows(task: Task, tokenizer, sequence_length: int) -> TaskRows:
    """Tokenized rows of every (item, continuation) of ``task`` (tokenizer: the run's;
    tokenized in one batch through its graph op, as training tokenizes)."""
    import tensorflow as tf

    from tfpretrain.data.tokenizers import EOS_ID, PAD_ID

    pairs = [(i, *_split(ctx, cont)) for i, (ctx, conts) in
             enumerate(zip(task.contexts, task.options)) for cont in conts]
    prior = None
    if task.kind == "choice":  # each distinct continuation once more, after no context
        distinct = {k: len(pairs) + j for j, k in enumerate(dict.fromkeys(
            k for _, _, k in pairs))}
        prior = np.array([distinct[k] for _, _, k in pairs], np.int64)
        pairs += [(-1, "", k) for k in distinct]
    contexts = tokenizer.tokenize(tf.constant([c for _, c, _ in pairs])).to_list()
    wholes = tokenizer.tokenize(tf.constant([c + k for _, c, k in pairs])).to_list()
    n, L = len(pairs), sequence_length
    x = np.full((n, L), PAD_ID, np.int32)
    y = np.full((n, L), PAD_ID, np.int32)
    w = np.zeros((n, L), np.float32)
    truncated = 0
    for r, (ctx, whole) in enumerate(zip(contexts, wholes)):
        ids = [EOS_ID] + whole
        start = 1 + min(_common_prefix(ctx, whole), len(whole) - 1)  # >= 1 token scored
        if len(ids) > L + 1:
            cut = len(ids) - (L + 1)
            ids, start, truncated = ids[cut:], max(1, start - cut), truncated + 1
        x[r, :len(ids) - 1], y[r, :len(ids) - 1] = ids[:-1], ids[1:]
        w[r, start - 1:len(ids) - 1] = 1.0
    return TaskRows(x, y, w, np.array([i for i, _, _ in pairs], np.int64),
                    np.array([len(k.encode("utf-8")) for _, _, k in pairs], np.float64),
                    truncated, prior)


def task_metrics(task: Task, rows: TaskRows, nll: np.ndarray, greedy: np.ndarray) -> dict:
    """The task's metrics from each row's summed loss (nats) and whether its every target
    was the model's argmax."""
    out = {"kind": task.kind, "items": task.items}
    n = rows.scored
    if task.kind == "cloze":
        out.update(acc=float(np.mean(greedy[:n])),
                   loss=float(nll[:n].sum() / max(rows.weight[:n].sum(), 1.0)))
    else:
        labels = np.asarray(task.labels)
        out.update(chance=float(np.mean([1.0 / len(o) for o in task.options])))
        starts = np.cumsum([0] + [len(o) for o in task.options])  # an item's rows, in order
        for metric, score in (("acc", -nll[:n]),  # ties go to the first choice (np.argmax)
                              ("acc_norm", -nll[:n] / np.maximum(rows.nbytes[:n], 1.0)),
                              ("acc_pmi", nll[rows.prior] - nll[:n])):
            picks = [int(np.argmax(score[a:b])) for a, b in zip(starts[:-1], starts[1:])]
            out[metric] = float(np.mean(np.asarray(picks) == labels))
    if rows.truncated:
        out["truncated"] = rows.truncated
    return out


def read_tasks(specs: dict | None, key: str = "eval.tasks") -> dict:
    """``{name: path}`` -> ``{name: Task}``, every file read and checked (a bad one fails
    here, naming ``key.name``)."""
    return {name: read_task(name, path, f"{key}.{name}") for name, path in (specs or {}).items()}


def tokenize_tasks(tasks: dict, tokenizer, sequence_length: int) -> dict:
    """``{name: Task}`` -> ``{name: (Task, TaskRows)}``, each tokenized once."""
    return {name: (task, task_rows(task, tokenizer, sequence_length))
            for name, task in tasks.items()}


def describe_task(task: Task, rows: TaskRows) -> str:
    """One log line of what a task holds."""
    n = rows.scored
    what = (f"{task.items:,} cloze items, {n:,} rows" if task.kind == "cloze" else
            f"{task.items:,} choice items ({n / task.items:.1f} choices each), {n:,} rows + "
            f"{len(rows.x) - n:,} for the choices' priors")
    cut = f", {rows.truncated:,} cut to the context" if rows.truncated else ""
    return what + cut


def describe_metrics(m: dict) -> str:
    if m["kind"] == "cloze":
        return f"acc {m['acc']:.4f} (greedy), loss {m['loss']:.4f}"
    return (f"acc {m['acc']:.4f}, acc_norm {m['acc_norm']:.4f}, acc_pmi {m['acc_pmi']:.4f} "
            f"(chance {m['chance']:.4f})")


LOGGED = ("acc", "acc_norm", "acc_pmi", "loss")  # a task's metrics shown at every validation


def logged_metrics(name: str, metrics: dict) -> dict:
    """``task_<name>_<metric>`` of the metrics a validation logs (TensorBoard: task/...)."""
    return {f"task_{name}_{k}": v for k, v in metrics.items() if k in LOGGED}


# --- making tasks from documents (synth tasks) ---------------------------------------------
_SENTENCE = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"”'])\s+")
_WORD = re.compile(r"[A-Za-z]{3,}")
# function words: never a cloze target (the context hardly tells which one comes)
_FUNCTION_WORDS = frozenset("""
about after again all also and any are because been before being both but can could did
does down each ever for from had has have her here him his how into its just more most not
now off once only other our out over own same she should some such than that the their them
then there these they this those too under until very was were what when where which while
who why will with would you your
""".split())


def _cloze(text: str, min_context_words: int) -> dict | None:
    """The document cut before the last word that already appeared in it (3+ letters, not a
    function word, at least ``min_context_words`` words in): context and continuation."""
    words = list(_WORD.finditer(text))
    for k in range(len(words) - 1, min_context_words - 1, -1):
        w = words[k]
        if (w.group().lower() not in _FUNCTION_WORDS and text[w.start() - 1].isspace()
                and any(v.group() == w.group() for v in words[:k])):
            return {"context": text[:w.start()].rstrip(),
                    "continuation": " " + w.group()}
    return None


def _sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE.split(text.strip()) if s]


def make_items(kind: str, docs: list, count: int, choices: int, seed: int,
               min_context_words: int = 8) -> list[dict]:
    """Up to ``count`` items of ``kind`` from ``docs`` ({"id", "text"} records), in order:

    - ``ending`` (a choice task, like StoryCloze / HellaSwag): the document without its last
      sentence; the choices are that sentence and the last sentences of ``choices - 1``
      other documents, in a seeded order.
    - ``cloze`` (like LAMBADA): the document cut before the last word (3+ letters, not a
      function word) that already appeared earlier in it, as most of LAMBADA's targets do,
      so that the context tells which word comes; the continuation is that word.

    Documents too short to leave ``min_context_words`` words of context are skipped."""
    rng = random.Random(f"tfpretrain-tasks-{seed}")
    if kind == "ending":
        parts = [(d, _sentences(d["text"])) for d in docs]
        parts = [(d, s) for d, s in parts
                 if len(s) >= 2 and len(" ".join(s[:-1]).split()) >= min_context_words]
        if len(parts) < choices:
            return []
        endings = [s[-1] for _, s in parts]
        items = []
        for i, (d, s) in enumerate(parts[:count]):
            others = rng.sample([j for j in range(len(parts)) if endings[j] != s[-1]],
                                choices - 1)
            options = [" " + s[-1]] + [" " + endings[j] for j in others]
            order = list(range(choices))
            rng.shuffle(order)
            items.append({"id": d["id"], "context": " ".join(s[:-1]),
                          "choices": [options[k] for k in order], "label": order.index(0)})
        return items
    items = []
    for d in docs:
        item = _cloze(d["text"].strip(), min_context_words)
        if item:
            items.append({"id": d["id"], **item})
        if len(items) == count:
            break
    return items


# --- public benchmarks in their published formats (synth tasks --from) -------------------
def _hellaswag_text(text: str) -> str:
    """lm-evaluation-harness's HellaSwag clean-up of WikiHow's bracketed markers."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ").strip()


def _hellaswag(rec: dict) -> dict:
    """rowanz/hellaswag (and Hugging Face ``Rowan/hellaswag``): ``activity_label``, ``ctx_a``,
    ``ctx_b``, ``endings``, ``label``; the prompt as lm-evaluation-harness builds it."""
    ctx = rec["ctx_a"] + " " + rec["ctx_b"].capitalize()
    return {"context": _hellaswag_text(rec["activity_label"] + ": " + ctx),
            "choices": [" " + _hellaswag_text(e) for e in rec["endings"]],
            "label": int(rec["label"])}


def _lambada(rec: dict) -> dict:
    """LAMBADA (OpenAI's ``lambada_test.jsonl``, Hugging Face ``EleutherAI/lambada_openai``):
    ``text``; the target is its last word."""
    context, _, word = rec["text"].strip().rpartition(" ")
    return {"context": context, "continuation": " " + word}


def _piqa(rec: dict) -> dict:
    """PIQA (Hugging Face ``ybisk/piqa``, or the original jsonl with its labels merged in):
    ``goal``, ``sol1``, ``sol2``, ``label``."""
    return {"context": f"Question: {rec['goal']}\nAnswer:",
            "choices": [" " + rec["sol1"], " " + rec["sol2"]], "label": int(rec["label"])}


def _arc(rec: dict) -> dict:
    """ARC (Hugging Face ``allenai/ai2_arc``: ``question``, ``choices: {text, label}``,
    ``answerKey``; or AI2's jsonl: ``question: {stem, choices: [{text, label}]}``)."""
    question = rec["question"]
    if isinstance(question, dict):
        stem, options = question["stem"], question["choices"]
        texts, labels = [c["text"] for c in options], [c["label"] for c in options]
    else:
        stem, texts, labels = question, rec["choices"]["text"], rec["choices"]["label"]
    return {"context": f"Question: {stem}\nAnswer:", "choices": [" " + t for t in texts],
            "label": labels.index(rec["answerKey"])}


FORMATS = {  # --from: (record -> item, the fields it reads)
    "hellaswag": (_hellaswag, "activity_label, ctx_a, ctx_b, endings, label"),
    "lambada": (_lambada, "text"),
    "piqa": (_piqa, "goal, sol1, sol2, label"),
    "arc": (_arc, "question, choices {text, label} (or question {stem, choices}), answerKey"),
}


def convert(fmt: str, path, flag: str = "--in"):
    """Items of a public benchmark's JSONL (``FORMATS``), each checked as ``read_task``
    checks a task file's; a record without the format's fields is one message naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag}: no such file: {path}")
    make, fields = FORMATS[fmt]
    for lineno, rec in json_lines(path, flag):
        where = f"{flag}: {path}:{lineno}"
        try:
            item = make(rec)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise UserError(f"{where}: not a `{fmt}` record ({type(exc).__name__}: {exc}); "
                            f"`--from {fmt}` reads {fields}") from None
        _item(item, where)
        yield item
