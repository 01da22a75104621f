"""Where text comes from: the embedded corpus or local files, split into train and val.

``data.path`` is a file, a glob, a directory or a list of them. ``.txt`` files split into
documents by ``data.document_separator``; ``.jsonl``/``.json`` read ``data.text_field``;
``.gz`` variants are read transparently. Undecodable bytes are replaced (U+FFFD).
"""
from __future__ import annotations

import glob
import gzip
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from tfpretrain.config import DataConfig
from tfpretrain.data.synthetic import generate_stories
from tfpretrain.errors import UserError

TEXT_SUFFIXES = (".txt", ".text", ".md", ".jsonl", ".json")


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
        if _base_suffix(f) not in TEXT_SUFFIXES:
            raise UserError(f"data.path: unsupported file type {f.name!r}; use .txt, .jsonl "
                            "or .json (optionally .gz)")
    return files


def _read_text(path: Path) -> str:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise UserError(f"data.path: cannot read {path}: {exc}") from None
    return raw.decode("utf-8", errors="replace")


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


def _read_json_records(path: Path, field: str) -> list[str]:
    text = _read_text(path)
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


def read_documents(cfg: DataConfig, seed: int) -> tuple[list[str], str]:
    """All documents of the configured source, and a one-line description."""
    if cfg.path is None:
        docs = generate_stories(cfg.embedded_documents, seed)
        return docs, f"embedded synthetic stories ({len(docs)} documents, seed {seed})"
    files = resolve_paths(cfg.path)
    docs: list[str] = []
    for f in files:
        if _base_suffix(f) in (".jsonl", ".json"):
            docs.extend(_read_json_records(f, cfg.text_field))
        else:
            docs.extend(split_documents(_read_text(f), cfg.document_separator))
    names = ", ".join(str(f) for f in files[:3]) + (" ..." if len(files) > 3 else "")
    return docs, f"{len(files)} file(s): {names}"


def load_corpus(cfg: DataConfig, seed: int) -> Corpus:
    docs, desc = read_documents(cfg, seed)
    docs = [d for d in docs if d.strip()]
    where = desc if cfg.path is not None else "the embedded corpus"
    if not docs:
        raise UserError(f"data.path: the corpus is empty (no non-whitespace text in {where})")
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
