"""The one explicit step that reads pickled PyTorch checkpoints (`pytorch_model*.bin`).

Original MiniCPM uploads ship a single pickled `pytorch_model.bin` (docs/recipe.md §2.2). Pickle can run code,
so nothing else in minicpm-jax reads it: this converter loads it with `torch.load(weights_only=True)`
(tensors only) and writes safetensors next to a copy of the folder's other files.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

from minicpm_jax.files import write_json

log = logging.getLogger(__name__)

_BIN_INDEX = "pytorch_model.bin.index.json"


def _bin_files(folder: str) -> list[str]:
    index = os.path.join(folder, _BIN_INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            return sorted(set(json.load(f)["weight_map"].values()))
    files = sorted(n for n in os.listdir(folder) if n.startswith("pytorch_model") and n.endswith(".bin"))
    if not files:
        raise FileNotFoundError(f"{folder}: no pytorch_model*.bin or {_BIN_INDEX} to convert")
    return files


def convert_bin_to_safetensors(folder: str, out: str) -> list[str]:
    """Converts every pytorch_model*.bin in `folder` into `out` as safetensors (same tensor names).

    Each .bin becomes one safetensors shard; an index is written when there are several. Other files
    (config.json, tokenizer files, ...) are copied unchanged. Returns the written shard names.
    """
    import torch
    from safetensors.torch import save_file

    folder, out = os.fspath(folder), os.fspath(out)
    if os.path.abspath(folder) == os.path.abspath(out):
        raise ValueError("--out must differ from --hf: the converter never modifies the source folder")
    sources = _bin_files(folder)
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(folder):
        if not (name.endswith(".bin") or name == _BIN_INDEX) and os.path.isfile(os.path.join(folder, name)):
            shutil.copy2(os.path.join(folder, name), os.path.join(out, name))

    shards = ["model.safetensors"] if len(sources) == 1 else [
        f"model-{i + 1:05d}-of-{len(sources):05d}.safetensors" for i in range(len(sources))]
    weight_map, total = {}, 0
    for source, shard in zip(sources, shards):
        log.info("converting %s -> %s", source, shard)
        state = torch.load(os.path.join(folder, source), map_location="cpu", weights_only=True, mmap=True)
        seen_storage: dict[int, str] = {}
        tensors = {}
        for name, tensor in state.items():
            # Tied checkpoints may store lm_head as a view of the embedding; safetensors forbids shared
            # storage, and the loader treats a missing lm_head on a tied model as tied.
            pointer = tensor.untyped_storage().data_ptr()
            if pointer in seen_storage and name == "lm_head.weight":
                log.info("dropping %s: it shares storage with %s (tied)", name, seen_storage[pointer])
                continue
            seen_storage.setdefault(pointer, name)
            tensors[name] = tensor.contiguous()
            weight_map[name] = shard
            total += tensor.numel() * tensor.element_size()
        save_file(tensors, os.path.join(out, shard), metadata={"format": "pt"})
    if len(shards) > 1:
        write_json(os.path.join(out, "model.safetensors.index.json"),
                   {"metadata": {"total_size": total}, "weight_map": weight_map})
    return shards
