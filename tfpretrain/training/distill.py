"""Logit distillation in fit (``distill.*``): which teacher a run may learn from, and
loading it.

The student's objective is ``alpha * CE + (1 - alpha) * T^2 * KL(teacher_T || student_T)``
over the same packed rows (``models.lm.CausalLM.distill_objective``); the teacher is a
trained run folder of the same objective, run in inference mode in float32 inside the
train step. Its logits only mean something over the same vocabulary, so the student takes
the teacher's tokenizer; any other tokenizer is refused before anything is read.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from tfpretrain.config import Config, build_config, read_yaml
from tfpretrain.errors import UserError


def teacher_config(cfg: Config) -> Config:
    """The teacher run's config; a missing or unfinished folder is a UserError."""
    folder = Path(cfg.distill.teacher)
    if not (folder / "config.yaml").is_file() or not (folder / "tokenizer").is_dir():
        raise UserError(f"`distill.teacher`: {folder} is not a tfpretrain run folder (no "
                        "config.yaml and tokenizer/); train the teacher first with "
                        "`python -m tfpretrain.fit` and pass its run folder")
    return build_config(read_yaml(folder / "config.yaml"), name=folder.resolve().name,
                        source=str(folder / "config.yaml"))


def resolve(cfg: Config) -> Config:
    """``cfg`` with the teacher's tokenizer (``tokenizer.path``), after checking the teacher
    can teach this student: same objective, a context at least the student's, the same
    tokenizer. Without ``distill.teacher``, ``cfg`` itself."""
    if not cfg.distill.teacher:
        return cfg
    from tfpretrain.data.tokenizers import same_tokenizer
    from tfpretrain.objectives import get_objective

    teacher = teacher_config(cfg)
    folder = Path(cfg.distill.teacher)
    problems = []
    if get_objective(teacher) is not get_objective(cfg):
        problems.append(f"the teacher's model.objective is {teacher.model.objective!r}, the "
                        f"student's {cfg.model.objective!r}; they must match")
    if teacher.model.sequence_length < cfg.model.sequence_length:
        problems.append(f"the teacher's context ({teacher.model.sequence_length}) is shorter "
                        f"than the student's model.sequence_length "
                        f"({cfg.model.sequence_length})")
    if cfg.tokenizer.path and not same_tokenizer(Path(cfg.tokenizer.path),
                                                 folder / "tokenizer"):
        problems.append(f"tokenizer.path {cfg.tokenizer.path} is not the teacher's tokenizer "
                        f"({folder / 'tokenizer'}): logits over different vocabularies cannot "
                        "be distilled; unset tokenizer.path to use the teacher's")
    if problems:
        raise UserError(f"`distill.teacher` {folder}: " + "; ".join(problems))
    if cfg.tokenizer.path:
        return cfg
    tok = dataclasses.replace(cfg.tokenizer, path=str(folder / "tokenizer"))
    return dataclasses.replace(cfg, tokenizer=tok)


def load_teacher(cfg: Config, vocabulary_size: int):
    """(the teacher's config, its float32 model from its latest valid checkpoint, frozen)."""
    from tfpretrain.training.runfolder import load_run

    teacher_cfg, tokenizer, model = load_run(Path(cfg.distill.teacher))
    if tokenizer.vocabulary_size != vocabulary_size:  # resolve() made this impossible
        raise UserError(f"`distill.teacher`: its vocabulary ({tokenizer.vocabulary_size}) "
                        f"differs from the student's ({vocabulary_size})")
    model.trainable = False
    return teacher_cfg, model


TOPK_FOLDER = "teacher_topk"


def teacher_top_k(cfg: Config, teacher, rows, run_dir: Path, vocabulary_size: int,
                  log=print):
    """``distill.topk``: (ids [rows, seq, k] uint16/int32, log-probabilities at temperature
    T [rows, seq, k] float16) of the teacher's k most likely next ids at every position of
    every training row (causal LM: the input is the row less its last id), memory-mapped.
    Made by one teacher forward pass over the rows, kept in the token cache
    (``<data.cache_dir>/teacher_topk/<key>``, shared by every student of this teacher on
    these rows) or, with ``data.cache: false``, in ``<run>/teacher_topk``; ``meta.json``
    names what it was made from (the teacher's weights, the rows, k, T), so a change to
    any of them makes it again."""
    import hashlib
    import json

    from tfpretrain.models.lm import weights_sha256

    sampled = cfg.distill.sampled
    k = cfg.distill.topk if sampled else min(cfg.distill.topk, vocabulary_size)
    meta = {"k": k, "temperature": cfg.distill.temperature, "rows": list(rows.shape),
            "rows_digest": _rows_digest(rows), "teacher_weights": weights_sha256(teacher)}
    if sampled:  # drawn ids: a cache of its own, reproducible from the seed
        meta.update(sampled=True, seed=cfg.train.seed)
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:20]
    folder = _top_k_folder(cfg, run_dir) / key
    if (folder / "meta.json").is_file() and \
            json.loads((folder / "meta.json").read_text()) == meta:
        log(f"distill: the teacher's {_what(meta)} of {len(rows):,} rows from {folder}")
        return _open(folder)
    return _make_top_k(cfg, teacher, rows, folder, meta, vocabulary_size, log)


def _what(meta: dict) -> str:
    return f"{meta['k']} drawn ids" if meta.get("sampled") else f"top-{meta['k']} ids"


def _top_k_folder(cfg: Config, run_dir: Path) -> Path:
    if not cfg.data.cache:
        return Path(run_dir) / TOPK_FOLDER
    from tfpretrain.data.cache import default_cache_dir

    return Path(cfg.data.cache_dir or default_cache_dir()).expanduser() / TOPK_FOLDER


def _open(folder: Path):
    import numpy as np

    return (np.load(folder / "ids.npy", mmap_mode="r"),
            np.load(folder / "log_p.npy", mmap_mode="r"))


def _make_top_k(cfg: Config, teacher, rows, folder: Path, meta: dict,
                vocabulary_size: int, log):
    import json
    import time

    import numpy as np

    from tfpretrain.errors import writing
    from tfpretrain.files import write_atomic

    t0 = time.time()
    with writing(f"the teacher's top-k predictions ({folder})", where=folder.parent):
        folder.mkdir(parents=True, exist_ok=True)  # meta.json, last, marks it whole
        _predict_top_k(teacher, rows, meta["k"], cfg.distill.temperature, folder,
                       np.uint16 if vocabulary_size <= 65536 else np.int32,
                       seed=meta.get("seed") if meta.get("sampled") else None)
        write_atomic(folder / "meta.json", json.dumps(meta, indent=1))
    ids, log_p = _open(folder)
    log(f"distill: the teacher's {_what(meta)} at T={cfg.distill.temperature:g} for "
        f"{len(rows):,} rows in {time.time() - t0:.1f}s ({folder}, "
        f"{(ids.nbytes + log_p.nbytes) / 2**20:.1f} MiB)")
    return ids, log_p


def _predict_top_k(teacher, rows, k: int, temperature: float, folder: Path, id_dtype,
                   seed: int | None = None):
    """One teacher pass over ``rows`` (the forward XLA-compiled, 64 rows a call), written into
    ``ids.npy`` and ``log_p.npy`` through this process's temporary files: the k most likely
    ids, or with a ``seed`` k ids drawn from the teacher's distribution at ``temperature``
    (stateless draws keyed by (seed, first row), so the same on every run)."""
    import os

    import numpy as np
    import tensorflow as tf

    width, tmp = int(rows.shape[1]) - 1, f".{os.getpid()}.npy"
    ids = np.lib.format.open_memmap(folder / f".ids{tmp}", "w+", id_dtype,
                                    (len(rows), width, k))
    log_p = np.lib.format.open_memmap(folder / f".log_p{tmp}", "w+", np.float16,
                                      (len(rows), width, k))

    @tf.function(jit_compile=True, reduce_retracing=True)
    def scaled(x):  # the teacher's logits / T, and their logsumexp
        z = tf.cast(teacher(x, training=False), tf.float32) / temperature
        return z, tf.reduce_logsumexp(z, axis=-1, keepdims=True)

    @tf.function(reduce_retracing=True)
    def top(x, lo):  # TensorFlow's own top_k: 1.4-1.8x faster on CPUs than XLA's (k 16, 64)
        z, total = scaled(x)
        if seed is None:
            values, index = tf.math.top_k(z, k)
            return index, values - total
        flat = tf.reshape(z, [-1, tf.shape(z)[-1]])
        index = tf.random.stateless_categorical(flat, k, seed=tf.stack([seed, lo]),
                                                dtype=tf.int32)
        index = tf.reshape(index, tf.concat([tf.shape(z)[:-1], [k]], 0))
        return index, tf.gather(z, index, batch_dims=2) - total

    step = 64
    for lo in range(0, len(rows), step):
        index, values = top(tf.constant(np.asarray(rows[lo:lo + step, :-1], np.int32)),
                            tf.constant(lo, tf.int64))
        ids[lo:lo + step] = index.numpy().astype(id_dtype)
        log_p[lo:lo + step] = values.numpy().astype(np.float16)
    for array, name in ((ids, "ids.npy"), (log_p, "log_p.npy")):
        array.flush()
        Path(array.filename).replace(folder / name)


def _rows_digest(rows) -> str:
    """sha256 of the rows' shape and of up to 1,024 rows spread evenly over them."""
    import hashlib

    import numpy as np

    picks = np.linspace(0, len(rows) - 1, num=min(len(rows), 1024)).astype(np.int64)
    digest = hashlib.sha256(repr(tuple(rows.shape)).encode())
    digest.update(np.ascontiguousarray(np.asarray(rows[picks], np.int32)).tobytes())
    return digest.hexdigest()
