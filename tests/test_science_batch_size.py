"""The batch-size-law fit recovers a known law from synthetic loss curves built around it."""

import numpy as np
import pytest

from minicpm_jax.science.batch_size_law import (
    PAPER_LAW,
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
    curves = _synthetic_curves(PAPER_LAW, np.geomspace(1e5, 1e7, 7))
    fit = fit_batch_size_law(curves, levels=[2.6, 2.8, 3.0, 3.2, 3.5, 3.8])
    assert fit.law.b == pytest.approx(6.24, rel=0.01)
    assert fit.law.a == pytest.approx(1.21e9, rel=0.05)
    assert fit.law.batch_size(2.5) == pytest.approx(PAPER_LAW.batch_size(2.5), rel=0.02)  # ≈ 4M tokens
    assert len(fit.levels) == 6


def test_levels_whose_optimum_lies_outside_the_swept_batch_sizes_are_skipped():
    curves = _synthetic_curves(PAPER_LAW, np.geomspace(1e5, 1e6, 5))  # optimum > 1e6 below L ≈ 3.1
    fit = fit_batch_size_law(curves, levels=[2.6, 3.3, 3.5, 3.8])
    assert 2.6 not in fit.levels and len(fit.levels) == 3


def test_too_few_usable_levels_is_an_error():
    curves = _synthetic_curves(PAPER_LAW, np.geomspace(1e5, 1e6, 5))
    with pytest.raises(ValueError, match="inside the swept range"):
        fit_batch_size_law(curves, levels=[2.4, 2.6])


def test_tokens_to_reach_interpolates_the_first_crossing_of_the_running_minimum():
    tokens, losses = [0, 10, 20, 30], [5.0, 3.0, 3.5, 1.0]
    assert tokens_to_reach(tokens, losses, 4.0) == pytest.approx(5.0)
    assert tokens_to_reach(tokens, losses, 2.0) == pytest.approx(20 + 10 * (3.0 - 2.0) / (3.0 - 1.0))
    assert tokens_to_reach(tokens, losses, 0.5) is None


def test_a_parabola_without_interior_minimum_gives_no_optimum():
    assert optimal_batch_size([(1, 10), (2, 8), (4, 6)]) is None
    assert optimal_batch_size([(1, 10), (2, 5), (4, 10)]) == pytest.approx(2.0)
