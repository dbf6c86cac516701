"""Decay-dynamics statistics: exact on a known optimizer, and logged by a real run without changing its training."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from minicpm_jax.optim.update_stats import read_stats, with_update_stats
from minicpm_jax.train import loop as train_lib

from train_helpers import read_metrics, tiny_run_config, write_token_folder


def test_statistics_match_their_definitions_under_plain_sgd():
    lr = 0.1
    tx = with_update_stats(optax.sgd(lr))
    params = {"w": jnp.array([1.0, -2.0]), "b": jnp.array([[0.5]])}
    state = tx.init(params)
    grads = [{"w": jnp.array([1.0, 2.0]), "b": jnp.array([[2.0]])},
             {"w": jnp.array([-1.0, 3.0]), "b": jnp.array([[0.0]])}]
    updates, state = tx.update(grads[0], state, params)
    first = read_stats(state)
    assert first["grad_cosine"] == 0.0 and first["directional_d1"] == 0.0  # nothing before the first step
    assert first["update_norm"] == pytest.approx(lr * 3.0)
    _, state = tx.update(grads[1], state, params)
    stats = read_stats(state)

    g0, g1 = np.array([1.0, 2.0, 2.0]), np.array([-1.0, 3.0, 0.0])  # flattened w then b
    v0 = -lr * g0  # x1 - x0 under SGD
    d1 = g1 @ v0 / np.linalg.norm(v0)
    d2 = (g1 - g0) @ v0 / (v0 @ v0)
    assert stats["grad_cosine"] == pytest.approx(g1 @ g0 / np.linalg.norm(g1) / np.linalg.norm(g0))
    assert stats["directional_d1"] == pytest.approx(d1)
    assert stats["directional_d2"] == pytest.approx(d2)
    assert stats["curvature"] == pytest.approx(abs(d2) / (1 + d1 ** 2) ** 1.5)
    assert stats["update_norm"] == pytest.approx(lr * np.linalg.norm(g1))
    assert stats["update_max_abs"] == pytest.approx(lr * 3.0)
    np.testing.assert_allclose(updates["w"], -lr * grads[0]["w"])  # the wrapper leaves updates alone


@pytest.mark.slow
def test_a_run_logs_the_statistics_per_step_and_trains_identically(tmp_path):
    corpus = write_token_folder(tmp_path / "tokens", seed=0)
    losses = {}
    for flag in (False, True):
        workdir = tmp_path / f"stats_{flag}"
        cfg = tiny_run_config(corpus, train__log_update_stats=flag, checkpoint__every_steps=12,
                              checkpoint__async_save=False)
        train_lib.train(train_lib.prepare_workdir(str(workdir), cfg), str(workdir))
        records = [r for r in read_metrics(workdir) if "loss" in r]
        losses[flag] = [r["loss"] for r in records]
    assert losses[True] == losses[False]
    assert [r["step"] for r in records] == list(range(1, 13))
    assert records[0]["grad_cosine"] == 0.0
    assert all(-1.0 <= r["grad_cosine"] <= 1.0 and r["update_norm"] > 0 for r in records[1:])
    # The update size follows the learning rate: it shrinks through the decay (steps 9-12 of 12 in the config).
    assert records[-1]["update_max_abs"] < records[3]["update_max_abs"]
