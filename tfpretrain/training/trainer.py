"""The one place that calls model.fit: run folder -> data -> model -> fit -> eval -> export.

Reads top to bottom like nanoGPT's train.py. Everything that can fail because of user input
(config, paths, empty corpus, tokenizer) fails before the run folder is created or touched.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tfpretrain.config import Config, build_config, flatten, read_yaml
from tfpretrain.errors import UserError

# Settings that change what a checkpoint means; changing them on resume is refused.
RESUME_CRITICAL = ("data.", "tokenizer.", "model.", "train.batch_size", "train.seed",
                   "train.spike_window")
NOT_CRITICAL = ("data.cache", "data.cache_dir")  # where data is cached, not what it is


def log(msg: str) -> None:
    print(f"[tfpretrain] {msg}", flush=True)


def choose_steps_per_execution(cfg: Config) -> int:
    """Largest of 16..1 dividing every step count at which something must happen."""
    if cfg.train.steps_per_execution:
        return cfg.train.steps_per_execution
    marks = (cfg.eval.every, cfg.train.steps, cfg.train.checkpoint_every or cfg.eval.every)
    for n in (16, 8, 4, 2, 1):
        if all(m % n == 0 for m in marks):
            return n
    return 1


def config_differences(old: dict, new: dict) -> list[str]:
    a, b = flatten(old), flatten(new)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k != "name")


@dataclass
class RunState:
    run_dir: Path
    resume_from: Path | None = None
    resume_step: int = 0
    resume_guard: dict = None
    complete: bool = False


def plan_run_dir(cfg: Config, run_dir: Path, resume: str,
                 allow_config_change: bool = False) -> RunState:
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
    path, ckpt_state = found
    state.resume_from, state.resume_step = path, int(ckpt_state["step"])
    state.resume_guard = dict(ckpt_state.get("guard", {}))
    state.complete = state.resume_step >= cfg.train.steps
    return state


def configure_tensorflow(cfg: Config) -> None:
    import tensorflow as tf

    try:
        if cfg.train.threads:
            tf.config.threading.set_intra_op_parallelism_threads(cfg.train.threads)
        # Two cores: one inter-op thread avoids the bimodal step times seen on this CPU.
        if (os.cpu_count() or 1) <= 4:
            tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        pass  # TF already initialized in this process (tests, notebooks): keep its settings


def evaluate_rows(model, rows: np.ndarray, token_bytes: np.ndarray, batch_size: int,
                  max_batches: int = 0) -> dict:
    """Sum of token losses (nats), token count and UTF-8 bytes over validation rows."""
    import tensorflow as tf

    from tfpretrain.data.pipeline import eval_dataset

    table = tf.constant(token_bytes, tf.float32)

    @tf.function(reduce_retracing=True)
    def batch_sums(x, y, w):
        losses = model.token_losses(y, model(x, training=False))
        return (tf.reduce_sum(tf.cast(losses, tf.float64) * tf.cast(w, tf.float64)),
                tf.reduce_sum(w), tf.reduce_sum(tf.gather(table, y) * w))

    nats, tokens, nbytes = 0.0, 0.0, 0.0
    for x, y, w in eval_dataset(rows, batch_size, max_batches):
        a, b, c = batch_sums(x, y, w)
        nats, tokens, nbytes = nats + float(a), tokens + float(b), nbytes + float(c)
    loss = nats / max(tokens, 1.0)
    return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0)),
            "val_bits_per_byte": nats / math.log(2) / max(nbytes, 1.0),
            "val_tokens": int(tokens), "val_bytes": int(nbytes)}


def evaluate_masked(model, rows: np.ndarray, masker, batch_size: int, max_batches: int = 0,
                    counts: np.ndarray | None = None) -> dict:
    """Masked-LM validation: loss and accuracy over the masked positions (masks fixed per
    batch, see pipeline.EVAL_SEED), plus the baselines from train-token ``counts``: always
    predicting the most frequent real token (accuracy) and the unigram distribution (loss)."""
    import tensorflow as tf

    from tfpretrain.data.pipeline import eval_dataset
    from tfpretrain.data.tokenizers import NUM_SPECIAL

    if counts is None:
        counts = np.ones([model.backbone.vocabulary_size])
    best = int(np.argmax(counts[NUM_SPECIAL:])) + NUM_SPECIAL
    logp = tf.constant(np.log((counts + 1.0) / (counts.sum() + len(counts))), tf.float64)

    @tf.function(reduce_retracing=True)
    def batch_sums(x, y, w):
        logits = model(x, training=False)
        w64 = tf.cast(w, tf.float64)
        losses = tf.cast(model.token_losses(y, logits), tf.float64)
        return (tf.reduce_sum(losses * w64), tf.reduce_sum(w64),
                tf.reduce_sum(tf.cast(model.correct(y, logits), tf.float64) * w64),
                tf.reduce_sum(tf.cast(tf.equal(y, best), tf.float64) * w64),
                -tf.reduce_sum(tf.gather(logp, y) * w64))

    totals = np.zeros(5)
    for x, y, w in eval_dataset(rows, batch_size, max_batches, to_batch=masker):
        totals += np.array([float(v) for v in batch_sums(x, y, w)])
    nats, n, correct, baseline, unigram = totals
    n = max(n, 1.0)
    loss = nats / n
    return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0)),
            "val_masked_accuracy": correct / n, "baseline_masked_accuracy": baseline / n,
            "unigram_val_loss": unigram / n, "val_masked_tokens": int(n),
            "baseline_token": best}


def make_masker(cfg: Config, tokenizer):
    """The masked-LM batch maker (rows, seed) -> (features, labels, weights), or None for
    causal runs (the pipeline's default)."""
    if cfg.model.objective != "mlm":
        return None
    from tfpretrain.data.masking import Masker

    return Masker(cfg.mlm, tokenizer.vocabulary_size, cfg.model.sequence_length,
                  tokenizer.word_starts())


def evaluate_split(cfg: Config, model, tokenizer, rows: np.ndarray, counts: np.ndarray,
                   max_batches: int = 0) -> dict:
    """Validation metrics of ``rows`` for the run's objective (see evaluate_rows,
    evaluate_masked), with the unigram baseline."""
    masker = make_masker(cfg, tokenizer)
    if masker is not None:
        return evaluate_masked(model, rows, masker, cfg.train.batch_size, max_batches, counts)
    metrics = evaluate_rows(model, rows, tokenizer.token_bytes(), cfg.train.batch_size,
                            max_batches)
    metrics["unigram_val_loss"] = unigram_loss(counts, rows, max_batches * cfg.train.batch_size)
    return metrics


def unigram_loss(counts: np.ndarray, rows: np.ndarray, max_rows: int = 0) -> float:
    """Cross-entropy of val targets under add-one-smoothed train-token frequencies."""
    targets = (rows[:max_rows] if max_rows else rows)[:, 1:].reshape(-1)
    logp = np.log((counts + 1.0) / (counts.sum() + len(counts)))
    return float(-logp[targets].mean())


def lr_scale_variable(optimizer):
    """The ScaledSchedule's scale (see training.optimizers)."""
    return optimizer._learning_rate.scale


def roll_back(model, optimizer, manager, guard: dict, lr_scale: float, saver) -> int:
    """Restore the last valid checkpoint and move the data stream past the bad batches.

    Returns the step training continues from. The offending batches are those between the
    checkpoint and now: ``guard['data_offset']`` grows by that many, so they are never seen
    again, not even by a later resume (the offset is in every later checkpoint)."""
    bad_until = int(optimizer.iterations.numpy())
    found = manager.latest_valid()
    if found is None:
        log(f"warning: {int(model.consecutive_skips.numpy())} consecutive skipped steps at "
            f"step {bad_until} but no checkpoint to roll back to; continuing")
        model.consecutive_skips.assign(0)
        return bad_until
    path, _ = found
    manager.restore(path)
    restored = int(optimizer.iterations.numpy())
    # the stream was at data position bad_until + offset; continue from there at `restored`
    guard["data_offset"] += bad_until - restored
    guard["rollbacks"] += 1
    guard["lr_scale"] *= lr_scale
    lr_scale_variable(optimizer).assign(guard["lr_scale"])
    model.consecutive_skips.assign(0)
    saver.last_saved = None
    log(f"warning: rollback {guard['rollbacks']}: {bad_until - restored} steps after "
        f"{path.name} ended in consecutive skips; restored step {restored}, skipping "
        f"those batches (data offset {guard['data_offset']}), lr scale {guard['lr_scale']:g}")
    return restored


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


def fit(cfg: Config, run_dir: Path, resume: str = "auto",
        allow_config_change: bool = False) -> dict:
    """Train ``cfg`` in ``run_dir``; returns the summary. Raises UserError, Preempted."""
    from tfpretrain.training.checkpoints import RunLock

    run_dir = Path(run_dir)
    lock = RunLock(run_dir)
    if run_dir.exists():
        lock.acquire()  # before reading the folder: nobody else may be writing it
    try:
        with PreemptionHandler() as preemption:
            return _fit(cfg, run_dir, resume, allow_config_change, lock, preemption)
    finally:
        lock.release()


def _fit(cfg, run_dir, resume, allow_config_change, lock, preemption) -> dict:
    t_start = time.time()
    state = plan_run_dir(cfg, run_dir, resume, allow_config_change)
    if state.complete:
        summary_path = run_dir / "summary.json"
        log(f"{run_dir} already finished {state.resume_step} steps (train.steps="
            f"{cfg.train.steps}); nothing to train. Raise train.steps to continue it.")
        if summary_path.exists():
            return json.loads(summary_path.read_text())

    import keras
    import tensorflow as tf

    from tfpretrain.data.cache import prepare
    from tfpretrain.generation import make_sampler, sample_prompt
    from tfpretrain.models import build_from_config
    from tfpretrain.training.callbacks import StepLogger
    from tfpretrain.training.checkpoints import CheckpointManager, write_atomic
    from tfpretrain.training.optimizers import build_optimizer

    configure_tensorflow(cfg)
    if cfg.train.deterministic:
        tf.config.experimental.enable_op_determinism()
    # Seed first: tf.random.set_seed resets TF's eager context, which invalidates resources
    # created before it (tensorflow_text's SentencePiece op among them).
    keras.utils.set_random_seed(cfg.train.seed)
    # 1. data and tokenizer: all input errors surface here, before the run folder changes
    t0 = time.time()
    tokenizer, packed, info = prepare(
        cfg, run_dir / "tokenizer" if state.resume_from is not None else None, log=log)
    if info["hit"]:
        log(f"data: {info['description']}; {info['documents'][0]} train / "
            f"{info['documents'][1]} val documents, from the token cache {info['cache']}")
    log(f"tokenizer: {tokenizer.kind}, {tokenizer.vocabulary_size} ids; "
        f"{packed.train_tokens:,} train / {packed.val_tokens:,} val tokens, "
        f"{len(packed.train_rows):,} train rows ({time.time() - t0:.1f}s)")

    # 2. run folder
    if not run_dir.exists():
        run_dir.mkdir(parents=True)
        lock.acquire()
    if state.resume_from is None:
        shutil.rmtree(run_dir / "logs", ignore_errors=True)
        (run_dir / "tracking.json").unlink(missing_ok=True)
        tokenizer.save(run_dir / "tokenizer")
    write_atomic(run_dir / "config.yaml", cfg.to_yaml())

    # 3. model and optimizer, compiled explicitly (never keras_hub's fine-tuning defaults)
    spe = choose_steps_per_execution(cfg)
    model = build_from_config(cfg, tokenizer.vocabulary_size, spe)
    optimizer = build_optimizer(cfg.optimizer, cfg.train.steps)
    optimizer.build(model.trainable_variables)
    jit = cfg.train.jit_compile if cfg.train.jit_compile is not None else True
    model.compile(optimizer=optimizer, jit_compile=jit, steps_per_execution=spe)
    params = int(model.network.count_params())
    tokens_per_step = cfg.train.batch_size * cfg.model.sequence_length
    manager = CheckpointManager(run_dir / "checkpoints", model, optimizer,
                                keep=cfg.train.keep_checkpoints,
                                slow_seconds=cfg.debug.slow_checkpoint_seconds)
    # Guard state that lives outside the graph: where the data stream is relative to the
    # step counter (advanced by rollbacks past bad batches), the learning-rate scale and
    # the rollback count. Saved in every checkpoint's state.json.
    guard = {"data_offset": 0, "lr_scale": 1.0, "rollbacks": 0}
    start = 0
    if state.resume_from is not None:
        t0 = time.time()
        manager.restore(state.resume_from)
        guard.update(state.resume_guard)
        lr_scale_variable(optimizer).assign(guard["lr_scale"])
        start = int(optimizer.iterations.numpy())
        log(f"resumed from {state.resume_from} at step {start} ({time.time() - t0:.1f}s)")
    log(f"model: {cfg.model.arch}, {params:,} parameters; {tokens_per_step:,} tokens/step, "
        f"{cfg.train.steps:,} steps = {tokens_per_step * cfg.train.steps:,} tokens; "
        f"jit_compile={jit}, steps_per_execution={spe}")

    # 4. fit. An "epoch" is one evaluation interval; a run resumed mid-interval first
    # finishes that interval, so evaluations and checkpoints land on the same steps as in
    # an unbroken run.
    sampler = make_sampler(model, tokenizer, cfg)
    sample_kwargs = dict(max_new_tokens=cfg.eval.sample_tokens, temperature=cfg.eval.temperature,
                         top_k=cfg.eval.top_k, seed=cfg.train.seed)
    from tfpretrain.training.tracking import build_sinks

    sinks = build_sinks(cfg, run_dir)
    for sink in sinks:
        sink.start(cfg)
    logger = StepLogger(sinks, tokens_per_step, sampler, sample_kwargs, sample_prompt(cfg))
    try:
        return _train_and_finish(cfg, run_dir, model, optimizer, manager, tokenizer, packed,
                                 guard, sampler, sample_kwargs, logger, preemption, start,
                                 params, tokens_per_step, t_start)
    except BaseException:
        logger.finish(None)  # external trackers see the run end (KILLED), not hang
        raise


def _train_and_finish(cfg, run_dir, model, optimizer, manager, tokenizer, packed, guard,
                      sampler, sample_kwargs, logger, preemption, start, params,
                      tokens_per_step, t_start) -> dict:
    from tfpretrain.data.pipeline import eval_dataset, poisoned_positions, train_dataset
    from tfpretrain.generation import sample_prompt
    from tfpretrain.models import weights_sha256
    from tfpretrain.training.callbacks import (CheckpointEvery, PreemptionCheckpoint,
                                               RollbackMonitor, StopAtStep)
    from tfpretrain.training.checkpoints import write_atomic

    every, total = cfg.eval.every, cfg.train.steps
    extra = {"config": cfg.to_dict(), "guard": guard}
    rollback = RollbackMonitor(cfg.train.rollback_after if cfg.train.guard else 0)
    saver = CheckpointEvery(manager, extra, cfg.train.checkpoint_every or every,
                            hold=lambda: rollback.requested)
    callbacks = [logger, StopAtStep(total), rollback, saver,
                 PreemptionCheckpoint(manager, extra, preemption)]
    poison = poisoned_positions(cfg.debug)
    masker = make_masker(cfg, tokenizer)
    val_ds = eval_dataset(packed.val_rows, cfg.train.batch_size, cfg.eval.steps, masker)
    verbose = 1 if sys.stdout.isatty() else 2
    step = start
    while step < total and preemption.signum is None:
        first_epoch = step // every
        partial = step % every
        data = train_dataset(packed.train_rows, cfg.train.batch_size, cfg.train.seed,
                             step + guard["data_offset"], poison=poison, to_batch=masker)
        model.fit(data,
                  validation_data=val_ds,
                  steps_per_epoch=every - partial if partial else every,
                  initial_epoch=first_epoch,
                  epochs=first_epoch + 1 if partial else math.ceil(total / every),
                  callbacks=callbacks, shuffle=False, verbose=verbose)
        step = int(optimizer.iterations.numpy())
        if rollback.requested:
            rollback.requested = False
            step = roll_back(model, optimizer, manager, guard, cfg.train.rollback_lr_scale,
                             saver)
    if preemption.signum is not None:
        raise Preempted(preemption.signum, int(optimizer.iterations.numpy()))

    # 5. final evaluation, sample, export
    t0 = time.time()
    metrics = evaluate_split(cfg, model, tokenizer, packed.val_rows, packed.unigram_counts,
                             cfg.eval.final_steps)
    sample = sampler(sample_prompt(cfg), **sample_kwargs)
    if masker is None:
        log(f"eval: val_loss {metrics['val_loss']:.4f} (unigram "
            f"{metrics['unigram_val_loss']:.4f}), ppl {metrics['val_perplexity']:.2f}, bpb "
            f"{metrics['val_bits_per_byte']:.4f} ({time.time() - t0:.1f}s)")
    else:
        log(f"eval: val_loss {metrics['val_loss']:.4f} (unigram "
            f"{metrics['unigram_val_loss']:.4f}), masked accuracy "
            f"{metrics['val_masked_accuracy']:.4f} (baseline "
            f"{metrics['baseline_masked_accuracy']:.4f}), ppl {metrics['val_perplexity']:.2f} "
            f"({time.time() - t0:.1f}s)")
    log(f"sample: {sample!r}")
    saved_model, export_error = None, None
    if cfg.export.enabled:
        from tfpretrain.export import ExportValidationError, export_saved_model

        t0 = time.time()
        try:
            saved_model = export_saved_model(model, tokenizer, cfg, run_dir)
            log(f"exported {saved_model} ({time.time() - t0:.1f}s)")
        except ExportValidationError as exc:  # the trained run is kept; nothing published
            export_error = str(exc)
            log(f"warning: the export was not published: {exc}")
    steps_done = int(optimizer.iterations.numpy())
    summary = {
        "run_dir": str(run_dir), "saved_model": str(saved_model) if saved_model else None,
        **({"export_error": export_error} if export_error else {}),
        "params": params, "arch": cfg.model.arch, "tokenizer": tokenizer.kind,
        "vocabulary_size": tokenizer.vocabulary_size, "steps": steps_done,
        "tokens_seen": steps_done * tokens_per_step,
        "wall_seconds": round(time.time() - t_start, 2),
        "train_seconds": round(logger.train_seconds, 2),
        "tokens_per_second": round(logger.tokens_per_second, 1),
        "first_step_seconds": round(logger.first_step_seconds or 0.0, 2),
        "checkpoint_seconds": round(manager.seconds, 2),
        **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()},
        "skipped_steps": int(model.skipped_steps.numpy()),
        "clipped_steps": int(model.clipped_steps.numpy()),
        "rollbacks": guard["rollbacks"],
        "lr_scale": guard["lr_scale"],
        "weights_sha256": weights_sha256(model),
        "sample": sample,
    }
    write_atomic(run_dir / "summary.json", json.dumps(summary, indent=1))
    logger.finish(summary, [run_dir / "config.yaml", run_dir / "summary.json"])
    return summary
