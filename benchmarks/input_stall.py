"""Does the input pipeline stall the training step? Times the training loop with and without data loading.

The loop is the one `train.train` runs: `feed.next_batch` (Grain: mixture, shuffle, split, first-fit
packing, batching), `sharding.global_batch` (host -> device), then the jitted train step, dispatched
asynchronously, so the host loads batch n+1 while the device computes step n. Three variants, timed in
alternating blocks of `--steps` steps (each block ends with block_until_ready), medians over `--blocks`:

  fixed    the step on one batch already on the device: no input work at all (the lower bound);
  feed     next_batch + global_batch before every step, exactly as the training loop does;
  host     next_batch alone, without any step: the pipeline's own cost per batch.

stall per step = (feed - fixed) / steps: the time the step waits for its input. The data is a synthetic
prepared folder (random documents of lengths drawn like natural text, written to a temporary directory),
so the pipeline does the same work as on a real corpus.

    python benchmarks/input_stall.py                          # d 256, L 4, T 256, B 8 on the CPU
    python benchmarks/input_stall.py --width 512 --json stall.json
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

os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="steps per timed block")
    p.add_argument("--blocks", type=int, default=4, help="timed blocks per variant (alternating)")
    p.add_argument("--workers", type=int, default=0, help="data.num_workers (Grain worker processes)")
    p.add_argument("--json", help="write the results here")
    return p.parse_args(argv)


def write_corpus(out_dir: str, vocab: int, num_docs: int, seed: int = 0) -> str:
    """A prepared folder of random documents with log-normal lengths (median ~300 tokens, a long tail)."""
    from minicpm_jax.data import records

    rng = np.random.default_rng(seed)
    writer = records.ShardWriter(out_dir, 4)
    total = 0
    for _ in range(num_docs):
        length = int(np.clip(rng.lognormal(np.log(300), 1.0), 8, 20000))
        writer.write(np.concatenate([[1], rng.integers(3, vocab, size=length), [2]]).astype(np.int32))
        total += length + 2
    records.write_manifest(out_dir, {"num_documents": num_docs, "num_tokens": total,
                                     "mean_document_tokens": total / num_docs, "bytes_per_token": 4.0,
                                     "shards": writer.close(),
                                     "tokenizer": {"path": "synthetic", "sha256": "synthetic"}})
    return out_dir


def main(argv=None) -> dict:
    args = parse_args(argv)
    import jax
    from flax import nnx

    from minicpm_jax import optim
    from minicpm_jax.config import DataConfig, ModelConfig
    from minicpm_jax.data.feed import DataFeed
    from minicpm_jax.model import MiniCPM
    from minicpm_jax.parallel import mesh as sharding
    from minicpm_jax.train.step import make_train_step

    cfg = ModelConfig(vocab_size=args.vocab, hidden_size=args.width, intermediate_size=int(2.5 * args.width),
                      num_layers=args.layers, num_heads=args.width // 64, num_kv_heads=args.width // 64,
                      max_position_embeddings=max(4096, args.seq), dim_model_base=256)
    tmp = tempfile.TemporaryDirectory()
    tokens_needed = 2 * args.batch * args.seq * args.steps * args.blocks * 3
    corpus = write_corpus(os.path.join(tmp.name, "corpus"), args.vocab, num_docs=max(200, tokens_needed // 500))
    data_cfg = DataConfig.from_config({"mixtures": {"stable": f"{corpus}:1"}, "num_workers": args.workers})
    feed = DataFeed(data_cfg, lambda step: "stable", args.seq, args.batch)
    feed.restore(0, None)
    mesh = sharding.make_mesh(sharding.MeshConfig.from_config(None))

    model = MiniCPM(cfg, rngs=nnx.Rngs(0))
    graphdef, _ = nnx.split(model)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    del model
    tx = optim.make_optimizer({}, optim.constant_schedule(1e-3), params, cfg)
    state = {"params": params, "opt_state": tx.init(params)}
    train_step = make_train_step(graphdef, tx)
    fixed_batch = sharding.global_batch(feed.next_batch(0), mesh)
    step_count = [0]

    def run(variant: str) -> float:
        start = time.perf_counter()
        metrics = None
        for _ in range(args.steps):
            if variant == "host":
                feed.next_batch(step_count[0])
                continue
            batch = fixed_batch if variant == "fixed" else sharding.global_batch(feed.next_batch(step_count[0]), mesh)
            state["params"], state["opt_state"], metrics = train_step(state["params"], state["opt_state"], batch)
            step_count[0] += 1
        jax.block_until_ready((state["params"], metrics))
        return (time.perf_counter() - start) / args.steps

    variants = ("fixed", "feed", "host")
    run("fixed"), run("feed")  # compile and warm up
    times = {v: [] for v in variants}
    for _ in range(args.blocks):
        for variant in variants:
            times[variant].append(run(variant))
    medians = {v: statistics.median(t) for v, t in times.items()}
    result = {"args": vars(args), "jax": jax.__version__, "per_step_s": medians, "blocks": times,
              "stall_per_step_s": medians["feed"] - medians["fixed"],
              "stall_fraction": (medians["feed"] - medians["fixed"]) / medians["fixed"],
              "load_average": os.getloadavg()[0]}
    feed.close()
    tmp.cleanup()
    print(f"d={args.width} L={args.layers} T={args.seq} B={args.batch}, data.num_workers={args.workers}; "
          f"medians of {args.blocks} blocks of {args.steps} steps; 1-min load average {result['load_average']:.1f}")
    print(f"  step on a fixed device batch   {medians['fixed'] * 1e3:8.1f} ms")
    print(f"  step with next_batch (train)   {medians['feed'] * 1e3:8.1f} ms")
    print(f"  next_batch alone               {medians['host'] * 1e3:8.1f} ms")
    print(f"  stall per step                 {result['stall_per_step_s'] * 1e3:8.1f} ms "
          f"({result['stall_fraction']:+.1%} of the step)")
    _report.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
