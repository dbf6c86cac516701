"""Learning-rate schedules (WSD with decay shapes, Cosine(T), CosineLoop(T), constant) (docs/recipe.md §5).

The config sections are `schedule` and `optim`: their keys, defaults and value checks are
config.ScheduleConfig and config.OptimConfig. A phase length (schedule.warmup_steps, stable_steps,
decay_steps) is an int number of steps or a float fraction in [0, 1] of train.steps; each phase's end is
rounded to the nearest step, so 0.1 of 1000 is exactly 100 and fractions that sum to at most 1 fit any
train.steps. A whole float > 1 such as 100.0 is read as steps, since ConfigDict turns an int override of a
float field into a float. W + S + D must be ≤ train.steps; if it is less, the lr holds at η·r for the
remaining steps, and D = 0 holds η forever (an open-ended stable phase).
Gradient accumulation is the train step's job (`train.grad_accum_steps`): it sums micro-batch gradients
in one jitted scan and hands this optimizer the whole batch's gradient.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from minicpm_jax.config import DECAYS, PHASE_KEYS, ConfigError, ScheduleConfig, require_number, typed_section

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


def _ratio(value: float, key: str, low_open: bool = False) -> float:
    require_number(key, value, low=0, high=1, low_open=low_open)
    return float(value)


def _positive(value: Any, key: str) -> float:
    require_number(key, value, low=0, low_open=True)
    return float(value)


def exp_ratio_from_half_life(decay_steps: int, half_life_steps: float) -> float:
    """r = 0.5^(D/T_half), so that η·r^t with t = (s − start)/D is MiniCPM's η·0.5^((s − start)/T_half)."""
    return 0.5 ** (_steps(decay_steps, "decay_steps") / _positive(half_life_steps, "decay_half_life_steps"))


def wsd_schedule(peak_lr: float, warmup_steps: int, stable_steps: int, decay_steps: int, decay: str = "exp",
                 final_lr_ratio: float = 0.1) -> optax.Schedule:
    """Warmup-Stable-Decay (docs/recipe.md §5.1): η·s/W for s < W; η for W ≤ s ≤ W+S; η·f(t) with
    t = (s−W−S)/D during the decay; η·r afterwards (η forever when D = 0). Jittable; also takes Python ints."""
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
    """The paper's Cosine(T) baseline (App. B.1, docs/recipe.md §5.3): linear warmup, then
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


def cosine_loop_schedule(peak_lr: float, warmup_steps: int, cosine_steps: int,
                         final_lr_ratio: float = 0.1) -> optax.Schedule:
    """The paper's CosineLoop(T) baseline (App. B.1, docs/recipe.md §5.3): Cosine(T) with warm restarts.
    Linear warmup, then η·(r + (1−r)(1+cos(π·u/P))/2) with P = T − W and u = (s − W) mod P: the first cycle is
    Cosine(T), reaching η·r at s = T; at s = W + kP (k ≥ 1) the lr jumps back to η, without a new warmup."""
    peak = _positive(peak_lr, "peak_lr")
    w, t_steps = _steps(warmup_steps, "warmup_steps"), _steps(cosine_steps, "cosine_steps")
    if t_steps <= w:
        raise ConfigError(f"cosine_steps={t_steps} must exceed warmup_steps={w} for a cosine cycle")
    r = _ratio(final_lr_ratio, "final_lr_ratio")
    period = t_steps - w

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        u = jnp.mod(jnp.maximum(step - w, 0.0), period) / period
        return jnp.where(step < w, peak * step / max(w, 1), peak * _DECAY_FNS["cosine"](u, r))

    return schedule


def constant_schedule(peak_lr: float, warmup_steps: int = 0) -> optax.Schedule:
    """Linear warmup to η, then η forever (WSD without a decay)."""
    return wsd_schedule(peak_lr, warmup_steps, 0, 0)


def _schedule_section(section: Any) -> ScheduleConfig:
    """The typed `schedule` section (defaults filled in, unknown keys and bad values are ConfigErrors)."""
    return typed_section(ScheduleConfig, section, "schedule")


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
    cfg = _schedule_section(schedule_cfg)
    total = _steps(total_steps, "train.steps")
    if total < 1:
        raise ConfigError(f"train.steps={total} must be at least 1")
    # Rounded at the phases' ends, not each length on its own, so that fractions summing to at most 1 fit every
    # train.steps: 0.05 / 0.7 / 0.25 of 30 steps are 2 / 20 / 8 steps, where rounding each would give 2 + 21 + 8.
    ends = [round(end) for end in itertools.accumulate(
        _phase(getattr(cfg, k), f"schedule.{k}", total) for k in PHASE_KEYS)]
    w, s, d = (end - start for start, end in zip([0] + ends, ends))
    if cfg.name == "wsd" and w + s + d > total:
        raise ConfigError(f"schedule.warmup_steps + stable_steps + decay_steps = {w} + {s} + {d} = {w + s + d} "
                          f"exceeds train.steps={total}")
    if w > total:
        raise ConfigError(f"schedule.warmup_steps={w} exceeds train.steps={total}")
    return w, s, d


def cosine_horizon(schedule_cfg: Any, total_steps: int) -> int:
    """T of a cosine or cosine_loop schedule in steps, from schedule.cosine_steps: 0 is train.steps (T = S), an
    int is steps, a float a multiple of train.steps rounded to a step (1.25 of 400 is 500). Must exceed the warmup."""
    cfg = _schedule_section(schedule_cfg)
    total = _steps(total_steps, "train.steps")
    value = cfg.cosine_steps
    horizon = total if not value else round(value * total) if isinstance(value, float) else value
    warmup = resolve_phases(cfg, total)[0]
    if horizon <= warmup:
        if not value:
            raise ConfigError(f"schedule.warmup_steps={warmup} must be below train.steps={total} for a {cfg.name} "
                              f"schedule (its T = train.steps when schedule.cosine_steps = 0)")
        raise ConfigError(f"schedule.cosine_steps={value!r} gives T = {horizon} steps: T must exceed "
                          f"schedule.warmup_steps={warmup} (the cosine runs from the warmup's end to T)")
    return horizon


def decay_start(schedule_cfg: Any, total_steps: int) -> int | None:
    """The first step of a WSD decay (the lr falls, and training reads data.mixtures.decay, from there on);
    None for a schedule without one, e.g. a WSD run with decay_steps = 0, whose stable phase has no end."""
    cfg = _schedule_section(schedule_cfg)
    if cfg.name != "wsd":
        return None
    warmup, stable, decay = resolve_phases(cfg, total_steps)
    return warmup + stable if decay else None


def make_schedule(schedule_cfg: Any, total_steps: int) -> optax.Schedule:
    """The base (peak-relative, before μP multipliers) lr schedule of a `schedule` config section."""
    cfg = _schedule_section(schedule_cfg)  # names, peak, ratio and half-life are checked there
    peak, ratio, half_life = cfg.peak_lr, cfg.final_lr_ratio, cfg.decay_half_life_steps
    w, s, d = resolve_phases(cfg, total_steps)
    if cfg.name == "cosine":
        return cosine_schedule(peak, w, cosine_horizon(cfg, total_steps), ratio)
    if cfg.name == "cosine_loop":
        return cosine_loop_schedule(peak, w, cosine_horizon(cfg, total_steps), ratio)
    if cfg.name == "constant":
        return constant_schedule(peak, w)
    if half_life:
        ratio = exp_ratio_from_half_life(d, half_life)
    return wsd_schedule(peak, w, s, d, cfg.decay, ratio)
