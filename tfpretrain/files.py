"""Durable file writes and checksums, the one home for both (checkpoints, run folders, the
token cache, tune results)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_root() -> Path:
    """tfpretrain's cache folder: $XDG_CACHE_HOME/tfpretrain, else ~/.cache/tfpretrain."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tfpretrain"


def fsync_dir(path: Path) -> None:
    """fsync a folder, so a rename inside it survives a crash (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    """SHA-256 of a file's bytes, read 4 MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def write_atomic(path: Path, text: str) -> None:
    """``text`` into ``path`` through a hidden temporary sibling, fsynced and renamed: a
    reader sees the old file or the new one, never a part (nor, after a failed write such
    as a full disk, the temporary one)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and not exc.filename:
            exc.filename = str(path)  # a failed write or flush names no file by itself
        raise
    fsync_dir(path.parent)
