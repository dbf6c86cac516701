"""`branch --untie-head` (docs/recipe.md §9): the branch's head starts as the embedding, so logits do not move at
the branch point; the optimizer state carries over, the new head's moments are the embedding's, and the head's
first update is the one the tied tensor would have made."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from minicpm_jax import optim
from minicpm_jax.config import ConfigError, ModelConfig
from minicpm_jax.model import MiniCPM
from minicpm_jax.run import checkpoint
from minicpm_jax.run.branch import create_branch
from minicpm_jax.run.plan import plan_run
from minicpm_jax.run.untie_head import carry_over_opt_state, untie_params
from minicpm_jax.train import loop as train_lib

from train_helpers import read_metrics, tiny_run_config, write_token_folder


def _moments(opt_state, name):
    """The Adam first and second moments of parameter `name` (the state's `mu` and `nu` trees)."""
    found = {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state)
             if jax.tree_util.keystr(path).endswith(f"['{name}']")}
    return {key.split(".")[-1].split("[")[0]: value for key, value in found.items()}


def _random_like(tree, seed):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


@pytest.mark.parametrize("parametrization,embedding_in_2d_group", [("mup", False), ("mup", True), ("standard", False)])
def test_head_update_right_after_untie_is_the_tied_update(parametrization, embedding_in_2d_group):
    """The head's effective lr is continuous at the untie: same lr multiplier, weight decay and Adam moments
    as the embedding it was, so for the same gradient it moves exactly as the tied tensor would have."""
    tied_cfg = ModelConfig(vocab_size=64, hidden_size=128, intermediate_size=320, num_layers=2, num_heads=4,
                           num_kv_heads=2, dim_model_base=32, parametrization=parametrization,
                           embedding_in_2d_group=embedding_in_2d_group)
    untied_cfg = dataclasses.replace(tied_cfg, tie_word_embeddings=False)
    optim_cfg = {"weight_decay": 0.1, "weight_decay_on": "2d", "clip_grad_norm": None}  # clipping is global
    params = nnx.to_pure_dict(nnx.state(MiniCPM(tied_cfg, rngs=nnx.Rngs(0)), nnx.Param))
    tied_tx = optim.make_optimizer(optim_cfg, optax.constant_schedule(0.01), params, tied_cfg)
    state = tied_tx.init(params)
    for seed in range(3):  # a few steps, so that the moments are not trivial
        updates, state = tied_tx.update(_random_like(params, seed), state, params)
        params = optax.apply_updates(params, updates)

    grads = _random_like(params, 10)
    tied_updates, _ = tied_tx.update(grads, state, params)
    untied = untie_params(params)
    untied_tx = optim.make_optimizer(optim_cfg, optax.constant_schedule(0.01), untied, untied_cfg)
    untied_state = carry_over_opt_state(state, untied_tx.init(untied))
    # The same gradient for the head as the tied tensor received (all of it through the head, say).
    untied_updates, _ = untied_tx.update({**grads, "lm_head": grads["embed_tokens"].T}, untied_state, untied)
    np.testing.assert_allclose(untied_updates["lm_head"], tied_updates["embed_tokens"].T, rtol=1e-6, atol=1e-9)
    for key in params:  # everything else moves as before
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9),
                     untied_updates[key], tied_updates[key])


@pytest.mark.slow
def test_untied_branch_keeps_logits_and_optimizer_state(tmp_path):
    corpus = write_token_folder(tmp_path / "tokens", num_docs=60)
    source, branch = tmp_path / "stable", tmp_path / "untied"
    cfg = tiny_run_config(corpus, train__steps=8, schedule__warmup_steps=2, schedule__stable_steps=6,
                          schedule__decay_steps=0, checkpoint__keep_every_steps=4)
    assert cfg.model.tie_word_embeddings
    train_lib.train(train_lib.prepare_workdir(str(source), cfg), str(source))

    branch_cfg = create_branch(str(source), 8, str(branch), decay_steps=2, untie_head=True)
    assert branch_cfg.model.tie_word_embeddings is False

    tied_model, _ = checkpoint.restore_model(str(source), 8)
    untied_model, _ = checkpoint.restore_model(str(branch), 8)
    np.testing.assert_array_equal(untied_model.lm_head[...], tied_model.embed_tokens[...].T)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 32)), jnp.int32)
    np.testing.assert_array_equal(untied_model(tokens), tied_model(tokens))

    source_plan, branch_plan = plan_run(cfg), plan_run(branch_cfg)
    source_state = checkpoint.RunCheckpoints(str(source), async_save=False)
    branch_state = checkpoint.RunCheckpoints(str(branch), async_save=False)
    before = source_state.restore(8, source_plan.abstract_params, source_plan.abstract_opt_state).opt_state
    after = branch_state.restore(8, branch_plan.abstract_params, branch_plan.abstract_opt_state).opt_state
    source_state.close(), branch_state.close()
    head, embedding = _moments(after, "lm_head"), _moments(before, "embed_tokens")
    assert sorted(head) == ["mu", "nu"]
    for key, value in head.items():  # the head's moments start as the tied tensor's
        assert value.shape == (64, 128)
        np.testing.assert_array_equal(value, np.asarray(embedding[key]).T)
    for kept in ("embed_tokens", "count"):
        for key, value in _moments(before, kept).items():
            np.testing.assert_array_equal(_moments(after, kept)[key], value)
    assert np.any(np.asarray(_moments(before, "embed_tokens")["mu"]))

    train_lib.train(branch_cfg, str(branch))  # the untied run trains on: both tensors now move separately
    assert sorted(m["step"] for m in read_metrics(branch) if "loss" in m) == [9, 10]
    trained, _ = checkpoint.restore_model(str(branch), 10)
    assert not np.allclose(trained.lm_head[...], trained.embed_tokens[...].T)

    with pytest.raises(ConfigError, match="already untied"):
        create_branch(str(branch), 10, str(tmp_path / "again"), decay_steps=2, untie_head=True)
