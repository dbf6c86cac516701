"""Configs: load `configs/*.py` files, apply `a.b=v` overrides, and validate before any compute.

A config file is an ml_collections module with `get_config() -> ConfigDict`. `configs/base.py` holds
every knob with its default; the other files start from it and override only what differs.
Typed views such as `ModelConfig` are frozen dataclasses built from a validated section, so that a bad
value fails here, with the key's name, and not deep inside a jitted function.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import math
import os
from typing import Any, Iterable, Mapping

import ml_collections

DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "save_dots", "save_dots_no_batch")
ROPE_SCALINGS = ("default", "linear", "dynamic", "longrope")  # ABF is "default" with a larger rope_theta
ROPE_DYNAMIC_MODES = ("per_length", "static")  # dynamic NTK: HF's rule per sequence length | vLLM's fixed base
ATTENTION_IMPLS = ("auto", "xla", "chunked", "cudnn", "splash")
PARAMETRIZATIONS = ("mup", "standard")
MOE_DISPATCH = ("dense", "grouped")


class ConfigError(ValueError):
    """A config value is missing, of the wrong type, or inconsistent with another value."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The MiniCPM decoder's hyperparameters (facts §1.1). Field names are ours; `hf.py` maps HF keys."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: str = "default"
    rope_factor: float = 1.0
    rope_dynamic_mode: str = "per_length"
    rope_original_max_position_embeddings: int = 0
    rope_short_factor: tuple[float, ...] = ()
    rope_long_factor: tuple[float, ...] = ()
    rms_norm_eps: float = 1e-5
    scale_emb: float = 1.0
    scale_depth: float = 1.0
    dim_model_base: float = 256
    init_std: float = 0.1
    tie_word_embeddings: bool = True
    bos_token_id: int = 1
    eos_token_id: int = 2
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat_policy: str = "none"
    parametrization: str = "mup"
    embedding_in_2d_group: bool = False
    # Mixture of experts (facts §2.3, §7.2): 0 experts is the dense model.
    num_experts: int = 0
    num_experts_per_tok: int = 2
    moe_dispatch: str = "grouped"
    moe_capacity_factor: float = 0.0
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.0
    attention_impl: str = "auto"
    attention_block_size: int = 512

    def __post_init__(self):
        # JSON and ConfigDicts hand back lists; tuples keep the config hashable (it is static under jit).
        for key in ("rope_short_factor", "rope_long_factor"):
            object.__setattr__(self, key, tuple(float(f) for f in (getattr(self, key) or ())))
        _validate_model(self)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def residual_scale(self) -> float:
        """α = scale_depth/√L, the multiplier on every branch output before it joins the residual."""
        return self.scale_depth / math.sqrt(self.num_layers)

    @property
    def width_ratio(self) -> float:
        """r = hidden/dim_model_base: μP's width multiplier over the tuned base model."""
        return self.hidden_size / self.dim_model_base

    @property
    def logit_divisor(self) -> float:
        """m = r; the final hidden state is divided by m before the head (μP's output scaling)."""
        return self.width_ratio

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def router_loss_coefficients(self) -> dict[str, float]:
        """Weight of each router loss the model reports, as added to the LM loss (empty when dense)."""
        if not self.is_moe:
            return {}
        return {"load_balance": self.router_aux_loss_coef, "router_z": self.router_z_loss_coef}

    @classmethod
    def from_config(cls, section: Mapping[str, Any] | "ModelConfig") -> "ModelConfig":
        """Build from the `model` section of a config (ConfigDict or dict); unknown keys are errors."""
        if isinstance(section, ModelConfig):
            return section
        return typed_section(cls, section, "model")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def typed_section(cls: type, section: Any, name: str) -> Any:
    """The dataclass `cls` built from config section `name` (ConfigDict, dict or None for all defaults).

    Unknown and missing keys are ConfigErrors that name them as `name.key`; the dataclass validates values.
    """
    values = dict(section.to_dict() if hasattr(section, "to_dict") else (section or {}))
    fields = dataclasses.fields(cls)
    unknown = sorted(set(values) - {f.name for f in fields})
    if unknown:
        raise ConfigError(f"unknown key(s) in {name} config: {', '.join(f'{name}.{k}' for k in unknown)}; "
                          f"known keys: {', '.join(sorted(f.name for f in fields))}")
    missing = [f.name for f in fields if f.default is dataclasses.MISSING and f.name not in values]
    if missing:
        raise ConfigError(f"missing key(s) in {name} config: {', '.join(f'{name}.{k}' for k in missing)}")
    return cls(**values)


def _validate_model(cfg: ModelConfig) -> None:
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                "num_kv_heads", "max_position_embeddings"):
        value = getattr(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"model.{key} must be a positive integer, got {value!r}")
    for key in ("rope_theta", "rms_norm_eps", "scale_emb", "scale_depth", "dim_model_base", "init_std"):
        value = getattr(cfg, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"model.{key} must be a positive number, got {value!r}")
    if cfg.hidden_size % cfg.num_heads:
        raise ConfigError(f"model.num_heads={cfg.num_heads} must divide model.hidden_size={cfg.hidden_size} "
                          f"(head_dim = hidden_size / num_heads)")
    if cfg.head_dim % 2:
        raise ConfigError(f"head_dim = model.hidden_size / model.num_heads = {cfg.head_dim} must be even for RoPE")
    if cfg.num_heads % cfg.num_kv_heads:
        raise ConfigError(f"model.num_kv_heads={cfg.num_kv_heads} must divide model.num_heads={cfg.num_heads} (GQA)")
    for key in ("dtype", "param_dtype"):
        if getattr(cfg, key) not in DTYPES:
            raise ConfigError(f"model.{key} must be one of {DTYPES}, got {getattr(cfg, key)!r}")
    if cfg.parametrization not in PARAMETRIZATIONS:
        raise ConfigError(f"model.parametrization must be one of {PARAMETRIZATIONS}, got {cfg.parametrization!r}")
    if cfg.remat_policy not in REMAT_POLICIES:
        raise ConfigError(f"model.remat_policy must be one of {REMAT_POLICIES}, got {cfg.remat_policy!r}")
    if cfg.attention_impl not in ATTENTION_IMPLS:
        raise ConfigError(f"model.attention_impl must be one of {ATTENTION_IMPLS}, got {cfg.attention_impl!r}")
    if isinstance(cfg.attention_block_size, bool) or not isinstance(cfg.attention_block_size, int) or \
            cfg.attention_block_size < 1:
        raise ConfigError(f"model.attention_block_size must be a positive integer, got {cfg.attention_block_size!r}")
    _validate_rope(cfg)
    _validate_moe(cfg)


def _validate_moe(cfg: ModelConfig) -> None:
    if isinstance(cfg.num_experts, bool) or not isinstance(cfg.num_experts, int) or cfg.num_experts < 0:
        raise ConfigError(f"model.num_experts must be 0 (dense) or a positive integer, got {cfg.num_experts!r}")
    if not cfg.is_moe:
        return
    k = cfg.num_experts_per_tok
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= cfg.num_experts:
        raise ConfigError(f"model.num_experts_per_tok must be between 1 and model.num_experts={cfg.num_experts}, "
                          f"got {k!r}")
    if cfg.moe_dispatch not in MOE_DISPATCH:
        raise ConfigError(f"model.moe_dispatch must be one of {MOE_DISPATCH}, got {cfg.moe_dispatch!r}")
    for key in ("moe_capacity_factor", "router_aux_loss_coef", "router_z_loss_coef"):
        value = getattr(cfg, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(f"model.{key} must be a number >= 0, got {value!r}")


def _validate_rope(cfg: ModelConfig) -> None:
    """The RoPE scaling keys must describe exactly one variant (facts §1.3); stray values are errors."""
    if cfg.rope_scaling not in ROPE_SCALINGS:
        raise ConfigError(f"model.rope_scaling must be one of {ROPE_SCALINGS}, got {cfg.rope_scaling!r}")
    if cfg.rope_dynamic_mode not in ROPE_DYNAMIC_MODES:
        raise ConfigError(f"model.rope_dynamic_mode must be one of {ROPE_DYNAMIC_MODES}, got {cfg.rope_dynamic_mode!r}")
    factor = cfg.rope_factor
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor >= 1:
        raise ConfigError(f"model.rope_factor must be a number >= 1, got {factor!r}")
    if cfg.rope_scaling == "default" and factor != 1:
        raise ConfigError(f"model.rope_factor={factor} has no effect with model.rope_scaling='default'; "
                          f"set rope_scaling to linear, dynamic or longrope (ABF only raises model.rope_theta)")
    longrope = cfg.rope_scaling == "longrope"
    if not longrope and (cfg.rope_short_factor or cfg.rope_long_factor or cfg.rope_original_max_position_embeddings):
        raise ConfigError("model.rope_short_factor, rope_long_factor and rope_original_max_position_embeddings "
                          f"only apply to model.rope_scaling='longrope', not {cfg.rope_scaling!r}")
    if longrope:
        for key in ("rope_short_factor", "rope_long_factor"):
            if len(getattr(cfg, key)) != cfg.head_dim // 2:
                raise ConfigError(f"model.{key} has {len(getattr(cfg, key))} values; longrope needs head_dim/2 = "
                                  f"{cfg.head_dim // 2}")
        original = cfg.rope_original_max_position_embeddings
        if isinstance(original, bool) or not isinstance(original, int) or original < 0:
            raise ConfigError(f"model.rope_original_max_position_embeddings must be an integer >= 0 "
                              f"(0 = max_position_embeddings), got {original!r}")


def validate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks every section that has a typed view; raises ConfigError naming the key."""
    if "model" not in cfg:
        raise ConfigError("config has no 'model' section")
    ModelConfig.from_config(cfg.model)
    return cfg


def load(path: str | os.PathLike, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
    """Loads `get_config()` from a config file, applies `a.b=v` overrides, validates, and returns it.

    Overrides may also be written `--config.a.b=v`, as on the command line. Values are parsed as
    Python literals (`4`, `1e-3`, `True`, `None`, `'x'`) and fall back to plain strings.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    cfg = _get_config(path)
    apply_overrides(cfg, overrides)
    return validate(cfg)


def _get_config(path: str) -> ml_collections.ConfigDict:
    module_name = "_minicpm_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} defines no get_config()")
    return module.get_config()


def sibling(anchor_file: str, name: str) -> ml_collections.ConfigDict:
    """`get_config()` of the config file `name`.py next to `anchor_file`; lets configs build on base.py.

    Used as `cfg = sibling(__file__, "base")` inside a config file, so configs need not be a package.
    """
    path = os.path.join(os.path.dirname(os.path.abspath(anchor_file)), f"{name}.py")
    if not os.path.isfile(path):
        raise ConfigError(f"{anchor_file}: builds on {path}, which does not exist")
    return _get_config(path)


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Iterable[str]) -> None:
    for item in overrides:
        text = item[len("--config."):] if item.startswith("--config.") else item
        if "=" not in text:
            raise ConfigError(f"override {item!r} is not of the form a.b=value")
        key, raw = text.split("=", 1)
        _set_path(cfg, key.strip(), _parse_value(raw.strip()))


def _parse_value(raw: str) -> Any:
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def _set_path(cfg: ml_collections.ConfigDict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = cfg
    for depth, name in enumerate(parents):
        if name not in node or not isinstance(node[name], ml_collections.ConfigDict):
            _raise_unknown(".".join(parents[:depth + 1]), node, name)
        node = node[name]
    if leaf not in node:
        _raise_unknown(key, node, leaf)
    current = node[leaf]
    try:  # ConfigDict lets an int stand for a float (lr=1 is fine) and rejects other type changes
        node[leaf] = value
    except TypeError as err:
        raise ConfigError(f"config key {key}: cannot set {value!r} ({type(value).__name__}) where "
                          f"{type(current).__name__} is expected") from err


def _raise_unknown(key: str, node: ml_collections.ConfigDict, name: str) -> None:
    close = difflib.get_close_matches(name, list(node.keys()), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known keys here: {', '.join(sorted(node.keys()))}"
    raise ConfigError(f"unknown config key {key}{hint}")
