"""Training batches made by tf.data service feeders (``data.service``) instead of this process.

A feeder (``python -m tfpretrain.data_service --port PORT``) is one tf.data service
dispatcher with one worker. The trainer ships each feeder the graph of its share of the
input pipeline: with N feeders, feeder i makes the batches of data positions
``start + i, start + i + N, ...``, each exactly as ``pipeline.train_dataset`` makes it
locally (rows by ``row_indices``, the objective's batcher, the masks drawn from (seed,
step)); the trainer takes them round-robin. So the batch at every step is the one a local
run sees, and exact resume holds: a resumed run asks the feeders for the positions from
its step on.

The graph reads the token cache's rows file itself (``file_reader``: one fixed-length
record per row, TensorFlow ops only, since a ``tf.numpy_function`` cannot travel to
another process), so every feeder must see the cache at the same path: the same host, or
a shared filesystem. Every element carries its data position, and the trainer checks it:
a dispatcher serving several workers (their order is not deterministic) stops the run
with a message instead of training on reordered batches.
"""
from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
import threading
import time

import numpy as np
import tensorflow as tf

from tfpretrain.config import host_port
from tfpretrain.errors import TEMPFAIL_EXIT, UserError

ORDER_MARK = "tfpretrain data.service order"
START_HINT = "start it with `python -m tfpretrain.data_service --port PORT` on that host"


def addresses(spec) -> list[str]:
    """``data.service`` (one address or a list) as ``grpc://host:port`` strings."""
    if not spec:
        return []
    items = [spec] if isinstance(spec, str) else list(spec)
    return [a if a.startswith("grpc://") else f"grpc://{a}" for a in map(str, items)]


def _connect(target: str, timeout: float) -> None:
    host, port = host_port(target.removeprefix("grpc://"))
    socket.create_connection((host.strip("[]"), port), timeout).close()


def _answers(target: str, timeout: float) -> bool:
    try:
        _connect(target, timeout)
        return True
    except OSError:
        return False


def check_reachable(targets: list[str], timeout: float = 5.0) -> None:
    """A UserError naming the first feeder that does not accept a connection (the
    tf.data service client would otherwise retry it for ever)."""
    for target in targets:
        try:
            _connect(target, timeout)
        except OSError as exc:
            raise UserError(f"data.service: cannot reach the feeder {target} "
                            f"({exc.strerror or exc}); {START_HINT}") from None


@contextlib.contextmanager
def watchdog(targets: list[str], timeout: float, exit_code: int = TEMPFAIL_EXIT,
             every: float = 5.0):
    """While training: a feeder that refuses connections for ``timeout`` seconds ends the
    process with ``exit_code`` (``train.rerun_exit_code``) and a message. The tf.data
    service client waits for a lost feeder for ever, inside TensorFlow, where no Python
    exception can reach it; what was trained since the last checkpoint is lost, and
    rerunning resumes from it."""
    if not targets:
        yield
        return
    done = threading.Event()

    def watch():
        down = {}  # target -> when it first stopped answering
        while not done.wait(every):
            for target in targets:
                if _answers(target, every):
                    down.pop(target, None)
                elif time.monotonic() - down.setdefault(target, time.monotonic()) >= timeout:
                    _lost(target, timeout, exit_code)

    threading.Thread(target=watch, name="data.service watchdog", daemon=True).start()
    try:
        yield
    finally:
        done.set()


def _lost(target: str, timeout: float, exit_code: int) -> None:
    print(f"[tfpretrain] data.service: the feeder {target} has not answered for {timeout:g} s "
          "(data.service_timeout). Restart it and rerun the same command: the run resumes "
          f"from its last checkpoint; exit {exit_code}", file=sys.stderr, flush=True)
    os._exit(exit_code)


def file_reader(rows: np.ndarray):
    """``index -> rows[index]`` (int32 [n, width]) in TensorFlow ops over the rows file
    behind the memory-mapped ``rows`` (the token cache's ``train.rows``)."""
    path = getattr(rows, "filename", None)
    if not isinstance(rows, np.memmap) or path is None or rows.dtype != np.int32:
        raise UserError("`data.service` needs the token cache (`data.cache: true`): the "
                        "feeders read its rows file")
    width = int(rows.shape[1])
    record, offset = 4 * width, int(rows.offset)
    little = sys.byteorder == "little"

    def one(i):
        return tf.data.FixedLengthRecordDataset(str(path), record,
                                                header_bytes=offset + i * record).take(1)

    def read(index):
        n = tf.size(index, out_type=tf.int64)
        raw = tf.data.Dataset.from_tensor_slices(index).flat_map(one).batch(n)
        out = tf.io.decode_raw(raw.get_single_element(), tf.int32, little_endian=little)
        return tf.ensure_shape(tf.reshape(out, [-1, width]), index.shape.concatenate([width]))

    return read


def round_robin(make_part, targets: list[str], start: int, end: int) -> tf.data.Dataset:
    """The batches of positions start..end-1, feeder i making ``make_part(first, every)``
    (positions first, first + every, ... up to end, each element ``(position, batch)``),
    taken in turn; elements are the batches, checked to arrive in position order."""
    n = len(targets)
    parts = [make_part(start + i, n).apply(tf.data.experimental.service.distribute(
        "distributed_epoch", target, max_outstanding_requests=4)) for i, target in
        enumerate(targets)]
    merged = tf.data.Dataset.choose_from_datasets(
        parts, tf.data.Dataset.range(n).repeat(), stop_on_empty_dataset=True)

    def check(due, element):
        position, batch = element
        ok = tf.debugging.assert_equal(position, start + due, message=(
            f"{ORDER_MARK}: a feeder sent its batches out of order (several workers "
            "behind one dispatcher?)"))
        with tf.control_dependencies([ok]):
            return tf.nest.map_structure(tf.identity, batch)

    return merged.enumerate().map(check)


@contextlib.contextmanager
def feeder_errors(targets: list[str]):
    """TensorFlow's errors from the feeders -> one UserError naming the fix. (A lost
    feeder raises nothing: the client waits for it; see :func:`watchdog`.)"""
    if not targets:
        yield
        return
    try:
        yield
    except tf.errors.InvalidArgumentError as exc:
        if ORDER_MARK not in (exc.message or ""):
            raise
        raise UserError(f"data.service: batches arrived out of order: give every feeder "
                        f"in {targets} exactly one worker ({START_HINT})") from None
    except tf.errors.NotFoundError as exc:
        if ".rows" not in (exc.message or ""):
            raise
        raise UserError("data.service: a feeder could not read the token cache "
                        f"({_first_line(exc)}); every feeder must see the cache at the "
                        "same path (the same host or a shared filesystem, "
                        "`data.cache_dir`)") from None


def _first_line(exc) -> str:
    return re.sub(r"\{\{.*?\}\}", "", exc.message or type(exc).__name__).strip() \
        .splitlines()[0][:200]


def serve(port: int, host: str, worker_port: int = 0):
    """One feeder: a dispatcher on ``port`` and its one worker (on ``worker_port``, 0 = any
    free port), which the trainer reaches at ``host``. Returns (dispatcher, worker)."""
    service = tf.data.experimental.service
    dispatcher = service.DispatchServer(service.DispatcherConfig(port=port))
    worker = service.WorkerServer(service.WorkerConfig(
        dispatcher_address=f"{host}:{dispatcher.target.rpartition(':')[2]}",
        worker_address=f"{host}:%port%", port=worker_port))
    return dispatcher, worker
