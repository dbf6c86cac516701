"""MoE runs end to end: upcycle a dense run with one command, train it, and train it expert-parallel."""

from __future__ import annotations

import subprocess
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from minicpm_jax import cli
from minicpm_jax.run import checkpoint
from minicpm_jax.train.loop import prepare_workdir, train

from train_helpers import (
    DEMO_CONFIG,
    cli_command,
    fake_devices_env,
    losses_by_step,
    read_metrics,
    tiny_run_config,
    tiny_run_overrides,
    write_token_folder,
)

EXPERTS = 4
# Heads, kv heads, batch and experts all divide by 2 and 4, so every mesh below is valid.
MOE = {"model__num_experts": EXPERTS, "model__num_experts_per_tok": 2, "model__num_heads": 4,
       "model__num_kv_heads": 2, "train__global_batch_size": 8}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_token_folder(tmp_path_factory.mktemp("corpus") / "tokens", learnable=True)


def test_upcycled_run_trains_with_balanced_experts(corpus, tmp_path):
    dense_run = tmp_path / "dense"
    train(prepare_workdir(str(dense_run), tiny_run_config(corpus, checkpoint__keep_every_steps=4)), str(dense_run))

    moe_overrides = tiny_run_overrides(corpus, model__num_experts=EXPERTS, train__steps=40, train__log_every_steps=10,
                                       schedule__warmup_steps=4, schedule__stable_steps=28, schedule__decay_steps=8,
                                       checkpoint__every_steps=20)
    moe_run = tmp_path / "moe"
    assert cli.main(["upcycle", "--from", str(dense_run), "--step", "8", "--workdir", str(moe_run),
                     "--config", str(DEMO_CONFIG), "--no-train", *[f"--config.{item}" for item in moe_overrides]]) == 0

    # Before any MoE step, the upcycled model computes the dense model's logits.
    dense_model, _ = checkpoint.restore_model(str(dense_run), 8)
    moe_model, moe_cfg = checkpoint.restore_model(str(moe_run), 0)
    assert moe_cfg.model.num_experts == EXPERTS
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 32)), jnp.int32)
    np.testing.assert_allclose(moe_model(tokens), dense_model(tokens), rtol=1e-5, atol=1e-5)

    assert cli.main(["train", "--workdir", str(moe_run)]) == 0
    metrics = [m for m in read_metrics(moe_run) if "loss" in m]
    assert [m["step"] for m in metrics] == [10, 20, 30, 40]
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    for m in metrics:  # every expert keeps a real share of the assignments (balanced = 0.25)
        fractions = [m[f"moe_expert_fraction_{i}"] for i in range(EXPERTS)]
        assert sum(fractions) == pytest.approx(1.0, abs=1e-5)
        assert min(fractions) > 0.1, fractions
        assert 1.0 <= m["moe_load_balance"] < 1.2


def _train_command(workdir: Path, corpus: Path, extra: list[str]) -> list[str]:
    items = tiny_run_overrides(corpus, train__steps=6, schedule__stable_steps=2, schedule__decay_steps=2,
                               checkpoint__every_steps=6, **MOE) + extra
    return cli_command("train", "--config", str(DEMO_CONFIG), "--workdir", str(workdir),
                       *[f"--config.{item}" for item in items])


@pytest.mark.slow
def test_expert_parallel_training_matches_one_device(corpus, tmp_path):
    subprocess.run(_train_command(tmp_path / "one", corpus, ["mesh.fsdp=1"]), env=fake_devices_env(1), check=True,
                   capture_output=True)
    reference = losses_by_step(tmp_path / "one")
    assert sorted(reference) == list(range(1, 7))
    meshes = {"4 expert x 2 data": ["mesh.expert=4", "mesh.data=2", "mesh.fsdp=1"],
              "2 expert x 4 fsdp": ["mesh.expert=2", "mesh.fsdp=4"]}
    for name, mesh in meshes.items():
        workdir = tmp_path / name.replace(" ", "_")
        result = subprocess.run(_train_command(workdir, corpus, mesh), env=fake_devices_env(8), capture_output=True,
                                text=True)
        assert result.returncode == 0, result.stderr[-3000:]
        losses = losses_by_step(workdir)
        np.testing.assert_allclose([losses[s] for s in range(1, 7)], [reference[s] for s in range(1, 7)],
                                   rtol=2e-5, err_msg=name)
        model, _ = checkpoint.restore_model(str(workdir))
        assert model.layers.mlp.gate_proj[...].shape == (2, EXPERTS, 64, 160)
