"""The one place that calls model.fit: run folder -> data -> model -> fit -> evaluation.

:func:`train` reads top to bottom like nanoGPT's train.py, in the named stages of
:class:`Run`. Everything that can fail because of user input (config, paths, empty corpus,
tokenizer) fails before the run folder is created or touched. What happens after training
(exporting the model) is the caller's ``finish`` hook: training knows nothing of serving.
"""
from __future__ import annotations

import contextlib
import gc
import json
import math
import shutil
import sys
import time
from pathlib import Path

from tfpretrain.config import Config
from tfpretrain.training.guard import GuardState
from tfpretrain.training.preemption import PreemptionHandler


def log(msg: str) -> None:
    print(f"[tfpretrain] {msg}", flush=True)


def train(cfg: Config, run_dir: Path, resume: str = "auto", allow_config_change: bool = False,
          finish=None) -> dict:
    """Train ``cfg`` in ``run_dir``; returns the summary (also written to summary.json).

    ``finish(model, tokenizer, cfg, run_dir, log)``: a context manager (fit's export) that
    yields a dict; the final evaluation and sample run in its block, and the dict's fields
    join the summary once it ends. Raises UserError, Preempted."""
    from tfpretrain.training import distill, warm_start
    from tfpretrain.training.distribute import worker_cluster
    from tfpretrain.training.runfolder import claim_run_dir

    run_dir = Path(run_dir)
    cfg = warm_start.resolve(cfg, run_dir)  # model.init_from: its tokenizer and shape, checked
    cfg = distill.resolve(cfg)  # a teacher: its tokenizer, checked before anything is touched
    cluster = worker_cluster(cfg)  # multi_worker: TF_CONFIG checked before anything is touched
    if cluster and not cluster.is_chief:
        return _train_worker(cfg, run_dir, resume, allow_config_change)
    # locked and marked before anything is read or written: nobody else may be writing it
    with claim_run_dir(run_dir), PreemptionHandler() as preemption:
        return Run(cfg, run_dir, preemption).fit(resume, allow_config_change, finish)


def no_finish(*_args):
    """The finish hook of a run that exports nothing."""
    return contextlib.nullcontext({})


def _train_worker(cfg: Config, run_dir: Path, resume: str, allow_config_change: bool) -> dict:
    """multi_worker, not the chief: the same steps in lockstep, resumed from the chief's
    ``run_dir``, writing its checkpoints and logs to a private temporary folder (removed at
    the end), as TensorFlow recommends; no export, no trackers."""
    import tempfile

    scratch = Path(tempfile.mkdtemp(prefix="tfpretrain-worker-"))
    try:
        with PreemptionHandler() as preemption:
            return Run(cfg, scratch, preemption, source_dir=run_dir).fit(
                resume, allow_config_change)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class Run:
    """One training run: its config, folder, data, model (with its optimizer), checkpoint
    manager and guard state, and the data position (the step plus ``guard.data_offset``)."""

    def __init__(self, cfg: Config, run_dir: Path, preemption, source_dir: Path | None = None):
        from tfpretrain.objectives import get_objective

        self.cfg, self.run_dir, self.preemption = cfg, run_dir, preemption
        self.source_dir = source_dir or run_dir  # resumed from (a worker: the chief's)
        self.objective = get_objective(cfg)
        self.guard = GuardState()
        self.init_source = None  # model.init_from: what the first weights were (init_weights)
        self.t_start = time.time()

    # -- the stages, in order ------------------------------------------------------------
    def fit(self, resume: str, allow_config_change: bool, finish=None) -> dict:
        from tfpretrain.training.runfolder import plan_run_dir

        state = plan_run_dir(self.cfg, self.source_dir, resume, allow_config_change, log=log)
        if state.complete:
            log(f"{self.run_dir} already finished {state.resume_step} steps (train.steps="
                f"{self.cfg.train.steps}); nothing to train. Raise train.steps to continue it.")
            summary = self._finished_summary(state.resume_step)
            if summary is not None:
                return summary
        resuming = state.resume_from is not None
        self.setup_tensorflow()
        self.prepare_data(resuming)
        self.build_model()
        if resuming:  # before anything is written: an incompatible checkpoint changes nothing
            self.restore(state.resume_from, state.resume_guard)
        else:
            self.init_weights()
        self.prepare_folder(resuming)
        self.targets = self.teacher_targets()
        self.start_logging()
        try:
            with self.preemption.deferred():  # outside it, a signal stops the run at once
                self.train_loop()
            if self.preemption.stopping:
                raise self.preemption.stopped(self.step)
            return self.finish(finish)
        except BaseException:
            self.logger.finish(None)  # external trackers see the run end (KILLED), not hang
            raise

    def _finished_summary(self, step: int) -> dict | None:
        """The summary of a run already trained to ``step`` (a worker: the chief's), unless
        it is missing or from an earlier length (its write failed after a resume): then the
        final evaluation, export and summary run again."""
        path = self.source_dir / "summary.json"
        if not path.exists():
            return None
        summary = json.loads(path.read_text())
        return summary if summary.get("steps", 0) >= step else None

    def setup_tensorflow(self) -> None:
        import keras
        import tensorflow as tf

        from tfpretrain.training.runtime import configure_tensorflow

        configure_tensorflow(self.cfg)
        self.place()  # a multi-worker strategy must exist before TensorFlow starts
        self.preemption.install()  # MWMS replaced the SIGTERM handler with TensorFlow's
        if self.cfg.train.deterministic:
            tf.config.experimental.enable_op_determinism()
        # Seed first: tf.random.set_seed resets TF's eager context, which invalidates
        # resources created before it (tensorflow_text's SentencePiece op among them).
        keras.utils.set_random_seed(self.cfg.train.seed)

    def place(self) -> None:
        """The replicas (training.distribute): checked before any data is read."""
        from tfpretrain.training.distribute import make_placement

        self.placement = make_placement(self.cfg)

    def prepare_data(self, resuming: bool) -> None:
        """Tokenizer and packed rows; all input errors surface here, before the run folder
        changes. A resumed run keeps its own tokenizer."""
        from tfpretrain.data.cache import prepare
        from tfpretrain.data.tasks import read_tasks
        from tfpretrain.objectives import row_format

        cfg, t0 = self.cfg, time.time()
        tasks = read_tasks(cfg.eval.tasks)  # a bad task file fails before any tokenizing
        if not self.placement.is_chief:
            self.placement.barrier()  # the chief fills the token cache first, once
        self.tokenizer, self.packed, info = prepare(
            cfg, row_format(cfg), self.source_dir / "tokenizer" if resuming else None, log=log)
        if self.placement.is_chief:
            self.placement.barrier()
        if info["hit"]:
            log(f"data: {info['description']}; {info['documents'][0]} train / "
                f"{info['documents'][1]} val documents, from the token cache {info['cache']}")
        asked, got = cfg.tokenizer.vocabulary_size, self.tokenizer.vocabulary_size
        if self.tokenizer.kind not in ("byte",) and got < asked and not cfg.tokenizer.path:
            log(f"tokenizer: vocabulary capped at {got} ids of the {asked} asked "
                "(`tokenizer.vocabulary_size` is a ceiling: the corpus supports no more)")
        log(f"tokenizer: {self.tokenizer.kind}, {self.tokenizer.vocabulary_size} ids; "
            f"{self.packed.train_tokens:,} train / {self.packed.val_tokens:,} val tokens, "
            f"{len(self.packed.train_rows):,} train rows ({time.time() - t0:.1f}s)")
        self.val_sets = self._val_sets()
        self.tasks = self._tasks(tasks)
        self._check_feeders()

    def _val_sets(self) -> dict:
        """eval.sets: {name: (rows, unigram counts)}, tokenized with the run's tokenizer and
        packed like its validation rows; a missing or empty set fails here."""
        from tfpretrain.data.pipeline import text_rows
        from tfpretrain.objectives import row_format

        cfg, out = self.cfg, {}
        for name, spec in (cfg.eval.sets or {}).items():
            rows, counts, documents = text_rows(cfg.data, cfg.train.seed, self.tokenizer,
                                                row_format(cfg), spec, f"eval.sets.{name}")
            out[name] = (rows, counts)
            log(f"data: eval.sets.{name}: {documents:,} documents, {len(rows):,} rows")
        return out

    def _tasks(self, tasks: dict) -> dict:
        """eval.tasks: {name: (Task, TaskRows)}, tokenized with the run's tokenizer."""
        from tfpretrain.data.tasks import describe_task, tokenize_tasks

        out = tokenize_tasks(tasks, self.tokenizer, self.cfg.model.sequence_length)
        for name, (task, rows) in out.items():
            log(f"data: eval.tasks.{name}: {describe_task(task, rows)}")
        return out

    def _check_feeders(self) -> None:
        """data.service: every feeder answers before anything is trained."""
        from tfpretrain.data import service

        self.feeders = targets = service.addresses(self.cfg.data.service)
        if targets:
            service.check_reachable(targets)
            log(f"data: training batches from {len(targets)} tf.data service feeder"
                f"{'s' if len(targets) > 1 else ''} ({', '.join(targets)})")

    def prepare_folder(self, resuming: bool) -> None:
        from tfpretrain.errors import writing
        from tfpretrain.files import write_atomic
        from tfpretrain.training import warm_start

        run_dir = self.run_dir
        with writing(f"the run folder {run_dir}", where=run_dir):
            if not resuming:
                shutil.rmtree(run_dir / "logs", ignore_errors=True)
                (run_dir / "tracking.json").unlink(missing_ok=True)
                self.tokenizer.save(run_dir / "tokenizer")
                (run_dir / warm_start.RECORD).unlink(missing_ok=True)
                if self.init_source:
                    warm_start.record(run_dir, self.init_source)
            write_atomic(run_dir / "config.yaml", self.cfg.to_yaml())

    def build_model(self) -> None:
        """Model and optimizer, compiled explicitly; the checkpoint manager over both."""
        from tfpretrain import faults
        from tfpretrain.training.checkpoints import CheckpointManager
        from tfpretrain.training.runtime import (build_and_compile, choose_steps_per_execution,
                                                 resolve_precision)

        cfg = self.cfg
        distributed = self.placement.distributed
        self.spe = choose_steps_per_execution(cfg, distributed)
        self.precision = resolve_precision(cfg, self.tokenizer.vocabulary_size)
        with self.placement.strategy.scope():
            self.model = build_and_compile(cfg, self.tokenizer.vocabulary_size, self.spe,
                                           precision=self.precision, distributed=distributed)
            self.teacher = self.load_teacher()
        self.optimizer = self.model.optimizer
        self.params = int(self.model.network.count_params())
        self.tokens_per_step = cfg.train.batch_size * cfg.model.sequence_length
        self.manager = CheckpointManager(self.run_dir / "checkpoints", self.model,
                                         self.optimizer, keep=cfg.train.keep_checkpoints,
                                         slow_seconds=faults.checkpoint_delay(cfg))
        # a worker rolls back to the chief's checkpoints: its own scratch folder lacks those
        # from before a restart
        self.rollback_source = self.manager if self.source_dir == self.run_dir else \
            CheckpointManager(self.source_dir / "checkpoints", self.model, self.optimizer)
        log(f"model: {cfg.model.arch}, {self.params:,} parameters; {self.tokens_per_step:,} "
            f"tokens/step, {cfg.train.steps:,} steps = "
            f"{self.tokens_per_step * cfg.train.steps:,} tokens; "
            f"jit_compile={self.model.jit_compile}, "  # as Keras applies it
            f"steps_per_execution={self.spe}, strategy: "
            f"{self.placement.describe(cfg.train.batch_size)}, "
            f"precision={self.precision}, "
            f"grad_accumulation_steps={cfg.train.grad_accumulation_steps}")
        self.meter = self._meter()

    def init_weights(self) -> None:
        """model.init_from: the source's weights, before the first step (training.warm_start);
        a resumed run restores its own checkpoint instead."""
        from tfpretrain.training import warm_start

        if not self.cfg.model.init_from:
            return
        t0 = time.time()
        self.init_source = warm_start.load_weights(self.cfg, self.model)
        at = f" at step {self.init_source['step']:,}" if self.init_source["step"] else ""
        head = ("; the masked-LM head starts new: the preset has none"
                if self.init_source.get("new_head") else "")
        log(f"model: weights from {self.init_source['source']} ({self.init_source['kind']}"
            f"{at}{head}; optimizer, step and schedule start fresh; "
            f"{time.time() - t0:.1f}s)")

    def load_teacher(self):
        """distill.teacher's model, handed to the student's train step (None without)."""
        from tfpretrain.training.distill import load_teacher

        cfg = self.cfg
        if not cfg.distill.teacher:
            return None
        self.teacher_cfg, teacher = load_teacher(cfg, self.tokenizer.vocabulary_size)
        if not cfg.distill.topk:  # else its cached top-k come with the batches
            self.model.set_teacher(teacher)
        log(f"distill: teacher {cfg.distill.teacher} "
            f"({int(teacher.network.count_params()):,} parameters), alpha "
            f"{cfg.distill.alpha}, temperature {cfg.distill.temperature}"
            + (f", {cfg.distill.topk} {'drawn' if cfg.distill.sampled else 'top'} ids of "
               "it cached" if cfg.distill.topk else ""))
        return teacher

    def teacher_targets(self) -> tuple:
        """``distill.topk``: the teacher's cached (ids, log-probabilities) of every training
        row (``distill.teacher_top_k``); () otherwise."""
        from tfpretrain.training.distill import teacher_top_k

        if not self.cfg.distill.topk:
            return ()
        return teacher_top_k(self.cfg, self.teacher, self.packed.train_rows, self.run_dir,
                             self.tokenizer.vocabulary_size, log=log)

    def _meter(self):
        """FLOPs, the device's peak and price: MFU, ETA and cost in the log and summary."""
        from tfpretrain.hardware import detect
        from tfpretrain.training.budget import model_flops_per_token, run_price
        from tfpretrain.training.callbacks import Meter

        device = detect()
        vocab = self.tokenizer.vocabulary_size
        flops = model_flops_per_token(self.cfg, self.params, vocab)
        if self.model.teacher is not None:  # its forward pass (a third of its 6N + 12LHT)
            # counts; a cached top-k (distill.topk) costs one pass, in wall time only
            flops += model_flops_per_token(self.teacher_cfg,
                                           int(self.teacher.network.count_params()), vocab) // 3
        n = self.placement.physical  # several GPUs: their summed peak and price
        peak = device.peak(self.precision)
        meter = Meter(device, flops, peak * n if peak else peak,
                      run_price(self.cfg, device) * n, self.cfg.train.steps,
                      precision=self.precision, copies=n)
        peak = meter.peak_flops
        log(f"device: {device.label}; peak {peak / 1e12:,.2f} TFLOP/s ({self.precision})"
            if peak else f"device: {device.label}; peak unknown for {self.precision}")
        teacher = "; + the teacher forward 2N + 4LHT" if self.model.teacher is not None \
            else ""
        log(f"flops: {flops:,} per token (6N + 12LHT{teacher}); price "
            f"${meter.price_per_hour:.2f}/h (train.price_per_hour)")
        return meter

    def restore(self, path: Path, guard: dict | None) -> None:
        from tfpretrain.training.guard import set_lr_scale

        from tfpretrain.errors import UserError

        t0 = time.time()
        try:
            self.manager.restore(path)
        except (ValueError, AssertionError) as exc:  # shapes or variables do not match
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            raise UserError(f"cannot resume {self.run_dir}: checkpoint {path.name} does not "
                            f"fit the model of this config ({type(exc).__name__}: {first}). "
                            "Nothing was changed; use another --run-dir for the new "
                            "settings") from None
        self.guard = GuardState.from_dict(guard)
        set_lr_scale(self.optimizer, self.guard.lr_scale)
        log(f"resumed from {path} at step {self.step} ({time.time() - t0:.1f}s)")

    def start_logging(self) -> None:
        from tfpretrain.training.callbacks import StepLogger
        from tfpretrain.training.tracking import build_sinks

        cfg = self.cfg
        self.sampler = self.objective.sampler(self.model, self.tokenizer)
        self.prompt = self.objective.sample_prompt(cfg.eval.prompt)
        self.sample_kwargs = dict(max_new_tokens=cfg.eval.sample_tokens,
                                  temperature=cfg.eval.temperature, top_k=cfg.eval.top_k,
                                  seed=cfg.train.seed)
        sinks = build_sinks(cfg, self.run_dir) if self.placement.is_chief else []
        for sink in sinks:
            sink.start(cfg)
        self.logger = StepLogger(sinks, self.tokens_per_step, self.sampler,
                                 self.sample_kwargs, self.prompt, meter=self.meter)

    def train_loop(self) -> None:
        """model.fit, one evaluation interval per "epoch"; a run resumed mid-interval first
        finishes that interval, so evaluations and checkpoints land on the same steps as in
        an unbroken run. Stops for a rollback or a preemption signal (at a step boundary)."""
        from tfpretrain.data.pipeline import eval_dataset
        from tfpretrain.training.guard import check_rollback_budget, roll_back

        cfg, every, total = self.cfg, self.cfg.eval.every, self.cfg.train.steps
        callbacks, rollback, saver = self._callbacks()
        batcher = self.objective.batcher(cfg, self.tokenizer)
        val_ds = eval_dataset(self.packed.val_rows, cfg.train.batch_size, cfg.eval.steps,
                              batcher)
        step = self.step
        while step < total and not self.preemption.stopping:
            first_epoch, partial = step // every, step % every
            with self.placement.lost_worker(step=lambda: self.step), self._feeders():
                self.model.fit(self._train_data(step, batcher), validation_data=val_ds,
                               steps_per_epoch=every - partial if partial else every,
                               initial_epoch=first_epoch,
                               epochs=first_epoch + 1 if partial else math.ceil(total / every),
                               callbacks=callbacks, shuffle=False,
                               # a terminal gets Keras's live bar; a log file only our
                               # line per interval (StepLogger: loss, val_loss, speed)
                               verbose=1 if sys.stdout.isatty() else 0)
            step = self.step
            if rollback.requested:
                rollback.requested = False
                check_rollback_budget(self.guard, cfg.train.max_rollbacks, step,
                                      self.rollback_source, cfg.train.rollback_after)
                step = roll_back(self.model, self.rollback_source, self.guard,
                                 cfg.train.rollback_lr_scale, log)
                saver.last_saved, saver.pending = None, False
                self._log_guard(step)

    def finish(self, finish=None) -> dict:
        """Final evaluation and sample, the caller's finish hook (export), summary.json."""
        from tfpretrain.files import write_atomic
        from tfpretrain.models.lm import weights_sha256
        from tfpretrain.objectives import float32_copy
        from tfpretrain.training.evaluation import rounded
        from tfpretrain.training import warm_start
        from tfpretrain.training.optimizers import evaluation_weights

        cfg = self.cfg
        # the objects training made (traced graphs, Keras state) live until exit: freezing
        # them spares the evaluation's and export's tracing their full collections (up to
        # 3.5 s each, 35 s in a 400-step quickstart run)
        gc.freeze()
        if not self.placement.is_chief:
            return self._finish_worker()
        with evaluation_weights(self.model):  # schedule-free AdamW, optimizer.ema
            # evaluated, sampled and exported in float32 whatever the training precision
            final = float32_copy(self.model, cfg, self.tokenizer.vocabulary_size,
                                 always=self.placement.distributed)
            # the export saves first; its fresh-process check runs during the evaluation
            with (finish or no_finish)(final, self.tokenizer, cfg, self.run_dir, log) as extra:
                t1, score = time.time(), self.objective.evaluator(cfg, final, self.tokenizer)
                metrics = score(self.packed.val_rows, self.packed.unigram_counts,
                                cfg.eval.final_steps)
                sampler = (self.sampler if final is self.model
                           else self.objective.sampler(final, self.tokenizer))
                sample = sampler(self.prompt, **self.sample_kwargs)
                log(f"eval: {self.objective.describe(metrics)} ({time.time() - t1:.1f}s)")
                log(f"sample: {sample!r}")
                sets = {**self._final_sets(score), **self._final_tasks(final)}
        extra.update(self._teacher_metrics())
        steps, model, logger = self.step, self.model, self.logger
        summary = {
            "run_dir": str(self.run_dir), **extra,
            "params": self.params, "arch": cfg.model.arch, **self._tokenizer_summary(),
            "steps": steps,
            "tokens_seen": steps * self.tokens_per_step, **self._speed_summary(),
            "precision": self.precision,
            "grad_accumulation_steps": cfg.train.grad_accumulation_steps,
            "strategy": self.placement.kind, "replicas": self.placement.replicas,
            "workers": self.placement.workers,
            "data_service_feeders": len(self.feeders),
            "checkpoint_seconds": round(self.manager.seconds, 2),
            **rounded(metrics), **sets,
            "skipped_steps": self.skipped_total(),
            "clipped_steps": int(model.optimizer.clipped_steps.numpy()),
            "rollbacks": self.guard.rollbacks,
            "rolled_back_steps": self.guard.discarded_steps,
            "lr_scale": self.guard.lr_scale,
            "weights_sha256": weights_sha256(model),
            "init_from": warm_start.recorded(self.run_dir),
            "sample": sample,
        }
        write_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=1))
        logger.finish(summary, [self.run_dir / "config.yaml", self.run_dir / "summary.json"])
        self.placement.finish()  # the workers wait for the chief's export before exiting
        return summary

    def _tokenizer_summary(self) -> dict:
        """The tokenizer's kind and size, and the size tokenizer.vocabulary_size asked for
        (null when the tokenizer came ready-made: tokenizer.path, model.init_from)."""
        cfg = self.cfg.tokenizer
        return {"tokenizer": self.tokenizer.kind,
                "vocabulary_size": self.tokenizer.vocabulary_size,
                "vocabulary_size_requested": None if cfg.path else cfg.vocabulary_size}

    def _speed_summary(self) -> dict:
        """Times, rates, MFU and cost of this process's run."""
        logger, seconds = self.logger, time.time() - self.t_start
        steady = logger.steady_tokens_per_second
        return {"wall_seconds": round(seconds, 2),
                "train_seconds": round(logger.train_seconds, 2),
                "tokens_per_second": round(logger.tokens_per_second, 1),
                "steady_tokens_per_second": None if steady is None else round(steady, 1),
                "first_step_seconds": round(logger.first_step_seconds or 0.0, 2),
                **self.meter.summary(logger.tokens_per_second, seconds, steady)}

    def _final_sets(self, score) -> dict:
        """eval.sets on the final weights (``score``: their evaluator; ``eval.final_steps``),
        as summary fields."""
        from tfpretrain.training.callbacks import set_metrics
        from tfpretrain.training.evaluation import rounded

        out = {}
        for name, (rows, counts) in self.val_sets.items():
            t0, metrics = time.time(), score(rows, counts, self.cfg.eval.final_steps)
            log(f"eval {name}: {self.objective.describe(metrics)} ({time.time() - t0:.1f}s)")
            out.update(rounded(set_metrics(name, metrics)))
        return out

    def _final_tasks(self, model) -> dict:
        """eval.tasks on the final weights: ``task_<name>_*`` summary fields, and every
        task's whole metrics under ``tasks``."""
        from tfpretrain.data.tasks import describe_metrics, logged_metrics
        from tfpretrain.training.evaluation import rounded, task_evaluator

        if not self.tasks:
            return {}
        score, flat, whole = task_evaluator(self.cfg, model, self.tokenizer), {}, {}
        for name, (task, rows) in self.tasks.items():
            t0, metrics = time.time(), score(task, rows)
            log(f"eval task {name}: {describe_metrics(metrics)} ({time.time() - t0:.1f}s)")
            flat.update(rounded(logged_metrics(name, metrics)))
            whole[name] = {"path": task.path, **rounded(metrics)}
        return {**flat, "tasks": whole}

    def _teacher_metrics(self) -> dict:
        """The teacher's loss on the student's validation rows (distillation only)."""
        from tfpretrain.training.evaluation import evaluate_split

        if self.teacher is None:
            return {}
        m = evaluate_split(self.cfg, self.teacher, self.tokenizer, self.packed.val_rows,
                           self.packed.unigram_counts, self.cfg.eval.final_steps)
        log(f"distill: teacher val_loss {m['val_loss']:.4f} on the same rows")
        return {"distill_teacher": self.cfg.distill.teacher,
                "teacher_val_loss": round(m["val_loss"], 6)}

    def _finish_worker(self) -> dict:
        """multi_worker, not the chief: no evaluation, export or summary file (the chief
        writes them); what it returns shows it holds the chief's weights."""
        from tfpretrain.models.lm import weights_sha256

        summary = {"role": self.placement.role, "chief_run_dir": str(self.source_dir),
                   "steps": self.step, "skipped_steps": self.skipped_total(),
                   "weights_sha256": weights_sha256(self.model),
                   "strategy": self.placement.kind, "replicas": self.placement.replicas,
                   "workers": self.placement.workers}
        self.logger.finish(None)
        self.placement.finish()
        log(f"{self.placement.role}: done at step {self.step}; the chief writes the results")
        return summary

    # -- helpers -------------------------------------------------------------------------
    @property
    def step(self) -> int:
        return int(self.optimizer.iterations.numpy())

    def _checkpoint_state(self) -> dict:
        return {"config": self.cfg.to_dict(), "guard": self.guard.to_dict(),
                "consecutive_skips": int(self.model.optimizer.consecutive_skips.numpy())}

    def skipped_total(self) -> int:
        """Skipped steps over the run's whole history, rolled-back ones included."""
        return int(self.model.optimizer.skipped_steps.numpy()) + self.guard.discarded_skips

    def _log_guard(self, step: int) -> None:
        """Rollback counters to every sink (TensorBoard: train/rollbacks, ...)."""
        scalars = {"train/rollbacks": self.guard.rollbacks,
                   "train/skipped_total": self.skipped_total(),
                   "train/rolled_back_steps": self.guard.discarded_steps,
                   "train/lr_scale": self.guard.lr_scale}
        for sink in self.logger.sinks:
            sink.scalars(step, scalars)
            sink.flush()

    def _callbacks(self):
        from tfpretrain.training.callbacks import (CheckpointEvery, DivergenceStop,
                                                   EvaluationWeights, PreemptionCheckpoint,
                                                   RollbackMonitor, StallWatch, StopAtStep,
                                                   ValidationSets)
        from tfpretrain.training.optimizers import has_evaluation_weights

        cfg = self.cfg
        rollback = RollbackMonitor(cfg.train.rollback_after if cfg.train.guard else 0)
        saver = CheckpointEvery(self.manager, self._checkpoint_state,
                                cfg.train.checkpoint_every or cfg.eval.every, cfg.train.steps,
                                hold=lambda: rollback.requested)
        callbacks = [self.logger, StopAtStep(cfg.train.steps), rollback, saver,
                     PreemptionCheckpoint(self.manager, self._checkpoint_state,
                                          self.preemption, self.placement.signals)]
        if not cfg.train.guard:  # a non-finite step was applied: stop before it spreads
            callbacks.insert(1, DivergenceStop(self.rollback_source))
        if has_evaluation_weights(self.optimizer):  # schedule-free AdamW, optimizer.ema
            callbacks.append(EvaluationWeights())
        if self.val_sets or self.tasks:  # before the logger, which shows what they add
            callbacks.insert(0, ValidationSets(self._scorers()))
        if self.placement.kind == "multi_worker":  # first: a batch ends before the saves
            callbacks.insert(0, StallWatch(cfg.train.worker_timeout))
        return callbacks, rollback, saver

    def _scorers(self) -> list:
        """What ValidationSets runs at every validation: each eval.sets entry
        (``eval.steps`` batches) and each eval.tasks entry (all its items)."""
        from tfpretrain.data.tasks import logged_metrics
        from tfpretrain.training.callbacks import set_metrics
        from tfpretrain.training.evaluation import task_evaluator

        cfg, out = self.cfg, []
        if self.val_sets:
            score = self.objective.evaluator(cfg, self.model, self.tokenizer)  # traced once
            out += [lambda name=name, data=data: set_metrics(name, score(*data, cfg.eval.steps))
                    for name, data in self.val_sets.items()]
        if self.tasks:
            answer = task_evaluator(cfg, self.model, self.tokenizer)
            out += [lambda name=name, task=task: logged_metrics(name, answer(*task))
                    for name, task in self.tasks.items()]
        return out

    @contextlib.contextmanager
    def _feeders(self):
        """data.service: the feeders' errors as one message, a lost feeder ends the run."""
        from tfpretrain.data import service

        with service.feeder_errors(self.feeders), \
                service.watchdog(self.feeders, self.cfg.data.service_timeout,
                                 self.cfg.train.rerun_exit_code):
            yield

    def _train_data(self, step: int, batcher):
        from tfpretrain import faults
        from tfpretrain.data.pipeline import train_dataset

        cfg = self.cfg
        return self.placement.distribute(
            lambda lo, hi: train_dataset(self.packed.train_rows, cfg.train.batch_size,
                                         cfg.train.seed, step + self.guard.data_offset,
                                         poison=faults.poisoned_positions(cfg),
                                         to_batch=batcher, part=(lo, hi),
                                         service=self.feeders, targets=self.targets),
            cfg.train.batch_size)
