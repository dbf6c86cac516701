"""Per-device memory of one training step, estimated from abstract shapes: nothing is allocated.

This is an ESTIMATE. `estimate(cfg, num_devices)` adds up, for one device of the mesh that `cfg.mesh`
gives on `num_devices` devices (the 2.4B model costs nothing to plan):

  parameters   each parameter's shard in model.param_dtype: a dimension whose logical name the rules
               preset maps to mesh axes of total size k holds ceil(dim / k) entries per device.
  optimizer    the state `optim.make_optimizer` builds, shaped by jax.eval_shape(tx.init): AdamW's mu and
               nu shard like their parameters (optax keeps them in the parameter dtype, float32 by
               default); the step counts are whole on every device.
  gradients    one per parameter shard, in the parameter dtype; twice that with grad_accum_steps > 1
               (the running sum and the micro-batch's gradient).
  gathered     under FSDP each weight is all-gathered for use: one layer's weights and the embedding
               (and an untied head), in the compute dtype, plus their gradients before the reduce-scatter.
               An upper bound: XLA may free the gathered embedding between its two uses.
  activations  one micro-batch per device: b = ceil(global_batch / grad_accum / (data·fsdp)) rows of
               t = ceil(seq_len / sequence) tokens (N = b·t); heads, kv heads, MLP width and vocabulary
               divided by the mesh axes the rules give them (tensor under fsdp_tp). Keys stay whole, so
               the attention probabilities per layer are P = b·heads·t·seq_len entries when the XLA attention
               kernel materialises them, P = 0 for the flash-style kernels (chunked, cudnn, splash) that the
               platform's `auto` picks at long lengths or on TPU. With c = bytes of model.dtype and
               h = head_dim, one layer saves:
                 none      S = N·d·(2c + 24)              layer input, residual after attention, and per
                                                           RMSNorm three float32-sized copies (x, x·rsqrt, out)
                             + N·h·(2·heads + 2·kv)·c     q and k after RoPE, v, attention output
                             + P·(4 + c)                  exponentiated scores (float32) and probabilities
                             + 6·N·d_ff·c                 SwiGLU: gate and up outputs, sigmoid, silu, product
                 full      S = N·d·c                      the residual-stream input only
                 save_dots S = N·d·c + dots + P·4 + N·heads·h·c   (every matmul output: also the float32
                                                           attention scores and probabilities·v)
                 save_dots_no_batch  S = N·d·c + dots, dots = N·h·(heads + 2·kv)·c + 2·N·d·c + 2·N·d_ff·c
               activations = L·S + max(logits phase, layer backward) + P bytes (bool mask over heads)
                             + N·d·c (embedding output) + 5 int32 [b, t] batch arrays, where
                 logits phase   = 2·N·vocab·4 + N·d·(24 + c): the float32 logits and their softmax (forward),
                                  then the softmax and the logits' gradient (backward); the final norm's copies
                 layer backward = (S_none − S, for remat policies: one layer rebuilt) + 2·P·4 (the float32
                                  gradients of the probabilities and of the scores).
               This follows the residuals JAX saves for this model (jax.ad_checkpoint.print_saved_residuals).
               Checked: XLA:CPU's compiled temp bytes within ~12% for every policy in float32
               (tests/test_memory_plan.py); on an H200 the measured peak within ~9% for none, full and
               save_dots_no_batch in float32 and bfloat16 (save_dots: 7% under). XLA:CPU keeps extra float32
               copies of bfloat16 tensors, so bfloat16 plans for the CPU run ~30% low.

Ignored: XLA's other temporaries and fusion choices (it may keep more or fewer copies on TPU/GPU),
allocator fragmentation, collective buffers, the compiled program, and the runtime's own reservation;
hence `fits` keeps a headroom (90% of the memory usable by default).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from minicpm_jax.parallel import devices

GiB = devices.GiB
# Memory per device (chip for TPU, GPU for NVIDIA), from the device table; "cpu" (None) is this machine's RAM.
DEVICE_MEMORY = {device.name: device.hbm_bytes for device in devices.DEVICES}
_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device of one training step (an estimate; see the module docstring)."""

    num_devices: int
    mesh_shape: dict[str, int]
    rules: str
    remat_policy: str
    rows_per_device: int  # micro-batch rows on one device
    tokens_per_row: int  # sequence positions of a row on one device
    param_bytes: int
    opt_state_bytes: int
    grad_bytes: int
    gathered_bytes: int
    activation_bytes: int
    notes: tuple[str, ...] = ()

    @property
    def total_bytes(self) -> int:
        return (self.param_bytes + self.opt_state_bytes + self.grad_bytes + self.gathered_bytes
                + self.activation_bytes)


@dataclasses.dataclass(frozen=True)
class Fit:
    """Whether a plan fits a device's memory; truthy when it does. margin_bytes < 0 is the shortfall."""

    device: str
    capacity_bytes: int
    usable_bytes: int
    required_bytes: int

    @property
    def margin_bytes(self) -> int:
        return self.usable_bytes - self.required_bytes

    def __bool__(self) -> bool:
        return self.margin_bytes >= 0


# The usual slice shapes per chip count, by the torus of the device table: 2-D for v5e/v6e, 3-D for v4/v5p.
_SLICE_SHAPES = {
    "2d": {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"},
    "3d": {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8", 512: "8x8x8"},
}


def slice_topology(device: str, chips: int) -> str | None:
    """The topology name of a slice of `chips` chips of `device` (v5e, v5p, v4, v6e), or None if unusual."""
    torus = devices.BY_NAME[device].torus if device in devices.BY_NAME else None
    return f"{device}:{_SLICE_SHAPES[torus][chips]}" if torus and chips in _SLICE_SHAPES[torus] else None


def device_name(device_kind: str) -> str | None:
    """The DEVICE_MEMORY name of a jax device kind ("TPU v5 lite" -> "v5e"), or None if unknown."""
    device = devices.from_kind(device_kind)
    return device.name if device else None


def device_memory(device: str) -> int:
    if device not in DEVICE_MEMORY:
        raise ValueError(f"unknown device {device!r}; known: {', '.join(DEVICE_MEMORY)}")
    if DEVICE_MEMORY[device] is not None:
        return DEVICE_MEMORY[device]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    except (OSError, StopIteration):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def fits(plan: MemoryPlan, device: str, headroom: float = 0.9) -> Fit:
    """Does `plan` fit one `device` (v4, v5e, v5p, v6e, h100, h200, cpu) using `headroom` of its memory?"""
    capacity = device_memory(device)
    return Fit(device, capacity, int(capacity * headroom), plan.total_bytes)


def estimate(cfg: Any, num_devices: int, platform: str = "cpu") -> MemoryPlan:
    """Per-device memory plan for training `cfg` (a loaded config) on `num_devices` devices of `platform`
    (cpu, gpu, tpu: it decides the attention kernel, and so whether the scores are materialised)."""
    import jax
    from flax import nnx

    from minicpm_jax import optim
    from minicpm_jax.config import ConfigError, MeshConfig, ModelConfig
    from minicpm_jax.model import MiniCPM
    from minicpm_jax.model.attention_kernels import resolve_impl
    from minicpm_jax.parallel import mesh as sharding

    m = ModelConfig.from_config(cfg.model)
    mesh_cfg = MeshConfig.from_config(cfg.get("mesh"))
    mesh = mesh_cfg.shape(num_devices)
    rules = dict(sharding.RULES[mesh_cfg.rules])

    def ways(name: str | None, mesh_shape: dict[str, int] = mesh) -> int:
        axes = rules.get(name) if name is not None else None
        return math.prod(mesh_shape[a] for a in ((axes,) if isinstance(axes, str) else tuple(axes or ())))

    def local_elems(shape, names, mesh_shape=mesh) -> int:
        return math.prod(-(-dim // ways(name, mesh_shape)) for dim, name in zip(shape, names))

    abstract = nnx.eval_shape(lambda: MiniCPM(m, rngs=nnx.Rngs(0)))
    names_by_path = sharding.logical_axes(abstract)
    params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    shapes = {sharding.key_names(path): leaf.shape
              for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    p_size, c = _ITEMSIZE[m.param_dtype], _ITEMSIZE[m.dtype]
    local = {path: local_elems(shape, names_by_path[path]) for path, shape in shapes.items()}
    param_bytes = sum(local.values()) * p_size

    # The optimizer state exactly as built for training; a leaf shaped like a parameter at the end of its
    # path is that parameter's moment and shards like it, the rest (step counts) is replicated.
    tx = optim.make_optimizer(cfg.get("optim") or {}, optim.constant_schedule(1.0), params, m)
    opt_bytes = sum((local[owner] if owner else math.prod(leaf.shape)) * leaf.dtype.itemsize
                    for leaf, owner in sharding.state_owners(jax.eval_shape(tx.init, params), params))

    accum = cfg.train.get("grad_accum_steps", 1)
    grad_bytes = param_bytes * (1 if accum == 1 else 2)

    # FSDP gathers each weight split over `fsdp` for use (layers one at a time), still split over other axes.
    unsplit, gathered = {**mesh, "fsdp": 1}, 0
    for path, shape in shapes.items():
        names = names_by_path[path]
        whole = local_elems(shape, names, unsplit)
        if whole != local[path]:
            gathered += 2 * c * whole // (shape[0] if names[0] == "layers" else 1)

    micro, seq = cfg.train.global_batch_size // accum, cfg.train.seq_len
    b, t = -(-micro // ways("act_batch")), -(-seq // ways("act_length"))
    notes = []
    if micro % ways("act_batch") or seq % ways("act_length"):
        notes.append(f"{micro} rows × {seq} tokens per micro-batch do not divide over the mesh "
                     f"(data×fsdp={ways('act_batch')}, sequence={ways('act_length')}); training would refuse it")
    try:
        sharding.check_divisibility(abstract, mesh, mesh_cfg.rules)
    except ConfigError as err:  # planned anyway, with ceil(dim / k) per device
        notes.append(str(err))
    n, kv = -(-m.num_heads // ways("heads")), -(-m.num_kv_heads // ways("kv_heads"))
    f, vocab = -(-m.intermediate_size // ways("mlp")), -(-m.vocab_size // ways("vocab"))
    if m.is_moe:  # each token's MLP activations exist once per chosen expert
        f *= m.num_experts_per_tok
    kernel = resolve_impl(m.attention_impl, platform=platform, dtype=m.dtype, length=t, has_segments=True,
                          sequence_sharded=ways("act_length") > 1)
    # Only the xla kernel holds T×S scores; the flash-style ones (chunked, cudnn, splash) hold O(T·block).
    activation_bytes = _activations(m, m.remat_policy, b, t, seq if kernel == "xla" else 0, n, kv, f, vocab, c)
    return MemoryPlan(num_devices, mesh, mesh_cfg.rules, m.remat_policy, b, t, param_bytes, opt_bytes, grad_bytes,
                      gathered, activation_bytes, tuple(notes))


def _activations(m, policy: str, b: int, t: int, seq: int, n: int, kv: int, f: int, vocab: int, c: int) -> int:
    """The formula of the module docstring (bytes per device of one micro-batch); seq = 0: no scores held."""
    d, h, tokens = m.hidden_size, m.head_dim, b * t
    probs = b * n * t * seq
    dots = tokens * h * (n + 2 * kv) * c + 2 * tokens * d * c + 2 * tokens * f * c
    saved = {
        "none": tokens * d * (2 * c + 24) + tokens * h * (2 * n + 2 * kv) * c + probs * (4 + c) + 6 * tokens * f * c,
        "full": tokens * d * c,
        "save_dots": tokens * d * c + dots + probs * 4 + tokens * n * h * c,
        "save_dots_no_batch": tokens * d * c + dots,
    }
    rebuilt = max(saved["none"] - saved[policy], 0) if policy != "none" else 0
    layer_backward = rebuilt + 2 * probs * 4
    logits_phase = 2 * tokens * vocab * 4 + tokens * d * (24 + c)
    fixed = probs + tokens * d * c + 5 * b * t * 4
    return m.num_layers * saved[policy] + max(logits_phase, layer_backward) + fixed
