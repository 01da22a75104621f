"""Self-instruct-style bootstrapping (Wang et al. 2022; Stanford Alpaca): grow a pool of
texts from a few seeds with a teacher, round by round.

Each round makes ``per_round`` few-shot prompts: ``shots`` examples from the pool (once
the pool holds generated items, one of them is generated and the rest are seeds, as
self-instruct mixed 6 human-written and 2 machine-written tasks), joined by ``separator``,
then the first ``opening_words`` words of another pool item for the teacher to continue.
The continuations pass :class:`~tfpretrain.synthesis.filters.Filters` (length, repetition,
teacher-perplexity band, ROUGE-L against the whole pool) and the survivors join the pool.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass

from tfpretrain.data.similarity import words
from tfpretrain.synthesis.filters import Filters


@dataclass
class Sampling:
    max_new_tokens: int = 96
    temperature: float = 0.8
    top_p: float = 0.95


def _prompt(rng: random.Random, seeds: list[dict], made: list[dict], shots: int,
            opening_words: int, separator: str) -> tuple[str, str, dict]:
    """(prompt, opening, the item the opening came from)."""
    if made and shots > 1:
        examples = rng.sample(seeds, min(shots - 1, len(seeds))) + [rng.choice(made)]
    else:
        examples = rng.sample(seeds, min(shots, len(seeds)))
    rng.shuffle(examples)
    source = rng.choice(seeds + made)
    opening = " ".join(source["text"].split()[:opening_words])
    prompt = separator.join(e["text"] for e in examples) + separator + opening
    return prompt, opening, source


def bootstrap(teacher, seeds: list[dict], writer, make_record, rounds: int, per_round: int,
              seed: int, filters: Filters, sampling: Sampling, shots: int = 2,
              opening_words: int = 3, separator: str = "\n\n", log=print) -> list[dict]:
    """Run the rounds, writing every survivor through ``writer``; per-round statistics."""
    rng = random.Random(f"tfpretrain-bootstrap-{seed}")
    pool = [words(r["text"]) for r in seeds]
    made: list[dict] = []
    stats = []
    stop = [separator] if separator.strip(" ") else []  # a space joins: no stop string
    for r in range(1, rounds + 1):
        t0, before = time.time(), filters.counts()
        planned = [_prompt(rng, seeds, made, shots, opening_words, separator)
                   for _ in range(per_round)]
        outs = teacher.complete([p for p, _, _ in planned], sampling.max_new_tokens,
                                sampling.temperature, sampling.top_p,
                                seed=seed * 1000 + r, stop=stop)
        texts = [f"{o} {c}".strip() for (_, o, _), c in zip(planned, outs)]
        kept = filters.apply(texts, pool, teacher)
        for i in kept:
            rec = make_record(texts[i], parent=planned[i][2]["id"], round=r)
            writer.write(rec)
            made.append(rec)
        after = filters.counts()
        row = {"round": r, "generated": len(texts), "kept": len(kept),
               **{f"removed_{k}": after[k] - before[k] for k in after},
               "pool": len(pool), "seconds": round(time.time() - t0, 2)}
        stats.append(row)
        log(f"round {r}/{rounds}: {row['generated']} generated, " + ", ".join(
            f"{k} -{after[k] - before[k]}" for k in after) + f", kept {row['kept']}; "
            f"pool {row['pool']} ({row['seconds']:.1f}s)")
    return stats
