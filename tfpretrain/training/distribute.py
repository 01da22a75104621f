"""Where a run's replicas live: tf.distribute's MirroredStrategy over this host's GPUs (or
logical CPU devices), or the default single device.

The train step (``models.lm``) sums the gradients over the replicas itself, so the
clipping norm and the stability guard see the global batch's gradient, and runs the
guard's apply-or-skip in cross-replica context (as Keras's LossScaleOptimizer does): the
same loss curve as one device with the same global batch (tested on 2 logical CPUs).
XLA is off under a strategy (Keras turns it off; explicit XLA with an Embedding under
MirroredStrategy fails upstream, keras-team/keras#18110).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from tfpretrain.config import Config
from tfpretrain.errors import UserError


@dataclass
class Placement:
    kind: str                         # one_device | mirrored
    strategy: object                  # the tf.distribute strategy (the default one)
    devices: list = field(default_factory=list)
    physical: int = 1                 # devices that add compute (GPUs; logical CPUs: 1)

    @property
    def replicas(self) -> int:
        return max(1, len(self.devices)) if self.kind == "mirrored" else 1

    def describe(self, batch_size: int) -> str:
        if self.kind == "one_device":
            return "one_device"
        return (f"mirrored over {self.replicas} devices ({', '.join(self.devices)}), "
                f"{batch_size // self.replicas} rows per replica")


def split_cpu(count: int) -> None:
    """``train.logical_cpu_devices``: the CPU as ``count`` logical devices; only possible
    before TensorFlow starts (a process that already split it the same way is fine)."""
    import tensorflow as tf

    if count <= 1:
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError:
        if len(tf.config.list_logical_devices("CPU")) != count:
            raise UserError(f"`train.logical_cpu_devices: {count}` must be set before "
                            "TensorFlow starts: run it in a fresh process (python -m "
                            "tfpretrain.fit ...)") from None


def make_placement(cfg: Config) -> Placement:
    """``train.strategy`` resolved against the visible devices; the global batch must split
    evenly into replicas x micro-batches."""
    import tensorflow as tf

    gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
    cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
    devices, physical = (gpus, len(gpus)) if gpus else (cpus, 1)
    kind = cfg.train.strategy
    if kind == "auto":
        kind = "mirrored" if len(devices) > 1 else "one_device"
    if kind == "one_device":
        return Placement("one_device", tf.distribute.get_strategy())
    if len(devices) < 2:
        raise UserError("`train.strategy: mirrored` needs at least 2 devices; this machine "
                        f"shows {len(devices)} ({', '.join(devices) or 'none'}). Set "
                        "`train.logical_cpu_devices: 2` to split the CPU, or use "
                        "`train.strategy: one_device`")
    t = cfg.train
    if t.batch_size % (len(devices) * t.grad_accumulation_steps):
        raise UserError(f"`train.batch_size` ({t.batch_size}, the global batch) must split "
                        f"evenly over {len(devices)} replicas x train.grad_accumulation_steps "
                        f"({t.grad_accumulation_steps}) micro-batches")
    return Placement("mirrored", tf.distribute.MirroredStrategy(devices), devices, physical)
