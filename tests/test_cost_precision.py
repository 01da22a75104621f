"""FLOPs, MFU and cost; the estimate command; mixed precision; gradient accumulation."""
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, last_json_line, run_cli, tiny_config


def test_flops_per_token_hand_counts_llama_gqa_and_bert():
    """N counted by hand from the layer shapes; FLOPs = 6 N (N without a learned position
    table) + 12 L H T. GQA shrinks k/v projections (so N) but not the attention matmuls."""
    from tfpretrain.config import ModelConfig
    from tfpretrain.models.registry import build_backbone, flops_per_token

    V, L, H, I, T = 100, 2, 32, 64, 16
    llama = ModelConfig(arch="llama", num_layers=L, num_heads=4, num_key_value_heads=2,
                        hidden_dim=H, intermediate_dim=I, sequence_length=T)
    kv = 2 * (H // 4)  # 2 kv heads of width 8
    per_layer = H * H + 2 * H * kv + H * H + 3 * H * I + 2 * H  # q, k, v, o, SwiGLU, 2 norms
    n_llama = V * H + L * per_layer + H                          # tied table, final norm
    assert build_backbone(llama, V).count_params() == n_llama
    assert flops_per_token(llama, n_llama, V) == 6 * n_llama + 12 * L * H * T

    bert = ModelConfig(arch="bert", num_layers=L, num_heads=4, hidden_dim=H,
                       intermediate_dim=I, sequence_length=T)
    per_layer = 4 * (H * H + H) + (H * I + I) + (I * H + H) + 2 * 2 * H
    n_bert = V * H + T * H + 2 * H + 2 * H + L * per_layer + H * H + H  # + pooler
    assert build_backbone(bert, V).count_params() == n_bert
    assert flops_per_token(bert, n_bert, V) == 6 * (n_bert - T * H) + 12 * L * H * T


def test_estimated_params_within_two_percent_of_the_built_model():
    from tfpretrain.config import load_config
    from tfpretrain.objectives import count_params
    from tfpretrain.training.runtime import estimated_params

    for name, sets in (("default", []), ("tinystories-27m", ["model.num_key_value_heads=2"])):
        cfg = load_config(name, sets + ["model.num_layers=2"])
        vocab = cfg.tokenizer.vocabulary_size
        assert estimated_params(cfg, vocab) == pytest.approx(count_params(cfg, vocab), rel=0.02)


def estimate_json(*args):
    """The estimate command in a fresh process; TensorFlow must not be imported."""
    code = ("import sys, json; from tfpretrain.estimate import main; rc = main(sys.argv[1:]); "
            "print(json.dumps({'rc': rc, 'tf': 'tensorflow' in sys.modules}))")
    r = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    lines = r.stdout.strip().splitlines()
    return r, (__import__("json").loads(lines[-2]) if len(lines) > 1 else None), \
        last_json_line(r.stdout)


def test_estimate_reproduces_smolgpts_18_5_hours_and_13_dollars():
    r, result, status = estimate_json("--config", "tinystories-27m", "--params", "27.5M",
                                      "--tokens", "4B", "--device", "l4",
                                      "--tokens-per-second", "60000",
                                      "--tune", "configs/tune.yaml")
    assert status == {"rc": 0, "tf": False}, r.stderr[-2000:]
    assert result["hours"] == pytest.approx(18.5, rel=0.10)
    assert result["cost_usd"] == pytest.approx(13.0, rel=0.10)
    assert result["chinchilla_tokens"] == 20 * 27_500_000
    assert result["flops"] == pytest.approx(result["flops_per_token"] * 4e9)
    l4 = next(row for row in result["rows"] if row["device"] == "l4")
    # MFU derived from the measured speed: 60k tok/s x FLOPs/token / L4's 121 TFLOP/s bf16
    assert l4["mfu"] == pytest.approx(60_000 * result["flops_per_token"] / 121e12, rel=1e-3)
    h100 = next(row for row in result["rows"] if row["device"] == "h100")
    assert h100["mfu"] == pytest.approx(0.30) and h100["hours"] < l4["hours"]
    # the search: 8 trials x 150 steps x 32 x 128 tokens, at the L4's MFU
    assert result["search"]["tokens"] == 8 * 150 * 32 * 128
    assert 0 < result["search_cost_usd"] < result["cost_usd"]
    assert result["total_cost_usd"] == pytest.approx(result["cost_usd"]
                                                     + result["search_cost_usd"])


def test_estimate_refuses_bad_input_with_one_message():
    r = run_cli("tfpretrain.estimate", "--device", "k80")
    assert r.returncode == 2 and "unknown device 'k80'" in r.stderr and "l4" in r.stderr
    r = run_cli("tfpretrain.estimate", "--mfu", "1.5")
    assert r.returncode == 2 and "--mfu" in r.stderr
    r = run_cli("tfpretrain.estimate", "--tokens-per-second", "1000")
    assert r.returncode == 2 and "--device" in r.stderr
    r = run_cli("tfpretrain.estimate", "--params", "lots")
    assert r.returncode == 2 and "27.5M" in r.stderr
    assert "Traceback" not in r.stderr


def _train_steps(cfg, batches, vocab=320):
    import keras
    import tensorflow as tf

    from tfpretrain.training.runtime import build_and_compile

    keras.utils.set_random_seed(7)
    model = build_and_compile(cfg, vocab, 1, jit=False)
    x, y, w = batches
    ds = tf.data.Dataset.from_tensor_slices((x, y, w)).batch(cfg.train.batch_size)
    losses = []
    for batch in ds:
        model.train_on_batch(*batch)
        losses.append(float(model.step_log.numpy()[0][0]))
    return model, losses


def test_accumulation_4x4_matches_batch_16_and_steps_the_schedule_once(tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, 320, size=(48, 33)).astype("int32")
    weights = np.ones((48, 32), "float32")
    weights[::3, 20:] = 0.0  # uneven real-token counts across micro-batches
    batches = (tokens[:, :-1], tokens[:, 1:], weights)
    results = {}
    for k in (1, 4):
        cfg = tiny_config(tmp_path, train={"batch_size": 16, "grad_accumulation_steps": k},
                          optimizer={"warmup_steps": 2})
        results[k] = _train_steps(cfg, batches)
    (full, full_losses), (acc, acc_losses) = results[1], results[4]
    assert np.allclose(full_losses, acc_losses, rtol=1e-5, atol=1e-6), (full_losses, acc_losses)
    assert int(acc.optimizer.iterations.numpy()) == 3  # 3 optimizer steps, not 12
    for a, b in zip(full.network.get_weights(), acc.network.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_accumulation_must_divide_the_global_batch(tmp_path):
    from tfpretrain.config import ConfigError

    with pytest.raises(ConfigError, match="divisible by `train.grad_accumulation_steps`"):
        tiny_config(tmp_path, train={"batch_size": 16, "grad_accumulation_steps": 3})


@pytest.mark.parametrize("precision", [pytest.param("mixed_bfloat16", marks=pytest.mark.slow),
                                       "mixed_float16"])
def test_mixed_precision_fit_learns_and_exports_float32(tmp_path, precision):
    """bf16 (exported and validated in a fresh process) and fp16 with Keras's loss scaling:
    the loss falls, weights stay float32, the exported/evaluated model computes in float32."""
    import tensorflow as tf

    from tfpretrain.fit import fit
    from tfpretrain.training.runfolder import load_run

    export = precision == "mixed_bfloat16"
    cfg = tiny_config(tmp_path, train={"steps": 60, "precision": precision},
                      eval={"every": 20}, export={"enabled": export})
    summary = fit(cfg, tmp_path / "run")
    assert summary["precision"] == precision
    assert summary["val_loss"] < summary["unigram_val_loss"]
    assert summary["skipped_steps"] <= 5  # fp16: only a few loss-scale overflows
    if export:
        assert summary["saved_model"] and "export_error" not in summary
        reader = tf.train.load_checkpoint(f"{summary['saved_model']}/variables/variables")
        dtypes = {d for name, d in reader.get_variable_to_dtype_map().items()
                  if "OBJECT_GRAPH" not in name}
        assert tf.float32 in dtypes and not dtypes & {tf.bfloat16, tf.float16}
    _, _, model = load_run(tmp_path / "run")
    assert model.network.dtype_policy.name == "float32"
    assert all(w.dtype == "float32" for w in model.network.weights)


def test_auto_precision_on_this_cpu_follows_the_work_per_step(tmp_path):
    """CPU: float32 + XLA for small steps (the quickstart); bf16 without XLA for big ones,
    only where the CPU has native bf16 (measured faster there: docs/benchmarks.md)."""
    from tfpretrain.config import load_config
    from tfpretrain.hardware import cpu_has_bf16
    from tfpretrain.training.runtime import jit_compile, resolve_precision

    small = load_config("default")
    assert resolve_precision(small, 2048) == "float32" and jit_compile(small, "float32")
    big = load_config("default", ["model.num_layers=6", "model.num_heads=6",
                                  "model.hidden_dim=384", "model.intermediate_dim=1536",
                                  "model.sequence_length=256", "train.batch_size=16"])
    expected = "mixed_bfloat16" if cpu_has_bf16() else "float32"
    assert resolve_precision(big, 2048) == expected
    assert jit_compile(big, "mixed_bfloat16") is False
    assert jit_compile(load_config("default", ["train.jit_compile=true"]), "mixed_bfloat16")
    assert resolve_precision(load_config("default", ["train.precision=mixed_float16"]),
                             2048) == "mixed_float16"


def test_two_cores_get_one_inter_op_thread_only_for_an_xla_compiled_step():
    """Set in a fresh process (TensorFlow fixes its threads when it starts): 1 for the
    quickstart's float32 + XLA step; TensorFlow's default (0) for a step run op by op."""
    code = ("import sys; from tfpretrain.config import load_config; "
            "from tfpretrain.training.runtime import configure_tensorflow; "
            "configure_tensorflow(load_config('default', sys.argv[1:])); import tensorflow as tf; "
            "print(tf.config.threading.get_inter_op_parallelism_threads())")
    for sets, expected in (([], 1), (["train.jit_compile=false"], 0)):
        r = subprocess.run([sys.executable, "-c", code, *sets], capture_output=True, text=True,
                           cwd=REPO, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        threads = int(r.stdout.strip().splitlines()[-1])
        assert threads == (expected if (os.cpu_count() or 1) <= 4 else 0), (sets, threads)


def test_steps_per_execution_is_the_largest_divisor_up_to_16_of_every_mark():
    """eval.every 250 (nanoGPT's interval, the char recipe's) ran 2 steps per call when
    only powers of two were tried; any divisor up to 16 of eval.every, checkpoint_every and
    steps now counts."""
    from tfpretrain.config import load_config
    from tfpretrain.training.runtime import choose_steps_per_execution

    def spe(*sets):
        return choose_steps_per_execution(load_config("default", list(sets)))

    assert choose_steps_per_execution(load_config("char-cpu")) == 10  # 250, 2000
    assert spe("eval.every=200", "train.steps=800") == 10
    assert spe("eval.every=64", "train.steps=1024") == 16
    assert spe("eval.every=250", "train.steps=2000", "train.checkpoint_every=100") == 10
    assert spe("eval.every=7", "train.steps=700") == 7
    assert spe("eval.every=17", "train.steps=1700") == 1
    assert spe("train.steps_per_execution=5") == 5
    assert choose_steps_per_execution(load_config("default"), distributed=True) == 1


def test_the_cpu_name_tells_generations_apart():
    """Two EPYC generations both read "AMD EPYC" in /proc/cpuinfo; their measured peaks
    (cached under the name) and speeds differ by about 2x."""
    from tfpretrain.hardware import cpu_model_from

    block = "processor\t: {i}\nvendor_id\t: AuthenticAMD\ncpu family\t: {f}\nmodel\t\t: {m}\n" \
            "model name\t: AMD EPYC\nflags\t\t: fpu avx512f\n\n"
    zen5 = block.format(i=0, f=26, m=2) + block.format(i=1, f=26, m=2)
    older = block.format(i=0, f=25, m=17)
    assert cpu_model_from(zen5) == "AMD EPYC (family 26 model 2)"
    assert cpu_model_from(older) == "AMD EPYC (family 25 model 17)"
    assert cpu_model_from("processor\t: 0\nmodel name\t: ARMv8 Processor\n") == \
        "ARMv8 Processor"
    assert cpu_model_from("processor\t: 0\nBogoMIPS\t: 50.00\n") is None


def test_a_cpu_rate_above_the_cached_peak_raises_it_for_later_runs(tmp_path, monkeypatch,
                                                                   capsys):
    """A peak measured while the machine was busy reads low (0.13 vs 0.24 TFLOP/s seen on
    one machine), which made MFU read 115%: the run's own rate becomes the peak."""
    import json

    from tfpretrain import hardware
    from tfpretrain.training.callbacks import Meter

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = hardware.peak_cache_path()
    path.parent.mkdir(parents=True)
    low = {hardware._peak_key("float32"): 1e9, hardware._peak_key("bfloat16"): 2e9}
    path.write_text(json.dumps(low))
    device = hardware.cpu_device()               # read from the cache, not measured
    assert (device.fp32, device.bf16) == (1e-3, 2e-3)
    meter = Meter(device, 1000, device.peak("float32"), 0.1, 10)
    assert meter.mfu(500_000) == pytest.approx(0.5)
    assert meter.mfu(3_000_000) == 1.0          # 3e9 FLOP/s achieved > the 1e9 peak
    assert "the peak is now 0.003 TFLOP/s" in capsys.readouterr().err
    assert meter.mfu(1_500_000) == pytest.approx(0.5)
    stored = json.loads(path.read_text())
    assert stored[hardware._peak_key("float32")] == 3e9
    assert stored[hardware._peak_key("bfloat16")] == 2e9      # other precisions untouched
    assert hardware.raise_cpu_peak("float32", 2e9) is None    # never lowered
    assert hardware.measured_cpu_peak("float32") == 3e9


def test_the_progress_line_carries_the_losses_then_speed_eta_and_cost(tmp_path, monkeypatch):
    """The one line per evaluation interval (the only one in a log file: Keras's own epoch
    lines are off there): the interval's loss, val_loss and lr from Keras's logs, then
    tokens/s, MFU, elapsed, ETA and the cost so far."""
    import json

    from tfpretrain import hardware
    from tfpretrain.training.callbacks import Meter

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = hardware.peak_cache_path()
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({hardware._peak_key("float32"): 1e10,
                                hardware._peak_key("bfloat16"): 2e10}))
    meter = Meter(hardware.cpu_device(), 1000, 1e10, 3.6, 1000)
    logs = {"loss": 3.81634, "lr": 0.0029, "val_loss": 1.44601, "tok/s": 5e6, "mfu": 0.5}
    assert meter.progress(200, 5e6, 10_000, 40.0, logs) == (
        "step 200/1,000: loss 3.8163, val_loss 1.4460, lr 2.90e-03 | 5,000,000 tok/s, "
        "MFU 50.0%, elapsed 0:40, ETA 0:01, cost so far $0.0400")
    assert meter.progress(200, 5e6, 10_000, 40.0) == (
        "step 200/1,000: 5,000,000 tok/s, MFU 50.0%, elapsed 0:40, ETA 0:01, cost so far "
        "$0.0400")
