"""Token cache: the trained tokenizer and the packed rows, written once, read by later runs.

Two levels, each keyed by a SHA-256 fingerprint:
- ``<cache_dir>/<tok-key>/tokenizer/``: the tokenizer, keyed by the sources (each file's
  path, size and mtime; the embedded corpus' generator; TFDS/HF specs by name), everything
  that decides the documents and the train/val split (``data.*`` except packing,
  ``train.seed``) and the ``tokenizer.*`` settings;
- ``<cache_dir>/<tok-key>/rows-<rows-key>/``: ``train.rows`` and ``val.rows`` (int32,
  row-major, one row after the other, as numpy's ``tofile`` writes them; shapes in
  ``meta.json``), the train-token counts ``counts.npy`` and ``meta.json``, keyed
  additionally by the row format (``model.sequence_length``, ``data.packing`` and how the
  objective frames a row: see ``data.pipeline.RowFormat``).

The rows are written while the documents stream through the tokenizer, so preparing a
corpus never holds its text or its tokens in memory, and read back memory-mapped. Entries
are written into a hidden temporary folder and renamed into place, so a killed writer never
leaves a half-written entry that a reader would trust; a reader that finds no ``meta.json``
treats the entry as missing. Changing a source file (size or mtime) changes the key: the
data is re-read and re-tokenized.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from tfpretrain.data.sources import HF_PREFIX, TFDS_PREFIX, resolve_paths
from tfpretrain.errors import FREEABLE, writing
from tfpretrain.files import cache_root, sha256_file

CACHE_VERSION = 3  # 3: row format in the key, sizes and SHA-256 of every file in meta.json
ENTRY_FILES = ("train.rows", "val.rows", "counts.npy")
CACHE_FIX = (f"Nothing was kept of it. Free disk space ({FREEABLE}), or set data.cache_dir to "
             "a writable folder with room, then rerun the same command")


def default_cache_dir() -> Path:
    return cache_root() / "tokens"


def _sources(spec, key: str = "data.path") -> list:
    if spec is None:  # the embedded corpus: keyed by its generator's code
        generator = Path(__file__).with_name("synthetic.py").read_bytes()
        return ["embedded", hashlib.sha256(generator).hexdigest()]
    out = []
    for s in resolve_paths(spec, key):
        if isinstance(s, str) and s.startswith((TFDS_PREFIX, HF_PREFIX)):
            out.append(s)  # by name; the content is checked by remote_fingerprint
        else:
            st = Path(s).stat()
            out.append([str(Path(s).resolve()), st.st_size, st.st_mtime_ns])
    return out


def _remote_specs(cfg) -> list[str]:
    specs = []
    for spec, key in ((cfg.data.path, "data.path"), (cfg.data.val_path, "data.val_path")):
        if spec is not None:
            specs += [s for s in _sources(spec, key)
                      if isinstance(s, str) and s.startswith((TFDS_PREFIX, HF_PREFIX))]
    return specs


def remote_fingerprint(spec: str) -> str | None:
    """What identifies a remote dataset's content, where it can be found out now: for
    ``hf://``, the ``datasets`` builder hash (the hub revision, or a local folder's files
    and their modification times); for ``tfds://``, the builder's name/config/version.
    None when it cannot be found out (no network, say)."""
    try:
        if spec.startswith(HF_PREFIX):
            import datasets

            from tfpretrain.data.sources import hub_reachable, parse_hf

            name, config, _ = parse_hf(spec)
            if not Path(name).expanduser().is_dir() and not hub_reachable():
                return None  # offline: the entry is trusted (no minute of retries)
            return datasets.load_dataset_builder(name, config).hash
        import tensorflow_datasets as tfds

        return tfds.builder(spec[len(TFDS_PREFIX):].partition("@")[0]).info.full_name
    except Exception:  # offline, unknown name, library missing: not known now
        return None


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
                    "val_sources": (_sources(cfg.data.val_path, "data.val_path")
                                    if cfg.data.val_path else None),
                    "tokenizer": {**cfg.to_dict()["tokenizer"], "kind": resolved_kind(cfg)}})


def rows_key(cfg, fmt) -> str:
    return _digest({"tokenizer": tokenizer_key(cfg), "rows": dataclasses.asdict(fmt)})


def entry_files(directory: Path) -> dict:
    """{name: [size, sha256]} of an entry's data files (recorded in meta.json)."""
    return {name: [(Path(directory) / name).stat().st_size, sha256_file(Path(directory) / name)]
            for name in ENTRY_FILES}


def entry_problem(directory: Path, meta: dict) -> str | None:
    """Why an entry's files do not match its meta.json (truncated, overwritten, missing),
    or None: rows are never trained on unless every byte is what was written."""
    for name, (size, digest) in meta.get("files", {}).items():
        path = Path(directory) / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
        if sha256_file(path) != digest:
            return f"{name} does not match its recorded SHA-256"
    return None if "files" in meta else "meta.json records no checksums"


def tokenizer_digest(directory: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(Path(directory).iterdir()):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def read_rows(directory: Path, split: str, rows: int, width: int) -> np.ndarray:
    """The ``split`` rows of an entry, memory-mapped (nothing is read until used)."""
    if rows == 0:
        return np.zeros([0, width], np.int32)
    return np.memmap(Path(directory) / f"{split}.rows", np.int32, "r", shape=(rows, width))


class RowWriter:
    """Packs one split's token stream (arriving a batch of documents at a time) into rows
    and appends them to ``<split>.rows``."""

    def __init__(self, path: Path, packer):
        self.fh = open(path, "wb")
        self.packer = packer
        self.rows = self.tokens = 0

    def add(self, stream: np.ndarray) -> None:
        rows = self.packer.add(stream)
        self.fh.write(np.ascontiguousarray(rows, np.int32).tobytes())
        self.rows += len(rows)
        self.tokens += len(stream)

    def close(self) -> None:
        self.fh.close()


def document_batches(documents, size: int):
    """``((split, utf-8 bytes, count), documents)``: the ``(is_val, document)`` pairs
    gathered into batches of ``size`` documents per split (0 train, 1 val), in order."""
    batches, nbytes = [[], []], [0, 0]
    for is_val, doc in documents:
        v = int(is_val)
        batches[v].append(doc)
        nbytes[v] += len(doc.encode("utf-8"))
        if len(batches[v]) == size:
            yield (v, nbytes[v], size), batches[v]
            batches[v], nbytes[v] = [], 0
    for v in (0, 1):
        if batches[v]:
            yield (v, nbytes[v], len(batches[v])), batches[v]


def write_rows(directory: Path, tokenizer, documents, fmt, log=None) -> dict:
    """Tokenize ``(is_val, document)`` pairs a batch at a time and write the entry's
    ``train.rows``, ``val.rows`` and ``counts.npy`` into ``directory``; returns their
    counts (documents, tokens, rows, row width, train bytes). Memory: a few batches of
    ``TOKENIZE_BATCH`` documents, whatever the corpus size."""
    from tfpretrain.data import pipeline

    writers = [RowWriter(Path(directory) / f"{split}.rows", pipeline.RowPacker(fmt))
               for split in ("train", "val")]
    counts = np.zeros(tokenizer.vocabulary_size, np.int64)
    docs, train_bytes = [0, 0], 0
    t0 = last_log = time.time()
    try:
        batches = document_batches(documents, pipeline.TOKENIZE_BATCH)
        for (v, nbytes, n), stream in pipeline.tokenize_batches(tokenizer, batches):
            if not v:
                counts += np.bincount(stream, minlength=len(counts))
                train_bytes += nbytes
            writers[v].add(stream)
            docs[v] += n
            if log is not None and time.time() - last_log > 30:
                last_log = time.time()
                log(f"data: tokenized {writers[0].tokens:,} train tokens "
                    f"({writers[0].tokens / (last_log - t0):,.0f}/s)")
    finally:
        for w in writers:
            w.close()
    width = fmt.width
    train, val = writers
    if train.rows == 0:
        raise pipeline.too_few_rows("training", train.tokens, width)
    if val.rows == 0:
        raise pipeline.too_few_rows("validation", val.tokens, width)
    np.save(Path(directory) / "counts.npy", counts)
    return {"train_documents": docs[0], "val_documents": docs[1],
            "train_tokens": int(train.tokens), "val_tokens": int(val.tokens),
            "train_bytes": int(train_bytes), "train_rows": int(train.rows),
            "val_rows": int(val.rows), "row_width": width}


def load_rows(directory: Path, meta: dict):
    """The PackedData of an entry folder, memory-mapped."""
    from tfpretrain.data.pipeline import PackedData

    w = meta["row_width"]
    return PackedData(read_rows(directory, "train", meta["train_rows"], w),
                      read_rows(directory, "val", meta["val_rows"], w),
                      meta["train_tokens"], meta["val_tokens"],
                      np.load(Path(directory) / "counts.npy"))


def packed_rows(path) -> np.ndarray:
    """Training rows [N, width] int32 from a ``.npy`` file or a token-cache entry folder
    (its ``meta.json`` + ``train.rows``), memory-mapped; no TensorFlow needed."""
    from tfpretrain.errors import UserError

    path = Path(path)
    if path.is_dir() and (path / "meta.json").is_file():
        meta = json.loads((path / "meta.json").read_text())
        return read_rows(path, "train", meta["train_rows"], meta["row_width"])
    if path.suffix == ".npy" and path.is_file():
        rows = np.load(path, mmap_mode="r")
        if rows.ndim == 2 and np.issubdtype(rows.dtype, np.integer):
            return rows
    raise UserError(f"--rows: {path} is neither an .npy file of packed rows [rows, "
                    "sequence_length + 1] nor a token-cache entry folder (with meta.json)")


class TokenCache:
    """Find or write the cache entry of a config."""

    def __init__(self, cfg, fmt, root: Path | None = None):
        self.cfg, self.fmt = cfg, fmt
        self.root = Path(root or cfg.data.cache_dir or default_cache_dir()).expanduser()
        existing = next(p for p in (self.root, *self.root.parents) if p.exists())
        if not existing.is_dir():
            from tfpretrain.errors import UserError

            raise UserError(f"data.cache_dir: {existing} is a file, not a folder; choose "
                            "another data.cache_dir (or --cache-dir)")
        self.tok_dir = self.root / tokenizer_key(cfg)[:20]
        self.rows_dir = self.tok_dir / f"rows-{rows_key(cfg, fmt)[:20]}"
        self._fingerprints = None

    def tokenizer(self):
        """The cached tokenizer, or None."""
        from tfpretrain.data.tokenizers import load_tokenizer

        if (self.tok_dir / "tokenizer" / "tokenizer.json").is_file():
            return load_tokenizer(self.tok_dir / "tokenizer")
        return None

    def meta(self) -> dict | None:
        meta_path = self.rows_dir / "meta.json"
        if not meta_path.is_file():
            return None
        meta = json.loads(meta_path.read_text())
        return meta if meta.get("version") == CACHE_VERSION else None

    def changed_remote_sources(self) -> list[str]:
        """Remote datasets whose fingerprint, where it can be found out now, differs from
        the one recorded when the entry was written (the key holds only their names)."""
        recorded = (self.meta() or {}).get("remote_fingerprints", {})
        now = self.remote_fingerprints()
        return [s for s in recorded if now.get(s) is not None and now[s] != recorded[s]]

    def remote_fingerprints(self) -> dict:
        """The config's remote datasets and their fingerprints now (found out once)."""
        if self._fingerprints is None:
            self._fingerprints = {s: remote_fingerprint(s) for s in _remote_specs(self.cfg)}
        return self._fingerprints

    def load(self, tokenizer_dir: Path | None = None, log=print):
        """(tokenizer, PackedData, meta) from the cache, or None on a miss. The rows count
        only with the byte-identical tokenizer that made them: the cached one, or with
        ``tokenizer_dir`` (a resumed run's own tokenizer) that one, which is returned. An
        entry whose files do not match their recorded sizes and checksums is a miss (and
        is written again)."""
        from tfpretrain.data.tokenizers import load_tokenizer

        meta = self.meta()
        if meta is None:
            return None
        problem = entry_problem(self.rows_dir, meta)
        if problem is not None:
            log(f"warning: token cache entry {self.rows_dir} is damaged ({problem}); "
                "preparing it again")
            return None
        directory = Path(tokenizer_dir) if tokenizer_dir is not None else \
            self.tok_dir / "tokenizer"
        if not (directory / "tokenizer.json").is_file() or \
                tokenizer_digest(directory) != meta.get("tokenizer_sha256"):
            return None
        return load_tokenizer(directory), load_rows(self.rows_dir, meta), meta

    def new_entry(self) -> Path:
        """A fresh private folder to write an entry into (published by :meth:`publish`)."""
        self.tok_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.tok_dir / f".tmp-{self.rows_dir.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        return tmp

    def publish(self, tmp: Path, tokenizer, meta: dict, new_tokenizer: bool = False) -> dict:
        """Store the tokenizer (if not there yet, or replacing the cached one with
        ``new_tokenizer``: rows made by the old one then no longer load) and move the entry
        written into ``tmp`` into place; returns the full meta."""
        target = self.tok_dir / "tokenizer"
        if new_tokenizer or not (target / "tokenizer.json").is_file():
            tok_tmp = self.tok_dir / f".tmp-tokenizer-{os.getpid()}"
            shutil.rmtree(tok_tmp, ignore_errors=True)
            try:
                tokenizer.save(tok_tmp)
            except BaseException:
                shutil.rmtree(tok_tmp, ignore_errors=True)
                raise
            if new_tokenizer:
                shutil.rmtree(target, ignore_errors=True)
            try:
                tok_tmp.rename(target)
            except OSError:  # another process won the race: theirs is identical
                shutil.rmtree(tok_tmp, ignore_errors=True)
        meta = {"version": CACHE_VERSION, **meta, "files": entry_files(tmp),
                "tokenizer_kind": tokenizer.kind,
                "remote_fingerprints": self.remote_fingerprints(),
                "tokenizer_sha256": tokenizer_digest(self.tok_dir / "tokenizer"),
                "row_format": dataclasses.asdict(self.fmt),
                "created": time.time()}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if self.rows_dir.exists():
            shutil.rmtree(self.rows_dir, ignore_errors=True)
        try:
            tmp.rename(self.rows_dir)
        except OSError:  # another process published the same entry first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
        return meta


def prepare(cfg, fmt, run_tokenizer_dir: Path | None = None, log=print, force: bool = False):
    """(tokenizer, PackedData, info) for ``cfg``, rows made in ``fmt`` (a
    ``pipeline.RowFormat``, from the objective): from the cache when ``data.cache`` is on
    and it has the entry; otherwise stream the documents (a counting pass, the tokenizer's
    sample, then tokenize and pack), train the tokenizer (or load the run's own) and write
    the entry. ``info``: description, documents, train bytes, cache folder, hit."""
    from tfpretrain.data.sources import DocumentPlan, check_split
    from tfpretrain.data.tokenizers import load_tokenizer, train_from_config

    cache = TokenCache(cfg, fmt) if cfg.data.cache else None
    retrain = force
    if cache is not None and not force:
        changed = cache.changed_remote_sources()
        if changed:
            log(f"data: {', '.join(changed)} changed since the token cache entry was "
                "written; preparing it again")
            retrain = True
    if cache is not None and not retrain:
        hit = cache.load(run_tokenizer_dir, log)
        if hit is not None:
            tokenizer, packed, meta = hit
            return tokenizer, packed, _info(meta, cache.rows_dir, hit=True)
    t0 = time.time()
    plan = DocumentPlan(cfg.data, cfg.train.seed)
    log(f"data: {plan.description}; {sum(plan.counts):,} documents ({time.time() - t0:.1f}s)")
    if run_tokenizer_dir is not None:
        tokenizer = load_tokenizer(run_tokenizer_dir)
    else:
        tokenizer = (cache.tokenizer() if cache is not None and not retrain else None) or \
            train_from_config(cfg, plan.tokenizer_texts(cfg.tokenizer.train_bytes))
    # a resumed run's own tokenizer never goes into the cache (the cache's tokenizer is the
    # one this config trains); its rows are kept in memory instead
    keep = cache is not None and run_tokenizer_dir is None
    what = f"the token cache entry {cache.rows_dir}" if keep else "the packed rows"
    where = cache.tok_dir if keep else Path(tempfile.gettempdir())
    with writing(what, CACHE_FIX, where=where):  # a full disk: one message, nothing kept
        tmp = cache.new_entry() if keep else Path(tempfile.mkdtemp(prefix="tfpretrain-rows-"))
        try:
            meta = write_rows(tmp, tokenizer, plan.route(), fmt, log)
            check_split(meta["train_documents"], meta["val_documents"], cfg.data)
            meta.update(description=plan.description,
                        prepare_seconds=round(time.time() - t0, 2))
            if keep:
                meta = cache.publish(tmp, tokenizer, meta, new_tokenizer=retrain)
                packed = load_rows(cache.rows_dir, meta)
            else:
                mapped = load_rows(tmp, meta)  # copied into memory: tmp goes away
                packed = dataclasses.replace(mapped, train_rows=np.array(mapped.train_rows),
                                             val_rows=np.array(mapped.val_rows))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer, packed, _info(meta, cache.rows_dir if keep else None, hit=False)


def _info(meta: dict, cache_dir: Path | None, hit: bool) -> dict:
    return {"description": meta["description"],
            "documents": (meta["train_documents"], meta["val_documents"]),
            "train_bytes": meta["train_bytes"], "hit": hit,
            "cache": str(cache_dir) if cache_dir is not None else None}
