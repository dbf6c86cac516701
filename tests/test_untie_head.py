"""`branch --untie-head` (docs/recipe.md §9): the branch's head starts as the embedding, so logits do not move at
the branch point; the optimizer state carries over and the new head's moments start at zero."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minicpm_jax.config import ConfigError
from minicpm_jax.run import checkpoint
from minicpm_jax.run.branch import create_branch
from minicpm_jax.run.plan import plan_run
from minicpm_jax.train import loop as train_lib

from train_helpers import read_metrics, tiny_run_config, write_token_folder


def _moments(opt_state, name):
    """The Adam first and second moments of parameter `name` (the state's `mu` and `nu` trees)."""
    found = {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state)
             if jax.tree_util.keystr(path).endswith(f"['{name}']")}
    return {key.split(".")[-1].split("[")[0]: value for key, value in found.items()}


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
    head = _moments(after, "lm_head")
    assert sorted(head) == ["mu", "nu"]
    for value in head.values():
        assert value.shape == (64, 128) and not np.any(np.asarray(value))
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
