"""Hugging Face import/export: `load_hf` and `save_hf`, safetensors only (no pickle on any load path).

Tensor names are the HF/Llama ones (docs/recipe.md §2.2), shared by the MiniCPM and Granite layouts for dense
models; MoE layers are named per layout (docs/recipe.md §2.4), and config.json differs (`hf_config.py`).
HF stores each Linear as [out, in] per layer; we store
[in..., out...] stacked over layers, so conversion is a reshape, a transpose and a stack, nothing else:
import → export → import is bitwise exact in float32.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import os
from functools import reduce
from typing import Any, Iterator

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save

from minicpm_jax import storage
from minicpm_jax.config import ModelConfig
from minicpm_jax.errors import UserError
from minicpm_jax.files import read_json, write_json
from minicpm_jax.hf import remote_code as remote_code_files
from minicpm_jax.hf.config import detect_arch, generation_config, hf_config_from_model, model_config_from_hf
from minicpm_jax.model.transformer import MiniCPM

log = logging.getLogger(__name__)

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
MAX_SHARD_BYTES = 2 * 1000**3

# Per-layer tensors as (our path under `model.layers`, HF name under `model.layers.{i}.`, input axes of our
# array; 0 = copy as is).
_ATTENTION_TENSORS = (
    (("input_layernorm", "weight"), "input_layernorm.weight", 0),
    (("self_attn", "q_proj"), "self_attn.q_proj.weight", 1),
    (("self_attn", "k_proj"), "self_attn.k_proj.weight", 1),
    (("self_attn", "v_proj"), "self_attn.v_proj.weight", 1),
    (("self_attn", "o_proj"), "self_attn.o_proj.weight", 2),
    (("post_attention_layernorm", "weight"), "post_attention_layernorm.weight", 0),
)
_DENSE_MLP_TENSORS = (
    (("mlp", "gate_proj"), "mlp.gate_proj.weight", 1),
    (("mlp", "up_proj"), "mlp.up_proj.weight", 1),
    (("mlp", "down_proj"), "mlp.down_proj.weight", 1),
)
# MiniCPM-MoE (docs/recipe.md §2.4): one tensor per expert, w1 = gate, w3 = up, w2 = down.
_MINICPM_EXPERT_TENSORS = ((("mlp", "gate_proj"), "w1"), (("mlp", "up_proj"), "w3"), (("mlp", "down_proj"), "w2"))
_EMBED_NAME, _LM_HEAD_NAME = "model.embed_tokens.weight", "lm_head.weight"
# Non-persistent buffers that some old exports still contain; they carry no information we need.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointFormatError(UserError, ValueError):
    """An HF checkpoint folder is incomplete, damaged, or does not match its config.json."""


# What an import reads: float weights. Integer or quantized tensors (int8, float8, ...) would be cast to float
# and silently become other weights, so they are refused, naming the tensor.
IMPORT_DTYPES = ("float32", "bfloat16", "float16", "float64")


@dataclasses.dataclass(frozen=True)
class _Piece:
    """One block of our parameter `path`: the slice at `index` (layer, expert) of its leading axes.

    After indexing, the block's axes are [batch..., in..., out...] with `batch_axes` kept in front and
    `in_axes` input axes (0 = copied as is); HF stores it as [batch..., out, in].
    """

    path: tuple[str, ...]
    index: tuple[int, ...] = ()
    in_axes: int = 0
    batch_axes: int = 0


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """An HF tensor: its pieces concatenated along HF's output axis (Granite's fused gate/up experts)."""

    name: str
    pieces: tuple[_Piece, ...]


def _tensor_plan(cfg: ModelConfig, arch: str) -> Iterator[_Tensor]:
    """Every HF tensor of the model in checkpoint order, and where its values live in ours.

    Dense models share the Llama names in both layouts; MoE layers differ: MiniCPM keeps one tensor per
    expert, Granite stacks the experts and fuses gate and up (`GraniteMoeForCausalLM`'s checkpoint names).
    """
    yield _Tensor(_EMBED_NAME, (_Piece(("embed_tokens",)),))
    for layer in range(cfg.num_layers):
        prefix = f"model.layers.{layer}."
        mlp_tensors = () if cfg.is_moe else _DENSE_MLP_TENSORS
        for path, suffix, in_axes in _ATTENTION_TENSORS + mlp_tensors:
            yield _Tensor(prefix + suffix, (_Piece(("layers", *path), (layer,), in_axes),))
        if cfg.is_moe:
            yield from _expert_tensors(cfg, arch, layer, prefix)
    yield _Tensor("model.norm.weight", (_Piece(("norm", "weight")),))
    if not cfg.tie_word_embeddings:
        yield _Tensor(_LM_HEAD_NAME, (_Piece(("lm_head",), (), 1),))


def _expert_tensors(cfg: ModelConfig, arch: str, layer: int, prefix: str) -> Iterator[_Tensor]:
    router = _Piece(("layers", "mlp", "router"), (layer,), 1)
    if arch == "granite":
        yield _Tensor(prefix + "block_sparse_moe.router.layer.weight", (router,))
        gate, up, down = (_Piece(("layers", "mlp", name), (layer,), 1, batch_axes=1)
                          for name in ("gate_proj", "up_proj", "down_proj"))
        yield _Tensor(prefix + "block_sparse_moe.input_linear.weight", (gate, up))
        yield _Tensor(prefix + "block_sparse_moe.output_linear.weight", (down,))
        return
    yield _Tensor(prefix + "mlp.gate.weight", (router,))
    for expert in range(cfg.num_experts):
        for path, short in _MINICPM_EXPERT_TENSORS:
            yield _Tensor(f"{prefix}mlp.experts.{expert}.{short}.weight",
                          (_Piece(("layers", *path), (layer, expert), 1),))


def _to_hf(block: np.ndarray, piece: _Piece) -> np.ndarray:
    if piece.in_axes == 0:
        return block
    batch = block.shape[:piece.batch_axes]
    fan_in = math.prod(block.shape[piece.batch_axes:piece.batch_axes + piece.in_axes])
    return np.ascontiguousarray(np.swapaxes(block.reshape(*batch, fan_in, -1), -1, -2))


def _hf_shape(block_shape: tuple[int, ...], piece: _Piece) -> tuple[int, ...]:
    if piece.in_axes == 0:
        return block_shape
    split = piece.batch_axes + piece.in_axes
    return (*block_shape[:piece.batch_axes], math.prod(block_shape[split:]),
            math.prod(block_shape[piece.batch_axes:split]))


def _from_hf(array: np.ndarray, block_shape: tuple[int, ...], piece: _Piece) -> np.ndarray:
    return array.reshape(block_shape) if piece.in_axes == 0 else np.swapaxes(array, -1, -2).reshape(block_shape)


def _param(module: nnx.Module, path: tuple[str, ...]) -> nnx.Param:
    return reduce(getattr, path, module)


def _block_shape(model: MiniCPM, piece: _Piece) -> tuple[int, ...]:
    """The shape of one piece: its parameter's shape without the indexed leading axes."""
    return tuple(_param(model, piece.path).get_value().shape)[len(piece.index):]


def _tensor_shape(model: MiniCPM, tensor: _Tensor) -> tuple[int, ...]:
    shapes = [_hf_shape(_block_shape(model, piece), piece) for piece in tensor.pieces]
    if len(shapes) == 1:
        return shapes[0]
    return (*shapes[0][:-2], sum(shape[-2] for shape in shapes), shapes[0][-1])


# ----------------------------------------------------------------------------------------------- reading
class _SafetensorsFolder:
    """Lazy reader over `model.safetensors` or the shards listed in `model.safetensors.index.json`.

    safetensors memory-maps local files; a folder in a bucket is read from local copies (storage.stage).
    """

    def __init__(self, folder: str):
        self.folder = folder
        index_path = storage.join(folder, SAFE_INDEX)
        single_path = storage.join(folder, SAFE_SINGLE)
        self._handles: dict[str, Any] = {}
        if storage.is_file(index_path):
            self.file_of = shard_map(read_json(index_path), index_path)
        elif storage.is_file(single_path):
            self.file_of = {name: SAFE_SINGLE for name in self._handle(SAFE_SINGLE).keys()}
        else:
            hint = ""
            if any(n.startswith("pytorch_model") and n.endswith(".bin") for n in storage.listdir(folder)):
                hint = (" It holds pytorch_model*.bin (pickle), which is never loaded implicitly: convert it once "
                        f"with `minicpm-jax convert-bin --hf {folder} --out NEW_DIR`.")
            raise CheckpointFormatError(f"{folder}: neither {SAFE_SINGLE} nor {SAFE_INDEX} found.{hint}")
        for file in sorted(set(self.file_of.values())):
            if not storage.is_file(storage.join(folder, file)):
                raise CheckpointFormatError(f"{folder}: shard {file} named in {SAFE_INDEX} is missing")

    def _handle(self, file: str):
        """The open safetensors file `file`; a damaged one (its header, its size) is refused, naming it."""
        if file not in self._handles:
            path = storage.join(self.folder, file)
            try:
                self._handles[file] = safe_open(storage.stage(path), framework="numpy")
            except Exception as err:  # safetensors' SafetensorError: a header that does not parse, a short file
                raise CheckpointFormatError(f"{path} is not a readable safetensors file: {err}") from err
        return self._handles[file]

    def get(self, name: str) -> np.ndarray:
        file = self.file_of[name]
        try:
            return self._handle(file).get_tensor(name)
        except CheckpointFormatError:
            raise
        except Exception as err:  # a dtype numpy cannot hold, or data cut short
            raise CheckpointFormatError(f"{storage.join(self.folder, file)}: tensor {name} cannot be read: "
                                        f"{err}") from err

    def read(self, name: str, expected_shape: tuple[int, ...], cfg_hint: str) -> np.ndarray:
        if name not in self.file_of:
            raise CheckpointFormatError(f"{self.folder}: missing tensor {name} (expected shape {expected_shape} "
                                        f"from config.json: {cfg_hint})")
        where = storage.join(self.folder, self.file_of[name])
        dtype = _numpy_dtype_name(self._handle(self.file_of[name]).get_slice(name).get_dtype())
        if dtype not in IMPORT_DTYPES:
            raise CheckpointFormatError(f"{where}: tensor {name} has dtype {dtype}; an import reads float weights "
                                        f"({', '.join(IMPORT_DTYPES)}), and an integer or quantized checkpoint is not "
                                        f"supported (it would be cast to other weights)")
        array = self.get(name)
        if tuple(array.shape) != expected_shape:
            raise CheckpointFormatError(
                f"{where}: tensor {name} has shape {tuple(array.shape)}, "
                f"expected {expected_shape} from config.json ({cfg_hint})")
        bad = _count_non_finite(array)
        if bad:
            raise CheckpointFormatError(f"{where}: tensor {name} holds {bad} non-finite value(s) (NaN or inf) of "
                                        f"{array.size}; a model with them is not imported")
        return array


def shard_map(index: Any, index_path: str) -> dict[str, str]:
    """The tensor -> shard map of an index, each shard a file name inside the folder (never `../x` or `/x`)."""
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointFormatError(f"{index_path} has no weight_map object (tensor name -> shard file)")
    for name, file in weight_map.items():
        if (not isinstance(file, str) or not file or os.path.isabs(file) or "/" in file or "\\" in file
                or file in (".", "..")):
            raise CheckpointFormatError(f"{index_path}: shard {file!r} of tensor {name} is not a file name in the "
                                        f"folder; shards outside it are refused")
    return dict(weight_map)


# safetensors' dtype names (get_dtype) -> numpy's.
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "BOOL": "bool",
                       "I8": "int8", "U8": "uint8", "I16": "int16", "U16": "uint16", "I32": "int32", "U32": "uint32",
                       "I64": "int64", "U64": "uint64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def _numpy_dtype_name(safetensors_dtype: str) -> str:
    return _SAFETENSORS_DTYPES.get(safetensors_dtype, safetensors_dtype.lower())


def _count_non_finite(array: np.ndarray, chunk: int = 1 << 24) -> int:
    """How many values of `array` are NaN or ±inf, checked in chunks (a big embedding needs no second copy)."""
    flat = array.reshape(-1)
    return sum(int(flat.size - np.count_nonzero(np.isfinite(flat[i:i + chunk]))) for i in range(0, flat.size, chunk))


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    config_path = storage.join(path, "config.json")
    if not storage.is_file(config_path):
        raise CheckpointFormatError(f"{path}: no config.json")
    return read_json(config_path)


def load_hf(path: str | os.PathLike, *, param_dtype: str = "float32", dtype: str | None = None,
            **config_overrides: Any) -> tuple[MiniCPM, ModelConfig]:
    """Reads an HF MiniCPM or Granite folder (config.json + safetensors, single or sharded).

    Weights are cast to `param_dtype` (float32 by default, whatever the file holds). Returns the model
    and its ModelConfig. Tolerates what real MiniCPM folders do: no model_type, rope_theta or
    tie_word_embeddings key, and an lm_head that is absent or duplicated on tied models.
    """
    folder = os.fspath(path)
    overrides = dict(config_overrides, param_dtype=param_dtype, **({"dtype": dtype} if dtype else {}))
    cfg = model_config_from_hf(read_hf_config(folder), where=storage.join(folder, "config.json"), **overrides)
    reader = _SafetensorsFolder(folder)
    model = nnx.eval_shape(lambda: MiniCPM(cfg, rngs=nnx.Rngs(0)))
    hint = (f"hidden_size={cfg.hidden_size}, intermediate_size={cfg.intermediate_size}, "
            f"num_attention_heads={cfg.num_heads}, num_key_value_heads={cfg.num_kv_heads}, vocab_size={cfg.vocab_size}")

    arch = detect_arch(read_hf_config(folder), folder)
    consumed: set[str] = set()
    buffers: dict[tuple[str, ...], np.ndarray] = {}
    for tensor in _tensor_plan(cfg, arch):
        array = reader.read(tensor.name, _tensor_shape(model, tensor), hint)
        consumed.add(tensor.name)
        blocks = np.split(array, np.cumsum([_hf_shape(_block_shape(model, p), p)[-2] for p in tensor.pieces])[:-1],
                          axis=-2) if len(tensor.pieces) > 1 else [array]
        for piece, block in zip(tensor.pieces, blocks):
            if piece.path not in buffers:
                buffers[piece.path] = np.empty(_param(model, piece.path).get_value().shape, block.dtype)
            buffers[piece.path][piece.index] = _from_hf(block, _block_shape(model, piece), piece)
    for path_, buffer in buffers.items():
        _param(model, path_).set_value(jnp.asarray(buffer, dtype=param_dtype))

    _check_leftovers(reader, consumed, cfg, folder)
    return model, cfg


def _check_leftovers(reader: _SafetensorsFolder, consumed: set[str], cfg: ModelConfig, folder: str) -> None:
    leftover = sorted(n for n in set(reader.file_of) - consumed if not n.endswith(_IGNORED_SUFFIXES))
    if cfg.tie_word_embeddings and _LM_HEAD_NAME in leftover:
        # A duplicated head on a tied model is harmless if it equals the embedding.
        leftover.remove(_LM_HEAD_NAME)
        if not np.array_equal(reader.get(_LM_HEAD_NAME), reader.get(_EMBED_NAME)):
            log.warning("%s: config.json says tie_word_embeddings=true but lm_head.weight differs from "
                        "model.embed_tokens.weight; the head is tied to the embedding as config.json says", folder)
    if leftover:
        shown = ", ".join(leftover[:5]) + (f" and {len(leftover) - 5} more" if len(leftover) > 5 else "")
        raise CheckpointFormatError(f"{folder}: unexpected tensors not described by config.json: {shown}")


# ----------------------------------------------------------------------------------------------- writing
def hf_tensors(model: MiniCPM, dtype: str = "float32", arch: str = "minicpm") -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, array in `dtype`) for every tensor of `arch`'s layout, in checkpoint order."""
    arrays: dict[tuple[str, ...], np.ndarray] = {}

    def block(piece: _Piece) -> np.ndarray:
        if piece.path not in arrays:
            arrays[piece.path] = np.asarray(_param(model, piece.path)[...].astype(dtype))
        return _to_hf(arrays[piece.path][piece.index], piece)

    for tensor in _tensor_plan(model.config, arch):
        blocks = [block(piece) for piece in tensor.pieces]
        yield tensor.name, blocks[0] if len(blocks) == 1 else np.concatenate(blocks, axis=-2)


def save_hf(model: MiniCPM, cfg: ModelConfig | None, out: str | os.PathLike, *, arch: str = "minicpm",
            dtype: str = "float32", max_shard_bytes: int = MAX_SHARD_BYTES, overwrite: bool = False,
            remote_code: bool = False) -> list[str]:
    """Writes config.json, generation_config.json and safetensors shards (with an index when sharded) to `out`,
    a local folder or a gs:// or s3:// URL; each file is written atomically (storage.py), one shard in memory at
    a time.

    arch="minicpm" writes the MiniCPM layout (vLLM, llama.cpp's converter and MiniCPM's remote code);
    arch="granite" writes a checkpoint that transformers loads natively, with no remote code.
    remote_code (minicpm only) adds our configuration_minicpm.py and modeling_minicpm.py, which config.json's
    `auto_map` names, so that `AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)` loads it.
    Returns the written file names.
    """
    cfg = cfg or model.config
    if cfg != model.config:
        raise ValueError("cfg does not describe this model; pass the model's own config (or None)")
    hf_config = hf_config_from_model(cfg, arch, dtype)  # validates arch before anything is written
    check_remote_code(cfg, arch, remote_code)
    out = os.fspath(out)
    for name in stale_checkpoint(out, overwrite):
        storage.remove(storage.join(out, name))

    itemsize = jnp.dtype(dtype).itemsize
    sizes = {tensor.name: math.prod(_tensor_shape(model, tensor)) * itemsize for tensor in _tensor_plan(cfg, arch)}
    shard_of = _assign_shards(sizes, max_shard_bytes)
    count = max(shard_of.values()) + 1
    files = [SAFE_SINGLE] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    # Tensors arrive in shard order, so each shard is written as soon as it is full: peak memory is one shard.
    tensors_per_shard = collections.Counter(shard_of.values())
    pending: dict[str, np.ndarray] = {}
    for name, array in hf_tensors(model, dtype, arch):
        pending[name] = array
        if len(pending) == tensors_per_shard[shard_of[name]]:
            storage.write_bytes(storage.join(out, files[shard_of[name]]), save(pending, metadata={"format": "pt"}))
            pending = {}
    written = list(files)
    if count > 1:
        weight_map = {name: files[shard] for name, shard in shard_of.items()}
        write_json(storage.join(out, SAFE_INDEX), {"metadata": {"total_size": sum(sizes.values())},
                                                   "weight_map": weight_map}, sort_keys=True)
        written.append(SAFE_INDEX)
    write_json(storage.join(out, "config.json"), hf_config, sort_keys=True)
    write_json(storage.join(out, "generation_config.json"), generation_config(cfg), sort_keys=True)
    if remote_code:
        for name in remote_code_files.FILES:
            storage.copy_file(remote_code_files.FOLDER / name, storage.join(out, name))
        written += list(remote_code_files.FILES)
    log.info("wrote %s checkpoint (%s, %d shard(s), %.1f MB) to %s", arch, dtype, count,
             sum(sizes.values()) / 1e6, out)
    return written + ["config.json", "generation_config.json"]


def check_remote_code(cfg: ModelConfig, arch: str, remote_code: bool) -> None:
    """Raises ValueError when our remote code cannot serve an `arch` export of `cfg`. Writes nothing."""
    if not remote_code:
        return
    if arch != "minicpm":
        raise ValueError(f"remote code is for the minicpm layout; the {arch} layout loads natively in transformers")
    if cfg.rope_scaling not in remote_code_files.ROPE_SCALINGS:
        raise ValueError(f"the remote code implements RoPE scaling {', '.join(remote_code_files.ROPE_SCALINGS)}, "
                         f"not model.rope_scaling={cfg.rope_scaling!r}")


def stale_checkpoint(out: str, overwrite: bool) -> list[str]:
    """The checkpoint files already in `out` (for `overwrite` to replace); FileExistsError when there are some and
    `overwrite` is False. Writes nothing, so an export can check its target before it writes anything."""
    stale = [n for n in storage.listdir(out) if n.endswith(".safetensors") or n == SAFE_INDEX]
    if stale and not overwrite:
        raise FileExistsError(f"{out} already holds a checkpoint ({', '.join(sorted(stale)[:3])}); "
                              f"choose an empty folder, or replace it with --overwrite (overwrite=True in Python)")
    return stale


def _assign_shards(sizes: dict[str, int], max_bytes: int) -> dict[str, int]:
    """Consecutive tensors share a shard until it would exceed max_bytes (a lone big tensor gets its own)."""
    shard_of, shard, filled = {}, 0, 0
    for name, size in sizes.items():
        if filled and filled + size > max_bytes:
            shard, filled = shard + 1, 0
        shard_of[name] = shard
        filled += size
    return shard_of


