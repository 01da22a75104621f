"""Run folders: what to do with one before training (start, resume, refuse), and loading a
finished or interrupted run for generate, evaluate, export and bench.

Layout of ``runs/<name>/``: ``.tfpretrain-run`` (the marker: written first, atomically;
only a folder with it, an empty folder, or a run folder from before markers existed is
ever trained into), ``.lock``, config.yaml (the resolved config), tokenizer/, checkpoints/
(see training.checkpoints), logs/ (TensorBoard), summary.json, tracking.json.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from tfpretrain.config import Config, build_config, flatten, read_yaml
from tfpretrain.errors import UserError

# Settings that change what a checkpoint means; changing them on resume is refused.
RESUME_CRITICAL = ("data.", "tokenizer.", "model.", "train.batch_size", "train.seed",
                   "train.spike_window", "optimizer.name", "optimizer.ema")
NOT_CRITICAL = ("data.cache", "data.cache_dir")  # where data is cached, not what it is


MARKER = ".tfpretrain-run"
LOCK = ".lock"
# what a run writes before it trains: a folder it created holding no more than these is
# removed again when the run fails (nothing trained, nothing logged)
SETUP = {LOCK, MARKER, "config.yaml", "tokenizer"}


class RunLock:
    """An exclusive lock on a run folder (``<run>/.lock``, flock) for the life of a process.

    The OS drops the lock when the process dies, even with kill -9, so a stale lock file
    never blocks a rerun. The lock file is opened without following symlinks (a symlinked
    ``.lock`` is refused, never truncated through) and is not truncated before the lock is
    held.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self._fd = None

    def acquire(self) -> None:
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UserError(f"{self.path} is a symbolic link; tfpretrain will not write "
                                "through it. Remove it, or use another --run-dir") from None
            raise UserError(f"cannot create the lock file {self.path}: {exc.strerror}; "
                            "check that the folder is writable") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserError(f"run folder {self.path.parent} is in use by {holder}; wait for "
                            "it to finish or use another --run-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _is_legacy_run(run_dir: Path) -> bool:
    """A run folder written before markers existed: its config.yaml and checkpoints or
    summary (adopted, and marked)."""
    return (run_dir / "config.yaml").is_file() and (
        (run_dir / "checkpoints").is_dir() or (run_dir / "summary.json").is_file())


@contextlib.contextmanager
def claim_run_dir(run_dir: Path):
    """Create (if needed), lock and mark ``run_dir`` before anything else is written; refuse
    a folder that is not ours. The lock is taken atomically whether or not the folder
    existed, so two runs started on one new folder cannot both train into it. A folder this
    call created is removed again if the run fails before it trained or logged anything
    (e.g. on bad data, or a full disk while it wrote its tokenizer)."""
    from tfpretrain.files import write_atomic

    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--run-dir: {run_dir} is a file, not a folder; choose another "
                        "--run-dir")
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--run-dir: cannot create {run_dir}: {exc.strerror}") from None
    lock = RunLock(run_dir)
    made_lock = not os.path.lexists(lock.path)
    lock.acquire()
    try:
        others = sorted(set(os.listdir(run_dir)) - {LOCK, MARKER})
        if not (run_dir / MARKER).exists() and others and not _is_legacy_run(run_dir):
            shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
            raise UserError(f"--run-dir: {run_dir} already holds files that are not a "
                            f"tfpretrain run ({shown}); nothing was changed. Choose another "
                            "--run-dir, or an empty folder")
        if not (run_dir / MARKER).exists():
            write_atomic(run_dir / MARKER, "tfpretrain run folder\n")
        yield lock
    except BaseException:
        if created and set(os.listdir(run_dir)) <= SETUP:
            shutil.rmtree(run_dir, ignore_errors=True)
        elif made_lock and not (run_dir / MARKER).exists():
            lock.path.unlink(missing_ok=True)  # a refused folder is left as it was
        raise
    finally:
        lock.release()


def config_differences(old: dict, new: dict) -> list[str]:
    a, b = flatten(old), flatten(new)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k != "name")


@dataclass
class RunState:
    run_dir: Path
    resume_from: Path | None = None
    resume_step: int = 0
    resume_guard: dict | None = None
    complete: bool = False


def plan_run_dir(cfg: Config, run_dir: Path, resume: str, allow_config_change: bool = False,
                 log=print) -> RunState:
    """Decide what to do with ``run_dir`` without modifying anything."""
    from tfpretrain.training.checkpoints import CheckpointManager

    state = RunState(run_dir)
    if not run_dir.exists() or not set(os.listdir(run_dir)) - {LOCK, MARKER}:
        if resume == "must":
            raise UserError(f"--resume must: no run folder with checkpoints at {run_dir}")
        return state
    if resume == "never":
        raise UserError(f"run folder {run_dir} already exists and --resume never was given; "
                        "choose another --run-dir, or pass --resume auto to continue it")
    old_cfg_path = run_dir / "config.yaml"
    found = CheckpointManager(run_dir / "checkpoints", None, None).latest_valid() \
        if old_cfg_path.exists() else None
    if found is None:
        if resume == "must":
            raise UserError(f"--resume must: no valid checkpoint in {run_dir / 'checkpoints'}")
        if (run_dir / "summary.json").exists() or (run_dir / "checkpoints").exists():
            raise UserError(f"run folder {run_dir} has results but no valid checkpoint to "
                            "resume from; choose another --run-dir")
        return state  # a run that died before its first checkpoint: start over in place
    _check_resume_config(cfg, run_dir, old_cfg_path, allow_config_change, log)
    path, ckpt_state = found
    state.resume_from, state.resume_step = path, int(ckpt_state["step"])
    state.resume_guard = dict(ckpt_state.get("guard", {}))
    state.complete = state.resume_step >= cfg.train.steps
    return state


def _check_resume_config(cfg, run_dir, old_cfg_path, allow_config_change, log) -> None:
    old = build_config(read_yaml(old_cfg_path), name=cfg.name).to_dict()
    diffs = config_differences(old, cfg.to_dict())
    critical = [k for k in diffs if k.startswith(RESUME_CRITICAL) and k not in NOT_CRITICAL]
    if critical and allow_config_change:
        log(f"warning: --allow-config-change: resuming with changed resume-critical settings: "
            f"{', '.join(critical)}")
    elif critical:
        listed = ", ".join(f"{k} ({flatten(old).get(k)!r} -> {flatten(cfg.to_dict()).get(k)!r})"
                           for k in critical)
        raise UserError(f"cannot resume {run_dir}: these settings differ from the run's "
                        f"config.yaml: {listed}. Use another --run-dir to start a new run, or "
                        "--allow-config-change if you know the checkpoint still fits")
    if diffs:
        log(f"warning: resuming with changed settings: {', '.join(diffs)}")


def load_run(run_dir: Path):
    """(cfg, tokenizer, model) of a run folder, from its latest valid checkpoint; the model
    computes in float32 whatever the run trained in (``train.precision``)."""
    from tfpretrain.data.tokenizers import load_tokenizer
    from tfpretrain.training.checkpoints import CheckpointManager
    from tfpretrain.objectives import float32_copy
    from tfpretrain.training.optimizers import to_evaluation_weights
    from tfpretrain.training.runtime import build_and_compile

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"--run-dir: {run_dir} is not a tfpretrain run folder "
                        "(no config.yaml)")
    cfg = build_config(read_yaml(run_dir / "config.yaml"), name=run_dir.resolve().name,
                       source=str(run_dir / "config.yaml"))
    tokenizer = load_tokenizer(run_dir / "tokenizer")
    model = build_and_compile(cfg, tokenizer.vocabulary_size, jit=False)
    manager = CheckpointManager(run_dir / "checkpoints", model, model.optimizer)
    found = manager.latest_valid()
    if found is None:
        raise UserError(f"--run-dir: {run_dir} has no valid checkpoint to load")
    manager.restore(found[0])
    to_evaluation_weights(model)  # schedule-free AdamW's or the EMA's average is the model
    return cfg, tokenizer, float32_copy(model, cfg, tokenizer.vocabulary_size)
