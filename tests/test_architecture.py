"""The shape of the package (docs/architecture.md): imports point downward only
(config -> data -> models -> training -> serving -> commands), no import cycles, private
keras/keras_hub internals only in compat.py, no branching on the objective's name outside
tfpretrain/objectives/, short functions, and every private symbol compat uses still exists."""
from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tfpretrain"

# layer of a module (dotted name without "tfpretrain."), by prefix; longest prefix wins
LAYERS = {
    "": 0, "config": 0, "errors": 0, "compat": 0, "faults": 0, "tables": 0, "files": 0,
    "hardware": 0,
    "data": 1,
    "models": 2, "objectives": 2,
    "training": 3,
    "serving": 4,
    "fit": 5, "generate": 5, "export": 5, "evaluate": 5, "tune": 5, "runs": 5, "bench": 5,
    "cli": 5, "__main__": 5, "data.__main__": 5, "estimate": 5, "lr_find": 5, "schedule": 5,
    "bench_optim": 5, "synth": 5, "bench_synth": 5, "tune_workers": 5, "data_service": 5,
    "scaling": 5,
    "synthesis": 4,  # teachers (run folders, SavedModels) and the loops that use them
    "plots": 0,
}
LAYER_NAMES = ["config", "data", "models", "training", "serving", "commands"]
MAX_FUNCTION_LINES = 60


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(p for p in parts if p != "__init__")
        out[name] = path
    return out


def layer(name: str) -> int:
    best = max((k for k in LAYERS if k == "" or name == k or name.startswith(k + ".")),
               key=len)
    return LAYERS[best]


def imports_of(path: Path) -> set[str]:
    """Every tfpretrain module ``path`` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for n in names:
            if n == "tfpretrain" or n.startswith("tfpretrain."):
                found.add(n[len("tfpretrain."):] if "." in n else "")
    known = modules()
    # "from tfpretrain.data import pipeline" names a module; "...import prepare" does not
    return {n for n in found if n in known}


def test_imports_point_downward_only():
    upward = []
    for name, path in sorted(modules().items()):
        for target in imports_of(path):
            if layer(target) > layer(name):
                upward.append(f"{name} ({LAYER_NAMES[layer(name)]}) imports {target} "
                              f"({LAYER_NAMES[layer(target)]})")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_cycles():
    graph = {name: imports_of(path) - {name} for name, path in modules().items()}
    # a package's __init__ importing its own submodules (registries) is not a cycle risk
    # when the submodules import only the package's base modules: checked as any edge
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_private_keras_internals_only_in_compat():
    pattern = re.compile(r"keras(_hub|_tuner)?\.src\b|\._build_cache\b|\._learning_rate\b"
                         r"|hf_exporter\b|(?<!compat)\.call_with_cache\(")
    offenders = [f"{p.relative_to(PACKAGE)}:{i}: {line.strip()}"
                 for p in PACKAGE.rglob("*.py") if p.name != "compat.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if pattern.search(line)]
    assert not offenders, "private keras/keras_hub use outside compat.py:\n" + \
        "\n".join(offenders)


def test_no_branching_on_the_objective_outside_objectives():
    pattern = re.compile(r"objective\s*(==|!=)|==\s*[\"'](mlm|causal)[\"']")
    offenders = [f"{p.relative_to(PACKAGE)}:{i}: {line.strip()}"
                 for p in PACKAGE.rglob("*.py") if "objectives" not in p.parts
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if pattern.search(line)]
    assert not offenders, "ask the objective instead:\n" + "\n".join(offenders)


def test_functions_are_short():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}: "
                                f"{n} lines")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def test_fault_hooks_only_through_the_testing_seam():
    pattern = re.compile(r"TFPRETRAIN_FAULT|cfg\.debug\b|\.debug\.(nan_at_step|spike_at_step|"
                         r"slow_checkpoint)")
    offenders = [f"{p.relative_to(PACKAGE)}:{i}" for p in PACKAGE.rglob("*.py")
                 if p.name not in ("faults.py", "config.py")
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if pattern.search(line)]
    assert not offenders, "fault hooks outside tfpretrain/faults.py: " + ", ".join(offenders)


def test_compat_symbols_exist_in_this_keras_and_keras_hub():
    """Fails naming the symbol when an upgrade of keras/keras_hub moves one we rely on."""
    from tfpretrain import compat

    assert compat.check() == []


def test_compat_check_names_a_missing_symbol(monkeypatch):
    from tfpretrain import compat

    monkeypatch.setattr(compat, "PRIVATE_SYMBOLS", compat.PRIVATE_SYMBOLS + (
        ("something renamed upstream", "keras_hub.models.GPT2CausalLM", "_no_such_method"),))
    problems = compat.check()
    assert len(problems) == 1 and "keras_hub.models.GPT2CausalLM._no_such_method" in problems[0]
    assert "something renamed upstream" in problems[0]


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_registry_builds_each_arch_and_counts_flops(name):
    from tfpretrain.config import ModelConfig
    from tfpretrain.models.registry import ARCHS, build_backbone, flops_per_token, get_arch

    cfg = ModelConfig(arch=name, num_layers=2, num_heads=2, hidden_dim=32,
                      intermediate_dim=64, sequence_length=16)
    backbone = build_backbone(cfg, 100)
    assert type(backbone).__name__ == get_arch(name).backbone and set(ARCHS) >= {name}
    params = backbone.count_params()
    positions = 16 * 32 if get_arch(name).learned_positions else 0
    assert flops_per_token(cfg, params, 100) == 6 * (params - positions) + 12 * 2 * 32 * 16


def test_flops_per_token_matches_gpt2_124m_hand_count():
    """GPT-2 small (12 layers, width 768, context 1024, vocab 50257): N without the position
    table = 124,439,808 - 786,432 = 123,653,376 (nanoGPT's get_num_params()); nanoGPT's
    estimate_mfu: 6N + 12*L*H*T = 741,920,256 + 113,246,208 = 855,166,464 FLOPs/token."""
    from tfpretrain.config import ModelConfig
    from tfpretrain.models.registry import flops_per_token

    cfg = ModelConfig(arch="gpt2", num_layers=12, num_heads=12, hidden_dim=768,
                      intermediate_dim=3072, sequence_length=1024)
    assert flops_per_token(cfg, 124_439_808, 50257) == 855_166_464


def test_one_console_command_dispatches_to_every_command():
    from conftest import last_json_line, run_cli
    from tfpretrain.cli import COMMANDS

    r = run_cli("tfpretrain", "--help")
    assert r.returncode == 0 and all(f"  {name}" in r.stdout for name in COMMANDS)
    bad = run_cli("tfpretrain", "trian")
    assert bad.returncode == 2 and "unknown command 'trian'" in bad.stderr
    dry = run_cli("tfpretrain", "fit", "--config", "char-cpu", "--set", "tokenizer.kind=byte",
                  "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert last_json_line(dry.stdout)["vocabulary_size"] == 261   # byte tokenizer, exact
    assert "upper bound" not in dry.stdout


def test_tensorflows_startup_chatter_is_filtered_and_nothing_else(tmp_path):
    """quiet_tensorflow: the lines TF prints before its logging is set up (absl's notice,
    oneDNN, CUDA) are dropped while it imports; any other line, native or Python, passes."""
    import subprocess
    import sys

    from conftest import REPO

    script = tmp_path / "quiet.py"
    script.write_text("""
import importlib.util, os, sys
from tfpretrain.errors import filtered_stderr, quiet_tensorflow
quiet_tensorflow()
assert importlib.util.find_spec("tensorflow")  # a probe (Keras makes some) keeps the hook
import tensorflow as tf
tf.constant(1.0) + 1
with filtered_stderr():
    os.write(2, b"I0000 port.cc:153] oneDNN custom operations are on. You may see\\n")
    os.write(2, b"a native line to keep\\n")
    print("a Python line to keep", file=sys.stderr)
print("after", file=sys.stderr)
""")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # as a user's shell has it
    r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for noise in ("absl::InitializeLog", "oneDNN custom operations", "cuda drivers", "cuInit"):
        assert noise not in r.stderr, r.stderr
    assert r.stderr.splitlines()[-3:] == ["a native line to keep", "a Python line to keep",
                                          "after"], r.stderr


@pytest.mark.slow  # suite time; run with -m slow
def test_loss_and_guard_math_is_backend_neutral(tmp_path):
    """models/stability.py under Keras's JAX backend (CPU), TensorFlow blocked from import,
    gives the TensorFlow backend's numbers."""
    import json
    import subprocess
    import sys

    from conftest import REPO

    script = tmp_path / "neutral.py"
    script.write_text('''
import json, sys
sys.modules["tensorflow"] = None          # any import of TensorFlow fails
import numpy as np
from tfpretrain.models import stability as s
rng = np.random.default_rng(0)
logits = rng.normal(size=(2, 5, 7)).astype("float32")
y = rng.integers(0, 7, size=(2, 5))
w = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], "float32")
hist = rng.normal(1.0, 0.1, size=(4, 2)).astype("float32")
grads = [rng.normal(size=(3, 3)).astype("float32"), rng.normal(size=(3,)).astype("float32")]
norm = s.global_norm(grads)
out = {"loss": float(s.weighted_mean(s.token_losses(y, logits), w)),
       "z": float(s.z_loss(logits, w)), "correct": np.asarray(s.correct(y, logits)).tolist(),
       "norm": float(norm),
       "clipped": float(s.global_norm(s.clip_by_global_norm(grads, 0.5, norm))),
       "spike": bool(s.is_spike(hist, 4, 2.0, 1.0, 4, 3.0)),
       "calm": bool(s.is_spike(hist, 4, 1.0, 1.0, 4, 3.0)),
       "decide": [bool(v) for v in s.decide(2.0, 1.0, True, 3, 4)],
       "nan": [bool(v) for v in s.decide(float("nan"), 1.0, False, 3, 4)],
       "tf_loaded": "tensorflow" in sys.modules and sys.modules["tensorflow"] is not None}
print(json.dumps(out))
''')
    results = {}
    for backend in ("jax", "tensorflow"):
        env = dict(os.environ, PYTHONPATH=str(REPO), KERAS_BACKEND=backend,
                   TF_CPP_MIN_LOG_LEVEL="2")
        code = script.read_text()
        if backend == "tensorflow":
            code = code.replace('sys.modules["tensorflow"] = None', "")
        (tmp_path / f"run_{backend}.py").write_text(code)
        r = subprocess.run([sys.executable, str(tmp_path / f"run_{backend}.py")], env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        results[backend] = json.loads(r.stdout.strip().splitlines()[-1])
    jax_, tf_ = results["jax"], results["tensorflow"]
    assert not jax_["tf_loaded"]
    for key in ("loss", "z", "norm", "clipped"):
        assert jax_[key] == pytest.approx(tf_[key], rel=1e-5), key
    assert jax_["clipped"] == pytest.approx(0.5, rel=1e-5)
    for key in ("correct", "spike", "calm", "decide", "nan"):
        assert jax_[key] == tf_[key], key
    assert jax_["spike"] and not jax_["calm"]
    assert jax_["decide"] == [True, True, True]      # 4th finite spike: a new level
    assert jax_["nan"] == [False, False, False]      # non-finite: always skipped
