"""The learning-rate range test (Smith 2015; fastai's lr_find): train the run's model on
its own data while the learning rate grows exponentially from ``low`` to ``high``, one
step each, and read off where the loss falls fastest and where it blows up.

The model, optimizer (``optimizer.name``, its betas, clipping), precision and batches are
the run's; only the schedule is replaced by the sweep, and the stability guard is off (the
divergence is what the test looks for). The loss is smoothed with a bias-corrected EMA
whose time constant is 1/20 of the sweep (beta = 1 - 20/steps, within 0.8..0.98: a fixed
0.98 lags a short sweep by a decade of learning rate); the sweep stops when the smoothed
loss exceeds ``stop_factor`` x its minimum or a loss is not finite.

Suggested learning rate: fastai's ``valley`` - the middle of the longest stretch over
which the smoothed loss keeps falling (its longest decreasing subsequence), which sits
between the steepest-descent point and the minimum. Also reported: the steepest point and
Smith's minimum / 10.
"""
from __future__ import annotations

import dataclasses
import math
import time

import keras
import numpy as np

from tfpretrain.config import Config


def smoothing(steps: int) -> float:
    return min(0.98, max(0.8, 1 - 20 / steps))


@keras.saving.register_keras_serializable(package="tfpretrain")
class ExponentialSweep(keras.optimizers.schedules.LearningRateSchedule):
    """low * (high / low) ** (step / (steps - 1)): low at step 0, high at step steps-1."""

    def __init__(self, low: float, high: float, steps: int):
        self.low, self.high, self.steps = float(low), float(high), int(steps)

    def __call__(self, step):
        from keras import ops

        u = ops.cast(step, "float32") / max(self.steps - 1, 1)
        return self.low * ops.exp(u * math.log(self.high / self.low))

    def get_config(self):
        return {"low": self.low, "high": self.high, "steps": self.steps}


@dataclasses.dataclass
class RangeTest:
    learning_rates: list
    losses: list
    smoothed: list
    diverged_at: int | None          # the step (0-based) the sweep stopped at, if it did
    seconds: float

    @property
    def best(self) -> int:
        return int(np.nanargmin(self.smoothed))

    @property
    def steepest(self) -> int:
        """Where the smoothed loss falls fastest per unit of log learning rate, before the
        minimum (the first 10% are skipped: the EMA is still settling there)."""
        end = self.best + 1
        start = min(len(self.smoothed) // 10, max(end - 2, 0))
        if end - start < 3:
            return self.best
        slope = np.gradient(np.array(self.smoothed[start:end]),
                            np.log(np.array(self.learning_rates[start:end])))
        return start + int(np.argmin(slope))

    @property
    def valley(self) -> int:
        """fastai's valley: over the smoothed losses up to the minimum, the longest
        decreasing subsequence; the point halfway along it."""
        losses = self.smoothed[:self.best + 1]
        run = [1] * len(losses)
        start = end = 0
        for i in range(1, len(losses)):
            for j in range(i):
                if losses[i] < losses[j] and run[i] < run[j] + 1:
                    run[i] = run[j] + 1
            if run[end] < run[i]:
                end, start = i, i - run[i]
        third = (end - start) / 3
        return min(start + int(third) + int(third / 2), self.best)

    @property
    def suggestion(self) -> float:
        return self.learning_rates[self.valley]

    def summary(self) -> dict:
        return {"suggested_learning_rate": _round(self.suggestion),
                "min_loss_learning_rate": _round(self.learning_rates[self.best]),
                "min_loss_learning_rate_over_10": _round(self.learning_rates[self.best] / 10),
                "steepest_learning_rate": _round(self.learning_rates[self.steepest]),
                "min_smoothed_loss": round(float(self.smoothed[self.best]), 4),
                "steps_run": len(self.losses), "diverged_at_step": self.diverged_at,
                "diverged_at_learning_rate": None if self.diverged_at is None else
                _round(self.learning_rates[self.diverged_at]),
                "seconds": round(self.seconds, 1)}


def _round(x: float) -> float:
    return float(f"{x:.3g}")


def sweep_config(cfg: Config, steps: int) -> Config:
    """The run's config for the sweep: no guard (divergence is the signal), one step per
    execution (stop at any step), no warmup (the sweep is one)."""
    train = dataclasses.replace(cfg.train, steps=steps, guard=False, steps_per_execution=1)
    optimizer = dataclasses.replace(cfg.optimizer, warmup_steps=0)
    return dataclasses.replace(cfg, train=train, optimizer=optimizer)


def range_test(cfg: Config, low: float, high: float, steps: int, stop_factor: float = 4.0,
               log=print) -> RangeTest:
    from tfpretrain.data.cache import prepare
    from tfpretrain.data.pipeline import train_dataset
    from tfpretrain.objectives import get_objective, row_format
    from tfpretrain.training import warm_start
    from tfpretrain.training.runtime import build_and_compile, configure_tensorflow

    cfg = warm_start.resolve(sweep_config(cfg, steps))  # model.init_from: sweep from there
    configure_tensorflow(cfg)
    keras.utils.set_random_seed(cfg.train.seed)
    tokenizer, packed, _ = prepare(cfg, row_format(cfg), log=log)
    model = build_and_compile(cfg, tokenizer.vocabulary_size, 1,
                              schedule=ExponentialSweep(low, high, steps))
    if cfg.model.init_from:
        warm_start.load_weights(cfg, model)
    recorder = _Recorder(stop_factor, smoothing(steps))
    data = train_dataset(packed.train_rows, cfg.train.batch_size, cfg.train.seed,
                         to_batch=get_objective(cfg).batcher(cfg, tokenizer))
    t0 = time.time()
    model.fit(data, steps_per_epoch=steps, epochs=1, callbacks=[recorder], verbose=0)
    return RangeTest(recorder.learning_rates, recorder.losses, recorder.smoothed,
                     recorder.diverged_at, time.time() - t0)


class _Recorder(keras.callbacks.Callback):
    """Each step's learning rate and loss (the model's step log), the smoothed loss, and
    the stop at divergence."""

    def __init__(self, stop_factor: float, beta: float):
        super().__init__()
        self.stop_factor, self.beta = stop_factor, beta
        self.learning_rates, self.losses, self.smoothed = [], [], []
        self.diverged_at, self._avg = None, 0.0

    def on_train_batch_end(self, batch, logs=None):
        loss, _, lr, _ = (float(v) for v in self.model.step_log.numpy()[0])
        step = len(self.losses)
        self.learning_rates.append(lr)
        self.losses.append(loss)
        if not math.isfinite(loss):
            self.smoothed.append(float("nan"))
            self.diverged_at = step
            self.model.stop_training = True
            return
        self._avg = self.beta * self._avg + (1 - self.beta) * loss
        smooth = self._avg / (1 - self.beta ** (step + 1))
        self.smoothed.append(smooth)
        if step > 10 and smooth > self.stop_factor * np.nanmin(self.smoothed):
            self.diverged_at = step
            self.model.stop_training = True
