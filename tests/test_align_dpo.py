"""DPO: the loss against hand computations, a frozen reference, a rising margin, exact resume mid-DPO."""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from minicpm_jax.align import dpo as dpo_lib
from minicpm_jax.config import ConfigError, DPOConfig
from minicpm_jax.data.chat import encode_chat_prompt, encode_preference
from minicpm_jax.data.tokenizer import Tokenizer
from minicpm_jax.run import checkpoint
from minicpm_jax.run.plan import plan_run
from minicpm_jax.train import loop as train_lib
from minicpm_jax.train.step import Task

from align_helpers import (
    align_config,
    copy_interrupted_at,
    make_source_run,
    write_jsonl,
)
from data_helpers import train_small_tokenizer
from train_helpers import assert_same_run, losses_by_step, read_metrics

# Fixed summed log-probs of three pairs: policy chosen, policy rejected, reference chosen, reference rejected.
LOGPS = ([-10.0, -4.0, -7.5], [-12.0, -3.0, -7.0], [-11.0, -3.5, -7.5], [-11.5, -3.2, -6.0])


def _hand_losses(beta: float, loss: str, eps: float) -> list[float]:
    log_sigmoid = lambda x: -math.log1p(math.exp(-x))
    out = []
    for pc, pr, rc, rr in zip(*LOGPS):
        h = beta * ((pc - rc) - (pr - rr))
        out.append((h / beta - 1 / (2 * beta)) ** 2 if loss == "ipo" else
                   -(1 - eps) * log_sigmoid(h) - eps * log_sigmoid(-h))
    return out


@pytest.mark.parametrize("beta, loss, eps", [(0.1, "sigmoid", 0.0), (0.5, "sigmoid", 0.2), (0.3, "ipo", 0.0)])
def test_preference_loss_matches_hand_computation(beta, loss, eps):
    cfg = DPOConfig(beta=beta, loss=loss, label_smoothing=eps)
    total, stats = dpo_lib.preference_loss(*(jnp.asarray(x) for x in LOGPS), cfg)
    np.testing.assert_allclose(float(total), sum(_hand_losses(beta, loss, eps)), rtol=1e-6)
    chosen = [beta * (pc - rc) for pc, rc in zip(LOGPS[0], LOGPS[2])]
    rejected = [beta * (pr - rr) for pr, rr in zip(LOGPS[1], LOGPS[3])]
    np.testing.assert_allclose(float(stats["rewards_chosen"]), sum(chosen), rtol=1e-6)
    np.testing.assert_allclose(float(stats["reward_margin"]), sum(chosen) - sum(rejected), rtol=1e-6)
    assert float(stats["reward_accuracy"]) == sum(c > r for c, r in zip(chosen, rejected)) and stats["count"] == 3


def test_bad_dpo_settings_fail_with_the_key():
    with pytest.raises(ConfigError, match="dpo.label_smoothing applies to dpo.loss='sigmoid' only"):
        DPOConfig(loss="ipo", label_smoothing=0.1)
    with pytest.raises(ConfigError, match="dpo.reference='later' must be one of"):
        DPOConfig(reference="later")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny source run, its tokenizer and 12 pairs: the correct sum of two numbers against a wrong one."""
    root = tmp_path_factory.mktemp("dpo")
    tok_path = train_small_tokenizer(root)
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(12):
        a, b = (int(x) for x in rng.integers(1, 40, size=2))
        rows.append({"prompt": f"{a} plus {b}?", "chosen": f"the sum is {a + b}", "rejected": f"no idea {b}"})
    data = write_jsonl(root / "pairs.jsonl", rows)
    return make_source_run(root / "source"), str(tok_path), str(data)


def _dpo_config(**overrides):
    # A larger lr than the paper's 1e-5 so that a few steps move a random tiny model measurably.
    return align_config("dpo", dpo__epochs=2.0, schedule__peak_lr=1e-3, schedule__warmup_steps=0, **overrides)


def _policy_margins(workdir, source, pairs_dir, seq_len=64):
    """Mean implicit-reward margin (β = 1) and accuracy of the run's latest weights over all pairs."""
    pairs = dpo_lib.read_pairs(pairs_dir, seq_len)
    graphdef, params = nnx.split(checkpoint.restore_model(str(workdir))[0])
    _, reference = nnx.split(checkpoint.restore_model(str(source), 0)[0])
    margins = []
    for weights in (params, reference):
        chosen, rejected = (dpo_lib.sequence_logps(graphdef, weights, *(pairs[f"{side}_{part}"]
                            for part in ("tokens", "targets", "mask"))) for side in dpo_lib.SIDES)
        margins.append(np.asarray(chosen - rejected))
    margin = margins[0] - margins[1]
    return float(margin.mean()), float((margin > 0).mean())


@pytest.fixture(scope="module")
def straight(setup, tmp_path_factory):
    """A DPO run (cached reference) from the source, trained without interruption."""
    source, tok_path, data = setup
    workdir = tmp_path_factory.mktemp("straight") / "run"
    cfg = dpo_lib.run_dpo(str(source), None, str(workdir), _dpo_config(), [data], tok_path)
    return workdir, cfg


def test_dpo_raises_the_margin_and_resumes_exactly(setup, straight, tmp_path):
    source, tok_path, data = setup
    straight, cfg = straight
    assert cfg.train.steps == 6  # 2 epochs of 12 pairs in batches of 4
    assert cfg.model.parametrization == "standard"  # no μP lr split in DPO (docs/recipe.md §7.4)

    metrics = {m["step"]: m for m in read_metrics(straight)}
    # At step 1 the policy is the reference: every reward is 0 and the loss is log 2.
    np.testing.assert_allclose([metrics[1]["loss"], metrics[1]["reward_margin"]], [math.log(2), 0.0], atol=1e-6)
    assert metrics[6]["reward_margin"] > 0 and metrics[6]["loss"] < math.log(2)
    margin, accuracy = _policy_margins(straight, source, os.path.join(straight, "data"))
    assert margin > 0.5 and accuracy > 0.9

    resumed = copy_interrupted_at(straight, 4, tmp_path / "resumed")
    dpo_lib.run_dpo(str(source), None, str(resumed), _dpo_config(), [data], tok_path)
    assert_same_run(resumed, straight)


def test_reference_is_never_updated_and_both_reference_modes_agree(setup, straight, tmp_path):
    source, tok_path, data = setup
    cached_run, _ = straight
    online_cfg = dpo_lib.run_dpo(str(source), None, str(tmp_path / "online"), _dpo_config(dpo__reference="online"),
                                 [data], tok_path, train=False)
    task, frozen_seen = dpo_lib.dpo_task(online_cfg), []
    frozen = lambda plan, workdir: frozen_seen.append(task.frozen(plan, workdir)) or frozen_seen[-1]
    train_lib.train(online_cfg, str(tmp_path / "online"), Task(task.loss_fn, task.batch_keys, task.make_feed, frozen))
    # Computing reference log-probs every step gives the losses of computing them once up front.
    online, cached = losses_by_step(tmp_path / "online"), losses_by_step(cached_run)
    np.testing.assert_allclose([online[s] for s in sorted(online)], [cached[s] for s in sorted(cached)], rtol=1e-5)

    # The reference parameters the train step saw are the source's weights, untouched after training.
    source_params = nnx.to_pure_dict(nnx.state(checkpoint.restore_model(str(source), 0)[0], nnx.Param))
    (reference,) = frozen_seen[0]
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(reference))  # never donated
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(reference), source_params)
    trained = nnx.to_pure_dict(nnx.state(checkpoint.restore_model(str(tmp_path / "online"))[0], nnx.Param))
    assert not np.array_equal(trained["embed_tokens"], source_params["embed_tokens"])

    # The cached log-probs are the source model's, as computed before any step.
    plan = plan_run(checkpoint.read_run_config(str(cached_run)))
    pairs = dpo_lib.read_pairs(os.path.join(cached_run, "data"), 64)
    with np.load(cached_run / dpo_lib.CACHE_FILE) as cache:
        expected = dpo_lib.reference_logps(plan, source_params, pairs)
        for key in dpo_lib.REFERENCE_KEYS:
            np.testing.assert_allclose(cache[key], expected[key], rtol=1e-6)


def test_pair_masks_cover_the_response_only(setup, tmp_path):
    _, tok_path, _ = setup
    tok = Tokenizer(tok_path)
    prompt = [{"role": "user", "content": "1 plus 1?"}, {"role": "assistant", "content": "2"},
              {"role": "user", "content": "and 2 plus 2?"}]
    pair = encode_preference(tok, {"prompt": prompt, "chosen": "4", "rejected": "5 maybe"})
    prompt_ids = encode_chat_prompt(tok, prompt)
    for side, answer in ((pair.chosen, "4"), (pair.rejected, "5 maybe")):
        ids, mask = np.asarray(side.ids), np.asarray(side.loss_mask)
        assert tok.decode(ids[mask == 1][:-1]) == answer and ids[mask == 1][-1] == tok.eos_id
        # Everything before the response is the prompt, including the earlier answer (no loss there).
        assert tok.decode(ids[mask == 0]).replace("</s>", "") == tok.decode(prompt_ids)
