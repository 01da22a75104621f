"""Callbacks: per-step TensorBoard scalars, eval-time samples, checkpoints, stop at steps."""
from __future__ import annotations

import math
import sys
import threading
import time

import keras
import numpy as np

from tfpretrain.config import SET_LOSS, TASK_ACC
from tfpretrain.models.lm import LOG_FIELDS


class Meter:
    """A run's FLOPs, device peak and price: turns tokens/s and elapsed seconds into MFU,
    ETA and dollars (``training.budget`` holds the convention)."""

    def __init__(self, device, flops_per_token: int, peak_flops, price_per_hour: float,
                 total_steps: int, precision: str = "float32", copies: int = 1):
        self.device, self.flops_per_token = device, flops_per_token
        self.peak_flops, self.price_per_hour = peak_flops, price_per_hour
        self.total_steps, self.precision, self.copies = total_steps, precision, copies

    def mfu(self, tokens_per_second: float):
        """Achieved model FLOP/s over the peak. On a CPU, a rate above the measured peak
        proves that measurement low: the peak becomes the achieved rate, here and in the
        cache for later runs (``hardware.raise_cpu_peak``), and MFU reads 100%."""
        from tfpretrain.hardware import mfu, peak_cache_path, raise_cpu_peak

        u = mfu(tokens_per_second, self.flops_per_token, self.peak_flops)
        if u is not None and u > 1.0 and self.device.is_cpu:
            achieved = tokens_per_second * self.flops_per_token
            old = raise_cpu_peak(self.precision, achieved / self.copies)
            print(f"[tfpretrain] MFU {100 * u:.0f}% > 100%: this CPU's cached matmul peak "
                  f"({self.peak_flops / 1e12:.3f} TFLOP/s{' ' if old else ', '}"
                  f"{peak_cache_path() if old else 'not cached'}) was measured while the "
                  f"machine was busy; the peak is now {achieved / 1e12:.3f} TFLOP/s, this "
                  "run's rate", file=sys.stderr, flush=True)
            self.peak_flops, u = achieved, 1.0
        return u

    def cost(self, seconds: float) -> float:
        return seconds / 3600 * self.price_per_hour

    def progress(self, step: int, tokens_per_second: float, tokens_per_step: int,
                 elapsed: float, logs: dict | None = None) -> str:
        """One log line: step, the interval's loss, val_loss and learning rate (from Keras's
        ``logs``), tokens/s, MFU, elapsed, ETA, cost so far."""
        from tfpretrain.training.budget import format_duration

        left = (self.total_steps - step) * tokens_per_step / max(tokens_per_second, 1e-9)
        u, logs = self.mfu(tokens_per_second), logs or {}
        sets = sorted(k for k in logs if SET_LOSS.fullmatch(k)  # eval.sets, eval.tasks
                      or TASK_ACC.fullmatch(k))
        shown = [f"{k} {logs[k]:.4f}" for k in ("loss", "val_loss", *sets) if k in logs]
        shown += [f"lr {logs['lr']:.2e}"] if "lr" in logs else []
        return (f"step {step:,}/{self.total_steps:,}: "
                f"{', '.join(shown) + ' | ' if shown else ''}{tokens_per_second:,.0f} tok/s, MFU "
                f"{'n/a' if u is None else f'{100 * u:.1f}%'}, elapsed "
                f"{format_duration(elapsed)}, ETA {format_duration(left)}, cost so far "
                f"${self.cost(elapsed):,.4f}")

    def summary(self, tokens_per_second: float, seconds: float,
                steady_tokens_per_second: float | None = None) -> dict:
        u = self.mfu(tokens_per_second)
        steady = None if steady_tokens_per_second is None \
            else self.mfu(steady_tokens_per_second)
        return {"device": self.device.label, "model_flops_per_token": self.flops_per_token,
                "peak_tflops": None if not self.peak_flops else round(self.peak_flops / 1e12, 4),
                "mfu": None if u is None else round(u, 4),
                "steady_mfu": None if steady is None else round(steady, 4),
                "price_per_hour": self.price_per_hour,
                "cost_usd": round(self.cost(seconds), 6)}


class StepLogger(keras.callbacks.Callback):
    """Sends train/{loss,grad_norm,learning_rate,skipped} for *every* step (the model keeps
    a per-step buffer, so this holds with steps_per_execution > 1), train/tokens_per_second,
    and val/{loss,perplexity} plus a text sample at each evaluation, to every sink
    (TensorBoard, and MLflow / W&B when enabled; see training.tracking)."""

    def __init__(self, sinks, tokens_per_step: int, sampler=None, sample_kwargs=None,
                 prompt: str = "", meter: Meter | None = None):
        super().__init__()
        self.meter = meter
        self.started = time.time()
        self.sinks = sinks
        self.tokens_per_step = tokens_per_step
        self.sampler, self.sample_kwargs, self.prompt = sampler, sample_kwargs or {}, prompt
        self.train_seconds = 0.0
        self.trained_steps = 0
        self.last_sample = ""
        self.first_step_seconds = None  # process start -> first step done (imports, data, XLA)
        self.first_execution = (0, 0.0)  # (steps, seconds) of the first call: compilation
        self._t0 = None
        self._last_step = None

    def _step(self) -> int:
        return int(self.model.optimizer.iterations.numpy())

    def on_train_batch_begin(self, batch, logs=None):
        if self._t0 is None:
            self._t0 = time.perf_counter()
            self._last_step = self._step()

    def on_train_batch_end(self, batch, logs=None):
        step = self._step()
        now = time.perf_counter()
        if self.first_step_seconds is None:
            from tfpretrain import PROCESS_START

            self.first_step_seconds = time.time() - PROCESS_START
        n = step - self._last_step
        elapsed = now - self._t0
        if self.trained_steps == 0:  # this process's first execution: tracing and XLA
            self.first_execution = (n, elapsed)
        self.train_seconds += elapsed
        self.trained_steps += n
        if n > 0:
            values = self.model.step_log.numpy()  # a ring buffer of the last steps' rows
            steps = np.arange(step - n + 1, step + 1)
            rows = values[(steps - 1) % values.shape[0]]
            speed = self._speed(n * self.tokens_per_step / elapsed, logs) if elapsed > 0 \
                else {}
            for sink in self.sinks:
                sink.rows(steps, [f"train/{name}" for name in LOG_FIELDS], rows)
                if speed:
                    sink.scalars(step, speed)
        self._t0, self._last_step = time.perf_counter(), step

    def _speed(self, tokens_per_second: float, logs) -> dict:
        """tokens/s, MFU and cost so far: TensorBoard scalars, and (through ``logs``) the
        progress bar."""
        out = {"train/tokens_per_second": tokens_per_second}
        if logs is not None:
            logs["tok/s"] = tokens_per_second
        if self.meter is not None:
            out["train/cost_usd"] = self.meter.cost(time.time() - self.started)
            u = self.meter.mfu(tokens_per_second)
            if u is not None:
                out["train/mfu"] = u
                if logs is not None:
                    logs["mfu"] = u
        return out

    def on_epoch_end(self, epoch, logs=None):
        step = self._step()
        logs = logs if logs is not None else {}
        if self.meter is not None and self.train_seconds > 0:
            print("[tfpretrain] " + self.meter.progress(
                step, self.steady_tokens_per_second or self.tokens_per_second,
                self.tokens_per_step, time.time() - self.started, logs), flush=True)
        if "val_loss" in logs:  # every val_* metric the objective's model reports
            scalars = {f"val/{k[4:]}": float(v) for k, v in logs.items() if k.startswith("val_")}
            scalars["val/perplexity"] = math.exp(min(scalars["val/loss"], 50.0))
            scalars.update({f"val/{k}": float(v) for k, v in logs.items()
                            if k.startswith("task_")})  # eval.tasks
            for sink in self.sinks:
                sink.scalars(step, scalars)
        if self.sampler is not None:
            self.last_sample = self.sampler(self.prompt, **self.sample_kwargs)
            for sink in self.sinks:
                sink.text(step, "val/sample", self.last_sample)
        for sink in self.sinks:
            sink.flush()
        # time spent validating and sampling is not training time
        self._t0 = time.perf_counter()

    def on_train_end(self, logs=None):
        for sink in self.sinks:
            sink.flush()

    def finish(self, summary: dict | None, files=()) -> None:
        """End every sink's run (summary None: the run stopped early)."""
        for sink in self.sinks:
            sink.finish(summary, list(files))

    @property
    def tokens_per_second(self) -> float:
        """Over all of this process's training time, its first call's compilation included."""
        if self.train_seconds <= 0:
            return 0.0
        return self.trained_steps * self.tokens_per_step / self.train_seconds

    @property
    def steady_tokens_per_second(self) -> float | None:
        """After the first call (tracing and XLA compilation excluded): the rate the run
        keeps, and the one to compare with other tools' per-iteration figures. None when
        the run had only one call."""
        steps, seconds = self.first_execution
        if self.trained_steps <= steps or self.train_seconds <= seconds:
            return None
        return ((self.trained_steps - steps) * self.tokens_per_step
                / (self.train_seconds - seconds))


class DivergenceStop(keras.callbacks.Callback):
    """``train.guard: false``: a step whose loss or gradient norm is not finite ends the run
    (``guard.Diverged``, exit 3) before anything is sampled, evaluated or checkpointed from
    the broken weights."""

    def __init__(self, manager):
        super().__init__()
        self.manager = manager

    def on_train_batch_end(self, batch, logs=None):
        import numpy as np

        from tfpretrain.training.guard import diverged

        # loss and grad norm; under loss scaling (mixed_float16) an overflowing gradient is
        # normal and Keras's LossScaleOptimizer skips it itself: only the loss counts
        columns = 1 if self.model.optimizer.loss_scaled else 2
        if not np.isfinite(self.model.step_log.numpy()[:, :columns]).all():
            raise diverged(int(self.model.optimizer.iterations.numpy()), self.manager)


class StopAtStep(keras.callbacks.Callback):
    """Ends fit at exactly ``total_steps`` optimizer steps (the last epoch may be short)."""

    def __init__(self, total_steps: int):
        super().__init__()
        self.total_steps = total_steps

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) >= self.total_steps:
            self.model.stop_training = True


class CheckpointEvery(keras.callbacks.Callback):
    """Commits a checkpoint every ``every`` steps and when training ends (unless ``hold()``
    says not to: a run stopping for a rollback must not checkpoint its bad streak). A
    checkpoint due while steps are being skipped waits for the first accepted step, so a
    rollback never returns into a skip streak. ``extra()``: what else goes into the
    checkpoint's state.json."""

    def __init__(self, manager, extra, every: int, total: int, hold=lambda: False):
        super().__init__()
        self.manager, self.extra, self.every, self.hold = manager, extra, every, hold
        self.total = total
        self.last_saved = None
        self.pending = False

    def _save(self):
        step = int(self.model.optimizer.iterations.numpy())
        if step != self.last_saved:
            self.manager.save(step, self.extra())
            self.last_saved = step

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) % self.every == 0:
            self.pending = True
        if self.pending and int(self.model.optimizer.consecutive_skips.numpy()) == 0:
            self._save()
            self.pending = False

    def on_train_end(self, logs=None):
        """The end of a fit() call (an evaluation interval, or all steps): saved unless a
        rollback follows or, before the last step, steps are still being skipped (then
        the save waits for the next accepted step, in the next fit() call)."""
        done = int(self.model.optimizer.iterations.numpy()) >= self.total
        if self.hold() or (not done and int(self.model.optimizer.consecutive_skips.numpy())):
            self.pending = not self.hold()
            return
        self._save()
        self.pending = False


class PreemptionCheckpoint(keras.callbacks.Callback):
    """After SIGTERM/SIGINT: commit a checkpoint at the next step boundary and stop.
    ``signals(signum, step)`` (``Placement.signals``): {worker: signal} of every worker
    that had one when they last asked each other (multi_worker: the same answer on every
    worker after the same step, so all stop there together; None: not asked this step)."""

    def __init__(self, manager, extra, preemption, signals):
        super().__init__()
        self.manager, self.extra, self.preemption = manager, extra, preemption
        self.signals = signals

    def _stop_now(self, step: int) -> bool:
        agreed = self.signals(self.preemption.signum, step)
        for worker, signum in (agreed or {}).items():
            self.preemption.stop_with(worker, signum)
        return bool(agreed)

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        if self._stop_now(step) and not self.model.stop_training:
            path = self.manager.save(step, self.extra())
            print(f"[tfpretrain] checkpoint {path} committed at step {step}; rerun the same "
                  "command to resume", flush=True)
            self.model.stop_training = True


class StallWatch(keras.callbacks.Callback):
    """multi_worker: a training step or evaluation batch that waits more than ``timeout``
    seconds (on a peer that is alive but not taking part: stuck, or slow in a write of its
    own) aborts this worker's collectives, and the run ends as for a lost peer
    (``train.rerun_exit_code``). TensorFlow's own per-collective timeout is not used: it
    parks one thread per collective for the whole timeout (base_collective_executor.cc),
    ~11 per step here, which exhausted the process's threads after ~1,400 steps. The first
    batch of each kind (training, evaluation) in this process traces and compiles, so it
    may take ``FIRST_BATCH`` times as long. One thread, waking every ``every`` seconds."""

    FIRST_BATCH = 4

    def __init__(self, timeout: float, every: float = 1.0):
        super().__init__()
        self.timeout, self.every = timeout, every
        self.since = None  # (when the batch in progress began, the seconds it may take)
        self.seen = set()  # kinds of batch ("train", "test") finished in this process
        self._stop = threading.Event()

    def on_train_begin(self, logs=None):
        self._stop = threading.Event()
        threading.Thread(target=self._watch, args=(self._stop,), daemon=True,
                         name="tfpretrain stall watch").start()

    def on_train_end(self, logs=None):
        self._stop.set()
        self.since = None

    def _begin(self, kind: str) -> None:
        first = kind not in self.seen
        self.since = (time.monotonic(), self.timeout * (self.FIRST_BATCH if first else 1))

    def _end(self, kind: str) -> None:
        self.since = None
        self.seen.add(kind)

    def on_train_batch_begin(self, batch, logs=None):
        self._begin("train")

    def on_train_batch_end(self, batch, logs=None):
        self._end("train")

    def on_test_batch_begin(self, batch, logs=None):
        self._begin("test")

    def on_test_batch_end(self, batch, logs=None):
        self._end("test")

    def _watch(self, stop: threading.Event) -> None:
        from tfpretrain import compat

        while not stop.wait(self.every):
            since = self.since
            if since is not None and time.monotonic() - since[0] > since[1]:
                compat.abort_collectives(f"a step waited over {since[1]:g} s for the other "
                                         "workers, train.worker_timeout")
                return


class RollbackMonitor(keras.callbacks.Callback):
    """Stops fit when ``after`` consecutive steps were skipped, so the trainer can roll back."""

    def __init__(self, after: int):
        super().__init__()
        self.after = after
        self.requested = False

    def on_train_batch_end(self, batch, logs=None):
        if self.after and int(self.model.optimizer.consecutive_skips.numpy()) >= self.after:
            self.requested = True
            self.model.stop_training = True


def set_metrics(name: str, metrics: dict) -> dict:
    """An ``eval.sets`` entry's metrics (an objective's ``evaluate``) as
    ``val_<name>_<metric>``: the loss, bits per byte and accuracies, not the counts."""
    return {f"val_{name}_{k[4:]}": v for k, v in metrics.items()
            if k.startswith("val_") and isinstance(v, float)
            and k not in ("val_perplexity", "val_tokens", "val_bytes")}


class ValidationSets(keras.callbacks.Callback):
    """``eval.sets`` and ``eval.tasks``: after each validation, each of ``scorers`` (``() ->
    {metric: value}``: an extra set's ``val_<name>_*``, a task's ``task_<name>_*``) run on
    the weights validation used (EvaluationWeights, last in the list, has not put the
    training weights back yet), its metrics added to the epoch's logs, which StepLogger then
    shows and sends like ``val_loss``. Goes before StepLogger."""

    def __init__(self, scorers):
        super().__init__()
        self.scorers = list(scorers)

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or "val_loss" not in logs:
            return
        for score in self.scorers:
            logs.update(score())


class EvaluationWeights(keras.callbacks.Callback):
    """Validation and the eval-time sample on the weights to evaluate
    (``optimizers.evaluation_weights``: schedule-free AdamW's average); the training weights
    are back before the next step. Goes last, so the other callbacks' on_epoch_end (the
    sample) still sees the evaluation weights."""

    def __init__(self):
        super().__init__()
        self._inside = None

    def on_test_begin(self, logs=None):
        from tfpretrain.training.optimizers import evaluation_weights

        if self._inside is None:
            self._inside = evaluation_weights(self.model)
            self._inside.__enter__()

    def _leave(self):
        if self._inside is not None:
            inside, self._inside = self._inside, None
            inside.__exit__(None, None, None)

    def on_epoch_end(self, epoch, logs=None):
        self._leave()

    def on_train_end(self, logs=None):
        self._leave()
