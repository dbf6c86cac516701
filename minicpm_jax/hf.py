"""Hugging Face import/export: `load_hf` and `save_hf`, safetensors only (no pickle on any load path).

Tensor names are the HF/Llama ones (facts §2.2) and are shared by the MiniCPM and Granite layouts;
only config.json differs (see `hf_config.py`). HF stores each Linear as [out, in] per layer; we store
[in..., out...] stacked over layers, so conversion is a reshape, a transpose and a stack, nothing else:
import → export → import is bitwise exact in float32.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
from functools import reduce
from typing import Any, Iterator

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from minicpm_jax.config import ModelConfig
from minicpm_jax.hf_config import generation_config, hf_config_from_model, model_config_from_hf
from minicpm_jax.model.transformer import MiniCPM

log = logging.getLogger(__name__)

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
MAX_SHARD_BYTES = 2 * 1000**3

# (path of our parameter, HF tensor name, number of leading "input" axes of our array; 0 = copy as is).
# Per-layer paths are relative to `model.layers` (arrays stacked over a leading layer axis) and their
# HF names are relative to `model.layers.{i}.`.
_LAYER_TENSORS = (
    (("input_layernorm", "weight"), "input_layernorm.weight", 0),
    (("self_attn", "q_proj"), "self_attn.q_proj.weight", 1),
    (("self_attn", "k_proj"), "self_attn.k_proj.weight", 1),
    (("self_attn", "v_proj"), "self_attn.v_proj.weight", 1),
    (("self_attn", "o_proj"), "self_attn.o_proj.weight", 2),
    (("post_attention_layernorm", "weight"), "post_attention_layernorm.weight", 0),
    (("mlp", "gate_proj"), "mlp.gate_proj.weight", 1),
    (("mlp", "up_proj"), "mlp.up_proj.weight", 1),
    (("mlp", "down_proj"), "mlp.down_proj.weight", 1),
)
_EMBED = (("embed_tokens",), "model.embed_tokens.weight", 0)
_FINAL_NORM = (("norm", "weight"), "model.norm.weight", 0)
_LM_HEAD = (("lm_head",), "lm_head.weight", 1)
# Non-persistent buffers that some old exports still contain; they carry no information we need.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointFormatError(ValueError):
    """An HF checkpoint folder is incomplete or does not match its config.json."""


def _to_hf(array: np.ndarray, in_axes: int) -> np.ndarray:
    if in_axes == 0:
        return array
    fan_in = math.prod(array.shape[:in_axes])
    return np.ascontiguousarray(array.reshape(fan_in, -1).T)


def _hf_shape(our_shape: tuple[int, ...], in_axes: int) -> tuple[int, ...]:
    if in_axes == 0:
        return our_shape
    return (math.prod(our_shape[in_axes:]), math.prod(our_shape[:in_axes]))


def _from_hf(array: np.ndarray, our_shape: tuple[int, ...], in_axes: int) -> np.ndarray:
    return array.reshape(our_shape) if in_axes == 0 else array.T.reshape(our_shape)


def _param(module: nnx.Module, path: tuple[str, ...]) -> nnx.Param:
    return reduce(getattr, path, module)


def _tensor_plan(cfg: ModelConfig) -> Iterator[tuple[bool, tuple[str, ...], str, int, int]]:
    """Yields (is per-layer, our path, HF name, in_axes, layer index) for every tensor of the model."""
    yield False, *_EMBED, 0
    for layer in range(cfg.num_layers):
        for path, suffix, in_axes in _LAYER_TENSORS:
            yield True, path, f"model.layers.{layer}.{suffix}", in_axes, layer
    yield False, *_FINAL_NORM, 0
    if not cfg.tie_word_embeddings:
        yield False, *_LM_HEAD, 0


def _our_shape(model: MiniCPM, in_layers: bool, path: tuple[str, ...]) -> tuple[int, ...]:
    """The shape of one tensor as HF sees it in our layout (per layer for stacked parameters)."""
    shape = tuple(_param(model.layers if in_layers else model, path).get_value().shape)
    return shape[1:] if in_layers else shape


# ----------------------------------------------------------------------------------------------- reading
class _SafetensorsFolder:
    """Lazy reader over `model.safetensors` or the shards listed in `model.safetensors.index.json`."""

    def __init__(self, folder: str):
        self.folder = folder
        index_path = os.path.join(folder, SAFE_INDEX)
        single_path = os.path.join(folder, SAFE_SINGLE)
        if os.path.isfile(index_path):
            with open(index_path) as f:
                self.file_of = dict(json.load(f)["weight_map"])
        elif os.path.isfile(single_path):
            with safe_open(single_path, framework="numpy") as f:
                self.file_of = {name: SAFE_SINGLE for name in f.keys()}
        else:
            hint = ""
            if any(n.startswith("pytorch_model") and n.endswith(".bin") for n in os.listdir(folder)):
                hint = (" It holds pytorch_model*.bin (pickle), which is never loaded implicitly: convert it once "
                        f"with `minicpm-jax convert-bin --hf {folder} --out NEW_DIR`.")
            raise CheckpointFormatError(f"{folder}: neither {SAFE_SINGLE} nor {SAFE_INDEX} found.{hint}")
        for file in sorted(set(self.file_of.values())):
            if not os.path.isfile(os.path.join(folder, file)):
                raise CheckpointFormatError(f"{folder}: shard {file} named in {SAFE_INDEX} is missing")
        self._handles: dict[str, Any] = {}

    def get(self, name: str) -> np.ndarray:
        file = self.file_of[name]
        if file not in self._handles:
            self._handles[file] = safe_open(os.path.join(self.folder, file), framework="numpy")
        return self._handles[file].get_tensor(name)

    def read(self, name: str, expected_shape: tuple[int, ...], cfg_hint: str) -> np.ndarray:
        if name not in self.file_of:
            raise CheckpointFormatError(f"{self.folder}: missing tensor {name} (expected shape {expected_shape} "
                                        f"from config.json: {cfg_hint})")
        array = self.get(name)
        if tuple(array.shape) != expected_shape:
            raise CheckpointFormatError(
                f"{self.folder}/{self.file_of[name]}: tensor {name} has shape {tuple(array.shape)}, "
                f"expected {expected_shape} from config.json ({cfg_hint})")
        return array


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    config_path = os.path.join(os.fspath(path), "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointFormatError(f"{path}: no config.json")
    with open(config_path) as f:
        return json.load(f)


def load_hf(path: str | os.PathLike, *, param_dtype: str = "float32", dtype: str | None = None,
            **config_overrides: Any) -> tuple[MiniCPM, ModelConfig]:
    """Reads an HF MiniCPM or Granite folder (config.json + safetensors, single or sharded).

    Weights are cast to `param_dtype` (float32 by default, whatever the file holds). Returns the model
    and its ModelConfig. Tolerates what real MiniCPM folders do: no model_type, rope_theta or
    tie_word_embeddings key, and an lm_head that is absent or duplicated on tied models.
    """
    folder = os.fspath(path)
    overrides = dict(config_overrides, param_dtype=param_dtype, **({"dtype": dtype} if dtype else {}))
    cfg = model_config_from_hf(read_hf_config(folder), where=os.path.join(folder, "config.json"), **overrides)
    reader = _SafetensorsFolder(folder)
    model = nnx.eval_shape(lambda: MiniCPM(cfg, rngs=nnx.Rngs(0)))
    hint = (f"hidden_size={cfg.hidden_size}, intermediate_size={cfg.intermediate_size}, "
            f"num_attention_heads={cfg.num_heads}, num_key_value_heads={cfg.num_kv_heads}, vocab_size={cfg.vocab_size}")

    consumed: set[str] = set()
    per_layer: dict[tuple[str, ...], list[np.ndarray]] = {}
    for in_layers, path_, name, in_axes, _ in _tensor_plan(cfg):
        our_shape = _our_shape(model, in_layers, path_)
        array = _from_hf(reader.read(name, _hf_shape(our_shape, in_axes), hint), our_shape, in_axes)
        consumed.add(name)
        if in_layers:
            per_layer.setdefault(path_, []).append(array)
        else:
            _param(model, path_).set_value(jnp.asarray(array, dtype=param_dtype))
    for path_, arrays in per_layer.items():
        _param(model.layers, path_).set_value(jnp.asarray(np.stack(arrays), dtype=param_dtype))

    _check_leftovers(reader, consumed, cfg, folder)
    return model, cfg


def _check_leftovers(reader: _SafetensorsFolder, consumed: set[str], cfg: ModelConfig, folder: str) -> None:
    leftover = sorted(n for n in set(reader.file_of) - consumed if not n.endswith(_IGNORED_SUFFIXES))
    if cfg.tie_word_embeddings and _LM_HEAD[1] in leftover:
        # A duplicated head on a tied model is harmless if it equals the embedding.
        leftover.remove(_LM_HEAD[1])
        if not np.array_equal(reader.get(_LM_HEAD[1]), reader.get(_EMBED[1])):
            log.warning("%s: config.json says tie_word_embeddings=true but lm_head.weight differs from "
                        "model.embed_tokens.weight; the head is tied to the embedding as config.json says", folder)
    if leftover:
        shown = ", ".join(leftover[:5]) + (f" and {len(leftover) - 5} more" if len(leftover) > 5 else "")
        raise CheckpointFormatError(f"{folder}: unexpected tensors not described by config.json: {shown}")


# ----------------------------------------------------------------------------------------------- writing
def hf_tensors(model: MiniCPM, dtype: str = "float32") -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, array in `dtype`) for every tensor, in checkpoint order."""
    stacked: dict[tuple[str, ...], np.ndarray] = {}
    for in_layers, path_, name, in_axes, layer in _tensor_plan(model.config):
        if in_layers:
            if path_ not in stacked:
                stacked[path_] = np.asarray(_param(model.layers, path_)[...].astype(dtype))
            array = stacked[path_][layer]
        else:
            array = np.asarray(_param(model, path_)[...].astype(dtype))
        yield name, _to_hf(array, in_axes)


def save_hf(model: MiniCPM, cfg: ModelConfig | None, out: str | os.PathLike, *, arch: str = "minicpm",
            dtype: str = "float32", max_shard_bytes: int = MAX_SHARD_BYTES, overwrite: bool = False) -> list[str]:
    """Writes config.json, generation_config.json and safetensors shards (with an index when sharded).

    arch="minicpm" writes the MiniCPM layout (vLLM, llama.cpp's converter and MiniCPM's remote code);
    arch="granite" writes a checkpoint that transformers loads natively, with no remote code.
    Returns the written file names.
    """
    cfg = cfg or model.config
    if cfg != model.config:
        raise ValueError("cfg does not describe this model; pass the model's own config (or None)")
    hf_config = hf_config_from_model(cfg, arch, dtype)  # validates arch before anything is written
    out = os.fspath(out)
    os.makedirs(out, exist_ok=True)
    stale = [n for n in os.listdir(out) if n.endswith(".safetensors") or n == SAFE_INDEX]
    if stale and not overwrite:
        raise FileExistsError(f"{out} already holds a checkpoint ({', '.join(sorted(stale)[:3])}); "
                              f"choose an empty folder or pass overwrite=True")
    for name in stale:
        os.remove(os.path.join(out, name))

    itemsize = jnp.dtype(dtype).itemsize
    sizes = {name: math.prod(_hf_shape(_our_shape(model, in_layers, path_), in_axes)) * itemsize
             for in_layers, path_, name, in_axes, _ in _tensor_plan(cfg)}
    shard_of = _assign_shards(sizes, max_shard_bytes)
    count = max(shard_of.values()) + 1
    files = [SAFE_SINGLE] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    # Tensors arrive in shard order, so each shard is written as soon as it is full: peak memory is one shard.
    tensors_per_shard = collections.Counter(shard_of.values())
    pending: dict[str, np.ndarray] = {}
    for name, array in hf_tensors(model, dtype):
        pending[name] = array
        if len(pending) == tensors_per_shard[shard_of[name]]:
            save_file(pending, os.path.join(out, files[shard_of[name]]), metadata={"format": "pt"})
            pending = {}
    written = list(files)
    if count > 1:
        weight_map = {name: files[shard] for name, shard in shard_of.items()}
        _write_json(os.path.join(out, SAFE_INDEX), {"metadata": {"total_size": sum(sizes.values())},
                                                    "weight_map": weight_map})
        written.append(SAFE_INDEX)
    _write_json(os.path.join(out, "config.json"), hf_config)
    _write_json(os.path.join(out, "generation_config.json"), generation_config(cfg))
    log.info("wrote %s checkpoint (%s, %d shard(s), %.1f MB) to %s", arch, dtype, count,
             sum(sizes.values()) / 1e6, out)
    return written + ["config.json", "generation_config.json"]


def _assign_shards(sizes: dict[str, int], max_bytes: int) -> dict[str, int]:
    """Consecutive tensors share a shard until it would exceed max_bytes (a lone big tensor gets its own)."""
    shard_of, shard, filled = {}, 0, 0
    for name, size in sizes.items():
        if filled and filled + size > max_bytes:
            shard, filled = shard + 1, 0
        shard_of[name] = shard
        filled += size
    return shard_of


def _write_json(path: str, payload: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.write("\n")
