"""Activations and layer norms fused by XLA in steps TensorFlow runs op by op."""
import numpy as np
import pytest

from conftest import tiny_config


def _xla_calls(graph) -> int:
    """Ops of ``graph`` that call a function XLA must compile."""
    count = 0
    for op in graph.get_operations():
        try:
            count += bool(op.get_attr("_XlaMustCompile"))
        except ValueError:
            pass
    return count


def _loss_and_grads(model, x, y, fused_on: bool):
    import tensorflow as tf

    from tfpretrain.models.fused import fused_ops

    @tf.function
    def step(x, y):
        with fused_ops(model.network, enabled=fused_on), tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = tf.reduce_mean(model.token_losses(y, logits))
        return loss, tape.gradient(loss, model.trainable_variables)

    loss, grads = step(x, y)
    graph = step.get_concrete_function(x, y).graph
    return float(loss), [tf.convert_to_tensor(g).numpy() for g in grads], _xla_calls(graph)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_fused_ops_compute_what_keras_does_and_leave_the_model_as_it_was(tmp_path, arch):
    """float32: the same loss and gradients as Keras's own ops (within float rounding),
    through XLA kernels (one forward, one backward per fused op); afterwards every layer
    has its own activation and call again, and the config is unchanged."""
    import keras

    from tfpretrain import compat
    from tfpretrain.objectives import build_model

    cfg = tiny_config(tmp_path, model={"arch": arch})
    keras.utils.set_random_seed(3)
    model = build_model(cfg, 320, 1, "float32")
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, 320, size=(4, cfg.model.sequence_length + 1)).astype("int32")
    x, y = tokens[:, :-1], tokens[:, 1:]
    config_before = model.network.get_config()
    activations_before = [getattr(la, "activation", None) for la in compat.sublayers(model)]

    plain_loss, plain_grads, plain_xla = _loss_and_grads(model, x, y, fused_on=False)
    fused_loss, fused_grads, fused_xla = _loss_and_grads(model, x, y, fused_on=True)

    assert plain_xla == 0
    norms = cfg.model.num_layers * 2 + 1 if arch == "gpt2" else 0  # Llama: its own RMS norm
    assert fused_xla == 2 * (cfg.model.num_layers + norms)  # forward + backward each
    assert abs(fused_loss - plain_loss) < 1e-5 * abs(plain_loss)
    for a, b in zip(plain_grads, fused_grads):
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-6)
    assert model.network.get_config() == config_before
    assert [getattr(la, "activation", None) for la in compat.sublayers(model)] == \
        activations_before
    assert not any("call" in vars(la) for la in compat.sublayers(model))


def test_the_train_step_fuses_only_when_it_is_not_xla_compiled(tmp_path):
    """bf16 on a CPU (no whole-step XLA) trains through the fused kernels; an XLA-compiled
    step keeps Keras's ops, which XLA fuses itself."""
    import tensorflow as tf

    from tfpretrain.training.runtime import build_and_compile

    cfg = tiny_config(tmp_path, train={"batch_size": 4})
    rng = np.random.default_rng(1)
    tokens = rng.integers(5, 320, size=(4, cfg.model.sequence_length + 1)).astype("int32")
    data = (tokens[:, :-1], tokens[:, 1:], np.ones((4, cfg.model.sequence_length), "float32"))
    calls = {}
    for jit in (False, True):
        model = build_and_compile(cfg, 320, 1, jit=jit, precision="mixed_bfloat16")
        model.train_on_batch(*data)
        fn = tf.function(model.train_step)
        calls[jit] = _xla_calls(fn.get_concrete_function(data).graph)
        assert np.isfinite(model.step_log.numpy()[0][0])
    assert calls[False] > 0 and calls[True] == 0
