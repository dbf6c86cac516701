"""RoPE keys of HF `config.json` <-> the `rope_*` fields of ModelConfig (docs/recipe.md §1.5, §2.1).

Read: transformers ≥ 5 writes `rope_parameters` {rope_type, rope_theta, factor, ...}; MiniCPM's own configs
(and transformers < 5) write top-level `rope_theta` and `rope_scaling` {type | rope_type, factor, ...}.
Write: the MiniCPM layout gets `rope_theta` + `rope_scaling` in the form its readers validate (MiniCPM v1
remote code accepts exactly {type, factor} for linear/dynamic; vLLM and llama.cpp read the same keys);
the Granite layout gets transformers 5's `rope_parameters` and the legacy `rope_scaling` for older versions.

`model.rope_dynamic_mode` has no HF key: a "dynamic" config means HF's per-length rule to transformers
and vLLM's static base to vLLM (docs/recipe.md §1.5), so it is not exported and reads back as per_length.
"""

from __future__ import annotations

import math
from typing import Any

from minicpm_jax.config import ConfigError

_KNOWN = {"rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings", "short_factor",
          "long_factor", "attention_factor"}


def rope_from_hf(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """The ModelConfig rope fields (rope_theta, rope_scaling, rope_factor, ...) of an HF config dict."""
    params = dict(hf.get("rope_parameters") or {})
    params.update(hf.get("rope_scaling") or {})
    rope_type = params.get("rope_type") or params.get("type") or "default"
    unknown = sorted(set(params) - _KNOWN)
    if unknown:
        raise ConfigError(f"{where}: unsupported RoPE key(s) {unknown} in {params}")
    values: dict[str, Any] = {"rope_theta": float(params.get("rope_theta", hf.get("rope_theta", 10000.0))),
                              "rope_scaling": rope_type}
    if rope_type in ("linear", "dynamic"):
        if "factor" not in params:
            raise ConfigError(f"{where}: RoPE type {rope_type!r} needs a 'factor' ({params})")
        values["rope_factor"] = float(params["factor"])
    elif rope_type == "longrope":
        missing = [k for k in ("short_factor", "long_factor") if k not in params]
        if missing:
            raise ConfigError(f"{where}: longrope RoPE needs {missing} ({params})")
        max_pos = hf.get("max_position_embeddings", 4096)
        original = int(params.get("original_max_position_embeddings") or max_pos)
        factor = float(params.get("factor") or max_pos / original)
        values.update(rope_original_max_position_embeddings=original, rope_factor=max(factor, 1.0),
                      rope_short_factor=tuple(params["short_factor"]), rope_long_factor=tuple(params["long_factor"]))
        derived = math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1.0
        given = params.get("attention_factor")
        if given is not None and not math.isclose(given, derived, rel_tol=1e-6):
            raise ConfigError(f"{where}: longrope attention_factor={given} differs from the derived "
                              f"sqrt(1 + ln(factor)/ln(original_max_position_embeddings)) = {derived}; "
                              f"an explicit attention factor is not supported")
    elif rope_type != "default":
        raise ConfigError(f"{where}: RoPE type {rope_type!r} is not supported; supported: default, linear, dynamic, "
                          f"longrope ({params})")
    return values


def _scaling_dict(cfg) -> dict[str, Any] | None:
    """The `rope_scaling` entries of `cfg` without θ (None for plain RoPE)."""
    if cfg.rope_scaling == "default":
        return None
    scaling: dict[str, Any] = {"factor": cfg.rope_factor}
    if cfg.rope_scaling == "longrope":
        scaling.update(original_max_position_embeddings=cfg.rope_original_max_position_embeddings or
                       cfg.max_position_embeddings, short_factor=list(cfg.rope_short_factor),
                       long_factor=list(cfg.rope_long_factor))
    return scaling


def rope_to_hf(cfg, arch: str) -> dict[str, Any]:
    """The RoPE keys of the config.json for `arch` ('minicpm' or 'granite')."""
    scaling = _scaling_dict(cfg)
    if arch == "minicpm":
        # MiniCPM v1's remote code rejects any key but `type` and `factor` for linear/dynamic.
        legacy = None if scaling is None else {"type": cfg.rope_scaling, **scaling}
        if legacy is not None and cfg.rope_scaling == "longrope":
            legacy["rope_type"] = cfg.rope_scaling  # MiniCPM3/4 read rope_type, older readers type
        return {"rope_theta": cfg.rope_theta, "rope_scaling": legacy}
    parameters = {"rope_type": cfg.rope_scaling, "rope_theta": cfg.rope_theta, **(scaling or {})}
    return {"rope_theta": cfg.rope_theta, "rope_parameters": parameters,
            "rope_scaling": None if scaling is None else {"rope_type": cfg.rope_scaling, **scaling}}
