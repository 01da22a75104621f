"""Where text comes from: the embedded corpus, local files, TFDS or Hugging Face datasets,
streamed document by document and split into train and val.

``data.path`` is a file, a glob, a directory, ``tfds://NAME[/config][@split]``,
``hf://OWNER/NAME[:config][@split]`` or a list of them. ``.txt`` files split into documents
by ``data.document_separator``; ``.jsonl``/``.json`` and ``.parquet`` read
``data.text_field``; ``.gz`` variants are read transparently. Undecodable bytes follow
``data.on_decode_error``: ``replace`` (U+FFFD per bad byte), ``skip`` (drop the documents
that contain them) or ``strict`` (stop, naming the file and byte offset); the count is
reported.

Memory stays bounded by the document, not the corpus: text files are read in
``CHUNK_BYTES`` chunks, JSONL line by line, parquet by record batch, TFDS and Hugging Face
datasets (streaming) example by example, and a document longer than
``MAX_DOCUMENT_CHARS`` (a file with no separator, a single enormous line) is cut at
whitespace into documents of at most that size. Only a ``.json`` file (one JSON value) is
parsed whole.

:class:`DocumentPlan` makes three kinds of pass over the sources, none holding the corpus:
one that counts documents (and checks every record), one that draws the tokenizer's
training sample, and one that routes each document to train or val for tokenizing.
"""
from __future__ import annotations

import codecs
import glob
import gzip
import itertools
import json
import os
import re
import zlib
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from tfpretrain.config import DataConfig
from tfpretrain.data.synthetic import generate_stories
from tfpretrain.errors import UserError

TEXT_SUFFIXES = (".txt", ".text", ".md", ".jsonl", ".json", ".parquet")
TFDS_PREFIX = "tfds://"
HF_PREFIX = "hf://"
CHUNK_BYTES = 8 << 20          # text files are read this many bytes at a time
MAX_DOCUMENT_CHARS = 1_000_000  # longer documents are cut (at whitespace) into pieces
# Salts that give each seeded draw its own stream from train.seed (changing one changes
# which documents are drawn, so a cached entry and a run's split would no longer match)
MIX_SALT = 7919          # data.weights: which documents get an extra copy
TOKENIZER_SAMPLE_SALT = 104729  # tokenizer.train_bytes: which documents train the tokenizer
_BAD_BYTE = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of invalid UTF-8
_BLANK_LINES = re.compile(r"\n(?:[^\S\n]*\n)+")  # one or more whitespace-only lines


@dataclass
class Corpus:
    """A corpus held in memory (tests, benchmarks, small evaluations); training streams."""
    train: list[str]
    val: list[str]
    description: str


def _base_suffix(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return os.path.splitext(name)[1]


def resolve_paths(spec, key: str = "data.path") -> list[Path]:
    """Expand a path / glob / directory / list into concrete files, in a stable order;
    errors name the config ``key`` the paths came from."""
    specs = spec if isinstance(spec, list) else [spec]
    files: list[Path] = []
    for s in specs:
        s = os.path.expanduser(str(s))
        if s.startswith((TFDS_PREFIX, HF_PREFIX)):
            files.append(s)  # not a file: read by iter_source
            continue
        if any(ch in s for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(s, recursive=True) if Path(m).is_file())
            if not matches:
                raise UserError(f"{key}: no files match {s}")
            files.extend(matches)
        elif Path(s).is_dir():
            found = sorted(p for p in Path(s).rglob("*")
                           if p.is_file() and _base_suffix(p) in TEXT_SUFFIXES)
            if not found:
                raise UserError(f"{key}: no .txt/.jsonl/.json files in directory {s}")
            files.extend(found)
        elif Path(s).is_file():
            files.append(Path(s))
        else:
            raise UserError(f"{key}: no such file: {s}")
    for f in files:
        if isinstance(f, Path) and _base_suffix(f) not in TEXT_SUFFIXES:
            raise UserError(f"{key}: unsupported file type {f.name!r}; use .txt, .jsonl, "
                            ".json (optionally .gz), .parquet or tfds://NAME")
    return files


class DecodeStats:
    """Counts undecodable bytes and the documents they cost, per ``data.on_decode_error``."""

    def __init__(self, policy: str):
        self.policy = policy
        self.bad_bytes = 0
        self.skipped_documents = 0

    def decoder(self):
        """An incremental UTF-8 decoder: strict for ``strict``, else surrogateescape (each bad
        byte becomes one lone surrogate, counted and then replaced or skipped by clean)."""
        errors = "strict" if self.policy == "strict" else "surrogateescape"
        return codecs.getincrementaldecoder("utf-8")(errors)

    def decode(self, decoder, raw: bytes, offset: int, path, final: bool = False) -> str:
        """Decode ``raw``, which starts at byte ``offset`` of ``path``."""
        pending = len(decoder.getstate()[0])  # bytes of a character cut by the last chunk
        try:
            text = decoder.decode(raw, final)
        except UnicodeDecodeError as exc:
            raise UserError(f"data.path: {path}: invalid UTF-8 at byte offset "
                            f"{offset - pending + exc.start} (data.on_decode_error=strict); set "
                            "`data.on_decode_error` to `replace` or `skip` to read it "
                            "anyway") from None
        if self.policy != "strict":
            self.bad_bytes += len(_BAD_BYTE.findall(text))
        return text

    def clean(self, doc: str) -> str | None:
        """A document decoded with surrogateescape under the policy (None: skipped)."""
        if self.policy == "strict" or not _BAD_BYTE.search(doc):
            return doc
        if self.policy == "skip":
            self.skipped_documents += 1
            return None
        return _BAD_BYTE.sub("\ufffd", doc)

    def describe(self) -> str:
        if not self.bad_bytes:
            return ""
        what = {"replace": "replaced with U+FFFD",
                "skip": f"skipped {self.skipped_documents} document(s)"}[self.policy]
        return f"; {self.bad_bytes} undecodable byte(s): {what}"


def _cut_point(text: str, limit: int) -> int:
    """Where to cut an over-long text: after the last space, newline or tab in the second
    half of its first ``limit`` characters, else at ``limit``."""
    i = max(text.rfind(c, limit // 2, limit) for c in " \n\t")
    return i + 1 if i >= 0 else limit


def bounded(doc: str, limit: int | None = None) -> Iterator[str]:
    """``doc``, cut into pieces of at most ``limit`` (default ``MAX_DOCUMENT_CHARS``)
    characters."""
    limit = limit or MAX_DOCUMENT_CHARS
    while len(doc) > limit:
        cut = _cut_point(doc, limit)
        yield doc[:cut]
        doc = doc[cut:]
    yield doc


def _open(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _text_chunks(path: Path, stats: DecodeStats) -> Iterator[str]:
    """The decoded text of a file, ``CHUNK_BYTES`` at a time."""
    decoder, offset = stats.decoder(), 0
    try:
        with _open(path) as fh:
            while True:
                raw = fh.read(CHUNK_BYTES)
                text = stats.decode(decoder, raw, offset, path, final=not raw)
                offset += len(raw)
                if text:
                    yield text
                if not raw:
                    return
    except (OSError, EOFError, zlib.error) as exc:  # zlib.error: corrupt .gz contents
        raise UserError(f"data.path: cannot read {path}: {exc}") from None


def _complete_documents(buf: str, separator: str) -> tuple[list[str], str]:
    """The documents that end inside ``buf`` and the text after them (the carry)."""
    if separator == "none":
        return [], buf
    if separator == "blank_line":
        matches = list(_BLANK_LINES.finditer(buf))
        if not matches:
            return [], buf
        starts = [0] + [m.end() for m in matches[:-1]]
        parts = [buf[a:m.start()] for a, m in zip(starts, matches)]
        # the last separator stays with the carry: the next chunk may extend it
        return parts, buf[matches[-1].start():]
    parts = buf.split("\n" if separator == "line" else separator)
    return parts, parts.pop()


def split_stream(chunks, separator: str) -> Iterator[str]:
    """Documents of text arriving in chunks, split by ``data.document_separator``. The text
    after the last separator is carried into the next chunk, and cut when it outgrows
    ``MAX_DOCUMENT_CHARS`` (a single enormous line never sits in memory whole)."""
    carry = ""
    for chunk in chunks:
        parts, carry = _complete_documents(carry + chunk, separator)
        yield from parts
        *pieces, carry = bounded(carry)
        yield from pieces
    yield from (_BLANK_LINES.split(carry) if separator == "blank_line" else [carry])


def _json_text(rec, where, path, field: str) -> str | None:
    if isinstance(rec, str):
        return rec
    if not isinstance(rec, dict) or field not in rec:
        keys = ", ".join(rec) if isinstance(rec, dict) else type(rec).__name__
        raise UserError(f"data.path: {path} record {where} has no field {field!r} "
                        f"(fields: {keys}); set `data.text_field`")
    return rec[field] if isinstance(rec[field], str) else None


def _read_jsonl(path: Path, field: str, stats: DecodeStats) -> Iterator[str]:
    """One record per line, read line by line."""
    decoder, offset = stats.decoder(), 0
    try:
        with _open(path) as fh:
            for lineno, raw in enumerate(fh, 1):
                line = stats.decode(decoder, raw, offset, path)
                offset += len(raw)
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(f"data.path: {path}:{lineno}: malformed JSON line "
                                    f"({exc.msg})") from None
                text = _json_text(rec, lineno, path, field)
                if text is not None:
                    yield text
            stats.decode(decoder, b"", offset, path, final=True)
    except (OSError, EOFError, zlib.error) as exc:
        raise UserError(f"data.path: cannot read {path}: {exc}") from None


def _read_json(path: Path, field: str, stats: DecodeStats) -> Iterator[str]:
    """A .json file is one JSON value (a list of records, or one record): parsed whole."""
    text = "".join(_text_chunks(path, stats))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"data.path: {path}: malformed JSON ({exc.msg} at line "
                        f"{exc.lineno})") from None
    del text
    if not isinstance(data, (dict, list)):
        raise UserError(f"data.path: {path} holds a JSON {type(data).__name__}; a .json file "
                        "must hold a list of records (or strings), or one record")
    for where, rec in enumerate([data] if isinstance(data, dict) else data, 1):
        text = _json_text(rec, where, path, field)
        if text is not None:
            yield text


def _read_parquet(path: Path, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a broken file
        raise UserError(f"data.path: cannot read parquet file {path}: {exc}") from None
    columns = pf.schema_arrow.names
    if field not in columns:
        raise UserError(f"data.path: {path} has no column {field!r} (columns: "
                        f"{', '.join(columns)}); set `data.text_field`")
    for batch in pf.iter_batches(columns=[field], batch_size=1024):
        yield from (t for t in batch.column(0).to_pylist() if isinstance(t, str))


def _read_tfds(spec: str, field: str) -> Iterator[str]:
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
    for ex in tfds.as_numpy(ds.map(lambda e: e[field])):
        yield ex.decode("utf-8", errors="replace")


def parse_hf(spec: str) -> tuple[str, str | None, str]:
    """``hf://OWNER/NAME[:config][@split]`` -> (name, config, split); NAME may also be a
    local folder of data files (what the tests use)."""
    rest = spec[len(HF_PREFIX):]
    rest, _, split = rest.partition("@")
    name, _, config = rest.partition(":")
    return name, config or None, split or "train"


HUB_TIMEOUT_SECONDS = 5.0
_hub_reachable: dict = {}


def hub_reachable() -> bool:
    """Whether the Hugging Face hub (``huggingface_hub``'s endpoint, so HF_ENDPOINT mirrors
    count) answers a TCP connection within HUB_TIMEOUT_SECONDS; asked once per process."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    key = (url.hostname, url.port)
    if key not in _hub_reachable:
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            socket.create_connection((url.hostname, port), timeout=HUB_TIMEOUT_SECONDS).close()
            _hub_reachable[key] = True
        except OSError:
            _hub_reachable[key] = False
    return _hub_reachable[key]


def check_hub_reachable(spec: str, name: str) -> None:
    """Fail in seconds, not after a minute of retries, when a hub dataset cannot be
    fetched: not a local folder, not in offline mode, and the hub does not answer."""
    if Path(name).expanduser().is_dir() or os.environ.get("HF_DATASETS_OFFLINE") == "1" \
            or os.environ.get("HF_HUB_OFFLINE") == "1":
        return
    if not hub_reachable():
        raise UserError(f"data.path: cannot load {spec}: the Hugging Face hub is unreachable "
                        "from this machine. Download the dataset where there is a network "
                        "(`huggingface-cli download --repo-type dataset NAME --local-dir "
                        "DIR`) and use `hf://DIR` or the files in DIR as data.path; or set "
                        "HF_DATASETS_OFFLINE=1 to read the local datasets cache")


def _read_hf(spec: str, field: str) -> Iterator[str]:
    """Hugging Face ``datasets``, streamed example by example, never with remote code."""
    try:
        import datasets
    except ImportError:
        raise UserError(f"data.path: {spec} needs the `datasets` library: "
                        "pip install 'tfpretrain[hf]'") from None
    name, config, split = parse_hf(spec)
    check_hub_reachable(spec, name)
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
        it = iter(ds)
        first = next(it, None)
    except Exception as exc:  # unknown name, no network, bad split
        msg = str(exc).splitlines()[0] if str(exc) else ""
        raise UserError(f"data.path: cannot load {spec}: {type(exc).__name__}: {msg}") from None
    if first is None:
        return
    if field not in first:
        raise UserError(f"data.path: {spec} has no column {field!r} (columns: "
                        f"{', '.join(first)}); set `data.text_field`")
    for ex in itertools.chain([first], it):
        if isinstance(ex[field], str):
            yield ex[field]


def iter_source(spec, cfg: DataConfig, stats: DecodeStats) -> Iterator[str]:
    """The raw texts of one resolved source (a file path, a tfds:// or an hf:// spec)."""
    if isinstance(spec, str) and spec.startswith(TFDS_PREFIX):
        return _read_tfds(spec, cfg.text_field)
    if isinstance(spec, str) and spec.startswith(HF_PREFIX):
        return _read_hf(spec, cfg.text_field)
    suffix = _base_suffix(spec)
    if suffix == ".parquet":
        return _read_parquet(spec, cfg.text_field)
    if suffix == ".jsonl":
        return _read_jsonl(spec, cfg.text_field, stats)
    if suffix == ".json":
        return _read_json(spec, cfg.text_field, stats)
    return split_stream(_text_chunks(spec, stats), cfg.document_separator)


class Source:
    """One ``data.path`` entry (a path, glob, directory, remote spec or list of them; None
    for the embedded corpus): its documents, re-readable, each cleaned per
    ``data.on_decode_error``, cut to ``MAX_DOCUMENT_CHARS`` and non-blank."""

    def __init__(self, spec, cfg: DataConfig, seed: int, key: str = "data.path"):
        self.spec, self.cfg, self.seed = spec, cfg, seed
        self.sources = resolve_paths(spec, key) if spec is not None else []
        self._stories = generate_stories(cfg.embedded_documents, seed) if spec is None else None

    def documents(self, stats: DecodeStats | None = None) -> Iterator[str]:
        stats = stats or DecodeStats(self.cfg.on_decode_error)
        if self._stories is not None:
            texts = iter(self._stories)
        else:
            texts = (t for s in self.sources for t in iter_source(s, self.cfg, stats))
        for text in texts:
            text = stats.clean(text)
            if text is None:
                continue
            for piece in bounded(text):
                piece = piece.strip("\n")
                if piece.strip():
                    yield piece

    def describe(self) -> str:
        if self._stories is not None:
            return (f"embedded synthetic stories ({len(self._stories)} documents, "
                    f"seed {self.seed})")
        names = ", ".join(str(f) for f in self.sources[:3]) + \
            (" ..." if len(self.sources) > 3 else "")
        return f"{len(self.sources)} source(s): {names}"


def read_documents(cfg: DataConfig, seed: int, path=None,
                   key: str = "data.path") -> tuple[list[str], str]:
    """All documents of ``path`` (default ``cfg.path``) in memory, and a description;
    errors name the config ``key`` (or flag) the path came from."""
    source = Source(cfg.path if path is None else path, cfg, seed, key)
    stats = DecodeStats(cfg.on_decode_error)
    docs = list(source.documents(stats))
    return docs, source.describe() + stats.describe()


def _uniforms(rng: np.random.Generator) -> Iterator[float]:
    while True:
        yield from rng.random(1 << 16).tolist()


class DocumentPlan:
    """Which document goes to train and which to val, decided by one counting pass over the
    sources (which also checks every record, so bad input fails before anything is
    trained); :meth:`route` then streams ``(is_val, document)`` pairs as often as needed.

    - ``data.val_path``: all of ``data.path`` trains, all of ``val_path`` validates.
    - ``split: documents``: a seeded random set of round(val_fraction * n) documents.
    - ``split: tail``: the last ``val_fraction`` of the characters (nanoGPT's split).
    - ``data.weights``: each entry's training documents are repeated (whole copies, each
      copy a separate pass over the source, plus a seeded subset) so that entry i holds
      weights[i] / sum(weights) of the training bytes; validation is not resampled.
    """

    def __init__(self, cfg: DataConfig, seed: int):
        self.cfg, self.seed = cfg, seed
        self.stats = DecodeStats(cfg.on_decode_error)
        specs = list(cfg.path) if cfg.weights else [cfg.path]
        self.sources = [Source(s, cfg, seed) for s in specs]
        sizes, self.counts, chars = array("q"), [], 0
        for i, source in enumerate(self.sources):
            n = 0
            for doc in source.documents(self.stats):
                sizes.append(len(doc.encode("utf-8")))
                chars += len(doc)
                n += 1
            if cfg.weights and not n:
                raise UserError(f"data.path: entry {i} ({source.spec}) has no text; every "
                                "weighted source must have documents")
            self.counts.append(n)
        self.sizes = np.frombuffer(sizes, np.int64) if len(sizes) else np.zeros(0, np.int64)
        self.chars = chars
        where = "; ".join(s.describe() for s in self.sources)
        self.description = where + self.stats.describe()
        n = int(sum(self.counts))
        if not n:
            what = where if cfg.path is not None else "the embedded corpus"
            raise UserError(f"data.path: the corpus is empty (no non-whitespace text in "
                            f"{what})")
        self.val_source = None
        self.val_mask = np.zeros(n, bool)
        self.copies: list[tuple[int, np.ndarray]] = []
        if cfg.val_path is not None:
            self.val_source = Source(cfg.val_path, cfg, seed, key="data.val_path")
            vstats = DecodeStats(cfg.on_decode_error)
            if not sum(1 for _ in self.val_source.documents(vstats)):  # checks every record
                raise UserError(f"data.val_path: no text in {self.val_source.describe()}")
            self.description += f"; validation: {self.val_source.describe()}{vstats.describe()}"
            self.expected_train_bytes = int(self.sizes.sum())
        elif cfg.split == "tail":
            self.expected_train_bytes = int(self.sizes.sum() * (1 - cfg.val_fraction))
        else:
            if n < 2:
                what = where if cfg.path is not None else "the embedded corpus"
                raise UserError(f"data.split=documents needs at least 2 documents; {what} has "
                                "1. Use `data.split: tail` or a different "
                                "`data.document_separator`.")
            n_val = min(n - 1, max(1, round(cfg.val_fraction * n)))
            self.val_mask[np.random.default_rng(seed).permutation(n)[:n_val]] = True
            self.expected_train_bytes = int(self.sizes[~self.val_mask].sum())
            if cfg.weights:
                self._plan_mix()

    def _plan_mix(self) -> None:
        """Per entry: (whole copies, which training documents get one more)."""
        rng = np.random.default_rng([self.seed, MIX_SALT])
        bounds = np.cumsum([0] + self.counts)
        train_sizes = []
        for i in range(len(self.sources)):
            keep = ~self.val_mask[bounds[i]:bounds[i + 1]]
            if not keep.any():
                raise UserError(f"data.weights: source {i} has no training documents left "
                                "after the validation split")
            train_sizes.append((int(keep.sum()), int(self.sizes[bounds[i]:bounds[i + 1]][keep]
                                                     .sum())))
        total, wsum = sum(b for _, b in train_sizes), sum(self.cfg.weights)
        parts, self.expected_train_bytes = [], 0
        for i, (n_train, size) in enumerate(train_sizes):
            factor = self.cfg.weights[i] / wsum * total / max(1, size)
            whole = int(factor)
            extra = np.zeros(n_train, bool)
            extra[rng.choice(n_train, round((factor - whole) * n_train), replace=False)] = True
            self.copies.append((whole, extra))
            self.expected_train_bytes += round(factor * size)
            parts.append(f"source {i} x{factor:.2f}")
        self.description += "; mixed " + ", ".join(parts)

    def route(self) -> Iterator[tuple[bool, str]]:
        """``(is_val, document)`` for every document, in a fixed order."""
        if self.val_source is not None:
            for doc in self.sources[0].documents():
                yield False, doc
            for doc in self.val_source.documents():
                yield True, doc
        elif self.cfg.split == "tail":
            yield from self._route_tail()
        elif self.copies:
            yield from self._route_mix()
        else:
            for g, doc in enumerate(self.sources[0].documents()):
                yield bool(self.val_mask[g]), doc

    def _route_tail(self) -> Iterator[tuple[bool, str]]:
        cut, pos = int(self.chars * (1.0 - self.cfg.val_fraction)), 0
        for doc in self.sources[0].documents():
            if pos + len(doc) <= cut:
                yield False, doc
            elif pos >= cut:
                yield True, doc
            else:
                k = cut - pos
                if doc[:k].strip():
                    yield False, doc[:k]
                if doc[k:].strip():
                    yield True, doc[k:]
            pos += len(doc)

    def _route_mix(self) -> Iterator[tuple[bool, str]]:
        bounds = np.cumsum([0] + self.counts)
        for copy in range(max(whole for whole, _ in self.copies) + 1):
            for i, (source, (whole, extra)) in enumerate(zip(self.sources, self.copies)):
                if not (copy == 0 or copy < whole or (copy == whole and extra.any())):
                    continue  # nothing of this source in this pass
                mask, t = self.val_mask[bounds[i]:bounds[i + 1]], 0
                for j, doc in enumerate(source.documents()):
                    if mask[j]:
                        if copy == 0:
                            yield True, doc
                        continue
                    if copy < whole or extra[t]:
                        yield False, doc
                    t += 1

    def tokenizer_texts(self, limit: int) -> Iterator[str]:
        """Training text for the tokenizer: about ``limit`` characters drawn uniformly (by
        document, seeded) from the whole training stream, not just its beginning. Lazy: a
        tokenizer that is loaded, not trained, reads nothing."""
        p = min(1.0, limit / max(1, self.expected_train_bytes))
        draws = _uniforms(np.random.default_rng([self.seed, TOKENIZER_SAMPLE_SALT]))
        total = 0
        for is_val, doc in self.route():
            if is_val or (p < 1.0 and next(draws) >= p):
                continue
            yield doc[: limit - total]
            total += min(len(doc), limit - total)
            if total >= limit:
                return


def load_corpus(cfg: DataConfig, seed: int) -> Corpus:
    """The whole corpus in memory (small data: tests, benchmarks, evaluation)."""
    plan = DocumentPlan(cfg, seed)
    train, val = [], []
    for is_val, doc in plan.route():
        (val if is_val else train).append(doc)
    check_split(len(train), len(val), cfg)
    return Corpus(train=train, val=val, description=plan.description)


def check_split(n_train: int, n_val: int, cfg: DataConfig) -> None:
    if (not n_train or not n_val) and cfg.split == "tail" and cfg.val_path is None:
        raise UserError("data.split=tail: the corpus is too small to hold out "
                        f"{cfg.val_fraction:.0%} for validation")
