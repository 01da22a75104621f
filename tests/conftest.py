"""Shared fixtures: tiny configs (vocab <= 400, 2 layers, hidden 32, seq 32) that run in
seconds, and one tiny end-to-end run reused by the tests that inspect a run's outputs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
# the token cache (data.cache) of every test run, and of the CLI processes they start
# (they inherit the environment), goes to a fresh folder, never the user's ~/.cache
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="tfpretrain-test-cache-")


def tiny_raw(tmp_path: Path, **sections) -> dict:
    raw = {
        "data": {"embedded_documents": 300},
        "tokenizer": {"kind": "sentencepiece_bpe", "vocabulary_size": 320,
                      "byte_fallback": False},
        "model": {"num_layers": 2, "num_heads": 2, "hidden_dim": 32, "intermediate_dim": 64,
                  "sequence_length": 32},
        "optimizer": {"learning_rate": 1e-2, "min_learning_rate": 1e-3, "warmup_steps": 5},
        "train": {"steps": 60, "batch_size": 16},
        "eval": {"every": 20, "steps": 4, "sample_tokens": 12},
        "export": {"dir": str(tmp_path / "saved_models")},
    }
    for sec, values in sections.items():
        raw.setdefault(sec, {}).update(values)
    return raw


def tiny_config(tmp_path: Path, **sections):
    from tfpretrain.config import build_config

    return build_config(tiny_raw(tmp_path, **sections), name="tiny")


def write_yaml(path: Path, raw: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(raw))
    return path


def run_cli(*args, cwd=None, timeout=600, env=None) -> subprocess.CompletedProcess:
    """Run ``python -m <args>`` in a fresh process, the way a user does (``env``: extra
    environment variables)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2", **(env or {}))
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd or REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def last_json_line(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One finished tiny gpt2 run: (cfg, run_dir, summary); it also answers two zero-shot
    tasks (eval.tasks: `ending`, 3 choice items, and `cloze`, 2 cloze items)."""
    from tfpretrain.fit import fit

    tmp = tmp_path_factory.mktemp("tiny_run")
    tasks = {"ending": tmp / "ending.jsonl", "cloze": tmp / "cloze.jsonl"}
    tasks["ending"].write_text((json.dumps({"context": "Lily and Tom went to the park.",
                                            "choices": [" They played.", " Zzz."],
                                            "label": 0}) + "\n") * 3)
    tasks["cloze"].write_text((json.dumps({"context": "Once upon a",
                                           "continuation": " time"}) + "\n") * 2)
    cfg = tiny_config(tmp, eval={"tasks": {k: str(v) for k, v in tasks.items()}})
    run_dir = tmp / "runs" / "tiny"
    summary = fit(cfg, run_dir)
    return cfg, run_dir, summary


@pytest.fixture
def small_disk(tmp_path):
    """``mount(folder, kib)``: a real filesystem of ``kib`` KiB at ``folder`` (tmpfs), so
    writes fail with the kernel's ENOSPC; unmounted afterwards."""
    import subprocess

    mounted = []

    def mount(folder: Path, kib: int) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        options = f"size={kib}k" if folder not in mounted else f"remount,size={kib}k"
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here (needs root): {r.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in dict.fromkeys(reversed(mounted)):
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def assert_write_refused(r, *needles):
    """Exit 74, one message naming the disk's refusal, no traceback."""
    assert r.returncode == 74, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0], r.stderr[-3000:]
    for n in needles:
        assert n in errors[0], errors[0]
