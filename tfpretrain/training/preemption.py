"""SIGTERM/SIGINT: checkpoint at the next step boundary, then stop with 128 + signal."""
from __future__ import annotations

import os
import sys


class Preempted(Exception):
    """Training stopped on SIGTERM/SIGINT after committing a checkpoint."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by signal {signum} at step {step}")
        self.signum, self.step = signum, step
        self.exit_code = 128 + signum


class PreemptionHandler:
    """First SIGTERM/SIGINT: ask for a checkpoint at the next step boundary; second: exit."""

    def __init__(self):
        self.signum = None
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
        print(f"\n[tfpretrain] signal {signum}: checkpointing at the next step boundary "
              "(send it again to exit at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        import signal

        for sig, old in self._old.items():
            signal.signal(sig, old)
