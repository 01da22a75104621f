"""The testing seam: every fault that tests and drills can inject, in one place.

Production code asks this module, never ``cfg.debug`` or the environment directly:

- ``debug.nan_at_step`` / ``debug.nan_for_steps`` (config): :func:`poisoned_positions`, the
  data positions whose batches get NaN sample weights (the batch stays bad through
  rollbacks and resumes, because it follows its data position);
- ``debug.spike_at_step`` / ``spike_for_steps`` (config): :func:`spike_steps`, the steps
  whose loss is multiplied by 1000 inside the train step (one step: an outlier; many: a
  sustained level shift);
- ``debug.slow_checkpoint_seconds`` (config): :func:`checkpoint_delay`, a sleep inside every
  checkpoint write before it is committed (to kill a run mid-write);
- ``debug.slow_export_seconds`` (config): :func:`export_delay`, a sleep inside the export
  after the save, before its check and publish (to signal a run in its final phase);
- ``TFPRETRAIN_FAULT=<point>`` (environment): :func:`crash_point` exits the process at once
  (like kill -9) when the named point is reached. Points: ``export_before_rename``.

Nothing here does anything unless a test or a drill asks for it.
"""
from __future__ import annotations

import os

CRASH_POINTS = ("export_before_rename",)


def poisoned_positions(cfg) -> list[int]:
    """0-based data positions that ``debug.nan_at_step`` / ``nan_for_steps`` poison."""
    debug = cfg.debug
    if not debug.nan_at_step:
        return []
    return list(range(debug.nan_at_step - 1, debug.nan_at_step - 1 + debug.nan_for_steps))


def spike_steps(cfg) -> tuple[int, int]:
    """(first 1-based step, count) whose loss is multiplied by 1000 (first 0 = none)."""
    return cfg.debug.spike_at_step, cfg.debug.spike_for_steps


def checkpoint_delay(cfg) -> float:
    """Seconds to sleep inside each checkpoint write, before it is committed."""
    return cfg.debug.slow_checkpoint_seconds


def export_delay(cfg) -> float:
    """Seconds to sleep inside the export, after the save."""
    return cfg.debug.slow_export_seconds


def crash_point(name: str) -> None:
    """Exit at once with status 137 (as kill -9 would) when ``TFPRETRAIN_FAULT`` names
    this point."""
    assert name in CRASH_POINTS, name
    if os.environ.get("TFPRETRAIN_FAULT") == name:
        os._exit(137)
