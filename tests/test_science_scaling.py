"""The scaling-law math against the paper's published constants, an independent minimisation, and synthetic fits."""

import itertools
import math

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from minicpm_jax.science.scaling import (
    PAPER_AVERAGE,
    ScalingLaw,
    fit_envelopes,
    fit_scaling_law,
)

# The paper's Fig. 10 (docs/recipe.md §6): (C_N, α, C_D, β, L0) as printed, then the printed K², η and D/N
# at 1e21 FLOPs.
# Strings, because the rounding of each printed constant is what the test tolerates.
PAPER_PANELS = [
    (("5.14e-2", "0.35", "3.90e-1", "0.18", "0.40"), 0.01, -0.33, 833.95),
    (("3.32e-2", "0.37", "2.17e-1", "0.34", "0.17"), 0.01, -0.05, 194.93),
    (("8.08e-2", "0.26", "2.97e-1", "0.18", "0.27"), 0.02, -0.18, 166.04),
    (("7.54e-2", "0.30", "2.92e-1", "0.30", "0.25"), 0.01, -0.00, 95.60),
    (("1.53e-1", "0.19", "3.76e-1", "0.17", "0.35"), 0.01, -0.05, 112.79),
    (("7.15e-2", "0.29", "3.00e-1", "0.23", "0.31"), 0.01, -0.10, 191.87),  # the average
]


def _half_unit(printed: str) -> float:
    """Half a unit in the last printed digit: the rounding interval of a published constant."""
    mantissa, _, exponent = printed.partition("e")
    decimals = len(mantissa.split(".")[1])
    return 0.5 * 10.0 ** (-decimals) * 10.0 ** int(exponent or 0)


def _rounding_box(printed: tuple[str, ...]):
    """Every law whose constants lie at a corner or the centre of the published constants' rounding box."""
    centre = [float(p) for p in printed]
    halves = [_half_unit(p) for p in printed]
    for signs in itertools.product((-1, 0, 1), repeat=4):  # L0 does not enter the split
        c_n, alpha, c_d, beta = (c + s * h for c, s, h in zip(centre, signs, halves))
        yield ScalingLaw(c_n, alpha, c_d, beta, centre[4])


def test_paper_average_gives_about_192_tokens_per_param_at_1e21_flops():
    optimum = PAPER_AVERAGE.compute_optimal(1e21)
    # docs/recipe.md §6: the rounded constants give ≈ 184; the printed 191.87 is within their rounding.
    assert optimum.tokens_per_param == pytest.approx(183.9, abs=0.1)
    ratios = [law.compute_optimal(1e21).tokens_per_param for law in _rounding_box(PAPER_PANELS[-1][0])]
    assert min(ratios) < 191.87 < max(ratios)
    assert optimum.n_params * optimum.tokens * 6 == pytest.approx(1e21, rel=1e-12)


@pytest.mark.parametrize("printed, k_squared, eta, ratio", PAPER_PANELS)
def test_every_published_panel_is_reproduced_within_the_rounding_of_its_constants(printed, k_squared, eta, ratio):
    laws = list(_rounding_box(printed))
    ratios = [law.compute_optimal(1e21).tokens_per_param for law in laws]
    etas = [law.eta for law in laws]
    k2s = [law.k_squared for law in laws]
    assert min(ratios) <= ratio <= max(ratios)
    assert min(etas) - 0.005 <= eta <= max(etas) + 0.005  # K² and η are printed with 2 decimals
    assert min(k2s) - 0.005 <= k_squared <= max(k2s) + 0.005
    # The spread comes from rounding alone: the central law is within 10% of the printed ratio.
    assert laws[len(laws) // 2].compute_optimal(1e21).tokens_per_param == pytest.approx(ratio, rel=0.1)


@pytest.mark.parametrize("flops", [1e18, 1e21, 1e24])
def test_closed_form_split_is_the_minimum_along_the_compute_budget(flops):
    law = ScalingLaw(0.05, 0.35, 0.39, 0.18, 0.40)
    optimum = law.compute_optimal(flops)
    # Independent check: minimise L(N, C/(6N)) over log N numerically.
    result = minimize_scalar(lambda log_n: float(law.loss(math.exp(log_n), flops / 6 / math.exp(log_n))),
                             bounds=(math.log(1e3), math.log(1e15)), method="bounded",
                             options={"xatol": 1e-10})
    assert math.exp(result.x) == pytest.approx(optimum.n_params, rel=1e-4)
    assert optimum.loss == pytest.approx(result.fun, rel=1e-9)


def test_compute_optimal_rejects_non_positive_compute():
    with pytest.raises(ValueError, match="positive number of FLOPs"):
        PAPER_AVERAGE.compute_optimal(0)


def test_fit_recovers_known_constants_from_noisy_synthetic_losses():
    truth = ScalingLaw(c_n=0.08, alpha=0.3, c_d=0.25, beta=0.25, l0=0.35)
    rng = np.random.default_rng(0)
    sizes = np.array([0.03, 0.1, 0.25, 0.5, 0.85, 2.0]) * 1e9
    n, d = [], []
    for size in sizes:  # the paper's design: decays at 10N ... 60N tokens per size
        for multiple in (10, 20, 30, 40, 50, 60):
            n.append(size)
            d.append(multiple * size)
    n, d = np.array(n), np.array(d)
    losses = truth.loss(n, d) * (1 + 1e-4 * rng.standard_normal(len(n)))
    fit = fit_scaling_law(n, d, losses)
    for name in ("c_n", "alpha", "c_d", "beta", "l0"):
        true_value, fitted, err = getattr(truth, name), getattr(fit.law, name), fit.stderr[name]
        assert fitted == pytest.approx(true_value, rel=0.1), name
        assert abs(fitted - true_value) < 5 * err + 1e-6, name  # the uncertainties are honest
    assert fit.law.compute_optimal(1e21).tokens_per_param == pytest.approx(
        truth.compute_optimal(1e21).tokens_per_param, rel=0.15)


def test_fit_refuses_too_few_points():
    with pytest.raises(ValueError, match=">= 6 points"):
        fit_scaling_law([1e6, 2e6, 4e6], [1e7, 1e7, 1e7], [3.0, 2.9, 2.8])


def test_envelope_fit_prefers_the_form_that_generated_the_data():
    flops = np.geomspace(1e15, 1e17, 8)
    power = 0.8 * (flops / 1e18) ** -0.3 + 1.2
    fits = fit_envelopes(flops, power)
    assert fits["power"].rms_residual < 1e-6 < fits["exponential"].rms_residual
    assert fits["power"].a == pytest.approx(0.3, rel=1e-3)
    assert fits["power"].b == pytest.approx(0.8, rel=1e-3)
    assert fits["power"].loss(flops) == pytest.approx(power, rel=1e-6)
    exponential = 1.5 * np.exp(-20.0 * flops / 1e18) + 1.0
    fits = fit_envelopes(flops, exponential)
    assert fits["exponential"].rms_residual < 1e-6 < fits["power"].rms_residual
    assert fits["exponential"].b == pytest.approx(20.0, rel=1e-3)
