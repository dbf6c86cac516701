"""CPU training-step benchmark: our jitted JAX train step against PyTorch `transformers.GraniteForCausalLM`.

Granite is an exact functional match of MiniCPM (docs/recipe.md §2.3: embedding_multiplier = scale_emb,
residual_multiplier = scale_depth/√L, logits_scaling = d/dim_model_base, attention_multiplier = 1/√head_dim),
so both sides run the same model, with the same weights, batch and optimizer:

- ours:    `minicpm_jax.train.loop.make_train_step` (jitted, params/opt_state donated) with `optim.make_optimizer`
           (clip 1.0 → AdamW → μP lr multiplier per group) on a constant lr;
- PyTorch: eager GraniteForCausalLM (sdpa attention by default), cross-entropy on the logits,
           `clip_grad_norm_(1.0)` and `torch.optim.AdamW` (default foreach implementation) with one param
           group per μP group, so every tensor gets the same lr and weight decay as ours.

Both sides are timed in the same process, in alternating blocks of steps (so slow drift of a noisy machine
hits both alike), after warmup (and, for JAX, after compilation). Reported: median step time, tokens/s =
B·T / median, MFU = tokens/s × FLOPs/token / peak, with FLOPs/token from `metrics.train_flops_per_token`
for both and the peak measured here as the best float32 [n×n]@[n×n] matmul rate of JAX and torch.
`--memory` adds peak RSS per framework, each measured in its own subprocess (this script with --only). Ours
runs twice there: first compiling the step, then loading it from the JAX compilation cache that the first run
filled, as a production run with a persistent cache does; the second peak is the training step's own memory,
without the XLA compiler's.

Threads: torch uses `--threads` (default: the CPUs this process may run on). XLA:CPU sizes its own thread
pools to the machine's cores; XLA_FLAGS=--xla_cpu_multi_thread_eigen=false did not make its dots single-
threaded here (jax 0.10), so to give both sides fewer cores, pin the whole process instead, e.g.
`taskset -c 0 python benchmarks/train_step.py --threads 1`.

    python benchmarks/train_step.py                      # widths 256,512; ~4 minutes on 2 idle cores
    python benchmarks/train_step.py --memory --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np

import _report

# A CPU benchmark: keep JAX off any accelerator so that both frameworks run on the same cores.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # this checkout's minicpm_jax, not whichever one is installed
    sys.path.insert(0, REPO)

FRAMEWORKS = ("jax", "torch")
CONTENDED_LOAD = 0.3  # other processes' cores above which a timing is flagged as disturbed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--widths", default="256,512", help="comma-separated hidden sizes d (heads = d/64, d_ff = 2.5·d)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--kv-heads-ratio", type=int, default=1, help="heads per kv head (1 = MHA, 2+ = GQA)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per framework and width")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (the first one compiles JAX)")
    p.add_argument("--blocks", type=int, default=10, help="the timed steps alternate between frameworks in this "
                   "many blocks")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch.set_num_threads")
    p.add_argument("--lr", type=float, default=0.01, help="base lr (μP divides it by d/256 for 2-D tensors)")
    p.add_argument("--remat", default="none", choices=("none", "full", "save_dots", "save_dots_no_batch"),
                   help="our model.remat_policy (PyTorch keeps every activation)")
    p.add_argument("--attention", default="auto", choices=("auto", "xla", "chunked"),
                   help="our model.attention_impl (auto = chunked on CPU, like PyTorch's sdpa flash kernel)")
    p.add_argument("--torch-attn", default="sdpa", choices=("sdpa", "eager"), help="Granite attn_implementation")
    p.add_argument("--matmul-n", type=int, default=2048, help="size of the square matmul that measures the peak")
    p.add_argument("--no-matmul-peak", action="store_true", help="skip the peak measurement (no MFU)")
    p.add_argument("--memory", action="store_true", help="also measure peak RSS per framework in subprocesses")
    p.add_argument("--only", choices=FRAMEWORKS, help="measure one framework's peak RSS only (what --memory runs "
                   "in each subprocess)")
    p.add_argument("--json", help="write the results to this file")
    args = p.parse_args(argv)
    args.widths = [int(w) for w in args.widths.split(",")]
    return args


# ----------------------------------------------------------------------------------------------- setup

def model_config(width: int, args: argparse.Namespace):
    """The benchmark's MiniCPM shape at hidden size `width`, with the real μP scalars, float32, --remat, --attention."""
    from minicpm_jax.config import ModelConfig

    heads = width // 64
    return ModelConfig(vocab_size=args.vocab, hidden_size=width, intermediate_size=int(2.5 * width),
                       num_layers=args.layers, num_heads=heads, num_kv_heads=max(1, heads // args.kv_heads_ratio),
                       max_position_embeddings=max(4096, args.seq), scale_emb=12.0, scale_depth=1.4,
                       dim_model_base=256, remat_policy=args.remat, attention_impl=args.attention, dtype="float32",
                       param_dtype="float32")


def optim_config() -> dict[str, Any]:
    """The project's AdamW defaults, spelled out because the PyTorch side must use the same numbers."""
    return {"b1": 0.9, "b2": 0.95, "eps": 1e-8, "weight_decay": 0.1, "weight_decay_on": "2d", "clip_grad_norm": 1.0}


def make_batch(cfg, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """One unpacked batch of random tokens: every row is a single document with all positions counted."""
    rows = np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(batch, seq + 1), dtype=np.int32)
    return {"tokens": rows[:, :-1].copy(), "targets": rows[:, 1:].copy(),
            "segment_ids": np.ones((batch, seq), np.int32),
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
            "loss_mask": np.ones((batch, seq), np.int32)}


# ----------------------------------------------------------------------------------------------- trainers

class JaxTrainer:
    """Our production train step; `step()` returns only once the update is computed (block_until_ready)."""

    name = "jax"

    def __init__(self, cfg, batch: dict[str, np.ndarray], lr: float, export_weights: bool = False):
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from minicpm_jax import hf, optim
        from minicpm_jax.model import MiniCPM
        from minicpm_jax.train.step import make_train_step

        self._jax = jax
        model = MiniCPM(cfg, rngs=nnx.Rngs(0))
        # A copy of the initial weights in HF layout, so PyTorch can start from exactly the same point.
        self.hf_weights = ({name: np.array(array, copy=True) for name, array in hf.hf_tensors(model)}
                           if export_weights else None)
        graphdef, _ = nnx.split(model)
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        del model  # its arrays are the params, which the step donates
        tx = optim.make_optimizer(optim_config(), optim.constant_schedule(lr), params, cfg)
        self.params, self.opt_state = params, tx.init(params)
        self.train_step = make_train_step(graphdef, tx)
        self.batch = {k: jnp.asarray(v) for k, v in batch.items()}

    def step(self) -> float:
        self.params, self.opt_state, metrics = self.train_step(self.params, self.opt_state, self.batch)
        self._jax.block_until_ready((self.params, self.opt_state, metrics))
        return float(metrics["loss"])


class TorchTrainer:
    """Eager PyTorch GraniteForCausalLM with clip + AdamW; CPU ops are synchronous, so no sync is needed."""

    name = "torch"

    def __init__(self, cfg, batch: dict[str, np.ndarray], lr: float, attn: str,
                 weights: dict[str, np.ndarray] | None = None):
        import torch
        from transformers import GraniteConfig, GraniteForCausalLM

        from minicpm_jax.model.parametrization import lr_multipliers, param_group
        from minicpm_jax.optim.adamw import decayed_groups

        self._torch = torch
        torch.manual_seed(0)
        config = GraniteConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_position_embeddings,
            rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_word_embeddings,
            embedding_multiplier=cfg.scale_emb, residual_multiplier=cfg.residual_scale,
            logits_scaling=cfg.logit_divisor, attention_multiplier=1 / math.sqrt(cfg.head_dim),
            initializer_range=cfg.init_std, attn_implementation=attn)
        self.model = GraniteForCausalLM(config).train()
        if weights is not None:
            missing, unexpected = self.model.load_state_dict(
                {k: torch.from_numpy(v) for k, v in weights.items()}, strict=False)
            if unexpected or set(missing) - {"lm_head.weight"}:  # the tied head is the embedding
                raise RuntimeError(f"weight copy failed: missing {missing}, unexpected {unexpected}")

        # One param group per μP group, with our lr multiplier and our weight-decay choice ("2d").
        opt = optim_config()
        multipliers = lr_multipliers(cfg)
        decayed = decayed_groups(opt["weight_decay_on"], cfg)
        grouped: dict[str, list] = {}
        for name, param in self.model.named_parameters():  # the tied head appears once, as the embedding
            grouped.setdefault(param_group(tuple(name.removeprefix("model.").split("."))), []).append(param)
        groups = [{"params": params, "lr": lr * multipliers[group],
                   "weight_decay": opt["weight_decay"] if group in decayed else 0.0}
                  for group, params in grouped.items()]
        self.optimizer = torch.optim.AdamW(groups, lr=lr, betas=(opt["b1"], opt["b2"]), eps=opt["eps"])
        self.clip = opt["clip_grad_norm"]
        self.tokens = torch.from_numpy(batch["tokens"].astype(np.int64))
        self.targets = torch.from_numpy(batch["targets"].astype(np.int64))

    def step(self) -> float:
        torch = self._torch
        logits = self.model(input_ids=self.tokens).logits
        # targets are already shifted (as in our batch), so the loss is a plain token-mean cross-entropy.
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), self.targets.flatten())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        return loss.item()


# ----------------------------------------------------------------------------------------------- measuring

def _settle() -> None:
    # Idle OpenMP (torch) and Eigen (XLA) workers spin for a while after their last task; on 2 cores that
    # spinning would steal time from the other framework's first step after a switch.
    time.sleep(0.3)


def _cpu_seconds() -> tuple[float, float]:
    """(CPU seconds the whole machine has been busy, CPU seconds of this process), from /proc and os.times."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    return busy, sum(os.times()[:2])


def time_steps(trainers: list, warmup: int, steps: int, blocks: int) -> dict[str, dict[str, Any]]:
    """Warm every trainer up, then time `steps` steps each, alternating between trainers in `blocks` blocks.

    Also records `other_load`: the cores that other processes (and the hypervisor's steal) kept busy while
    a trainer was timed. Well above 0 means the numbers are contended; PyTorch suffers most from that
    (every OpenMP op waits for its slowest thread).
    """
    results = {}
    for trainer in trainers:
        _settle()
        start = time.perf_counter()
        first_loss = trainer.step()  # JAX compiles here
        first = time.perf_counter() - start
        for _ in range(warmup - 1):
            trainer.step()
        results[trainer.name] = {"first_step_s": first, "first_loss": first_loss, "step_s": [], "other_cpu_s": 0.0}
    per_block = math.ceil(steps / max(1, blocks))
    while any(len(results[t.name]["step_s"]) < steps for t in trainers):
        for trainer in trainers:
            result = results[trainer.name]
            todo = min(per_block, steps - len(result["step_s"]))
            if not todo:
                continue
            _settle()
            busy, own = _cpu_seconds()
            for _ in range(todo):
                start = time.perf_counter()
                loss = trainer.step()
                result["step_s"].append(time.perf_counter() - start)
            busy_after, own_after = _cpu_seconds()
            result["other_cpu_s"] += max(0.0, (busy_after - busy) - (own_after - own))
            result["last_loss"] = loss
    for result in results.values():
        result["median_step_s"] = statistics.median(result["step_s"])
        result["min_step_s"] = min(result["step_s"])
        result["other_load"] = result.pop("other_cpu_s") / sum(result["step_s"])
    return results


def _best_rate(run: Callable[[], None], flops: float, reps: int) -> float:
    run()  # compile / allocate
    best = math.inf
    for _ in range(reps):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return flops / best


def matmul_peak(n: int, reps: int = 8, earlier: dict[str, float] | None = None) -> dict[str, float]:
    """Best float32 [n×n]@[n×n] FLOP/s of each framework; their max serves as the machine's peak.

    Measured at the start and again at the end of a run (`earlier`), keeping the best of both: a peak
    measured while another process held a core would understate the peak and overstate every MFU.
    """
    import jax
    import jax.numpy as jnp
    import torch

    flops = 2.0 * n ** 3
    a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.float32) for i in range(2))
    matmul = jax.jit(jnp.matmul)
    jax_rate = _best_rate(lambda: matmul(a, b).block_until_ready(), flops, reps)
    _settle()
    ta, tb, out = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    torch_rate = _best_rate(lambda: torch.mm(ta, tb, out=out), flops, reps)
    if earlier:
        jax_rate, torch_rate = max(jax_rate, earlier["jax_flops"]), max(torch_rate, earlier["torch_flops"])
    return {"n": n, "jax_flops": jax_rate, "torch_flops": torch_rate, "peak_flops": max(jax_rate, torch_rate)}


# ----------------------------------------------------------------------------------------------- memory

def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def measure_memory_child(args: argparse.Namespace) -> dict[str, Any]:
    """In a `--only` subprocess: RSS after imports and peak RSS after warmup and a few steps."""
    if args.only == "jax":
        import jax  # noqa: F401  (imported before the baseline is read, like everything below)

        import minicpm_jax.train.loop  # noqa: F401
    else:
        import torch  # noqa: F401
        import transformers  # noqa: F401

        import minicpm_jax.model.parametrization  # noqa: F401  (imports jax, too; it is in the baseline)
    baseline = _proc_status_kib("VmRSS")
    cfg = model_config(args.widths[0], args)
    batch = make_batch(cfg, args.batch, args.seq)
    trainer = (JaxTrainer(cfg, batch, args.lr) if args.only == "jax"
               else TorchTrainer(cfg, batch, args.lr, args.torch_attn))  # Granite's own init: no JAX arrays here
    for _ in range(args.warmup + args.steps):
        trainer.step()
    # VmHWM: the peak over the process's life, compilation included. (Resetting it after warmup, via
    # /proc/self/clear_refs, did not lower it here: the allocators keep what they freed.)
    peak = _proc_status_kib("VmHWM")
    return {"baseline_rss_mib": baseline / 1024, "peak_rss_mib": peak / 1024,
            "bytes_per_token": (peak - baseline) * 1024 / (args.batch * args.seq)}


def _memory_child(args: argparse.Namespace, framework: str, width: int, env: dict[str, str] | None = None) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [sys.executable, os.path.abspath(__file__), "--only", framework, "--widths", str(width),
                   "--layers", str(args.layers), "--vocab", str(args.vocab), "--seq", str(args.seq),
                   "--batch", str(args.batch), "--kv-heads-ratio", str(args.kv_heads_ratio),
                   "--threads", str(args.threads), "--torch-attn", args.torch_attn, "--lr", str(args.lr),
                   "--remat", args.remat, "--attention", args.attention,
                   "--steps", "3", "--warmup", "1", "--json", out.name]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env={**os.environ, **(env or {})})
        with open(out.name) as f:
            return json.load(f)["memory"]


def measure_memory(args: argparse.Namespace, width: int) -> dict[str, dict[str, Any]]:
    """Runs this script once per framework in a fresh subprocess, so that each peak RSS is its own.

    Ours runs twice with one JAX compilation cache: "jax" compiles (the compiler's memory is in its peak),
    "jax (cached)" loads the compiled step from the cache, so its peak is what training itself needs.
    """
    results = {"torch": _memory_child(args, "torch", width)}
    with tempfile.TemporaryDirectory() as cache:
        env = {"JAX_COMPILATION_CACHE_DIR": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
               "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
        results["jax"] = _memory_child(args, "jax", width, env)
        results["jax (cached)"] = _memory_child(args, "jax", width, env)
    return results


# ----------------------------------------------------------------------------------------------- report

def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    import jax
    import torch
    import transformers

    return {"cpu": _report.cpu_model(), "os_cpu_count": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
            "torch_threads": torch.get_num_threads(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "jax": jax.__version__, "jax_backend": jax.default_backend(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": sys.version.split()[0],
            "load_average_at_start": os.getloadavg()[0]}


def summarise(cfg, args: argparse.Namespace, timings: dict, peak: float | None) -> dict[str, Any]:
    from minicpm_jax.train import metrics

    flops_per_token = metrics.train_flops_per_token(cfg, args.seq)
    tokens = args.batch * args.seq
    row = {"width": cfg.hidden_size, "heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads,
           "intermediate": cfg.intermediate_size, "matmul_params": metrics.matmul_params(cfg),
           "flops_per_token": flops_per_token}
    for name, t in timings.items():
        t["tokens_per_s"] = tokens / t["median_step_s"]
        t["mfu"] = metrics.mfu(t["tokens_per_s"], flops_per_token, peak or 0.0)
        row[name] = t
    if "jax" in timings and "torch" in timings:
        row["ratio_jax_over_torch"] = timings["jax"]["tokens_per_s"] / timings["torch"]["tokens_per_s"]
        # The fastest step is the least disturbed one: on a busy machine its ratio is the fairer estimate.
        row["ratio_min_step"] = timings["torch"]["min_step_s"] / timings["jax"]["min_step_s"]
    return row


def print_report(report: dict[str, Any]) -> None:
    m, a = report["machine"], report["args"]
    print(f"\nmachine: {m['cpu']}, {m['usable_cpus']} usable CPUs; torch threads {m['torch_threads']}; "
          f"XLA_FLAGS='{m['xla_flags']}'; 1-min load average at start {m['load_average_at_start']:.2f}")
    print(f"versions: jax {m['jax']} ({m['jax_backend']}), torch {m['torch']}, transformers {m['transformers']}")
    print(f"shape: L={a['layers']} V={a['vocab']} T={a['seq']} B={a['batch']} float32, our remat {a['remat']}; "
          f"{a['steps']} timed steps after {a['warmup']} warmup")
    if report.get("matmul"):
        mm = report["matmul"]
        print(f"fp32 matmul {mm['n']}²: jax {mm['jax_flops'] / 1e9:.1f} GFLOP/s, torch {mm['torch_flops'] / 1e9:.1f} "
              f"GFLOP/s → peak {mm['peak_flops'] / 1e9:.1f} GFLOP/s")
    header = (f"{'d':>5} {'framework':>9} {'MFLOP/tok':>9} {'median s':>9} {'min s':>7} {'tokens/s':>9} "
              f"{'MFU':>6} {'other load':>10} {'1st step s':>10} {'loss 1st→last':>15}")
    print("\n" + header + "\n" + "-" * len(header))
    for row in report["results"]:
        for name in FRAMEWORKS:
            if name not in row:
                continue
            t = row[name]
            mfu = f"{t['mfu']:.1%}" if t["mfu"] is not None else "-"
            print(f"{row['width']:>5} {name:>9} {row['flops_per_token'] / 1e6:>9.1f} {t['median_step_s']:>9.3f} "
                  f"{t['min_step_s']:>7.3f} {t['tokens_per_s']:>9.0f} {mfu:>6} {t['other_load']:>10.2f} "
                  f"{t['first_step_s']:>10.2f} {t['first_loss']:>7.4f}→{t['last_loss']:<7.4f}")
        if "ratio_jax_over_torch" in row:
            print(f"{'':>5} {'jax/torch':>9} tokens/s ratio {row['ratio_jax_over_torch']:.2f}x (median step), "
                  f"{row['ratio_min_step']:.2f}x (fastest step)")
    print("other load: cores kept busy by other processes while a framework was timed (0 = a quiet machine)")
    contended = [row["width"] for row in report["results"] for name in FRAMEWORKS
                 if name in row and row[name]["other_load"] > CONTENDED_LOAD]
    if contended:
        print(f"WARNING: other processes used > {CONTENDED_LOAD} cores while d={sorted(set(contended))} was timed; "
              f"those numbers are contended (PyTorch suffers most): rerun on a quiet machine")
    if any("memory" in row for row in report["results"]):
        header = (f"{'d':>5} {'framework':>12} {'base MiB':>9} {'peak MiB':>9} {'bytes/token':>11} "
                  f"{'vs torch':>8}")
        print("\npeak RSS (one subprocess each; jax = compiling, jax (cached) = step loaded from the compilation "
              "cache;\nbytes/token = (peak − RSS after imports) / (B·T))\n" + header + "\n" + "-" * len(header))
        for row in report["results"]:
            memory = row.get("memory", {})
            for name, mem in memory.items():
                change = mem["bytes_per_token"] / memory["torch"]["bytes_per_token"] - 1
                print(f"{row['width']:>5} {name:>12} {mem['baseline_rss_mib']:>9.0f} {mem['peak_rss_mib']:>9.0f} "
                      f"{mem['bytes_per_token']:>11.0f} {change:>+8.0%}")


# ----------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.only:  # a --memory child (or a one-sided run): no peak, no comparison
        if args.only == "torch":  # importing torch into the JAX child would only inflate its RSS
            import torch
            torch.set_num_threads(args.threads)
        report = {"args": vars(args), "memory": measure_memory_child(args)}
        _report.write_json(args.json, report)
        return report

    import torch
    torch.set_num_threads(args.threads)
    if args.threads != len(os.sched_getaffinity(0)):
        print(f"note: torch uses {args.threads} threads but XLA uses all {len(os.sched_getaffinity(0))} usable "
              f"CPUs; pin the process with taskset to give both the same cores", file=sys.stderr)
    report: dict[str, Any] = {"args": vars(args), "machine": machine_info(args), "results": []}
    report["matmul"] = None if args.no_matmul_peak else matmul_peak(args.matmul_n)
    timings = []
    for width in args.widths:
        cfg = model_config(width, args)
        batch = make_batch(cfg, args.batch, args.seq)
        ours = JaxTrainer(cfg, batch, args.lr, export_weights=True)
        theirs = TorchTrainer(cfg, batch, args.lr, args.torch_attn, weights=ours.hf_weights)
        del ours.hf_weights
        print(f"d={width}: timing {args.warmup}+{args.steps} steps per framework ...", file=sys.stderr, flush=True)
        timings.append((cfg, time_steps([ours, theirs], args.warmup, args.steps, args.blocks)))
        del ours, theirs
    if report["matmul"]:
        report["matmul"] = matmul_peak(args.matmul_n, earlier=report["matmul"])
    peak = report["matmul"]["peak_flops"] if report["matmul"] else None
    for cfg, timing in timings:
        row = summarise(cfg, args, timing, peak)
        if args.memory:
            print(f"d={cfg.hidden_size}: measuring memory in subprocesses ...", file=sys.stderr, flush=True)
            row["memory"] = measure_memory(args, cfg.hidden_size)
        report["results"].append(row)
    print_report(report)
    _report.write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
