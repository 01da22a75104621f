"""Exact and near-duplicate removal, and decontamination against an eval set, streaming.

A record is dropped when (in this order):
1. ``contaminated``: it is an exact or near duplicate (MinHash Jaccard >= threshold) of an
   eval document, or, with ``contamination_ngram`` N > 0, shares a word N-gram with one;
2. ``exact``: its normalized text (``similarity.fingerprint``) was kept before;
3. ``near``: its Jaccard estimate with a kept record is >= threshold.
The first occurrence is kept, so the result does not depend on anything but input order.
Memory grows with the kept records: 8 bytes of fingerprint, 512 bytes of signature and
32 band-table entries each. Shingles are character 5-grams (``similarity.char_shingles``).
"""
from __future__ import annotations

from collections import Counter
from typing import Iterable, Iterator

from tfpretrain.data.similarity import MinHashIndex, fingerprint, words

BATCH = 2048


class Deduplicator:
    def __init__(self, threshold: float = 0.55, ngram: int = 5, against: Iterable[str] = (),
                 contamination_ngram: int = 0):
        self.index = MinHashIndex(threshold=threshold, ngram=ngram)
        self.eval_index = MinHashIndex(threshold=threshold, ngram=ngram)
        self.seen: set[int] = set()
        self.eval_prints: set[int] = set()
        self.eval_grams: set = set()
        self.n = contamination_ngram
        self.removed = Counter()
        self.kept = 0
        against = list(against)
        for start in range(0, len(against), BATCH):
            sigs = self.eval_index.signatures_of(against[start:start + BATCH])
            for sig, keys in zip(sigs, self.eval_index.keys_of(sigs)):
                self.eval_index.add(sig, keys)
        for text in against:
            self.eval_prints.add(fingerprint(text))
            if self.n:
                ws = words(text)
                self.eval_grams.update(zip(*(ws[i:] for i in range(self.n))))

    def filter(self, records: Iterable[dict]) -> Iterator[dict]:
        """The records to keep, in order; ``removed`` counts the others by reason."""
        batch: list[dict] = []
        for rec in records:
            batch.append(rec)
            if len(batch) == BATCH:
                yield from self._batch(batch)
                batch = []
        if batch:
            yield from self._batch(batch)

    def _batch(self, batch: list[dict]) -> Iterator[dict]:
        sigs = self.index.signatures_of([r["text"] for r in batch])
        for rec, sig, keys in zip(batch, sigs, self.index.keys_of(sigs)):
            reason = self._reason(rec["text"], sig, keys)
            if reason:
                self.removed[reason] += 1
                continue
            self.index.add(sig, keys)
            self.kept += 1
            yield rec

    def _reason(self, text: str, sig, keys) -> str | None:
        fp = fingerprint(text)
        if self.eval_prints and (fp in self.eval_prints
                                 or self.eval_index.query(sig, keys)[0] >= 0
                                 or self._shares_ngram(text)):
            return "contaminated"
        if fp in self.seen:
            return "exact"
        self.seen.add(fp)
        if self.index.query(sig, keys)[0] >= 0:
            return "near"
        return None

    def _shares_ngram(self, text: str) -> bool:
        if not self.n:
            return False
        ws = words(text)
        return any(g in self.eval_grams for g in zip(*(ws[i:] for i in range(self.n))))

    def summary(self) -> dict:
        total = self.kept + sum(self.removed.values())
        return {"input": total, "kept": self.kept, "removed_exact": self.removed["exact"],
                "removed_near": self.removed["near"],
                "removed_contaminated": self.removed["contaminated"]}
