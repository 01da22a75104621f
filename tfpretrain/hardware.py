"""Devices: datasheet peaks and typical prices, which device this process trains on, the
CPU's measured matmul peak, and MFU.

Peaks are dense (no structured sparsity) TFLOP/s per chip from the vendors' datasheets.
``fp32`` is what a float32 matmul gets by default in TensorFlow and JAX: TF32 tensor cores
on Ampere and newer NVIDIA GPUs (TensorFlow enables TF32 by default), plain FP32 before.
Prices are typical on-demand US$ per device-hour (late 2026; L4 is smolGPT's $13 / 18.5 h);
set ``train.price_per_hour`` (or ``estimate --price-per-hour``) to your own.
A CPU's peak is not in any table: it is measured by a short matmul benchmark (cached).
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tfpretrain.errors import UserError


@dataclass(frozen=True)
class Device:
    name: str                   # the key users type (--device l4)
    label: str                  # what it is
    bf16: Optional[float]       # peak TFLOP/s in bfloat16 (None: not supported)
    fp32: Optional[float]       # peak TFLOP/s of a float32 matmul (TF32 where default)
    fp16: Optional[float]       # peak TFLOP/s in float16
    price_per_hour: float       # typical on-demand US$ per device-hour
    match: tuple = ()           # substrings of the driver's device name

    def peak(self, precision: str) -> Optional[float]:
        """Peak FLOP/s (not TFLOP/s) for a ``train.precision`` value."""
        by_precision = {"mixed_bfloat16": self.bf16, "mixed_float16": self.fp16}
        tf = by_precision.get(precision, self.fp32)
        return None if tf is None else tf * 1e12

    @property
    def is_cpu(self) -> bool:
        return self.name == "cpu"


DEVICES = {d.name: d for d in (
    Device("h200", "NVIDIA H200 (SXM)", 989.0, 494.5, 989.0, 3.50, ("H200",)),
    Device("h100", "NVIDIA H100 (SXM)", 989.0, 494.5, 989.0, 2.49, ("H100",)),
    Device("a100", "NVIDIA A100 (40/80 GB)", 312.0, 156.0, 312.0, 1.29, ("A100",)),
    Device("l4", "NVIDIA L4", 121.0, 60.0, 121.0, 0.70, ("L4",)),
    Device("a10g", "NVIDIA A10G (AWS)", 70.0, 35.0, 70.0, 1.01, ("A10G",)),
    Device("t4", "NVIDIA T4", None, 8.1, 65.0, 0.35, ("T4",)),
    Device("v100", "NVIDIA V100", None, 15.7, 125.0, 2.48, ("V100",)),
    Device("tpu-v4", "Google TPU v4 (per chip)", 275.0, None, None, 3.22, ("TPU v4",)),
    Device("tpu-v5e", "Google TPU v5e (per chip)", 197.0, None, None, 1.20,
           ("TPU v5 lite", "TPU v5e")),
)}
CPU_PRICE_PER_CORE_HOUR = 0.03  # typical on-demand vCPU-hour (general-purpose VMs)


def get_device(name: str) -> Device:
    key = name.strip().lower()
    if key == "cpu":
        return cpu_device(measure=False)
    if key not in DEVICES:
        raise UserError(f"unknown device {name!r}; choose one of: "
                        f"{', '.join(list(DEVICES) + ['cpu'])}")
    return DEVICES[key]


def match_device(driver_name: str) -> Optional[Device]:
    """The table's entry for a driver's device name ("NVIDIA H100 80GB HBM3", ...)."""
    for device in DEVICES.values():
        if any(m.lower() in driver_name.lower() for m in device.match):
            return device
    return None


def _cpu_model() -> str:
    try:
        name = cpu_model_from(Path("/proc/cpuinfo").read_text())
    except OSError:
        name = None
    return name or platform.processor() or platform.machine()


def cpu_model_from(cpuinfo: str) -> str | None:
    """The first processor's model name in /proc/cpuinfo text, with its family and model
    numbers where given: cloud VMs often report only "AMD EPYC", which hides generations
    whose speeds differ by 2x (the measured peak is cached under this name)."""
    fields = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if not key.strip() and fields:
            break  # the end of the first processor's block
        fields.setdefault(key.strip(), value.strip())
    if "model name" not in fields:
        return None
    if "cpu family" in fields and "model" in fields:
        return f"{fields['model name']} (family {fields['cpu family']} model {fields['model']})"
    return fields["model name"]


def cpu_has_bf16() -> bool:
    """Native bfloat16 matmul instructions (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_device(measure: bool = True) -> Device:
    """This machine's CPU, its peaks measured (``measure``) or unknown (None)."""
    cores = os.cpu_count() or 1
    fp32 = bf16 = None
    if measure:
        fp32, bf16 = measured_cpu_peak("float32"), measured_cpu_peak("bfloat16")
    return Device("cpu", f"CPU: {_cpu_model()}, {cores} cores",
                  bf16 / 1e12 if bf16 else None, fp32 / 1e12 if fp32 else None, None,
                  round(CPU_PRICE_PER_CORE_HOUR * cores, 4))


def measured_cpu_peak(dtype: str = "float32") -> Optional[float]:
    """FLOP/s of a 2048x2048 matmul on this CPU with the active Keras backend, best of a
    few timed repeats (~1-2 s once; cached per CPU model, core count, backend and dtype).
    A measurement taken while the machine was busy reads low; :func:`raise_cpu_peak`
    corrects the cache when a run does better."""
    key = _peak_key(dtype)
    cached = _read_peaks()
    if key not in cached:
        cached[key] = _time_matmul(dtype)
        _write_peaks(cached)
    return cached[key]


def raise_cpu_peak(precision: str, achieved_flops: float) -> Optional[float]:
    """A run on this CPU that achieved ``achieved_flops`` model FLOP/s in ``precision``
    proves the peak is at least that: if the cached measurement is lower, store the achieved
    rate and return the old peak (else None)."""
    key = _peak_key("bfloat16" if precision == "mixed_bfloat16" else "float32")
    cached = _read_peaks()
    old = cached.get(key)
    if old is None or achieved_flops <= old:
        return None
    cached[key] = achieved_flops
    _write_peaks(cached)
    return old


def peak_cache_path() -> Path:
    from tfpretrain.files import cache_root

    return cache_root() / "cpu_peak.json"


def _peak_key(dtype: str) -> str:
    import keras

    return f"{_cpu_model()}|{os.cpu_count()}|{keras.backend.backend()}|{dtype}"


def _read_peaks() -> dict:
    try:
        return json.loads(peak_cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _write_peaks(peaks: dict) -> None:
    from tfpretrain.files import write_atomic

    path = peak_cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(peaks, indent=1))
    except OSError:
        pass  # a read-only home: measure again next time


def _time_matmul(dtype: str, n: int = 2048, repeats: int = 3) -> Optional[float]:
    import keras
    from keras import ops

    if dtype == "bfloat16" and not cpu_has_bf16():
        return None
    a = ops.cast(keras.random.normal((n, n), seed=1), dtype)
    b = ops.cast(keras.random.normal((n, n), seed=2), dtype)
    ops.convert_to_numpy(ops.cast(ops.matmul(a, b)[0, 0], "float32"))  # warm up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(4):
            c = ops.matmul(a, b)
        ops.convert_to_numpy(ops.cast(c[0, 0], "float32"))
        best = min(best, (time.perf_counter() - t0) / 4)
    return 2 * n ** 3 / best


def detect(measure_cpu: bool = True) -> Device:
    """The device this process trains on: the first accelerator of the active Keras
    backend, matched against the table (an unknown GPU keeps its name, peaks unknown),
    else the CPU with its measured peaks."""
    name = _accelerator_name()
    if name is None:
        return cpu_device(measure=measure_cpu)
    return match_device(name) or Device(name.lower().replace(" ", "-"), name, None, None,
                                        None, 0.0)


def _accelerator_name() -> Optional[str]:
    import keras

    if keras.backend.backend() == "jax":
        import jax

        dev = jax.devices()[0]
        return None if dev.platform == "cpu" else dev.device_kind
    import tensorflow as tf

    for kind in ("TPU", "GPU"):
        found = tf.config.list_physical_devices(kind)
        if found:
            details = tf.config.experimental.get_device_details(found[0])
            return details.get("device_name", kind)
    return None


def gpu_supports_bf16() -> bool:
    """An NVIDIA GPU of compute capability 8.0 (Ampere) or newer, or a TPU."""
    import tensorflow as tf

    if tf.config.list_physical_devices("TPU"):
        return True
    for gpu in tf.config.list_physical_devices("GPU"):
        cc = tf.config.experimental.get_device_details(gpu).get("compute_capability")
        if cc and tuple(cc) >= (8, 0):
            return True
    return False


def mfu(tokens_per_second: float, flops_per_token: float,
        peak_flops: Optional[float]) -> Optional[float]:
    """Model FLOPs utilization: achieved model FLOP/s over the device's peak."""
    if not peak_flops or tokens_per_second <= 0:
        return None
    return tokens_per_second * flops_per_token / peak_flops
