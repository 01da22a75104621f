"""Loss, perplexity and bits-per-byte of a run or an exported SavedModel on any text.

    python -m tfpretrain.evaluate --run-dir DIR [--data PATH] [--saved-model PATH]
                                  [--max-batches N]
    python -m tfpretrain.evaluate --run-dir DIR --tasks [NAME=]PATH [...]
    python -m tfpretrain.evaluate --saved-model PATH --tasks [NAME=]PATH [...]
    python -m tfpretrain.evaluate --init-from SOURCE (--data PATH | --tasks [NAME=]PATH ...)

- ``--run-dir`` alone: the run's latest checkpoint on its own validation split (rebuilt
  from its config, deterministically), as packed rows like training saw them.
- ``--run-dir --data PATH``: the same model on every document of PATH (file, glob,
  directory or list, read like ``data.path``), packed the same way.
- ``--saved-model PATH [--data PATH]``: the SavedModel's ``score`` signature on each
  document (each scored on its own, after an end-of-text token); without --data the
  run's validation split is used, so --run-dir is then needed too.
- ``--run-dir --tasks PATH ...``: zero-shot tasks (JSONL of multiple-choice or cloze items,
  see ``tfpretrain.data.tasks``; ``synth tasks`` makes them) answered by the run's model:
  accuracy by likelihood (``acc``, ``acc_norm``, ``chance``), or greedy (cloze).
- ``--saved-model PATH --tasks PATH ...``: the same, answered by an export (its ``logits``
  signature; the tokenizer and context it carries in ``assets.extra``).
- ``--init-from SOURCE``: what a run with ``model.init_from: SOURCE`` would start from, as
  it stands (a run folder, an export, a published keras_hub or Hugging Face GPT-2 / Llama / BERT,
  its tokenizer moved to tfpretrain's ids), on ``--data`` or the ``--tasks``: the baseline
  that continued pretraining has to beat.
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from tfpretrain.errors import UserError, cli_main, quiet_tensorflow


def _documents(cfg, data):
    from tfpretrain.data.sources import DocumentPlan, read_documents

    if data is None:  # the run's validation split, streamed out of its sources
        return [doc for is_val, doc in DocumentPlan(cfg.data, cfg.train.seed).route()
                if is_val]
    docs = read_documents(cfg.data, cfg.train.seed, data)[0]
    if not docs:
        raise UserError(f"--data: no text in {data}")
    return docs


def evaluate_run(run_dir: Path, data=None, max_batches: int = 0) -> dict:
    """Metrics of the run's objective (masked LM: loss, perplexity and masked accuracy over
    the same fixed validation masks fit uses, and the baselines; with --data they come from
    the evaluated text's own token counts)."""
    import numpy as np

    from tfpretrain.data.cache import prepare
    from tfpretrain.objectives import row_format
    from tfpretrain.training.evaluation import evaluate_split
    from tfpretrain.training.runfolder import load_run

    cfg, tokenizer, model = load_run(run_dir)
    if data is not None:
        return evaluate_text(cfg, tokenizer, model, data, max_batches)
    # the rows fit validated on (from the token cache when it has them)
    _, packed, info = prepare(cfg, row_format(cfg), Path(run_dir) / "tokenizer",
                              log=lambda m: print(f"[tfpretrain] {m}", file=sys.stderr))
    out = evaluate_split(cfg, model, tokenizer, np.asarray(packed.val_rows),
                         packed.unigram_counts, max_batches)
    out.update(source="run validation split", documents=info["documents"][1])
    return out


def evaluate_text(cfg, tokenizer, model, data, max_batches: int = 0) -> dict:
    """``model``'s metrics on every document of ``data``, packed as ``cfg``'s rows."""
    import numpy as np

    from tfpretrain.data.pipeline import text_rows
    from tfpretrain.objectives import row_format
    from tfpretrain.training.evaluation import evaluate_split

    rows, counts, documents = text_rows(cfg.data, cfg.train.seed, tokenizer, row_format(cfg),
                                        data)
    out = evaluate_split(cfg, model, tokenizer, np.asarray(rows), counts, max_batches)
    out.update(source=str(data), documents=documents)
    return out


def evaluate_source(name: str, data, specs: list[str] | None, max_batches: int = 0) -> dict:
    """``--init-from``: a model.init_from source as it stands (before training from it) on
    ``data`` or the ``--tasks``; its context is its own (a published GPT-2: its position
    table; a published Llama: model.sequence_length's default)."""
    from tfpretrain.training import warm_start

    tasks = named_tasks(specs) if specs else None  # a bad task file before any loading
    cfg, tokenizer, model = warm_start.source_model(name)
    if tasks:
        return {"init_from": name, "tasks": score_tasks(tasks, cfg, tokenizer, model)}
    return {"init_from": name, **evaluate_text(cfg, tokenizer, model, data, max_batches)}


def evaluate_tasks(run_dir: Path, specs: list[str]) -> dict:
    """``--tasks``: each ``[NAME=]PATH`` (NAME: the file's stem) scored on the run's latest
    weights (its evaluation weights: EMA / schedule-free average where it kept them)."""
    from tfpretrain.training.runfolder import load_run

    tasks = named_tasks(specs)
    cfg, tokenizer, model = load_run(run_dir)
    return {"run_dir": str(run_dir), "tasks": score_tasks(tasks, cfg, tokenizer, model)}


def named_tasks(specs: list[str]) -> dict:
    """``--tasks [NAME=]PATH ...`` read and checked: {name: Task} (NAME: the file's stem)."""
    from tfpretrain.data.tasks import read_tasks

    named = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        name, path = (name, path) if sep else (Path(spec).stem, spec)
        if name in named:
            raise UserError(f"--tasks: two tasks named {name!r}: name one NAME=PATH")
        named[name] = path
    return read_tasks(named, key="--tasks")


def score_tasks(tasks: dict, cfg, tokenizer, model) -> dict:
    """Each task's metrics by ``model`` (a Keras model, or a SavedModel's ``logits``)."""
    from tfpretrain.data.tasks import tokenize_tasks
    from tfpretrain.training.evaluation import rounded, task_evaluator

    score = task_evaluator(cfg, model, tokenizer)
    return {name: {"path": task.path, **rounded(score(task, rows))} for name, (task, rows)
            in tokenize_tasks(tasks, tokenizer, cfg.model.sequence_length).items()}


class ServedLogits:
    """A SavedModel's ``logits`` signature, called as task scoring calls a causal model:
    ``model(ids)`` -> logits, and ``model.token_losses(y, logits)``."""

    def __init__(self, loaded):
        self.loaded = loaded  # the signature's variables live as long as the loaded object

    def __call__(self, token_ids, training=False):
        import tensorflow as tf

        return self.loaded.signatures["logits"](token_ids=tf.cast(token_ids, tf.int32))["logits"]

    @staticmethod
    def token_losses(y, logits):
        from tfpretrain.models.stability import token_losses

        return token_losses(y, logits)


def saved_model_tasks(path: Path, specs: list[str]) -> dict:
    """``--saved-model --tasks``: the tasks answered through the export's ``logits``
    signature, tokenized by the tokenizer the export carries (``assets.extra``)."""
    from tfpretrain.config import build_config, read_yaml
    from tfpretrain.data.tokenizers import load_tokenizer

    tasks = named_tasks(specs)
    extra = Path(path) / "assets.extra"
    if not (extra / "config.yaml").is_file():
        raise UserError(f"--saved-model: {path} has no assets.extra/config.yaml and "
                        "tokenizer (not a tfpretrain export, or an older one): score the run "
                        "with --run-dir instead")
    cfg = build_config(read_yaml(extra / "config.yaml"), name="export")
    loaded = load_saved_model(path)
    if "score" not in loaded.signatures:  # the objectives with tasks: those that score text
        raise UserError(f"--saved-model: {path} is a masked-LM export; zero-shot tasks need "
                        "a causal model")
    model = ServedLogits(loaded)
    return {"saved_model": str(path),
            "tasks": score_tasks(tasks, cfg, load_tokenizer(extra / "tokenizer"), model)}


def load_saved_model(path: Path):
    """The loaded SavedModel (keep it while its signatures are used: they need its
    variables)."""
    import tensorflow as tf
    import tensorflow_text  # noqa: F401  registers the SentencePiece ops

    if not (Path(path) / "saved_model.pb").is_file():
        raise UserError(f"--saved-model: no saved_model.pb in {path}")
    return tf.saved_model.load(str(path))


def evaluate_saved_model(path: Path, docs: list[str], batch_size: int = 16) -> dict:
    import tensorflow as tf

    loaded = load_saved_model(path)
    signatures = loaded.signatures
    if "score" not in signatures:
        raise UserError(f"--saved-model: {path} has no `score` signature (a masked-LM export "
                        "has fill_mask and logits); evaluate the run with --run-dir instead")
    score = signatures["score"]
    nll, tokens, nbytes = 0.0, 0, 0
    for i in range(0, len(docs), batch_size):
        batch = docs[i:i + batch_size]
        out = score(text=tf.constant(batch))
        nll -= float(tf.reduce_sum(out["log_likelihood"]))
        tokens += int(tf.reduce_sum(out["num_tokens"]))
        nbytes += sum(len(d.encode("utf-8")) for d in batch)
    loss = nll / max(tokens, 1)
    return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0)),
            "val_bits_per_byte": nll / math.log(2) / max(nbytes, 1), "val_tokens": tokens,
            "val_bytes": nbytes, "documents": len(docs), "saved_model": str(path)}


@cli_main
def main(argv=None) -> int:
    quiet_tensorflow()
    p = argparse.ArgumentParser(prog="python -m tfpretrain.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir")
    p.add_argument("--data", help="text to evaluate on (default: the run's validation split)")
    p.add_argument("--saved-model", help="evaluate this SavedModel through its score signature")
    p.add_argument("--max-batches", type=int, default=0, help="0 = all")
    p.add_argument("--tasks", nargs="+", metavar="[NAME=]PATH",
                   help="zero-shot task files (JSONL) to answer instead, by the run's model "
                        "(--run-dir) or an export's (--saved-model)")
    p.add_argument("--init-from", metavar="SOURCE",
                   help="a model.init_from source as it stands, before training from it (a "
                        "run folder, an export, a keras_hub or Hugging Face GPT-2 / Llama / BERT), "
                        "on --data or the --tasks")
    a = p.parse_args(argv)
    if a.init_from:
        if a.run_dir or a.saved_model or not (a.data or a.tasks) or (a.data and a.tasks):
            raise UserError("--init-from scores one source on --data PATH or on --tasks, "
                            "without --run-dir or --saved-model")
        from tfpretrain.training.evaluation import rounded

        print(json.dumps(rounded(evaluate_source(a.init_from, a.data, a.tasks,
                                                 a.max_batches))))
        return 0
    if not a.run_dir and not a.saved_model:
        raise UserError("give --run-dir, --saved-model or --init-from")
    if a.tasks:
        if a.data or (a.run_dir and a.saved_model):
            raise UserError("--tasks scores one model: give --run-dir or --saved-model, "
                            "without --data")
        print(json.dumps(saved_model_tasks(Path(a.saved_model), a.tasks) if a.saved_model
                         else evaluate_tasks(Path(a.run_dir), a.tasks)))
        return 0
    if a.saved_model:
        if a.data is None and not a.run_dir:
            raise UserError("--saved-model without --data evaluates on a run's validation "
                            "split: add --run-dir or --data")
        if a.data is not None:
            from tfpretrain.config import Config

            docs = _documents(Config(), a.data)
        else:
            from tfpretrain.config import build_config, read_yaml

            cfg_path = Path(a.run_dir) / "config.yaml"
            if not cfg_path.is_file():
                raise UserError(f"--run-dir: {a.run_dir} is not a tfpretrain run folder "
                                "(no config.yaml)")
            docs = _documents(build_config(read_yaml(cfg_path)), None)
        result = evaluate_saved_model(Path(a.saved_model), docs)
    else:
        result = evaluate_run(Path(a.run_dir), a.data, a.max_batches)
    from tfpretrain.training.evaluation import rounded

    print(json.dumps(rounded(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
