"""The RoPE scaling variants, one registered entry each (docs/recipe.md §1.5): the one place to add one.

An entry holds the variant's name (the value of `model.rope_scaling`), its config checks, and its Hugging Face
`rope_scaling` keys both ways; its inverse frequencies live next to the others in model/rope.py, registered
here with `@rope_variants.frequencies_for(name)`. `config.ROPE_SCALINGS` is `tuple(VARIANTS)`;
`config._validate_rope`, hf/rope.py and model/rope.py dispatch through `VARIANTS`.

Adding a variant: one `RopeVariant` in `VARIANTS` below, plus its frequency function in model/rope.py.
This module imports neither jax nor (at import time) minicpm_jax.config, which imports it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class RopeVariant:
    """One value of `model.rope_scaling`.

    validate(cfg): checks the rope_* fields of a ModelConfig for this variant; raises ConfigError naming the key
        (the checks common to every variant, rope_factor >= 1 and rope_dynamic_mode, are config._validate_rope's).
    to_hf(cfg): the HF `rope_scaling` entries without `type`/`rope_type` and θ, or None for plain RoPE.
    from_hf(params, hf, where): our ModelConfig fields (besides rope_theta and rope_scaling) from the merged HF
        `rope_parameters`/`rope_scaling` dict `params` of the HF config `hf`; raises ConfigError mentioning `where`.
    hf_keys: the HF `rope_scaling` keys it reads besides `type`, `rope_type` and `rope_theta` (others are errors).
    legacy_rope_type: the MiniCPM config.json layout writes `rope_type` beside `type` (MiniCPM3/4 read rope_type).
    """

    name: str
    validate: Callable[[Any], None]
    to_hf: Callable[[Any], dict[str, Any] | None]
    from_hf: Callable[[dict[str, Any], dict[str, Any], str], dict[str, Any]]
    hf_keys: tuple[str, ...] = ()
    legacy_rope_type: bool = False


def _config_error(message: str) -> Exception:
    from minicpm_jax.config import ConfigError  # lazily: config imports this module

    return ConfigError(message)


def _no_longrope_keys(cfg) -> None:
    if cfg.rope_short_factor or cfg.rope_long_factor or cfg.rope_original_max_position_embeddings:
        raise _config_error("model.rope_short_factor, rope_long_factor and rope_original_max_position_embeddings "
                            f"only apply to model.rope_scaling='longrope', not {cfg.rope_scaling!r}")


# -- default / ABF: inv_freq_i = θ^(−2i/d); ABF is this with a larger rope_theta --------------------------------

def _validate_default(cfg) -> None:
    if cfg.rope_factor != 1:
        raise _config_error(f"model.rope_factor={cfg.rope_factor} has no effect with model.rope_scaling='default'; "
                            f"set rope_scaling to linear, dynamic or longrope (ABF only raises model.rope_theta)")
    _no_longrope_keys(cfg)


# -- linear and dynamic NTK: one `factor` ---------------------------------------------------------------------

def _factor_to_hf(cfg) -> dict[str, Any]:
    return {"factor": cfg.rope_factor}


def _factor_from_hf(params: dict[str, Any], hf: dict[str, Any], where: str) -> dict[str, Any]:
    rope_type = params.get("rope_type") or params.get("type")
    if "factor" not in params:
        raise _config_error(f"{where}: RoPE type {rope_type!r} needs a 'factor' ({params})")
    return {"rope_factor": float(params["factor"])}


# -- longrope: per-frequency short/long divisors and an attention scale ----------------------------------------

def _validate_longrope(cfg) -> None:
    from minicpm_jax.config import require_int

    for key in ("rope_short_factor", "rope_long_factor"):
        if len(getattr(cfg, key)) != cfg.head_dim // 2:
            raise _config_error(f"model.{key} has {len(getattr(cfg, key))} values; longrope needs head_dim/2 = "
                                f"{cfg.head_dim // 2}")
    require_int("model.rope_original_max_position_embeddings", cfg.rope_original_max_position_embeddings,
                minimum=0)  # 0 = max_position_embeddings


def _longrope_to_hf(cfg) -> dict[str, Any]:
    return {"factor": cfg.rope_factor,
            "original_max_position_embeddings": cfg.rope_original_max_position_embeddings or
            cfg.max_position_embeddings,
            "short_factor": list(cfg.rope_short_factor), "long_factor": list(cfg.rope_long_factor)}


def _longrope_from_hf(params: dict[str, Any], hf: dict[str, Any], where: str) -> dict[str, Any]:
    missing = [k for k in ("short_factor", "long_factor") if k not in params]
    if missing:
        raise _config_error(f"{where}: longrope RoPE needs {missing} ({params})")
    max_pos = hf.get("max_position_embeddings", 4096)
    original = int(params.get("original_max_position_embeddings") or max_pos)
    factor = float(params.get("factor") or max_pos / original)
    derived = math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1.0
    given = params.get("attention_factor")
    if given is not None and not math.isclose(given, derived, rel_tol=1e-6):
        raise _config_error(f"{where}: longrope attention_factor={given} differs from the derived "
                            f"sqrt(1 + ln(factor)/ln(original_max_position_embeddings)) = {derived}; "
                            f"an explicit attention factor is not supported")
    return {"rope_original_max_position_embeddings": original, "rope_factor": max(factor, 1.0),
            "rope_short_factor": tuple(params["short_factor"]), "rope_long_factor": tuple(params["long_factor"])}


VARIANTS: dict[str, RopeVariant] = {v.name: v for v in (
    RopeVariant("default", _validate_default, lambda cfg: None, lambda params, hf, where: {}),
    RopeVariant("linear", _no_longrope_keys, _factor_to_hf, _factor_from_hf, hf_keys=("factor",)),
    RopeVariant("dynamic", _no_longrope_keys, _factor_to_hf, _factor_from_hf, hf_keys=("factor",)),
    RopeVariant("longrope", _validate_longrope, _longrope_to_hf, _longrope_from_hf, legacy_rope_type=True,
                hf_keys=("factor", "original_max_position_embeddings", "short_factor", "long_factor",
                         "attention_factor")),
)}

# name -> (RopeSpec, seq_len) -> (inv_freq, scale on cos and sin); filled by model/rope.py's @frequencies_for.
FREQUENCIES: dict[str, Callable] = {}


def frequencies_for(name: str) -> Callable[[Callable], Callable]:
    """Registers the decorated function as the inverse frequencies of variant `name`."""
    if name not in VARIANTS:
        raise ValueError(f"RoPE frequencies for {name!r}, which is not in rope_variants.VARIANTS {tuple(VARIANTS)}")

    def register(fn: Callable) -> Callable:
        FREQUENCIES[name] = fn
        return fn

    return register
