"""Where a run's replicas live: tf.distribute's MirroredStrategy over this host's GPUs (or
logical CPU devices), MultiWorkerMirroredStrategy over the hosts TF_CONFIG names, or the
default single device.

The train step (``models.lm``) sums the gradients over the replicas itself, so the
clipping norm and the stability guard see the global batch's gradient; the guard's
optimizer wrapper (``models.guarded``) runs its apply-or-skip in cross-replica context (as
Keras's LossScaleOptimizer does): the
same loss curve as one device with the same global batch (tested on 2 logical CPUs).
XLA is off under a strategy (Keras turns it off; explicit XLA with an Embedding under
MirroredStrategy fails upstream, keras-team/keras#18110).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import time
from dataclasses import dataclass, field

from tfpretrain.config import Config, host_port
from tfpretrain.errors import TEMPFAIL_EXIT, UserError

EXAMPLE_TF_CONFIG = json.dumps({"cluster": {"worker": ["host1:2222", "host2:2222"]},
                                "task": {"type": "worker", "index": 0}})
VOTE_SECONDS = 1.0  # multi_worker: how often the workers ask each other about signals


class WorkerLost(Exception):
    """multi_worker: a peer stopped answering; this worker stops without a traceback and
    with ``train.rerun_exit_code`` (rerun every worker to resume)."""

    exit_code = TEMPFAIL_EXIT

    def __init__(self, role: str, step: int, detail: str):
        super().__init__(f"{role}: lost contact with the other workers at step {step} "
                         f"({detail}). Start every worker again with the same command: they "
                         "resume from the chief's last checkpoint")


@dataclass
class Cluster:
    """The TF_CONFIG of this process: the cluster's tasks and which one this is."""
    tasks: dict                       # job -> [host:port, ...] (chief, worker)
    task_type: str
    task_index: int

    @property
    def size(self) -> int:
        return sum(len(v) for v in self.tasks.values())

    @property
    def is_chief(self) -> bool:
        return self.task_type == "chief" or (self.task_type == "worker" and
                                             self.task_index == 0 and
                                             "chief" not in self.tasks)

    @property
    def role(self) -> str:
        return f"{self.task_type} {self.task_index}"

    @property
    def address(self) -> str:
        return self.tasks[self.task_type][self.task_index]

    @property
    def roles(self) -> list[str]:
        """Every task's role ("chief 0", "worker 1"), in one fixed order."""
        return [f"{job} {i}" for job in ("chief", "worker")
                for i in range(len(self.tasks.get(job, [])))]


def read_cluster(environ=os.environ) -> Cluster | None:
    """TF_CONFIG (as Kubeflow's TFJob and Vertex AI set it), checked; None when unset."""
    raw = environ.get("TF_CONFIG", "").strip()
    if not raw:
        return None

    def bad(why: str) -> UserError:
        return UserError(f"TF_CONFIG {why}. Expected e.g. {EXAMPLE_TF_CONFIG} "
                         "(docs/distributed.md)")

    try:
        spec = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise bad(f"is not valid JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("cluster"), dict):
        raise bad("has no \"cluster\" object")
    tasks = spec["cluster"]
    others = sorted(set(tasks) - {"chief", "worker"})
    if others:
        raise bad(f"names jobs {others}: only \"chief\" and \"worker\" are supported "
                  "(MultiWorkerMirroredStrategy; parameter servers and evaluators are not)")
    if not tasks.get("worker") and not tasks.get("chief"):
        raise bad("lists no workers")
    seen = set()
    for job, addresses in tasks.items():
        if not isinstance(addresses, list) or not addresses:
            raise bad(f"cluster.{job} must be a non-empty list of \"host:port\" strings")
        for address in addresses:
            if host_port(address) is None:
                raise bad(f"cluster.{job} has {address!r}, which is not \"host:port\"")
            if address in seen:
                raise bad(f"lists {address} twice")
            seen.add(address)
    if len(tasks.get("chief", [])) > 1:
        raise bad("lists more than one chief")
    task = spec.get("task")
    if not isinstance(task, dict) or task.get("type") not in tasks:
        raise bad(f"task.type must be one of {sorted(tasks)} (got "
                  f"{(task or {}).get('type') if isinstance(task, dict) else task!r})")
    index = task.get("index", 0)
    if not isinstance(index, int) or not 0 <= index < len(tasks[task["type"]]):
        raise bad(f"task.index must be 0..{len(tasks[task['type']]) - 1} for "
                  f"{task['type']} (got {index!r})")
    return Cluster(tasks, task["type"], index)


def worker_cluster(cfg: Config) -> Cluster | None:
    """The cluster this run trains on with ``multi_worker`` (named, or ``auto`` with a
    TF_CONFIG of several tasks); None otherwise. A malformed TF_CONFIG is a UserError."""
    if cfg.train.strategy not in ("auto", "multi_worker"):
        return None
    cluster = read_cluster()
    if cfg.train.strategy == "multi_worker" and cluster is None:
        raise UserError("`train.strategy: multi_worker` needs the TF_CONFIG environment "
                        "variable naming the cluster and this task (docs/distributed.md)")
    return cluster if cluster and (cluster.size > 1 or cfg.train.strategy == "multi_worker") \
        else None


@dataclass
class Placement:
    kind: str                         # one_device | mirrored | multi_worker
    strategy: object                  # the tf.distribute strategy (the default one)
    devices: list = field(default_factory=list)
    physical: int = 1                 # devices that add compute (GPUs; logical CPUs: 1)
    cluster: Cluster | None = None    # multi_worker: TF_CONFIG
    _sum: object = field(default=None, repr=False)  # multi_worker: a tf.function all-reduce
    _vote: dict = field(default_factory=lambda: {"next": 0, "step": None, "at": 0.0},
                        repr=False)  # multi_worker: signals()' last question, and the next

    @property
    def replicas(self) -> int:
        if self.kind == "multi_worker":
            return int(self.strategy.num_replicas_in_sync)
        return max(1, len(self.devices)) if self.kind == "mirrored" else 1

    @property
    def is_chief(self) -> bool:
        return self.cluster is None or self.cluster.is_chief

    @property
    def distributed(self) -> bool:
        """Under a tf.distribute strategy (even of one replica): no XLA, one step per call."""
        return self.kind != "one_device"

    @property
    def workers(self) -> int:
        return self.cluster.size if self.cluster else 1

    @property
    def role(self) -> str:
        return self.cluster.role if self.cluster else "chief"

    def describe(self, batch_size: int) -> str:
        per = f"{batch_size // self.replicas} rows per replica"
        if self.kind == "one_device":
            return "one_device"
        if self.kind == "multi_worker":
            return (f"multi_worker over {self.cluster.size} workers, {self.replicas} replicas "
                    f"(this is {self.role} at {self.cluster.address}"
                    f"{', the chief' if self.is_chief else ''}), {per}")
        return f"mirrored over {self.replicas} devices ({', '.join(self.devices)}), {per}"

    def finish(self) -> None:
        """multi_worker, at the end: wait for every worker and stop pinging them; the
        processes then leave together (``fit`` exits at once after its summary line:
        TensorFlow's coordination service logs a lost task when one lingers)."""
        if self.kind != "multi_worker":
            return
        from tfpretrain import compat

        self.barrier()
        compat.stop_multi_worker_health_check(self.strategy)

    def barrier(self) -> None:
        """multi_worker: wait until every worker gets here (a one-number all-reduce)."""
        if self.kind != "multi_worker":
            return
        import tensorflow as tf

        strategy = self.strategy

        @tf.function
        def meet():
            return strategy.run(lambda: tf.distribute.get_replica_context().all_reduce(
                "SUM", tf.ones([])))

        with self.lost_worker(step=0):
            meet()

    def signals(self, signum: int | None, step: int) -> dict | None:
        """multi_worker: {role: signal} of the workers that got SIGTERM/SIGINT (this one's
        ``signum`` included), from one small all-reduce that every worker makes after the
        same steps, so all learn it after the same step; None after a step without one.
        The all-reduce costs ~2 ms (loopback, 2 workers): it is made about once every
        ``VOTE_SECONDS``, at intervals the chief sets from its step time. Otherwise
        {role: signum}, or {}."""
        if self.kind != "multi_worker":
            return {self.role: signum} if signum else {}
        last = self._vote["step"]
        if last is not None and last < step < self._vote["next"]:  # (a rollback: ask now)
            return None
        import numpy as np

        roles = self.cluster.roles
        now = time.monotonic()
        mine = np.zeros(len(roles) + 1, np.float32)
        mine[roles.index(self.role)] = signum or 0
        if self.is_chief and last is not None and step > last:  # seconds per step; only
            # the chief's clock, so the sum (with zeros) is exactly the same everywhere
            mine[-1] = (now - self._vote["at"]) / (step - last)
        summed = self._all_reduce_sum(mine) / (self.replicas // len(roles))
        per_step = float(summed[-1])
        every = int(min(1000, max(1, VOTE_SECONDS // per_step))) if per_step > 0 else 1
        self._vote = {"next": step + every, "step": step, "at": now}
        return {role: int(n) for role, n in zip(roles, np.rint(summed[:-1])) if n}

    def _all_reduce_sum(self, values):
        """multi_worker: ``values`` (float32 numpy) summed over every replica."""
        import tensorflow as tf

        if self._sum is None:
            strategy = self.strategy

            @tf.function
            def total(mine):  # (made on the replica's device: the all-reduce needs one)
                return strategy.run(lambda: tf.distribute.get_replica_context().all_reduce(
                    "SUM", tf.identity(mine)))
            self._sum = total
        with self.lost_worker(step=0):
            return self.strategy.experimental_local_results(self._sum(values))[0].numpy()

    @contextlib.contextmanager
    def lost_worker(self, step=0):
        """multi_worker: TensorFlow's errors for a peer that died or stopped answering
        (collectives aborted by the health check, or timed out) -> :class:`WorkerLost`.
        ``step``: the step reached, or a function returning it."""
        import tensorflow as tf

        try:
            yield
        except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
                tf.errors.CancelledError, tf.errors.AbortedError,
                tf.errors.FailedPreconditionError, tf.errors.InternalError) as exc:
            if self.kind != "multi_worker":
                raise
            raise WorkerLost(self.role, step() if callable(step) else step,
                             self._what_failed(exc.message or type(exc).__name__)) from None

    def _what_failed(self, message: str) -> str:
        """TensorFlow's error, shortened to the peers it names (or its first line)."""
        named = {f"{job} {task}" for job, task in
                 re.findall(r"/job:(\w+)/(?:replica:\d+/)?task:(\d+)", message)}
        stalled = re.search(r"a step waited over [^\n]*?train\.worker_timeout", message)
        if stalled:  # callbacks.StallWatch
            return stalled.group(0)
        peers = sorted(named - {self.role})
        if peers:
            return f"{', '.join(peers)} stopped answering"
        known = re.search(r"Connection reset by peer|unhealthy|Socket closed|failed to connect"
                          r"|Connection refused|[Dd]eadline [Ee]xceeded|timed out|aborted",
                          message)
        return (f"another worker stopped answering: {known.group(0)}" if known
                else re.sub(r"\{\{.*?\}\}", "", message).strip()[:200])

    def distribute(self, make_dataset, batch_size: int):
        """What model.fit gets for training. multi_worker: each worker makes only its own
        rows of every global batch (``make_dataset(lo, hi)``: rows lo..hi-1 of each batch),
        split into its replicas' shares; otherwise the whole batch (Keras splits it)."""
        if self.kind != "multi_worker":
            return make_dataset(0, batch_size)
        per = batch_size // self.replicas

        def per_worker(context):
            local = self.replicas // context.num_input_pipelines
            lo = context.input_pipeline_id * local * per
            ds = make_dataset(lo, lo + local * per)
            return ds.unbatch().batch(per, drop_remainder=True) if local > 1 else ds

        return self.strategy.distribute_datasets_from_function(per_worker)


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
    """``train.strategy`` resolved against TF_CONFIG and the visible devices; the global
    batch must split evenly into replicas x micro-batches. A multi-worker strategy is made
    before anything else touches TensorFlow (its collectives are configured at start-up)."""
    import tensorflow as tf

    cluster = worker_cluster(cfg)  # multi_worker without TF_CONFIG: a UserError
    if cluster:
        return _multi_worker(cfg, cluster)
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
    _check_split(cfg, len(devices))
    return Placement("mirrored", tf.distribute.MirroredStrategy(devices), devices, physical)


def _check_split(cfg: Config, replicas: int) -> None:
    t = cfg.train
    if t.batch_size % (replicas * t.grad_accumulation_steps):
        raise UserError(f"`train.batch_size` ({t.batch_size}, the global batch) must split "
                        f"evenly over {replicas} replicas x train.grad_accumulation_steps "
                        f"({t.grad_accumulation_steps}) micro-batches")


def _multi_worker(cfg: Config, cluster: Cluster) -> Placement:
    import tensorflow as tf

    from tfpretrain import compat

    compat.fix_multi_worker_fit()  # tensorflow/tensorflow#72388 (until Keras fixes it)
    compat.multi_worker_health_check(interval=10, timeout=10,
                                     startup=cfg.train.worker_timeout)
    try:  # no CommunicationOptions(timeout_seconds): a thread per collective (StallWatch)
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    except RuntimeError as exc:
        if "Collective ops must be configured" in str(exc):
            raise UserError("`train.strategy: multi_worker` must start in a fresh process "
                            "(python -m tfpretrain.fit ...)") from None
        raise WorkerLost(cluster.role, 0, f"not every worker of TF_CONFIG joined within "
                         f"{cfg.train.worker_timeout} s (train.worker_timeout)") from None
    gpus = len(tf.config.list_logical_devices("GPU"))
    placement = Placement("multi_worker", strategy, physical=max(1, gpus) * cluster.size,
                          cluster=cluster)
    _check_split(cfg, placement.replicas)
    return placement
