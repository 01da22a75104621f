"""What a run costs: FLOPs, hours and dollars on a device, before (``estimate``, ``fit
--dry-run``) and during a run (MFU, ETA and cost so far in the log and summary).

One convention throughout, nanoGPT's and PaLM's: training FLOPs = tokens x
``models.registry.flops_per_token`` (6 N + 12 L H T); MFU = achieved model FLOP/s over the
device's peak for the run's precision (``tfpretrain.hardware``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from tfpretrain.config import Config
from tfpretrain.hardware import Device

CHINCHILLA_TOKENS_PER_PARAM = 20   # Hoffmann et al. 2022: compute-optimal ~20 tokens/param
ASSUMED_MFU = 0.30                 # used only when neither MFU nor tokens/s is given


def model_flops_per_token(cfg: Config, params: int, vocabulary_size: int) -> int:
    from tfpretrain.models.registry import flops_per_token

    return flops_per_token(cfg.model, params, vocabulary_size)


@dataclass
class Row:
    """One device's projection for a run of ``tokens`` tokens."""
    device: str
    precision: str
    peak_tflops: Optional[float]
    mfu: Optional[float]
    tokens_per_second: Optional[float]
    hours: Optional[float]
    price_per_hour: float
    cost_usd: Optional[float]

    def to_dict(self) -> dict:
        r = lambda v, n: None if v is None else round(v, n)  # noqa: E731
        return {"device": self.device, "precision": self.precision,
                "peak_tflops": self.peak_tflops, "mfu": r(self.mfu, 4),
                "tokens_per_second": r(self.tokens_per_second, 1), "hours": r(self.hours, 3),
                "price_per_hour": self.price_per_hour, "cost_usd": r(self.cost_usd, 2)}


def project(device: Device, precision: str, tokens: float, flops_per_token: float,
            mfu: Optional[float] = None, tokens_per_second: Optional[float] = None,
            price_per_hour: Optional[float] = None) -> Row:
    """Hours and dollars for ``tokens`` on ``device``: from a measured ``tokens_per_second``
    if given (its MFU is then derived), else from ``mfu`` (default ASSUMED_MFU) x peak."""
    peak = device.peak(precision)
    if precision == "mixed_bfloat16" and peak is None and device.fp16:
        precision, peak = "mixed_float16", device.peak("mixed_float16")
    if tokens_per_second is None and peak:
        tokens_per_second = (mfu if mfu is not None else ASSUMED_MFU) * peak / flops_per_token
    if tokens_per_second and peak:
        mfu = tokens_per_second * flops_per_token / peak
    price = device.price_per_hour if price_per_hour is None else price_per_hour
    hours = tokens / tokens_per_second / 3600 if tokens_per_second else None
    return Row(device.name, precision, None if peak is None else peak / 1e12, mfu,
               tokens_per_second, hours, price, None if hours is None else hours * price)


def search_tokens(cfg: Config) -> int:
    """The tokens a search of ``cfg`` trains: every trial at the base batch and sequence
    length for ``tune.steps_per_trial`` steps (Hyperband's brackets train fewer)."""
    t = cfg.tune
    return t.max_trials * t.steps_per_trial * cfg.train.batch_size * cfg.model.sequence_length


def chinchilla_tokens(params: int) -> int:
    return CHINCHILLA_TOKENS_PER_PARAM * params


def chinchilla_params(flops: float) -> float:
    """The compute-optimal size for ``flops`` by the 20-tokens rule: C = 6 N (20 N)."""
    return (flops / (6 * CHINCHILLA_TOKENS_PER_PARAM)) ** 0.5


def run_price(cfg: Config, device: Device) -> float:
    """``train.price_per_hour``, or the device's typical price when it is 0."""
    return cfg.train.price_per_hour or device.price_per_hour


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
