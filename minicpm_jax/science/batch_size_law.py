"""The optimal-batch-size law bs = a / L^b, fitted by the paper's procedure (docs/recipe.md §4; paper §3.2, App. A.2).

For each loss level L: every batch size's loss curve gives the tokens it needed to first reach L; in
(log batch size, log tokens) those equal-loss points lie on a parabola whose vertex is the batch size
that reaches L with the fewest tokens. The vertices over the levels lie on a straight line in
(log L, log bs): log bs = log a − b·log L. The paper: a = 1.21e9, b = 6.24 (bs in tokens, L = C4 loss).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class BatchSizeLaw:
    """bs(L) = a / L^b with bs in tokens per step."""

    a: float
    b: float

    def batch_size(self, loss):
        return self.a / np.asarray(loss, dtype=float) ** self.b


PAPER_LAW = BatchSizeLaw(a=1.21e9, b=6.24)


@dataclasses.dataclass(frozen=True)
class BatchSizeFit:
    law: BatchSizeLaw
    levels: list[float]  # the loss levels whose optimum was found
    optimal_batch_sizes: list[float]  # the parabola vertex (tokens per step) at each level
    equal_loss_points: dict[float, list[tuple[float, float]]]  # level -> [(batch size, tokens to reach it)]

    def to_dict(self) -> dict:
        return {"a": self.law.a, "b": self.law.b, "levels": self.levels,
                "optimal_batch_sizes": self.optimal_batch_sizes,
                "equal_loss_points": {str(k): v for k, v in self.equal_loss_points.items()}}


def tokens_to_reach(tokens: Sequence[float], losses: Sequence[float], level: float) -> float | None:
    """Tokens at which a loss curve first reaches `level` (linear interpolation), or None if it never does.

    The curve is read through its running minimum, so noise that bounces back above a level does not
    move the crossing later.
    """
    t = np.asarray(tokens, dtype=float)
    best = np.minimum.accumulate(np.asarray(losses, dtype=float))
    below = np.nonzero(best <= level)[0]
    if len(below) == 0:
        return None
    i = below[0]
    if i == 0:
        return float(t[0])
    # Between point i-1 (above the level) and i (at or below it).
    frac = (best[i - 1] - level) / (best[i - 1] - best[i])
    return float(t[i - 1] + frac * (t[i] - t[i - 1]))


def optimal_batch_size(points: Sequence[tuple[float, float]]) -> float | None:
    """Vertex of the parabola log tokens = p(log bs) through equal-loss points; None without a minimum inside."""
    if len(points) < 3:
        return None
    x = np.log([bs for bs, _ in points])
    y = np.log([tokens for _, tokens in points])
    curvature, slope, _ = np.polyfit(x, y, 2)
    if curvature <= 0:  # no minimum: the optimum lies outside the swept batch sizes
        return None
    vertex = -slope / (2 * curvature)
    if not x.min() <= vertex <= x.max():  # an extrapolated optimum is not a measurement
        return None
    return float(math.exp(vertex))


def fit_batch_size_law(curves: Mapping[float, tuple[Sequence[float], Sequence[float]]],
                       levels: Sequence[float]) -> BatchSizeFit:
    """Fit bs = a / L^b from loss curves {batch size in tokens: (tokens seen, loss)} at the given loss levels.

    Levels that fewer than 3 batch sizes reach, or whose optimum falls outside the swept range, are
    skipped; at least 2 levels must remain.
    """
    if len(curves) < 3:
        raise ValueError(f"the batch-size law needs loss curves for >= 3 batch sizes, got {len(curves)}")
    kept_levels, optima, points_by_level = [], [], {}
    for level in sorted(levels, reverse=True):
        points = [(bs, t) for bs, (tokens, losses) in sorted(curves.items())
                  if (t := tokens_to_reach(tokens, losses, level)) is not None]
        points_by_level[float(level)] = points
        vertex = optimal_batch_size(points)
        if vertex is not None:
            kept_levels.append(float(level))
            optima.append(vertex)
    if len(kept_levels) < 2:
        raise ValueError(f"only {len(kept_levels)} loss level(s) had an optimal batch size inside the swept range "
                         f"(levels tried: {sorted(levels)}); sweep more batch sizes or pick levels all runs reach")
    slope, intercept = np.polyfit(np.log(kept_levels), np.log(optima), 1)
    return BatchSizeFit(BatchSizeLaw(a=float(math.exp(intercept)), b=float(-slope)), kept_levels, optima,
                        points_by_level)


def default_levels(curves: Mapping[float, tuple[Sequence[float], Sequence[float]]], count: int = 6) -> list[float]:
    """Evenly spaced loss levels between the worst final loss and a little below the start of every curve."""
    finals = [float(np.min(losses)) for _, losses in curves.values()]
    highest = min(float(np.max(losses)) for _, losses in curves.values())
    low = max(finals)  # every curve reaches this level
    return list(np.linspace(low, low + 0.6 * (highest - low), count))
