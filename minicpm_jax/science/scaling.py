"""The WSD scaling law (docs/recipe.md §6): L(N, D) = C_N·N^−α + C_D·D^−β + L0, its fit and its
compute-optimal split.

UNITS. The paper's constants hold for N in 10⁹ non-embedding parameters, D in 10⁹ tokens and compute
C = 6·N·D in 10¹⁸ FLOPs (docs/recipe.md §6, verified numerically: with these units the published D/N ratios come
back). Every function here takes raw counts (parameters, tokens, FLOPs) and converts internally, so a
caller never juggles units; the constants of a `ScalingLaw` are always in the paper's units.

Compute-optimal split (Chinchilla-style): minimising L along N·D = C/6 gives
    N_opt/D_opt = K²·(C/6)^η,   K = (α·C_N / (β·C_D))^(1/(α+β)),   η = (β − α)/(α + β).
So D/N ∝ C^−η changes with compute unless α = β: `tokens_per_param` gives it at any C, and
`tokens_per_param_table` tabulates it over a compute range.

Reference laws go through the same code: the paper's average fit (PAPER_AVERAGE) and Chinchilla's approach-3 law
(Hoffmann et al. 2022), as published and as re-fitted by Besiroglu et al. 2024 (`ScalingLaw.from_raw` converts
constants for raw counts to the units above).

Uncertainty: `bootstrap_scaling_law` refits resampled data (points, or residuals on the fixed design) and gives
percentile intervals of every constant and of D/N at any compute; `diagnose` names the ways a fit can be
ill-conditioned (standard errors above the values, a near-singular Jacobian, constants on a bound, a wide
bootstrap interval of D/N).
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

    @classmethod
    def from_raw(cls, e: float, a: float, alpha: float, b: float, beta: float) -> ScalingLaw:
        """The law L = E + A/N^α + B/D^β whose constants are for raw counts (parameters, tokens), as Chinchilla's
        are, in this module's units (N, D in 1e9): C_N = A·(1e9)^−α, C_D = B·(1e9)^−β, L0 = E."""
        return cls(c_n=a * PARAMS_UNIT ** -alpha, alpha=alpha, c_d=b * TOKENS_UNIT ** -beta, beta=beta, l0=e)

    def loss(self, n_params, tokens):
        """Predicted loss at raw parameter and token counts (numbers or arrays)."""
        n = np.asarray(n_params, dtype=float) / PARAMS_UNIT
        d = np.asarray(tokens, dtype=float) / TOKENS_UNIT
        return self.c_n * n ** -self.alpha + self.c_d * d ** -self.beta + self.l0

    @property
    def k_squared(self) -> float:
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):  # inf for degenerate fits, not an error
            return float(np.power(self.alpha * self.c_n / (self.beta * self.c_d), 2.0 / (self.alpha + self.beta)))

    @property
    def eta(self) -> float:
        return (self.beta - self.alpha) / (self.alpha + self.beta)

    def tokens_per_param(self, flops):
        """Compute-optimal D/N at `flops` training FLOPs (a number or an array): 1 / (K²·(C/6)^η)."""
        flops = np.asarray(flops, dtype=float)
        if not np.all(flops > 0):
            raise ValueError(f"compute must be a positive number of FLOPs, got {flops!r}")
        with np.errstate(over="ignore", divide="ignore"):
            return 1.0 / (self.k_squared * (flops / FLOPS_UNIT / 6.0) ** self.eta)

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


# The paper's average over its five held-out corpora (paper Fig. 10, docs/recipe.md §6); D/N ≈ 192 at 1e21 FLOPs
# (the rounded constants give 184; 191.87 lies inside their rounding). Loss in nats per byte, N non-embedding.
PAPER_AVERAGE = ScalingLaw(c_n=7.15e-2, alpha=0.29, c_d=3.00e-1, beta=0.23, l0=0.31)
# Chinchilla's approach 3 (Hoffmann et al. 2022, eq. 10, constants as printed in the paper's body): loss in nats per
# token, N all parameters. Through this module's formula it gives ≈ 93 tokens/param at Chinchilla's own compute,
# not 20: the rounding of α and β alone spans 44-195 there (tests/test_science_scaling.py). The 20 tokens/param of
# the Chinchilla model (70B params, 1.4T tokens) come from the paper's approaches 1 and 2.
CHINCHILLA_APPROACH3 = ScalingLaw.from_raw(e=1.69, a=406.4, alpha=0.34, b=410.7, beta=0.28)
# The same law re-fitted to data read off Hoffmann et al.'s plots by Besiroglu et al. 2024 ("Chinchilla Scaling: A
# replication attempt", arXiv 2404.10102), whose fit agrees with approaches 1 and 2: ≈ 20 tokens/param, N ≈ 70B at
# Chinchilla's compute.
CHINCHILLA_REFIT = ScalingLaw.from_raw(e=1.8172, a=482.01, alpha=0.3478, b=2085.43, beta=0.3658)
CHINCHILLA_COMPUTE = 5.76e23  # FLOPs of Gopher and Chinchilla (Hoffmann et al. 2022)
REFERENCE_LAWS = {
    "minicpm_paper_average": (PAPER_AVERAGE, "MiniCPM (Hu et al. 2024, Fig. 10 average; nats/byte, N non-embedding)"),
    "chinchilla_approach3": (CHINCHILLA_APPROACH3, "Chinchilla approach 3 as printed (Hoffmann et al. 2022: "
                                                   "E 1.69, A 406.4, B 410.7, α 0.34, β 0.28)"),
    "chinchilla_refit": (CHINCHILLA_REFIT, "Chinchilla approach 3 re-fitted (Besiroglu et al. 2024: "
                                           "E 1.82, A 482.0, B 2085.4, α 0.348, β 0.366)"),
}
COMPUTE_GRID = tuple(10.0 ** k for k in range(18, 25))  # 1e18 ... 1e24 FLOPs, one row per decade


@dataclasses.dataclass(frozen=True)
class ScalingFit:
    law: ScalingLaw
    stderr: dict[str, float]  # one standard error per constant, from the fit's covariance (inf: undefined)
    rms_residual: float
    num_points: int
    jacobian_condition: float = 1.0  # condition number of the column-normalised Jacobian at the optimum
    at_bounds: tuple[str, ...] = ()  # constants that ended on a bound of the fit (an exponent at 0 or 3, ...)

    def to_dict(self) -> dict:
        return {"constants": dataclasses.asdict(self.law), "stderr": self.stderr,
                "rms_residual": self.rms_residual, "num_points": self.num_points,
                "jacobian_condition": self.jacobian_condition, "at_bounds": list(self.at_bounds),
                "units": "N, D in 1e9 (non-embedding params, tokens); loss in nats per byte"}


def _law_in_units(nd, c_n, alpha, c_d, beta, l0):
    n, d = nd
    return c_n * n ** -alpha + c_d * d ** -beta + l0


def _jacobian(n, d, c_n, alpha, c_d, beta, l0) -> np.ndarray:
    """∂L/∂(c_n, α, c_d, β, L0) at every point, [points, 5]."""
    n_term, d_term = n ** -alpha, d ** -beta
    return np.stack([n_term, -c_n * n_term * np.log(n), d_term, -c_d * d_term * np.log(d), np.ones_like(n)], axis=1)


def _condition(jacobian: np.ndarray) -> float:
    """Condition number of the Jacobian with unit-norm columns (invariant to each constant's units): large when
    some combination of constants barely changes the predictions, i.e. the data cannot tell them apart."""
    norms = np.linalg.norm(jacobian, axis=0)
    if not np.all(np.isfinite(jacobian)) or np.any(norms == 0):
        return math.inf
    singular = np.linalg.svd(jacobian / norms, compute_uv=False)
    return math.inf if singular[-1] == 0 else float(singular[0] / singular[-1])


_LOWER, _UPPER = (0.0, 0.0, 0.0, 0.0, 0.0), (np.inf, 3.0, np.inf, 3.0, np.inf)


def _check_points(n_params, tokens, losses):
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
    return n, d, y


def _curve_fit(n, d, y, start):
    """One bounded least-squares fit from `start`: (rss, params, covariance), or None when it did not converge."""
    from scipy.optimize import curve_fit

    try:
        params, cov = curve_fit(_law_in_units, (n, d), y, p0=start, bounds=(_LOWER, _UPPER), maxfev=20000)
    except (RuntimeError, ValueError):  # this start did not converge (or left the bounds); others may
        return None
    return float(np.sum((_law_in_units((n, d), *params) - y) ** 2)), params, cov


def fit_scaling_law(n_params: Sequence[float], tokens: Sequence[float], losses: Sequence[float]) -> ScalingFit:
    """Least-squares fit of L(N, D) with scipy's curve_fit, from several starts (the surface has flat valleys).

    Needs at least 6 points (5 constants + one degree of freedom) spanning at least 2 values of N and of D.
    """
    n, d, y = _check_points(n_params, tokens, losses)
    best = None
    for alpha, beta in itertools.product((0.1, 0.3, 0.7), repeat=2):
        # Start with each term explaining a third of the smallest loss.
        l0 = y.min() / 3
        result = _curve_fit(n, d, y, [l0 * np.median(n) ** alpha, alpha, l0 * np.median(d) ** beta, beta, l0])
        if result is not None and (best is None or result[0] < best[0]):
            best = result
    if best is None:
        raise RuntimeError("the scaling-law fit converged from none of its starting points")
    rss, params, cov = best
    stderr = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    scale = np.maximum(np.abs(params), 1e-12)
    at_bounds = tuple(name for name, p, lo, hi, s in zip(CONSTANTS, params, _LOWER, _UPPER, scale)
                      if p - lo <= 1e-6 * max(s, 1.0) or hi - p <= 1e-6 * max(s, 1.0))
    return ScalingFit(ScalingLaw(*map(float, params)), dict(zip(CONSTANTS, map(float, stderr))),
                      math.sqrt(rss / len(y)), len(y), _condition(_jacobian(n, d, *params)), at_bounds)


# ------------------------------------------------------------------------------------------ uncertainty

@dataclasses.dataclass(frozen=True)
class ScalingBootstrap:
    """Refits of resampled data: percentile intervals of the constants and of the compute-optimal D/N."""

    laws: tuple[ScalingLaw, ...]  # one per successful refit
    num_samples: int  # resamples drawn (refits that failed or had < 2 sizes or token counts are not in `laws`)
    confidence: float  # e.g. 0.9 for a 5th-95th percentile interval
    method: str  # "points" (resample the points) or "residuals" (resample residuals on the fixed design)
    seed: int

    @property
    def failed(self) -> int:
        return self.num_samples - len(self.laws)

    def interval(self, values) -> tuple[float, float]:
        tail = 50.0 * (1.0 - self.confidence)
        values = np.asarray(values, dtype=float)
        lo, hi = np.nanpercentile(values, [tail, 100.0 - tail])
        return float(lo), float(hi)

    def constant_interval(self, name: str) -> tuple[float, float]:
        return self.interval([getattr(law, name) for law in self.laws])

    def tokens_per_param_interval(self, flops: float) -> tuple[float, float]:
        return self.interval([law.tokens_per_param(flops) for law in self.laws])

    def to_dict(self, flops: float) -> dict:
        return {"method": self.method, "seed": self.seed, "confidence": self.confidence,
                "num_samples": self.num_samples, "failed": self.failed,
                "constants": {name: self.constant_interval(name) for name in CONSTANTS},
                "tokens_per_param_at_compute": {"flops": flops, "interval": self.tokens_per_param_interval(flops)}}


def bootstrap_scaling_law(n_params: Sequence[float], tokens: Sequence[float], losses: Sequence[float],
                          fit: ScalingFit | None = None, num_samples: int = 200, seed: int = 0,
                          confidence: float = 0.9, method: str = "points") -> ScalingBootstrap:
    """Bootstrap of the fit: `num_samples` resampled data sets, each refitted from the full fit's constants.

    method "points" draws the points with replacement (each point a decayed run); "residuals" keeps the design
    and adds the full fit's residuals, drawn with replacement and inflated by √(m/(m − 5)), to its predictions.
    Seeded by `seed` (numpy's default generator), so that a report can be regenerated exactly.
    """
    if method not in ("points", "residuals"):
        raise ValueError(f"bootstrap method must be 'points' or 'residuals', got {method!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    n, d, y = _check_points(n_params, tokens, losses)
    fit = fit or fit_scaling_law(n_params, tokens, losses)
    start = [getattr(fit.law, name) for name in CONSTANTS]
    start = [max(v, 1e-9) if name not in ("alpha", "beta") else min(max(v, 1e-6), 3.0 - 1e-6)
             for name, v in zip(CONSTANTS, start)]  # curve_fit wants a start strictly inside the bounds
    predicted = _law_in_units((n, d), *start)
    residuals = (y - predicted) * math.sqrt(len(y) / max(len(y) - len(CONSTANTS), 1))
    rng = np.random.default_rng(seed)
    laws = []
    for _ in range(num_samples):
        if method == "points":
            pick = rng.integers(0, len(y), len(y))
            ns, ds, ys = n[pick], d[pick], y[pick]
            if len(set(ns)) < 2 or len(set(ds)) < 2:
                continue
        else:
            ns, ds, ys = n, d, predicted + residuals[rng.integers(0, len(y), len(y))]
        result = _curve_fit(ns, ds, ys, start)
        if result is not None:
            laws.append(ScalingLaw(*map(float, result[1])))
    return ScalingBootstrap(tuple(laws), num_samples, confidence, method, seed)


def diagnose(fit: ScalingFit, bootstrap: ScalingBootstrap | None = None, flops: float = 1e21,
             max_condition: float = 1e4, max_interval_ratio: float = 4.0) -> list[str]:
    """Why this fit cannot be trusted, one sentence per reason (empty when none applies).

    - a constant's standard error exceeds its value (the data do not determine it);
    - the column-normalised Jacobian's condition number exceeds `max_condition` (some combination of constants
      barely moves the predictions: a near-singular fit);
    - a constant ended on a bound of the fit;
    - the bootstrap interval of D/N at `flops` spans more than a factor `max_interval_ratio` (hi/lo), or more
      than a tenth of the refits failed.
    """
    warnings = []
    for name in CONSTANTS:
        value, err = getattr(fit.law, name), fit.stderr[name]
        if not math.isfinite(err):
            warnings.append(f"{name} has no finite standard error (singular covariance)")
        elif err > abs(value):
            warnings.append(f"{name} = {value:.3g} ± {err:.2g}: the standard error exceeds the value")
    if fit.jacobian_condition > max_condition:
        warnings.append(f"near-singular Jacobian: condition number {fit.jacobian_condition:.3g} > {max_condition:.0e} "
                        f"(the points cannot separate the constants)")
    for name in fit.at_bounds:
        warnings.append(f"{name} = {getattr(fit.law, name):.3g} ended on a bound of the fit")
    if bootstrap is not None:
        if bootstrap.failed > 0.1 * bootstrap.num_samples:
            warnings.append(f"{bootstrap.failed} of {bootstrap.num_samples} bootstrap refits failed or had too "
                            f"few distinct sizes")
        if bootstrap.laws:
            lo, hi = bootstrap.tokens_per_param_interval(flops)
            ratio = hi / lo if lo > 0 else math.inf
            if not ratio <= max_interval_ratio:
                warnings.append(f"D/N at {flops:.0e} FLOPs has a {bootstrap.confidence:.0%} bootstrap interval "
                                f"[{lo:.3g}, {hi:.3g}], wider than a factor {max_interval_ratio:g}")
    return warnings


def tokens_per_param_table(law: ScalingLaw, flops: Sequence[float] = COMPUTE_GRID,
                           bootstrap: ScalingBootstrap | None = None) -> list[dict]:
    """Compute-optimal N, D and D/N at each compute budget (C = 6·N·D), with bootstrap intervals of D/N."""
    rows = []
    for c in flops:
        optimum = law.compute_optimal(c)
        row = {"flops": c, "n_params": optimum.n_params, "tokens": optimum.tokens,
               "tokens_per_param": optimum.tokens_per_param}
        if bootstrap is not None and bootstrap.laws:
            row["tokens_per_param_interval"] = bootstrap.tokens_per_param_interval(c)
        rows.append(row)
    return rows


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
