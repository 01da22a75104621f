"""A search on several processes or machines, on KerasTuner's own distributed engine.

KerasTuner reads three environment variables: ``KERASTUNER_TUNER_ID`` ("chief" for the
process that serves the oracle over gRPC, any other ID for a worker that runs trials),
``KERASTUNER_ORACLE_IP`` and ``KERASTUNER_ORACLE_PORT`` (where the chief listens). The tune
command's flags set them (``--chief HOST:PORT``, ``--worker ID --oracle HOST:PORT``), and
``--workers N`` starts a chief and N workers on 127.0.0.1 and looks after them: a worker
that dies (killed, out of memory) is started again under the same ID, so the oracle hands
it back its unfinished trial, which resumes from the trial's last checkpoint.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tfpretrain.config import host_port
from tfpretrain.errors import UserError

ENV_ID, ENV_IP, ENV_PORT = "KERASTUNER_TUNER_ID", "KERASTUNER_ORACLE_IP", "KERASTUNER_ORACLE_PORT"
RESTARTS = 3  # per worker, for --workers


@dataclass
class Role:
    tuner_id: str = ""   # "" = a search in one process
    oracle: str = ""     # host:port of the chief's oracle

    @property
    def distributed(self) -> bool:
        return bool(self.tuner_id)

    @property
    def is_chief(self) -> bool:
        return not self.distributed or "chief" in self.tuner_id

    def describe(self) -> str:
        if not self.distributed:
            return "one process"
        what = "chief (serves the oracle)" if self.is_chief else f"worker {self.tuner_id}"
        return f"{what} at {self.oracle}"


def _address(flag: str, value: str) -> tuple[str, str]:
    parsed = host_port(value)
    if parsed is None or not 0 < parsed[1] < 65536:
        raise UserError(f"{flag} {value!r}: expected HOST:PORT, e.g. 10.0.0.1:8000")
    return parsed[0], str(parsed[1])


def resolve_role(chief: str | None, worker: str | None, oracle: str | None,
                 environ=os.environ) -> Role:
    """The role from the flags, else from KerasTuner's variables; sets the variables
    KerasTuner reads (before keras_tuner runs a search). Bad combinations exit 2."""
    if chief and (worker or oracle):
        raise UserError("--chief cannot be combined with --worker/--oracle: the chief serves "
                        "the oracle, workers connect to it")
    if worker or oracle:
        if not (worker and oracle):
            raise UserError("--worker ID needs --oracle HOST:PORT (the chief's address), "
                            "and --oracle needs --worker ID")
        if "chief" in worker:
            raise UserError(f"--worker {worker!r}: a worker ID must not contain 'chief' "
                            "(KerasTuner takes any such ID for the chief)")
        host, port = _address("--oracle", oracle)
        environ.update({ENV_ID: worker, ENV_IP: host, ENV_PORT: port})
    elif chief:
        host, port = _address("--chief", chief)
        environ.update({ENV_ID: "chief", ENV_IP: host, ENV_PORT: port})
    if ENV_IP not in environ:
        return Role()
    missing = [v for v in (ENV_PORT, ENV_ID) if not environ.get(v)]
    if missing:
        raise UserError(f"{ENV_IP} is set but {' and '.join(missing)} not: set all three "
                        "KerasTuner variables, or use --chief / --worker --oracle")
    _address(ENV_PORT, f"{environ[ENV_IP]}:{environ[ENV_PORT]}")
    return Role(environ[ENV_ID], f"{environ[ENV_IP]}:{environ[ENV_PORT]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_local(argv: list[str], workers: int, run_dir: Path, log=print) -> int:
    """``--workers N``: a chief and N workers of ``python -m tfpretrain.tune argv`` on
    127.0.0.1; the workers' output goes to ``<run_dir>/workers/<id>.log``, the chief's to
    this console. A worker that exits with an error is started again (``RESTARTS``
    times), under the same ID. Returns the chief's exit code."""
    if workers < 1:
        raise UserError(f"--workers {workers}: need at least 1")
    port = free_port()
    base = [sys.executable, "-m", "tfpretrain.tune", *argv]
    logs = run_dir / "workers"
    logs.mkdir(parents=True, exist_ok=True)
    chief = subprocess.Popen([*base, "--chief", f"127.0.0.1:{port}"])
    ids = [f"tuner{i}" for i in range(workers)]

    def start(tuner_id):
        out = open(logs / f"{tuner_id}.log", "a")
        return subprocess.Popen([*base, "--worker", tuner_id, "--oracle", f"127.0.0.1:{port}"],
                                stdout=out, stderr=subprocess.STDOUT)

    procs = {i: start(i) for i in ids}
    restarts = dict.fromkeys(ids, 0)
    log(f"[tfpretrain] search on 127.0.0.1:{port}: a chief and {workers} workers "
        f"(logs in {logs})")
    try:
        while chief.poll() is None:
            for tuner_id, proc in procs.items():
                code = proc.poll()
                if code not in (None, 0, 2) and restarts[tuner_id] < RESTARTS:
                    restarts[tuner_id] += 1
                    log(f"[tfpretrain] worker {tuner_id} exited with {code}; starting it "
                        f"again ({restarts[tuner_id]}/{RESTARTS}): it resumes its trial")
                    procs[tuner_id] = start(tuner_id)
            done = [p.poll() for p in procs.values()]
            if None not in done and any(done) and all(
                    code in (0, 2) or restarts[i] >= RESTARTS for i, code in zip(ids, done)):
                log("[tfpretrain] every worker has stopped, not all of them cleanly; "
                    f"stopping the chief (see {logs})")
                chief.terminate()
                break
            time.sleep(0.5)
        return chief.wait()
    finally:
        for proc in [chief, *procs.values()]:
            if proc.poll() is None:
                proc.terminate()
        for proc in [chief, *procs.values()]:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
