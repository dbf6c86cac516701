"""Accelerator training benchmark: tokens/s, MFU and the largest per-device batch of our production train step.

Runs `train.make_train_step` (jitted, params and optimizer state donated, AdamW + clip + μP exactly as in
training) on synthetic tokens for a config file (default: the 1.2B model, configs/minicpm_1b.py) at
`--seq` tokens per row in `--dtype`, on every visible device (the config's mesh; default FSDP over all).

For each remat policy in `--remat`, it searches the largest per-device batch that fits: it compiles the
step for a candidate batch and reads XLA's memory analysis (arguments + temporaries + outputs not aliased
to donated inputs); a batch that would exceed the device's free memory is not run. Batches that fit are run
(`--warmup` untimed steps, then `--steps` timed ones, each ended by block_until_ready). The search starts at
the largest batch that `memory_plan.estimate` expects to fit, doubles until a batch does not fit, then
bisects; it stops starting new trials when `--time-budget` seconds are spent.

MFU = tokens/s × FLOPs/token / peak, through `metrics.mfu` with `metrics.train_flops_per_token` and
`metrics.total_peak_flops`: the same formula and peak the training log uses (the peak is the device's dense
bf16 spec-sheet figure, or `train.peak_flops_per_device` when set). Prints a table and writes JSON.

    python benchmarks/gpu_bench.py --json gpu_bench.json          # on a GPU/TPU host; see gpu_bench.sh
    JAX_PLATFORMS=cpu python benchmarks/gpu_bench.py --config configs/demo.py --seq 64 --dtype float32 \\
        --set train.peak_flops_per_device=1e11 --device-memory 2e9 --json smoke.json   # a CPU smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import _report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run from a checkout without installing it
    sys.path.insert(0, REPO)

GiB = 1024 ** 3
PEER_MFU = 0.42  # Levanter's published MFU for a 1.4B model (the performance issue's reference)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default=os.path.join(REPO, "configs", "minicpm_1b.py"), help="config file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set model.num_layers=4 (repeatable)")
    p.add_argument("--seq", type=int, default=4096, help="tokens per row")
    p.add_argument("--dtype", default="bfloat16", help="model.dtype (compute); parameters stay model.param_dtype")
    p.add_argument("--remat", default="save_dots_no_batch,full",
                   help="comma-separated model.remat_policy values to search, best first")
    p.add_argument("--batches", default="",
                   help="comma-separated per-device batches to try instead of the search")
    p.add_argument("--max-batch", type=int, default=256, help="the search never tries more rows per device")
    p.add_argument("--steps", type=int, default=5, help="timed steps per batch that fits")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first one runs the compiled step)")
    p.add_argument("--time-budget", type=float, default=390.0,
                   help="seconds after which no new trial starts (the shell wrapper keeps the whole run < 8 min)")
    p.add_argument("--device-memory", type=float, default=0.0,
                   help="bytes one device may use; default: the runtime's limit (memory_stats bytes_limit). "
                        "Required where the runtime reports none (CPU smoke runs)")
    p.add_argument("--json", help="write the results here (rewritten after every trial)")
    args = p.parse_args(argv)
    args.remat = [r for r in args.remat.split(",") if r]
    args.batches = [int(b) for b in args.batches.split(",") if b]
    return args


# ----------------------------------------------------------------------------------------------- search

def largest_fitting(fits: Callable[[int], bool], start: int, max_batch: int,
                    out_of_time: Callable[[], bool] = lambda: False, growth: float = 1.25) -> int:
    """The largest batch b in [1, max_batch] with fits(b), assuming fits is monotone (0: not even 1 fits).

    Starts at `start` (memory_plan's estimate, usually within ~10%), steps by `growth` (up while batches
    fit, down while they do not) until it has a batch that fits and one that does not, then bisects
    between them: each trial compiles the step, so few trials matter more than a fast worst case. Stops
    early (returning the largest batch known to fit) once `out_of_time()`.
    """
    lo, hi = 0, max_batch + 1  # fits(lo) or lo = 0; not fits(hi) or hi = max_batch + 1
    probe = min(max(1, start), max_batch)
    while hi - lo > 1 and not out_of_time():
        if fits(probe):
            lo = probe
            probe = max(lo + 1, math.ceil(lo * growth)) if hi > max_batch else (lo + hi) // 2
        else:
            hi = probe
            probe = min(hi - 1, int(hi / growth)) if lo == 0 else (lo + hi) // 2
        probe = min(max(probe, lo + 1), hi - 1)
    return lo


# ----------------------------------------------------------------------------------------------- the step

@dataclasses.dataclass
class Trial:
    remat: str
    batch_per_device: int
    fits: bool
    compiled_bytes: int | None = None  # XLA's estimate of the step's device memory
    compile_s: float | None = None
    step_s: list[float] = dataclasses.field(default_factory=list)
    median_step_s: float | None = None
    tokens_per_s: float | None = None
    tokens_per_s_per_device: float | None = None
    mfu: float | None = None
    loss: float | None = None
    error: str | None = None


def is_out_of_memory(err: BaseException) -> bool:
    text = str(err)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


class Bench:
    """One model's params and optimizer state, kept across trials; a train step compiled per batch."""

    def __init__(self, cfg, args: argparse.Namespace):
        import jax
        from flax import nnx

        from minicpm_jax import optim
        from minicpm_jax.config import ModelConfig
        from minicpm_jax.model import MiniCPM
        from minicpm_jax.parallel import mesh as sharding
        from minicpm_jax.train import metrics
        from minicpm_jax.train.step import make_train_step

        self.jax, self.args, self.cfg = jax, args, cfg
        self.model_cfg = ModelConfig.from_config(cfg.model)
        self.mesh_cfg = sharding.MeshConfig.from_config(cfg.get("mesh"))
        self.mesh = sharding.make_mesh(self.mesh_cfg)
        self.devices = jax.device_count()
        self.flops_per_token = metrics.train_flops_per_token(self.model_cfg, args.seq)
        self.peak = metrics.total_peak_flops(cfg.train.peak_flops_per_device)
        self._mfu = metrics.mfu
        self._sharding, self._nnx, self._MiniCPM, self._optim = sharding, nnx, MiniCPM, optim
        self._make_train_step = make_train_step
        self.params = self.opt_state = None

    def init_state(self, remat: str) -> None:
        """Fresh params and optimizer state (after an out-of-memory run, donated buffers may be gone)."""
        jax, nnx = self.jax, self._nnx
        self.params = self.opt_state = None
        gc.collect()
        model_cfg = dataclasses.replace(self.model_cfg, remat_policy=remat)
        with self._sharding.activate(self.mesh, self.mesh_cfg.rules):
            model = self._MiniCPM(model_cfg, rngs=nnx.Rngs(0))  # born sharded on the mesh
            self.graphdef, state = nnx.split(model)
            params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
            del model, state
            # A constant lr at the config's peak: the step's cost does not depend on the schedule.
            self.tx = self._optim.make_optimizer(self.cfg.optim, self._optim.constant_schedule(
                float(self.cfg.schedule.peak_lr)), params, model_cfg)
            self.opt_state = jax.jit(self.tx.init)(params)
            self.params = params
        self.remat = remat
        self.step = self._make_train_step(self.graphdef, self.tx)

    def batch(self, rows: int) -> dict[str, Any]:
        seq, vocab = self.args.seq, self.model_cfg.vocab_size
        tokens = np.random.default_rng(rows).integers(0, vocab, size=(rows, seq + 1), dtype=np.int32)
        local = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((rows, seq), np.int32),
                 "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (rows, seq)),
                 "loss_mask": np.ones((rows, seq), np.int32)}
        return self._sharding.global_batch({k: np.ascontiguousarray(v) for k, v in local.items()}, self.mesh)

    def device_limit(self) -> int | None:
        """Bytes one device may use: --device-memory, else the runtime's limit (None on CPU)."""
        limit = self.args.device_memory or (self.jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")
        return int(limit) if limit else None

    def state_bytes(self) -> int:
        """Bytes of params and optimizer state on one device."""
        device = self.jax.local_devices()[0]
        return sum(shard.data.nbytes for leaf in self.jax.tree.leaves((self.params, self.opt_state))
                   for shard in leaf.addressable_shards if shard.device == device)

    def free_bytes(self) -> int | None:
        """Memory one device may still allocate: its limit minus what it holds now (params, state, batch)."""
        limit = self.device_limit()
        if limit is None:
            return None
        in_use = (self.jax.local_devices()[0].memory_stats() or {}).get("bytes_in_use")
        return limit - (self.state_bytes() if in_use is None else int(in_use))  # CPU: no stats

    def run(self, rows_per_device: int) -> Trial:
        jax = self.jax
        trial = Trial(self.remat, rows_per_device, fits=False)
        rows = rows_per_device * math.prod(self.mesh.shape[a] for a in self._sharding.BATCH_AXES)
        try:
            batch = self.batch(rows)
            start = time.perf_counter()
            with self._sharding.activate(self.mesh, self.mesh_cfg.rules):
                compiled = self.step.lower(self.params, self.opt_state, batch).compile()
            trial.compile_s = time.perf_counter() - start
            trial.compiled_bytes = compiled_device_bytes(compiled)
            free = self.free_bytes()
            if None not in (trial.compiled_bytes, free) and trial.compiled_bytes > free:
                trial.error = f"needs {trial.compiled_bytes / GiB:.2f} GiB beyond the state, {free / GiB:.2f} GiB free"
                return trial
            for i in range(self.args.warmup + self.args.steps):
                start = time.perf_counter()
                self.params, self.opt_state, metrics = compiled(self.params, self.opt_state, batch)
                jax.block_until_ready((self.params, self.opt_state, metrics))
                if i >= self.args.warmup:
                    trial.step_s.append(time.perf_counter() - start)
            trial.loss = float(metrics["loss"])
        except Exception as err:  # an out-of-memory error's class differs between jax versions
            if not is_out_of_memory(err):
                raise
            trial.error = "out of memory: " + str(err).splitlines()[0][:200]
            self.init_state(self.remat)
            return trial
        trial.fits = True
        trial.median_step_s = statistics.median(trial.step_s)
        trial.tokens_per_s = rows * self.args.seq / trial.median_step_s
        trial.tokens_per_s_per_device = trial.tokens_per_s / self.devices
        trial.mfu = self._mfu(trial.tokens_per_s, self.flops_per_token, self.peak)
        return trial


def compiled_device_bytes(compiled) -> int | None:
    """Bytes the compiled step allocates beyond its (donated) inputs, from XLA's memory analysis."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 (not every backend implements it)
        return None
    if m is None:
        return None
    return int(m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
               + getattr(m, "generated_code_size_in_bytes", 0))


def estimated_batch(cfg, seq: int, remat: str, devices: int, memory: float) -> int:
    """The largest per-device batch `memory_plan.estimate` expects to fit in `memory` bytes (at least 1)."""
    from minicpm_jax.parallel import memory as memory_plan

    def fits(b: int) -> bool:
        cfg.train.global_batch_size = b * devices
        return memory_plan.estimate(cfg, devices).total_bytes <= memory

    cfg.model.remat_policy, cfg.train.seq_len, cfg.train.grad_accum_steps = remat, seq, 1
    return max(1, largest_fitting(fits, 8, 4096))


# ----------------------------------------------------------------------------------------------- report

def print_report(report: dict[str, Any]) -> None:
    m = report["machine"]
    print(f"\ndevices: {m['device_count']} × {m['device_kind']} ({m['backend']}); jax {m['jax']}; "
          f"peak {m['peak_flops_total'] / 1e12:.1f} TFLOP/s in all; {report['model']}")
    header = (f"{'remat':>18} {'batch/dev':>9} {'fits':>5} {'compiled GiB':>12} {'compile s':>9} {'step s':>8} "
              f"{'tok/s/dev':>10} {'MFU':>6}")
    print(header + "\n" + "-" * len(header))
    for t in report["trials"]:
        mem = f"{t['compiled_bytes'] / GiB:.2f}" if t["compiled_bytes"] is not None else "-"
        compile_s = f"{t['compile_s']:.1f}" if t["compile_s"] is not None else "-"
        if t["fits"]:
            mfu = f"{t['mfu']:.1%}" if t["mfu"] is not None else "-"
            print(f"{t['remat']:>18} {t['batch_per_device']:>9} {'yes':>5} {mem:>12} {compile_s:>9} "
                  f"{t['median_step_s']:>8.3f} {t['tokens_per_s_per_device']:>10.0f} {mfu:>6}")
        else:
            print(f"{t['remat']:>18} {t['batch_per_device']:>9} {'no':>5} {mem:>12} {compile_s:>9}   {t['error']}")
    for remat, best in report["largest_batch"].items():
        print(f"largest per-device batch with remat {remat}: {best}")
    if report.get("best"):
        b = report["best"]
        mfu = f"{b['mfu']:.1%}" if b["mfu"] is not None else "- (no known peak: set train.peak_flops_per_device)"
        print(f"best: {b['tokens_per_s_per_device']:.0f} tokens/s per device, MFU {mfu} "
              f"(remat {b['remat']}, {b['batch_per_device']} rows of {report['seq']} per device)")
        if b["mfu"] is not None:
            print(f"peer: Levanter's published MFU at 1.4B is {PEER_MFU:.0%}; ours / peer = {b['mfu'] / PEER_MFU:.2f}x")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import jax

    from minicpm_jax import config as config_lib

    cfg = config_lib.load(args.config, [*args.set, f"model.dtype={args.dtype!r}", f"train.seq_len={args.seq}"])
    started = time.perf_counter()
    bench = Bench(cfg, args)
    device = jax.devices()[0]
    report: dict[str, Any] = {
        "args": vars(args), "seq": args.seq,
        "model": (f"d={bench.model_cfg.hidden_size} L={bench.model_cfg.num_layers} V={bench.model_cfg.vocab_size} "
                  f"seq={args.seq} {args.dtype}, {bench.flops_per_token / 1e9:.2f} GFLOP/token"),
        "machine": {"device_kind": device.device_kind, "backend": jax.default_backend(),
                    "device_count": bench.devices, "jax": jax.__version__, "peak_flops_total": bench.peak,
                    "xla_flags": os.environ.get("XLA_FLAGS", "")},
        "flops_per_token": bench.flops_per_token, "trials": [], "largest_batch": {}, "best": None}

    def out_of_time() -> bool:
        return time.perf_counter() - started > args.time_budget

    def record(trial: Trial) -> bool:
        report["trials"].append(dataclasses.asdict(trial))
        fitting = [t for t in report["trials"] if t["fits"]]
        report["best"] = max(fitting, key=lambda t: t["tokens_per_s"]) if fitting else None
        print(f"  {trial.remat} batch {trial.batch_per_device}: "
              + (f"{trial.tokens_per_s_per_device:.0f} tok/s/device" if trial.fits
                 else f"does not fit ({trial.error})"),
              file=sys.stderr, flush=True)
        _report.write_json(args.json, report)
        return trial.fits

    for remat in args.remat:
        if out_of_time():
            break
        bench.init_state(remat)
        if args.batches:
            fitting = [b for b in args.batches if not out_of_time() and record(bench.run(b))]
            report["largest_batch"][remat] = max(fitting, default=0)
            continue
        if bench.device_limit() is None:
            raise SystemExit("this runtime reports no device memory limit: pass --device-memory BYTES or --batches")
        start = estimated_batch(cfg.copy_and_resolve_references(), args.seq, remat, bench.devices,
                                bench.device_limit())
        print(f"{remat}: memory_plan expects {start} rows per device to fit; searching", file=sys.stderr, flush=True)
        report["largest_batch"][remat] = largest_fitting(lambda b: record(bench.run(b)), start, args.max_batch,
                                                         out_of_time)
    print_report(report)
    _report.write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
