"""The scaling-law math against the paper's published constants and Chinchilla's, an independent minimisation,
synthetic fits, their bootstrap intervals and the ill-conditioning warnings."""

import itertools
import math

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from minicpm_jax.science.plots import compute_optimal_line
from minicpm_jax.science.scaling import (
    CHINCHILLA_APPROACH3,
    CHINCHILLA_COMPUTE,
    CHINCHILLA_REFIT,
    COMPUTE_GRID,
    PAPER_AVERAGE,
    ScalingLaw,
    bootstrap_scaling_law,
    diagnose,
    fit_envelopes,
    fit_scaling_law,
    tokens_per_param_table,
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


# ------------------------------------------------------------------------- D/N vs compute, Chinchilla side by side

def test_tokens_per_param_grows_with_compute_as_c_to_minus_eta():
    """The paper's average law: D/N ∝ C^−η with η = −0.115, i.e. 83 at 1e18 FLOPs, 184 at 1e21, 240 at 1e22."""
    ratios = PAPER_AVERAGE.tokens_per_param(np.array(COMPUTE_GRID))
    assert ratios[[0, 3, 4]] == pytest.approx([82.9, 183.9, 239.9], abs=0.1)
    assert np.diff(np.log(ratios)) == pytest.approx(np.full(6, -PAPER_AVERAGE.eta * math.log(10)), rel=1e-9)
    for row in tokens_per_param_table(PAPER_AVERAGE):
        assert row["tokens_per_param"] == pytest.approx(PAPER_AVERAGE.compute_optimal(row["flops"]).tokens_per_param)
        assert 6 * row["n_params"] * row["tokens"] == pytest.approx(row["flops"], rel=1e-12)
        assert "tokens_per_param_interval" not in row  # no bootstrap, no interval


def test_chinchilla_constants_convert_to_the_same_law_at_raw_counts():
    n, d = np.array([1e8, 7e10]), np.array([2e9, 1.4e12])
    assert CHINCHILLA_APPROACH3.loss(n, d) == pytest.approx(1.69 + 406.4 / n ** 0.34 + 410.7 / d ** 0.28, rel=1e-12)


def test_chinchilla_refit_gives_about_20_tokens_per_param_at_chinchillas_compute():
    """The approach-3 law re-fitted by Besiroglu et al. 2024, through our formula: the Chinchilla model's 70B on
    1.4T tokens (20 tokens/param) at its 5.76e23 FLOPs."""
    optimum = CHINCHILLA_REFIT.compute_optimal(CHINCHILLA_COMPUTE)
    assert optimum.tokens_per_param == pytest.approx(20, rel=0.1)
    assert optimum.n_params == pytest.approx(70e9, rel=0.05)


def test_chinchilla_approach3_as_printed_does_not_give_20_tokens_per_param():
    """Hoffmann et al.'s printed approach-3 constants give ≈ 93 tokens/param (32B params) at Chinchilla's compute;
    the rounding of α and β alone spans 44-195 there, and 20 is outside it (Besiroglu et al. 2024 trace this to the
    rounding and to an unconverged fit). The 20 of the Chinchilla model come from the paper's approaches 1 and 2."""
    optimum = CHINCHILLA_APPROACH3.compute_optimal(CHINCHILLA_COMPUTE)
    assert optimum.tokens_per_param == pytest.approx(92.6, abs=0.1)
    assert optimum.n_params == pytest.approx(32.2e9, rel=0.01)
    box = [ScalingLaw.from_raw(1.69, 406.4, alpha, 410.7, beta).tokens_per_param(CHINCHILLA_COMPUTE)
           for alpha in (0.335, 0.34, 0.345) for beta in (0.275, 0.28, 0.285)]
    assert min(box) == pytest.approx(43.8, abs=0.5) and max(box) == pytest.approx(195, abs=1)
    assert min(box) > 2 * 20


def test_minicpm_needs_about_nine_times_chinchillas_tokens_per_param():
    """The paper's "192 vs 20", shown rather than asserted: both laws through one formula at the same compute."""
    at_1e21 = PAPER_AVERAGE.tokens_per_param(1e21), CHINCHILLA_REFIT.tokens_per_param(1e21)
    assert at_1e21 == pytest.approx((183.9, 21.6), abs=0.1)
    ratios = PAPER_AVERAGE.tokens_per_param(np.array(COMPUTE_GRID)) / CHINCHILLA_REFIT.tokens_per_param(
        np.array(COMPUTE_GRID))
    assert np.all(ratios > 3) and np.all(np.diff(ratios) > 0)  # and the gap widens with compute (η < 0 vs η > 0)


# ------------------------------------------------------------------------------------------ uncertainty

PAPER_SIZES = np.array([0.031, 0.11, 0.25, 0.49, 0.85, 2.0]) * 1e9  # the paper's six sizes (docs/recipe.md §6)


def _paper_design(sizes=PAPER_SIZES, multiples=(10, 20, 30, 40, 50, 60)):
    """Every size decayed at 10N ... 60N tokens, as in the paper."""
    n = np.repeat(np.asarray(sizes, dtype=float), len(multiples))
    return n, n * np.tile(np.asarray(multiples, dtype=float), len(sizes))


def test_bootstrap_intervals_cover_the_true_law_at_the_papers_design():
    """Noise of 0.003 nats/byte at the paper's design: the fitted D/N is off by up to 2x, and the 90% intervals of
    D/N and of each constant contain the truth in most of 8 independent data sets.

    The percentile bootstrap of 36 points and 5 constants covers a little less than it claims: over 40 data sets
    with 200 refits each, the 90% intervals covered the truth 82-90% of the time (85% for D/N); here 5-7 of 8."""
    n, d = _paper_design()
    truth_ratio = PAPER_AVERAGE.tokens_per_param(1e21)
    names = ("c_n", "alpha", "c_d", "beta", "l0")
    covered = dict.fromkeys(("tokens_per_param", *names), 0)
    widths = []
    for seed in range(8):
        losses = PAPER_AVERAGE.loss(n, d) + 0.003 * np.random.default_rng(seed).standard_normal(len(n))
        fit = fit_scaling_law(n, d, losses)
        boot = bootstrap_scaling_law(n, d, losses, fit, num_samples=100, seed=seed)
        assert boot.failed == 0
        lo, hi = boot.tokens_per_param_interval(1e21)
        assert lo <= fit.law.tokens_per_param(1e21) <= hi
        covered["tokens_per_param"] += lo <= truth_ratio <= hi
        for name in names:
            c_lo, c_hi = boot.constant_interval(name)
            covered[name] += c_lo <= getattr(PAPER_AVERAGE, name) <= c_hi
        widths.append(hi / lo)
    assert covered["tokens_per_param"] >= 6 and min(covered.values()) >= 5, covered
    assert 2 < np.median(widths) < 20  # this noise leaves D/N uncertain by a factor of several


def test_bootstrap_is_seeded_and_narrows_with_less_noise():
    n, d = _paper_design()
    noise = np.random.default_rng(0).standard_normal(len(n))
    loud, quiet = (PAPER_AVERAGE.loss(n, d) + scale * noise for scale in (3e-3, 3e-4))
    first, again, other = (bootstrap_scaling_law(n, d, loud, num_samples=40, seed=s) for s in (1, 1, 2))
    assert first.tokens_per_param_interval(1e21) == again.tokens_per_param_interval(1e21)
    assert first.tokens_per_param_interval(1e21) != other.tokens_per_param_interval(1e21)
    narrow = bootstrap_scaling_law(n, d, quiet, num_samples=40, seed=1, method="residuals")
    lo, hi = narrow.tokens_per_param_interval(1e21)
    wide_lo, wide_hi = first.tokens_per_param_interval(1e21)
    assert hi / lo < (wide_hi / wide_lo) ** 0.5
    rows = tokens_per_param_table(fit_scaling_law(n, d, quiet).law, bootstrap=narrow)
    assert [row["flops"] for row in rows] == list(COMPUTE_GRID)
    assert all(r["tokens_per_param_interval"][0] <= r["tokens_per_param"] <= r["tokens_per_param_interval"][1]
               for r in rows)


def test_bootstrap_rejects_an_unknown_method():
    n, d = _paper_design()
    with pytest.raises(ValueError, match="'points' or 'residuals'"):
        bootstrap_scaling_law(n, d, PAPER_AVERAGE.loss(n, d), method="jackknife")


def test_a_good_design_fits_without_warnings():
    n, d = _paper_design()
    losses = PAPER_AVERAGE.loss(n, d) + 1e-4 * np.random.default_rng(0).standard_normal(len(n))
    fit = fit_scaling_law(n, d, losses)
    assert fit.jacobian_condition < 1e3
    assert diagnose(fit, bootstrap_scaling_law(n, d, losses, fit, num_samples=60)) == []


def test_ill_conditioned_fit_is_flagged():
    """Three sizes within 20% of each other: the N term is not identified (the old evidence run's failure)."""
    n, d = _paper_design([0.5e9, 0.55e9, 0.6e9], (10, 20, 40, 60))
    losses = PAPER_AVERAGE.loss(n, d) + 1e-3 * np.random.default_rng(0).standard_normal(len(n))
    fit = fit_scaling_law(n, d, losses)
    warnings = diagnose(fit, bootstrap_scaling_law(n, d, losses, fit, num_samples=60))
    assert fit.jacobian_condition > 1e4
    assert any("alpha" in w and "standard error exceeds" in w for w in warnings)
    assert any("near-singular Jacobian" in w for w in warnings)
    assert any("bootstrap interval" in w for w in warnings)


def test_compute_optimal_line_stays_inside_the_chart():
    n_range, d_range = (2e4, 8e5), (1e5, 4e6)
    law = ScalingLaw(c_n=1e-3, alpha=0.3, c_d=2e-3, beta=0.3, l0=1.0)  # D/N = 10 at every compute
    good = compute_optimal_line(law, n_range, d_range)
    assert len(good) > 10
    assert all(n_range[0] <= n <= n_range[1] and d_range[0] <= d <= d_range[1] for n, d in good)
    # α ≈ 0 (the old evidence fit): the optimum is "all parameters", decades off the chart: nothing is drawn
    assert compute_optimal_line(ScalingLaw(c_n=1.12, alpha=0.029, c_d=7.8e-3, beta=0.46, l0=0.0),
                                n_range, d_range) == []
