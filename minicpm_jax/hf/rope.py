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

from typing import Any

from minicpm_jax.config import ConfigError
from minicpm_jax.rope_variants import VARIANTS

# Keys of any variant are accepted under any type, as before (a stray `factor` on default RoPE is ignored).
_KNOWN = {"rope_type", "type", "rope_theta"}.union(*(variant.hf_keys for variant in VARIANTS.values()))


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
    variant = VARIANTS.get(rope_type)
    if variant is None:
        raise ConfigError(f"{where}: RoPE type {rope_type!r} is not supported; supported: {', '.join(VARIANTS)} "
                          f"({params})")
    values.update(variant.from_hf(params, hf, where))
    return values


def _scaling_dict(cfg) -> dict[str, Any] | None:
    """The `rope_scaling` entries of `cfg` without θ (None for plain RoPE)."""
    return VARIANTS[cfg.rope_scaling].to_hf(cfg)


def rope_to_hf(cfg, arch: str) -> dict[str, Any]:
    """The RoPE keys of the config.json for `arch` ('minicpm' or 'granite')."""
    scaling = _scaling_dict(cfg)
    if arch == "minicpm":
        # MiniCPM v1's remote code rejects any key but `type` and `factor` for linear/dynamic.
        legacy = None if scaling is None else {"type": cfg.rope_scaling, **scaling}
        if legacy is not None and VARIANTS[cfg.rope_scaling].legacy_rope_type:
            legacy["rope_type"] = cfg.rope_scaling  # MiniCPM3/4 read rope_type, older readers type
        return {"rope_theta": cfg.rope_theta, "rope_scaling": legacy}
    parameters = {"rope_type": cfg.rope_scaling, "rope_theta": cfg.rope_theta, **(scaling or {})}
    return {"rope_theta": cfg.rope_theta, "rope_parameters": parameters,
            "rope_scaling": None if scaling is None else {"rope_type": cfg.rope_scaling, **scaling}}
