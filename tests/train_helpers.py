"""Prepared token folders and small run configs for the training tests (all generated in tmp dirs)."""

from __future__ import annotations

import json
from pathlib import Path

import ml_collections
import numpy as np

from minicpm_jax import config as config_lib
from minicpm_jax.data import records

VOCAB = 128
REPO = Path(__file__).resolve().parent.parent


def write_token_folder(out_dir: Path, *, low: int = 3, high: int = VOCAB, num_docs: int = 300,
                       seed: int = 0) -> Path:
    """A prepared folder of random documents whose tokens lie in [low, high) (BOS 1 ... EOS 2).

    Different token ranges per folder let a test tell from a batch which source it came from.
    """
    rng = np.random.default_rng(seed)
    writer = records.ShardWriter(out_dir, 2)
    total = 0
    for _ in range(num_docs):
        body = rng.integers(low, high, size=int(rng.integers(10, 60)), dtype=np.int32)
        doc = np.concatenate([[1], body, [2]]).astype(np.int32)
        writer.write(doc)
        total += len(doc)
    records.write_manifest(out_dir, {
        "num_documents": num_docs, "num_tokens": total, "mean_document_tokens": total / num_docs,
        "bytes_per_token": 3.0, "shards": writer.close(), "tokenizer": {"path": "synthetic", "sha256": "synthetic"},
    })
    return out_dir


def tiny_run_config(stable_dir: Path, **overrides) -> ml_collections.ConfigDict:
    """configs/demo.py shrunk to a 2-layer d=64 model on 4x32-token batches; `overrides` as a.b=value."""
    return config_lib.load(REPO / "configs" / "demo.py", tiny_run_overrides(stable_dir, **overrides))


def tiny_run_overrides(stable_dir: Path, **overrides) -> list[str]:
    """The `a.b=value` overrides of configs/demo.py that `tiny_run_config` applies."""
    items = [
        "model.vocab_size=128", "model.hidden_size=64", "model.intermediate_size=160", "model.num_layers=2",
        "model.num_heads=2", "model.num_kv_heads=1", "model.dim_model_base=32",
        "train.global_batch_size=4", "train.seq_len=32", "train.steps=12", "train.log_every_steps=1",
        "schedule.warmup_steps=2", "schedule.stable_steps=6", "schedule.decay_steps=4",
        "checkpoint.every_steps=4", "checkpoint.keep_every_steps=0", f"data.mixtures.stable={stable_dir}:1",
        "data.val_dir=''", "data.tokenizer=''", "train.eval_every_steps=0",
    ]
    items += [f"{key.replace('__', '.')}={value!r}" if not isinstance(value, str) else f"{key.replace('__', '.')}={value}"
              for key, value in overrides.items()]
    return items


def read_metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def losses_by_step(workdir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(workdir) if "loss" in m}
