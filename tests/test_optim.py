"""Schedules against closed forms written here from docs/recipe.md §5, and the μP AdamW as its updates reach
the params."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from minicpm_jax import config, optim
from minicpm_jax.config import ConfigError, ModelConfig
from minicpm_jax.model import MiniCPM
from minicpm_jax.model.parametrization import lr_multipliers

PEAK = 0.01


# ------------------------------------------------------------------------------------ reference formulas

def reference_wsd(s, peak, w, st, d, decay, r):
    """WSD written out case by case, in float64."""
    if s < w:
        return peak * s / w
    if s <= w + st or d == 0:
        return peak
    t = min((s - w - st) / d, 1.0)
    f = {"exp": r ** t, "linear": 1 - (1 - r) * t, "cosine": r + (1 - r) * (1 + math.cos(math.pi * t)) / 2,
         "1-sqrt": r + (1 - r) * (1 - math.sqrt(t))}[decay]
    return peak * f


def boundary_steps(w, st, d):
    end = w + st + d
    steps = {0, 1, max(w - 1, 0), w, w + 1, w + st, w + st + 1, w + st + d // 2, max(end - 1, 0), end, end + 1,
             end + 7, 3 * end + 11}
    return sorted(steps | set(range(0, end + 3, max(1, end // 37))))


@pytest.mark.parametrize("decay", config.DECAYS)
@pytest.mark.parametrize("w,st,d", [(10, 50, 40), (0, 30, 20), (7, 0, 13), (5, 20, 0), (0, 0, 1)])
def test_wsd_matches_closed_form(decay, w, st, d):
    r = 0.1
    sched = optim.wsd_schedule(PEAK, w, st, d, decay=decay, final_lr_ratio=r)
    steps = boundary_steps(w, st, d)
    expected = [reference_wsd(s, PEAK, w, st, d, decay, r) for s in steps]
    traced = jax.jit(jax.vmap(sched))(jnp.asarray(steps, jnp.int32))
    python = [float(sched(s)) for s in steps]
    np.testing.assert_allclose(np.asarray(traced), expected, rtol=1e-6)
    np.testing.assert_allclose(python, expected, rtol=1e-6)
    # The named boundaries: last warmup step, peak from W through W+S, peak·r from the end of the decay on.
    if w:
        np.testing.assert_allclose(float(sched(w - 1)), PEAK * (w - 1) / w, rtol=1e-6)
    assert float(sched(w)) == pytest.approx(PEAK, rel=1e-6) and float(sched(w + st)) == pytest.approx(PEAK, rel=1e-6)
    tail = PEAK * r if d else PEAK
    np.testing.assert_allclose([float(sched(w + st + d + k)) for k in (0, 1, 10**6)], tail, rtol=1e-6)


def test_exp_half_life_form():
    w, st, d, half = 10, 100, 300, 90
    r = optim.exp_ratio_from_half_life(d, half)
    assert r == pytest.approx(0.5 ** (d / half))
    sched = optim.make_schedule(dict(warmup_steps=w, stable_steps=st, decay_steps=d, decay="exp",
                                     decay_half_life_steps=half), total_steps=w + st + d)
    steps = np.arange(w + st, w + st + d + 1)
    np.testing.assert_allclose(np.asarray(jax.vmap(sched)(steps)), PEAK * 0.5 ** ((steps - w - st) / half), rtol=1e-6)
    np.testing.assert_allclose(float(sched(w + st + d + 50)), PEAK * r, rtol=1e-6)  # holds at η·r afterwards


def test_fraction_equals_steps():
    total = 1000
    by_fraction = dict(warmup_steps=0.1, stable_steps=0.7, decay_steps=0.2, decay="cosine")
    by_steps = dict(warmup_steps=100, stable_steps=700, decay_steps=200, decay="cosine")
    assert optim.resolve_phases(by_fraction, total) == optim.resolve_phases(by_steps, total) == (100, 700, 200)
    steps = jnp.arange(total + 5)
    a = jax.vmap(optim.make_schedule(by_fraction, total))(steps)
    b = jax.vmap(optim.make_schedule(by_steps, total))(steps)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert optim.resolve_phases(dict(warmup_steps=0.07, stable_steps=1, decay_steps=0.0), 100) == (7, 1, 0)
    # A ConfigDict float field overridden with an int holds a whole float: still steps. 1.0 is the whole run.
    assert optim.resolve_phases(dict(warmup_steps=100.0, stable_steps=0.5, decay_steps=2.0), 1000) == (100, 500, 2)
    assert optim.resolve_phases(dict(name="constant", warmup_steps=1.0, stable_steps=0, decay_steps=0),
                                1000) == (1000, 0, 0)


def test_fractions_summing_to_one_fill_every_run_length():
    """What lets `--config.train.steps=N` alone shorten a shipped config: the phases' ends are rounded, not their
    lengths, which at 30 steps would give 2 + 21 + 8 = 31 steps of 0.05 / 0.7 / 0.25."""
    fractions = dict(warmup_steps=0.05, stable_steps=0.7, decay_steps=0.25)
    assert optim.resolve_phases(fractions, 30) == (2, 20, 8)
    for total in range(1, 3000):
        warmup, stable, decay = optim.resolve_phases(fractions, total)
        assert warmup + stable + decay == total and min(warmup, stable, decay) >= 0, total
        assert abs(decay - 0.25 * total) <= 1, total


def test_decay_start():
    assert optim.decay_start(dict(warmup_steps=2, stable_steps=6, decay_steps=4), 12) == 8
    assert optim.decay_start(dict(warmup_steps=0.05, stable_steps=0.7, decay_steps=0.25), 240) == 180
    assert optim.decay_start(dict(warmup_steps=2, stable_steps=6, decay_steps=0), 12) is None  # open-ended stable phase
    assert optim.decay_start(dict(name="cosine", warmup_steps=2), 12) is None


def test_shorter_phases_hold_at_final_lr():
    sched = optim.make_schedule(dict(warmup_steps=10, stable_steps=10, decay_steps=10, decay="linear"), 100)
    np.testing.assert_allclose(np.asarray(jax.vmap(sched)(jnp.arange(30, 101))), PEAK * 0.1, rtol=1e-6)


@pytest.mark.parametrize("overrides,total,key", [
    (dict(warmup_steps=-1), 100, "schedule.warmup_steps=-1"),
    (dict(stable_steps=-5), 100, "schedule.stable_steps=-5"),
    (dict(decay_steps=1.5), 100, "schedule.decay_steps=1.5"),
    (dict(warmup_steps=-0.1), 100, "schedule.warmup_steps=-0.1"),
    (dict(warmup_steps=10, stable_steps=80, decay_steps=20), 100, "exceeds train.steps=100"),
    (dict(stable_steps=0.8, decay_steps=0.3), 100, "exceeds train.steps=100"),
    (dict(decay="step"), 100, "schedule.decay='step'"),
    (dict(name="noam"), 100, "schedule.name='noam'"),
    (dict(peak_lr=0.0), 100, "schedule.peak_lr=0.0"),
    (dict(final_lr_ratio=1.5), 100, "schedule.final_lr_ratio=1.5"),
    (dict(final_lr_ratio=0.0, decay="exp"), 100, "schedule.final_lr_ratio=0.0"),
    (dict(decay_half_life_steps=-1), 100, "schedule.decay_half_life_steps=-1"),
    (dict(decay_half_life_steps=50, decay="linear"), 100, "schedule.decay_half_life_steps=50"),
    (dict(warmup_stpes=10), 100, "schedule.warmup_stpes"),
    (dict(name="cosine", warmup_steps=100), 100, "schedule.warmup_steps=100"),
    (dict(name="constant", warmup_steps=200), 100, "schedule.warmup_steps=200"),
    (dict(), 0, "train.steps=0"),
])
def test_schedule_validation_names_key(overrides, total, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("(", r"\(").replace("+", r"\+")):
        optim.make_schedule(overrides, total)


def test_branch_schedule():
    w, b, d = 20, 500, 100
    branch = optim.wsd_branch_schedule(PEAK, w, b, d, decay="exp", final_lr_ratio=0.1)
    steps = jnp.arange(0, b + d + 50)
    expected = [reference_wsd(int(s), PEAK, w, b - w, d, "exp", 0.1) for s in steps]
    np.testing.assert_allclose(np.asarray(jax.vmap(branch)(steps)), expected, rtol=1e-6)
    assert float(branch(b)) == pytest.approx(PEAK) and float(branch(b + d)) == pytest.approx(0.1 * PEAK)
    with pytest.raises(ConfigError, match="branch_step=10"):
        optim.wsd_branch_schedule(PEAK, 20, 10, 100)


def test_cosine_baseline_and_constant():
    w, total = 10, 110
    sched = optim.make_schedule(dict(name="cosine", warmup_steps=w), total)
    steps = np.arange(0, 200)
    expected = np.where(steps < w, PEAK * steps / w,
                        PEAK * (0.1 + 0.45 * (1 + np.cos(np.pi * np.clip(steps - w, 0, total - w) / (total - w)))))
    np.testing.assert_allclose(np.asarray(jax.vmap(sched)(steps)), expected, rtol=1e-6)
    np.testing.assert_allclose([float(sched(s)) for s in (total, total + 1, 10 * total)], 0.1 * PEAK, rtol=1e-6)
    const = optim.make_schedule(dict(name="constant", warmup_steps=4), 100)
    np.testing.assert_allclose(np.asarray(jax.vmap(const)(jnp.arange(10))), PEAK * np.minimum(np.arange(10) / 4, 1),
                               rtol=1e-6)


def reference_cosine(s, peak, w, t, r=0.1):
    """Cosine(T) of docs/recipe.md §5.3, the paper's App. B.1 read as the half-cosine: warmup, then
    η·(r + (1−r)(1 + cos(π(s−W)/(T−W)))/2) until T, η·r after."""
    if s < w:
        return peak * s / w
    return peak * (r + (1 - r) * (1 + math.cos(math.pi * min(s - w, t - w) / (t - w))) / 2)


def reference_cosine_loop(s, peak, w, t, r=0.1):
    """CosineLoop(T): Cosine(T)'s curve restarted at η (no new warmup) every T − W steps after the warmup."""
    if s < w:
        return peak * s / w
    return reference_cosine(w + (s - w) % (t - w), peak, w, t, r)


@pytest.mark.parametrize("cosine_steps,horizon", [(0, 240), (240, 240), (300, 300), (1.25, 300), (0.5, 120),
                                                  (100, 100)])
def test_cosine_horizon_differs_from_run_length(cosine_steps, horizon):
    """Cosine(T) with T ≠ S (paper Fig. 4): with T > S the run ends above the floor, with T < S it holds at η·r."""
    w, total = 8, 240
    section = dict(name="cosine", warmup_steps=w, cosine_steps=cosine_steps)
    assert optim.cosine_horizon(section, total) == horizon
    sched = optim.make_schedule(section, total)
    steps = np.arange(0, 2 * total)
    expected = [reference_cosine(int(s), PEAK, w, horizon) for s in steps]
    np.testing.assert_allclose(np.asarray(jax.vmap(sched)(steps)), expected, rtol=1e-6)
    assert float(sched(horizon)) == pytest.approx(0.1 * PEAK, rel=1e-6)
    if horizon > total:  # the last update's lr is still well above the floor
        assert float(sched(total - 1)) > 0.15 * PEAK


@pytest.mark.parametrize("w,t", [(8, 124), (0, 50), (10, 11)])
def test_cosine_loop_matches_closed_form(w, t):
    total = w + 3 * (t - w)  # three whole cycles
    sched = optim.make_schedule(dict(name="cosine_loop", warmup_steps=w, cosine_steps=t), total)
    steps = np.arange(0, total + 5)
    expected = [reference_cosine_loop(int(s), PEAK, w, t) for s in steps]
    np.testing.assert_allclose(np.asarray(jax.jit(jax.vmap(sched))(steps)), expected, rtol=1e-5)
    # The first cycle is Cosine(T); each restart (s = W + kP) is back at the peak, the step before at the floor.
    first = optim.make_schedule(dict(name="cosine", warmup_steps=w, cosine_steps=t), total)
    np.testing.assert_allclose(np.asarray(jax.vmap(sched)(steps[:t])), np.asarray(jax.vmap(first)(steps[:t])),
                               rtol=1e-6)
    period = t - w
    for k in (1, 2, 3):
        assert float(sched(w + k * period)) == pytest.approx(PEAK, rel=1e-6)
        assert float(sched(w + k * period - 1)) == pytest.approx(reference_cosine(t - 1, PEAK, w, t), rel=1e-5)


def test_cosine_steps_overrides_stay_typed():
    """An int override of schedule.cosine_steps stays a step count, a float one a multiple of train.steps."""
    as_steps = config.load("configs/windtunnel.py", overrides=["schedule.name=cosine", "schedule.cosine_steps=300"])
    as_multiple = config.load("configs/windtunnel.py", overrides=["schedule.name=cosine_loop",
                                                                 "schedule.cosine_steps=1.25"])
    assert as_steps.schedule.cosine_steps == 300 and isinstance(as_steps.schedule.cosine_steps, int)
    assert optim.cosine_horizon(as_multiple.schedule, as_multiple.train.steps) == round(1.25 * as_multiple.train.steps)


@pytest.mark.parametrize("overrides,total,key", [
    (dict(name="cosine", cosine_steps=-1), 100, r"schedule\.cosine_steps=-1 must be an int number of steps"),
    (dict(name="cosine", cosine_steps=0.0), 100, r"schedule\.cosine_steps=0\.0 must be"),
    (dict(name="cosine", cosine_steps=True), 100, r"schedule\.cosine_steps=True must be"),
    (dict(name="cosine", cosine_steps="1.25"), 100, r"schedule\.cosine_steps='1\.25' must be"),
    (dict(cosine_steps=120), 100, r"schedule\.cosine_steps=120 only applies to .*not 'wsd'"),
    (dict(name="constant", cosine_steps=120), 100, r"only applies to .*not 'constant'"),
    (dict(name="cosine", warmup_steps=10, cosine_steps=10), 100,
     r"schedule\.cosine_steps=10 gives T = 10 steps: T must exceed schedule\.warmup_steps=10"),
    (dict(name="cosine_loop", warmup_steps=0.1, cosine_steps=0.05), 100,
     r"schedule\.cosine_steps=0\.05 gives T = 5 steps: T must exceed schedule\.warmup_steps=10"),
    (dict(name="cosine_loop", warmup_steps=100), 100, r"schedule\.warmup_steps=100 must be below train\.steps=100"),
])
def test_cosine_steps_validation_names_key(overrides, total, key):
    with pytest.raises(ConfigError, match=key):
        optim.make_schedule(overrides, total)


def test_bad_cosine_steps_fails_at_config_load():
    with pytest.raises(ConfigError, match=r"schedule\.cosine_steps=-3"):
        config.load("configs/windtunnel.py", overrides=["schedule.name=cosine", "schedule.cosine_steps=-3"])


# ------------------------------------------------------------------------------------------- optimizer

def tiny_model_config(**overrides) -> ModelConfig:
    """Width ratio r = 128 / 32 = 4."""
    return ModelConfig(vocab_size=64, hidden_size=128, intermediate_size=320, num_layers=2, num_heads=2,
                       num_kv_heads=1, dim_model_base=32, **overrides)


@pytest.fixture(scope="module")
def params():
    model = MiniCPM(tiny_model_config(tie_word_embeddings=False), rngs=nnx.Rngs(0))  # untied: every group
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def random_like(tree, seed, scale=1.0):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def one_update(params, grads, model_cfg, schedule=None, **optim_cfg):
    tx = optim.make_optimizer(optim_cfg, schedule or optax.constant_schedule(PEAK), params, model_cfg)
    updates, _ = tx.update(grads, tx.init(params), params)
    return updates


NO_WD_CLIP = dict(weight_decay=0.0, clip_grad_norm=None)


def group_of(path):
    """The μP group of a params path, spelled out for this model (independent of parametrization.py)."""
    if path[0] in ("embed_tokens", "lm_head"):
        return {"embed_tokens": "embedding", "lm_head": "head"}[path[0]]
    return "vector" if path[0] == "norm" or path[-2].endswith("layernorm") else "matrix"


def test_labels(params):
    labels = optim.param_labels(params)
    assert labels["embed_tokens"] == "embedding" and labels["norm"]["weight"] == "vector"
    assert labels["lm_head"] == "head"
    assert labels["layers"]["input_layernorm"]["weight"] == "vector"
    assert labels["layers"]["mlp"]["up_proj"] == labels["layers"]["self_attn"]["o_proj"] == "matrix"


@pytest.mark.parametrize("embedding_in_2d", [True, False])
def test_mup_multipliers_reach_updates(params, embedding_in_2d):
    mup = tiny_model_config(embedding_in_2d_group=embedding_in_2d)
    standard = dataclasses.replace(mup, parametrization="standard")
    grads = random_like(params, seed=1)
    up_mup = one_update(params, grads, mup, **NO_WD_CLIP)
    up_std = one_update(params, grads, standard, **NO_WD_CLIP)
    # Reference: plain optax.adamw at the base lr (multiplier 1), the same for every tensor.
    ref_tx = optax.adamw(PEAK, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0)
    ref, _ = ref_tx.update(grads, ref_tx.init(params), params)
    vocab_factor = 0.25 if embedding_in_2d else 1.0  # the embedding and the untied head, alike
    expected_factor = {"matrix": 0.25, "vector": 1.0, "embedding": vocab_factor, "head": vocab_factor}
    seen = set()
    for (path, a), b, c in zip(jax.tree_util.tree_leaves_with_path(up_mup), jax.tree.leaves(up_std),
                               jax.tree.leaves(ref)):
        group = group_of([p.key for p in path])
        seen.add(group)
        np.testing.assert_allclose(np.asarray(b), np.asarray(c), rtol=1e-6)  # standard: every multiplier is 1
        np.testing.assert_allclose(np.asarray(a), expected_factor[group] * np.asarray(c), rtol=1e-6)
    assert seen == {"matrix", "vector", "embedding", "head"}


def test_per_group_learning_rates():
    sched = optim.wsd_schedule(PEAK, 10, 10, 10)
    assert optim.per_group_learning_rates(sched, tiny_model_config(), 15) == pytest.approx(
        {"matrix": PEAK / 4, "embedding": PEAK, "head": PEAK, "vector": PEAK})
    literal = tiny_model_config(embedding_in_2d_group=True)
    assert optim.per_group_learning_rates(sched, literal, 15) == pytest.approx(
        {"matrix": PEAK / 4, "embedding": PEAK / 4, "head": PEAK / 4, "vector": PEAK})
    assert optim.per_group_learning_rates(sched, tiny_model_config(parametrization="standard"), 5) == pytest.approx(
        {"matrix": PEAK / 2, "embedding": PEAK / 2, "head": PEAK / 2, "vector": PEAK / 2})
    for control in ("standard", "standard_fanin"):  # one lr for every tensor
        assert set(lr_multipliers(tiny_model_config(parametrization=control)).values()) == {1.0}
    # Depth-μP: 8 layers over a base of 2 halve the hidden matrices' lr again, and nothing else.
    deep = dataclasses.replace(tiny_model_config(num_layers_base=2), num_layers=8)
    assert lr_multipliers(deep) == pytest.approx({"matrix": 1 / 8, "embedding": 1.0, "head": 1.0, "vector": 1.0})


@pytest.mark.parametrize("on,embedding_in_2d,decayed", [
    ("2d", True, {"matrix", "embedding", "head"}), ("2d", False, {"matrix"}),
    ("all", True, {"matrix", "embedding", "head", "vector"}), ("none", True, set()),
])
def test_weight_decay_groups(params, on, embedding_in_2d, decayed):
    model_cfg = tiny_model_config(embedding_in_2d_group=embedding_in_2d)
    zeros = jax.tree.map(jnp.zeros_like, params)  # zero gradient: Adam's step is 0, only the decay moves params
    updates = one_update(params, zeros, model_cfg, weight_decay=0.1, weight_decay_on=on, clip_grad_norm=None)
    mult = lr_multipliers(model_cfg)
    for (path, u), p in zip(jax.tree_util.tree_leaves_with_path(updates), jax.tree.leaves(params)):
        group = group_of([k.key for k in path])
        expected = -PEAK * mult[group] * 0.1 * np.asarray(p) if group in decayed else np.zeros_like(p)
        np.testing.assert_allclose(np.asarray(u), expected, rtol=1e-6, atol=1e-12)


def test_clipping_bounds_global_norm(params):
    grads = random_like(params, seed=2, scale=10.0)
    assert float(optax.tree.norm(grads)) > 1.0
    for clip, bound in ((1.0, 1.0), (None, float(optax.tree.norm(grads)))):
        tx = optim.make_optimizer(dict(clip_grad_norm=clip, b1=0.9), optax.constant_schedule(PEAK), params,
                                  tiny_model_config())
        _, state = tx.update(grads, tx.init(params), params)
        seen = jax.tree.map(lambda m: m / 0.1, optax.tree_utils.tree_get(state, "mu"))  # mu = (1−b1)·clipped g
        np.testing.assert_allclose(float(optax.tree.norm(seen)), bound, rtol=1e-5)


def test_state_is_array_pytree(params):
    tx = optim.make_optimizer({}, optim.wsd_schedule(PEAK, 1, 1, 1), params, tiny_model_config())
    leaves = jax.tree.leaves(tx.init(params))
    assert leaves and all(isinstance(x, jax.Array) for x in leaves)


@pytest.mark.parametrize("overrides,key", [
    (dict(b1=1.0), "optim.b1=1.0"), (dict(b2=-0.1), "optim.b2=-0.1"), (dict(eps=0.0), "optim.eps=0.0"),
    (dict(weight_decay=-1.0), "optim.weight_decay=-1.0"), (dict(weight_decay_on="1d"), "optim.weight_decay_on='1d'"),
    (dict(clip_grad_norm=-1.0), "optim.clip_grad_norm=-1.0"), (dict(lr=1.0), "optim.lr"),
])
def test_optim_validation_names_key(params, overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        optim.make_optimizer(overrides, optax.constant_schedule(PEAK), params, tiny_model_config())
