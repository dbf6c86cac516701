"""The one explicit step that reads pickled PyTorch checkpoints (`pytorch_model*.bin`).

Original MiniCPM uploads ship a single pickled `pytorch_model.bin` (docs/recipe.md §2.2). Pickle can run code,
so nothing else in minicpm-jax reads it: this converter loads it with `torch.load(weights_only=True)`
(tensors only) and writes safetensors next to a copy of the folder's other files. A file that needs more than
tensors to unpickle is refused, naming it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import warnings

from minicpm_jax.files import read_json, write_json

log = logging.getLogger(__name__)

_BIN_INDEX = "pytorch_model.bin.index.json"


def _bin_files(folder: str) -> list[str]:
    index = os.path.join(folder, _BIN_INDEX)
    if os.path.isfile(index):
        from minicpm_jax.hf.convert import shard_map

        return sorted(set(shard_map(read_json(index), index).values()))
    files = sorted(n for n in os.listdir(folder) if n.startswith("pytorch_model") and n.endswith(".bin"))
    if not files:
        raise FileNotFoundError(f"{folder}: no pytorch_model*.bin or {_BIN_INDEX} to convert")
    return files


def _load_tensors(path: str) -> dict:
    """The tensors of one .bin, read by torch's weights-only unpickler (tensors and plain containers only).

    A legacy (pre-zip) torch file is read without mmap. A file that needs anything else to unpickle (a class,
    a function: code) is refused with a CheckpointFormatError naming it; nothing in it runs.
    """
    import pickle
    import zipfile

    import torch

    from minicpm_jax.hf.convert import CheckpointFormatError

    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before it refuses a foreign pickle
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        detail = re.search(r"(Trying to load unsupported GLOBAL \S+|Unsupported [^\n.]+|Unsupported global: [^\n]+)",
                           str(err))
        raise CheckpointFormatError(
            f"{path}: refused: unpickling it needs more than tensors"
            f"{f' ({detail.group(1).strip()})' if detail else ''}, which could run code, and minicpm-jax never "
            f"runs pickled code. Get a safetensors copy from its publisher (many Hub repos have one, or an open "
            f"safetensors conversion pull request), or convert it yourself inside a throwaway sandbox") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as err:  # torch's messages for truncated or foreign files
        raise CheckpointFormatError(f"{path} is not a readable PyTorch checkpoint: {err}") from err
    if not isinstance(state, dict):
        raise CheckpointFormatError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointFormatError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor (a training "
                                        f"checkpoint? convert the model's state_dict)")
    return state


def convert_bin_to_safetensors(folder: str, out: str) -> list[str]:
    """Converts every pytorch_model*.bin in `folder` into `out` as safetensors (same tensor names).

    Each .bin becomes one safetensors shard; an index is written when there are several. Other files
    (config.json, tokenizer files, ...) are copied unchanged. Returns the written shard names.
    """
    folder, out = os.fspath(folder), os.fspath(out)
    if os.path.abspath(folder) == os.path.abspath(out):
        raise ValueError("--out must differ from --hf: the converter never modifies the source folder")
    sources = _bin_files(folder)
    created = not os.path.exists(out)
    try:
        return _write_safetensors(folder, out, sources)
    except BaseException:
        if created:  # a refused or failed conversion leaves no half-written folder behind
            shutil.rmtree(out, ignore_errors=True)
        raise


def _write_safetensors(folder: str, out: str, sources: list[str]) -> list[str]:
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    for name in os.listdir(folder):
        if not (name.endswith(".bin") or name == _BIN_INDEX) and os.path.isfile(os.path.join(folder, name)):
            shutil.copy2(os.path.join(folder, name), os.path.join(out, name))

    shards = ["model.safetensors"] if len(sources) == 1 else [
        f"model-{i + 1:05d}-of-{len(sources):05d}.safetensors" for i in range(len(sources))]
    weight_map, total = {}, 0
    for source, shard in zip(sources, shards):
        log.info("converting %s -> %s", source, shard)
        state = _load_tensors(os.path.join(folder, source))
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
