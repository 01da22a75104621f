"""Checkpoints that commit atomically, and finding the latest valid one.

Layout: ``<run>/checkpoints/step-00000500/`` holds a ``tf.train.Checkpoint`` of the model
and optimizer (weights, Adam moments, iterations, hence the schedule position, and the
stability guard's window and counters, which its optimizer wrapper holds) and
``state.json`` (step, config fingerprint, sha256 of every file). A checkpoint is written to
``.tmp-step-...``, fsynced and renamed into place; only then is ``checkpoints/latest``
replaced and old checkpoints pruned, so a crash at any moment leaves the previous valid
checkpoint intact. The data position needs no saving: the batch at step k is a pure
function of (seed, k) (see ``data.pipeline``).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import tensorflow as tf

from tfpretrain.files import fsync_dir, sha256_file, write_atomic
from tfpretrain.models.guarded import COUNTERS

PREFIX = "step-"
VALUE = ".ATTRIBUTES/VARIABLE_VALUE"
GUARD_STATE = ("guard_history",) + COUNTERS


class CheckpointManager:
    def __init__(self, directory: Path, model, optimizer, keep: int = 3,
                 slow_seconds: float = 0.0):
        self.directory = Path(directory)
        self.keep = keep
        self.slow_seconds = slow_seconds  # fault injection: a slow writer
        self.seconds = 0.0  # time spent saving, for the summary
        self._model, self._optimizer = model, optimizer
        self._ckpt = (tf.train.Checkpoint(model=model, optimizer=optimizer)
                      if model is not None else None)

    def _path(self, step: int) -> Path:
        return self.directory / f"{PREFIX}{step:08d}"

    def save(self, step: int, extra: dict | None = None) -> Path:
        import time

        t0 = time.perf_counter()
        try:
            return self._save(step, extra)
        except (OSError, tf.errors.OpError) as exc:  # disk full, quota, read-only, ...
            shutil.rmtree(self.directory / f".tmp-{self._path(step).name}",
                          ignore_errors=True)
            raise self._write_error(step, exc) from None
        finally:
            self.seconds += time.perf_counter() - t0

    def _write_error(self, step: int, exc) -> Exception:
        """One message saying what failed, that the previous checkpoint is intact and what
        to free (a WriteError: exit 74, no traceback)."""
        from tfpretrain.errors import FREEABLE, refused_write

        kept = self.list()
        intact = f"The previous checkpoint {kept[-1].name} is intact. " if kept else ""
        return refused_write(exc, f"the checkpoint of step {step} in {self.directory}",
                             f"{intact}Free disk space ({FREEABLE}) or lower "
                             "train.keep_checkpoints, then rerun the same command to resume",
                             where=self.directory)

    def _save(self, step: int, extra: dict | None) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self._path(step)
        tmp = self.directory / f".tmp-{final.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        self._ckpt.write(str(tmp / "ckpt"))
        if self.slow_seconds:
            import time

            time.sleep(self.slow_seconds)
        files = {}
        for f in sorted(tmp.iterdir()):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            files[f.name] = sha256_file(f)
        state = {"step": int(step), "files": files, **(extra or {})}
        write_atomic(tmp / "state.json", json.dumps(state, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(self.directory)
        write_atomic(self.directory / "latest", final.name + "\n")
        self._prune()
        return final

    def _prune(self) -> None:
        ckpts = self.list()
        for old in ckpts[: max(0, len(ckpts) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)

    def list(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir()
                      if p.is_dir() and p.name.startswith(PREFIX))

    @staticmethod
    def validate(path: Path) -> dict | None:
        """The checkpoint's state if every file is present with its recorded checksum."""
        try:
            state = json.loads((path / "state.json").read_text())
            for name, digest in state["files"].items():
                if sha256_file(path / name) != digest:
                    return None
            return state
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def latest_valid(self, accept=None) -> tuple[Path, dict] | None:
        """Newest checkpoint that validates (and whose state ``accept(state)`` takes, when
        given); corrupt ones are skipped with a warning."""
        for path in reversed(self.list()):
            state = self.validate(path)
            if state is None:
                print(f"warning: skipping corrupt or incomplete checkpoint {path}",
                      file=sys.stderr)
            elif accept is None or accept(state):
                return path, state
        return None

    def restore(self, path: Path) -> None:
        prefix = str(path / "ckpt")
        reader = tf.train.load_checkpoint(prefix)
        if reader.has_tensor(f"model/{GUARD_STATE[0]}/{VALUE}"):
            return self._restore_model_guard_layout(prefix, reader)
        self._ckpt.read(prefix).assert_existing_objects_matched()

    def _restore_model_guard_layout(self, prefix: str, reader) -> None:
        """A checkpoint written before the guard's state moved from the model into its
        optimizer wrapper (models.guarded): the optimizer there is the wrapper's inner one,
        and the guard's window and counters are read from the model's entries."""
        model, optimizer = self._model, self._optimizer
        model.optimizer = optimizer.inner_optimizer  # the object graph that was written
        try:
            tf.train.Checkpoint(model=model, optimizer=optimizer.inner_optimizer).read(
                prefix).assert_existing_objects_matched().expect_partial()
        finally:
            model.optimizer = optimizer
        for name in GUARD_STATE:
            variable = getattr(optimizer, name)
            variable.assign(reader.get_tensor(f"model/{name}/{VALUE}").astype(
                variable.dtype))
