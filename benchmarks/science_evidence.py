"""Regenerates the evidence of docs/science.md on the demo corpus, on CPU, with the real `minicpm-jax` commands.

    (a) WSD with a 10% decay vs Cosine(T=S) at the same token count (+ the decay dynamics of the WSD run)
    (b) μP learning-rate transfer over 3 widths vs standard parametrization (`lr-transfer`)
    (c) a scaling-law fit over 3 model sizes × 4 decay branches of one stable run each (`branch`, `fit-scaling`)
    (d) the μP coordinate check over widths and depths (`coord-check`; no data, not in the default --only)

Everything is tiny (widths 64-256, 4 layers, a 1024-token vocabulary, 512 tokens per step) so that the whole
script takes about 25 minutes on 2 CPU cores. Usage:

    python benchmarks/science_evidence.py --out science_out [--only a,b,c] [--img docs/img]

The runs resume where they stopped (every run directory is an ordinary resumable run), so an interrupted
script can simply be started again. A summary of each experiment's numbers goes to OUT/evidence_<experiment>.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

# imported after the sys.path insert above, so that the checkout's package is found
from minicpm_jax import cli  # noqa: E402

log = logging.getLogger("evidence")
CONFIG = str(REPO / "configs" / "windtunnel.py")
VOCAB = 1024


def run(*args: str) -> None:
    log.info("$ minicpm-jax %s", " ".join(args))
    if cli.main(list(args)) != 0:
        raise RuntimeError(f"failed: minicpm-jax {' '.join(args)}")


def prepare_data(data: Path) -> list[str]:
    """The demo corpus with a 1024-token tokenizer (smaller than the demo's 4096: the tiny models' compute
    would otherwise go mostly into the vocabulary). Returns the data overrides for every run."""
    tokenizer = data / "tokenizer" / "science.model"
    if not (data / "bible" / "train" / "manifest.json").is_file():
        run("demo-corpus", "--out", str(data / "raw"))
        run("train-tokenizer", "--input", str(data / "raw"), "--vocab-size", str(VOCAB),
            "--out", str(tokenizer.with_suffix("")))
        # One document per speech (blank-line block), not per play: consecutive 512-token batches from one play
        # are so alike that a tiny model's held-out loss swings by 0.3 nats with whichever play it just read.
        run("prepare-data", "--input", str(data / "raw" / "shakespeare"), "--tokenizer", str(tokenizer),
            "--out", str(data / "shakespeare"), "--val-fraction", "0.1", "--num-shards", "4",
            "--text-mode", "paragraphs")
        run("prepare-data", "--input", str(data / "raw" / "bible"), "--tokenizer", str(tokenizer),
            "--out", str(data / "bible"), "--val-fraction", "0.05", "--num-shards", "4")
    # Held out: the first 16 batches (8K tokens) of the held-out Shakespeare speeches, the same for every run.
    return [f"--config.model.vocab_size={VOCAB}",
            f"--config.data.mixtures.stable={data / 'shakespeare/train'}:0.7,{data / 'bible/train'}:0.3",
            f"--config.data.val_dir={data / 'shakespeare/val'}", f"--config.data.tokenizer={tokenizer}",
            "--config.train.eval_batches=16"]


def final_eval(workdir: Path) -> float:
    from minicpm_jax.science.results import read_run

    result = read_run(str(workdir))
    if result.eval_step != result.step:
        raise RuntimeError(f"{workdir} was not evaluated at its last step")
    return result.eval_loss_per_byte


def wsd_vs_cosine(out: Path, data_args: list[str], img: Path) -> dict:
    """(a) 400 steps either way: WSD(W 8, stable to 360, exp decay over the last 40 = 10%) vs Cosine(T = S = 400)."""
    from minicpm_jax.demo import plot_runs
    from minicpm_jax.science.plots import plot_dynamics
    from minicpm_jax.science.results import read_metrics

    common = [*data_args, "--config.train.steps=400", "--config.schedule.warmup_steps=8",
              "--config.train.eval_every_steps=40", "--config.checkpoint.every_steps=200"]
    wsd, cosine = out / "wsd", out / "cosine"
    run("train", "--config", CONFIG, "--workdir", str(wsd), *common, "--config.schedule.stable_steps=352",
        "--config.schedule.decay_steps=40", "--config.train.log_every_steps=1", "--config.train.log_update_stats=True")
    run("train", "--config", CONFIG, "--workdir", str(cosine), *common, "--config.schedule.name=cosine",
        "--config.train.log_every_steps=10")
    plot_runs({"WSD, 10% exp decay": wsd, "Cosine(T=S)": cosine}, img / "wsd_vs_cosine.png",
              title="WSD (10% decay) vs Cosine(T=S), same 400 steps × 512 tokens")
    records = [r for r in read_metrics(str(wsd)) if "loss" in r]
    plot_dynamics(records, str(img / "decay_dynamics.png"), decay_start=360)
    stable = [r for r in records if 300 < r["step"] <= 360]
    decay = [r for r in records if r["step"] > 370]
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)
    # Training loss on the last 10 batches: both runs see the same batches, each before training on it.
    last_window = {name: [r["loss_per_byte"] for r in read_metrics(str(workdir)) if "loss" in r and r["step"] > 390]
                   for name, workdir in (("wsd", wsd), ("cosine", cosine))}
    return {"wsd_eval_loss_per_byte": final_eval(wsd), "cosine_eval_loss_per_byte": final_eval(cosine),
            "wsd_last10_train_loss_per_byte": sum(last_window["wsd"]) / len(last_window["wsd"]),
            "cosine_last10_train_loss_per_byte": last_window["cosine"][-1],  # logged as the mean of steps 391-400
            "dynamics_stable_vs_decay": {key: [mean(stable, key), mean(decay, key)] for key in
                                         ("grad_norm", "grad_cosine", "update_max_abs", "curvature",
                                          "directional_d1")}}


def lr_transfer(out: Path, data_args: list[str], img: Path) -> dict:
    """(b) widths 32/64/128 × 4 lrs × {μP, standard}, 60 steps each (WSD, 10% decay)."""
    sweep = out / "lr_transfer"
    run("lr-transfer", "--config", CONFIG, "--out", str(sweep), "--widths", "32,64,128",
        "--lrs", "0.003,0.01,0.03,0.1", *data_args, "--config.train.steps=60",
        "--config.schedule.warmup_steps=4", "--config.schedule.stable_steps=50", "--config.schedule.decay_steps=6",
        "--config.train.eval_every_steps=60", "--config.checkpoint.every_steps=60")
    os.replace(sweep / "lr_transfer.png", img / "lr_transfer.png")
    return json.loads((sweep / "lr_transfer.json").read_text())


def scaling(out: Path, data_args: list[str], img: Path) -> dict:
    """(c) one constant-lr stable run per width (64, 128, 192; 300 steps), decayed at 60, 120, 180, 300 over 10%."""
    branches = {60: 6, 120: 12, 180: 18, 300: 30}
    runs = out / "scaling"
    for width in (64, 128, 192):
        stable = runs / f"d{width}" / "stable"
        width_args = [f"--config.model.hidden_size={width}", f"--config.model.intermediate_size={width * 5 // 2}",
                      f"--config.model.num_heads={width // 32}", f"--config.model.num_kv_heads={width // 32}"]
        run("train", "--config", CONFIG, "--workdir", str(stable), *data_args, *width_args,
            "--config.train.steps=300", "--config.schedule.warmup_steps=8", "--config.schedule.stable_steps=292",
            "--config.schedule.decay_steps=0", "--config.train.eval_every_steps=60",
            "--config.checkpoint.every_steps=60", "--config.checkpoint.keep_every_steps=60")
        for step, decay in branches.items():
            run("branch", "--from", str(stable), "--step", str(step), "--decay-steps", str(decay),
                "--workdir", str(runs / f"d{width}" / f"decay_at_{step}"),
                f"--config.train.eval_every_steps={step + decay}")  # evaluate once, at the end of the decay
    run("fit-scaling", "--runs", str(runs), "--out", str(runs / "fit"), "--compute", "1e21")
    for name in ("scaling_fit.png", "envelopes.png"):
        if (runs / "fit" / name).is_file():
            os.replace(runs / "fit" / name, img / name)
    return json.loads((runs / "fit" / "scaling_fit.json").read_text())


def coord_check(out: Path, data_args: list[str], img: Path) -> dict:
    """(d) the wind-tunnel model at widths 64-512 (2 layers) and depths 2-16 (width 128), 5 Adam steps, 3 seeds."""
    del data_args  # random tokens over the wind-tunnel config's own vocabulary: no corpus needed
    run("coord-check", "--config", CONFIG, "--out", str(out / "coord_check"))
    for name in ("coord_check.png", "coord_check_depth.png"):
        os.replace(out / "coord_check" / name, img / name)
    return json.loads((out / "coord_check" / "coord_check.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="science_out", help="runs and data (resumable)")
    parser.add_argument("--img", default=str(REPO / "docs" / "img"), help="where the PNGs go")
    parser.add_argument("--only", default="a,b,c", help="which experiments: a (WSD vs cosine), b (LR transfer), "
                                                        "c (scaling fit), d (coordinate check)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    import jax

    out, img = Path(args.out), Path(args.img)
    img.mkdir(parents=True, exist_ok=True)
    # One persistent compilation cache for every run: same-shaped runs skip most compilation.
    jax.config.update("jax_compilation_cache_dir", str(out / ".jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    data_args = prepare_data(out / "data")
    experiments = {"a": ("wsd_vs_cosine", wsd_vs_cosine), "b": ("lr_transfer", lr_transfer),
                   "c": ("scaling", scaling), "d": ("coord_check", coord_check)}
    for key in args.only.split(","):
        name, experiment = experiments[key.strip()]
        summary = experiment(out, data_args, img)
        # One file per experiment, so that experiments may run in separate processes at once.
        (out / f"evidence_{name}.json").write_text(json.dumps(summary, indent=1))
        print(json.dumps({name: summary}, indent=1))


if __name__ == "__main__":
    main()
