"""The WSD scaling law (docs/recipe.md §6): L(N, D) = C_N·N^−α + C_D·D^−β + L0, its fit and its
compute-optimal split.

UNITS. The paper's constants hold for N in 10⁹ non-embedding parameters, D in 10⁹ tokens and compute
C = 6·N·D in 10¹⁸ FLOPs (docs/recipe.md §6, verified numerically: with these units the published D/N ratios come
back). Every function here takes raw counts (parameters, tokens, FLOPs) and converts internally, so a
caller never juggles units; the constants of a `ScalingLaw` are always in the paper's units.

Compute-optimal split (Chinchilla-style): minimising L along N·D = C/6 gives
    N_opt/D_opt = K²·(C/6)^η,   K = (α·C_N / (β·C_D))^(1/(α+β)),   η = (β − α)/(α + β).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence

import numpy as np

PARAMS_UNIT = 1e9  # N in billions of non-embedding parameters
TOKENS_UNIT = 1e9  # D in billions of tokens
FLOPS_UNIT = 1e18  # C in 10^18 FLOPs (so that C = 6·N·D holds in these units)
CONSTANTS = ("c_n", "alpha", "c_d", "beta", "l0")


@dataclasses.dataclass(frozen=True)
class ScalingLaw:
    """L(N, D) = c_n·N^−alpha + c_d·D^−beta + l0 with N, D in billions; loss in nats per byte."""

    c_n: float
    alpha: float
    c_d: float
    beta: float
    l0: float

    def loss(self, n_params, tokens):
        """Predicted loss at raw parameter and token counts (numbers or arrays)."""
        n = np.asarray(n_params, dtype=float) / PARAMS_UNIT
        d = np.asarray(tokens, dtype=float) / TOKENS_UNIT
        return self.c_n * n ** -self.alpha + self.c_d * d ** -self.beta + self.l0

    @property
    def k_squared(self) -> float:
        return (self.alpha * self.c_n / (self.beta * self.c_d)) ** (2.0 / (self.alpha + self.beta))

    @property
    def eta(self) -> float:
        return (self.beta - self.alpha) / (self.alpha + self.beta)

    def compute_optimal(self, flops: float) -> ComputeOptimal:
        """The N and D that minimise the loss at `flops` training FLOPs (C = 6·N·D)."""
        if not flops > 0:
            raise ValueError(f"compute must be a positive number of FLOPs, got {flops!r}")
        half_product = flops / FLOPS_UNIT / 6.0  # N·D in billions²
        n_over_d = self.k_squared * half_product ** self.eta
        n = math.sqrt(half_product * n_over_d)
        d = half_product / n
        return ComputeOptimal(flops, n * PARAMS_UNIT, d * TOKENS_UNIT, d / n, self.k_squared, self.eta,
                              float(self.loss(n * PARAMS_UNIT, d * TOKENS_UNIT)))


@dataclasses.dataclass(frozen=True)
class ComputeOptimal:
    flops: float
    n_params: float
    tokens: float
    tokens_per_param: float
    k_squared: float
    eta: float
    loss: float


# The paper's average over its five held-out corpora (paper Fig. 10, docs/recipe.md §6); D/N ≈ 192 at 1e21 FLOPs.
PAPER_AVERAGE = ScalingLaw(c_n=7.15e-2, alpha=0.29, c_d=3.00e-1, beta=0.23, l0=0.31)


@dataclasses.dataclass(frozen=True)
class ScalingFit:
    law: ScalingLaw
    stderr: dict[str, float]  # one standard error per constant, from the fit's covariance
    rms_residual: float
    num_points: int

    def to_dict(self) -> dict:
        return {"constants": dataclasses.asdict(self.law), "stderr": self.stderr,
                "rms_residual": self.rms_residual, "num_points": self.num_points,
                "units": "N, D in 1e9 (non-embedding params, tokens); loss in nats per byte"}


def _law_in_units(nd, c_n, alpha, c_d, beta, l0):
    n, d = nd
    return c_n * n ** -alpha + c_d * d ** -beta + l0


def fit_scaling_law(n_params: Sequence[float], tokens: Sequence[float], losses: Sequence[float]) -> ScalingFit:
    """Least-squares fit of L(N, D) with scipy's curve_fit, from several starts (the surface has flat valleys).

    Needs at least 6 points (5 constants + one degree of freedom) spanning at least 2 values of N and of D.
    """
    from scipy.optimize import curve_fit

    n = np.asarray(n_params, dtype=float) / PARAMS_UNIT
    d = np.asarray(tokens, dtype=float) / TOKENS_UNIT
    y = np.asarray(losses, dtype=float)
    if not (n.shape == d.shape == y.shape) or n.ndim != 1:
        raise ValueError(f"n_params, tokens and losses must be 1-D of one length, got {n.shape}, {d.shape}, {y.shape}")
    if len(y) < 6 or len(set(n)) < 2 or len(set(d)) < 2:
        raise ValueError(f"a scaling fit needs >= 6 points over >= 2 model sizes and >= 2 token counts; got "
                         f"{len(y)} points, {len(set(n))} sizes, {len(set(d))} token counts")
    if not (np.all(np.isfinite(y)) and np.all(n > 0) and np.all(d > 0)):
        raise ValueError("losses must be finite and N, D positive")
    lower, upper = [0.0, 0.0, 0.0, 0.0, 0.0], [np.inf, 3.0, np.inf, 3.0, np.inf]
    best = None
    for alpha, beta in itertools.product((0.1, 0.3, 0.7), repeat=2):
        # Start with each term explaining a third of the smallest loss.
        l0 = y.min() / 3
        start = [l0 * np.median(n) ** alpha, alpha, l0 * np.median(d) ** beta, beta, l0]
        try:
            params, cov = curve_fit(_law_in_units, (n, d), y, p0=start, bounds=(lower, upper), maxfev=20000)
        except RuntimeError:  # this start did not converge; others may
            continue
        rss = float(np.sum((_law_in_units((n, d), *params) - y) ** 2))
        if best is None or rss < best[0]:
            best = (rss, params, cov)
    if best is None:
        raise RuntimeError("the scaling-law fit converged from none of its starting points")
    rss, params, cov = best
    stderr = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    return ScalingFit(ScalingLaw(*map(float, params)), dict(zip(CONSTANTS, map(float, stderr))),
                      math.sqrt(rss / len(y)), len(y))


# ------------------------------------------------------------------------------------- envelope fits (§5)

@dataclasses.dataclass(frozen=True)
class EnvelopeFit:
    """One form fitted to (compute, loss): `power` L = b·C^−a + L0 or `exponential` L = a·e^(−b·C) + L0.

    C in 10^18 FLOPs. `rms_residual` compares the two forms on the same points.
    """

    form: str
    a: float
    b: float
    l0: float
    rms_residual: float

    def loss(self, flops):
        c = np.asarray(flops, dtype=float) / FLOPS_UNIT
        if self.form == "power":
            return self.b * c ** -self.a + self.l0
        return self.a * np.exp(-self.b * c) + self.l0


def fit_envelopes(flops: Sequence[float], losses: Sequence[float]) -> dict[str, EnvelopeFit]:
    """Power law vs exponential in compute over a loss envelope (docs/recipe.md §5.5: the paper finds the power
    law fits better).

    Needs >= 4 points: with 3, each 3-constant form passes through them exactly and nothing is compared.
    """
    from scipy.optimize import curve_fit

    c = np.asarray(flops, dtype=float) / FLOPS_UNIT
    y = np.asarray(losses, dtype=float)
    if len(y) < 4 or len(set(c)) < 4:
        raise ValueError(f"an envelope fit needs >= 4 distinct compute values, got {len(set(c))}")
    scale = c.max()  # fit in C/C_max (the tiny runs' C is ~1e-6 in these units), then convert back
    x = c / scale
    fits = {}
    forms = {
        "power": (lambda x, a, b, l0: b * x ** -a + l0, [0.5, y.max() - y.min() + 1e-3, y.min() * 0.9],
                  lambda a, b: (a, b * scale ** a)),
        "exponential": (lambda x, a, b, l0: a * np.exp(-b * x) + l0, [y.max() - y.min() + 1e-3, 1.0, y.min() * 0.9],
                        lambda a, b: (a, b / scale)),
    }
    for form, (fn, start, unscale) in forms.items():
        try:
            params, _ = curve_fit(fn, x, y, p0=start, bounds=([0, 0, 0], [np.inf, np.inf, np.inf]), maxfev=20000)
        except RuntimeError:
            continue
        rms = float(np.sqrt(np.mean((fn(x, *params) - y) ** 2)))
        a, b = unscale(params[0], params[1])
        fits[form] = EnvelopeFit(form, float(a), float(b), float(params[2]), rms)
    return fits
