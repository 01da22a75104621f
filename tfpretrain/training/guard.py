"""The stability guard's host-side half: rollbacks.

The in-graph half (skip a step whose loss or gradient norm is not finite or spikes) is in
the model's train step (``models.lm.CausalLM``). When ``train.rollback_after`` steps in a
row were skipped, the trainer restores the last valid checkpoint and moves the data stream
past the offending batches: :func:`roll_back`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from tfpretrain.errors import GUARD_STOP_EXIT


@dataclass
class GuardState:
    """Guard state that lives outside the graph, saved in every checkpoint's state.json:
    where the data stream is relative to the step counter (advanced by rollbacks past bad
    batches), the learning-rate scale and the rollback count."""
    data_offset: int = 0
    lr_scale: float = 1.0
    rollbacks: int = 0
    discarded_skips: int = 0   # skipped steps undone by rollbacks (still counted in totals)
    discarded_steps: int = 0   # steps undone by rollbacks

    @classmethod
    def from_dict(cls, d: dict | None) -> "GuardState":
        return cls(**{k: v for k, v in (d or {}).items() if k in cls.__dataclass_fields__})

    def to_dict(self) -> dict:
        return asdict(self)


class GuardStop(Exception):
    """The guard gave up: more rollbacks were needed than ``train.max_rollbacks``."""

    exit_code = GUARD_STOP_EXIT


class Diverged(GuardStop):
    """``train.guard: false`` and a step's loss or gradient norm was not finite: the update
    was applied, so the weights are no longer usable."""


def diverged(step: int, manager) -> Diverged:
    found = manager.latest_valid()
    kept = found[0] if found else "none (the run had not checkpointed yet)"
    return Diverged(f"training diverged at step {step}: its loss or gradient norm is not "
                    "finite and train.guard is off, so the update was applied and the "
                    f"weights are lost; nothing after the last checkpoint was saved: {kept}. "
                    "Rerun the same command with --set train.guard=true "
                    "--allow-config-change to resume from it with bad steps skipped")


def set_lr_scale(optimizer, scale: float) -> None:
    """Set the ScaledSchedule's scale (see training.optimizers)."""
    from tfpretrain.compat import learning_rate_schedule
    from tfpretrain.models.guarded import innermost

    learning_rate_schedule(innermost(optimizer)).scale.assign(scale)


def last_clean_checkpoint(manager):
    """(path, state) of the newest valid checkpoint not taken inside a skip streak (its
    state.json says ``consecutive_skips`` 0): the only kind a rollback returns to."""
    return manager.latest_valid(lambda state: not state.get("consecutive_skips"))


def check_rollback_budget(guard: GuardState, max_rollbacks: int, step: int, manager,
                          after: int) -> None:
    """Raise GuardStop when one more rollback would exceed ``train.max_rollbacks``."""
    if guard.rollbacks < max_rollbacks:
        return
    found = last_clean_checkpoint(manager)
    kept = found[0] if found else "none"
    raise GuardStop(f"the stability guard stopped the run at step {step}: {after} consecutive "
                    f"skipped steps again after {guard.rollbacks} rollback(s) "
                    f"(train.max_rollbacks={max_rollbacks}). The last good checkpoint is "
                    f"intact: {kept}. Lower optimizer.learning_rate or check the data, then "
                    "rerun the same command to resume from it (or raise train.max_rollbacks)")


def roll_back(model, manager, guard: GuardState, lr_scale: float, log) -> int:
    """Restore the last valid checkpoint and move the data stream past the bad batches.

    Returns the step training continues from. The offending batches are those between the
    checkpoint and now: ``guard.data_offset`` grows by that many, so they are never seen
    again, not even by a later resume (the offset is in every later checkpoint)."""
    optimizer = model.optimizer
    bad_until = int(optimizer.iterations.numpy())
    skips_before = int(optimizer.skipped_steps.numpy())
    found = last_clean_checkpoint(manager)
    if found is None:
        log(f"warning: {int(optimizer.consecutive_skips.numpy())} consecutive skipped steps "
            f"at step {bad_until} but no checkpoint to roll back to; continuing")
        optimizer.consecutive_skips.assign(0)
        return bad_until
    path, _ = found
    manager.restore(path)
    restored = int(optimizer.iterations.numpy())
    # the stream was at data position bad_until + offset; continue from there at `restored`
    guard.data_offset += bad_until - restored
    guard.discarded_steps += bad_until - restored
    guard.discarded_skips += skips_before - int(optimizer.skipped_steps.numpy())
    guard.rollbacks += 1
    guard.lr_scale *= lr_scale
    set_lr_scale(optimizer, guard.lr_scale)
    optimizer.consecutive_skips.assign(0)
    log(f"warning: rollback {guard.rollbacks}: {bad_until - restored} steps after "
        f"{path.name} ended in consecutive skips; restored step {restored}, skipping "
        f"those batches (data offset {guard.data_offset}), lr scale {guard.lr_scale:g}")
    return restored
