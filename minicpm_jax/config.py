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
from typing import Any, ClassVar, Iterable, Mapping

import ml_collections

from minicpm_jax import rope_variants, storage
from minicpm_jax.errors import UserError

DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "save_dots", "save_dots_no_batch")
ROPE_SCALINGS = tuple(rope_variants.VARIANTS)  # default, linear, dynamic, longrope; ABF is a larger rope_theta
ROPE_DYNAMIC_MODES = ("per_length", "static")  # dynamic NTK: HF's rule per sequence length | vLLM's fixed base
ATTENTION_IMPLS = ("auto", "xla", "chunked", "cudnn", "splash")
PARAMETRIZATIONS = ("mup", "standard", "standard_fanin")
MOE_DISPATCH = ("dense", "grouped")
WEIGHT_DECAY_ON = ("2d", "all", "none")
SCHEDULES = ("wsd", "cosine", "cosine_loop", "constant")  # their builders: optim.make_schedule
DECAYS = ("exp", "linear", "cosine", "1-sqrt")  # WSD decay shapes; their formulas: optim.schedules


class ConfigError(UserError, ValueError):
    """A config value is missing, of the wrong type, or inconsistent with another value."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The MiniCPM decoder's hyperparameters (docs/recipe.md §1). Field names are ours; `hf.py` maps HF keys."""

    vocab_size: int = 122753  # tokenizer size; MiniCPM-2.4B's 120K SentencePiece vocabulary
    hidden_size: int = 2304  # d_m, the residual width
    intermediate_size: int = 5760  # d_ff of the SwiGLU MLP (2.5 · d_m)
    num_layers: int = 40  # L, decoder blocks (stacked and scanned)
    num_heads: int = 36  # query heads; head_dim = hidden_size / num_heads
    num_kv_heads: int = 36  # key/value heads (GQA when fewer than num_heads); must divide num_heads
    max_position_embeddings: int = 4096  # longest sequence trained on (exported to HF configs)
    rope_theta: float = 10000.0  # RoPE base θ (ABF, "adjusted base frequency", is just a larger θ; 128K: 1e6)
    rope_scaling: str = "default"  # default | linear (position interpolation) | dynamic (NTK) | longrope
    rope_factor: float = 1.0  # linear/dynamic scale factor (128K: dynamic, 4); longrope: max_pos / original max
    # dynamic NTK: per_length = HF's rule (base grows once max position + 1 exceeds max_position_embeddings);
    # static = vLLM's (the base for max_position_embeddings · factor at every length)
    rope_dynamic_mode: str = "per_length"
    rope_original_max_position_embeddings: int = 0  # longrope: context before extension (0 = max_position_embeddings)
    rope_short_factor: tuple[float, ...] = ()  # longrope: head_dim/2 divisors of the frequencies up to the original
    rope_long_factor: tuple[float, ...] = ()  # longrope: the same beyond it
    rms_norm_eps: float = 1e-5  # RMSNorm epsilon (the HF class default 1e-6 is not what checkpoints use)
    # The μP scalars are the paper's wind-tunnel optimum: scale_emb 12, scale_depth 1.4, init_std 0.1, base 256.
    scale_emb: float = 12.0  # embedding output multiplier
    scale_depth: float = 1.4  # residual branches are scaled by scale_depth / sqrt(num_layers)
    dim_model_base: float = 256  # μP base width; the final hidden is divided by hidden_size / dim_model_base
    init_std: float = 0.1  # std of the normal init of matrices (before any μP width scaling)
    tie_word_embeddings: bool = True  # the LM head reuses the input embedding
    bos_token_id: int = 1  # <s>
    eos_token_id: int = 2  # </s>
    dtype: str = "float32"  # compute dtype: float32 on CPU, bfloat16 on TPU/GPU
    param_dtype: str = "float32"  # parameter storage dtype
    # What the backward recomputes: none | full | save_dots | save_dots_no_batch. save_dots_no_batch keeps the
    # weight matmuls' outputs and recomputes the cheap elementwise work: measured on CPU (BENCHMARKS.md) as fast
    # as none, with 35-42% less training memory per token.
    remat_policy: str = "save_dots_no_batch"
    # mup: hidden matrices' init std and lr divided by the width ratio; standard: constant std, one lr (control);
    # standard_fanin: std ∝ 1/sqrt(fan_in), one lr (standard parametrization proper). model/parametrization.py.
    parametrization: str = "mup"
    # Whether μP scales the embedding's (and an untied head's) init and lr like a 2-D tensor (the paper's literal
    # Table 7 reading). Off by default: it starts the residual stream 1/sqrt(width ratio) smaller, and with it off
    # the coordinate check is flat across widths (tests/test_parametrization.py).
    embedding_in_2d_group: bool = False
    # Depth-μP for Adam: > 0 multiplies the hidden matrices' lr by sqrt(num_layers_base / num_layers), so that
    # an lr tuned at num_layers_base layers transfers in depth (docs/science.md); 0 = off (the paper's recipe).
    num_layers_base: int = 0
    # Mixture of experts (MiniCPM-MoE): every MLP becomes num_experts SwiGLU experts, top-k routed; 0 = dense.
    num_experts: int = 0
    num_experts_per_tok: int = 2  # k: experts per token; their router weights are renormalised to sum to 1
    moe_dispatch: str = "grouped"  # grouped: each expert runs only its tokens; dense: every expert sees every token
    moe_capacity_factor: float = 0.0  # 0 = dropless; c > 0 keeps at most ceil(c·k·tokens/experts) tokens per expert
    router_aux_loss_coef: float = 0.01  # Switch load-balancing loss weight (the paper's 0.01)
    router_z_loss_coef: float = 0.0  # router z-loss weight (ST-MoE uses 1e-3); 0 = off
    # auto: cuDNN flash attention on GPU (bf16/fp16), Pallas splash on TPU, elsewhere XLA dot-product up to
    # 2048 tokens and chunked (flash-style, memory linear in length) above | xla | chunked | cudnn | splash
    attention_impl: str = "auto"
    attention_block_size: int = 512  # query/key block of the chunked kernel (memory ~ length · block)

    # How the model computes, not what it computes: a run derived from another run's weights takes these from
    # its own config (derive.py), since they follow the hardware it runs on.
    COMPUTE_FIELDS: ClassVar[frozenset[str]] = frozenset({
        "dtype", "remat_policy", "attention_impl", "attention_block_size", "moe_dispatch", "moe_capacity_factor"})
    # How far positions reach (RoPE and the trained length): a long-context run changes them on the same weights.
    CONTEXT_FIELDS: ClassVar[frozenset[str]] = frozenset({
        "max_position_embeddings", "rope_theta", "rope_scaling", "rope_factor", "rope_dynamic_mode",
        "rope_original_max_position_embeddings", "rope_short_factor", "rope_long_factor"})

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
        return typed_section(cls, section, "model")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------------- checks

def require_int(key: str, value: Any, minimum: int = 1, or_minus_one: bool = False) -> None:
    """`value` is an int (not a bool) >= minimum, or -1 where `or_minus_one` ("the rest")."""
    if (isinstance(value, bool) or not isinstance(value, int)
            or (value < minimum and not (or_minus_one and value == -1))):
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigError(f"{key}={value!r} must be {what}{' or -1 (the rest)' if or_minus_one else ''}")


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def require_number(key: str, value: Any, low: float | None = None, high: float | None = None,
                   low_open: bool = False, high_open: bool = False) -> None:
    """`value` is a finite number in the interval from `low` to `high` (open ends where asked)."""
    inside = is_number(value) and (low is None or (value > low if low_open else value >= low)) and \
        (high is None or (value < high if high_open else value <= high))
    if not inside:
        bounds = f"{'(' if low_open else '['}{'-inf' if low is None else low}, {'inf' if high is None else high}" \
                 f"{')' if high_open or high is None else ']'}"
        raise ConfigError(f"{key}={value!r} must be a number in {bounds}")


def require_choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} must be one of {choices}")


# ---------------------------------------------------------------------------------------- the other sections

@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The `train` section: the run's length and batches, and what the loop logs and evaluates."""

    steps: int = 1000  # optimizer steps in the whole run (W + S + D of a WSD schedule must fit in it)
    global_batch_size: int = 8  # sequences per optimizer step, over all hosts (the paper: 4M tokens)
    seq_len: int = 512  # tokens per sequence (the paper: 4096)
    seed: int = 0  # parameter-init seed
    grad_accum_steps: int = 1  # micro-batches per step (same update as the whole batch, less memory)
    log_every_steps: int = 10  # one metrics.jsonl line and one progress line every N steps
    eval_every_steps: int = 0  # held-out evaluation on data.val_dir every N steps (0 = off)
    eval_batches: int = 8  # batches per evaluation
    # sequences per evaluation batch (0 = train.global_batch_size). Fix it (and eval_batches) to evaluate runs of
    # different batch sizes on the same held-out tokens: the packing of the held-out rows depends on it.
    eval_batch_size: int = 0
    peak_flops_per_device: float = 0.0  # for MFU; 0 = known TPU/H100/H200 peaks, else MFU is not reported
    # Log the decay-dynamics statistics (optim/update_stats.py) at every logged step: gradients of a fixed held-out
    # probe batch (the first update_stats_probe_batches eval batches of data.val_dir) before and after the step.
    # Costs 2 forward-backward passes on the probe per logged step and nothing when off.
    log_update_stats: bool = False
    wandb_project: str = ""  # also log to this W&B project (the wandb extra; "" = off); WANDB_* env as usual
    dead_run_windows: int = 5  # stop after this many log windows with grad norm 0 or loss at ln V (0 = never)
    update_stats_probe_batches: int = 1

    def __post_init__(self):
        for key in ("steps", "global_batch_size", "seq_len", "grad_accum_steps", "log_every_steps", "eval_batches"):
            require_int(f"train.{key}", getattr(self, key))
        require_int("train.eval_every_steps", self.eval_every_steps, minimum=0)
        require_int("train.dead_run_windows", self.dead_run_windows, minimum=0)
        require_int("train.eval_batch_size", self.eval_batch_size, minimum=0)
        require_int("train.update_stats_probe_batches", self.update_stats_probe_batches)
        require_number("train.peak_flops_per_device", self.peak_flops_per_device, low=0)
        if not isinstance(self.wandb_project, str):
            raise ConfigError(f"train.wandb_project must be a W&B project name (a string), got {self.wandb_project!r}")
        if self.global_batch_size % self.grad_accum_steps:
            raise ConfigError(f"train.grad_accum_steps={self.grad_accum_steps} must divide "
                              f"train.global_batch_size={self.global_batch_size}")


# Phase lengths are an int number of steps or a float fraction in [0, 1] of train.steps (optim.resolve_phases).
PHASE_KEYS = ("warmup_steps", "stable_steps", "decay_steps")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """The `schedule` section: the base learning rate over the run (optim.py builds it; docs/recipe.md §5)."""

    name: str = "wsd"  # wsd | cosine | cosine_loop | constant
    peak_lr: float = 0.01  # the paper's base lr; μP divides it per 2-D tensor by the width ratio
    warmup_steps: int | float = 0.01  # W: linear warmup from 0 to the peak (the paper does not report W)
    stable_steps: int | float = 0.89  # S: hold the peak
    decay_steps: int | float = 0.1  # D: decay to peak·final_lr_ratio (the paper: ~10% of tokens suffices)
    decay: str = "exp"  # exp (MiniCPM) | linear | cosine | 1-sqrt
    final_lr_ratio: float = 0.1  # r: lr at the end of the decay, relative to the peak (MiniCPM: 1e-2 -> 1e-3)
    decay_half_life_steps: float = 0  # > 0 with exp: r = 0.5^(D / half_life), MiniCPM's half-life form
    # T of Cosine(T) / CosineLoop(T): the step at which the (first) cosine reaches peak·r. 0 = train.steps (T = S);
    # an int is steps, a float a multiple of train.steps (1.25 = 1.25·S: the run ends above the floor). CosineLoop
    # restarts at the peak every T − W steps. Only for schedule.name cosine | cosine_loop (optim.cosine_horizon).
    cosine_steps: int | float = 0

    def __post_init__(self):
        require_choice("schedule.name", self.name, SCHEDULES)
        require_choice("schedule.decay", self.decay, DECAYS)
        require_number("schedule.peak_lr", self.peak_lr, low=0, low_open=True)
        require_number("schedule.final_lr_ratio", self.final_lr_ratio, low=0, high=1, low_open=self.decay == "exp")
        require_number("schedule.decay_half_life_steps", self.decay_half_life_steps or 0, low=0)
        if self.decay_half_life_steps and self.decay != "exp":
            raise ConfigError(f"schedule.decay_half_life_steps={self.decay_half_life_steps} only applies to "
                              f"schedule.decay='exp', not {self.decay!r}")
        for key in PHASE_KEYS:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"schedule.{key}={value!r} must be an int number of steps or a float fraction "
                                  f"in [0, 1] of train.steps")
        t = self.cosine_steps
        if isinstance(t, bool) or not isinstance(t, (int, float)) or t < 0 or (isinstance(t, float) and t == 0):
            raise ConfigError(f"schedule.cosine_steps={t!r} must be an int number of steps (0 = train.steps) or a "
                              f"float > 0, a multiple of train.steps")
        if t and self.name not in ("cosine", "cosine_loop"):
            raise ConfigError(f"schedule.cosine_steps={t!r} only applies to schedule.name='cosine' or "
                              f"'cosine_loop', not {self.name!r}")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The `optim` section. The paper reports only "Adam": betas, eps, weight decay and clipping are our choices."""

    b1: float = 0.9  # Adam first-moment decay
    b2: float = 0.95  # Adam second-moment decay
    eps: float = 1e-8  # Adam epsilon
    weight_decay: float = 0.1  # decoupled (AdamW), scaled by each tensor's lr like PyTorch param groups
    weight_decay_on: str = "2d"  # 2d (the tensors μP treats as 2-D) | all | none
    clip_grad_norm: float | None = 1.0  # global-norm gradient clipping (0 or None disables)

    def __post_init__(self):
        for key in ("b1", "b2"):
            require_number(f"optim.{key}", getattr(self, key), low=0, high=1, high_open=True)
        require_number("optim.eps", self.eps, low=0, low_open=True)
        require_number("optim.weight_decay", self.weight_decay, low=0)
        require_choice("optim.weight_decay_on", self.weight_decay_on, WEIGHT_DECAY_ON)
        if self.clip_grad_norm is not None:
            require_number("optim.clip_grad_norm", self.clip_grad_norm, low=0)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """The `checkpoint` section: when a run saves, and which saves it keeps (checkpoint.Retention)."""

    every_steps: int = 100  # save every N steps (and at the end, and on SIGTERM/SIGINT)
    keep_last: int = 3  # keep the latest N checkpoints of that cadence for resuming
    keep_every_steps: int = 0  # also save and keep every Mth step permanently, for branching (0 = none)
    async_save: bool = True  # write checkpoints in the background while training continues
    # Also save when this many minutes have passed since the last save (checked at log steps; 0 = off).
    # Such a save is a resume point only: the next save of any kind replaces it.
    every_minutes: float = 0.0

    def __post_init__(self):
        require_int("checkpoint.every_steps", self.every_steps)
        require_int("checkpoint.keep_last", self.keep_last)
        require_int("checkpoint.keep_every_steps", self.keep_every_steps, minimum=0)
        require_number("checkpoint.every_minutes", self.every_minutes, low=0)


MESH_AXES = ("data", "fsdp", "tensor", "expert", "sequence")
MESH_RULES = ("dp", "fsdp", "fsdp_tp")  # logical-axis rule presets (their tables: sharding.RULES)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The `mesh` section: devices per axis within a slice (ICI; one may be -1, the rest of the devices),
    slices across the data-center network (DCN) and the logical-axis rules preset."""

    data: int = 1  # pure data parallelism (parameters replicated across it)
    fsdp: int = -1  # ZeRO-3: batch and parameters split over it
    tensor: int = 1  # Megatron-style tensor parallelism (heads, MLP width, vocabulary)
    expert: int = 1  # expert parallelism (MoE)
    sequence: int = 1  # sequence (context) parallelism for long sequences
    dcn_data: int = 1  # multi-slice TPU: slices along data (across the data-center network)
    dcn_fsdp: int = 1  # multi-slice TPU: slices along fsdp
    rules: str = "fsdp"  # logical-axis rules preset: dp | fsdp | fsdp_tp

    def __post_init__(self):
        require_choice("mesh.rules", self.rules, MESH_RULES)
        for key in MESH_AXES:
            require_int(f"mesh.{key}", getattr(self, key), or_minus_one=True)
        for key in ("dcn_data", "dcn_fsdp"):
            require_int(f"mesh.{key}", getattr(self, key))
        if [getattr(self, a) for a in MESH_AXES].count(-1) > 1:
            raise ConfigError("at most one mesh axis may be -1 (the rest of the devices)")

    @classmethod
    def from_config(cls, section: Any) -> MeshConfig:
        return typed_section(cls, section, "mesh")

    @property
    def num_slices(self) -> int:
        return self.dcn_data * self.dcn_fsdp

    def ici_shape(self, devices_per_slice: int) -> dict[str, int]:
        """Axis sizes within a slice, with -1 resolved; raises ConfigError if they do not multiply out."""
        sizes = {axis: getattr(self, axis) for axis in MESH_AXES}
        known = math.prod(size for size in sizes.values() if size != -1)
        for axis, size in sizes.items():
            if size == -1:
                if devices_per_slice % known:
                    raise ConfigError(f"mesh.{axis}=-1: {devices_per_slice} devices per slice are not divisible by "
                                      f"the other axes' product {known}")
                sizes[axis] = devices_per_slice // known
        if math.prod(sizes.values()) != devices_per_slice:
            raise ConfigError(f"mesh {sizes} needs {math.prod(sizes.values())} devices per slice, "
                              f"but {devices_per_slice} are available")
        return sizes

    def shape(self, num_devices: int) -> dict[str, int]:
        """The full mesh shape (DCN × ICI) for `num_devices` devices."""
        if num_devices % self.num_slices:
            raise ConfigError(f"{num_devices} devices do not split into mesh.dcn_data × mesh.dcn_fsdp = "
                              f"{self.num_slices} slices")
        sizes = self.ici_shape(num_devices // self.num_slices)
        sizes["data"] *= self.dcn_data
        sizes["fsdp"] *= self.dcn_fsdp
        return sizes


# ------------------------------------------------------------------------------------------------- data
# Mixtures are given per training phase as a string `"DIR:WEIGHT,DIR:WEIGHT"` (a bare `DIR` has weight 1),
# because prepared folders are paths and ConfigDict keys cannot hold dots; the string form also works as a
# command-line override:
#         --config.data.mixtures.decay=data/demo/shakespeare/train:0.5,data/demo/bible/train:0.5
# Weights are fractions of *tokens* (normalised to sum 1). A phase without its own mixture uses the
# `stable` one.

PHASES = ("stable", "decay")
DEFAULT_PHASE = "stable"


Mixture = tuple[tuple[str, float], ...]  # (prepared dir, normalised token weight) per source


def _split_weight(item: str) -> tuple[str, str]:
    """"DIR:WEIGHT" -> (DIR, WEIGHT); a DIR alone (a URL's "gs://" is no weight) has weight "1"."""
    path, sep, weight = item.rpartition(":")
    if not sep or not path or "/" in weight:
        return item, "1"
    return path, weight


def _absolute_mixture(spec: str | Mapping[str, float]) -> str | dict[str, float]:
    """A mixture spec with every folder made absolute (storage.absolute), its weights as written."""
    if not isinstance(spec, str):
        return {storage.absolute(path): weight for path, weight in dict(spec).items()}
    items = (_split_weight(item) for item in filter(None, (s.strip() for s in spec.split(","))))
    return ",".join(f"{storage.absolute(path)}:{weight}" for path, weight in items)


def parse_mixture(spec: str | Mapping[str, float], key: str) -> Mixture:
    """`"a:0.7,b:0.3"` (or `{"a": 0.7, "b": 0.3}`) -> normalised ((dir, weight), ...)."""
    if isinstance(spec, str):
        pairs = []
        for item in filter(None, (s.strip() for s in spec.split(","))):
            path, weight = _split_weight(item)
            try:
                pairs.append((path, float(weight)))
            except ValueError:
                raise ValueError(f"{key}: weight of {path!r} must be a number, got {weight!r}") from None
    else:
        pairs = [(str(path), float(weight)) for path, weight in dict(spec).items()]
    if not pairs:
        raise ValueError(f"{key} names no prepared dataset; expected 'DIR:WEIGHT,DIR:WEIGHT'")
    for path, weight in pairs:
        if not weight > 0:
            raise ValueError(f"{key}: weight of {path!r} must be > 0, got {weight}")
    paths = [p for p, _ in pairs]
    duplicates = sorted({p for p in paths if paths.count(p) > 1})
    if duplicates:
        raise ValueError(f"{key} lists {duplicates} more than once")
    total = sum(w for _, w in pairs)
    return tuple((path, weight / total) for path, weight in pairs)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Training data: per-phase mixtures of prepared folders and the loader's knobs."""

    # Per training phase: "DIR:WEIGHT,DIR:WEIGHT" of prepared folders ("" decay -> the stable mixture), parsed
    mixtures: Mapping[str, Mixture] = dataclasses.field(default_factory=dict)
    # Per phase sequence length, a length curriculum (e.g. stable 4096 -> decay 32768); 0 or absent = train.seq_len
    seq_lens: Mapping[str, int] = dataclasses.field(default_factory=dict)
    shuffle_seed: int = 0  # seed of document shuffles, mixing and packing-bin order
    num_workers: int = 0  # Grain worker processes (0 = in-process)
    worker_buffer_size: int = 2  # batches prefetched per worker
    num_packing_bins: int = 0  # first-fit packing bins; 0 = local batch size (values below it are raised to it)
    num_shards: int = 0  # disjoint data shards (0 = one per process); fix it to keep the data when host counts change
    val_dir: str = ""  # prepared held-out folder (e.g. data/demo/shakespeare/val); "" = none
    tokenizer: str = ""  # SentencePiece .model; checked against the data's tokenizer sha256

    @staticmethod
    def raw_defaults() -> dict[str, Any]:
        """The section as a config file writes it (mixtures as strings, every phase named)."""
        fields = {f.name: f.default for f in dataclasses.fields(DataConfig) if f.default is not dataclasses.MISSING}
        return {"mixtures": {phase: "" for phase in PHASES}, "seq_lens": {phase: 0 for phase in PHASES}, **fields}

    @classmethod
    def from_config(cls, cfg_data: Any, check_paths: bool = True) -> DataConfig:
        """Reads a ConfigDict (or dict) `data` section; fails with the offending key before any compute.

        check_paths=False reads the section without requiring or opening any prepared folder (what an
        ahead-of-time compile needs: the phases' sequence lengths, not the data).
        """
        values = dict(cfg_data.to_dict() if hasattr(cfg_data, "to_dict") else cfg_data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise KeyError(f"unknown key(s) data.{', data.'.join(unknown)}; known: {sorted(known)}")
        raw_mixtures = dict(values.pop("mixtures", None) or {})
        bad_phases = sorted(set(raw_mixtures) - set(PHASES))
        if bad_phases:
            raise KeyError(f"data.mixtures has unknown phase(s) {bad_phases}; phases are {list(PHASES)}")
        if check_paths and not raw_mixtures.get(DEFAULT_PHASE):
            raise ValueError(f"data.mixtures.{DEFAULT_PHASE} is required: 'DIR:WEIGHT,DIR:WEIGHT' of prepared folders")
        mixtures = {phase: parse_mixture(spec, f"data.mixtures.{phase}")
                    for phase, spec in raw_mixtures.items() if spec}
        seq_lens = dict(values.pop("seq_lens", None) or {})
        bad_phases = sorted(set(seq_lens) - set(PHASES))
        if bad_phases:
            raise KeyError(f"data.seq_lens has unknown phase(s) {bad_phases}; phases are {list(PHASES)}")
        for phase, length in seq_lens.items():
            if isinstance(length, bool) or not isinstance(length, int) or length < 0:
                raise ValueError(f"data.seq_lens.{phase} must be an integer >= 0 (0 = train.seq_len), got {length!r}")
        config = cls(mixtures=mixtures, seq_lens={p: n for p, n in seq_lens.items() if n}, **values)
        config.validate(check_paths)
        return config

    def validate(self, check_paths: bool = True) -> None:
        for name in ("num_workers", "num_packing_bins", "num_shards"):
            if getattr(self, name) < 0:
                raise ValueError(f"data.{name} must be >= 0, got {getattr(self, name)}")
        if self.worker_buffer_size < 1:
            raise ValueError(f"data.worker_buffer_size must be >= 1, got {self.worker_buffer_size}")
        if not check_paths:
            return
        from minicpm_jax.data import records

        hashes = {}
        for phase, mixture in self.mixtures.items():
            for path, _ in mixture:
                try:
                    hashes[path] = records.read_manifest(path)["tokenizer"]["sha256"]
                except (FileNotFoundError, ValueError) as e:
                    raise ValueError(f"data.mixtures.{phase}: {e}") from e
        if self.val_dir:
            try:
                hashes[self.val_dir] = records.read_manifest(self.val_dir)["tokenizer"]["sha256"]
            except (FileNotFoundError, ValueError) as e:
                raise ValueError(f"data.val_dir: {e}") from e
        if len(set(hashes.values())) > 1:
            raise ValueError(f"prepared folders were tokenized with different tokenizers (sha256 by folder): {hashes}")
        if self.tokenizer:
            if not storage.is_file(self.tokenizer):
                raise FileNotFoundError(f"data.tokenizer: {self.tokenizer} not found")
            sha = storage.sha256(self.tokenizer)
            if hashes and sha not in hashes.values():
                raise ValueError(f"data.tokenizer {self.tokenizer} (sha256 {sha[:12]}…) is not the tokenizer the data "
                                 f"was prepared with ({next(iter(hashes.values()))[:12]}…)")

    def seq_len(self, phase: str, default: int) -> int:
        """The sequence length of `phase`: a length curriculum raises it from stable to decay (docs/recipe.md §9)."""
        if phase not in PHASES:
            raise KeyError(f"unknown phase {phase!r}; phases are {list(PHASES)}")
        return self.seq_lens.get(phase, default)

    def mixture(self, phase: str) -> Mixture:
        if phase not in PHASES:
            raise KeyError(f"unknown phase {phase!r}; phases are {list(PHASES)}")
        # A phase without its own mixture reads the stable one (the pipeline logs which mixture it opens).
        return self.mixtures.get(phase, self.mixtures[DEFAULT_PHASE])


# ------------------------------------------------------------------------------------ fine-tuning sections

@dataclasses.dataclass(frozen=True)
class InitConfig:
    """The `init` section of SFT and DPO runs (configs/sft.py, configs/dpo.py): the run they start from."""

    run: str = ""  # the source run directory (set by `sft`/`dpo --from`)
    step: int = -1  # its checkpoint; -1 = the latest
    parametrization: str = ""  # "" keeps the source's; e.g. "standard" for DPO without μP's lr split

    def __post_init__(self):
        require_int("init.step", self.step, minimum=0, or_minus_one=True)
        if self.parametrization:
            require_choice("init.parametrization", self.parametrization, PARAMETRIZATIONS)


DPO_LOSSES = ("sigmoid", "ipo")
DPO_REFERENCES = ("cached", "online")


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """The `dpo` section (configs/dpo.py)."""

    beta: float = 0.1  # strength of the KL tie to the reference (the paper does not report β; TRL's default)
    loss: str = "sigmoid"  # sigmoid (DPO) | ipo
    label_smoothing: float = 0.0  # ε of conservative DPO: the assumed fraction of flipped preference labels
    reference: str = "cached"  # cached: reference log-probs computed once up front | online: every step
    epochs: float = 1.0  # passes over the pairs; sets train.steps (the paper: 1 epoch)

    def __post_init__(self):
        require_number("dpo.beta", self.beta, low=0, low_open=True)
        require_choice("dpo.loss", self.loss, DPO_LOSSES)
        require_number("dpo.label_smoothing", self.label_smoothing, low=0, high=0.5, high_open=True)
        if self.label_smoothing and self.loss != "sigmoid":
            raise ConfigError("dpo.label_smoothing applies to dpo.loss='sigmoid' only")
        require_choice("dpo.reference", self.reference, DPO_REFERENCES)
        require_number("dpo.epochs", self.epochs, low=0, low_open=True)


# ------------------------------------------------------------------------------------------- the tree

# Every section a run config may hold, and its typed view; configs/base.py is `defaults()` of the first seven.
SECTIONS: dict[str, type] = {"model": ModelConfig, "train": TrainConfig, "schedule": ScheduleConfig,
                             "optim": OptimConfig, "checkpoint": CheckpointConfig, "mesh": MeshConfig,
                             "data": DataConfig, "init": InitConfig, "dpo": DPOConfig}
RUN_SECTIONS = ("model", "train", "schedule", "optim", "checkpoint", "mesh", "data")


def defaults() -> ml_collections.ConfigDict:
    """Every knob of a run with its default, as a config: what configs/base.py returns."""
    cfg = ml_collections.ConfigDict()
    for name in RUN_SECTIONS:
        cls = SECTIONS[name]
        cfg[name] = ml_collections.ConfigDict(cls.raw_defaults() if hasattr(cls, "raw_defaults")
                                              else dataclasses.asdict(cls()))
    for key in (*PHASE_KEYS, "cosine_steps"):  # typed `object`: an override keeps an int a step count, not a fraction
        cfg.schedule[key] = ml_collections.FieldReference(cfg.schedule[key], field_type=object)
    return cfg


def typed_section(cls: type, section: Any, name: str) -> Any:
    """The dataclass `cls` built from config section `name` (ConfigDict, dict or None for all defaults; an
    instance of `cls` is returned as it is).

    Unknown and missing keys are ConfigErrors that name them as `name.key`; the dataclass validates values.
    """
    if isinstance(section, cls):
        return section
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
                "num_kv_heads", "max_position_embeddings", "attention_block_size"):
        require_int(f"model.{key}", getattr(cfg, key))
    require_int("model.num_layers_base", cfg.num_layers_base, minimum=0)  # 0 = no depth-μP lr rule
    for key in ("rope_theta", "rms_norm_eps", "scale_emb", "scale_depth", "dim_model_base", "init_std"):
        require_number(f"model.{key}", getattr(cfg, key), low=0, low_open=True)
    if cfg.hidden_size % cfg.num_heads:
        raise ConfigError(f"model.num_heads={cfg.num_heads} must divide model.hidden_size={cfg.hidden_size} "
                          f"(head_dim = hidden_size / num_heads)")
    if cfg.head_dim % 2:
        raise ConfigError(f"head_dim = model.hidden_size / model.num_heads = {cfg.head_dim} must be even for RoPE")
    if cfg.num_heads % cfg.num_kv_heads:
        raise ConfigError(f"model.num_kv_heads={cfg.num_kv_heads} must divide model.num_heads={cfg.num_heads} (GQA)")
    for key, choices in (("dtype", DTYPES), ("param_dtype", DTYPES), ("parametrization", PARAMETRIZATIONS),
                         ("remat_policy", REMAT_POLICIES), ("attention_impl", ATTENTION_IMPLS)):
        require_choice(f"model.{key}", getattr(cfg, key), choices)
    _validate_rope(cfg)
    _validate_moe(cfg)


def _validate_moe(cfg: ModelConfig) -> None:
    require_int("model.num_experts", cfg.num_experts, minimum=0)  # 0 = dense
    if not cfg.is_moe:
        return
    k = cfg.num_experts_per_tok
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= cfg.num_experts:
        raise ConfigError(f"model.num_experts_per_tok must be between 1 and model.num_experts={cfg.num_experts}, "
                          f"got {k!r}")
    require_choice("model.moe_dispatch", cfg.moe_dispatch, MOE_DISPATCH)
    for key in ("moe_capacity_factor", "router_aux_loss_coef", "router_z_loss_coef"):
        require_number(f"model.{key}", getattr(cfg, key), low=0)


def _validate_rope(cfg: ModelConfig) -> None:
    """The RoPE scaling keys must describe exactly one variant (docs/recipe.md §1.5); stray values are errors."""
    require_choice("model.rope_scaling", cfg.rope_scaling, ROPE_SCALINGS)
    require_choice("model.rope_dynamic_mode", cfg.rope_dynamic_mode, ROPE_DYNAMIC_MODES)
    require_number("model.rope_factor", cfg.rope_factor, low=1)
    rope_variants.VARIANTS[cfg.rope_scaling].validate(cfg)


def validate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks every section `cfg` holds through its typed view (unknown keys, types, ranges) without reading
    any data; raises ConfigError naming the key. Makes its paths absolute first (`_make_paths_absolute`), so
    that the config means the same in any working directory. Cross-section rules (phases against train.steps,
    batch against mesh, prepared folders) are run_plan.plan_run's."""
    if "model" not in cfg:
        raise ConfigError("config has no 'model' section")
    _make_paths_absolute(cfg)
    for name in cfg:
        if name not in SECTIONS:
            _raise_unknown(name, cfg, name, known=SECTIONS)
        if name == "data":
            try:
                DataConfig.from_config(cfg.data, check_paths=False)
            except (KeyError, ValueError) as err:
                raise ConfigError(str(err).strip('"')) from err
        else:
            typed_section(SECTIONS[name], cfg[name], name)
    return cfg


def _make_paths_absolute(cfg: ml_collections.ConfigDict) -> None:
    """Rewrites the data folders, the tokenizer and init.run of `cfg` as absolute paths (URLs stay as they are).

    A relative path means the working directory of the command that gave it; stored absolute, a run's config
    means the same from any directory, and every process of a job reads the same paths.
    """
    data = cfg.get("data")
    if data is not None:
        for phase, spec in dict(data.get("mixtures") or {}).items():
            if spec:
                data.mixtures[phase] = _absolute_mixture(spec)
        for key in ("val_dir", "tokenizer"):
            if data.get(key):
                data[key] = storage.absolute(data[key])
    if cfg.get("init") is not None and cfg.init.get("run"):
        cfg.init.run = storage.absolute(cfg.init.run)


def load(path: str | os.PathLike, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
    """Loads `get_config()` from a config file, applies `a.b=v` overrides, validates, and returns it.

    Overrides may also be written `--config.a.b=v`, as on the command line. Values are parsed as
    Python literals (`4`, `1e-3`, `True`, `None`, `'x'`) and fall back to plain strings. A `.json` file
    (a run's resolved config.json) is read as data, with no code run.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        hint = ""
        if os.path.isfile(os.path.join(path, "config.json")):
            hint = f" (it is a run directory: pass {os.path.join(path, 'config.json')})"
        raise ConfigError(f"config file not found: {path}{hint}")
    cfg = _read_json_config(path) if path.endswith(".json") else _get_config(path)
    apply_overrides(cfg, overrides)
    return validate(cfg)


def _read_json_config(path: str) -> ml_collections.ConfigDict:
    import json

    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(value, dict):
        raise ConfigError(f"{path} holds a JSON {type(value).__name__}, not a config object")
    return ml_collections.ConfigDict(value)


def _get_config(path: str) -> ml_collections.ConfigDict:
    """Runs the config file `path` and returns its get_config(). A mistake in the file (a syntax error, a
    name it misspells, an exception it raises) is a ConfigError naming the file and the line."""
    import traceback

    module_name = "_minicpm_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{path} is not a Python config file (a .py with get_config(), or a run's config.json)")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ConfigError(f"config file {path} defines no get_config()")
        return module.get_config()
    except ConfigError:
        raise
    except SyntaxError as err:  # IndentationError too; the line is the file's own
        where = err.filename if err.filename and err.filename != "<unknown>" else path
        raise ConfigError(f"{where} line {err.lineno}: {err.msg}") from err
    except Exception as err:
        # The innermost line in this file or in a config it builds on (its folder: config.sibling) names the mistake.
        folder = os.path.dirname(os.path.abspath(path))
        frame = next((f for f in reversed(traceback.extract_tb(err.__traceback__))
                      if os.path.dirname(os.path.abspath(f.filename)) == folder), None)
        where = f"{frame.filename} line {frame.lineno}" if frame else path
        raise ConfigError(f"{where}: {type(err).__name__}: {err}") from err


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
        key, raw = split_override(item)
        _set_path(cfg, key, _parse_value(raw))


def split_override(item: str) -> tuple[str, str]:
    """(dotted key, raw value) of an `a.b=v` (or `--config.a.b=v`) override."""
    text = item[len("--config."):] if item.startswith("--config.") else item
    if "=" not in text:
        raise ConfigError(f"override {item} has no value: write {item}=VALUE")
    key, raw = text.split("=", 1)
    return key.strip(), raw.strip()


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


def _raise_unknown(key: str, node: Mapping, name: str, known: Iterable[str] | None = None) -> None:
    known = sorted(node.keys() if known is None else known)
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known keys here: {', '.join(known)}"
    raise ConfigError(f"unknown config key {key}{hint}")
