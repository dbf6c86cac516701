"""Decay-dynamics statistics: exact on a known quadratic, and logged by a real run on its fixed probe batch
without changing its training."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minicpm_jax.config import ConfigError
from minicpm_jax.optim.update_stats import STATS, probe_statistics, read_stats, tensor_names
from minicpm_jax.train import loop as train_lib

from train_helpers import read_metrics, tiny_run_config, write_token_folder

# L(x) = ½ xᵀAx − cᵀx over x = (w₀, w₁, b₀), with the parameters split into two tensors w [2] and b [1, 1].
A = np.array([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 4.0]])
C = np.array([1.0, -1.0, 0.5])


def _quadratic_grad_fn(params):
    def loss(p):
        x = jnp.concatenate([p["w"], p["b"].ravel()])
        return 0.5 * x @ jnp.asarray(A) @ x - jnp.asarray(C) @ x

    return jax.value_and_grad(loss)(params)


def test_statistics_on_a_quadratic_match_the_hand_computed_values():
    before = {"w": jnp.array([1.0, -2.0]), "b": jnp.array([[0.5]])}
    after = {"w": jnp.array([0.7, -1.6]), "b": jnp.array([[0.4]])}
    stats = read_stats(jax.jit(lambda a, b: probe_statistics(_quadratic_grad_fn, a, b))(before, after))

    x0, x1 = np.array([1.0, -2.0, 0.5]), np.array([0.7, -1.6, 0.4])
    g0, g1, v = A @ x0 - C, A @ x1 - C, x1 - x0
    d1 = g1 @ v / np.linalg.norm(v)
    d2 = (g1 - g0) @ v / (v @ v)
    assert d2 == pytest.approx(v @ A @ v / (v @ v))  # on a quadratic D₂ is exactly the curvature vᵀAv/‖v‖²
    assert stats["dyn/d1"] == pytest.approx(d1, rel=1e-5)
    assert stats["dyn/d2"] == pytest.approx(d2, rel=1e-5)
    assert stats["dyn/curvature"] == pytest.approx(abs(d2) / (1 + d1 ** 2) ** 1.5, rel=1e-5)
    assert stats["dyn/grad_norm"] == pytest.approx(np.linalg.norm(g1), rel=1e-5)
    assert stats["dyn/grad_cosine"] == pytest.approx(g1 @ g0 / np.linalg.norm(g1) / np.linalg.norm(g0), rel=1e-5)
    assert stats["dyn/update_norm"] == pytest.approx(np.linalg.norm(v), rel=1e-5)
    assert stats["dyn/update_max_abs"] == pytest.approx(0.4, rel=1e-5)
    loss = lambda x: 0.5 * x @ A @ x - C @ x
    assert stats["dyn/loss"] == pytest.approx(loss(x1), rel=1e-5)
    # Exact second-order identity on a quadratic: L(x₁) − L(x₀) = ‖v‖·D₁ − ½‖v‖²·D₂.
    assert stats["dyn/loss_change"] == pytest.approx(loss(x1) - loss(x0), rel=1e-4)
    assert stats["dyn/loss_change"] == pytest.approx(np.linalg.norm(v) * d1 - 0.5 * (v @ v) * d2, rel=1e-4)

    # Per tensor: each tensor's own slice of g and v (w = coordinates 0, 1; b = coordinate 2).
    for name, idx in (("w", [0, 1]), ("b", [2])):
        gi0, gi1, vi = g0[idx], g1[idx], v[idx]
        assert stats[f"dyn/d1/{name}"] == pytest.approx(gi1 @ vi / np.linalg.norm(vi), rel=1e-5)
        assert stats[f"dyn/d2/{name}"] == pytest.approx((gi1 - gi0) @ vi / (vi @ vi), rel=1e-5)
        assert stats[f"dyn/update_max_abs/{name}"] == pytest.approx(np.abs(vi).max(), rel=1e-5)
        assert stats[f"dyn/grad_norm/{name}"] == pytest.approx(np.linalg.norm(gi1), rel=1e-5)
    assert {k for k in stats if k.count("/") == 2} == {f"dyn/{s}/{n}" for s in STATS for n in ("w", "b")}


def test_a_tensor_that_did_not_move_has_zero_directional_statistics():
    same = {"w": jnp.array([1.0, -2.0]), "b": jnp.array([[0.5]])}
    moved = {"w": jnp.array([0.0, -2.0]), "b": jnp.array([[0.5]])}
    stats = read_stats(probe_statistics(_quadratic_grad_fn, same, moved))
    assert stats["dyn/d1/b"] == stats["dyn/d2/b"] == stats["dyn/update_norm/b"] == 0.0
    assert np.isfinite(stats["dyn/curvature"]) and stats["dyn/update_norm/w"] == pytest.approx(1.0)


def test_tensor_names_are_dotted_paths():
    assert tensor_names({"layers": {"attn": {"q": jnp.zeros(1)}}, "embed": jnp.zeros(1)}) == ["embed", "layers.attn.q"]


@pytest.mark.slow
def test_a_run_logs_the_statistics_on_its_fixed_held_out_probe_and_trains_identically(tmp_path, monkeypatch):
    corpus = write_token_folder(tmp_path / "tokens", seed=0)
    held_out = write_token_folder(tmp_path / "val", seed=1, num_docs=40)
    losses = {}
    probe_stats = train_lib._probe_stats
    for flag in (False, True):
        # Off means off: no probe is read and no statistic is computed.
        monkeypatch.setattr(train_lib, "_probe_stats", probe_stats if flag else pytest.fail)
        workdir = tmp_path / f"stats_{flag}"
        # Evaluate on exactly the probe's rows (1 batch of 2 rows, not the 4 of a training batch) at every step:
        # eval_loss must equal the probe loss.
        cfg = tiny_run_config(corpus, train__log_update_stats=flag, checkpoint__every_steps=12,
                              checkpoint__async_save=False, data__val_dir=str(held_out), train__eval_every_steps=1,
                              train__eval_batches=1, train__eval_batch_size=2, train__log_every_steps=2)
        train_lib.train(train_lib.prepare_workdir(str(workdir), cfg), str(workdir))
        records = read_metrics(workdir)
        losses[flag] = [r["loss"] for r in records if "loss" in r]
    assert losses[True] == losses[False]  # the statistics never touch training
    logged = [r for r in records if "loss" in r]
    assert [r["step"] for r in logged] == list(range(2, 13, 2))
    evals = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
    for r in logged:
        # The probe is the held-out set's first batch at every logged step: the same tokens each time.
        assert r["dyn/loss"] == pytest.approx(evals[r["step"]], rel=1e-5)
        assert -1.0 <= r["dyn/grad_cosine"] <= 1.0 and r["dyn/update_norm"] > 0
        per_tensor = {k.split("/", 2)[2] for k in r if k.startswith("dyn/curvature/")}
        assert {"embed_tokens", "layers.self_attn.q_proj", "layers.mlp.gate_proj", "norm.weight"} <= per_tensor
        assert len(per_tensor) == 11  # embedding, final norm, and the 9 stacked tensors of a block
    # The update size follows the learning rate: it shrinks through the decay (steps 9-12 of 12 in the config).
    assert logged[-1]["dyn/update_max_abs"] < logged[1]["dyn/update_max_abs"]


def test_update_stats_without_held_out_data_is_a_config_error(tmp_path):
    corpus = write_token_folder(tmp_path / "tokens", seed=0)
    cfg = tiny_run_config(corpus, train__log_update_stats=True, checkpoint__async_save=False)
    with pytest.raises(ConfigError, match="train.log_update_stats=True needs data.val_dir"):
        train_lib.train(train_lib.prepare_workdir(str(tmp_path / "run"), cfg), str(tmp_path / "run"))
