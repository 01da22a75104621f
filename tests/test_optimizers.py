"""optimizer.name: each Keras optimizer trains, decays only what it should, validates its
keys, survives the guard and resumes bit for bit; schedule-free AdamW evaluates its average."""
import numpy as np
import pytest

from conftest import last_json_line, run_cli, tiny_config

from tfpretrain.config import OPTIMIZERS

# a learning rate each optimizer trains the tiny model with (adafactor's is relative to each
# weight's RMS; sgd has no per-weight normalization)
LEARNING_RATES = {"adamw": 1e-2, "muon": 1e-2, "lion": 3e-3, "adafactor": 3e-1,
                  "schedule_free_adamw": 1e-2, "sgd": 3e-1}


def fixed_batch():
    """16 rows of 32 next-token pairs with a pattern to learn (odd tokens = even + 1)."""
    x = np.random.RandomState(0).randint(5, 60, size=(16, 33))
    x[:, 1::2] = x[:, ::2][:, :16] + 1
    return x[:, :-1], x[:, 1:], np.ones((16, 32), "float32")


def compiled(tmp_path, name, arch="gpt2", **optimizer):
    import keras

    from tfpretrain.training.runtime import build_and_compile

    lr = LEARNING_RATES[name]
    cfg = tiny_config(tmp_path, model={"arch": arch}, train={"steps": 30},
                      optimizer={"name": name, "learning_rate": lr,
                                 "min_learning_rate": lr / 10, **optimizer})
    keras.utils.set_random_seed(0)
    return build_and_compile(cfg, 320, 1)


@pytest.mark.parametrize("name", [  # the rest under -m slow (suite time)
    n if n in ("adamw", "muon", "schedule_free_adamw") else pytest.param(n, marks=pytest.mark.slow)
    for n in OPTIMIZERS])
def test_each_optimizer_lowers_the_training_loss(tmp_path, name):
    model = compiled(tmp_path, name, arch="llama" if name == "muon" else "gpt2")
    batch = fixed_batch()
    losses = [float(model.train_on_batch(*batch)[0]) for _ in range(30)]
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.8 * losses[0], (name, losses[0], losses[-1])


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_weight_decay_spares_norms_biases_and_embeddings(tmp_path, name):
    """Updates with zero gradients move a weight only by decay: every kernel shrinks
    (by lr * weight_decay = 0.5% a step), every bias, norm and embedding stays (to float
    rounding: schedule-free AdamW's interpolation rounds). Two steps: schedule-free AdamW's
    first average is its starting point, which undoes the first step's decay."""
    import keras

    model = compiled(tmp_path, name, warmup_steps=0, weight_decay=0.5)
    variables = model.trainable_variables
    before = [v.numpy().copy() for v in variables]
    for _ in range(2):
        model.optimizer.apply_gradients([(keras.ops.zeros_like(v), v) for v in variables])
    for v, old in zip(variables, before):
        exempt = any(part in v.path.split("/")[-1] for part in
                     ("bias", "gamma", "beta", "scale", "embeddings"))
        if exempt:
            np.testing.assert_allclose(v.numpy(), old, rtol=1e-6, atol=0, err_msg=v.path)
        elif v.path.endswith("kernel"):
            assert np.abs(v.numpy()).sum() < 0.999 * np.abs(old).sum(), (name, v.path)


def test_muon_updates_every_hidden_matrix_and_adamw_the_rest(tmp_path):
    from tfpretrain.compat import matrix_shape

    model = compiled(tmp_path, "muon", arch="llama")
    opt = model.optimizer.inner_optimizer
    muon = {v.path for v in model.trainable_variables if opt.uses_muon(v)}
    kernels = {v.path for v in model.trainable_variables if v.path.endswith("kernel")}
    assert muon == kernels and len(kernels) == 14       # q, k, v, o (3-D) and 3 MLP, x 2 layers
    assert not any("embedding" in p or "norm" in p for p in muon)
    # a 3-D attention kernel is orthogonalized as the projection's own matrix
    assert matrix_shape((512, 8, 64)) == (512, 512)      # query: hidden x (heads * head_dim)
    assert matrix_shape((8, 64, 512)) == (512, 512)      # output: (heads * head_dim) x hidden
    assert matrix_shape((512, 2, 64)) == (512, 128)      # GQA key
    assert matrix_shape((64, 256)) == (64, 256)


def test_muon_learning_rate_scales_only_the_muon_matrices(tmp_path):
    """Twice the muon rate: the first update of a Muon matrix doubles, an AdamW weight's
    does not change."""
    import keras

    moves = []
    for muon_lr in (1e-2, 2e-2):
        model = compiled(tmp_path, "muon", warmup_steps=0, weight_decay=0.0,
                         muon_learning_rate=muon_lr)
        before = [v.numpy().copy() for v in model.trainable_variables]
        keras.utils.set_random_seed(1)
        grads = [keras.random.normal(v.shape) for v in model.trainable_variables]
        model.optimizer.apply_gradients(zip(grads, model.trainable_variables))
        moves.append({v.path: np.abs(v.numpy() - b).max()
                      for v, b in zip(model.trainable_variables, before)})
        muon_path = next(v.path for v in model.trainable_variables
                         if model.optimizer.inner_optimizer.uses_muon(v))
    assert moves[1][muon_path] == pytest.approx(2 * moves[0][muon_path], rel=1e-4)
    embedding = next(p for p in moves[0] if p.endswith("token_embedding/embeddings"))
    assert moves[1][embedding] == pytest.approx(moves[0][embedding], rel=1e-6)


def test_schedule_free_evaluates_its_average_and_trains_on_unchanged(tmp_path):
    from tfpretrain.training.optimizers import evaluation_weights

    model = compiled(tmp_path, "schedule_free_adamw")
    batch = fixed_batch()
    for _ in range(10):
        model.train_on_batch(*batch)
    y = [v.numpy().copy() for v in model.trainable_variables]
    z = [v.numpy() for v in model.optimizer.inner_optimizer.z]
    with evaluation_weights(model):
        x = [v.numpy().copy() for v in model.trainable_variables]
    after = [v.numpy() for v in model.trainable_variables]
    assert all(np.array_equal(a, b) for a, b in zip(y, after))      # y back bit for bit
    beta_1 = 0.9
    for xi, yi, zi in zip(x, y, z):                                 # y = (1-b) z + b x
        np.testing.assert_allclose((1 - beta_1) * zi + beta_1 * xi, yi, atol=1e-6)
    assert not all(np.array_equal(a, b) for a, b in zip(x, y))


def test_ema_is_what_is_evaluated_and_training_is_unchanged(tmp_path):
    """optimizer.ema: inside evaluation_weights the model holds the moving average of the
    weights (from the initial weights, m * avg + (1 - m) * w after step n, m = min(ema,
    (1 + n) / (10 + n))); the trained weights are back bit for bit afterwards and equal a
    run's without the EMA, through train_on_batch and model.fit alike."""
    from tfpretrain.training.optimizers import evaluation_weights

    batch = fixed_batch()
    plain, ema = compiled(tmp_path, "adamw"), compiled(tmp_path, "adamw", ema=0.4)
    average = [v.numpy().copy() for v in ema.trainable_variables]
    for step in range(8):
        for model in (plain, ema):  # 6 train_on_batch steps, then 2 fit calls of one step
            if step < 6:
                model.train_on_batch(*batch)
            else:
                model.fit(batch[0], batch[1], sample_weight=batch[2], verbose=0)
        w = [v.numpy().copy() for v in ema.trainable_variables]
        assert all(np.array_equal(a, v.numpy()) for a, v in zip(w, plain.trainable_variables))
        m = min(0.4, (2 + step) / (11 + step))  # n = step + 1: 0.18, 0.25, ..., then 0.4
        average = [m * a + (1 - m) * x for a, x in zip(average, w)]
    with evaluation_weights(ema):
        evaluated = [v.numpy().copy() for v in ema.trainable_variables]
    with evaluation_weights(plain):  # no average: nothing changes
        assert all(np.array_equal(v.numpy(), x) for v, x in zip(plain.trainable_variables, w))
    assert all(np.array_equal(v.numpy(), x) for v, x in zip(ema.trainable_variables, w))
    for e, a, x in zip(evaluated, average, w):
        np.testing.assert_allclose(e, a, rtol=1e-5, atol=1e-6)
    assert sum(not np.allclose(e, x) for e, x in zip(evaluated, w)) > len(w) // 2


def test_guard_skips_a_nan_step_with_muon_weights_and_moments_unchanged(tmp_path):
    from test_resume import _fit_with_weights_per_step, _same

    model, snaps = _fit_with_weights_per_step(
        tmp_path, debug={"nan_at_step": 8}, train={"steps": 12},
        optimizer={"name": "muon"})
    assert _same(snaps[7][0], snaps[8][0]) and _same(snaps[7][1][1:], snaps[8][1][1:])
    assert snaps[8][2][3] == 1.0 and not _same(snaps[8][0], snaps[9][0])


def extended_run(tmp_path, name, steps, run_dir, spe=2):
    from tfpretrain.fit import fit

    cfg = tiny_config(tmp_path, optimizer={"name": name, "schedule": "constant",
                                           "warmup_steps": 4},
                      train={"steps": steps, "checkpoint_every": 10, "deterministic": True,
                             "steps_per_execution": spe},
                      eval={"every": 10, "final_steps": 2}, export={"enabled": False})
    return fit(cfg, run_dir)


@pytest.mark.slow  # suite time; run with -m slow
@pytest.mark.parametrize("name", [  # schedule-free's y is restored bit for bit: tested above
    "muon", *[pytest.param(n, marks=pytest.mark.slow)
              for n in ("schedule_free_adamw", "adamw", "lion", "adafactor", "sgd")]])
def test_resume_with_more_steps_is_bitwise_the_unbroken_run(tmp_path, name):
    """20 steps, then resumed to 40 (constant schedule), equals 40 steps in one go:
    weights, optimizer state (hence the next updates) and the final val loss."""
    unbroken = extended_run(tmp_path, name, 40, tmp_path / "a")
    extended_run(tmp_path, name, 20, tmp_path / "b")
    resumed = extended_run(tmp_path, name, 40, tmp_path / "b")
    assert resumed["steps"] == unbroken["steps"] == 40
    assert resumed["weights_sha256"] == unbroken["weights_sha256"]
    assert resumed["val_loss"] == unbroken["val_loss"]


@pytest.mark.parametrize("override, named", [
    ("optimizer.momentum=0.9", "`optimizer.momentum` does not apply to `optimizer.name: adamw`"),
    ("optimizer.name=sgd", None),
    ("optimizer.muon_learning_rate=0.02", "`optimizer.muon_learning_rate` does not apply"),
])
def test_a_key_of_another_optimizer_is_named_in_the_error(tmp_path, override, named):
    from tfpretrain.config import ConfigError, build_config

    name, value = override.split("=")
    section, key = name.split(".")
    raw = {"optimizer": {key: value if key == "name" else float(value)}}
    if named is None:
        assert build_config(raw).optimizer.setting("momentum") == 0.9
        return
    with pytest.raises(ConfigError) as err:
        build_config(raw)
    assert named in str(err.value)


def test_wrong_optimizer_key_and_schedule_free_schedule_exit_2_on_the_command_line():
    r = run_cli("tfpretrain.fit", "--dry-run", "--set", "optimizer.name=lion",
                "--set", "optimizer.epsilon=1e-6", "--set", "optimizer.name=lion")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "`optimizer.epsilon` does not apply to `optimizer.name: lion`" in r.stderr
    r = run_cli("tfpretrain.fit", "--dry-run", "--set", "optimizer.name=schedule_free_adamw",
                "--set", "optimizer.schedule=cosine")
    assert r.returncode == 2 and "leave `optimizer.schedule` unset or `constant`" in r.stderr
    r = run_cli("tfpretrain.fit", "--dry-run", "--set", "optimizer.name=schedule_free_adamw")
    assert r.returncode == 0, r.stderr[-2000:]
    assert last_json_line(r.stdout)


def test_a_run_with_ema_evaluates_and_exports_the_average_and_resumes_only_with_it(tmp_path):
    """Two deterministic runs, with and without optimizer.ema: the same training losses
    at every step (and so the same trained weights), but the EMA run's validation, the
    model a run folder loads (evaluate, generate, a distillation teacher) and its exported
    SavedModel all hold the average, so they differ from the plain run's; a resume that
    changes optimizer.ema exits 2 naming it."""
    from conftest import tiny_raw, write_yaml
    from test_fit import read_scalars
    from tfpretrain.errors import UserError
    from tfpretrain.evaluate import _documents, evaluate_saved_model
    from tfpretrain.fit import fit
    from tfpretrain.training.runfolder import load_run

    raw = tiny_raw(tmp_path, train={"steps": 20, "deterministic": True},
                   eval={"every": 10, "final_steps": 2},
                   export={"validate": False, "dir": str(tmp_path / "exports")})
    cfg = write_yaml(tmp_path / "c.yaml", raw)
    summaries, exported, loaded = {}, {}, {}
    for name, ema in (("plain", "0"), ("ema", "0.9")):
        # trained in their own processes: op determinism, once on, stays on in a process
        r = run_cli("tfpretrain.fit", "--config", str(cfg), "--run-dir", str(tmp_path / name),
                    "--set", f"optimizer.ema={ema}", "--set", f"export.name={name}")
        assert r.returncode == 0, r.stderr[-3000:]
        summaries[name] = last_json_line(r.stdout)
        exported[name] = evaluate_saved_model(summaries[name]["saved_model"], _documents(
            tiny_config(tmp_path), None))["val_loss"]
        loaded[name] = [v.numpy() for v in load_run(tmp_path / name)[2].trainable_variables]
    plain, ema = (read_scalars(tmp_path / n / "logs" / "train")["loss"] for n in summaries)
    assert sorted(plain) == list(range(1, 21)) and plain == ema    # training is untouched
    assert summaries["ema"]["val_loss"] != summaries["plain"]["val_loss"]
    assert exported["ema"] != exported["plain"], exported
    assert not np.allclose(loaded["ema"][0], loaded["plain"][0])
    with pytest.raises(UserError, match=r"optimizer\.ema \(0\.9 -> 0\.0\)"):
        fit(tiny_config(tmp_path, train={"steps": 30}, eval={"every": 10}), tmp_path / "ema")
