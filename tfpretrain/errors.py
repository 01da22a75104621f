"""User-facing errors and the one place that turns them into exit codes.

Every command's ``main`` goes through :func:`cli_main`: a :class:`UserError` (bad config,
missing file, empty corpus, ...) prints one readable message and exits 2 without a
traceback; a write the disk refused (full, quota, read-only, permissions: a
:class:`WriteError`, or any error :func:`write_failure` recognises) prints one message
naming the file, the free space and the fix, and exits 74. Anything else is a bug and
keeps its traceback.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import re
import shutil
import sys
from pathlib import Path


TEMPFAIL_EXIT = 75  # EX_TEMPFAIL: a peer (worker, feeder) was lost; rerun to resume
#   (the default of train.rerun_exit_code, which a run uses instead)
GUARD_STOP_EXIT = 3  # the stability guard gave up (train.max_rollbacks)
IOERR_EXIT = 74  # EX_IOERR: a file could not be written (disk full, quota, read-only)
# the errors that mean the disk or the folder refused a write, not a bug
REFUSED_WRITES = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                  errno.EFBIG)
FREEABLE = ("old runs under runs/, exports under saved_models/, the token cache under "
            "~/.cache/tfpretrain")
FREE_SPACE_HINT = (f"Free disk space ({FREEABLE}) or make the folder writable, then rerun the "
                   "same command; a run resumes from its last checkpoint")


class UserError(Exception):
    """A problem the user can fix: printed as one message, exit code 2."""

    exit_code = 2


class WriteError(UserError):
    """A file could not be written (disk full, quota, read-only): one message, exit 74."""

    exit_code = IOERR_EXIT


def write_failure(exc: BaseException) -> str | None:
    """The operating system's words for an error that means a write was refused ("No space
    left on device", "Disk quota exceeded", "Read-only file system", "Permission denied",
    ...), else None. Covers OSError and the errors TensorFlow and other native libraries
    raise, which carry those words in their message."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return os.strerror(exc.errno) if exc.errno in REFUSED_WRITES else None
    text = str(getattr(exc, "message", None) or exc)
    return next((os.strerror(e) for e in REFUSED_WRITES if os.strerror(e) in text), None)


def failed_path(exc: BaseException) -> str | None:
    """The file an OSError or a native library's error names, if any."""
    if isinstance(exc, OSError) and exc.filename:
        return str(exc.filename)
    text = str(getattr(exc, "message", None) or exc)
    reason = write_failure(exc)
    # TF says "<path>; <reason>" (after its op's name in {{...}}, before a Python traceback)
    found = reason and re.search(r"(/[^\s;'\"]+);?\s*" + re.escape(reason), text)
    return found.group(1) if found else None


def free_space(path) -> str:
    """"; N MiB free there" for the filesystem holding ``path`` (or its nearest existing
    parent), or "" where that cannot be found out."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return ""
    return f"; {free / 2**30:,.1f} GiB free there" if free >= 2**30 else \
        f"; {free / 2**20:.1f} MiB free there"


def refused_write(exc: BaseException, what: str, fix: str = FREE_SPACE_HINT,
                  where=None) -> WriteError:
    """One message for a refused write: ``what`` could not be written, why, the free space
    where it failed (``where``, else the path the error names), and ``fix``. Use as
    ``raise refused_write(exc, ...) from None``."""
    where = where or failed_path(exc)
    reason = write_failure(exc) or str(exc).splitlines()[0][:200]
    return WriteError(f"cannot write {what}: {reason}{free_space(where) if where else ''}. "
                      f"{fix}")


def quiet_tensorflow() -> None:
    """Silence TF's C++ start-up chatter before tensorflow is imported: its log level, and
    for the lines it prints before its logging is set up (which no level silences) a filter
    on the process's stderr while tensorflow imports and lists its devices."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("ABSL_MIN_LOG_LEVEL", "2")
    if "tensorflow" not in sys.modules and os.environ["TF_CPP_MIN_LOG_LEVEL"] in ("2", "3") and \
            not any(isinstance(f, _QuietImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietImport())


class _NoRetracingNotice(logging.Filter):
    def filter(self, record) -> bool:
        return "triggered tf.function retracing" not in record.getMessage()


def quiet_retracing() -> None:
    """Runs trained one after another in one process (tune's trials, scaling's sizes) each
    build their own tf.functions, and TensorFlow warns of "retracing" for what is expected:
    drop that one warning from its logger."""
    logger = logging.getLogger("tensorflow")
    if not any(isinstance(f, _NoRetracingNotice) for f in logger.filters):
        logger.addFilter(_NoRetracingNotice())


# TF's start-up lines that say nothing to a user: absl's notice that it is not set up yet
# (upstream: abseil/abseil-cpp#1718, #1957), oneDNN being on, no CUDA driver or device
STARTUP_NOISE = re.compile(rb"All log messages before absl::InitializeLog\(\) is called|"
                           rb"oneDNN custom operations are on|Could not find cuda drivers|"
                           rb"failed call to cuInit")


@contextlib.contextmanager
def filtered_stderr(noise: re.Pattern = STARTUP_NOISE):
    """File descriptor 2 (native code's stderr too) through a pipe that drops the lines
    ``noise`` matches and passes every other line on as it arrives."""
    import threading

    sys.stderr.flush()
    try:
        real = os.dup(2)
    except OSError:  # no stderr at all: nothing to filter
        yield
        return
    read, write = os.pipe()
    os.dup2(write, 2)
    os.close(write)

    def pump():
        with os.fdopen(read, "rb") as lines:
            for line in lines:
                if not noise.search(line):
                    os.write(real, line)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(real, 2)  # the pipe's last writer closes: the pump sees its end
        thread.join(5)
        if not thread.is_alive():  # else a child holds the pipe: the pump still forwards
            os.close(real)


class _QuietImport:
    """A one-shot import hook: ``import tensorflow`` (and its device listing, where the
    CUDA lines come from) runs inside :func:`filtered_stderr`; the hook then removes itself
    (a mere ``importlib.util.find_spec`` probe leaves it in place)."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        import importlib.machinery

        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader, self)
        return spec


class _QuietLoader:
    def __init__(self, loader, hook):
        self.loader, self.hook = loader, hook

    def __getattr__(self, name):  # get_source, is_package, ...: the real loader's
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        if self.hook in sys.meta_path:
            sys.meta_path.remove(self.hook)
        with filtered_stderr():
            self.loader.exec_module(module)
            try:  # before the runtime starts: no side effect (the CUDA lines come from here)
                module.config.list_physical_devices()
            except Exception:  # noqa: BLE001 - a quieter start is not worth a failed import
                pass


@contextlib.contextmanager
def writing(what: str, fix: str = FREE_SPACE_HINT, where=None):
    """A refused write inside the block (see :func:`write_failure`) becomes one
    :class:`WriteError` naming ``what``; anything else passes through unchanged."""
    try:
        yield
    except WriteError:
        raise
    except Exception as exc:
        if write_failure(exc) is None:
            raise
        raise refused_write(exc, what, fix, where) from None


def cli_main(fn):
    """Decorate ``main(argv) -> int`` so user errors exit 2 with one message."""

    @functools.wraps(fn)
    def wrapper(argv=None) -> int:
        try:
            return fn(argv)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return exc.exit_code
        except Exception as exc:
            reason = write_failure(exc)
            if reason is None:
                raise
            where = failed_path(exc) or "a file"
            if reason in (os.strerror(errno.EACCES), os.strerror(errno.EPERM)):  # or a read
                print(f"error: {reason}: {where}. Give this user access to it (or choose "
                      "another path), then rerun the same command", file=sys.stderr)
            else:
                print(f"error: {refused_write(exc, where)}", file=sys.stderr)
            return IOERR_EXIT
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapper
