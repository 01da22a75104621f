"""The stability guard as an optimizer wrapper (models.guarded), on its own: what it skips,
what a skip leaves unchanged, clipping, re-baselining, and that a plain optimizer handed to
``CausalLM.compile`` is wrapped."""
import numpy as np
import pytest


def _guarded(**kwargs):
    import keras

    from tfpretrain.models.guarded import GuardedOptimizer

    w = keras.Variable(np.ones((3,), np.float32), name="w")
    opt = GuardedOptimizer(keras.optimizers.Adam(0.1), **kwargs)
    opt.build([w])
    return w, opt


def _step(opt, w, grad, loss=1.0):
    import keras

    grad = keras.ops.convert_to_tensor(np.asarray(grad, np.float32))
    norm, skipped = opt.apply([grad], [w], loss=keras.ops.convert_to_tensor(loss))
    return float(norm), float(skipped)


def test_a_non_finite_step_is_skipped_leaving_weights_and_moments():
    w, opt = _guarded()
    _step(opt, w, [1.0, 2.0, 2.0])
    before = [v.numpy().copy() for v in opt.inner_optimizer.variables[1:]], w.numpy().copy()
    norm, skipped = _step(opt, w, [np.nan, 1.0, 1.0])
    assert skipped == 1.0 and np.isnan(norm)
    np.testing.assert_array_equal(w.numpy(), before[1])
    for v, old in zip(opt.inner_optimizer.variables[1:], before[0]):
        np.testing.assert_array_equal(v.numpy(), old)
    assert int(opt.iterations.numpy()) == 2                 # the counter still advances
    assert int(opt.skipped_steps.numpy()) == 1 and int(opt.consecutive_skips.numpy()) == 1
    assert _step(opt, w, [1.0, 2.0, 2.0]) == (3.0, 0.0)     # and the next step goes on
    assert int(opt.consecutive_skips.numpy()) == 0


def test_spikes_are_skipped_after_a_full_window_and_a_sustained_shift_rebaselines():
    w, opt = _guarded(spike_window=4, spike_threshold=3.0, rebaseline_after=3)
    rng = np.random.default_rng(0)
    for _ in range(4):  # a window of ordinary steps
        assert _step(opt, w, [1.0, 0.0, 0.0], loss=2.0 + 0.01 * rng.standard_normal())[1] == 0
    assert _step(opt, w, [1.0, 0.0, 0.0], loss=50.0)[1] == 1.0   # a loss spike
    assert _step(opt, w, [100.0, 0.0, 0.0], loss=2.0)[1] == 1.0  # a gradient-norm spike
    # the third spike in a row is a new level: applied, and the window starts again
    assert _step(opt, w, [1.0, 0.0, 0.0], loss=50.0)[1] == 0.0
    assert int(opt.guard_accepted.numpy()) == 1 and int(opt.skipped_steps.numpy()) == 2


def test_clipping_scales_to_the_global_norm_and_is_counted():
    w, opt = _guarded(clipnorm=1.0, guard=False)
    import keras

    plain = keras.Variable(np.ones((3,), np.float32))
    ref = keras.optimizers.Adam(0.1)
    ref.build([plain])
    norm, skipped = _step(opt, w, [3.0, 4.0, 0.0])
    ref.apply([keras.ops.convert_to_tensor(np.array([0.6, 0.8, 0.0], np.float32))], [plain])
    assert norm == pytest.approx(5.0) and skipped == 0.0
    np.testing.assert_allclose(w.numpy(), plain.numpy(), rtol=1e-6)
    assert int(opt.clipped_steps.numpy()) == 1
    _step(opt, w, [np.inf, 0.0, 0.0])                       # guard off: nothing is skipped
    assert int(opt.skipped_steps.numpy()) == 0


def test_a_plain_optimizer_given_to_the_model_is_wrapped(tmp_path):
    import keras

    from conftest import tiny_config
    from tfpretrain.models.guarded import GuardedOptimizer
    from tfpretrain.objectives import build_model

    model = build_model(tiny_config(tmp_path), 100)
    model.compile(optimizer=keras.optimizers.AdamW(1e-3))
    assert isinstance(model.optimizer, GuardedOptimizer)
    ids = np.random.default_rng(0).integers(4, 100, size=(4, 33)).astype(np.int32)
    weight = np.ones((4, 32), np.float32)
    weight[0, 0] = np.nan                                   # a poisoned batch
    model.train_on_batch(ids[:, :32], ids[:, 1:], weight)
    assert int(model.optimizer.skipped_steps.numpy()) == 1
    assert int(model.optimizer.iterations.numpy()) == 1


def test_a_traced_step_evaluates_the_schedule_once_with_the_same_update():
    """Keras's AdamW asks for the learning rate once per decayed variable; inside the
    guard's apply the schedule is traced once per graph, and the update is the same as
    plain AdamW's (weight decay included) at every step of a warmup schedule."""
    import keras
    import tensorflow as tf

    from tfpretrain.models.guarded import GuardedOptimizer

    class Counting(keras.optimizers.schedules.LearningRateSchedule):
        calls = 0

        def __call__(self, step):
            Counting.calls += 1
            return 0.1 * tf.minimum(tf.cast(step, tf.float32) + 1.0, 3.0) / 3.0

    def variables():
        return [keras.Variable(np.full((3, 2), 1.0 + i, np.float32), name=f"kernel{i}")
                for i in range(4)]

    ours, ref = variables(), variables()
    opt = GuardedOptimizer(keras.optimizers.AdamW(Counting(), weight_decay=0.5))
    plain = keras.optimizers.AdamW(Counting(), weight_decay=0.5)
    opt.build(ours)
    plain.build(ref)
    grads = [tf.constant(np.full((3, 2), 0.1 * (i + 1), np.float32)) for i in range(4)]
    step = tf.function(lambda: opt.apply(grads, ours, loss=tf.constant(1.0)))
    step.get_concrete_function()
    assert Counting.calls == 1          # plain AdamW would ask 5 times (4 decays + update)
    for _ in range(4):
        step()
        plain.apply(grads, ref)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6)
    assert float(opt.learning_rate) == pytest.approx(0.1)


EMA_GRADS = ([1.0, 2.0, 2.0], [np.nan, 1.0, 1.0], [1.0, -2.0, 0.5])


def ema_trajectory():
    """(weights, average, skipped) after each of EMA_GRADS, stateful ``apply``."""
    w, opt = _guarded(ema=0.3)
    out = []
    for grad in EMA_GRADS:
        _, skipped = _step(opt, w, grad)
        out.append((w.numpy().tolist(), opt.averages[0].numpy().tolist(), skipped))
    return out


def test_the_moving_average_follows_applied_steps_only():
    """ema: the average starts at the weights and takes in each applied step's weights with
    momentum min(ema, (1 + n) / (10 + n)); a skipped (non-finite) step leaves it as it
    was. (Its stateless form, the JAX step's: tests/test_jax_backend.py.)"""
    expected = np.ones(3)
    for n, (w, average, skipped) in enumerate(ema_trajectory(), start=1):
        if not skipped:
            m = min(0.3, (1 + n) / (10 + n))
            expected = m * expected + (1 - m) * np.asarray(w)
        np.testing.assert_allclose(average, expected, rtol=1e-6)
    assert [t[2] for t in ema_trajectory()] == [0.0, 1.0, 0.0]
    assert not np.allclose(expected, w)
