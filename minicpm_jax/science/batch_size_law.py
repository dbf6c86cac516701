"""The optimal-batch-size law bs = a / L^b, fitted by the paper's procedure (docs/recipe.md §4; paper §3.2, App. A.2).

For each model size and each loss level L: every batch size's loss curve gives the tokens it needed to
first reach L; in (log batch size, log tokens) those equal-loss points lie on a parabola whose vertex is
the batch size that reaches L with the fewest tokens. The paper does this for three model sizes (0.009B,
0.03B, 0.17B) and finds that the vertices of all sizes and levels lie on one straight line in
(log L, log bs): log bs = log a − b·log L, with a = 1.21e9, b = 6.24 (bs in tokens, L = C4 loss). So the
optima are found per model size and the line is fitted to all of them pooled.

A curve is keyed by (model, batch size): `model` is any label of the model size (the report uses the
non-embedding parameter count), the batch size is in tokens per step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

Curve = tuple[Sequence[float], Sequence[float]]  # (tokens seen, loss) along one run


@dataclasses.dataclass(frozen=True)
class BatchSizeLaw:
    """bs(L) = a / L^b with bs in tokens per step."""

    a: float
    b: float

    def batch_size(self, loss):
        return self.a / np.asarray(loss, dtype=float) ** self.b


PAPER_LAW = BatchSizeLaw(a=1.21e9, b=6.24)


@dataclasses.dataclass(frozen=True)
class OptimalPoint:
    """The batch size that reaches `level` with the fewest tokens, for one model size."""

    model: str
    level: float
    batch_size: float  # the parabola's vertex, tokens per step
    tokens: float  # the parabola's value there: the fewest tokens to reach the level
    equal_loss_points: list[tuple[float, float]]  # [(batch size, tokens to reach the level)] it was fitted to


@dataclasses.dataclass(frozen=True)
class LineFit:
    """log bs = log a − b·log L by least squares, with standard errors (None with fewer than 3 points)."""

    law: BatchSizeLaw
    num_points: int
    stderr_b: float | None
    stderr_log_a: float | None
    rms_residual_log: float  # in natural log of the batch size

    def to_dict(self) -> dict:
        return {"a": self.law.a, "b": self.law.b, "num_points": self.num_points, "stderr_b": self.stderr_b,
                "stderr_log_a": self.stderr_log_a, "rms_residual_log": self.rms_residual_log}


@dataclasses.dataclass(frozen=True)
class BatchSizeFit:
    pooled: LineFit  # the paper's law: one line through the optima of every model size
    per_model: dict[str, LineFit]  # each size's own line, where it has >= 2 optima (do the lines join?)
    points: list[OptimalPoint]
    skipped: dict[str, dict[float, str]]  # model -> level -> why no optimum was taken there
    # model -> level -> [(batch size, tokens to reach it)], also at the skipped levels (for the plot)
    equal_loss_points: dict[str, dict[float, list[tuple[float, float]]]]
    # b refitted with each run (model, batch size) left out in turn, where the rest still fits; the optima of
    # one model's levels share its runs, so this spread is a more honest error bar than the line's own stderr
    jackknife_b: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def jackknife_stderr_b(self) -> float | None:
        values = np.array(list(self.jackknife_b.values()))
        if len(values) < 3:
            return None
        return float(np.sqrt((len(values) - 1) / len(values) * np.sum((values - values.mean()) ** 2)))

    @property
    def law(self) -> BatchSizeLaw:
        return self.pooled.law

    def to_dict(self) -> dict:
        return {"a": self.law.a, "b": self.law.b, "pooled": self.pooled.to_dict(),
                "jackknife_stderr_b": self.jackknife_stderr_b, "jackknife_b": self.jackknife_b,
                "per_model": {m: f.to_dict() for m, f in self.per_model.items()},
                "points": [dataclasses.asdict(p) for p in self.points],
                "skipped": {m: {str(level): why for level, why in s.items()} for m, s in self.skipped.items()},
                "equal_loss_points": {m: {str(level): pts for level, pts in by_level.items()}
                                      for m, by_level in self.equal_loss_points.items()}}


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


def _vertex(points: Sequence[tuple[float, float]]) -> tuple[float | None, float | None, str]:
    """(batch size, tokens) at the vertex of log tokens = p(log bs), or (None, None, why not)."""
    if len(points) < 3:
        return None, None, f"reached by {len(points)} batch size(s); a parabola needs >= 3"
    x = np.log([bs for bs, _ in points])
    y = np.log([tokens for _, tokens in points])
    curvature, slope, intercept = np.polyfit(x, y, 2)
    fewest = points[int(np.argmin(y))][0]
    if curvature <= 0:
        return None, None, f"no minimum (parabola opens downwards); fewest tokens at batch size {fewest:g}"
    vertex = -slope / (2 * curvature)
    if not x.min() <= vertex <= x.max():  # an extrapolated optimum is not a measurement
        return None, None, (f"vertex at batch size {math.exp(vertex):.4g} lies outside the swept "
                            f"{math.exp(x.min()):g}-{math.exp(x.max()):g}; fewest tokens at {fewest:g}")
    return float(math.exp(vertex)), float(math.exp(np.polyval([curvature, slope, intercept], vertex))), ""


def optimal_batch_size(points: Sequence[tuple[float, float]]) -> float | None:
    """Vertex of the parabola log tokens = p(log bs) through equal-loss points; None without a minimum inside."""
    return _vertex(points)[0]


def fit_line(levels: Sequence[float], batch_sizes: Sequence[float]) -> LineFit:
    """log bs = log a − b·log L through (level, optimal batch size) points, with least-squares standard errors."""
    x, y = np.log(np.asarray(levels, float)), np.log(np.asarray(batch_sizes, float))
    n = len(x)
    if n < 2 or np.ptp(x) == 0:
        raise ValueError(f"a line needs >= 2 distinct loss levels, got {sorted(set(np.round(np.exp(x), 4)))}")
    design = np.stack([np.ones(n), x], axis=1)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    residual = y - design @ coef
    stderr_b = stderr_log_a = None
    if n > 2:
        sigma2 = float(residual @ residual) / (n - 2)
        cov = sigma2 * np.linalg.inv(design.T @ design)
        stderr_log_a, stderr_b = float(math.sqrt(cov[0, 0])), float(math.sqrt(cov[1, 1]))
    return LineFit(BatchSizeLaw(a=float(math.exp(coef[0])), b=float(-coef[1])), n, stderr_b, stderr_log_a,
                   float(np.sqrt(np.mean(residual ** 2))))


def fit_batch_size_law(curves: Mapping[str, Mapping[float, Curve]],
                       levels: Sequence[float] | Mapping[str, Sequence[float]] | None = None,
                       jackknife: bool = True) -> BatchSizeFit:
    """Fit bs = a / L^b from loss curves {model: {batch size in tokens: (tokens seen, loss)}}.

    `levels` are the loss levels to find optima at: one list for every model, a list per model (a model
    without one gets its `default_levels`), or None for `default_levels` of each model's curves. A level
    of a model is skipped when fewer than 3 of its batch sizes reach it or its parabola has no minimum
    inside the swept batch sizes (the reason is kept in `skipped`). The pooled line needs at least 2
    optima, at 2 different levels. With `jackknife`, the whole fit is repeated with each run left out (at
    the same levels) to give `jackknife_b`.
    """
    kept: list[OptimalPoint] = []
    skipped: dict[str, dict[float, str]] = {}
    equal_loss: dict[str, dict[float, list[tuple[float, float]]]] = {}
    for model, by_batch in curves.items():
        if len(by_batch) < 3:
            raise ValueError(f"model {model}: the batch-size law needs loss curves for >= 3 batch sizes, got "
                             f"{len(by_batch)} ({sorted(by_batch)})")
        if levels is None:
            mine = default_levels(by_batch)
        elif isinstance(levels, Mapping):
            mine = levels[model] if model in levels else default_levels(by_batch)
        else:
            mine = levels
        for level in sorted(map(float, mine), reverse=True):
            points = [(float(bs), t) for bs, (tokens, losses) in sorted(by_batch.items())
                      if (t := tokens_to_reach(tokens, losses, level)) is not None]
            equal_loss.setdefault(model, {})[level] = points
            vertex, fewest, why = _vertex(points)
            if vertex is None:
                skipped.setdefault(model, {})[level] = why
            else:
                kept.append(OptimalPoint(model, level, vertex, fewest, points))
    if len({p.level for p in kept}) < 2:
        reasons = "; ".join(f"{model} at L={level:.4g}: {why}" for model, by_level in skipped.items()
                            for level, why in by_level.items())
        raise ValueError(f"{len(kept)} optimal batch size(s) found inside the swept range, at "
                         f"{len({p.level for p in kept})} loss level(s); the law needs >= 2 levels. "
                         f"Sweep more (or smaller and larger) batch sizes, train longer, or pick levels "
                         f"the runs reach. Skipped: {reasons}")
    per_model = {}
    for model in curves:
        mine = [p for p in kept if p.model == model]
        if len({p.level for p in mine}) >= 2:
            per_model[model] = fit_line([p.level for p in mine], [p.batch_size for p in mine])
    pooled = fit_line([p.level for p in kept], [p.batch_size for p in kept])
    jackknife_b = {}
    if jackknife:
        used_levels = {model: list(by_level) for model, by_level in equal_loss.items()}
        for model, by_batch in curves.items():
            for bs in by_batch:
                rest = {m: {b: c for b, c in runs.items() if (m, b) != (model, bs)} for m, runs in curves.items()}
                if len(rest[model]) < 3:
                    rest.pop(model)
                try:
                    refit = fit_batch_size_law(rest, {m: used_levels[m] for m in rest}, jackknife=False)
                except ValueError:
                    continue  # without this run too few optima remain: no jackknife value
                jackknife_b[f"{model}/{bs:g}"] = refit.law.b
    return BatchSizeFit(pooled, per_model, kept, skipped, equal_loss, jackknife_b)


def default_levels(curves: Mapping[float, Curve], count: int = 6) -> list[float]:
    """`count` evenly spaced loss levels for one model's curves {batch size: (tokens, loss)}.

    From the lowest loss that 3 of the curves reach (fewer cannot make a parabola) up 60% of the way to the
    lowest of the curves' highest losses (a level every curve starts above).
    """
    finals = sorted(float(np.min(losses)) for _, losses in curves.values())
    highest = min(float(np.max(losses)) for _, losses in curves.values())
    low = finals[min(2, len(finals) - 1)]
    return list(np.linspace(low, low + 0.6 * (highest - low), count))
