"""Synthetic-data records: JSONL in and out, with provenance.

Every record ``synth`` writes is one JSON line that ``data.path`` reads directly (its
``text`` field is ``data.text_field``'s default)::

    {"id": "stories-1337-0000042", "text": "...", "mode": "stories", "seed": 1337,
     "params": {...}, "teacher": null, "parent": null}

``parent`` is the id of the record it was made from (augment, evolve, a bootstrap prompt's
example); ``teacher`` names the model that wrote it. :class:`RecordWriter` streams to a
hidden temporary sibling and renames it into place when the run completes, so a reader
never sees half a file and an interrupted run leaves the old file as it was; an existing
output is only replaced with ``--force``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

from tfpretrain.errors import UserError, writing
from tfpretrain.files import fsync_dir

# a refused write of an output: what to do (the earlier file is untouched until the rename)
OUTPUT_HINT = ("Free disk space or choose another output path, then rerun the same command; "
               "an earlier file at that path is unchanged")


def check_output(path: Path, force: bool, flag: str = "--out") -> Path:
    """``path`` may be written: its folder can be made, and it exists only with ``force``."""
    path = Path(path)
    if path.suffix != ".jsonl":
        raise UserError(f"{flag}: {path} must end in .jsonl (one JSON record per line, which "
                        "`data.path` reads)")
    if path.exists() and not force:
        raise UserError(f"{flag}: {path} exists; pass --force to replace it, or choose "
                        "another path")
    if path.is_dir():
        raise UserError(f"{flag}: {path} is a folder; pass a .jsonl file path")
    return path


def sidecar(path: Path, what: str) -> Path:
    """A file beside an output: ``out.jsonl`` -> ``out.<what>.json``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.{what}.json")


class RecordWriter:
    """Streams records to ``path`` through a temporary sibling; ``commit()`` renames it into
    place (a ``with`` block commits on success and removes the partial file on error). A
    refused write (a full disk) is one message naming ``path``, exit 74."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.partial")
        with self._writing():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fh = open(self.tmp, "w", encoding="utf-8")
        self.count = 0

    def _writing(self):
        return writing(str(self.path), OUTPUT_HINT, where=self.path.parent)

    def write(self, record: dict) -> None:
        with self._writing():
            self.fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.count += 1

    def commit(self) -> None:
        with self._writing():
            self.fh.flush()
            os.fsync(self.fh.fileno())
            self.fh.close()
            os.replace(self.tmp, self.path)
            fsync_dir(self.path.parent)

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        if kind is None:
            try:
                self.commit()
            except BaseException:
                self._discard()
                raise
            return False
        self._discard()
        return False

    def _discard(self) -> None:
        try:
            self.fh.close()  # flushing what is buffered may fail again on a full disk
        except OSError:
            pass
        finally:
            self.tmp.unlink(missing_ok=True)


def record(mode: str, index: int, text: str, seed: int, params: dict, teacher=None,
           parent=None, **extra) -> dict:
    """One provenance-carrying record (``extra``: mode-specific fields, e.g. ``op``)."""
    return {"id": f"{mode}-{seed}-{index:07d}", "text": text, "mode": mode, "seed": seed,
            "params": params, "teacher": teacher, "parent": parent, **extra}


def read_records(path, flag: str = "--in", field: str = "text") -> Iterator[dict]:
    """Records of a .jsonl file (each keeps its fields; a missing ``id`` becomes
    ``<file stem>-<line>``), or of any text source ``data.path`` reads (.txt, .json,
    .parquet, with or without .gz), one per document, streaming."""
    from tfpretrain.config import DataConfig
    from tfpretrain.data.sources import DecodeStats, iter_source, resolve_paths

    files = resolve_paths(str(path), key=flag)
    for f in files:
        if f.name.endswith(".jsonl"):
            yield from _jsonl_records(f, flag, field)
            continue
        cfg = DataConfig(path=str(f), text_field=field)
        docs = (t.strip() for t in iter_source(f, cfg, DecodeStats("replace")))
        for i, text in enumerate(filter(None, docs), 1):
            yield {"id": f"{f.stem}-{i}", "text": text}


def json_lines(path: Path, flag: str, errors: str = "strict") -> Iterator[tuple[int, object]]:
    """(line number, parsed value) of each non-blank line of a JSONL file; a malformed line
    is one message naming ``flag``, the file and the line."""
    with open(path, encoding="utf-8", errors=errors) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{flag}: {path}:{lineno}: malformed JSON line ({exc.msg})"
                                ) from None
            yield lineno, value


def _jsonl_records(path: Path, flag: str, field: str) -> Iterator[dict]:
    for lineno, rec in json_lines(path, flag, errors="replace"):
        if isinstance(rec, str):
            rec = {"text": rec}
        if not isinstance(rec, dict) or not isinstance(rec.get(field), str):
            raise UserError(f"{flag}: {path}:{lineno}: a record needs a string field "
                            f"{field!r}")
        if field != "text":
            rec["text"] = rec[field]
        rec.setdefault("id", f"{path.stem}-{lineno}")
        yield rec


def texts(path, flag: str = "--in") -> Iterator[str]:
    """Just the texts of :func:`read_records`."""
    return (r["text"] for r in read_records(path, flag))
