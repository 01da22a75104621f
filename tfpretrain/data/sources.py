"""Where text comes from: the embedded corpus, local files or TFDS, split into train and val.

``data.path`` is a file, a glob, a directory, ``tfds://NAME[/config][@split]`` or a list of
them. ``.txt`` files split into documents by ``data.document_separator``;
``.jsonl``/``.json`` and ``.parquet`` read ``data.text_field``; ``.gz`` variants are read
transparently. Undecodable bytes follow ``data.on_decode_error``: ``replace`` (U+FFFD per
bad byte), ``skip`` (drop the documents that contain them) or ``strict`` (stop, naming the
file and byte offset); the count is reported.
"""
from __future__ import annotations

import glob
import gzip
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

from tfpretrain.config import DataConfig
from tfpretrain.data.synthetic import generate_stories
from tfpretrain.errors import UserError

TEXT_SUFFIXES = (".txt", ".text", ".md", ".jsonl", ".json", ".parquet")
TFDS_PREFIX = "tfds://"
HF_PREFIX = "hf://"
_BAD_BYTE = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of invalid UTF-8


@dataclass
class Corpus:
    train: list[str]
    val: list[str]
    description: str

    @property
    def val_bytes(self) -> int:
        return sum(len(d.encode("utf-8")) for d in self.val)


def _base_suffix(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return os.path.splitext(name)[1]


def resolve_paths(spec) -> list[Path]:
    """Expand a path / glob / directory / list into concrete files, in a stable order."""
    specs = spec if isinstance(spec, list) else [spec]
    files: list[Path] = []
    for s in specs:
        s = os.path.expanduser(str(s))
        if s.startswith((TFDS_PREFIX, HF_PREFIX)):
            files.append(s)  # not a file: read by read_source
            continue
        if any(ch in s for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(s, recursive=True) if Path(m).is_file())
            if not matches:
                raise UserError(f"data.path: no files match {s}")
            files.extend(matches)
        elif Path(s).is_dir():
            found = sorted(p for p in Path(s).rglob("*")
                           if p.is_file() and _base_suffix(p) in TEXT_SUFFIXES)
            if not found:
                raise UserError(f"data.path: no .txt/.jsonl/.json files in directory {s}")
            files.extend(found)
        elif Path(s).is_file():
            files.append(Path(s))
        else:
            raise UserError(f"data.path: no such file: {s}")
    for f in files:
        if isinstance(f, Path) and _base_suffix(f) not in TEXT_SUFFIXES:
            raise UserError(f"data.path: unsupported file type {f.name!r}; use .txt, .jsonl, "
                            ".json (optionally .gz), .parquet or tfds://NAME")
    return files


class DecodeStats:
    """Counts undecodable bytes and the documents they cost, per ``data.on_decode_error``."""

    def __init__(self, policy: str):
        self.policy = policy
        self.bad_bytes = 0
        self.skipped_documents = 0

    def decode(self, raw: bytes, path) -> str:
        text = raw.decode("utf-8", errors="surrogateescape")
        bad = len(_BAD_BYTE.findall(text))
        if bad and self.policy == "strict":
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UserError(f"data.path: {path}: invalid UTF-8 at byte offset {exc.start} "
                                "(data.on_decode_error=strict); set `data.on_decode_error` to "
                                "`replace` or `skip` to read it anyway") from None
        self.bad_bytes += bad
        return text

    def clean(self, docs: list[str]) -> list[str]:
        """Apply the policy to documents decoded with surrogateescape."""
        if not self.bad_bytes:
            return docs
        if self.policy == "skip":
            kept = [d for d in docs if not _BAD_BYTE.search(d)]
            self.skipped_documents += len(docs) - len(kept)
            return kept
        return [_BAD_BYTE.sub("\ufffd", d) for d in docs]

    def describe(self) -> str:
        if not self.bad_bytes:
            return ""
        what = {"replace": "replaced with U+FFFD",
                "skip": f"skipped {self.skipped_documents} document(s)"}[self.policy]
        return f"; {self.bad_bytes} undecodable byte(s): {what}"


def _read_text(path: Path, stats: DecodeStats) -> str:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise UserError(f"data.path: cannot read {path}: {exc}") from None
    return stats.decode(raw, path)


def split_documents(text: str, separator: str) -> list[str]:
    if separator == "line":
        docs = text.split("\n")
    elif separator == "blank_line":
        docs, cur = [], []
        for line in text.split("\n"):
            if line.strip():
                cur.append(line)
            elif cur:
                docs.append("\n".join(cur))
                cur = []
        if cur:
            docs.append("\n".join(cur))
    elif separator == "none":
        docs = [text]
    else:
        docs = text.split(separator)
    return [d.strip("\n") for d in docs if d.strip()]


def _read_json_records(path: Path, field: str, stats: DecodeStats) -> list[str]:
    text = _read_text(path, stats)
    docs = []
    if _base_suffix(path) == ".jsonl":
        records = []
        for lineno, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                records.append((lineno, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise UserError(f"data.path: {path}:{lineno}: malformed JSON line "
                                f"({exc.msg})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"data.path: {path}: malformed JSON ({exc.msg} at line "
                            f"{exc.lineno})") from None
        if isinstance(data, dict):
            data = [data]
        records = list(enumerate(data, 1))
    for where, rec in records:
        if isinstance(rec, str):
            docs.append(rec)
            continue
        if not isinstance(rec, dict) or field not in rec:
            keys = ", ".join(rec) if isinstance(rec, dict) else type(rec).__name__
            raise UserError(f"data.path: {path} record {where} has no field {field!r} "
                            f"(fields: {keys}); set `data.text_field`")
        if isinstance(rec[field], str) and rec[field].strip():
            docs.append(rec[field])
    return docs


def _read_parquet(path: Path, field: str) -> list[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a broken file
        raise UserError(f"data.path: cannot read parquet file {path}: {exc}") from None
    columns = pf.schema_arrow.names
    if field not in columns:
        raise UserError(f"data.path: {path} has no column {field!r} (columns: "
                        f"{', '.join(columns)}); set `data.text_field`")
    docs = []
    for batch in pf.iter_batches(columns=[field], batch_size=8192):  # bounded memory
        docs.extend(t for t in batch.column(0).to_pylist() if isinstance(t, str) and t.strip())
    return docs


def _read_tfds(spec: str, field: str) -> list[str]:
    """``tfds://NAME[/config][@split]``: every example's text feature."""
    import tensorflow_datasets as tfds

    name, _, split = spec[len(TFDS_PREFIX):].partition("@")
    try:
        ds = tfds.load(name, split=split or "train", shuffle_files=False)
    except Exception as exc:  # not downloaded, unknown name, no network
        raise UserError(f"data.path: cannot load {spec}: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    if field not in ds.element_spec:
        raise UserError(f"data.path: {spec} has no feature {field!r} (features: "
                        f"{', '.join(ds.element_spec)}); set `data.text_field`")
    return [ex[field].decode("utf-8", errors="replace") for ex in tfds.as_numpy(ds)]


def parse_hf(spec: str) -> tuple[str, str | None, str]:
    """``hf://OWNER/NAME[:config][@split]`` -> (name, config, split); NAME may also be a
    local folder of data files (what the tests use)."""
    rest = spec[len(HF_PREFIX):]
    rest, _, split = rest.partition("@")
    name, _, config = rest.partition(":")
    return name, config or None, split or "train"


def _read_hf(spec: str, field: str) -> list[str]:
    """Hugging Face ``datasets``, streamed (nothing is materialized beyond the texts), never
    with remote code."""
    try:
        import datasets
    except ImportError:
        raise UserError(f"data.path: {spec} needs the `datasets` library: "
                        "pip install 'tfpretrain[hf]'") from None
    name, config, split = parse_hf(spec)
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
        first = next(iter(ds), None)
    except Exception as exc:  # unknown name, no network, bad split
        msg = str(exc).splitlines()[0] if str(exc) else ""
        raise UserError(f"data.path: cannot load {spec}: {type(exc).__name__}: {msg}") from None
    if first is None:
        return []
    if field not in first:
        raise UserError(f"data.path: {spec} has no column {field!r} (columns: "
                        f"{', '.join(first)}); set `data.text_field`")
    return [ex[field] for ex in ds if isinstance(ex[field], str)]


def read_source(spec, cfg: DataConfig, stats: DecodeStats) -> list[str]:
    """The documents of one resolved source (a file path, a tfds:// or an hf:// spec)."""
    if isinstance(spec, str) and spec.startswith(TFDS_PREFIX):
        return [d for d in _read_tfds(spec, cfg.text_field) if d.strip()]
    if isinstance(spec, str) and spec.startswith(HF_PREFIX):
        return [d for d in _read_hf(spec, cfg.text_field) if d.strip()]
    suffix = _base_suffix(spec)
    if suffix == ".parquet":
        return _read_parquet(spec, cfg.text_field)
    if suffix in (".jsonl", ".json"):
        return stats.clean(_read_json_records(spec, cfg.text_field, stats))
    return stats.clean(split_documents(_read_text(spec, stats), cfg.document_separator))


def read_documents(cfg: DataConfig, seed: int, path=None) -> tuple[list[str], str]:
    """All documents of ``path`` (default ``cfg.path``), and a one-line description."""
    path = cfg.path if path is None else path
    if path is None:
        docs = generate_stories(cfg.embedded_documents, seed)
        return docs, f"embedded synthetic stories ({len(docs)} documents, seed {seed})"
    sources = resolve_paths(path)
    stats = DecodeStats(cfg.on_decode_error)
    docs: list[str] = []
    for src in sources:
        docs.extend(read_source(src, cfg, stats))
    names = ", ".join(str(f) for f in sources[:3]) + (" ..." if len(sources) > 3 else "")
    return docs, f"{len(sources)} source(s): {names}{stats.describe()}"


def _read_weighted(cfg: DataConfig, seed: int) -> tuple[list[str], list[int], str]:
    """Documents of each ``data.path`` entry and the entry each came from."""
    docs, origin, descs = [], [], []
    for i, entry in enumerate(cfg.path):
        part, desc = read_documents(cfg, seed, entry)
        part = [d for d in part if d.strip()]
        if not part:
            raise UserError(f"data.path: entry {i} ({entry}) has no text; every weighted "
                            "source must have documents")
        docs.extend(part)
        origin.extend([i] * len(part))
        descs.append(desc)
    return docs, origin, "; ".join(descs)


def mix(train: list[str], origin: list[int], weights: list[float], seed: int) -> tuple[
        list[str], str]:
    """Resample training documents so that source i holds weights[i] / sum(weights) of the
    training bytes (the total stays the same): whole copies plus a seeded random subset."""
    rng = random.Random(seed + 7919)
    sizes = [0] * len(weights)
    by_source: list[list[str]] = [[] for _ in weights]
    for d, o in zip(train, origin):
        by_source[o].append(d)
        sizes[o] += len(d.encode("utf-8"))
    total, wsum = sum(sizes), sum(weights)
    out, parts = [], []
    for i, docs in enumerate(by_source):
        if not docs:
            raise UserError(f"data.weights: source {i} has no training documents left after "
                            "the validation split")
        factor = weights[i] / wsum * total / max(1, sizes[i])
        whole, frac = int(factor), factor - int(factor)
        picked = docs * whole + rng.sample(docs, round(frac * len(docs)))
        out.extend(picked)
        parts.append(f"source {i} x{factor:.2f}")
    rng.shuffle(out)
    return out, "mixed " + ", ".join(parts)


def load_corpus(cfg: DataConfig, seed: int) -> Corpus:
    origin = None
    if cfg.weights:
        docs, origin, desc = _read_weighted(cfg, seed)
    else:
        docs, desc = read_documents(cfg, seed)
    if origin is None:
        docs = [d for d in docs if d.strip()]
    where = desc if cfg.path is not None else "the embedded corpus"
    if not docs:
        raise UserError(f"data.path: the corpus is empty (no non-whitespace text in {where})")
    if cfg.val_path is not None:
        val, val_desc = read_documents(cfg, seed, cfg.val_path)
        val = [d for d in val if d.strip()]
        if not val:
            raise UserError(f"data.val_path: no text in {val_desc}")
        return Corpus(train=docs, val=val, description=f"{desc}; validation: {val_desc}")
    if cfg.split == "tail":
        train, val = _split_tail(docs, cfg.val_fraction)
    else:
        if len(docs) < 2:
            raise UserError(f"data.split=documents needs at least 2 documents; {where} has 1. "
                            "Use `data.split: tail` or a different `data.document_separator`.")
        order = list(range(len(docs)))
        random.Random(seed).shuffle(order)
        n_val = min(len(docs) - 1, max(1, round(cfg.val_fraction * len(docs))))
        val_idx = set(order[:n_val])
        train = [d for i, d in enumerate(docs) if i not in val_idx]
        val = [d for i, d in enumerate(docs) if i in val_idx]
        if origin is not None:
            train, how = mix(train, [o for i, o in enumerate(origin) if i not in val_idx],
                             cfg.weights, seed)
            desc = f"{desc}; {how}"
    return Corpus(train=train, val=val, description=desc)


def _split_tail(docs: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """The last ``fraction`` of the characters is validation (nanoGPT's split)."""
    total = sum(len(d) for d in docs)
    cut = int(total * (1.0 - fraction))
    train, val, pos = [], [], 0
    for d in docs:
        if pos + len(d) <= cut:
            train.append(d)
        elif pos >= cut:
            val.append(d)
        else:
            k = cut - pos
            if d[:k].strip():
                train.append(d[:k])
            if d[k:].strip():
                val.append(d[k:])
        pos += len(d)
    if not train or not val:
        raise UserError("data.split=tail: the corpus is too small to hold out "
                        f"{fraction:.0%} for validation")
    return train, val
