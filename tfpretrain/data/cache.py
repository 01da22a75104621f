"""Token cache: the trained tokenizer and the packed rows, written once, read by later runs.

Two levels, each keyed by a SHA-256 fingerprint:
- ``<cache_dir>/<tok-key>/tokenizer/``: the tokenizer, keyed by the sources (each file's
  path, size and mtime; the embedded corpus' size; TFDS specs), everything that decides the
  documents and the train/val split (``data.*`` except packing, ``train.seed``) and the
  ``tokenizer.*`` settings;
- ``<cache_dir>/<tok-key>/rows-<rows-key>/``: train and val rows as ``.npy`` shards of at
  most ``SHARD_ROWS`` rows, train-token counts and ``meta.json``, keyed additionally by
  ``model.sequence_length``, ``model.objective`` and ``data.packing``.

Entries are written into a hidden temporary folder and renamed into place, so a killed
writer never leaves a half-written entry that a reader would trust; a reader that finds no
``meta.json`` treats the entry as missing. Changing a source file (size or mtime) changes
the key: the data is re-read and re-tokenized. Shards are memory-mapped when read.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tfpretrain.data.sources import HF_PREFIX, TFDS_PREFIX, resolve_paths

CACHE_VERSION = 1
SHARD_ROWS = 1 << 16


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tfpretrain" / "tokens"


def _sources(spec) -> list:
    if spec is None:  # the embedded corpus: keyed by its generator's code
        generator = Path(__file__).with_name("synthetic.py").read_bytes()
        return ["embedded", hashlib.sha256(generator).hexdigest()]
    out = []
    for s in resolve_paths(spec):
        if isinstance(s, str) and s.startswith((TFDS_PREFIX, HF_PREFIX)):
            out.append(s)  # keyed by name only: a changed remote dataset needs --force
        else:
            st = Path(s).stat()
            out.append([str(Path(s).resolve()), st.st_size, st.st_mtime_ns])
    return out


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def tokenizer_key(cfg) -> str:
    from tfpretrain.data.tokenizers import resolved_kind

    data = {k: v for k, v in cfg.to_dict()["data"].items()
            if k not in ("packing", "document_mask", "cache", "cache_dir")}
    tok_path = Path(cfg.tokenizer.path).expanduser() if cfg.tokenizer.path else None
    tok_files = None
    if tok_path is not None and tok_path.exists():
        tok_files = tokenizer_digest(tok_path) if tok_path.is_dir() else \
            hashlib.sha256(tok_path.read_bytes()).hexdigest()
    return _digest({"version": CACHE_VERSION, "data": data, "seed": cfg.train.seed,
                    "tokenizer_files": tok_files,
                    "sources": _sources(cfg.data.path),
                    "val_sources": _sources(cfg.data.val_path) if cfg.data.val_path else None,
                    "tokenizer": {**cfg.to_dict()["tokenizer"], "kind": resolved_kind(cfg)}})


def rows_key(cfg) -> str:
    return _digest({"tokenizer": tokenizer_key(cfg), "L": cfg.model.sequence_length,
                    "objective": cfg.model.objective, "packing": cfg.data.packing})


def tokenizer_digest(directory: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(Path(directory).iterdir()):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _write_shards(directory: Path, prefix: str, rows: np.ndarray) -> int:
    n = max(1, -(-len(rows) // SHARD_ROWS))
    for i in range(n):
        np.save(directory / f"{prefix}-{i:05d}.npy", rows[i * SHARD_ROWS:(i + 1) * SHARD_ROWS])
    return n


def _read_shards(directory: Path, prefix: str) -> np.ndarray:
    parts = [np.load(p, mmap_mode="r") for p in sorted(directory.glob(f"{prefix}-*.npy"))]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


@dataclass
class CacheEntry:
    path: Path
    tokenizer_dir: Path
    meta: dict


class TokenCache:
    """Find or write the cache entry of a config."""

    def __init__(self, cfg, root: Path | None = None):
        self.cfg = cfg
        self.root = Path(root or cfg.data.cache_dir or default_cache_dir()).expanduser()
        self.tok_dir = self.root / tokenizer_key(cfg)[:20]
        self.rows_dir = self.tok_dir / f"rows-{rows_key(cfg)[:20]}"

    def tokenizer(self):
        """The cached tokenizer, or None."""
        from tfpretrain.data.tokenizers import load_tokenizer

        if (self.tok_dir / "tokenizer" / "tokenizer.json").is_file():
            return load_tokenizer(self.tok_dir / "tokenizer")
        return None

    def load(self, tokenizer_dir: Path | None = None):
        """(tokenizer, PackedData, meta) from the cache, or None on a miss. With
        ``tokenizer_dir`` (a resumed run's own tokenizer), only rows made with a
        byte-identical tokenizer count as a hit, and that tokenizer is returned."""
        from tfpretrain.data.pipeline import PackedData

        meta_path = self.rows_dir / "meta.json"
        if not meta_path.is_file():
            return None
        meta = json.loads(meta_path.read_text())
        if tokenizer_dir is not None:
            if tokenizer_digest(tokenizer_dir) != meta.get("tokenizer_sha256"):
                return None
            from tfpretrain.data.tokenizers import load_tokenizer

            tokenizer = load_tokenizer(tokenizer_dir)
        else:
            tokenizer = self.tokenizer()
        if tokenizer is None:
            return None
        packed = PackedData(_read_shards(self.rows_dir, "train"),
                            _read_shards(self.rows_dir, "val"), meta["train_tokens"],
                            meta["val_tokens"], np.load(self.rows_dir / "counts.npy"))
        return tokenizer, packed, meta

    def save(self, tokenizer, packed, description: str, documents: tuple[int, int],
             seconds: float, train_bytes: int = 0) -> dict:
        """Write the tokenizer (if not there yet) and the rows; returns the meta."""
        self.tok_dir.mkdir(parents=True, exist_ok=True)
        if not (self.tok_dir / "tokenizer" / "tokenizer.json").is_file():
            tmp = self.tok_dir / f".tmp-tokenizer-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tokenizer.save(tmp)
            try:
                tmp.rename(self.tok_dir / "tokenizer")
            except OSError:  # another process won the race: theirs is identical
                shutil.rmtree(tmp, ignore_errors=True)
        tmp = self.tok_dir / f".tmp-{self.rows_dir.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        meta = {"version": CACHE_VERSION, "description": description,
                "train_documents": documents[0], "val_documents": documents[1],
                "train_tokens": int(packed.train_tokens), "val_tokens": int(packed.val_tokens),
                "train_bytes": int(train_bytes),
                "train_rows": int(len(packed.train_rows)), "val_rows": int(len(packed.val_rows)),
                "row_width": int(packed.train_rows.shape[1]),
                "shards": {"train": _write_shards(tmp, "train", packed.train_rows),
                           "val": _write_shards(tmp, "val", packed.val_rows)},
                "tokenizer_kind": tokenizer.kind,
                "tokenizer_sha256": tokenizer_digest(self.tok_dir / "tokenizer"),
                "sequence_length": self.cfg.model.sequence_length,
                "objective": self.cfg.model.objective, "packing": self.cfg.data.packing,
                "prepare_seconds": round(seconds, 2), "created": time.time()}
        np.save(tmp / "counts.npy", packed.unigram_counts)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if self.rows_dir.exists():
            shutil.rmtree(self.rows_dir, ignore_errors=True)
        try:
            tmp.rename(self.rows_dir)
        except OSError:  # another process published the same entry first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
        return meta


def prepare(cfg, run_tokenizer_dir: Path | None = None, log=print, force: bool = False):
    """(tokenizer, PackedData, info) for ``cfg``: from the cache when ``data.cache`` is on
    and it has the entry; otherwise read, train the tokenizer (or load the run's own),
    tokenize, pack, and write the entry. ``info``: description, documents, cache hit."""
    from tfpretrain.data.pipeline import pack_corpus
    from tfpretrain.data.sources import load_corpus
    from tfpretrain.data.tokenizers import load_tokenizer, train_from_config

    cache = TokenCache(cfg) if cfg.data.cache else None
    if cache is not None and not force:
        hit = cache.load(run_tokenizer_dir)
        if hit is not None:
            tokenizer, packed, meta = hit
            return tokenizer, packed, {"description": meta["description"],
                                       "documents": (meta["train_documents"],
                                                     meta["val_documents"]),
                                       "train_bytes": meta.get("train_bytes", 0),
                                       "cache": str(cache.rows_dir), "hit": True}
    t0 = time.time()
    corpus = load_corpus(cfg.data, cfg.train.seed)
    log(f"data: {corpus.description}; {len(corpus.train)} train / {len(corpus.val)} val "
        f"documents ({time.time() - t0:.1f}s)")
    if run_tokenizer_dir is not None:
        tokenizer = load_tokenizer(run_tokenizer_dir)
    else:
        tokenizer = (cache.tokenizer() if cache is not None else None) or \
            train_from_config(cfg, corpus.train)
    packed = pack_corpus(tokenizer, corpus.train, corpus.val, cfg.model.sequence_length,
                         cfg.model.objective, cfg.data.packing)
    info = {"description": corpus.description, "documents": (len(corpus.train), len(corpus.val)),
            "train_bytes": sum(len(d.encode("utf-8")) for d in corpus.train),
            "cache": None, "hit": False}
    if cache is not None and run_tokenizer_dir is None:
        cache.save(tokenizer, packed, corpus.description, info["documents"], time.time() - t0,
                   info["train_bytes"])
        info["cache"] = str(cache.rows_dir)
    return tokenizer, packed, info
