"""The filters a generated text must pass (self-instruct's, for any text): length bounds,
a repetition ceiling, a band of teacher perplexity and novelty against the pool (ROUGE-L).
Each filter counts what it removed, so a report can say which one did the work."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from tfpretrain.data.similarity import max_rouge_l, words

FILTERS = ("length", "repetition", "perplexity", "similarity")


def repetition_ratio(ws: list[str], n: int = 3) -> float:
    """Share of the word n-grams that repeat an earlier n-gram of the same text."""
    grams = list(zip(*(ws[i:] for i in range(n))))
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


@dataclass
class Filters:
    min_words: int = 4
    max_words: int = 150
    max_repetition: float = 0.3
    min_perplexity: float = 1.2
    max_perplexity: float = 1000.0
    max_rouge: float = 0.7
    removed: Counter = field(default_factory=Counter)

    def apply(self, texts: list[str], pool: list[list[str]], teacher) -> list[int]:
        """Indices of ``texts`` that pass every filter; the pool (word lists) grows with
        each survivor, so two near-copies in one batch do not both pass."""
        cheap = {}  # index -> words, for the texts that pass length and repetition
        for i, t in enumerate(texts):
            ws = words(t)
            if not self.min_words <= len(ws) <= self.max_words:
                self.removed["length"] += 1
            elif repetition_ratio(ws) > self.max_repetition:
                self.removed["repetition"] += 1
            else:
                cheap[i] = ws
        ppl = teacher.perplexity([texts[i] for i in cheap]) if cheap else []
        kept = []
        for j, (i, ws) in enumerate(cheap.items()):
            if ppl is not None and not self.min_perplexity <= ppl[j] <= self.max_perplexity:
                self.removed["perplexity"] += 1
                continue
            if max_rouge_l(ws, pool, stop_at=self.max_rouge + 1e-9) > self.max_rouge:
                self.removed["similarity"] += 1
                continue
            pool.append(ws)
            kept.append(i)
        return kept

    def counts(self) -> dict:
        return {f: self.removed[f] for f in FILTERS}
