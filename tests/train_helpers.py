"""Prepared token folders and small run configs for the training tests (all generated in tmp dirs)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import ml_collections
import numpy as np

from minicpm_jax import config as config_lib
from minicpm_jax.data import records

VOCAB = 128
REPO = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO / "configs" / "demo.py"


def write_token_folder(out_dir: Path, *, low: int = 3, high: int = VOCAB, num_docs: int = 300,
                       seed: int = 0, learnable: bool = False) -> Path:
    """A prepared folder of random documents whose tokens lie in [low, high) (BOS 1 ... EOS 2).

    Different token ranges per folder let a test tell from a batch which source it came from. Learnable
    documents count up from a random token (wrapping within the range), so a model's loss can fall far.
    """
    rng = np.random.default_rng(seed)
    writer = records.ShardWriter(out_dir, 2)
    total = 0
    for _ in range(num_docs):
        length = int(rng.integers(10, 60))
        if learnable:
            body = (low + (rng.integers(0, high - low) + np.arange(length)) % (high - low)).astype(np.int32)
        else:
            body = rng.integers(low, high, size=length, dtype=np.int32)
        doc = np.concatenate([[1], body, [2]]).astype(np.int32)
        writer.write(doc)
        total += len(doc)
    records.write_manifest(out_dir, {
        "num_documents": num_docs, "num_tokens": total, "mean_document_tokens": total / num_docs,
        "bytes_per_token": 3.0, "shards": writer.close(),
        "tokenizer": {"path": "synthetic", "sha256": "synthetic", "vocab_size": high},
    })
    return out_dir


def tiny_run_overrides(stable_dir: Path, **overrides) -> list[str]:
    """configs/demo.py overrides for a 2-layer d=64 model on 4x32-token batches; `overrides` as a__b=value."""
    items = [
        "model.vocab_size=128", "model.hidden_size=64", "model.intermediate_size=160", "model.num_layers=2",
        "model.num_heads=2", "model.num_kv_heads=1", "model.dim_model_base=32",
        "train.global_batch_size=4", "train.seq_len=32", "train.steps=12", "train.log_every_steps=1",
        "schedule.warmup_steps=2", "schedule.stable_steps=6", "schedule.decay_steps=4",
        "checkpoint.every_steps=4", "checkpoint.keep_every_steps=0", f"data.mixtures.stable={stable_dir}:1",
        "data.val_dir=''", "data.tokenizer=''", "train.eval_every_steps=0",
    ]
    return items + [f"{key.replace('__', '.')}={value!r}" if not isinstance(value, str)
                    else f"{key.replace('__', '.')}={value}" for key, value in overrides.items()]


def tiny_run_config(stable_dir: Path, **overrides) -> ml_collections.ConfigDict:
    """configs/demo.py shrunk to a 2-layer d=64 model on 4x32-token batches; `overrides` as a__b=value."""
    return config_lib.load(DEMO_CONFIG, tiny_run_overrides(stable_dir, **overrides))


def fake_devices_env(devices: int) -> dict[str, str]:
    """The environment of a subprocess that sees `devices` fake CPU devices."""
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "minicpm_jax.cli", *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_processes(command: list[str], num_processes: int, devices_per_process: int,
                    env: dict[str, str] | None = None) -> list[subprocess.Popen]:
    """`command` as the processes of one jax.distributed job on 127.0.0.1 (stderr piped, as text)."""
    port = free_port()
    return [subprocess.Popen(command + ["--coordinator-address", f"127.0.0.1:{port}",
                                        "--num-processes", str(num_processes), "--process-id", str(i)],
                             env={**fake_devices_env(devices_per_process), **(env or {})},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for i in range(num_processes)]


def read_metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def losses_by_step(workdir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(workdir) if "loss" in m}


def train_run(cfg: ml_collections.ConfigDict | None, workdir: Path) -> dict:
    """Starts (cfg) or resumes (cfg None: the run's own config.json) the run in `workdir` in this process."""
    from minicpm_jax.train import loop as train_lib  # here, not above: importing this module must not start jax

    return train_lib.train(train_lib.prepare_workdir(str(workdir), cfg), str(workdir))


def final_params(workdir: Path) -> dict:
    """The parameters of a run's latest checkpoint, as a pure dict of arrays."""
    from flax import nnx

    from minicpm_jax.run import checkpoint

    model, _ = checkpoint.restore_model(str(workdir))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def assert_same_run(run: Path, reference: Path, steps: int | None = None) -> None:
    """`run` (interrupted and resumed, extended, ...) computed exactly what the uninterrupted `reference` did:
    the same loss at every logged step and bitwise-equal final parameters. With `steps`, also that `run`
    logged every step 1..steps (none lost)."""
    import jax

    losses = losses_by_step(run)
    if steps is not None:
        assert sorted(losses) == list(range(1, steps + 1))
    assert losses == losses_by_step(reference)
    jax.tree.map(np.testing.assert_array_equal, final_params(run), final_params(reference))
