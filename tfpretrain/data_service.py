"""A tf.data service feeder: makes training batches for runs with ``data.service`` set.

    python -m tfpretrain.data_service [--port 5050] [--host NAME] [--worker-port 0]

Starts one tf.data service dispatcher (on ``--port``) and its one worker in this process
and serves until Ctrl-C or SIGTERM. A run then names it (and any other feeders) in
``data.service``; with N feeders each makes every N-th batch, and the trainer takes them
in turn, so batches, their order and exact resume are those of a local run:

    python -m tfpretrain.data_service --port 5050            # on host feeder1 (and feeder2)
    python -m tfpretrain.fit --config tinystories-27m \\
        --set 'data.service=[feeder1:5050, feeder2:5050]'

The feeder reads the run's token cache at the path the trainer has it (the same host, or a
shared filesystem): prepare it first (``python -m tfpretrain.data --config ...``) with a
``data.cache_dir`` every host sees. ``--host`` is the name the trainer reaches this machine
by (default: its fully qualified domain name). docs/distributed.md has the whole picture.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading

from tfpretrain.errors import UserError, cli_main, quiet_tensorflow


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tfpretrain.data_service", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=5050,
                   help="the dispatcher's port, which `data.service` names (5050)")
    p.add_argument("--host", default=None,
                   help="this machine's name as the trainer reaches it (default: its FQDN)")
    p.add_argument("--worker-port", type=int, default=0,
                   help="the worker's port (0 = any free one; the dispatcher tells the "
                        "trainer)")
    return p


def _check_port(port: int, name: str) -> None:
    if not 0 <= port <= 65535 or (name == "--port" and port == 0):
        raise UserError(f"{name} must be a port number, 1..65535. Received: {port}")
    if port:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("", port))
            except OSError as exc:
                raise UserError(f"{name} {port} is not free ({exc.strerror}); pick another "
                                "port") from None


@cli_main
def main(argv=None) -> int:
    args = parser().parse_args(argv)
    _check_port(args.port, "--port")
    _check_port(args.worker_port, "--worker-port")
    host = args.host or socket.getfqdn()
    quiet_tensorflow()
    from tfpretrain.data.service import serve

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    dispatcher, worker = serve(args.port, host, args.worker_port)
    print(f"data_service: feeding at {host}:{args.port} (dispatcher) with one worker; "
          f"name it in `data.service: {host}:{args.port}`. Ctrl-C stops.", flush=True)
    while not stop.wait(1.0):
        pass
    print("data_service: stopped", flush=True)
    os._exit(0)  # a worker with an unfinished job would wait for it in stop() for ever


if __name__ == "__main__":
    sys.exit(main())
