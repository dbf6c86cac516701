"""Learning-rate schedules (WSD with decay shapes, cosine, constant) and AdamW with μP groups (facts §4, §5).

Config section `schedule` (steps keys take an int number of steps OR a float fraction in [0, 1] of
`train.steps`, each phase's end rounded to the nearest step, so 0.1 of 1000 is exactly 100 and fractions that
sum to at most 1 fit any train.steps; a whole float > 1 such as 100.0
is read as steps, since ConfigDict turns an int override of a float field into a float):
    name                   "wsd"   wsd | cosine | constant
    peak_lr                0.01    the paper's base lr η; μP divides it per tensor (see `make_optimizer`)
    warmup_steps           0       W: linear warmup 0 → η (the paper does not report W)
    stable_steps           0       S: hold η (wsd only)
    decay_steps            0       D: decay η → η·r (wsd only); W+S+D must be ≤ train.steps, and if it is
                                   less the lr holds at η·r for the remaining steps; D = 0 holds η forever
    decay                  "exp"   exp | linear | cosine | 1-sqrt (shape of the wsd decay)
    final_lr_ratio         0.1     r: lr at the end of the decay (wsd) or of the cosine, relative to η
    decay_half_life_steps  0       > 0 (exp only): r = 0.5^(D / half_life), MiniCPM's half-life form
Config section `optim` (the paper reports only "Adam": betas, eps, weight decay and clipping are our
choices, facts §9):
    b1 0.9, b2 0.95, eps 1e-8      Adam moments
    weight_decay           0.1     decoupled (AdamW), multiplied by the per-tensor lr like PyTorch groups
    weight_decay_on        "2d"    2d (the groups μP treats as 2-D) | all | none
    clip_grad_norm         1.0     global-norm clip of the (accumulated) gradient; 0 or None disables
Gradient accumulation is the train step's job (`train.grad_accum_steps`): it sums micro-batch gradients
in one jitted scan and hands this optimizer the whole batch's gradient.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from minicpm_jax.config import ConfigError, ModelConfig
from minicpm_jax.model.parametrization import GROUPS, lr_multipliers, param_group

DECAYS = ("exp", "linear", "cosine", "1-sqrt")
SCHEDULES = ("wsd", "cosine", "constant")
WEIGHT_DECAY_ON = ("2d", "all", "none")
SCHEDULE_DEFAULTS = {"name": "wsd", "peak_lr": 0.01, "warmup_steps": 0, "stable_steps": 0, "decay_steps": 0,
                     "decay": "exp", "final_lr_ratio": 0.1, "decay_half_life_steps": 0}
# The paper reports only "Adam" (facts §9): betas, eps, weight decay and clipping are our choices.
OPTIM_DEFAULTS = {"b1": 0.9, "b2": 0.95, "eps": 1e-8, "weight_decay": 0.1, "weight_decay_on": "2d",
                  "clip_grad_norm": 1.0}

# f(t) for t ∈ [0, 1]: the fraction of the peak lr at relative decay progress t, ending at r.
_DECAY_FNS: dict[str, Callable[[jax.Array, float], jax.Array]] = {
    "exp": lambda t, r: jnp.power(r, t),
    "linear": lambda t, r: 1.0 - (1.0 - r) * t,
    "cosine": lambda t, r: r + (1.0 - r) * (1.0 + jnp.cos(jnp.pi * t)) / 2.0,
    "1-sqrt": lambda t, r: r + (1.0 - r) * (1.0 - jnp.sqrt(t)),
}


# ----------------------------------------------------------------------------------------------- schedules

def _steps(value: Any, key: str) -> int:
    try:
        steps = operator.index(value)  # ints and numpy ints; floats and bools are not step counts here
    except TypeError:
        raise ConfigError(f"{key}={value!r} must be an integer number of steps") from None
    if isinstance(value, bool) or steps < 0:
        raise ConfigError(f"{key}={value!r} must be a non-negative integer number of steps")
    return steps


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _ratio(value: float, key: str, low_open: bool = False) -> float:
    if not _number(value) or not 0 <= value <= 1 or (low_open and value == 0):
        raise ConfigError(f"{key}={value!r} must be in {'(' if low_open else '['}0, 1]")
    return float(value)


def _positive(value: Any, key: str) -> float:
    if not _number(value) or not value > 0:
        raise ConfigError(f"{key}={value!r} must be a positive number")
    return float(value)


def exp_ratio_from_half_life(decay_steps: int, half_life_steps: float) -> float:
    """r = 0.5^(D/T_half), so that η·r^t with t = (s − start)/D is MiniCPM's η·0.5^((s − start)/T_half)."""
    return 0.5 ** (_steps(decay_steps, "decay_steps") / _positive(half_life_steps, "decay_half_life_steps"))


def wsd_schedule(peak_lr: float, warmup_steps: int, stable_steps: int, decay_steps: int, decay: str = "exp",
                 final_lr_ratio: float = 0.1) -> optax.Schedule:
    """Warmup-Stable-Decay (facts §5): η·s/W for s < W; η for W ≤ s ≤ W+S; η·f(t) with t = (s−W−S)/D
    during the decay; η·r afterwards (η forever when D = 0). Jittable; also takes Python ints."""
    peak = _positive(peak_lr, "peak_lr")
    w, s, d = (_steps(v, k) for v, k in ((warmup_steps, "warmup_steps"), (stable_steps, "stable_steps"),
                                         (decay_steps, "decay_steps")))
    if decay not in DECAYS:
        raise ConfigError(f"decay={decay!r} must be one of {DECAYS}")
    r = _ratio(final_lr_ratio, "final_lr_ratio", low_open=decay == "exp")  # r^t needs r > 0
    decay_fn = _DECAY_FNS[decay]

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak * step / max(w, 1)
        if d == 0:
            return jnp.where(step < w, warm, peak)
        t = jnp.clip((step - w - s) / d, 0.0, 1.0)  # clipped to 1 from the decay's end on: holds at η·r
        return jnp.where(step < w, warm, jnp.where(step <= w + s, peak, peak * decay_fn(t, r)))

    return schedule


def wsd_branch_schedule(peak_lr: float, warmup_steps: int, branch_step: int, decay_steps: int, decay: str = "exp",
                        final_lr_ratio: float = 0.1) -> optax.Schedule:
    """Schedule of a branch that holds the peak until `branch_step` (a stable checkpoint) and then decays over
    `decay_steps`: WSD with S = branch_step − W. Steps stay global, so the branch's decay starts at its step 0."""
    w, b = _steps(warmup_steps, "warmup_steps"), _steps(branch_step, "branch_step")
    if b < w:
        raise ConfigError(f"branch_step={b} is inside the warmup (warmup_steps={w}); branch from a stable step")
    return wsd_schedule(peak_lr, w, b - w, decay_steps, decay, final_lr_ratio)


def cosine_schedule(peak_lr: float, warmup_steps: int, total_steps: int, final_lr_ratio: float = 0.1) -> optax.Schedule:
    """The paper's Cosine(T) baseline (App. B.1, facts §5): linear warmup, then
    η·(r + (1−r)(1+cos(π(s−W)/(T−W)))/2), reaching η·r at s = T and holding there (the half-cosine reading
    of the paper's formula)."""
    peak = _positive(peak_lr, "peak_lr")
    w, total = _steps(warmup_steps, "warmup_steps"), _steps(total_steps, "total_steps")
    if total <= w:
        raise ConfigError(f"total_steps={total} must exceed warmup_steps={w} for a cosine decay")
    r = _ratio(final_lr_ratio, "final_lr_ratio")

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        t = jnp.clip((step - w) / (total - w), 0.0, 1.0)
        return jnp.where(step < w, peak * step / max(w, 1), peak * _DECAY_FNS["cosine"](t, r))

    return schedule


def constant_schedule(peak_lr: float, warmup_steps: int = 0) -> optax.Schedule:
    """Linear warmup to η, then η forever (WSD without a decay)."""
    return wsd_schedule(peak_lr, warmup_steps, 0, 0)


def _section(cfg: Any, defaults: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The section as a dict with defaults filled in; unknown keys (typos) are errors."""
    values = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else (cfg or {}))
    unknown = sorted(set(values) - set(defaults))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(f'{name}.{k}' for k in unknown)}; "
                          f"known: {', '.join(sorted(defaults))}")
    return {**defaults, **values}


def _phase(value: Any, key: str, total: int) -> float:
    """Steps from an int, or from a float fraction in [0, 1] of the total steps (unrounded: see `resolve_phases`).

    A whole float above 1 (100.0) also counts as steps: a ConfigDict field declared with a float default turns
    the override `schedule.warmup_steps=100` into 100.0. Other floats above 1 (1.5) are errors; 1.0 is the whole run.
    """
    if isinstance(value, float):
        if value > 1.0 and value.is_integer():
            return int(value)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{key}={value!r}: a float is a fraction of train.steps and must be in [0, 1]; "
                              f"give an int for a number of steps")
        return value * total
    return _steps(value, key)


def resolve_phases(schedule_cfg: Any, total_steps: int) -> tuple[int, int, int]:
    """(W, S, D) in steps, validated against `total_steps` (train.steps) before any compute."""
    cfg = _section(schedule_cfg, SCHEDULE_DEFAULTS, "schedule")
    total = _steps(total_steps, "train.steps")
    if total < 1:
        raise ConfigError(f"train.steps={total} must be at least 1")
    # Rounded at the phases' ends, not each length on its own, so that fractions summing to at most 1 fit every
    # train.steps: 0.05 / 0.7 / 0.25 of 30 steps are 2 / 20 / 8 steps, where rounding each would give 2 + 21 + 8.
    ends = [round(end) for end in itertools.accumulate(
        _phase(cfg[k], f"schedule.{k}", total) for k in ("warmup_steps", "stable_steps", "decay_steps"))]
    w, s, d = (end - start for start, end in zip([0] + ends, ends))
    if cfg["name"] == "wsd" and w + s + d > total:
        raise ConfigError(f"schedule.warmup_steps + stable_steps + decay_steps = {w} + {s} + {d} = {w + s + d} "
                          f"exceeds train.steps={total}")
    if w > total:
        raise ConfigError(f"schedule.warmup_steps={w} exceeds train.steps={total}")
    return w, s, d


def decay_start(schedule_cfg: Any, total_steps: int) -> int | None:
    """The first step of a WSD decay (the lr falls, and training reads data.mixtures.decay, from there on);
    None for a schedule without one, e.g. a WSD run with decay_steps = 0, whose stable phase has no end."""
    cfg = _section(schedule_cfg, SCHEDULE_DEFAULTS, "schedule")
    if cfg["name"] != "wsd":
        return None
    warmup, stable, decay = resolve_phases(cfg, total_steps)
    return warmup + stable if decay else None


def make_schedule(schedule_cfg: Any, total_steps: int) -> optax.Schedule:
    """The base (peak-relative, before μP multipliers) lr schedule of a `schedule` config section."""
    cfg = _section(schedule_cfg, SCHEDULE_DEFAULTS, "schedule")
    if cfg["name"] not in SCHEDULES:
        raise ConfigError(f"schedule.name={cfg['name']!r} must be one of {SCHEDULES}")
    if cfg["decay"] not in DECAYS:
        raise ConfigError(f"schedule.decay={cfg['decay']!r} must be one of {DECAYS}")
    peak = _positive(cfg["peak_lr"], "schedule.peak_lr")
    ratio = _ratio(cfg["final_lr_ratio"], "schedule.final_lr_ratio", low_open=cfg["decay"] == "exp")
    half_life = cfg["decay_half_life_steps"] or 0
    if not _number(half_life) or half_life < 0:
        raise ConfigError(f"schedule.decay_half_life_steps={half_life!r} must be ≥ 0 (0 disables)")
    if half_life and cfg["decay"] != "exp":
        raise ConfigError(f"schedule.decay_half_life_steps={half_life} only applies to schedule.decay='exp', "
                          f"not {cfg['decay']!r}")
    w, s, d = resolve_phases(cfg, total_steps)
    if cfg["name"] == "cosine":
        if w >= total_steps:
            raise ConfigError(f"schedule.warmup_steps={w} must be below train.steps={total_steps} for a cosine")
        return cosine_schedule(peak, w, total_steps, ratio)
    if cfg["name"] == "constant":
        return constant_schedule(peak, w)
    if half_life:
        ratio = exp_ratio_from_half_life(d, half_life)
    return wsd_schedule(peak, w, s, d, cfg["decay"], ratio)


# ----------------------------------------------------------------------------------------------- optimizer

def _key_name(entry: Any) -> str:
    for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def param_labels(params: Any) -> Any:
    """The μP group ('matrix' | 'embedding' | 'vector') of every leaf of a params pytree, same structure."""
    return jax.tree_util.tree_map_with_path(lambda path, _: param_group(tuple(_key_name(p) for p in path)), params)


def _decayed_groups(on: str, model_cfg: ModelConfig) -> tuple[str, ...]:
    if on == "all":
        return GROUPS
    if on == "none":
        return ()
    # "2d": the tensors μP treats as 2-D, so the embedding follows `embedding_in_2d_group`, as its lr does.
    return ("matrix", "embedding") if model_cfg.embedding_in_2d_group else ("matrix",)


def _validate_optim(cfg: dict[str, Any]) -> None:
    for key in ("b1", "b2"):
        value = cfg[key]
        if not _number(value) or not 0 <= value < 1:
            raise ConfigError(f"optim.{key}={value!r} must be in [0, 1)")
    _positive(cfg["eps"], "optim.eps")
    if not _number(cfg["weight_decay"]) or cfg["weight_decay"] < 0:
        raise ConfigError(f"optim.weight_decay={cfg['weight_decay']!r} must be a number ≥ 0")
    if cfg["weight_decay_on"] not in WEIGHT_DECAY_ON:
        raise ConfigError(f"optim.weight_decay_on={cfg['weight_decay_on']!r} must be one of {WEIGHT_DECAY_ON}")
    clip = cfg["clip_grad_norm"]
    if clip is not None and (not _number(clip) or clip < 0):
        raise ConfigError(f"optim.clip_grad_norm={clip!r} must be ≥ 0 (0 or None disables clipping)")


def make_optimizer(optim_cfg: Any, schedule: optax.Schedule, params: Any,
                   model_cfg: ModelConfig) -> optax.GradientTransformation:
    """Clip → AdamW(schedule) → × the μP lr multiplier of each tensor's group.

    A tensor's lr is schedule(step) × multiplier(group); under μP a 2-D tensor gets schedule(step)/r (r the width
    ratio). The decoupled weight decay sits inside AdamW's lr scaling, so a decayed tensor shrinks by
    lr(step) × multiplier × weight_decay per step (PyTorch param-group semantics), not by a fixed amount.
    The state is a pytree of arrays (NamedTuples and dicts), ready for Orbax.
    """
    cfg = _section(optim_cfg, OPTIM_DEFAULTS, "optim")
    _validate_optim(cfg)
    param_labels(params)  # fail here, not in the first jitted step, on a params tree with unknown paths
    decayed = _decayed_groups(cfg["weight_decay_on"], model_cfg)
    multipliers = lr_multipliers(model_cfg)

    parts = []
    if cfg["clip_grad_norm"]:
        parts.append(optax.clip_by_global_norm(float(cfg["clip_grad_norm"])))
    parts.append(optax.adamw(schedule, b1=cfg["b1"], b2=cfg["b2"], eps=cfg["eps"],
                             weight_decay=float(cfg["weight_decay"]) if decayed else 0.0,
                             mask=lambda p: jax.tree.map(lambda g: g in decayed, param_labels(p))))
    # Scaling the final update by the group's multiplier equals giving that group lr × multiplier.
    parts.append(optax.multi_transform({g: optax.scale(multipliers[g]) for g in GROUPS}, param_labels))
    return optax.chain(*parts)


def per_group_learning_rates(schedule: optax.Schedule, model_cfg: ModelConfig, step: int) -> dict[str, float]:
    """The lr each μP group gets at `step` (for logging); the base lr is `schedule(step)` itself."""
    base = float(schedule(step))
    return {group: base * mult for group, mult in lr_multipliers(model_cfg).items()}
