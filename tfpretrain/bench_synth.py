"""``python -m tfpretrain.bench synth``: the synthetic-data targets, measured.

- generation: stories/s of the generator alone on one core (``--count`` stories, default
  100k, the default spec and a featured level-3 spec), and the share of distinct stories;
- dedup: ``--planted`` near-duplicates (default 1% of the corpus, at least 100) made from
  random stories by one augmentation op each (synonym / swap / delete at 5% of the words,
  char_noise at 5% of the letters) are shuffled into a ``--dedup-count`` corpus; the
  table gives the share of planted copies removed and of distinct stories removed (false
  positives), and the dedup rate.
"""
from __future__ import annotations

import random
import time

from tfpretrain.data.augment import augment
from tfpretrain.data.dedup import Deduplicator
from tfpretrain.data.synthetic import StorySpec, iter_stories


def generation(count: int, spec: StorySpec, seed: int = 1337) -> dict:
    t0 = time.process_time()
    texts = [t for t, _ in iter_stories(count, seed, spec)]
    seconds = time.process_time() - t0
    return {"spec": spec.params(), "stories": count,
            "stories_per_second": round(count / max(seconds, 1e-9), 1),
            "distinct": round(len(set(texts)) / count, 6),
            "mean_words": round(sum(len(t.split()) for t in texts) / count, 1)}


def planted_dedup(count: int, planted: int, seed: int = 5) -> dict:
    rng = random.Random(seed)
    stories = [t for t, _ in iter_stories(count, seed)]
    records = [{"id": i, "text": t, "copy_of": None} for i, t in enumerate(stories)]
    for k, i in enumerate(rng.sample(range(count), planted)):
        op = rng.choice(["synonym", "swap", "delete", "char_noise"])
        records.append({"id": count + k, "text": augment(stories[i], op, 0.05, rng),
                        "copy_of": i, "op": op})
    rng.shuffle(records)
    d = Deduplicator()
    t0 = time.process_time()
    kept = {r["id"] for r in d.filter(records)}
    seconds = time.process_time() - t0
    copies = [r for r in records if r["copy_of"] is not None]
    found = sum(1 for r in copies if not (r["id"] in kept and r["copy_of"] in kept))
    originals_of_copies = {r["copy_of"] for r in copies}
    distinct = [i for i in range(count) if i not in originals_of_copies]
    false_pos = sum(1 for i in distinct if i not in kept)
    return {"records": len(records), "planted": planted,
            "planted_found": round(found / planted, 6),
            "false_positive_rate": round(false_pos / len(distinct), 6),
            "records_per_second": round(len(records) / max(seconds, 1e-9), 1),
            **d.summary()}


def bench_synth(count: int = 100_000, dedup_count: int = 20_000, planted: int = 0) -> dict:
    planted = planted or max(100, dedup_count // 100)
    featured = StorySpec(level=3, features=("dialogue", "moral", "twist"), required_words=True)
    return {"generation_default": generation(count, StorySpec()),
            "generation_featured": generation(count, featured),
            "dedup": planted_dedup(dedup_count, planted)}
