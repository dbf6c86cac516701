"""Meshes on 8 fake CPU devices, divisibility errors, and a real 2-process job through jax.distributed."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from minicpm_jax.config import ConfigError, MeshConfig
from minicpm_jax.model import MiniCPM
from minicpm_jax.parallel import mesh as sharding
from minicpm_jax.run import checkpoint

from conftest import tiny_config
from train_helpers import (
    DEMO_CONFIG,
    cli_command,
    fake_devices_env,
    losses_by_step,
    start_processes,
    write_token_folder,
)

# heads 4 / kv 2 / d 64 / vocab 128 / mlp 160 all divide by 2, so every mesh below is valid.
MODEL = ["model.vocab_size=128", "model.hidden_size=64", "model.intermediate_size=160", "model.num_layers=2",
         "model.num_heads=4", "model.num_kv_heads=2", "model.dim_model_base=32"]
RUN = ["train.global_batch_size=8", "train.seq_len=32", "train.log_every_steps=1", "train.eval_every_steps=0",
       "schedule.warmup_steps=2", "schedule.stable_steps=4", "schedule.decay_steps=2", "checkpoint.every_steps=4",
       "checkpoint.keep_every_steps=0", "data.val_dir=''", "data.tokenizer=''"]
MESHES = {
    "8 data": ["mesh.data=8", "mesh.fsdp=1"],
    "2 data x 4 fsdp": ["mesh.data=2", "mesh.fsdp=4"],
    "2 data x 2 fsdp x 2 tensor": ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "mesh.rules='fsdp_tp'"],
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_token_folder(tmp_path_factory.mktemp("corpus") / "tokens")


def _train_args(workdir: Path, corpus: Path, steps: int, extra: list[str]) -> list[str]:
    items = MODEL + RUN + [f"train.steps={steps}", f"data.mixtures.stable={corpus}:1"] + extra
    return cli_command("train", "--config", str(DEMO_CONFIG), "--workdir", str(workdir),
                       *[f"--config.{item}" for item in items])


@pytest.mark.slow
def test_meshes_on_8_devices_match_one_device(corpus, tmp_path):
    subprocess.run(_train_args(tmp_path / "one", corpus, 8, ["mesh.fsdp=1"]), env=fake_devices_env(1), check=True,
                   capture_output=True)
    reference = losses_by_step(tmp_path / "one")
    assert sorted(reference) == list(range(1, 9))
    for name, mesh in MESHES.items():
        workdir = tmp_path / name.replace(" ", "_")
        subprocess.run(_train_args(workdir, corpus, 8, mesh), env=fake_devices_env(8), check=True, capture_output=True)
        losses = losses_by_step(workdir)
        np.testing.assert_allclose([losses[s] for s in range(1, 9)], [reference[s] for s in range(1, 9)],
                                   rtol=1e-5, err_msg=name)


@pytest.mark.slow
def test_checkpoint_from_8_device_fsdp_continues_on_4_device_tensor_mesh(corpus, tmp_path):
    """A branch restores the source's step-4 state onto another mesh, with no conversion step."""
    source = tmp_path / "fsdp8"
    subprocess.run(_train_args(source, corpus, 8, ["mesh.data=2", "mesh.fsdp=4", "checkpoint.keep_every_steps=4"]),
                   env=fake_devices_env(8), check=True, capture_output=True)
    branch = cli_command("branch", "--from", str(source), "--step", "4", "--decay-steps", "4")
    subprocess.run(branch + ["--workdir", str(tmp_path / "same_mesh")], env=fake_devices_env(8), check=True,
                   capture_output=True)
    subprocess.run(branch + ["--workdir", str(tmp_path / "tensor4"), "--config.mesh.data=2", "--config.mesh.fsdp=1",
                             "--config.mesh.tensor=2", "--config.mesh.rules=fsdp_tp"],
                   env=fake_devices_env(4), check=True, capture_output=True)
    expected, got = losses_by_step(tmp_path / "same_mesh"), losses_by_step(tmp_path / "tensor4")
    assert sorted(got) == [5, 6, 7, 8]
    np.testing.assert_allclose([got[s] for s in range(5, 9)], [expected[s] for s in range(5, 9)], rtol=1e-5)


def test_parameters_are_born_sharded_on_the_mesh(corpus):
    script = textwrap.dedent(f"""
        import jax
        from flax import nnx
        from minicpm_jax import config
        from minicpm_jax.run import plan as run_plan
        from minicpm_jax.model import MiniCPM
        cfg = config.load({str(DEMO_CONFIG)!r}, {MODEL + RUN + [
            'train.steps=8', f'data.mixtures.stable={corpus}:1', 'mesh.data=2', 'mesh.fsdp=2', 'mesh.tensor=2',
            "mesh.rules='fsdp_tp'"]!r})
        plan = run_plan.plan_run(cfg)
        with plan.activate():
            model = MiniCPM(plan.model, rngs=nnx.Rngs(0))
        up = model.layers.mlp.up_proj[...]           # [layers, embed, mlp]: embed over fsdp, mlp over tensor
        q = model.layers.self_attn.q_proj[...]       # [layers, embed, heads, head_dim]
        embed = model.embed_tokens[...]              # [vocab, embed]: vocab over tensor, embed over fsdp
        print(up.sharding.spec, up.addressable_shards[0].data.shape)
        print(q.sharding.spec, q.addressable_shards[0].data.shape)
        print(embed.sharding.spec, embed.addressable_shards[0].data.shape, len(embed.devices()))
    """)
    out = subprocess.run([sys.executable, "-c", script], env=fake_devices_env(8), check=True, capture_output=True,
                         text=True)
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "P(None, 'fsdp', 'tensor') (2, 32, 80)"
    assert lines[1] == "P(None, 'fsdp', 'tensor') (2, 32, 2, 16)"
    assert lines[2] == "P('tensor', 'fsdp') (64, 32) 8"


OPTIMIZER_MESHES = {
    "fsdp": ["mesh.fsdp=8"],
    "fsdp_tp": ["mesh.fsdp=4", "mesh.tensor=2", "mesh.rules='fsdp_tp'"],
    "expert": ["mesh.fsdp=4", "mesh.expert=2", "model.num_experts=4"],
}


@pytest.mark.parametrize("mesh_name", OPTIMIZER_MESHES)
def test_adam_moments_are_sharded_like_their_parameters(corpus, mesh_name):
    """ZeRO-3 by construction: after init and after a train step, as training lays them out, each Adam
    moment has its parameter's sharding and holds 1/N of it per device; the step counts are replicated."""
    overrides = MODEL + RUN + ["train.steps=8", f"data.mixtures.stable={corpus}:1"] + OPTIMIZER_MESHES[mesh_name]
    script = textwrap.dedent(f"""
        import jax, jax.numpy as jnp, math
        from flax import nnx
        from minicpm_jax import config
        from minicpm_jax.run import plan as run_plan
        from minicpm_jax.parallel import mesh as sharding
        from minicpm_jax.data.pipeline import BATCH_KEYS
        from minicpm_jax.train import step as train
        from minicpm_jax.model import MiniCPM
        plan = run_plan.plan_run(config.load({str(DEMO_CONFIG)!r}, {overrides!r}))
        layout = plan.layout()
        counts = [0, 0]  # split moments, replicated scalars

        def check(state, params):
            by_path = {{sharding.key_names(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}}
            for leaf, owner in sharding.state_owners(state, params):
                if owner is None:
                    assert leaf.ndim == 0 and leaf.sharding.is_fully_replicated, (leaf.shape, leaf.sharding)
                    counts[1] += 1
                    continue
                param = by_path[owner]
                assert leaf.sharding.is_equivalent_to(param.sharding, leaf.ndim), (owner, leaf.sharding, param.sharding)
                ways = math.prod(dict(plan.mesh.shape)[a] for a in jax.tree.leaves(tuple(param.sharding.spec)))
                assert leaf.addressable_shards[0].data.size * ways == leaf.size, (owner, ways)
                counts[0] += ways > 1

        with plan.activate():
            params = nnx.to_pure_dict(nnx.state(MiniCPM(plan.model, rngs=nnx.Rngs(0)), nnx.Param))
            opt_state = jax.jit(plan.tx.init, out_shardings=layout.opt_state)(params)  # as train._initial_state
            check(opt_state, params)
            step = train.make_train_step(plan.graphdef, plan.tx, 1, layout)
            batch = {{k: jax.device_put(jnp.ones((8, 32), jnp.int32), layout.batch) for k in BATCH_KEYS}}
            check(*step(params, opt_state, batch)[1::-1])  # the updated (params, opt_state), donated inputs gone
        moments, scalars = counts
        print(moments, scalars)
    """)
    out = subprocess.run([sys.executable, "-c", script], env=fake_devices_env(8), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    moments, scalars = map(int, out.stdout.split())
    assert moments > 20 and scalars >= 2  # mu and nu of every split parameter, twice; the step counts


def test_indivisible_dimension_is_refused_before_compilation():
    abstract = nnx.eval_shape(lambda: MiniCPM(tiny_config(), rngs=nnx.Rngs(0)))
    mesh_shape = {"data": 1, "fsdp": 3, "tensor": 1, "expert": 1, "sequence": 1}
    with pytest.raises(ConfigError, match=r"parameter embed_tokens dimension 1 \(embed\) has size 64, which does "
                                          r"not divide over mesh axes \('fsdp',\) of size 3"):
        sharding.check_divisibility(abstract, mesh_shape, "fsdp")
    sharding.check_divisibility(abstract, {**mesh_shape, "fsdp": 4}, "fsdp")


def test_mesh_config_resolves_the_rest_and_rejects_bad_sizes():
    assert MeshConfig(data=2, fsdp=-1).shape(8) == {"data": 2, "fsdp": 4, "tensor": 1, "expert": 1,
                                                             "sequence": 1}
    assert MeshConfig(data=1, fsdp=-1, dcn_data=2).shape(8)["data"] == 2
    with pytest.raises(ConfigError, match="at most one mesh axis may be -1"):
        MeshConfig.from_config({"data": -1, "fsdp": -1})
    with pytest.raises(ConfigError, match="needs 6 devices per slice, but 8 are available"):
        MeshConfig(data=3, fsdp=2).shape(8)
    with pytest.raises(ConfigError, match="mesh.rules='zero'"):
        MeshConfig.from_config({"rules": "zero"})


@pytest.mark.slow
def test_two_process_job_resumes_after_kill_and_restores_on_another_mesh(corpus, tmp_path):
    steps = 60
    # Two data shards in both jobs, so the one process reads exactly the rows the two processes read.
    extra = ["schedule.stable_steps=56", "data.num_shards=2"]
    reference = tmp_path / "single_process_8_devices"
    subprocess.run(_train_args(reference, corpus, steps, ["mesh.data=2", "mesh.fsdp=4"] + extra),
                   env=fake_devices_env(8), check=True, capture_output=True)

    workdir = tmp_path / "two_processes"
    processes = _start_two_processes_with(workdir, corpus, steps, extra)
    deadline = time.time() + 300
    checkpoints = workdir / "checkpoints"
    while time.time() < deadline and all(p.poll() is None for p in processes):
        if checkpoints.exists() and any(p.name.isdigit() and int(p.name) >= 8 for p in checkpoints.iterdir()):
            break
        time.sleep(0.05)
    for p in processes:
        p.send_signal(signal.SIGKILL)
    for p in processes:
        p.wait()
    assert all(p.returncode == -signal.SIGKILL for p in processes), "the job ended before it was killed"

    processes = _start_two_processes_with(workdir, corpus, steps, extra)
    for p in processes:
        _, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr[-3000:]
    assert losses_by_step(workdir) == pytest.approx(losses_by_step(reference), rel=1e-5)

    # The 8-device, 2-process checkpoint restores in this single one-device process (another mesh). Its
    # weights equal the single-process run's up to the order of the cross-process float32 reductions.
    model, _ = checkpoint.restore_model(str(workdir))
    expected, _ = checkpoint.restore_model(str(reference))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6),
                 nnx.to_pure_dict(nnx.state(model, nnx.Param)), nnx.to_pure_dict(nnx.state(expected, nnx.Param)))


def _start_two_processes_with(workdir: Path, corpus: Path, steps: int, extra: list[str]) -> list[subprocess.Popen]:
    return start_processes(_train_args(workdir, corpus, steps, ["mesh.data=2", "mesh.fsdp=4"] + extra), 2, 4)
