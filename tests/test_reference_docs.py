"""Every command on the reference pages (README.md and docs/*.md; the guides have
test_guides.py) runs: in page order, in a fresh folder, at tiny settings (test_guides'
``tiny``), each must exit as the page says (0 unless ``# exits N``) without a traceback.

Not run: synopses (a token in ``[...]`` or a placeholder in capitals, e.g. ``DIR``) and
commands whose line says ``# not run here: <why>`` (a GPU, another host, the network).
Inputs a page assumes are made first, small: a text or JSONL file a command reads
(``data.path``, ``--data``, ``--in``, ``--seeds``, ``--against``, ``--config my.yaml``),
a task file (``eval.tasks``, ``--tasks``)
and a run folder a command reads (``--run-dir`` of generate/evaluate/export/bench
generate, ``--teacher``) that the page did not make. Slow: a page starts many processes.
"""
from __future__ import annotations

import itertools
import json
import re
import shlex
from pathlib import Path

import pytest

from conftest import REPO, run_cli
from test_docs import commands, expected_exit
from test_guides import TINY, tiny

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PLACEHOLDER = re.compile(r"^[A-Z][A-Z_]+([.=|].*)?$")     # DIR, PATH, KEY=VALUE, ROWS.npy|…
INPUTS = ("--data", "--in", "--seeds", "--against")
READS_RUN = {"generate", "evaluate", "export", "bench generate"}
MORE = {  # fewer steps, sizes and samples for the commands the guides do not use
    "bench fit": ["--steps", "4", "--warmup", "2"],
    "bench data": ["--mb", "0.3", "--cold-mb", "0.1", "--read-batches", "20",
                   "--train-steps", "4"],
    "bench synth": ["--count", "300", "--dedup-count", "200"],
    "synth augment": ["--n", "1"],
    "synth distill": ["--count", "60", "--max-new-tokens", "32"],  # a student's corpus
}


def not_run(page: Path, command: str) -> bool:
    """The page says ``# not run here: why`` on the command's first line or on a comment
    line just above it."""
    flat = " ".join(command.split())
    above = False
    for line in page.read_text().splitlines():
        head, mark, _ = line.partition("# not run here")
        m = re.search(r"python -m (tfpretrain\S*.*)", re.split(r"\s#", head)[0])
        if m and (mark or above) and \
                flat.startswith(" ".join(m.group(1).rstrip(" \\").split())):
            return True
        above = bool(mark) and not head.strip()
    return False


def synopsis(command: str) -> bool:
    """Placeholders: ``[--flag X]``, ``<x>``, ``DIR``, or a value ``key=P`` in capitals."""
    return any(t.startswith("[") or t.startswith("<") or PLACEHOLDER.match(t)
               or re.search(r"=[A-Z][A-Z_]*$", t) for t in shlex.split(command)[1:])


def name_of(argv: list[str]) -> str:
    name = argv[0].split(".", 1)[1]
    return f"{name} {argv[1]}" if name in ("bench", "synth") else name


def value(argv: list[str], flag: str):
    return argv[argv.index(flag) + 1] if flag in argv[:-1] else None


def set_paths(argv: list[str], keys) -> list[str]:
    """The paths ``--set KEY=VALUE`` gives for ``keys``: a path, a list of them, or a
    mapping to either."""
    import yaml

    out = []
    for a in argv:
        key, _, text = a.partition("=")
        if key in keys:
            found = yaml.safe_load(text)
            for spec in (found.values() if isinstance(found, dict) else [found]):
                out += spec if isinstance(spec, list) else [spec]
    return [p for p in out if isinstance(p, str)]


def text_paths(argv: list[str]) -> list[str]:
    """The files ``--set`` names as text to read: data.path, data.val_path (a path or a
    list), eval.sets (a mapping to either)."""
    return set_paths(argv, ("data.path", "data.val_path", "eval.sets"))


def make_inputs(argv: list[str], folder: Path) -> None:
    """The files and run folders ``argv`` reads that do not exist yet, made small."""
    from tfpretrain.data.synthetic import generate_stories

    wanted = [value(argv, f) for f in INPUTS] + text_paths(argv)
    config = value(argv, "--config")
    if config and config.endswith(".yaml") and not (REPO / config).exists():
        (folder / config).parent.mkdir(parents=True, exist_ok=True)
        (folder / config).write_text("name: my\n")
    for path in filter(None, wanted):
        if "://" in path or (folder / path).exists():
            continue
        target = folder / path
        target.parent.mkdir(parents=True, exist_ok=True)
        stories = generate_stories(120, seed=len(path))
        if path.endswith(".jsonl"):
            target.write_text("".join(json.dumps({"text": s}) + "\n" for s in stories))
        else:
            target.write_text("\n\n".join(stories) + "\n")
    for path in task_paths(argv):
        if not (folder / path).exists():
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
            (folder / path).write_text("".join(json.dumps(
                {"context": s[:-12], "continuation": " " + s[-12:].split()[-1]}) + "\n"
                for s in generate_stories(20, seed=len(path))))
    runs = [value(argv, "--teacher")]
    if name_of(argv) in READS_RUN:
        runs.append(value(argv, "--run-dir"))
    for run in filter(None, runs):
        if "://" not in run and not (folder / run).exists():
            fit = tiny(f"tfpretrain.fit --run-dir {run}")
            r = run_cli(*fit, "--set", "train.steps=12", cwd=folder, timeout=900)
            assert r.returncode == 0, r.stderr[-3000:]


def task_paths(argv: list[str]) -> list[str]:
    """The task files ``--set eval.tasks={name: path}`` or ``--tasks`` name."""
    out = set_paths(argv, ("eval.tasks",))
    if "--tasks" in argv:
        rest = argv[argv.index("--tasks") + 1:]
        out += [t.partition("=")[2] or t
                for t in itertools.takewhile(lambda t: not t.startswith("-"), rest)]
    return out


def runnable(page: Path) -> list[str]:
    return [c for _, c in commands(page) if not synopsis(c) and not not_run(page, c)]


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.stem)
def test_reference_commands_run_at_tiny_settings(page, tmp_path):
    for command in runnable(page):
        argv = tiny(command)
        argv += MORE.get(name_of(argv), [])
        if name_of(argv) in ("bench fit", "bench data"):
            argv += [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]
        if expected_exit(page, command) == 0:   # a refusal's input stays missing
            make_inputs(argv, tmp_path)
        r = run_cli(*argv, cwd=tmp_path, timeout=900)
        assert r.returncode == expected_exit(page, command), \
            f"{' '.join(argv)}\n{r.stdout[-1500:]}\n{r.stderr[-3000:]}"
        assert "Traceback" not in r.stderr, r.stderr[-3000:]


def test_the_reference_pages_say_why_a_command_is_not_run():
    """Every skipped command is a synopsis or carries its reason on the page."""
    skipped = [(p.name, c) for p in PAGES for _, c in commands(p)
               if not synopsis(c) and not_run(p, c)]
    for page in PAGES:
        for line in page.read_text().splitlines():
            if "# not run here" in line:
                assert re.search(r"# not run here: \S", line), (page.name, line)
    assert all("tfpretrain" in c for _, c in skipped)
