"""Export a run as a SavedModel in TF Serving's layout: ``<dir>/<name>/<version>/``.

Signatures (the tokenizer is inside the graph; only TF core and TF Text ops):
- ``generate`` (also ``serving_default``): ``prompts`` string [batch] -> ``text`` (prompt +
  greedy continuation of ``eval.sample_tokens`` tokens) and ``token_ids`` (the new tokens).
- ``sample``: ``prompts``, ``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``,
  ``seed`` -> ``text``, ``token_ids``. temperature 0 = greedy.
- ``score``: ``text`` string [batch] -> ``log_likelihood`` (nats), ``num_tokens``,
  ``bits_per_byte``.
- ``logits``: ``token_ids`` int32 [batch, seq] -> ``logits`` float32 [batch, seq, vocab].
Masked-LM runs (``model.objective: mlm``) instead have:
- ``fill_mask`` (also ``serving_default``): ``text`` string [batch], each with ``[MASK]``
  tokens -> per mask the top-5 ``tokens``, ``token_ids`` and ``scores`` (probabilities)
  [batch, masks, 5], ``num_masks`` [batch] and ``text`` (masks replaced by the top token);
- ``logits``: ``token_ids`` int32 [batch, seq] (a whole row, e.g. ``[CLS] ... [SEP]``, pad
  = 0 is masked out) -> ``logits`` float32 [batch, seq, vocab] at every position.

The version is written to a hidden temporary folder and renamed into place, so a server
polling ``<dir>/<name>/`` never sees a half-written version.

Which signatures a model gets is its objective's choice (``tfpretrain.objectives``); this
module saves them, publishes the version atomically and checks it in a fresh process
(``serving/check.py``).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from pathlib import Path

from tfpretrain import faults
from tfpretrain.errors import FREEABLE, UserError, writing


@contextlib.contextmanager
def staged(final: Path, overwrite: bool, hint: str = "another --out"):
    """Write into a hidden sibling ``.tmp-<name>`` and rename it to ``final`` only when the
    block succeeds, so nobody polling the parent folder sees a half-written export; an
    existing ``final`` is replaced only with ``overwrite``."""
    if final.exists() and not final.is_dir():
        raise UserError(f"export: {final} is a file, not a folder; nothing was written. "
                        f"Choose {hint}")
    if final.exists() and not overwrite:
        raise UserError(f"export: {final} already exists; pass --overwrite or {hint}")
    ensure_folder(final.parent)
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    faults.crash_point("export_before_rename")  # tests: die between writing and publishing
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def next_version(base: Path) -> int:
    versions = [int(p.name) for p in base.iterdir() if p.is_dir() and p.name.isdigit()] \
        if base.is_dir() else []
    return max(versions, default=0) + 1


def ensure_folder(path: Path) -> None:
    """``path`` as a folder (created with its parents), or one message saying why not."""
    if path.exists() and not path.is_dir():
        raise UserError(f"export: {path} is a file, not a folder; nothing was written. "
                        "Choose another --out or export.dir")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"export: cannot create {path}: {exc.strerror}") from None


def export_name(cfg, run_dir: Path) -> str:
    """``export.name``, or the run folder's name."""
    return cfg.export.name or Path(run_dir).name


class ExportValidationError(RuntimeError):
    """The SavedModel does not behave like the Keras model, or uses forbidden ops."""


class Checker:
    """The fresh process of :func:`checking` (``serving/check.py --wait``). Start
    it early (fit starts it with the run, the exporter before it saves) so that its
    TensorFlow import overlaps other work; it checks one SavedModel, and is killed if the
    block ends without one."""

    def __init__(self):
        import subprocess

        # on the CPU, always: on a GPU the training process holds the device's memory (TF
        # reserves nearly all of it), and the comparison is between CPU numerics on both
        # sides (see checking)
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="-1")
        script = Path(__file__).with_name("check.py")
        # its own session: a terminal's Ctrl-C goes to the run, which decides (it ends this
        # process); the process also exits by itself when the run dies (its input closes)
        self.proc = subprocess.Popen([sys.executable, str(script), "--wait"], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)

    def send(self, path: Path, request: Path, out_dir: str) -> None:
        """Hand the process its SavedModel; it starts loading it at once."""
        import json

        try:
            self.proc.stdin.write(json.dumps([str(path), str(request), out_dir]) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:  # it died (e.g. its imports failed): wait() says how
            pass

    def wait(self) -> tuple[int, str, str]:
        """(exit code, stdout, stderr) of the check :meth:`send` started."""
        out, err = self.proc.communicate(timeout=600)
        return self.proc.returncode, out, err

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:  # never used (the save failed) or timed out
            self.proc.kill()
            self.proc.communicate()


@contextlib.contextmanager
def checking(path: Path, model, tokenizer, cfg, checker: Checker | None = None):
    """Hand ``path`` to a fresh process importing only tensorflow and tensorflow_text
    (``checker``, or one started now), which loads and runs it while the block runs; yields
    a function to call at the block's end: it computes the Keras model's outputs, compares
    (logits atol 1e-5, identical greedy tokens), checks the SignatureDefs TF Serving reads
    and the graph's ops, and raises ExportValidationError or returns a report."""
    import json
    import tempfile

    from tfpretrain.objectives import get_objective

    probe = get_objective(cfg).probe(model, tokenizer, cfg.eval.prompt, cfg.eval.sample_tokens)
    with tempfile.TemporaryDirectory() as tmp, \
            (contextlib.nullcontext(checker) if checker else Checker()) as process:
        req = Path(tmp) / "request.json"
        req.write_text(json.dumps({"token_ids": probe.token_ids.tolist(),
                                   "prompts": probe.prompts}))
        process.send(path, req, tmp)

        def verdict() -> dict:
            import tensorflow as tf

            # in this process, while the fresh one runs; on the CPU like the fresh process,
            # so that a GPU's TF32 matmuls do not stand between the two at atol 1e-5
            with tf.device("/CPU:0"):
                expected = probe.expected()
            return compare_with_probe(path, probe, expected, *process.wait(), Path(tmp))

        yield verdict


def compare_with_probe(path: Path, probe, expected, code: int, out: str, err: str,
                       tmp: Path) -> dict:
    """The fresh process's outputs (in ``tmp``) against the Keras model's (``expected``)."""
    import json

    import numpy as np

    expected_logits, expected_tokens = expected
    if code != 0:
        raise ExportValidationError(f"the SavedModel at {path} failed to load or run in a "
                                    f"fresh process:\n{err[-3000:]}")
    report = json.loads(out.strip().splitlines()[-1])
    logits = np.load(tmp / "logits.npy")
    tokens = np.load(tmp / "generate.npy")
    problems = []
    if report["forbidden_ops"]:
        problems.append(f"forbidden ops in the graph: {report['forbidden_ops']}")
    if report["unexpected_modules"]:
        problems.append(f"the fresh process imported {report['unexpected_modules']}")
    # 1e-5 of the logits' scale (max |logit|, at least 1): the causal models' logits pass
    # at 1e-5 absolute; a masked LM's reach ~20 and differ by 2.5e-5 between the Keras
    # model in a tf.function and the reloaded graph (float32 op fusion and ordering alone)
    max_diff = float(np.max(np.abs(logits - expected_logits)))
    scale = max(1.0, float(np.max(np.abs(expected_logits))))
    if max_diff > 1e-5 * scale:
        problems.append(f"logits differ from the Keras model by up to {max_diff:.2e} "
                        f"(allowed 1e-5 x max |logit| = {1e-5 * scale:.2e})")
    if not np.array_equal(tokens, expected_tokens):
        problems.append(probe.mismatch)
    missing = sorted(set(report["signatures"]) - set(report["signature_defs"]))
    if missing:
        problems.append(f"the serving MetaGraphDef of saved_model.pb lacks {missing}")
    if problems:
        raise ExportValidationError(f"export validation failed for {path}: "
                                    + "; ".join(problems))
    return {"max_logit_diff": max_diff, "num_ops": report["num_ops"],
            "signatures": report["signatures"]}


def save_version(module, signatures, tmp: Path, tokenizer, cfg) -> None:
    """The SavedModel, with the run's config and tokenizer in ``assets.extra`` (ignored by
    TF Serving, but lets people and ``evaluate --saved-model`` see what made it)."""
    import tensorflow as tf

    tmp.rmdir()  # tf.saved_model.save creates the folder
    tf.saved_model.save(module, str(tmp), signatures=signatures)
    extra = tmp / "assets.extra"
    extra.mkdir(exist_ok=True)
    tokenizer.save(extra / "tokenizer")
    (extra / "config.yaml").write_text(cfg.to_yaml())


def export_fix(base: Path, run_dir: Path) -> str:
    """What to do when a version could not be written under ``base``."""
    return (f"Nothing was published. Free disk space ({FREEABLE}) or make {base} writable "
            f"(or choose another export.dir), then export the run again: python -m "
            f"tfpretrain.export --run-dir {run_dir}")


def export_saved_model(model, tokenizer, cfg, run_dir: Path, out: Path | None = None,
                       version: int | None = None, overwrite: bool = False,
                       validate: bool | None = None) -> Path:
    """Save, check and publish a version; returns its folder."""
    with exporting(model, tokenizer, cfg, run_dir, out, version, overwrite, validate) as final:
        pass
    return final


@contextlib.contextmanager
def exporting(model, tokenizer, cfg, run_dir: Path, out: Path | None = None,
              version: int | None = None, overwrite: bool = False,
              validate: bool | None = None, checker: Checker | None = None):
    """Save a version (into its hidden staging folder) and hand it to the fresh process's
    check (``checker``, or one started now); the block runs while that process loads and
    runs it (fit's final evaluation does); when the block ends the check's verdict is taken
    and the version published. Yields the version's folder (it exists after the block).
    A write the disk refuses is a WriteError, with nothing left behind."""
    from tfpretrain.objectives import get_objective

    base = Path(out) if out else Path(cfg.export.dir) / export_name(cfg, run_dir)
    ensure_folder(base)
    final = base / str(version or next_version(base))
    module, signatures = get_objective(cfg).serving_module(model, tokenizer,
                                                           cfg.eval.sample_tokens)
    validate = cfg.export.validate if validate is None else validate
    if checker is not None and checker.proc.poll() is not None:
        checker = None  # the early process is gone (killed meanwhile): start another
    with staged(final, overwrite, hint="another --version") as tmp, \
            (Checker() if validate and checker is None  # started before the save
             else contextlib.nullcontext(checker)) as checker:
        with writing(f"the SavedModel {final}", export_fix(base, run_dir), where=base):
            save_version(module, signatures, tmp, tokenizer, cfg)
        time.sleep(faults.export_delay(cfg))  # tests: signal the run in its final phase
        if not validate:
            yield final
            return
        with checking(tmp, model, tokenizer, cfg, checker) as verdict:
            yield final
            verdict()
