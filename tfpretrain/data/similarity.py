"""How alike two texts are: exact fingerprints, MinHash near-duplicate search, ROUGE-L.

- :func:`fingerprint`: a 64-bit hash of the normalized text (lower case, words only), so
  copies that differ only in case, spacing or punctuation are exact duplicates.
- :class:`MinHashIndex`: MinHash signatures over character n-gram shingles (Broder 1997), with
  locality-sensitive hashing in bands (Leskovec et al., "Mining of Massive Datasets" ch. 3)
  to find earlier documents whose estimated Jaccard similarity is at least a threshold.
  Signatures are computed with numpy for a batch of documents at once (multiply-shift
  hashing of 64-bit shingle hashes, one odd multiplier per permutation), so 100k stories
  take seconds; nothing depends on Python's hash seed. Character 5-grams (not word
  n-grams) because on the generated corpus they separate near-copies from distinct stories
  best: a story with 5% of its words swapped, replaced or misspelled keeps Jaccard >= 0.65
  with its original, while the most similar distinct story stays below 0.45
  (docs/synthetic.md).
- :func:`rouge_l`: ROUGE-L F1 over words (self-instruct's novelty filter), with the longest
  common subsequence computed bit-parallel (Hyyrö 2004) on Python integers.

We use our own ~100 lines rather than datasketch: it needs no extra dependency, computes a
batch's signatures in one numpy expression (datasketch's MinHash updates one shingle at a
time in Python) and keeps every result deterministic.
"""
from __future__ import annotations

import re
from collections import Counter

import numpy as np

_WORD = re.compile(r"[\w']+")
_MASK64 = (1 << 64) - 1


def words(text: str) -> list[str]:
    """Lower-cased words (letters, digits, apostrophes)."""
    return _WORD.findall(text.lower())


def fingerprint(text: str) -> int:
    """64-bit hash of the normalized text (exact-duplicate key)."""
    import hashlib

    norm = " ".join(words(text)).encode()
    return int.from_bytes(hashlib.blake2b(norm, digest_size=8).digest(), "little")


def char_shingles(text: str, n: int) -> np.ndarray:
    """Distinct 64-bit hashes of the character n-grams of the normalized text (lower case,
    single spaces): typos, swapped or replaced words change only the few shingles around
    them. n <= 8 packs the n bytes exactly; longer n-grams are hashed polynomially."""
    data = np.frombuffer(" ".join(text.lower().split()).encode(), np.uint8).astype(np.uint64)
    if len(data) < n:
        return np.array([int(data.sum()) + 1], np.uint64)
    m = len(data) - n + 1
    out = np.zeros(m, np.uint64)
    base = np.uint64(256 if n <= 8 else 0x100000001B3)
    with np.errstate(over="ignore"):
        for k in range(n):
            out = out * base + data[k:k + m]
    return np.unique(out)


class MinHashIndex:
    """Documents seen so far, searchable for near-duplicates.

    ``num_perm`` permutations in ``bands`` bands (``num_perm // bands`` rows each); a
    candidate sharing a band is confirmed when the fraction of equal signature values (the
    Jaccard estimate) is >= ``threshold``. Memory: ``4 * num_perm`` bytes of signature plus
    ``bands`` dictionary entries per added document.
    """

    def __init__(self, threshold: float = 0.55, ngram: int = 5, num_perm: int = 128,
                 bands: int = 32, seed: int = 1):
        if num_perm % bands:
            raise ValueError("num_perm must be a multiple of bands")
        self.threshold, self.ngram, self.bands = threshold, ngram, bands
        self.rows = num_perm // bands
        rng = np.random.default_rng(seed)
        self.mult = rng.integers(1, 2**63, num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.xor = rng.integers(0, 2**63, num_perm, dtype=np.uint64)
        self.tables: list[dict] = [dict() for _ in range(bands)]
        self.store = np.zeros((1024, num_perm), np.uint32)  # added signatures (grows x2)
        self.size = 0

    def signatures_of(self, texts: list[str]) -> np.ndarray:
        """uint32 [len(texts), num_perm] MinHash signatures."""
        sh = [char_shingles(t, self.ngram) for t in texts]
        starts = np.cumsum([0] + [len(s) for s in sh[:-1]])
        flat = np.concatenate(sh)
        out = np.empty((len(self.mult), len(texts)), np.uint32)
        shift = np.uint64(32)
        with np.errstate(over="ignore"):
            for p, (x, m) in enumerate(zip(self.xor, self.mult)):  # one permutation at a
                out[p] = np.minimum.reduceat(((flat ^ x) * m) >> shift, starts)  # time: in cache
        return out.T.copy()

    def keys_of(self, sigs: np.ndarray) -> np.ndarray:
        """uint64 [n, bands]: one hash per band of each signature (LSH bucket keys)."""
        with np.errstate(over="ignore"):
            rows = sigs.reshape(len(sigs), self.bands, self.rows).astype(np.uint64)
            weights = self.mult[:self.rows][None, None, :]
            return (rows * weights).sum(axis=2) ^ np.arange(self.bands, dtype=np.uint64)

    def query(self, sig: np.ndarray, keys=None) -> tuple[int, float]:
        """(index of the most similar added document, its Jaccard estimate), or (-1, 0.0)
        when none reaches the threshold. ``keys``: ``keys_of`` of this signature."""
        keys = self.keys_of(sig[None])[0] if keys is None else keys
        candidates = set()
        for table, key in zip(self.tables, keys.tolist()):
            candidates.update(table.get(key, ()))
        if not candidates:
            return -1, 0.0
        ids = np.fromiter(candidates, np.int64, len(candidates))
        ids.sort()
        scores = (self.store[ids] == sig).mean(axis=1)
        best = int(np.argmax(scores))
        if scores[best] < self.threshold:
            return -1, 0.0
        return int(ids[best]), float(scores[best])

    def add(self, sig: np.ndarray, keys=None) -> int:
        keys = self.keys_of(sig[None])[0] if keys is None else keys
        i = self.size
        if i == len(self.store):
            self.store = np.concatenate([self.store, np.zeros_like(self.store)])
        self.store[i] = sig
        self.size += 1
        for table, key in zip(self.tables, keys.tolist()):
            table.setdefault(key, []).append(i)
        return i

    def __len__(self) -> int:
        return self.size


def lcs_length(a: list, b: list) -> int:
    """Length of the longest common subsequence of two token lists (bit-parallel)."""
    if len(a) < len(b):
        a, b = b, a
    masks: dict = {}
    for i, t in enumerate(a):
        masks[t] = masks.get(t, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for t in b:
        u = v & masks.get(t, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - bin(v).count("1")


def rouge_l(a: list[str], b: list[str]) -> float:
    """ROUGE-L F1 of two word lists."""
    if not a or not b:
        return 0.0
    lcs = lcs_length(a, b)
    if not lcs:
        return 0.0
    p, r = lcs / len(b), lcs / len(a)
    return 2 * p * r / (p + r)


def max_rouge_l(candidate: list[str], pool: list[list[str]], stop_at: float = 1.0) -> float:
    """The highest ROUGE-L F1 of ``candidate`` against ``pool`` (stops early at
    ``stop_at``); pairs whose shared-word count already bounds F1 below the best so far
    are skipped without computing the LCS."""
    best, cw, n = 0.0, Counter(candidate), len(candidate)
    for other in pool:
        if not other:
            continue
        common = sum((cw & Counter(other)).values())
        if 2 * common / (n + len(other)) <= best:
            continue
        best = max(best, rouge_l(candidate, other))
        if best >= stop_at:
            break
    return best
