"""The batch-size-law fit recovers a known law from synthetic loss curves built around it, pooled over model
sizes as the paper does."""

import numpy as np
import pytest

from minicpm_jax.science.batch_size_law import (
    PAPER_LAW,
    default_levels,
    fit_batch_size_law,
    optimal_batch_size,
    tokens_to_reach,
)


def _synthetic_curves(law, batch_sizes, k=0.05, p=6.0, c=1e12):
    """Loss curves in which reaching loss L with batch bs takes T = c·L^−p·exp(k·(ln bs − ln bs_opt(L))²) tokens.

    So, at every level, the fewest tokens are needed at exactly bs_opt(L) = law.batch_size(L).
    """
    levels = np.linspace(2.3, 4.5, 3000)
    curves = {}
    for bs in batch_sizes:
        x = np.log(bs) - np.log(law.batch_size(levels))
        tokens = c * levels ** -p * np.exp(k * x ** 2)
        order = np.argsort(tokens)
        assert np.all(np.diff(levels[order]) < 0), "the synthetic curve must fall as tokens grow"
        curves[float(bs)] = (tokens[order], levels[order])
    return curves


def test_fit_recovers_the_papers_law_from_synthetic_curves():
    curves = {"one model": _synthetic_curves(PAPER_LAW, np.geomspace(1e5, 1e7, 7))}
    fit = fit_batch_size_law(curves, levels=[2.6, 2.8, 3.0, 3.2, 3.5, 3.8])
    assert fit.law.b == pytest.approx(6.24, rel=0.01)
    assert fit.law.a == pytest.approx(1.21e9, rel=0.05)
    assert fit.law.batch_size(2.5) == pytest.approx(PAPER_LAW.batch_size(2.5), rel=0.02)  # ≈ 4M tokens
    assert len(fit.points) == 6 and fit.pooled.stderr_b < 0.1


def test_optima_of_several_model_sizes_are_pooled_into_one_line():
    # Three sizes that each reach a different loss range (the larger, the lower), each swept over its own
    # batch sizes, as the paper's 0.009B / 0.03B / 0.17B; only the pooled points span the whole range.
    ranges = {"small": ([3.6, 3.9, 4.2], np.geomspace(1e4, 1e6, 6)), "medium": ([3.0, 3.3], np.geomspace(3e4, 3e6, 6)),
              "large": ([2.5, 2.7], np.geomspace(1e5, 1e7, 6))}
    curves = {model: _synthetic_curves(PAPER_LAW, sizes, c=1e12 * (1 + i)) for i, (model, (_, sizes))
              in enumerate(ranges.items())}
    fit = fit_batch_size_law(curves, levels={model: levels for model, (levels, _) in ranges.items()})
    assert sorted({p.model for p in fit.points}) == ["large", "medium", "small"]
    assert len(fit.points) == 7 and fit.pooled.num_points == 7
    assert fit.law.b == pytest.approx(6.24, rel=0.02) and fit.law.a == pytest.approx(1.21e9, rel=0.1)
    assert set(fit.per_model) == {"small", "medium", "large"}  # each size's own line, >= 2 optima each
    assert fit.per_model["small"].law.b == pytest.approx(6.24, rel=0.05)
    assert fit.per_model["medium"].stderr_b is None  # two points: a line without an error bar
    for point in fit.points:  # the vertex is the fewest tokens of its level
        assert point.tokens <= min(t for _, t in point.equal_loss_points) * 1.001


def test_levels_whose_optimum_lies_outside_the_swept_batch_sizes_are_skipped():
    curves = {"m": _synthetic_curves(PAPER_LAW, np.geomspace(1e5, 1e6, 5))}  # optimum > 1e6 below L ≈ 3.1
    fit = fit_batch_size_law(curves, levels=[2.6, 3.3, 3.5, 3.8])
    assert 2.6 not in [p.level for p in fit.points] and len(fit.points) == 3
    assert "outside the swept" in fit.skipped["m"][2.6]


def test_too_few_usable_levels_is_an_error_that_says_why():
    curves = {"m": _synthetic_curves(PAPER_LAW, np.geomspace(1e5, 1e6, 5))}
    with pytest.raises(ValueError, match=r"inside the swept range.*m at L=2\.4: vertex at batch size"):
        fit_batch_size_law(curves, levels=[2.4, 2.6])


def test_fewer_than_three_batch_sizes_for_a_model_is_an_error_naming_it():
    curves = {"tiny": _synthetic_curves(PAPER_LAW, [1e5, 1e6])}
    with pytest.raises(ValueError, match="model tiny: .* >= 3 batch sizes"):
        fit_batch_size_law(curves)


def test_default_levels_start_at_the_lowest_loss_three_curves_reach():
    curves = {64.0: ([1, 2, 3], [5.0, 4.5, 4.4]), 128.0: ([1, 2, 3], [5.0, 4.2, 4.0]),
              256.0: ([1, 2, 3], [5.0, 4.1, 3.9]), 512.0: ([1, 2, 3], [5.0, 4.3, 3.5])}
    levels = default_levels(curves, count=3)
    assert levels[0] == pytest.approx(4.0) and levels[-1] == pytest.approx(4.0 + 0.6 * 1.0)


def test_tokens_to_reach_interpolates_the_first_crossing_of_the_running_minimum():
    tokens, losses = [0, 10, 20, 30], [5.0, 3.0, 3.5, 1.0]
    assert tokens_to_reach(tokens, losses, 4.0) == pytest.approx(5.0)
    assert tokens_to_reach(tokens, losses, 2.0) == pytest.approx(20 + 10 * (3.0 - 2.0) / (3.0 - 1.0))
    assert tokens_to_reach(tokens, losses, 0.5) is None


def test_a_parabola_without_interior_minimum_gives_no_optimum():
    assert optimal_batch_size([(1, 10), (2, 8), (4, 6)]) is None
    assert optimal_batch_size([(1, 10), (2, 5), (4, 10)]) == pytest.approx(2.0)


def test_the_leave_one_run_out_spread_of_b_is_small_on_clean_curves_and_large_on_noisy_ones():
    sizes = np.geomspace(1e5, 1e7, 7)
    clean = fit_batch_size_law({"m": _synthetic_curves(PAPER_LAW, sizes)}, levels=[2.6, 2.8, 3.0, 3.2, 3.5])
    assert len(clean.jackknife_b) == 7 and clean.jackknife_stderr_b < 0.05
    rng = np.random.default_rng(0)
    noisy = {bs: (tokens * np.exp(rng.normal(0, 0.15)), losses)
             for bs, (tokens, losses) in _synthetic_curves(PAPER_LAW, sizes).items()}
    fit = fit_batch_size_law({"m": noisy}, levels=[2.6, 2.8, 3.0, 3.2, 3.5])
    assert fit.jackknife_stderr_b > 5 * clean.jackknife_stderr_b
