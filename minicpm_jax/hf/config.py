"""Hugging Face `config.json` <-> ModelConfig, for the MiniCPM layout and the Granite layout.

MiniCPM's own configs carry `scale_emb`, `scale_depth` and `dim_model_base` and often omit
`model_type`, `rope_theta` and `tie_word_embeddings` (docs/recipe.md §2.1). transformers' Granite architecture
is an exact functional match with four multipliers (docs/recipe.md §2.3):
embedding_multiplier = scale_emb, residual_multiplier = scale_depth/√L,
logits_scaling = hidden/dim_model_base, attention_multiplier = 1/√head_dim.
"""

from __future__ import annotations

import math
from typing import Any

from minicpm_jax.config import ConfigError, ModelConfig
from minicpm_jax.hf.remote_code import AUTO_MAP
from minicpm_jax.hf.rope import rope_from_hf, rope_to_hf

ARCHS = ("minicpm", "granite")

# Keys read the same way from both layouts: ours -> (HF key, default when absent).
_COMMON_KEYS = {
    "vocab_size": ("vocab_size", None),
    "hidden_size": ("hidden_size", None),
    "intermediate_size": ("intermediate_size", None),
    "num_layers": ("num_hidden_layers", None),
    "num_heads": ("num_attention_heads", None),
    "max_position_embeddings": ("max_position_embeddings", 4096),
    "init_std": ("initializer_range", 0.1),
    "bos_token_id": ("bos_token_id", 1),
    "eos_token_id": ("eos_token_id", 2),
    # MiniCPM's config class defaults to 1e-6; every released checkpoint sets 1e-5 explicitly.
    "rms_norm_eps": ("rms_norm_eps", 1e-6),
}

# Absent in MiniCPM-2B/1B configs, whose config class defaults to tied; Granite's class defaults to untied.
_TIE_DEFAULT = {"minicpm": True, "granite": False}


def detect_arch(hf: dict[str, Any], where: str) -> str:
    """'minicpm' or 'granite'. MiniCPM configs may lack `model_type`, so architectures is checked too."""
    model_type = hf.get("model_type")
    architectures = hf.get("architectures") or []
    if model_type in ("granite", "granitemoe") or {"GraniteForCausalLM", "GraniteMoeForCausalLM"} & set(architectures):
        return "granite"
    if model_type in (None, "minicpm") or any(a.startswith("MiniCPM") for a in architectures):
        return "minicpm"
    raise ConfigError(f"{where}: model_type {model_type!r} (architectures {architectures}) is not a MiniCPM "
                      f"or Granite checkpoint; supported: {', '.join(ARCHS)}")


# config.json keys that must be JSON numbers when present: a string ("256") is refused, naming the key.
_INT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "max_position_embeddings", "num_experts", "num_local_experts",
             "num_experts_per_tok")
_NUMBER_KEYS = ("initializer_range", "rms_norm_eps", "rope_theta", "scale_emb", "scale_depth", "dim_model_base",
                "embedding_multiplier", "residual_multiplier", "logits_scaling", "attention_multiplier",
                "router_aux_loss_coef")


def _check_types(hf: dict[str, Any], where: str) -> None:
    if not isinstance(hf, dict):
        raise ConfigError(f"{where} holds a JSON {type(hf).__name__}, not an object")
    for keys, kind, ok in ((_INT_KEYS, "an integer", lambda v: isinstance(v, int)),
                           (_NUMBER_KEYS, "a number", lambda v: isinstance(v, (int, float)))):
        for key in keys:
            value = hf.get(key)
            if value is not None and (isinstance(value, bool) or not ok(value)):
                raise ConfigError(f"{where}: {key}={value!r} is a {type(value).__name__}; it must be {kind}"
                                  + (" (no quotes)" if isinstance(value, str) else ""))


def model_config_from_hf(hf: dict[str, Any], where: str = "config.json", **overrides: Any) -> ModelConfig:
    """Reads an HF config dict. `overrides` (e.g. param_dtype) win over what the file says. A value of the wrong
    type (`"hidden_size": "256"`) is a ConfigError naming the key."""
    _check_types(hf, where)
    arch = detect_arch(hf, where)
    _reject_unsupported(hf, where)
    values: dict[str, Any] = {}
    for ours, (key, default) in _COMMON_KEYS.items():
        value = hf.get(key, default)
        if value is None:
            raise ConfigError(f"{where}: required key {key!r} is missing")
        values[ours] = value
    values.update(rope_from_hf(hf, where))
    values["tie_word_embeddings"] = bool(hf.get("tie_word_embeddings", _TIE_DEFAULT[arch]))
    values["num_kv_heads"] = hf.get("num_key_value_heads") or values["num_heads"]
    values.update(_moe_values(hf, arch))
    head_dim = values["hidden_size"] // values["num_heads"]
    if arch == "minicpm":
        values["scale_emb"] = float(hf.get("scale_emb", 1.0))
        values["scale_depth"] = float(hf.get("scale_depth", 1.0))
        values["dim_model_base"] = hf.get("dim_model_base", 1)
    else:
        expected = 1.0 / math.sqrt(head_dim)
        got = hf.get("attention_multiplier", expected)
        if not math.isclose(got, expected, rel_tol=1e-6):
            raise ConfigError(f"{where}: attention_multiplier={got} but MiniCPM uses 1/sqrt(head_dim)={expected}")
        values["scale_emb"] = float(hf.get("embedding_multiplier", 1.0))
        values["scale_depth"] = float(hf.get("residual_multiplier", 1.0)) * math.sqrt(values["num_layers"])
        values["dim_model_base"] = values["hidden_size"] / float(hf.get("logits_scaling", 1.0))
    dim_model_base = float(values["dim_model_base"])
    values["dim_model_base"] = int(dim_model_base) if dim_model_base.is_integer() else dim_model_base
    values.update(overrides)
    try:
        return ModelConfig(**values)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from err


# MoE keys per layout: ours -> HF key. MiniCPM's dense configs may say num_experts: 0 (docs/recipe.md §2.1).
_MOE_KEYS = {"minicpm": {"num_experts": "num_experts", "num_experts_per_tok": "num_experts_per_tok"},
             "granite": {"num_experts": "num_local_experts", "num_experts_per_tok": "num_experts_per_tok",
                         "router_aux_loss_coef": "router_aux_loss_coef"}}


def _moe_values(hf: dict[str, Any], arch: str) -> dict[str, Any]:
    if not hf.get(_MOE_KEYS[arch]["num_experts"]):
        return {}
    return {ours: hf[key] for ours, key in _MOE_KEYS[arch].items() if key in hf}


def _reject_unsupported(hf: dict[str, Any], where: str) -> None:
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{where}: hidden_act={hf['hidden_act']!r}, MiniCPM uses 'silu'")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ConfigError(f"{where}: {key}=true, MiniCPM has no biases")


def hf_config_from_model(cfg: ModelConfig, arch: str, torch_dtype: str) -> dict[str, Any]:
    """The config.json for `arch`: 'minicpm' (vLLM, llama.cpp, MiniCPM remote code) or 'granite'."""
    if arch not in ARCHS:
        raise ConfigError(f"arch must be one of {ARCHS}, got {arch!r}")
    out: dict[str, Any] = {hf_key: getattr(cfg, ours) for ours, (hf_key, _) in _COMMON_KEYS.items()}
    out.update(num_key_value_heads=cfg.num_kv_heads, hidden_act="silu", tie_word_embeddings=cfg.tie_word_embeddings,
               attention_dropout=0.0, use_cache=True, torch_dtype=torch_dtype, dtype=torch_dtype)
    out.update(rope_to_hf(cfg, arch))
    if cfg.is_moe:
        out.update({key: getattr(cfg, ours) for ours, key in _MOE_KEYS[arch].items()})
    if arch == "minicpm":
        out.update(architectures=["MiniCPMForCausalLM"], model_type="minicpm", scale_emb=cfg.scale_emb,
                   scale_depth=cfg.scale_depth, dim_model_base=cfg.dim_model_base, pretraining_tp=1,
                   # Where transformers finds the remote code: ours (export-hf --remote-code) or OpenBMB's files.
                   auto_map=AUTO_MAP)
    else:
        out.update(architectures=["GraniteMoeForCausalLM" if cfg.is_moe else "GraniteForCausalLM"],
                   model_type="granitemoe" if cfg.is_moe else "granite",
                   embedding_multiplier=cfg.scale_emb, residual_multiplier=cfg.residual_scale,
                   logits_scaling=cfg.logit_divisor, attention_multiplier=1.0 / math.sqrt(cfg.head_dim),
                   attention_bias=False, mlp_bias=False)
    return out


def generation_config(cfg: ModelConfig) -> dict[str, Any]:
    # MiniCPM's published sampling defaults (docs/recipe.md §2.1).
    return {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
            "do_sample": True, "temperature": 0.8, "top_p": 0.8}
