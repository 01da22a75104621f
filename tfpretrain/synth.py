"""Synthetic data: generate, augment, bootstrap, evolve, deduplicate and distil text.

    python -m tfpretrain.synth stories --count N --out stories.jsonl [--level 1..3]
        [--features dialogue,moral,twist,conflict,foreshadowing,bad_ending]
        [--required-words] [--arcs lost,stuck,...]
    python -m tfpretrain.synth augment --in PATH --out aug.jsonl --n K
        [--ops synonym,insert,swap,delete,char_noise] [--rates synonym=0.1,...]
    python -m tfpretrain.synth bootstrap --teacher RUN|SAVED_MODEL|URL --seeds PATH
        --out boot.jsonl [--rounds R] [--per-round N] [filter and sampling options]
    python -m tfpretrain.synth evolve --teacher RUN|SAVED_MODEL|URL --in PATH --out evo.jsonl
        [--ops constraint,deepen,concretize,reasoning,breadth] [--rounds R]
    python -m tfpretrain.synth dedup --in PATH --out clean.jsonl [--against EVAL_PATH]
        [--threshold 0.55] [--ngram 5] [--contamination-ngram N]
    python -m tfpretrain.synth distill --teacher RUN|SAVED_MODEL|URL --count N
        --out distilled.jsonl [--prompts PATH] [sampling options]
    python -m tfpretrain.synth tasks --in PATH --out task.jsonl [--kind ending|cloze]
        [--count N] [--choices K] [--against TRAIN_PATH]
    python -m tfpretrain.synth tasks --from hellaswag|lambada|piqa|arc --in BENCH.jsonl
        --out task.jsonl [--count N]
    python -m tfpretrain.synth report --in PATH [--against EVAL_PATH]

Every mode is deterministic given ``--seed`` (a URL teacher as far as its server honours
the seed) and writes JSONL that ``data.path`` reads directly: ``text`` plus provenance
(``id``, ``mode``, ``seed``, ``params``, ``teacher``, ``parent``; see
``tfpretrain.data.records``). Output is streamed through a temporary file and renamed into
place at the end; an existing output is replaced only with ``--force``. Each mode ends
with a quality report (``tfpretrain.data.quality``), printed and written beside the
output as ``<out stem>.report.json``; the last stdout line is a JSON summary.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tfpretrain.errors import UserError, cli_main, quiet_tensorflow

MODES = ("stories", "augment", "bootstrap", "evolve", "dedup", "distill", "tasks", "report")


class Progress:
    """A progress line on stderr: rewritten in place on a terminal, every ~10% (and at
    most every 5 s) otherwise."""

    def __init__(self, total: int | None, what: str):
        self.total, self.what, self.n = total, what, 0
        self.t0 = self.last = time.time()
        self.tty = sys.stderr.isatty()
        self.next_mark = 0.1

    def update(self, k: int = 1) -> None:
        self.n += k
        now = time.time()
        frac = self.n / self.total if self.total else None
        due = (now - self.last > 0.2) if self.tty else (
            (frac is not None and frac >= self.next_mark) or now - self.last > 5)
        if due:
            self.last = now
            if frac is not None:
                while self.next_mark <= frac:
                    self.next_mark += 0.1
            self._print(now)

    def _print(self, now: float) -> None:
        rate = self.n / max(now - self.t0, 1e-9)
        of = f"/{self.total:,}" if self.total else ""
        end = "\r" if self.tty else "\n"
        print(f"{self.what}: {self.n:,}{of} ({rate:,.0f}/s)", end=end, file=sys.stderr,
              flush=True)

    def close(self) -> None:
        if self.n and (self.total is None or self.n != self.total or self.tty):
            self._print(time.time())
        if self.tty:
            print(file=sys.stderr)


def _csv(text: str | None, allowed, flag: str) -> list[str]:
    items = [x.strip() for x in (text or "").split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad:
        raise UserError(f"{flag}: unknown {', '.join(bad)}; choose from {', '.join(allowed)}")
    return items


def _positive(value: int, flag: str) -> None:
    if value < 1:
        raise UserError(f"{flag} must be >= 1. Received: {value}")


# --- the modes ------------------------------------------------------------------------------
def run_stories(a, writer, report) -> dict:
    from tfpretrain.data.records import record
    from tfpretrain.data.synthetic import FEATURES, PROBLEMS, StorySpec, iter_stories

    _positive(a.count, "--count")
    if a.level not in (1, 2, 3):
        raise UserError(f"--level must be 1, 2 or 3. Received: {a.level}")
    spec = StorySpec(a.level, _csv(a.features, FEATURES, "--features"), a.required_words,
                     _csv(a.arcs, [k for k, _ in PROBLEMS], "--arcs"))
    params, bar = spec.params(), Progress(a.count, "stories")
    for i, (text, words) in enumerate(iter_stories(a.count, a.seed, spec)):
        extra = {"required_words": words} if spec.required_words else {}
        writer.write(record("stories", i, text, a.seed, params, **extra))
        report.add(text)
        bar.update()
    bar.close()
    return {"params": params}


def run_augment(a, writer, report) -> dict:
    import random

    from tfpretrain.data.augment import DEFAULT_RATES, OPS, augment
    from tfpretrain.data.records import read_records, record

    _positive(a.n, "--n")
    ops = _csv(a.ops, OPS, "--ops") or list(OPS)
    rates = dict(DEFAULT_RATES)
    for item in filter(None, (a.rates or "").split(",")):
        op, _, value = item.partition("=")
        try:
            rate = float(value)
        except ValueError:
            rate = -1.0
        if op not in OPS or not 0 < rate <= 1:
            raise UserError(f"--rates: {item!r} must be OP=RATE with OP among {', '.join(OPS)} "
                            "and 0 < RATE <= 1")
        rates[op] = rate
    params = {"ops": ops, "rates": {k: rates[k] for k in ops}, "n": a.n,
              "keep_original": a.keep_original}
    rng, i, bar = random.Random(f"tfpretrain-augment-{a.seed}"), 0, Progress(None, "inputs")
    for rec in read_records(a.input):
        variants = [(None, rec["text"])] if a.keep_original else []
        for _ in range(a.n):
            op = rng.choice(ops)
            variants.append((op, augment(rec["text"], op, rates[op], rng)))
        for op, text in variants:
            meta = {k: v for k, v in rec.items() if k not in ("id", "text")}
            writer.write(record("augment", i, text, a.seed, params, parent=rec["id"],
                                op=op or "original", source=meta or None))
            report.add(text)
            i += 1
        bar.update()
    bar.close()
    return {"params": params}


def run_dedup(a, writer, report) -> dict:
    from tfpretrain.data.dedup import Deduplicator
    from tfpretrain.data.records import read_records, texts

    if not 0 < a.threshold <= 1:
        raise UserError(f"--threshold must be in (0, 1]. Received: {a.threshold}")
    against = list(texts(a.against, "--against")) if a.against else []
    d = Deduplicator(a.threshold, a.ngram, against, a.contamination_ngram)
    bar = Progress(None, "records")
    for rec in d.filter(_counted(read_records(a.input), bar)):
        writer.write(rec)
        report.add(rec["text"])
    bar.close()
    summary = d.summary()
    print(f"dedup: {summary['input']:,} in, {summary['kept']:,} kept; removed "
          f"{summary['removed_exact']:,} exact, {summary['removed_near']:,} near "
          f"(Jaccard >= {a.threshold}), {summary['removed_contaminated']:,} contaminated",
          file=sys.stderr)
    return {"params": {"threshold": a.threshold, "ngram": a.ngram,
                       "contamination_ngram": a.contamination_ngram,
                       "against": a.against}, **summary}


def run_tasks(a, writer, report) -> dict:
    """Zero-shot task items (``eval.tasks``, ``evaluate --tasks``) from held-out documents:
    ``ending`` (choose the real last sentence) or ``cloze`` (predict the last repeated
    word)."""
    from tfpretrain.data.records import read_records
    from tfpretrain.data.tasks import convert, make_items

    _positive(a.count, "--count")
    if a.choices < 2:
        raise UserError(f"--choices must be >= 2. Received: {a.choices}")
    if a.source:  # a public benchmark's own file: its items, converted
        return _converted(a, writer, report, convert(a.source, a.input))
    docs = list(read_records(a.input))
    items = make_items(a.kind, docs, a.count, a.choices, a.seed)
    if not items:
        need = ("at least 2 sentences and 8 words before the last one, and "
                f"{a.choices} such documents with distinct last sentences"
                if a.kind == "ending" else "a word of 3+ letters repeated after its first 8 "
                "words")
        raise UserError(f"--in {a.input}: no {a.kind} items from its {len(docs):,} documents "
                        f"(a document needs {need})")
    for i, item in enumerate(items):
        answer = item["choices"][item["label"]] if "choices" in item else item["continuation"]
        writer.write({"id": f"tasks-{a.seed}-{i}", "mode": "tasks", "seed": a.seed,
                      "parent": item.pop("id"), **item})
        report.add(item["context"] + answer)
    if len(items) < a.count:
        print(f"tasks: {len(items):,} items of the {a.count:,} asked ({len(docs):,} "
              "documents)", file=sys.stderr)
    return {"params": {"kind": a.kind, "count": a.count, "choices": a.choices,
                       "in": a.input}, "items": len(items)}


def _converted(a, writer, report, items) -> dict:
    """synth tasks --from: every item (at most --count) of a benchmark file, in order."""
    n = 0
    for n, item in enumerate(items, 1):
        answer = item["choices"][item["label"]] if "choices" in item else item["continuation"]
        writer.write({"id": f"{a.source}-{n - 1}", "mode": "tasks", "source": a.source, **item})
        report.add(item["context"] + answer)
        if n == a.count:
            break
    if not n:
        raise UserError(f"--in {a.input}: no records")
    return {"params": {"from": a.source, "count": a.count, "in": a.input}, "items": n}


def _counted(records, bar):
    for rec in records:
        bar.update()
        yield rec


def _teacher(a):
    quiet_tensorflow()
    from tfpretrain.synthesis.teacher import open_teacher

    return open_teacher(a.teacher, a.teacher_model)


def _sampling(a):
    from tfpretrain.synthesis.bootstrap import Sampling

    _positive(a.max_new_tokens, "--max-new-tokens")
    if not a.temperature >= 0 or not 0 < a.top_p <= 1:
        raise UserError(f"--temperature must be >= 0 and --top-p in (0, 1]. Received: "
                        f"temperature={a.temperature}, top_p={a.top_p}")
    return Sampling(a.max_new_tokens, a.temperature, a.top_p)


def _maker(mode: str, a, params: dict, teacher, report):
    """record(text, parent, **extra) numbering the output, feeding the report."""
    from tfpretrain.data.records import record

    counter = iter(range(1 << 62))

    def make(text, parent=None, **extra):
        report.add(text)
        return record(mode, next(counter), text, a.seed, params, teacher=teacher.name,
                      parent=parent, **extra)
    return make


def run_bootstrap(a, writer, report) -> dict:
    from tfpretrain.data.records import read_records
    from tfpretrain.synthesis.bootstrap import bootstrap
    from tfpretrain.synthesis.filters import Filters

    _positive(a.rounds, "--rounds")
    _positive(a.per_round, "--per-round")
    seeds = list(read_records(a.seeds, "--seeds"))
    if not seeds:
        raise UserError(f"--seeds: {a.seeds} holds no texts")
    sampling = _sampling(a)
    filters = Filters(a.min_words, a.max_words, a.max_repetition, a.min_perplexity,
                      a.max_perplexity, a.max_rouge)
    teacher = _teacher(a)
    params = {"rounds": a.rounds, "per_round": a.per_round, "shots": a.shots,
              "opening_words": a.opening_words, **vars(sampling),
              **{k: v for k, v in vars(filters).items() if k != "removed"}}
    stats = bootstrap(teacher, seeds, writer, _maker("bootstrap", a, params, teacher, report),
                      a.rounds, a.per_round, a.seed, filters, sampling, a.shots,
                      a.opening_words, a.separator.encode().decode("unicode_escape"),
                      log=lambda m: print(m, file=sys.stderr))
    return {"params": params, "teacher": teacher.name, "rounds": stats,
            "removed": filters.counts()}


def run_evolve(a, writer, report) -> dict:
    from tfpretrain.data.records import read_records
    from tfpretrain.synthesis.evolve import OPS, evolve

    _positive(a.rounds, "--rounds")
    ops = _csv(a.ops, OPS, "--ops") or list(OPS)
    records = list(read_records(a.input))
    sampling = _sampling(a)
    teacher = _teacher(a)
    params = {"ops": ops, "rounds": a.rounds, **vars(sampling)}
    result = evolve(teacher, records, writer, _maker("evolve", a, params, teacher, report),
                    ops, a.rounds, a.seed, sampling, log=lambda m: print(m, file=sys.stderr))
    return {"params": params, "teacher": teacher.name, "input": len(records), **result}


def run_distill(a, writer, report) -> dict:
    from tfpretrain.data.records import read_records

    _positive(a.count, "--count")
    sampling = _sampling(a)
    prompts = [r["text"] for r in read_records(a.prompts, "--prompts")] if a.prompts else [""]
    if not prompts:
        raise UserError(f"--prompts: {a.prompts} holds no texts")
    teacher = _teacher(a)
    params = {"count": a.count, "prompts": a.prompts, **vars(sampling)}
    make = _maker("distill", a, params, teacher, report)
    bar = Progress(a.count, "samples")
    for start in range(0, a.count, a.batch_size):
        end = min(start + a.batch_size, a.count)
        chunk = [prompts[i % len(prompts)] for i in range(start, end)]
        outs = teacher.complete(chunk, sampling.max_new_tokens, sampling.temperature,
                                sampling.top_p, seed=a.seed * 1_000_003 + start)
        for p, out in zip(chunk, outs):
            writer.write(make(f"{p} {out}".strip(), prompt=p))
        bar.update(len(chunk))
    bar.close()
    return {"params": params, "teacher": teacher.name}


RUNNERS = {"stories": run_stories, "augment": run_augment, "bootstrap": run_bootstrap,
           "evolve": run_evolve, "dedup": run_dedup, "distill": run_distill, "tasks": run_tasks}


# --- arguments ----------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tfpretrain.synth", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    parsers = {m: sub.add_parser(m) for m in MODES}
    for m, q in parsers.items():
        if m != "report":
            q.add_argument("--out", required=True, help="output .jsonl")
            q.add_argument("--force", action="store_true", help="replace an existing --out")
            q.add_argument("--seed", type=int, default=1337)
        q.add_argument("--against", help="eval texts for the report's n-gram overlap "
                       "(dedup: also decontaminate against them)")
        q.add_argument("--overlap-ngram", type=int, default=8,
                       help="word n-gram of the report's eval overlap (default 8)")
    _data_arguments(parsers)
    _teacher_arguments(parsers)
    parsers["report"].add_argument("--in", dest="input", required=True)
    return p


def _data_arguments(parsers: dict) -> None:
    """stories, augment and dedup: no teacher."""
    s = parsers["stories"]
    s.add_argument("--count", type=int, required=True)
    s.add_argument("--level", type=int, default=2, help="1 plain, 2 the embedded corpus, 3 rich")
    s.add_argument("--features", help="comma-separated: dialogue, moral, twist, conflict, "
                   "foreshadowing, bad_ending")
    s.add_argument("--required-words", action="store_true",
                   help="every story uses a random verb, noun and adjective (recorded)")
    s.add_argument("--arcs", help="comma-separated problem arcs (default: all)")
    g = parsers["augment"]
    g.add_argument("--in", dest="input", required=True)
    g.add_argument("--n", type=int, default=4, help="variants per input (default 4)")
    g.add_argument("--ops", help="comma-separated (default: all): synonym, insert, swap, "
                   "delete, char_noise")
    g.add_argument("--rates", help="per-op rates, e.g. synonym=0.2,char_noise=0.05")
    g.add_argument("--keep-original", action="store_true", help="also write each input")
    d = parsers["dedup"]
    d.add_argument("--in", dest="input", required=True)
    d.add_argument("--threshold", type=float, default=0.55,
                   help="Jaccard (MinHash) threshold (default 0.55)")
    d.add_argument("--ngram", type=int, default=5, help="character shingle size (default 5)")
    d.add_argument("--contamination-ngram", type=int, default=0,
                   help="also drop records sharing a word N-gram with --against (0 = off)")
    from tfpretrain.data.tasks import FORMATS

    t = parsers["tasks"]
    t.add_argument("--in", dest="input", required=True, help="held-out documents")
    t.add_argument("--kind", choices=("ending", "cloze"), default="ending",
                   help="ending: choose the real last sentence (default); cloze: predict "
                   "the last word that already appeared in the document")
    t.add_argument("--from", dest="source", choices=tuple(FORMATS),
                   help="instead, convert this public benchmark's JSONL (--in) to task items, "
                   "with lm-evaluation-harness's prompts")
    t.add_argument("--count", type=int, default=500, help="items at most (default 500)")
    t.add_argument("--choices", type=int, default=4, help="ending: choices per item "
                   "(default 4)")


def _teacher_arguments(parsers: dict) -> None:
    """bootstrap, evolve and distill: a teacher and how it samples."""
    for m in ("bootstrap", "evolve", "distill"):
        q = parsers[m]
        q.add_argument("--teacher", required=True,
                       help="run folder, SavedModel folder, or http(s) completions URL")
        q.add_argument("--teacher-model", default="default",
                       help="the `model` field sent to a URL teacher")
        q.add_argument("--max-new-tokens", type=int, default=96)
        q.add_argument("--temperature", type=float, default=0.8)
        q.add_argument("--top-p", type=float, default=0.95)
    b = parsers["bootstrap"]
    b.add_argument("--seeds", required=True, help="seed texts (.jsonl/.txt/...)")
    b.add_argument("--rounds", type=int, default=3)
    b.add_argument("--per-round", type=int, default=32)
    b.add_argument("--shots", type=int, default=2, help="pool examples per prompt")
    b.add_argument("--opening-words", type=int, default=3,
                   help="words of a pool item the continuation starts from")
    b.add_argument("--separator", default="\\n\\n", help="between examples (escapes allowed)")
    b.add_argument("--min-words", type=int, default=4)
    b.add_argument("--max-words", type=int, default=150)
    b.add_argument("--max-repetition", type=float, default=0.3,
                   help="most share of repeated word 3-grams")
    b.add_argument("--min-perplexity", type=float, default=1.2)
    b.add_argument("--max-perplexity", type=float, default=1000.0)
    b.add_argument("--max-rouge", type=float, default=0.7,
                   help="most ROUGE-L F1 against any pool item (self-instruct: 0.7)")
    e = parsers["evolve"]
    e.add_argument("--in", dest="input", required=True)
    e.add_argument("--ops", help="comma-separated (default: all): constraint, deepen, "
                   "concretize, reasoning, breadth")
    e.add_argument("--rounds", type=int, default=1)
    t = parsers["distill"]
    t.add_argument("--count", type=int, required=True)
    t.add_argument("--prompts", help="prompts to continue, cycled (default: the empty "
                   "prompt, a fresh document)")
    t.add_argument("--batch-size", type=int, default=32)


def _quality(a):
    from tfpretrain.data.quality import QualityReport
    from tfpretrain.data.records import texts

    against = list(texts(a.against, "--against")) if a.against else None
    return QualityReport(against=against, overlap_ngram=a.overlap_ngram)


@cli_main
def main(argv=None) -> int:
    from tfpretrain.data.quality import describe
    from tfpretrain.data.records import RecordWriter, check_output, sidecar, texts
    from tfpretrain.files import write_atomic

    a = _parser().parse_args(argv)
    report = _quality(a)
    t0 = time.time()
    if a.mode == "report":
        for text in texts(a.input):
            report.add(text)
        result = report.result()
        print(describe(result))
        print(json.dumps({"mode": "report", "in": a.input, "report": result}))
        return 0
    out = check_output(Path(a.out), a.force)
    with RecordWriter(out) as writer:
        summary = RUNNERS[a.mode](a, writer, report)
    result = report.result()
    seconds = time.time() - t0
    full = {"mode": a.mode, "out": str(out), "records": writer.count, "seed": a.seed,
            **summary, "seconds": round(seconds, 2),
            "records_per_second": round(writer.count / max(seconds, 1e-9), 1),
            "report": result}
    write_atomic(sidecar(out, "report"), json.dumps(full, indent=1))
    print(describe(result))
    print(json.dumps(full))
    return 0


if __name__ == "__main__":
    sys.exit(main())
