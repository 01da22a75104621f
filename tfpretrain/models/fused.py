"""Elementwise activations and layer norms as one XLA kernel each way, for steps that
TensorFlow runs op by op (``train.jit_compile`` off: the default for bfloat16 on a CPU).

Without XLA, keras_hub's GPT-2/BERT activation (tanh GELU) is eight TensorFlow ops forward
and about fifteen backward, each a pass over the [tokens, intermediate] tensor, each
rounding to bfloat16 under mixed precision; a layer norm is a dozen more. Together 19% of a
10.7M-parameter GPT-2's bf16 step on a 2-core CPU (docs/benchmarks.md).
:func:`fused_ops` swaps them, while a step is traced, for the same functions (Keras's own
``layer_normalization``; the layer's own activation) computed in float32 inside one XLA
kernel forward and one for the gradient. The gradient recomputes from the inputs, so only
the inputs are kept for the backward pass; the result is rounded once to the compute dtype.
A whole-step XLA compile fuses these ops already and is left alone.
"""
from __future__ import annotations

import contextlib

import keras
import tensorflow as tf

from tfpretrain import compat

_KERNELS: dict = {}  # key -> the fused function, shared by layers that compute the same


def xla_with_gradient(fn):
    """``fn(*tensors) -> tensor`` as one XLA kernel, its gradient (recomputed from the
    inputs, to every input) as another."""
    forward = tf.function(fn, jit_compile=True)

    @tf.function(jit_compile=True)
    def backward(dy, *xs):
        with tf.GradientTape() as tape:
            tape.watch(xs)
            y = fn(*xs)
        return tape.gradient(y, xs, dy)

    @tf.custom_gradient
    def call(*xs):
        return forward(*xs), lambda dy: backward(dy, *xs)

    return call


def _kernel(key, make):
    if key not in _KERNELS:
        _KERNELS[key] = xla_with_gradient(make())
    return _KERNELS[key]


def fused_activation(activation):
    """An elementwise ``activation`` in float32, rounded once to its input's dtype."""
    def make():
        return lambda x: tf.cast(activation(tf.cast(x, tf.float32)), x.dtype)
    return _kernel(("activation", activation), make)


def fused_layer_norm_call(layer):
    """A ``keras.layers.LayerNormalization``'s call (Keras's own math, float32 statistics)."""
    axis, epsilon, dtype = layer.axis, layer.epsilon, layer.compute_dtype

    def make():
        def norm(x, gamma, beta):
            y = keras.ops.layer_normalization(x, gamma, beta, axis=axis, epsilon=epsilon)
            return tf.cast(y, dtype)
        return norm

    kernel = _kernel(("layer_norm", str(axis), epsilon, dtype), make)

    def call(inputs, **kwargs):
        return kernel(tf.convert_to_tensor(inputs), tf.convert_to_tensor(layer.gamma),
                      tf.convert_to_tensor(layer.beta))

    return call


def _replacements(model) -> list[tuple]:
    """(layer, attribute, fused value) for every sublayer with something to fuse."""
    swaps = []
    for layer in compat.sublayers(model):
        fn = getattr(layer, "activation", None)
        if callable(fn) and fn is not keras.activations.linear:
            swaps.append((layer, "activation", fused_activation(fn)))
        if (isinstance(layer, keras.layers.LayerNormalization) and layer.center
                and layer.scale and not layer.rms_scaling):
            swaps.append((layer, "call", fused_layer_norm_call(layer)))
    return swaps


@contextlib.contextmanager
def fused_ops(model, enabled: bool = True):
    """Within the block, ``model``'s activations (Dense layers, Llama's gated feed-forward)
    and layer norms run fused (above); restored on exit, so configs, presets and exports
    never see them."""
    swaps = _replacements(model) if enabled else []
    originals = [layer.__dict__.get(name) for layer, name, _ in swaps]
    try:
        for layer, name, value in swaps:
            setattr(layer, name, value)
        yield
    finally:
        for (layer, name, _), value in zip(swaps, originals):
            if value is None:  # a method: drop the instance attribute
                object.__delattr__(layer, name)
            else:
                setattr(layer, name, value)
