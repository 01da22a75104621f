"""Every guide in docs/guides/ runs: its ``python -m tfpretrain.…`` commands, in page order,
in a fresh folder, at tiny settings (a small model, a few steps, a few samples), must each
exit 0 and write every picture they name. Slow: a guide starts several processes."""
from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from conftest import REPO, run_cli
from test_docs import commands, expected_exit

GUIDES = sorted((REPO / "docs" / "guides").glob("*.md"))
TINY = {  # appended to the commands that read a config (later --set wins)
    "data.embedded_documents": 300, "tokenizer.vocabulary_size": 320,
    "tokenizer.byte_fallback": "false", "model.num_layers": 2, "model.num_heads": 2,
    "model.hidden_dim": 32, "model.intermediate_dim": 64, "model.sequence_length": 32,
    "train.batch_size": 8, "train.steps": 12, "eval.every": 6, "eval.steps": 2,
    "eval.sample_tokens": 4, "optimizer.warmup_steps": 2,
    "tune.steps_per_trial": 101,  # above the largest warmup configs/tune.yaml searches
}
FAULTS = {"debug.spike_at_step": 5, "debug.nan_at_step": 8}  # inside the tiny run's 12 steps
CONFIGURED = {"fit", "tune", "lr_find", "schedule", "estimate", "bench optim", "scaling"}
EXTRA = {  # fewer steps, samples and tokens than the page asks for
    "lr_find": ["--steps", "20"], "tune": ["--max-trials", "2"],
    "scaling": ["--budgets", "4e9", "--sizes", "2x16", "2x32", "2x48"],
    "bench optim": ["--seeds", "1337"], "bench generate": ["--new-tokens", "4"],
    "generate": ["--max-new-tokens", "4"],
    "synth stories": ["--count", "60"],
    "synth distill": ["--count", "4", "--max-new-tokens", "8"],
    "synth bootstrap": ["--rounds", "1", "--per-round", "4", "--max-new-tokens", "8"],
}


def tiny(command: str) -> list[str]:
    parts = shlex.split(command)
    module, rest = parts[0], parts[1:]
    name = module.split(".", 1)[1]
    if name in ("bench", "synth"):
        name = f"{name} {rest[0]}"
    extra = list(EXTRA.get(name, []))
    if name in CONFIGURED:  # a search keeps the full run's length (best.yaml must be valid)
        extra += [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")
                  if name != "tune" or k not in ("train.steps", "eval.every")]
        extra += [a for k, v in FAULTS.items() if any(x.startswith(k + "=") for x in rest)
                  for a in ("--set", f"{k}={v}")]
    return [module, *rest, *extra]


def test_every_guide_is_linked_from_the_readme():
    readme = (REPO / "README.md").read_text()
    assert GUIDES and all(f"(docs/guides/{g.name})" in readme for g in GUIDES)


@pytest.mark.slow
@pytest.mark.parametrize("guide", GUIDES, ids=lambda p: p.stem)
def test_guide_commands_run_at_tiny_settings(guide, tmp_path):
    (tmp_path / "docs" / "img").mkdir(parents=True)
    (tmp_path / "data").mkdir()
    for _, command in commands(guide):
        argv = tiny(command)
        r = run_cli(*argv, cwd=tmp_path, timeout=900)
        assert r.returncode == expected_exit(guide, command), \
            f"{' '.join(argv)}\n{r.stdout[-1500:]}\n{r.stderr[-3000:]}"
        assert "Traceback" not in r.stderr, r.stderr[-3000:]
        for arg in argv:
            if arg.startswith("docs/img/"):
                assert (tmp_path / arg).read_bytes()[:4] == b"\x89PNG", arg
    pictures = {Path(p).name for _, c in commands(guide) for p in shlex.split(c)
                if p.startswith("docs/img/")}
    assert pictures <= {p.name for p in (REPO / "docs" / "img").glob("*.png")}
