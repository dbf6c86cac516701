"""RoPE frequency variants (docs/recipe.md §1.5): default/ABF, linear interpolation, dynamic NTK and LongRoPE.

Each variant only changes the inverse frequencies (and, for LongRoPE, a scale on cos and sin); the
rotation itself is `layers.apply_rope`. The formulas are transformers' `ROPE_INIT_FUNCTIONS`, which
tests/test_rope.py checks numerically:

- default: inv_freq_i = θ^(−2i/d). ABF ("adjusted base frequency") is this with a larger θ.
- linear (position interpolation): inv_freq / factor.
- dynamic NTK: with S = max position + 1 of the call, if S > max_pos the base becomes
  θ·(factor·S/max_pos − (factor − 1))^(d/(d−2)), else θ (HF's per-length rule). HF caches that base
  across calls (it only grows); we recompute it from each call's S, which is what HF computes for a
  fresh model. `rope_dynamic_mode="static"` is vLLM's variant instead: the base for S = max_pos·factor
  at every length, so short prompts are rotated differently than in HF (MiniCPM-2B-128k: 1.41e7 vs 1e6).
- longrope: inv_freq / ext with ext = long_factor if S > original_max else short_factor, and cos, sin
  multiplied by sqrt(1 + ln(factor)/ln(original_max)) (factor = max_pos/original_max in MiniCPM3/4).

Each variant's function is registered with `@frequencies_for(name)` for its entry in minicpm_jax/rope_variants.py
(the table with its config checks and HF keys); `frequencies` dispatches on `spec.scaling`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from minicpm_jax import rope_variants
from minicpm_jax.rope_variants import frequencies_for


@dataclasses.dataclass(frozen=True)
class RopeSpec:
    """The RoPE fields of a ModelConfig that the frequencies depend on (static under jit)."""

    head_dim: int
    theta: float
    scaling: str = "default"
    factor: float = 1.0
    dynamic_mode: str = "per_length"
    max_position_embeddings: int = 4096
    original_max_position_embeddings: int = 0
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()

    @classmethod
    def from_model(cls, cfg) -> RopeSpec:
        return cls(cfg.head_dim, float(cfg.rope_theta), cfg.rope_scaling, float(cfg.rope_factor),
                   cfg.rope_dynamic_mode, cfg.max_position_embeddings,
                   cfg.rope_original_max_position_embeddings or cfg.max_position_embeddings,
                   cfg.rope_short_factor, cfg.rope_long_factor)

    @property
    def longrope_attention_scale(self) -> float:
        if self.factor <= 1.0:
            return 1.0
        return math.sqrt(1.0 + math.log(self.factor) / math.log(self.original_max_position_embeddings))


def _default_inverse_frequencies(head_dim: int, theta: float | jax.Array) -> jax.Array:
    """inv_freq_i = θ^(−2i/head_dim) for i < head_dim/2, in float32."""
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    return 1.0 / (jnp.asarray(theta, jnp.float32) ** exponents)


def dynamic_ntk_base(spec: RopeSpec, seq_len: jax.Array | int) -> jax.Array:
    """The dynamic-NTK base for a call whose longest sequence is `seq_len` (HF's rule, or vLLM's static one)."""
    if spec.dynamic_mode == "static":
        seq_len = spec.max_position_embeddings * spec.factor
    d, max_pos = spec.head_dim, spec.max_position_embeddings
    length = jnp.asarray(seq_len, jnp.float32)
    scaled = spec.theta * (spec.factor * length / max_pos - (spec.factor - 1)) ** (d / (d - 2))
    return jnp.where(length > max_pos, scaled, jnp.float32(spec.theta))


@frequencies_for("default")
def _default_frequencies(spec: RopeSpec, seq_len: jax.Array) -> tuple[jax.Array, float]:
    return _default_inverse_frequencies(spec.head_dim, spec.theta), 1.0


@frequencies_for("linear")
def _linear_frequencies(spec: RopeSpec, seq_len: jax.Array) -> tuple[jax.Array, float]:
    return _default_inverse_frequencies(spec.head_dim, spec.theta) / spec.factor, 1.0


@frequencies_for("dynamic")
def _dynamic_frequencies(spec: RopeSpec, seq_len: jax.Array) -> tuple[jax.Array, float]:
    return _default_inverse_frequencies(spec.head_dim, dynamic_ntk_base(spec, seq_len)), 1.0


@frequencies_for("longrope")
def _longrope_frequencies(spec: RopeSpec, seq_len: jax.Array) -> tuple[jax.Array, float]:
    ext = jnp.where(seq_len > spec.original_max_position_embeddings,
                    jnp.asarray(spec.long_factor, jnp.float32), jnp.asarray(spec.short_factor, jnp.float32))
    return _default_inverse_frequencies(spec.head_dim, spec.theta) / ext, spec.longrope_attention_scale


_unregistered = sorted(set(rope_variants.VARIANTS) - set(rope_variants.FREQUENCIES))
if _unregistered:
    raise ImportError(f"RoPE variant(s) {_unregistered} of rope_variants.VARIANTS have no @frequencies_for function")


def frequencies(spec: RopeSpec, positions: jax.Array) -> tuple[jax.Array, jax.Array | float]:
    """(inv_freq [head_dim/2] float32, scale on cos and sin) for a call at `positions` [B, T].

    The length S = max(positions) + 1 over the whole call, as transformers computes it. The function per
    variant is the one registered for `spec.scaling` with @rope_variants.frequencies_for.
    """
    seq_len = jnp.max(positions) + 1
    return rope_variants.FREQUENCIES[spec.scaling](spec, seq_len)
