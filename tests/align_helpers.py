"""A tiny source run, its tokenizer and small chat/preference JSONL for the alignment tests (tmp dirs only)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import ml_collections
from flax import nnx

from minicpm_jax import config as config_lib
from minicpm_jax.config import ModelConfig
from minicpm_jax.model import MiniCPM
from minicpm_jax.run import checkpoint

from train_helpers import REPO

TINY_MODEL = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 160, "num_layers": 2, "num_heads": 2,
              "num_kv_heads": 1, "dim_model_base": 32, "max_position_embeddings": 128, "scale_emb": 12.0,
              "scale_depth": 1.4}


def make_source_run(workdir: Path, seed: int = 0, **model_overrides) -> Path:
    """A weights-only run (what import-hf writes) holding a randomly initialised tiny model at step 0.

    `model_overrides` set other ModelConfig fields of the stored model.
    """
    model_cfg = ModelConfig(**TINY_MODEL, **model_overrides)
    checkpoint.save_model(str(workdir), 0, MiniCPM(model_cfg, rngs=nnx.Rngs(seed)))
    checkpoint.write_run_config(str(workdir), ml_collections.ConfigDict({"model": model_cfg.to_dict()}))
    return workdir


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path


def align_config(name: str, **overrides) -> ml_collections.ConfigDict:
    """configs/{name}.py on 4-row, 64-token batches, logging every step; overrides as a__b=value."""
    items = ["train.global_batch_size=4", "train.seq_len=64", "train.log_every_steps=1", "checkpoint.every_steps=4"]
    items += [f"{key.replace('__', '.')}={value}" for key, value in overrides.items()]
    return config_lib.load(REPO / "configs" / f"{name}.py", items)


def copy_interrupted_at(workdir: Path, step: int, out: Path) -> Path:
    """A copy of a finished run as a crash right after checkpoint `step` would leave it."""
    shutil.copytree(workdir, out)
    for saved in (out / "checkpoints").iterdir():
        if saved.name.isdigit() and int(saved.name) > step:
            shutil.rmtree(saved)
    return out
