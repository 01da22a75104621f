"""Compute-optimal size from an IsoFLOP sweep: Chinchilla's approach 2 (Hoffmann et al.
2022, section 3.2), the arithmetic only (``python -m tfpretrain.scaling`` runs the sweep).

For each compute budget C, models of several sizes N are trained on C / flops_per_token(N)
tokens each. The final loss against log N is a valley: a parabola fitted through it puts
the budget's best size N_opt(C) at its vertex, and D_opt(C) = C / flops_per_token(N_opt).
Over several budgets, N_opt = k C^a and D_opt = k' C^b are straight lines in log-log
(Chinchilla measured a ~ b ~ 0.5, about 20 tokens per parameter); extrapolated, they size a
run at a budget far above the sweep's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

MIN_POINTS = 3  # a parabola needs three sizes per budget


@dataclass
class Point:
    """One finished run of the sweep."""
    budget: float          # the nominal compute budget it belongs to (FLOPs)
    params: int            # parameters (summary's ``params``)
    tokens: int            # tokens trained on
    flops: float           # tokens x flops_per_token: its real compute
    loss: float            # final validation loss


@dataclass
class Valley:
    """The best size of one budget: the vertex of loss ~ a (log10 N)^2 + b log10 N + c."""
    budget: float
    points: list = field(default_factory=list)
    coefficients: Optional[tuple] = None   # (a, b, c); None: too few finite points
    params: Optional[float] = None         # N_opt
    tokens: Optional[float] = None         # D_opt
    loss: Optional[float] = None           # the parabola's value at N_opt
    problem: Optional[str] = None          # why this budget gives no usable N_opt

    @property
    def usable(self) -> bool:
        return self.problem is None and self.params is not None

    def to_dict(self) -> dict:
        r = lambda v: None if v is None else float(f"{v:.6g}")  # noqa: E731
        return {"budget": self.budget, "params_opt": r(self.params),
                "tokens_opt": r(self.tokens), "loss_opt": r(self.loss),
                "tokens_per_param": r(self.tokens / self.params) if self.usable else None,
                "coefficients": None if self.coefficients is None
                else [r(c) for c in self.coefficients], "problem": self.problem}


def valley(budget: float, points: list[Point]) -> Valley:
    """Fit one budget's points (a parabola in log10 N) and place its minimum. A vertex
    outside the sizes tried is reported, not extrapolated: the sweep needs sizes past it."""
    pts = sorted((p for p in points if math.isfinite(p.loss)), key=lambda p: p.params)
    out = Valley(budget, pts)
    if len(pts) < MIN_POINTS:
        out.problem = f"{len(pts)} finished sizes; a valley needs {MIN_POINTS}"
        return out
    x = np.log10([p.params for p in pts])
    y = np.array([p.loss for p in pts])
    a, b, c = np.polyfit(x, y, 2)
    out.coefficients = (float(a), float(b), float(c))
    vertex = -b / (2 * a) if a > 0 else None
    best = int(np.argmin(y))
    for edge, outward, words in ((0, -1, "smallest tried: add smaller"),
                                 (len(y) - 1, 1, "largest tried: add larger")):
        if best == edge or (vertex is not None and (vertex - x[edge]) * outward > 0):
            out.problem = f"the best size is the {words} sizes"
            return out
    if vertex is None:
        out.problem = "the loss has no minimum over these sizes (not a valley)"
        return out
    out.params = float(10 ** vertex)
    out.loss = float(a * vertex ** 2 + b * vertex + c)
    # FLOPs per token per parameter (6 + attention's share) between the sizes around N_opt
    per_param = np.interp(vertex, x, [p.flops / p.tokens / p.params for p in pts])
    out.tokens = float(budget / (per_param * out.params))
    return out


@dataclass
class PowerLaw:
    """value = coefficient x C^exponent, fitted in log-log over the usable valleys."""
    exponent: float
    coefficient: float

    def at(self, budget: float) -> float:
        return self.coefficient * budget ** self.exponent

    def to_dict(self) -> dict:
        return {"exponent": round(self.exponent, 4),
                "coefficient": float(f"{self.coefficient:.6g}")}


def power_law(budgets: list[float], values: list[float]) -> PowerLaw:
    slope, intercept = np.polyfit(np.log10(budgets), np.log10(values), 1)
    return PowerLaw(float(slope), float(10 ** intercept))


def laws(valleys: list[Valley]) -> Optional[dict]:
    """N_opt(C) and D_opt(C) from two or more usable valleys (None: fewer)."""
    good = [v for v in valleys if v.usable]
    if len(good) < 2:
        return None
    budgets = [v.budget for v in good]
    return {"params": power_law(budgets, [v.params for v in good]),
            "tokens": power_law(budgets, [v.tokens for v in good])}
