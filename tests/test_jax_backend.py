"""The training path on Keras's JAX backend (GPU figures come through it): no TensorFlow
imported, the same losses as the TensorFlow train step, the guard on both."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, last_json_line, tiny_raw, write_yaml

BLOCK_TF = 'import sys; sys.modules["tensorflow"] = None\n'  # any TensorFlow import fails


def run_python(code: str, backend: str, tmp_path, *args):
    script = tmp_path / f"script_{backend}.py"
    script.write_text(code)
    env = dict(os.environ, PYTHONPATH=str(REPO), KERAS_BACKEND=backend,
               TF_CPP_MIN_LOG_LEVEL="2")
    r = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True,
                       text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.slow  # suite time; run with -m slow
def test_bench_fit_on_jax_imports_no_tensorflow_and_reports_mfu(tmp_path):
    rows = np.random.default_rng(0).integers(5, 320, size=(64, 33)).astype(np.int32)
    np.save(tmp_path / "rows.npy", rows)
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_raw(tmp_path))
    code = BLOCK_TF + (
        "from tfpretrain.bench import main\n"
        "rc = main(sys.argv[1:])\n"
        "assert sys.modules.get('tensorflow') is None and 'tensorflow_text' not in sys.modules\n"
        "sys.exit(rc)\n")
    r = run_python(code, "jax", tmp_path, "fit", "--backend", "jax", "--config", str(cfg),
                   "--rows", str(tmp_path / "rows.npy"), "--steps", "6", "--warmup", "2")
    out = last_json_line(r.stdout)
    assert out["backend"] == "jax" and out["precision"] == "float32"
    assert out["tokens_per_second"] > 0 and out["step_ms"] > 0
    assert 0 < out["mfu_vs_fp32_peak"] < 1
    assert out["model_flops_per_token"] > 6 * out["params"] - 6 * 32 * 32
    assert np.isfinite(out["loss"]) and out["skipped_steps"] == 0
    # a rows file with ids beyond the vocabulary is one message, exit 2
    np.save(tmp_path / "big.npy", rows + 1000)
    bad = subprocess.run([sys.executable, str(tmp_path / "script_jax.py"), "fit", "--backend",
                          "jax", "--config", str(cfg), "--rows", str(tmp_path / "big.npy")],
                         env=dict(os.environ, PYTHONPATH=str(REPO), KERAS_BACKEND="jax"),
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert bad.returncode == 2 and "vocabulary_size" in bad.stderr
    assert "Traceback" not in bad.stderr


PARITY = '''
import json, sys
import numpy as np
backend, folder = sys.argv[1], sys.argv[2]
from tfpretrain.config import build_config
import yaml
cfg = build_config(yaml.safe_load(open(folder + "/tiny.yaml")), name="tiny")
rows = np.load(folder + "/rows.npy")
B, L, V = cfg.train.batch_size, cfg.model.sequence_length, cfg.tokenizer.vocabulary_size
batches = []
for i in range(20):
    r = rows[i * B:(i + 1) * B]
    w = np.ones((B, L), np.float32)
    if i == 9:
        w[0, 0] = np.nan  # a poisoned batch: step 10 must be skipped
    batches.append((r[:, :L], r[:, 1:], w))
losses, skipped = [], []
if backend == "tensorflow":
    from tfpretrain.training.runtime import build_and_compile
    model = build_and_compile(cfg, V, 1, jit=False, precision="float32")
    np.savez(folder + "/init.npz", *model.network.get_weights())
    for x, y, w in batches:
        model.train_on_batch(x, y, w)
        loss, _, _, skip = model.step_log.numpy()[0]
        losses.append(float(loss)); skipped.append(bool(skip))
else:
    from tfpretrain.models.network import DecoderNet
    from tfpretrain.models.registry import build_backbone
    from tfpretrain.training.stateless import StatelessTrainer
    model = DecoderNet(build_backbone(cfg.model, V), L)
    model(model.example_input())
    init = np.load(folder + "/init.npz")
    model.network.set_weights([init[f"arr_{i}"] for i in range(len(init.files))])
    trainer = StatelessTrainer.from_config(model, cfg)
    state = trainer.initial_state()
    for x, y, w in batches:
        state, logs = trainer.step(state, x, y, w)
        losses.append(float(logs["loss"])); skipped.append(bool(logs["skipped"]))
    assert int(trainer.optimizer.iterations.numpy()) == 0  # the state is functional
    trainer.write_back(state)
    assert int(trainer.optimizer.iterations.numpy()) == 20
print(json.dumps({"losses": losses, "skipped": skipped,
                  "tf": sys.modules.get("tensorflow") is not None}))
'''


def test_jax_step_matches_tensorflow_step_for_20_steps_and_skips_the_poisoned_one(tmp_path):
    raw = tiny_raw(tmp_path, model={"dropout": 0.0, "z_loss": 1e-4},
                   tokenizer={"vocabulary_size": 64}, optimizer={"warmup_steps": 3})
    write_yaml(tmp_path / "tiny.yaml", raw)
    # learnable rows: each id is the previous one + 1 (mod 59, offset past the specials)
    starts = np.random.default_rng(1).integers(0, 59, size=(20 * 16, 1))
    rows = ((starts + np.arange(33)) % 59 + 5).astype(np.int32)
    np.save(tmp_path / "rows.npy", rows)
    results = {}
    for backend in ("tensorflow", "jax"):  # TensorFlow first: it writes the initial weights
        code = (BLOCK_TF if backend == "jax" else "") + PARITY
        r = run_python(code, backend, tmp_path, backend, str(tmp_path))
        results[backend] = json.loads(r.stdout.strip().splitlines()[-1])
    tf_, jax_ = results["tensorflow"], results["jax"]
    assert not jax_["tf"]
    assert tf_["skipped"] == jax_["skipped"] == [i == 9 for i in range(20)]
    for step, (a, b) in enumerate(zip(tf_["losses"], jax_["losses"]), start=1):
        if step != 10:
            assert a == pytest.approx(b, abs=1e-3), (step, a, b)
    assert tf_["losses"][-1] < tf_["losses"][0] - 1.0  # it learned: the match is not trivial


EMA_JAX = BLOCK_TF + '''
import json
import keras
import numpy as np
from tfpretrain.models.guarded import GuardedOptimizer

w = keras.Variable(np.ones((3,), np.float32), name="w")
opt = GuardedOptimizer(keras.optimizers.Adam(0.1), ema=0.3)
opt.build([w])
out = []
for grad in ([1.0, 2.0, 2.0], [np.nan, 1.0, 1.0], [1.0, -2.0, 0.5]):
    tv, ov, _, skipped = opt.stateless_apply(
        [v.value for v in opt.variables], [keras.ops.convert_to_tensor(np.float32(grad))],
        [w.value], loss=keras.ops.ones(()))
    w.assign(tv[0])
    for v, value in zip(opt.variables, ov):
        v.assign(value)
    out.append((np.asarray(w.value).tolist(), np.asarray(opt.averages[0].value).tolist(),
                float(skipped)))
print(json.dumps(out))
'''


def test_the_moving_average_of_the_jax_step_is_the_tensorflow_steps(tmp_path):
    """optimizer.ema in GuardedOptimizer.stateless_apply (the JAX train step): the same
    weights, average and skip decisions as the stateful TensorFlow apply, step by step."""
    from test_guarded_optimizer import ema_trajectory

    jax_ = json.loads(run_python(EMA_JAX, "jax", tmp_path).stdout.strip().splitlines()[-1])
    for (w, average, skipped), (w2, average2, skipped2) in zip(ema_trajectory(), jax_):
        assert skipped == skipped2
        np.testing.assert_allclose(w2, w, rtol=1e-5)
        np.testing.assert_allclose(average2, average, rtol=1e-5)


def test_gpu_table_projects_smolgpts_run_from_the_fastest_bf16_row():
    from tfpretrain.bench import gpu_table

    row = {"shape": "smolgpt-27m", "precision": "mixed_bfloat16", "guard": True,
           "step_ms": 10.0, "mfu_vs_bf16_peak": 0.4, "mfu_vs_fp32_peak": 0.8,
           "peak_memory_bytes": 2e9, "compile_seconds": 30.0,
           "model_flops_per_token": 189_582_336}
    results = [dict(row, batch_size=64, tokens_per_second=500_000.0),
               dict(row, batch_size=128, tokens_per_second=1_000_000.0),
               dict(row, batch_size=256, error="XlaRuntimeError: RESOURCE_EXHAUSTED")]
    table = gpu_table(results)
    assert "| smolgpt-27m | mixed_bfloat16 | 128 | True | 1,000,000 |" in table
    assert "RESOURCE_EXHAUSTED" in table
    # 4e9 tokens / 1e6 tokens/s = 4000 s = 1.11 h
    assert "smolGPT's 4B tokens at 1,000,000 tokens/s" in table and ": 1.11 h," in table
