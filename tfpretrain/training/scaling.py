"""Compute-optimal size from an IsoFLOP sweep, the arithmetic only (``python -m
tfpretrain.scaling`` runs the sweep): Chinchilla's approaches 2 and 3 (Hoffmann et al.
2022, sections 3.2 and 3.3).

Approach 2: for each compute budget C, models of several sizes N are trained on C /
flops_per_token(N) tokens each. The final loss against log N is a valley: the parabola
through its lowest point and the two either side puts the budget's best size N_opt(C) at
its vertex, and D_opt(C) = C / flops_per_token(N_opt). Over several budgets, N_opt = k C^a
and D_opt = k' C^b are straight lines in log-log (Chinchilla measured a ~ b ~ 0.5, about
20 tokens per parameter); extrapolated, they size a run at a budget far above the sweep's.

Approach 3: L(N, D) = E + A / N^alpha + B / D^beta over every run; its minimum along
C = k N D is a second N_opt, D_opt, with the loss to expect there.
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
    """The best size of one budget: the vertex of the parabola loss ~ a (log10 N)^2 +
    b log10 N + c through the best size tried and its two neighbours (parabolic
    interpolation of the bracket: sizes far from the minimum, starved of steps or of
    capacity, do not pull the vertex)."""
    budget: float
    points: list = field(default_factory=list)
    coefficients: Optional[tuple] = None   # (a, b, c) over the bracket
    bracket: Optional[tuple] = None        # (smallest, largest) parameters fitted
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
                "bracket": self.bracket, "coefficients": None if self.coefficients is None
                else [r(c) for c in self.coefficients], "problem": self.problem}


def valley(budget: float, points: list[Point]) -> Valley:
    """Place one budget's minimum. A best size at either end of those tried is reported,
    not extrapolated: the sweep needs sizes past it."""
    pts = sorted((p for p in points if math.isfinite(p.loss)), key=lambda p: p.params)
    out = Valley(budget, pts)
    if len(pts) < MIN_POINTS:
        out.problem = f"{len(pts)} finished sizes; a valley needs {MIN_POINTS}"
        return out
    y = np.array([p.loss for p in pts])
    best = int(np.argmin(y))
    if best in (0, len(pts) - 1):
        words = "smallest tried: add smaller" if best == 0 else "largest tried: add larger"
        out.problem = f"the best size is the {words} sizes"
        return out
    near = pts[best - 1:best + 2]
    x = np.log10([p.params for p in near])
    a, b, c = np.polyfit(x, [p.loss for p in near], 2)
    out.coefficients, out.bracket = (float(a), float(b), float(c)), (near[0].params,
                                                                     near[-1].params)
    if a <= 0:  # a tie with a neighbour: flat, no vertex
        out.problem = "the loss has no minimum over these sizes (not a valley)"
        return out
    vertex = -b / (2 * a)
    out.params = float(10 ** vertex)
    out.loss = float(a * vertex ** 2 + b * vertex + c)
    # FLOPs per token per parameter (6 + attention's share) between the sizes around N_opt
    per_param = np.interp(vertex, x, [p.flops / p.tokens / p.params for p in near])
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


ALPHAS = np.round(np.arange(0.05, 1.501, 0.01), 2)  # the exponents searched (approach 3)
MIN_LOSS_POINTS = 6                                 # five parameters need six points
NEAR_VALLEY = 1.5     # runs within this factor of their budget's best loss fit the law


@dataclass
class LossLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta over every run (Chinchilla's approach 3).
    For each (alpha, beta) of a grid the law is linear in (E, A, B): least squares with
    E, A, B >= 0, and the pair with the smallest squared error wins (no optimizer, no
    starting point to choose). ``flops_per_param``: training FLOPs per parameter and
    token (6, plus attention's share) of these runs."""
    e: float
    a: float
    b: float
    alpha: float
    beta: float
    rmse: float
    flops_per_param: float

    def loss(self, params, tokens):
        return self.e + self.a / np.power(params, self.alpha) + self.b / np.power(
            tokens, self.beta)

    def optimum(self, budget: float) -> tuple[float, float]:
        """(N_opt, D_opt) at ``budget`` FLOPs: where dL/dN = 0 along C = k N D."""
        g = (self.alpha * self.a / (self.beta * self.b)) ** (1 / (self.alpha + self.beta))
        n = g * (budget / self.flops_per_param) ** (self.beta / (self.alpha + self.beta))
        return float(n), float(budget / (self.flops_per_param * n))

    def to_dict(self) -> dict:
        r = lambda v: float(f"{v:.5g}")  # noqa: E731
        return {"E": r(self.e), "A": r(self.a), "B": r(self.b), "alpha": self.alpha,
                "beta": self.beta, "rmse": r(self.rmse),
                "params_exponent": round(self.beta / (self.alpha + self.beta), 4),
                "tokens_exponent": round(self.alpha / (self.alpha + self.beta), 4),
                "at_search_edge": self.at_search_edge}

    @property
    def at_search_edge(self) -> bool:
        """An exponent at the grid's end: the runs do not pin the law down."""
        return bool({self.alpha, self.beta} & {float(ALPHAS[0]), float(ALPHAS[-1])})


def near_valleys(points: list[Point]) -> list[Point]:
    """The runs whose loss is within NEAR_VALLEY x their budget's best: the law's regime.
    A size far up a valley's wall was starved of steps (a few dozen, mostly warmup) and
    follows another curve, which would bend the whole fit to it."""
    finite = [p for p in points if math.isfinite(p.loss)]
    best = {}
    for p in finite:
        best[p.budget] = min(best.get(p.budget, math.inf), p.loss)
    return [p for p in finite if p.loss <= NEAR_VALLEY * best[p.budget]]


def loss_law(points: list[Point]) -> Optional[LossLaw]:
    """Fit L(N, D) over ``points`` (None: fewer than MIN_LOSS_POINTS finite ones, or no
    (alpha, beta) with non-negative E, A, B)."""
    pts = [p for p in points if math.isfinite(p.loss)]
    if len(pts) < MIN_LOSS_POINTS:
        return None
    n = np.array([p.params for p in pts], float)
    d = np.array([p.tokens for p in pts], float)
    y = np.array([p.loss for p in pts])
    best = None
    for alpha in ALPHAS:
        # every beta at once: X [betas, points, 3], solved by the normal equations
        x = np.stack(np.broadcast_arrays(np.ones((len(ALPHAS), len(pts))), n ** -alpha,
                                         d[None, :] ** -ALPHAS[:, None]), axis=-1)
        xtx = np.einsum("kpi,kpj->kij", x, x)
        xty = np.einsum("kpi,p->ki", x, y)
        try:
            coef = np.linalg.solve(xtx, xty[..., None])[..., 0]
        except np.linalg.LinAlgError:
            continue
        err = ((np.einsum("kpi,ki->kp", x, coef) - y) ** 2).mean(axis=1)
        err[(coef < 0).any(axis=1)] = np.inf
        k = int(np.argmin(err))
        if np.isfinite(err[k]) and (best is None or err[k] < best[0]):
            best = (float(err[k]), float(alpha), float(ALPHAS[k]), coef[k])
    if best is None:
        return None
    err, alpha, beta, (e, a, b) = best
    per_param = float(np.mean([p.flops / (p.tokens * p.params) for p in pts]))
    return LossLaw(float(e), float(a), float(b), alpha, beta, err ** 0.5, per_param)
