"""Every shipped pod config, compiled by the real XLA:TPU compiler for its topology (no TPU needed).

Each config keeps its full widths, vocabulary, batch and mesh; only the depth is cut to 2 layers so the
suite stays fast (the layers run in one scan, so per-layer memory and collectives scale with depth;
BENCHMARKS.md has the full-depth numbers from benchmarks/tpu_compile.py). libtpu comes with the `aot`
extra, which `make test` installs: without it these tests fail, naming the fix, rather than skip.
"""

from __future__ import annotations

import math

import jax
import pytest

from minicpm_jax import config
from minicpm_jax.parallel import aot, hlo_collectives
from minicpm_jax.run.plan import plan_run

from train_helpers import REPO

# (config, topology, slices)
POD_CONFIGS = {
    "1.2B on v5e-64": ("minicpm_1b_v5e64.py", "v5e:8x8", 1),
    "1.2B on 2 x v5e-64": ("minicpm_1b_v5e64x2.py", "v5e:8x8", 2),
    "2.4B on v5p-128": ("minicpm_2b_v5p128.py", "v5p:4x4x4", 1),
    "MoE 8x2B on v5p-128": ("minicpm_moe_8x2b_v5p128.py", "v5p:4x4x4", 1),
    "2.4B-128K on v5p-128": ("minicpm_2b_128k_v5p128.py", "v5p:4x4x4", 1),
}
DENSE_FSDP = ("1.2B on v5e-64", "2.4B on v5p-128")  # pure FSDP on one slice: held to 1.25× of its minimum


def _shard_bytes(tree) -> int:
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


@pytest.mark.slow
@pytest.mark.parametrize("name", POD_CONFIGS)
def test_pod_config_compiles_for_its_topology_and_fits(name):
    path, topology, slices = POD_CONFIGS[name]
    cfg = config.load(str(REPO / "configs" / path), ["model.num_layers=2"])
    result = aot.compile_step(cfg, topology, slices)
    assert result.num_devices == 64 * slices
    assert result.headroom >= 0.10, f"{name}: {result.total_bytes / 2**30:.2f} GiB of {result.hbm_bytes / 2**30:.2f}"

    plan = plan_run(cfg, aot.topology_devices(topology, slices), check_data=False)
    params, opt_state = plan.abstract_params, plan.abstract_opt_state
    whole = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(opt_state))
    per_chip = _shard_bytes(opt_state)
    # Every moment is split at least over fsdp (the MoE's experts further over expert); scalars are tiny.
    assert whole / result.num_devices <= per_chip <= 1.05 * whole / plan.mesh.shape["fsdp"], (per_chip, whole)
    # The compiler's arguments are the sharded state plus the batch, give or take the TPU's tile padding of
    # small shards (a [2, 24] norm shard fills a whole (8, 128) tile): nothing got replicated behind our back.
    batch = 5 * cfg.train.global_batch_size * cfg.train.seq_len * 4 // (result.num_devices // plan.mesh.shape["tensor"])
    assert result.argument_bytes <= 1.2 * (_shard_bytes(params) + per_chip + batch), result.argument_bytes
    assert result.collectives.by_kind and result.collectives.unknown_trip_counts == 0
    if name in DENSE_FSDP:
        # What one more layer costs in collectives against what FSDP must move for it: the layers are what
        # a full-depth step is made of (2 of 52 here), so this is the ratio the full config converges to.
        deeper = aot.compile_step(config.load(str(REPO / "configs" / path), ["model.num_layers=3"]), topology, slices)
        sent = deeper.collectives.wire_bytes - result.collectives.wire_bytes
        minimum = deeper.fsdp_minimum_bytes - result.fsdp_minimum_bytes
        assert "reduce-scatter" in deeper.collectives.by_kind
        assert sent <= 1.25 * minimum, f"{name}: a layer sends {sent / minimum:.2f}× the FSDP minimum"


@pytest.mark.parametrize("topology, outer, inner", [("v5e:8x8", 8, 8), ("v5p:4x4x4", 4, 16), ("v5e:4x8", 4, 8)])
def test_fsdp_split_view_follows_the_torus_and_lays_out_like_fsdp(topology, outer, inner):
    from jax.sharding import NamedSharding, PartitionSpec

    from minicpm_jax.parallel import mesh as sharding
    from minicpm_jax.parallel import torus

    devices = aot.topology_devices(topology)
    mesh = sharding.make_mesh(config.MeshConfig(fsdp=len(devices)), devices)
    view = torus.fsdp_split_view(mesh)
    others = lambda shape: {axis: n for axis, n in shape.items() if axis not in ("fsdp", torus.OUTER, torus.INNER)}
    assert others(view.shape) == others(mesh.shape)
    assert (view.shape[torus.OUTER], view.shape[torus.INNER]) == (outer, inner)
    # fsdp_outer varies along one torus dimension only: its groups are rings of the torus.
    for group in view.devices.reshape(outer, inner).T:
        varying = {k for k in range(3) if len({d.coords[k] for d in group}) > 1}
        assert len(varying) == 1, [d.coords for d in group]
    stored = PartitionSpec(None, "fsdp")
    split = NamedSharding(view, PartitionSpec(None, (torus.OUTER, torus.INNER)))
    assert split.is_equivalent_to(NamedSharding(mesh, stored), 2)
    assert torus.first_stage(view, stored) == NamedSharding(view, PartitionSpec(None, torus.OUTER))


def test_fsdp_split_view_needs_a_torus():
    from minicpm_jax.parallel import mesh as sharding
    from minicpm_jax.parallel import torus

    cpu = sharding.make_mesh(config.MeshConfig(fsdp=-1))
    assert torus.fsdp_split_view(cpu) is None  # CPU devices have no torus coordinates
    # jax lays a v5e 4x4 out as one snake-shaped ring, which no split into torus rows describes.
    snake = sharding.make_mesh(config.MeshConfig(fsdp=16), aot.topology_devices("v5e:4x4"))
    assert torus.fsdp_split_view(snake) is None


def test_missing_topology_names_the_problem():
    with pytest.raises(config.ConfigError, match="--topology 'v5e:3x3'"):
        aot.topology_devices("v5e:3x3")


HLO = """HloModule step

%body (p: (s32[], f32[8,4])) -> (s32[], f32[8,4]) {
  %p = (s32[], f32[8,4]) parameter(0)
  %x = f32[8,4] get-tuple-element(%p), index=1
  %ag = f32[8,16] all-gather(%x), channel_id=1, replica_groups={{0,1,2,3}}, dimensions={1}
  %ar = f32[8,4] all-reduce(%x), channel_id=2, replica_groups={{0,1,2,3}}, to_apply=%add
  ROOT %t = (s32[], f32[8,4]) tuple(%i, %ar)
}

%cond (p: (s32[], f32[8,4])) -> pred[] {
  %p = (s32[], f32[8,4]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(6)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%all-reduce-scatter (input: f32[8,4]) -> f32[2,4] {
  %input = f32[8,4] parameter(0)
  %summed = f32[8,4] all-reduce(%input), channel_id=4, replica_groups={{0,1,2,3}}, to_apply=%add
  %row = u32[] partition-id()
  %col = u32[] constant(0)
  ROOT %mine = f32[2,4] dynamic-slice(%summed, %row, %col), dynamic_slice_sizes={2,4}
}

ENTRY %main (a: f32[8,4]) -> f32[8,4] {
  %a = f32[8,4] parameter(0)
  %zero = s32[] constant(0)
  %init = (s32[], f32[8,4]) tuple(%zero, %a)
  %w = (s32[], f32[8,4]) while(%init), condition=%cond, body=%body
  %rs = f32[2,4] reduce-scatter(%a), channel_id=3, replica_groups={{0,1,2,3}}, dimensions={0}, to_apply=%add
  %fused_rs = f32[2,4] fusion(%a), kind=kCustom, calls=%all-reduce-scatter, \
backend_config={"collective_algorithm_config":{"emitter":"SingleInputAllReduceScatterFusion","strategy":"StrategyRing"}}
  ROOT %out = f32[8,4] get-tuple-element(%w), index=1
}
"""


def test_collectives_multiply_loop_trip_counts_and_count_logical_bytes():
    # XLA:TPU's fused reduce-scatter (an all-reduce and a dynamic slice in one kernel) counts as one.
    report = hlo_collectives.collectives(HLO, num_devices=4)
    assert report.unknown_trip_counts == 0
    # Groups of 4: a device sends 3/4 of an all-gather's or reduce-scatter's bytes, twice that for an all-reduce.
    assert report.by_kind["all-gather"] == hlo_collectives.Collective("all-gather", 6, 6 * 512, 6 * 384)
    assert report.by_kind["all-reduce"] == hlo_collectives.Collective("all-reduce", 6, 6 * 128, 6 * 192)
    assert report.by_kind["reduce-scatter"] == hlo_collectives.Collective("reduce-scatter", 2, 2 * 128, 2 * 96)
    assert report.wire_bytes == 6 * 384 + 6 * 192 + 2 * 96


@pytest.mark.parametrize("task", ["train", "decode"])
def test_compile_command_prints_the_chip_memory_and_collectives(task, capsys, tmp_path):
    from minicpm_jax import cli

    code = cli.main(["compile", "--config", str(REPO / "configs" / "demo.py"), "--topology", "v5e:2x4",
                     "--task", task, "--dump-hlo", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    for text in (f"{task} step on 1 × v5e:2x4 (8 × TPU v5 lite), mesh fsdp=8", "arguments", "temporaries",
                 "of 15.75 GiB HBM: fits, headroom", "compile time", "all-gather", "FSDP minimum"):
        assert text in out, out
    assert (tmp_path / f"{task}_step.hlo.txt").read_text().startswith("HloModule")


def test_compile_command_exits_1_when_the_step_does_not_fit(capsys):
    from minicpm_jax import cli

    code = cli.main(["compile", "--config", str(REPO / "configs" / "demo.py"), "--topology", "v5e:2x4",
                     "--config.train.global_batch_size=512", "--config.train.seq_len=4096",
                     "--config.model.remat_policy=none", "--config.model.max_position_embeddings=4096"])
    assert code == 1
    out = capsys.readouterr().out  # XLA:TPU itself refuses a program larger than the chip, with its numbers
    assert "does NOT fit: the train step does not fit one chip of v5e:2x4" in out and "exceeds available HBM" in out


def test_plan_with_a_topology_reports_the_compiler_beside_the_estimate(capsys):
    import argparse

    from minicpm_jax.cli import plan as plan_commands

    args = argparse.Namespace(config=str(REPO / "configs" / "demo.py"), devices=None, device=None, headroom=0.9,
                              config_overrides=[], topology="v5e:2x4", num_slices=1, estimate_only=False)
    assert plan_commands.plan(args) == 0
    out = capsys.readouterr().out
    assert "mesh (8 devices, rules fsdp)" in out and "[an estimate]" in out  # the estimate, for those 8 chips
    assert "from the XLA:TPU compiler (this supersedes the estimate above)" in out and "headroom" in out


def test_plan_for_tpu_chips_compiles_when_libtpu_is_installed(capsys):
    from minicpm_jax import cli
    from minicpm_jax.parallel import memory as memory_plan

    assert memory_plan.slice_topology("v5e", 64) == "v5e:8x8" and memory_plan.slice_topology("v5p", 64) == "v5p:4x4x4"
    assert memory_plan.slice_topology("v5e", 12) is None and memory_plan.slice_topology("h100", 8) is None
    assert cli.main(["plan", "--config", str(REPO / "configs" / "demo.py"), "--devices", "8", "--device", "v5e"]) == 0
    out = capsys.readouterr().out
    assert "the XLA:TPU compiler checks this plan on v5e:2x4" in out and "from the XLA:TPU compiler" in out
    assert cli.main(["plan", "--config", str(REPO / "configs" / "demo.py"), "--devices", "8", "--device", "v5e",
                     "--estimate-only"]) == 0
    assert "XLA:TPU" not in capsys.readouterr().out
