"""Validation metrics of a run, the same for fit, evaluate and tune: the objective's own
(loss, perplexity, bits per byte or masked accuracy, baselines), rounded one way."""
from __future__ import annotations

from tfpretrain.config import Config


def evaluate_split(cfg: Config, model, tokenizer, rows, counts, max_batches: int = 0) -> dict:
    """Metrics of ``rows`` for the run's objective (``max_batches`` = 0: all rows)."""
    from tfpretrain.objectives import get_objective

    return get_objective(cfg).evaluate(cfg, model, tokenizer, rows, counts, max_batches)


def task_evaluator(cfg: Config, model, tokenizer):
    """``f(task, rows) -> metrics`` of zero-shot tasks (``data.tasks``) for the run's
    objective (a causal model; masked LM refuses), traced once."""
    from tfpretrain.data.tasks import task_metrics
    from tfpretrain.objectives import get_objective

    score = get_objective(cfg).task_scorer(cfg, model, tokenizer)

    def evaluate(task, rows) -> dict:
        nll, greedy = score(rows)
        return task_metrics(task, rows, nll, greedy)

    return evaluate


def rounded(metrics: dict, digits: int = 6) -> dict:
    """Floats rounded for summaries and JSON lines; other values unchanged."""
    return {k: (round(v, digits) if isinstance(v, float) else v) for k, v in metrics.items()}
