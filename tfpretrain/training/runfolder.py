"""Run folders: what to do with one before training (start, resume, refuse), and loading a
finished or interrupted run for generate, evaluate, export and bench.

Layout of ``runs/<name>/``: config.yaml (the resolved config), tokenizer/, checkpoints/
(see training.checkpoints), logs/ (TensorBoard), summary.json, tracking.json, .lock.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tfpretrain.config import Config, build_config, flatten, read_yaml
from tfpretrain.errors import UserError

# Settings that change what a checkpoint means; changing them on resume is refused.
RESUME_CRITICAL = ("data.", "tokenizer.", "model.", "train.batch_size", "train.seed",
                   "train.spike_window")
NOT_CRITICAL = ("data.cache", "data.cache_dir")  # where data is cached, not what it is


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
    if not run_dir.exists() or not any(run_dir.iterdir()):
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
    """(cfg, tokenizer, model) of a run folder, from its latest valid checkpoint."""
    from tfpretrain.data.tokenizers import load_tokenizer
    from tfpretrain.training.checkpoints import CheckpointManager
    from tfpretrain.training.runtime import build_and_compile

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"--run-dir: {run_dir} is not a tfpretrain run folder "
                        "(no config.yaml)")
    cfg = build_config(read_yaml(run_dir / "config.yaml"), name=run_dir.name,
                       source=str(run_dir / "config.yaml"))
    tokenizer = load_tokenizer(run_dir / "tokenizer")
    model = build_and_compile(cfg, tokenizer.vocabulary_size, jit=False)
    manager = CheckpointManager(run_dir / "checkpoints", model, model.optimizer)
    found = manager.latest_valid()
    if found is None:
        raise UserError(f"--run-dir: {run_dir} has no valid checkpoint to load")
    manager.restore(found[0])
    return cfg, tokenizer, model
