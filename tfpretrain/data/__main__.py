"""Prepare a config's data ahead of training: read, train the tokenizer, tokenize, pack and
write the token cache that ``fit`` (and its resumes) then read.

    python -m tfpretrain.data [--config FILE] [--set KEY=VALUE ...] [--cache-dir DIR] [--force]

The "prepare once on a CPU box, train on the GPU box" workflow: run this where the text is,
copy the cache folder it prints (or point ``data.cache_dir`` at shared storage), and fit
with the same config. Prints documents, tokens, bytes per token, vocabulary coverage (the
share of the vocabulary that occurs in the training tokens) and time, then one JSON line.
The documents stream through (see :mod:`tfpretrain.data.sources`): a corpus larger than
memory is prepared in bounded memory.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from tfpretrain.errors import cli_main, quiet_tensorflow


def peak_rss_mb() -> int | None:
    """This process' peak resident memory (VmHWM: unlike ru_maxrss, not inherited from the
    parent that forked it), in MB; None where /proc is not there."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024)
    except OSError:
        pass
    return None


@cli_main
def main(argv=None) -> int:
    quiet_tensorflow()
    p = argparse.ArgumentParser(prog="python -m tfpretrain.data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (default: the packaged default.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set data.path=corpus.txt")
    p.add_argument("--cache-dir", help="token cache folder (overrides data.cache_dir)")
    p.add_argument("--force", action="store_true",
                   help="rebuild the entry, tokenizer included, even if the cache has it")
    a = p.parse_args(argv)
    from tfpretrain.config import load_config

    overrides = list(a.set) + ["data.cache=true"]
    if a.cache_dir:
        overrides.append(f"data.cache_dir={a.cache_dir}")
    from tfpretrain.training import distill, warm_start

    # the tokenizer fit will take (model.init_from's, distill.teacher's): the same entry
    cfg = distill.resolve(warm_start.resolve(load_config(a.config, overrides)))

    import keras
    import numpy as np

    from tfpretrain.data.cache import prepare
    from tfpretrain.data.tokenizers import NUM_SPECIAL
    from tfpretrain.objectives import row_format

    keras.utils.set_random_seed(cfg.train.seed)  # before any tokenizer exists (see fit)
    t0 = time.time()
    tokenizer, packed, info = prepare(cfg, row_format(cfg), force=a.force,
                                      log=lambda m: print(f"[tfpretrain] {m}", flush=True))
    seconds = time.time() - t0
    counts = np.asarray(packed.unigram_counts)
    coverage = float((counts[NUM_SPECIAL:] > 0).mean()) if len(counts) > NUM_SPECIAL else 0.0
    out = {"cache": info["cache"], "cache_hit": info["hit"], "description": info["description"],
           "train_documents": info["documents"][0], "val_documents": info["documents"][1],
           "train_tokens": int(packed.train_tokens), "val_tokens": int(packed.val_tokens),
           "train_rows": int(len(packed.train_rows)), "val_rows": int(len(packed.val_rows)),
           "train_bytes": int(info["train_bytes"]),
           "bytes_per_token": round(info["train_bytes"] / max(1, packed.train_tokens), 3),
           "tokenizer": tokenizer.kind, "vocabulary_size": tokenizer.vocabulary_size,
           "vocabulary_coverage": round(coverage, 4), "seconds": round(seconds, 2),
           "peak_rss_mb": peak_rss_mb()}
    print(f"[tfpretrain] {'cache hit' if info['hit'] else 'prepared'}: {out['train_documents']:,}"
          f" train / {out['val_documents']:,} val documents, {out['train_tokens']:,} train "
          f"tokens ({out['bytes_per_token']} bytes/token), {tokenizer.kind} vocabulary "
          f"{tokenizer.vocabulary_size} ({coverage:.1%} used), {seconds:.1f}s -> {info['cache']}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
