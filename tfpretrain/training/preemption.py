"""SIGTERM/SIGINT: while training, checkpoint at the next step boundary, then stop with
128 + signal; before and after training (data, model, final evaluation, export), stop at
once, through the usual cleanup."""
from __future__ import annotations

import contextlib
import os
import sys

BEFORE = "before training (nothing new was trained)"
AFTER = ("after training: its last checkpoint is committed; rerun the same command to "
         "evaluate and export")


class Preempted(Exception):
    """Stopped on SIGTERM/SIGINT: in training after committing a checkpoint (``step``), or
    outside it at once (``when`` says where)."""

    def __init__(self, signum: int, step: int | None = None, when: str = ""):
        super().__init__(f"stopped by signal {signum} "
                         + (f"at step {step}" if step is not None else when))
        self.signum, self.step = signum, step
        self.exit_code = 128 + signum


class PreemptionHandler:
    """First SIGTERM/SIGINT: while :meth:`deferred` (the training loop), ask for a
    checkpoint at the next step boundary; outside it, raise :class:`Preempted` at once, so
    that staging folders and the export's check process are cleaned up. Second: exit."""

    def __init__(self):
        self.signum = None
        self.deferring = False
        self.outside = BEFORE  # what stopping at once means now
        self._old = {}

    def __enter__(self):
        import signal

        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            print(f"\n[tfpretrain] second signal {signum}: exiting now without a checkpoint",
                  file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signum = signum
        if not self.deferring:
            raise Preempted(signum, when=self.outside)
        print(f"\n[tfpretrain] signal {signum}: checkpointing at the next step boundary "
              "(send it again to exit at once)", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def deferred(self):
        """The training loop: a signal waits for the next step boundary."""
        self.deferring = True
        try:
            yield
        finally:
            self.deferring, self.outside = False, AFTER

    def __exit__(self, *exc):
        import signal

        for sig, old in self._old.items():
            signal.signal(sig, old)
