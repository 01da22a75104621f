"""SIGTERM/SIGINT: while training, checkpoint at the next step boundary, then stop with
128 + signal; before and after training (data, model, final evaluation, export), stop at
once, through the usual cleanup."""
from __future__ import annotations

import contextlib
import os
import sys

from tfpretrain.errors import TEMPFAIL_EXIT

BEFORE = "before training (nothing new was trained)"
AFTER = ("after training: its last checkpoint is committed; rerun the same command to "
         "evaluate and export")


class Preempted(Exception):
    """Stopped on SIGTERM/SIGINT: in training after committing a checkpoint (``step``), or
    outside it at once (``when`` says where). ``by``: multi_worker, the other worker that
    got the signal (this one stopped with it, exit ``train.rerun_exit_code``: rerun every
    worker)."""

    def __init__(self, signum: int, step: int | None = None, when: str = "", by: str = ""):
        if by:
            super().__init__(f"stopped at step {step} with {by}, which got signal {signum}: "
                             "every worker stopped at this step and the chief committed its "
                             "checkpoint. Start every worker again with the same command to "
                             "resume")
        else:
            super().__init__(f"stopped by signal {signum} "
                             + (f"at step {step}" if step is not None else when))
        self.signum, self.step = signum, step
        self.exit_code = TEMPFAIL_EXIT if by else 128 + signum


class PreemptionHandler:
    """First SIGTERM/SIGINT: while :meth:`deferred` (the training loop), ask for a
    checkpoint at the next step boundary; outside it, raise :class:`Preempted` at once, so
    that staging folders and the export's check process are cleaned up. Second: exit."""

    def __init__(self):
        self.signum = None
        self.peer = None  # multi_worker: (the worker that got a signal, its number)
        self.deferring = False
        self.outside = BEFORE  # what stopping at once means now
        self._old = {}

    def __enter__(self):
        self.install()
        return self

    def install(self) -> None:
        """Handle SIGTERM and SIGINT (again: making a MultiWorkerMirroredStrategy replaces
        the process's SIGTERM handler with TensorFlow's own, so ours never ran)."""
        import signal

        for sig in (signal.SIGTERM, signal.SIGINT):
            old = signal.signal(sig, self._handle)
            self._old.setdefault(sig, old)

    @property
    def stopping(self) -> bool:
        """A signal came, to this worker or (multi_worker) to another."""
        return self.signum is not None or self.peer is not None

    def stop_with(self, worker: str, signum: int) -> None:
        """multi_worker: ``worker`` got ``signum``; this one stops at the same step."""
        if self.signum is None and self.peer is None:
            self.peer = (worker, signum)

    def stopped(self, step: int) -> Preempted:
        """What ends a run that stopped training for a signal at ``step``."""
        if self.signum is not None:
            return Preempted(self.signum, step)
        return Preempted(self.peer[1], step, by=self.peer[0])

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
