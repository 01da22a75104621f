"""The quality report every ``synth`` mode ends with (and ``synth report`` prints for any
file): how many texts, how long, how varied, how duplicated, how close to an eval set.

Streaming, in bounded memory: counts, lengths and exact-duplicate fingerprints cover every
record (8 bytes of fingerprint and 4 of length per record); vocabulary, distinct-n and the
near-duplicate rate are measured on a deterministic reservoir sample of at most
``sample_size`` records (reported as ``sample``), since their exact values need every
n-gram of the corpus in memory. ``--against EVAL``: the share of eval documents that share
at least one word ``ngram``-gram with the corpus, and of corpus documents that share one
with the eval set (GPT-3's contamination measure, 13-grams; short stories use 8).
"""
from __future__ import annotations

import random
from array import array

import numpy as np

from tfpretrain.data.similarity import MinHashIndex, fingerprint, words


def _ngrams(ws: list[str], n: int):
    return zip(*(ws[i:] for i in range(n)))


class QualityReport:
    """Feed texts with :meth:`add`; :meth:`result` is the report as a dict."""

    def __init__(self, sample_size: int = 20_000, against=None, overlap_ngram: int = 8,
                 near_threshold: float = 0.55, seed: int = 0):
        self.lengths = array("I")
        self.seen: set[int] = set()
        self.exact = 0
        self.sample: list[str] = []
        self.sample_size, self.rng = sample_size, random.Random(seed)
        self.near_threshold = near_threshold
        self.overlap_ngram = overlap_ngram
        self.eval_grams: dict = {}
        self.eval_docs = 0
        for text in against or ():
            for g in _ngrams(words(text), overlap_ngram):
                self.eval_grams.setdefault(g, set()).add(self.eval_docs)
            self.eval_docs += 1
        self.eval_hit: set[int] = set()
        self.contaminated = 0
        self.against = against is not None

    def add(self, text: str) -> None:
        ws = words(text)
        n = len(self.lengths)
        self.lengths.append(len(ws))
        fp = fingerprint(text)
        if fp in self.seen:
            self.exact += 1
        else:
            self.seen.add(fp)
        if len(self.sample) < self.sample_size:
            self.sample.append(text)
        else:  # reservoir sampling (Vitter's algorithm R)
            j = self.rng.randrange(n + 1)
            if j < self.sample_size:
                self.sample[j] = text
        if self.eval_grams:
            hits = set()
            for g in _ngrams(ws, self.overlap_ngram):
                hits |= self.eval_grams.get(g, set())
            self.eval_hit |= hits
            self.contaminated += bool(hits)

    def result(self) -> dict:
        n = len(self.lengths)
        lengths = np.frombuffer(self.lengths, dtype=np.uint32) if n else np.zeros(1)
        out = {"count": n, "mean_words": round(float(lengths.mean()), 2),
               "p95_words": float(np.percentile(lengths, 95)),
               "exact_duplicate_rate": round(self.exact / max(n, 1), 6),
               "sample": len(self.sample), **self._sample_stats()}
        if self.against:
            out.update({
                "overlap_ngram": self.overlap_ngram,
                "eval_documents_overlapping": round(
                    len(self.eval_hit) / max(self.eval_docs, 1), 6),
                "documents_overlapping_eval": round(self.contaminated / max(n, 1), 6)})
        return out

    def _sample_stats(self) -> dict:
        tokenized = [words(t) for t in self.sample]
        vocab = {w for ws in tokenized for w in ws}
        out = {"vocabulary_size": len(vocab)}
        for k in (1, 2, 3):
            grams = [g for ws in tokenized for g in _ngrams(ws, k)]
            out[f"distinct_{k}"] = round(len(set(grams)) / max(len(grams), 1), 6)
        out["near_duplicate_rate"] = round(near_duplicate_rate(
            self.sample, self.near_threshold), 6)
        return out


def near_duplicate_rate(texts: list[str], threshold: float) -> float:
    """Share of texts whose MinHash Jaccard estimate with an earlier one is >= threshold."""
    index, dups = MinHashIndex(threshold=threshold), 0
    for start in range(0, len(texts), 4096):
        sigs = index.signatures_of(texts[start:start + 4096])
        for sig, keys in zip(sigs, index.keys_of(sigs)):
            if index.query(sig, keys)[0] >= 0:
                dups += 1
            else:
                index.add(sig, keys)
    return dups / max(len(texts), 1)


def describe(report: dict) -> str:
    """The report as a few human lines."""
    r = report
    lines = [f"records {r['count']:,}; words mean {r['mean_words']} / p95 {r['p95_words']:.0f}; "
             f"exact duplicates {100 * r['exact_duplicate_rate']:.2f}%",
             f"on a sample of {r['sample']:,}: vocabulary {r['vocabulary_size']:,}; "
             f"distinct-1/2/3 {r['distinct_1']:.4f} / {r['distinct_2']:.4f} / "
             f"{r['distinct_3']:.4f}; near duplicates {100 * r['near_duplicate_rate']:.2f}%"]
    if "overlap_ngram" in r:
        lines.append(f"against the eval set ({r['overlap_ngram']}-grams): "
                     f"{100 * r['eval_documents_overlapping']:.2f}% of eval documents and "
                     f"{100 * r['documents_overlapping_eval']:.2f}% of these share one")
    return "\n".join(lines)
