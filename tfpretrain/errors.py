"""User-facing errors and the one place that turns them into exit code 2.

Every command's ``main`` goes through :func:`cli_main`: a :class:`UserError` (bad config,
missing file, empty corpus, ...) prints one readable message and exits 2 without a
traceback. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import functools
import os
import sys


TEMPFAIL_EXIT = 75  # EX_TEMPFAIL: a peer (worker, feeder) was lost; rerun to resume


class UserError(Exception):
    """A problem the user can fix: printed as one message, exit code 2."""


def quiet_tensorflow() -> None:
    """Silence TF's C++ start-up chatter before tensorflow is imported."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("ABSL_MIN_LOG_LEVEL", "2")


def cli_main(fn):
    """Decorate ``main(argv) -> int`` so user errors exit 2 with one message."""

    @functools.wraps(fn)
    def wrapper(argv=None) -> int:
        try:
            return fn(argv)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapper
