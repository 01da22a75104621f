"""Every use of private keras / keras_hub internals, in one place.

Each function names the private symbol it reaches for. ``check()`` looks every one of them
up without running anything, and ``tests/test_compat.py`` calls it, so an upgrade of keras
or keras_hub that moves a symbol fails one test that names the symbol, not a training run
an hour in. Versions this was written against: keras 3.15, keras-hub 0.32.

Nothing else in tfpretrain imports ``keras.src`` / ``keras_hub.src`` or calls an underscored
keras / keras_hub attribute.
"""
from __future__ import annotations

import contextlib
import importlib

# (what, module, attribute): checked by check(); one row per private symbol we use
PRIVATE_SYMBOLS = (
    ("keras TF backend's slice_update (patched while tracing the KV cache write)",
     "keras.src.backend.tensorflow.core", "slice_update"),
    ("keras_hub HF exporter configs", "keras_hub.src.utils.transformers.export.hf_exporter",
     "MODEL_CONFIGS"),
    ("keras_hub HF exporter weights", "keras_hub.src.utils.transformers.export.hf_exporter",
     "MODEL_EXPORTERS"),
    ("keras_hub HF exporter numpy conversion",
     "keras_hub.src.utils.transformers.export.hf_exporter", "_to_numpy_dict"),
    ("keras_hub preset file fetch (local folder, kaggle://, hf://, gs://)",
     "keras_hub.src.utils.preset_utils", "get_file"),
    ("keras_hub safetensors reader (a Hugging Face BERT's masked-LM head)",
     "keras_hub.src.utils.transformers.safetensor_utils", "SafetensorLoader"),
    ("keras_hub byte-level BPE byte map", "keras_hub.src.tokenizers.byte_pair_tokenizer",
     "bytes_to_unicode"),
    ("keras_tuner's JSON writer (made atomic)", "keras_tuner.src.utils", "save_json"),
    ("keras_hub CausalLM cache builder", "keras_hub.models.GPT2CausalLM", "_build_cache"),
    ("keras_hub CausalLM cache builder", "keras_hub.models.LlamaCausalLM", "_build_cache"),
    ("keras_hub CausalLM cached call", "keras_hub.models.GPT2CausalLM", "call_with_cache"),
    ("keras_hub CausalLM cached call", "keras_hub.models.LlamaCausalLM", "call_with_cache"),
    ("keras Muon's AdamW-or-Muon choice (widened to 3-D kernels)", "keras.optimizers.Muon",
     "_should_use_adamw"),
    ("keras Layer's walk over its sublayers (fused activations)", "keras.Layer",
     "_flatten_layers"),
    ("keras optimizers' variable index", "keras.optimizers.Optimizer", "_get_variable_index"),
    ("keras TF optimizer's weight decay (asks for the learning rate once per variable)",
     "keras.src.backend.tensorflow.optimizer.TFOptimizer", "_apply_weight_decay"),
    ("keras TF optimizer's gradient all-reduce (skipped: the train step sums gradients)",
     "keras.src.backend.tensorflow.optimizer.TFOptimizer", "_all_reduce_sum_gradients"),
)
# Backbone attributes the document-masked forward pass walks (public names, but internals
# of the backbone's layer stack rather than documented API).
BACKBONE_ATTRIBUTES = {
    "GPT2Backbone": ("token_embedding", "position_embedding", "embeddings_add",
                     "embeddings_dropout", "transformer_layers", "layer_norm"),
    "LlamaBackbone": ("token_embedding", "transformer_layers", "layer_norm"),
}


def _resolve(module: str, attribute: str):
    """``module.attribute``; ``module`` may end in a class path (``keras_hub.models.X``)."""
    parts = module.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return getattr(obj, attribute)
    raise ImportError(module)


def check() -> list[str]:
    """Problems with the private symbols in this installation (empty when all are there)."""
    problems = []
    for what, module, attribute in PRIVATE_SYMBOLS:
        try:
            _resolve(module, attribute)
        except (ImportError, AttributeError, TypeError, OSError) as exc:
            problems.append(f"{module}.{attribute} ({what}) is gone: {type(exc).__name__}: "
                            f"{exc}. Update tfpretrain/compat.py for this keras/keras_hub")
    import keras

    schedule = keras.optimizers.schedules.ExponentialDecay(1.0, 10, 0.5)
    if getattr(keras.optimizers.SGD(schedule), "_learning_rate", None) is not schedule:
        problems.append("keras.optimizers.Optimizer._learning_rate (the optimizer's "
                        "learning-rate schedule) is gone. Update tfpretrain/compat.py")
    return problems


# --- keras ---------------------------------------------------------------------------

def learning_rate_schedule(optimizer):
    """The schedule object the optimizer was built with (``optimizer._learning_rate``; the
    public ``optimizer.learning_rate`` is the current value, not the schedule). ``optimizer``:
    the one doing the update, under any wrappers (``models.guarded.innermost``)."""
    return optimizer._learning_rate


@contextlib.contextmanager
def one_learning_rate_per_apply(optimizer):
    """Within the block, ``optimizer``'s schedule is traced once per graph: keras's
    TensorFlow optimizers ask for ``self.learning_rate`` once per weight-decayed variable
    (``keras.src.backend.tensorflow.optimizer.TFOptimizer._apply_weight_decay``) and once
    for the update, which put 26 copies of the warmup-cosine schedule (each with its own
    conditional) in the char recipe's train graph: 1.4-4.6 s of tracing and XLA compilation
    of the first step. The step counter does not move inside one ``apply`` until its very
    end, so every copy had the same value. Swaps ``optimizer._learning_rate``
    (``optimizer``: the one doing the update, ``models.guarded.innermost``) for the block."""
    import keras

    schedule = learning_rate_schedule(optimizer)
    if (keras.backend.backend() != "tensorflow"
            or not isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule)):
        yield
        return
    import tensorflow as tf

    class Once(keras.optimizers.schedules.LearningRateSchedule):
        def __init__(self):
            self.values = {}

        def __call__(self, step):
            key = (id(tf.compat.v1.get_default_graph()), id(step))
            if key not in self.values:
                self.values[key] = schedule(step)
            return self.values[key]

    optimizer._learning_rate = Once()
    try:
        yield
    finally:
        optimizer._learning_rate = schedule


@contextlib.contextmanager
def pure_tf_slice_update():
    """While tracing keras_hub's cached decoding, make ``keras.ops.slice_update`` (its
    KV-cache write) a pad + select in core TF ops instead of ``XlaDynamicUpdateSlice``, which
    TF Serving only runs with XLA flags. Patches ``keras.src.backend.tensorflow.core``."""
    import tensorflow as tf
    from keras.src.backend.tensorflow import core

    def slice_update(inputs, start_indices, updates):
        inputs = tf.convert_to_tensor(inputs)
        updates = tf.cast(updates, inputs.dtype)
        start = tf.cast(tf.stack(start_indices), tf.int32)
        end = tf.shape(inputs) - tf.shape(updates) - start
        paddings = tf.stack([start, end], axis=1)
        where = tf.pad(tf.ones_like(updates, tf.int8), paddings) > 0
        return tf.where(where, tf.pad(updates, paddings), inputs)

    original = core.slice_update
    core.slice_update = slice_update
    try:
        yield
    finally:
        core.slice_update = original


def gradients_arrive_summed(optimizer) -> None:
    """The train step all-reduces the gradients itself (the guard and clipping need the
    global batch's); keras's TF optimizer would sum them over the replicas again in
    ``_all_reduce_sum_gradients`` (Keras 2 had ``experimental_aggregate_gradients=False``
    for this). Make it pass them through, on ``optimizer``: the one doing the update, under
    any wrappers (``models.guarded.innermost``)."""
    if hasattr(optimizer, "_all_reduce_sum_gradients"):  # the TensorFlow backend's optimizer
        optimizer._all_reduce_sum_gradients = lambda grads_and_vars: list(grads_and_vars)


def matrix_shape(shape) -> tuple:
    """The 2-D matrix a weight of ``shape`` is for Muon: 2-D as is; a 3-D keras_hub
    attention kernel ((hidden, heads, head_dim) for query/key/value, (heads, head_dim,
    hidden) for the output) with its two adjacent axes merged the way that gives the
    squarer matrix, (hidden, heads * head_dim) or (heads * head_dim, hidden): the
    projection's own matrix, as Muon's authors orthogonalize it."""
    shape = tuple(int(d) for d in shape)
    if len(shape) == 2:
        return shape
    a, b, c = shape
    first, last = (a * b, c), (a, b * c)
    squareness = lambda m: max(m) / min(m)  # noqa: E731
    return first if squareness(first) < squareness(last) else last


_MUON = None


def muon(muon_scale: float = 1.0, **kwargs):
    """keras.optimizers.Muon with two changes: Muon also updates 3-D attention kernels
    (keras sends every non-2-D weight to its AdamW branch, ``_should_use_adamw``; keras_hub's
    attention kernels are 3-D), as the 2-D matrix of :func:`matrix_shape`; and Muon's matrices
    use ``learning_rate * muon_scale`` while the AdamW part uses ``learning_rate``, so the
    logged learning rate is the AdamW one (``_get_variable_index``, ``adam_velocities``)."""
    global _MUON
    if _MUON is None:
        import re

        import keras
        from keras import ops

        class MatrixMuon(keras.optimizers.Muon):
            def __init__(self, muon_scale=1.0, **kw):
                super().__init__(**kw)
                self.muon_scale = float(muon_scale)

            def _should_use_adamw(self, variable):
                if len(variable.shape) not in (2, 3):
                    return True
                if self.exclude_embeddings and "embedding" in variable.path.lower():
                    return True
                return any(re.search(k, variable.path) for k in self.exclude_layers)

            def update_step(self, gradient, variable, learning_rate):
                if self.adam_velocities[self._get_variable_index(variable)] is None:
                    learning_rate = learning_rate * self.muon_scale
                super().update_step(gradient, variable, learning_rate)

            def zeropower_via_newtonschulz5(self, x, steps):
                as_matrix = ops.reshape(x, matrix_shape(x.shape))
                return ops.reshape(super().zeropower_via_newtonschulz5(as_matrix, steps),
                                   x.shape)

            def lr_adjust(self, x):
                return ops.reshape(super().lr_adjust(ops.reshape(x, matrix_shape(x.shape))),
                                   x.shape)

            def uses_muon(self, variable) -> bool:
                return not self._should_use_adamw(variable)

            def get_config(self):
                return {**super().get_config(), "muon_scale": self.muon_scale}

        _MUON = MatrixMuon
    return _MUON(muon_scale=muon_scale, **kwargs)


def slot(optimizer, slots: list, variable):
    """The optimizer variable of ``slots`` that belongs to ``variable`` (keras optimizers'
    ``_get_variable_index``, what every keras optimizer's ``update_step`` uses)."""
    return slots[optimizer._get_variable_index(variable)]


# --- keras_tuner -----------------------------------------------------------------------

def atomic_keras_tuner_saves() -> None:
    """keras_tuner writes its oracle.json / trial.json in place
    (``keras_tuner.src.utils.save_json``): a search killed mid-write leaves an empty file
    that the resumed search cannot load. Replace it, once per process, with write to a
    temporary sibling + fsync + rename (local paths; the files stay keras_tuner's format)."""
    import json

    from keras_tuner.src import utils

    from tfpretrain.files import write_atomic

    if getattr(utils.save_json, "tfpretrain_atomic", False):
        return

    def save_json(path, obj):
        text = json.dumps(obj)
        write_atomic(path, text)
        return text

    save_json.tfpretrain_atomic = True
    utils.save_json = save_json


# --- keras_hub -------------------------------------------------------------------------

def build_cache(task, token_ids):
    """keras_hub CausalLM's ``_build_cache``: (hidden states, cache) for ``token_ids``."""
    return task._build_cache(token_ids)


def call_with_cache(task, token_ids, cache, index):
    """keras_hub CausalLM's ``call_with_cache``: (logits, hidden, updated cache)."""
    return task.call_with_cache(token_ids, cache, index)


def hf_export(backbone, hf_key: str) -> tuple[dict, dict]:
    """(config dict, numpy weights by HF name) from keras_hub's transformers exporter
    (``MODEL_CONFIGS``, ``MODEL_EXPORTERS``, ``_to_numpy_dict``)."""
    import numpy as np
    from keras_hub.src.utils.transformers.export import hf_exporter

    config = hf_exporter.MODEL_CONFIGS[hf_key](backbone)
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    weights = hf_exporter.MODEL_EXPORTERS[hf_key](backbone, include_lm_head=True)
    arrays = {k: np.ascontiguousarray(v)
              for k, v in hf_exporter._to_numpy_dict(weights).items()}
    return config, arrays


def preset_file(preset: str, path: str) -> str:
    """The local path of one file of a keras_hub preset (a folder or a handle keras_hub
    downloads: kaggle://, hf://, gs://, modelscope://); FileNotFoundError when it has none.
    ``keras_hub.src.utils.preset_utils.get_file``: from_preset's own fetch, not public."""
    from keras_hub.src.utils.preset_utils import get_file

    return get_file(preset, path)


def hf_tensors(preset: str, keys) -> dict:
    """The tensors of a Hugging Face checkpoint's safetensors (one file or sharded; keys with
    or without the model's prefix, e.g. ``bert.``) that it has, as numpy arrays.
    ``keras_hub.src.utils.transformers.safetensor_utils.SafetensorLoader``: the loader
    keras_hub's own converters use, not public."""
    from keras_hub.src.utils.transformers.safetensor_utils import SafetensorLoader

    found = {}
    with SafetensorLoader(preset) as loader:
        for key in keys:
            try:
                found[key] = loader.get_tensor(key)
            except Exception:  # safetensors raises its own error for a missing key
                continue
    return found


def masked_lm_head_parts(task) -> dict:
    """keras_hub MaskedLMHead's variables by role (``dense_kernel``, ``dense_bias``,
    ``norm_gamma``, ``norm_beta``, ``bias``); private attributes of MaskedLMHead."""
    head = task.masked_lm_head
    return {"dense_kernel": head._intermediate_dense.kernel,
            "dense_bias": head._intermediate_dense.bias,
            "norm_gamma": head._intermediate_layer_norm.gamma,
            "norm_beta": head._intermediate_layer_norm.beta, "bias": head._bias}


def bytes_to_unicode():
    """keras_hub's (GPT-2's) byte <-> printable-character map for byte-level BPE."""
    from keras_hub.src.tokenizers.byte_pair_tokenizer import bytes_to_unicode as fn

    return fn()


def backbone_parts(backbone) -> dict:
    """The layers of a decoder backbone that a custom forward pass reuses (see
    BACKBONE_ATTRIBUTES): token_embedding, transformer_layers, layer_norm, and for GPT-2
    the position table, the embeddings add and its dropout."""
    name = type(backbone).__name__
    return {a: getattr(backbone, a) for a in BACKBONE_ATTRIBUTES[name]}


def sublayers(model) -> list:
    """Every layer inside ``model``, depth first (``model`` itself excluded)."""
    return list(model._flatten_layers(include_self=False, recursive=True))


def fix_llama_preset_config(preset_dir, tie_embeddings: bool) -> None:
    """keras_hub's ``LlamaBackbone.get_config()`` omits ``tie_word_embeddings``, so a tied
    Llama preset would reload untied and fail to load its weights: write the flag into the
    preset's config.json and task.json (the constructor accepts it)."""
    import json
    from pathlib import Path

    config_path, task_path = Path(preset_dir) / "config.json", Path(preset_dir) / "task.json"
    config = json.loads(config_path.read_text())
    config["config"]["tie_word_embeddings"] = bool(tie_embeddings)
    config_path.write_text(json.dumps(config, indent=4))
    task = json.loads(task_path.read_text())
    task["config"]["backbone"]["config"]["tie_word_embeddings"] = bool(tie_embeddings)
    task_path.write_text(json.dumps(task, indent=4))


def float32_output_head(backbone) -> None:
    """Logits in float32 under a mixed-precision policy: keras_hub's ReversibleEmbedding
    takes ``reverse_dtype`` only as a constructor argument, which the backbones do not
    pass through; its ``call(reverse=True)`` casts the hidden state and the kernel to it."""
    embedding = backbone.token_embedding
    if not hasattr(embedding, "reverse_dtype"):
        raise RuntimeError("keras_hub's ReversibleEmbedding has no `reverse_dtype` any more; "
                           "update tfpretrain.compat.float32_output_head")
    embedding.reverse_dtype = "float32"


# --- tf.distribute: MultiWorkerMirroredStrategy under Keras 3's model.fit ---------------
# model.fit under MultiWorkerMirroredStrategy fails in Keras 3 (checked on 3.15.1 with
# TF 2.21): tensorflow/tensorflow#72388, keras-team/keras#20585, #20329. Two spots of
# keras/src/backend/tensorflow/trainer.py, each patched only while its source still holds
# the failing line, so an upgrade that fixes it drops the patch by itself.
_MWMS_BUGS = {
    # Keras builds the model from the first batch, averaged over the workers with an eager
    # strategy.reduce("MEAN", PerReplica) that MWMS cannot convert to a tensor
    # ("Attempt to convert a value (PerReplica...)"). The build only needs shapes: we
    # give it this worker's first local batch.
    "_maybe_symbolic_build": "self.distribute_strategy.reduce(",
    # The logs (scalar metrics) are averaged with reduce("MEAN", v, axis=0), which fails on
    # scalars: "Invalid reduction dimension 0 for input with 0 dimensions" (#72388). We
    # reduce scalars with axis=None.
    "reduce_per_replica": 'strategy.reduce("MEAN", v, axis=0)',
}
PRIVATE_SYMBOLS += (
    ("keras TF trainer's symbolic build (MWMS fix, tensorflow#72388)",
     "keras.src.backend.tensorflow.trainer.TensorFlowTrainer", "_maybe_symbolic_build"),
    ("keras TF trainer's log reduction (MWMS fix, tensorflow#72388)",
     "keras.src.backend.tensorflow.trainer", "reduce_per_replica"),
    ("TF MWMS peer health check (how fast a lost worker is noticed)",
     "tensorflow.python.distribute.collective_all_reduce_strategy.CollectiveAllReduceExtended",
     "_check_health_interval"),
    ("TF eager context's collective abort (a stalled peer ends the run)",
     "tensorflow.python.eager.context.Context", "abort_collective_ops"),
    ("TF MWMS peer health check's stop (workers finishing one after another)",
     "tensorflow.python.distribute.collective_all_reduce_strategy.CollectiveAllReduceExtended",
     "_stop_check_health_thread"),
)


def multi_worker_fixes_needed() -> list[str]:
    """Which of the known MWMS failures the installed Keras still has (by its source)."""
    import inspect

    from keras.src.backend.tensorflow import trainer

    found = {"_maybe_symbolic_build": trainer.TensorFlowTrainer._maybe_symbolic_build,
             "reduce_per_replica": trainer.reduce_per_replica}
    return [name for name, line in _MWMS_BUGS.items()
            if not getattr(found[name], "_tfpretrain_fix", False)
            and line in inspect.getsource(found[name])]


def fix_multi_worker_fit() -> list[str]:
    """Patch what :func:`multi_worker_fixes_needed` lists; returns the names patched."""
    import tensorflow as tf
    from keras.src import tree
    from keras.src.backend.tensorflow import trainer

    needed = multi_worker_fixes_needed()
    if "_maybe_symbolic_build" in needed:
        def _maybe_symbolic_build(self, iterator=None, data_batch=None):
            if self._distribute_strategy is None:
                return
            strategy = self.distribute_strategy
            if iterator is not None:
                for _, _, it in iterator:
                    data_batch = tree.map_structure(
                        lambda x: strategy.experimental_local_results(x)[0]
                        if isinstance(x, tf.distribute.DistributedValues) else x, next(it))
                    break
            with strategy.scope():
                self._symbolic_build(data_batch=data_batch)

        _maybe_symbolic_build._tfpretrain_fix = True
        trainer.TensorFlowTrainer._maybe_symbolic_build = _maybe_symbolic_build
    if "reduce_per_replica" in needed:
        original = trainer.reduce_per_replica

        def reduce_per_replica(values, strategy, reduction):
            if (trainer._collective_all_reduce_multi_worker(strategy)
                    and reduction in ("auto", "mean")):
                def mean(v):
                    rank = getattr(v, "shape", tf.TensorShape(None)).rank
                    return strategy.reduce("MEAN", v, axis=0 if rank else None)
                return tree.map_structure(mean, values)
            return original(values, strategy, reduction)

        reduce_per_replica._tfpretrain_fix = True
        trainer.reduce_per_replica = reduce_per_replica
    return needed


def multi_worker_health_check(interval: int, timeout: int, startup: int) -> None:
    """How MWMS notices a lost worker: it pings every peer each ``interval`` s (a ping
    times out after ``timeout`` s, 3 tries) and aborts the collectives when one is down;
    at start it waits ``startup`` s for all workers (TF's default: forever). Private class
    attributes of CollectiveAllReduceExtended (TF 2.21), set before the strategy is made."""
    from tensorflow.python.distribute import collective_all_reduce_strategy as car

    ext = car.CollectiveAllReduceExtended
    ext._check_health_interval = interval
    ext._check_health_timeout = timeout
    ext._check_health_initial_timeout = startup


def abort_collectives(message: str) -> None:
    """Fail every collective this process is waiting in, now and later, with ``message``
    (a DeadlineExceededError): how MWMS's own health check ends a run whose peer is down
    (TF 2.21: the eager context's ``abort_collective_ops``, private)."""
    import tensorflow as tf
    from tensorflow.python.eager import context

    context.context().abort_collective_ops(tf.errors.DEADLINE_EXCEEDED, message)


def stop_multi_worker_health_check(strategy) -> None:
    """Stop MWMS's peer-ping thread (TF 2.21: a private method of its extended object), so
    workers that finish and exit one after another are not reported as lost."""
    stop = getattr(strategy.extended, "_stop_check_health_thread", None)
    if stop is not None:
        stop()
