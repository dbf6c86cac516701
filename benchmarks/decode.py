"""Decode benchmark: our KV-cache generation against transformers' `generate` on the same exported model.

The model is a random-weight MiniCPM exported with `hf.save_hf(arch="granite")` and loaded natively by
transformers (GraniteForCausalLM, sdpa attention, float32), so both sides run the same function with the
same weights. Both decode greedily from the same prompts (all of one length, so no padding on either side)
and never stop early (EOS ignored). For each framework and batch size:

    prefill time  = time to generate 1 token            (prompt forward + first token)
    decode time   = time to generate N tokens - prefill time
    prefill tok/s = B·P / prefill time,   decode tok/s = B·(N-1) / decode time

Medians over --repeats, with the frameworks alternating so machine drift hits both alike; JAX runs once
untimed first (compilation). The greedy tokens of both sides are compared as a sanity check.

    python benchmarks/decode.py                        # d=512, L=4, V=4096, P=128, N=64, batch 1 and 8
    python benchmarks/decode.py --json out.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

import _report

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a CPU benchmark: both frameworks on the same cores


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=512, help="hidden size d (heads = d/64, d_ff = 2.5·d)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--kv-heads-ratio", type=int, default=1, help="query heads per kv head")
    p.add_argument("--prompt", type=int, default=128, help="prompt length P")
    p.add_argument("--new", type=int, default=64, help="generated tokens N")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch.set_num_threads")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    return args


def build(args):
    """(our model, transformers model) with the same weights."""
    import torch
    from flax import nnx
    from transformers import AutoModelForCausalLM

    from minicpm_jax import hf
    from minicpm_jax.config import ModelConfig
    from minicpm_jax.model import MiniCPM

    heads = args.width // 64
    cfg = ModelConfig(vocab_size=args.vocab, hidden_size=args.width, intermediate_size=int(2.5 * args.width),
                      num_layers=args.layers, num_heads=heads, num_kv_heads=max(1, heads // args.kv_heads_ratio),
                      max_position_embeddings=4096, scale_emb=12.0, scale_depth=1.4, dim_model_base=256)
    ours = MiniCPM(cfg, rngs=nnx.Rngs(0))
    with tempfile.TemporaryDirectory() as folder:
        hf.save_hf(ours, None, folder, arch="granite")
        theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    theirs.generation_config.eos_token_id = None  # generate exactly N tokens, as ours does with ignore_eos
    theirs.generation_config.pad_token_id = 0
    return ours, theirs


def time_ours(model, prompts: np.ndarray, new_tokens: int) -> tuple[float, list[list[int]]]:
    from minicpm_jax.infer.generate import generate_tokens

    start = time.perf_counter()
    out = generate_tokens(model, prompts.tolist(), max_new_tokens=new_tokens, ignore_eos=True)
    return time.perf_counter() - start, out


def time_theirs(model, prompts: np.ndarray, new_tokens: int) -> tuple[float, list[list[int]]]:
    import torch

    ids = torch.from_numpy(prompts.astype(np.int64))
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
    return time.perf_counter() - start, out[:, prompts.shape[1]:].tolist()


def measure(args, ours, theirs, batch: int) -> dict:
    prompts = np.random.default_rng(batch).integers(3, args.vocab, size=(batch, args.prompt), dtype=np.int32)
    runners = {"ours (JAX)": lambda n: time_ours(ours, prompts, n),
               "transformers": lambda n: time_theirs(theirs, prompts, n)}
    runners["ours (JAX)"](1), runners["ours (JAX)"](args.new)  # compile prefill and step
    times = {name: {"prefill": [], "total": []} for name in runners}
    tokens = {}
    for _ in range(args.repeats):
        for name, run in runners.items():
            times[name]["prefill"].append(run(1)[0])
            elapsed, tokens[name] = run(args.new)
            times[name]["total"].append(elapsed)
    ours_tokens, their_tokens = tokens.values()
    agree = np.mean([a == b for row_a, row_b in zip(ours_tokens, their_tokens) for a, b in zip(row_a, row_b)])
    rows = {}
    for name, t in times.items():
        prefill, total = statistics.median(t["prefill"]), statistics.median(t["total"])
        rows[name] = {"prefill_s": prefill, "total_s": total,
                      "prefill_tokens_per_s": batch * args.prompt / prefill,
                      "decode_tokens_per_s": batch * (args.new - 1) / (total - prefill)}
    return {"batch": batch, "frameworks": rows, "greedy_token_agreement": float(agree)}


def main(argv=None) -> None:
    args = parse_args(argv)
    import jax
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    ours, theirs = build(args)
    print(f"d={args.width} L={args.layers} V={args.vocab} P={args.prompt} N={args.new}, float32 on CPU, "
          f"jax {jax.__version__}, torch {torch.__version__} ({args.threads} threads), "
          f"transformers {transformers.__version__}, {os.cpu_count()} CPUs", file=sys.stderr)
    results = [measure(args, ours, theirs, batch) for batch in args.batches]
    print("| batch | framework | prefill tok/s | decode tok/s | decode ours/theirs | greedy tokens agree |")
    print("|---|---|---|---|---|---|")
    for r in results:
        f = r["frameworks"]
        ratio = f["ours (JAX)"]["decode_tokens_per_s"] / f["transformers"]["decode_tokens_per_s"]
        for name, row in f.items():
            print(f"| {r['batch']} | {name} | {row['prefill_tokens_per_s']:.0f} | {row['decode_tokens_per_s']:.1f} | "
                  f"{f'{ratio:.2f}x' if name.startswith('ours') else ''} | {r['greedy_token_agreement']:.0%} |")
    _report.write_json(args.json, {"args": vars(args), "results": results})


if __name__ == "__main__":
    main()
