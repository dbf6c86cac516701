"""Alignment subcommands of the `minicpm-jax` CLI: sft and dpo.

Both start a new run from another run's checkpoint (`--from RUN [--step N]`; an HF model first goes
through `import-hf`), prepare the JSONL given with `--data` into RUN/data with the source's tokenizer,
and train. Running the same command again resumes the run.
"""

from __future__ import annotations

import argparse


def _add_common_arguments(p: argparse.ArgumentParser, default_config: str, data_help: str) -> None:
    p.add_argument("--from", dest="source", required=True, help="run to start from (a training, SFT or import-hf run)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step of --from (default: its latest)")
    p.add_argument("--workdir", required=True, help="new run directory (an existing one is resumed)")
    p.add_argument("--data", nargs="+", default=(), help=data_help + " (omit to use data.mixtures of the config)")
    p.add_argument("--tokenizer", default=None, help="SentencePiece .model (default: the --from run's data.tokenizer)")
    p.add_argument("--config", default=default_config, help=f"config file (default {default_config})")
    p.add_argument("--no-train", action="store_true", help="only create the run")


def _load_config(args: argparse.Namespace):
    from minicpm_jax import config

    return config.load(args.config, args.config_overrides)


def sft(args: argparse.Namespace) -> None:
    from minicpm_jax.align.sft import run_sft

    run_sft(args.source, args.step, args.workdir, _load_config(args), args.data, args.tokenizer, args.val_fraction,
            train=not args.no_train, overrides=args.config_overrides)


def dpo(args: argparse.Namespace) -> None:
    from minicpm_jax.align.dpo import run_dpo

    run_dpo(args.source, args.step, args.workdir, _load_config(args), args.data, args.tokenizer,
            train=not args.no_train, overrides=args.config_overrides)


def register_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("sft", help="supervised fine-tuning on chat JSONL (loss on assistant tokens only)")
    _add_common_arguments(p, "configs/sft.py", "JSONL conversations: {\"messages\": [{\"role\", \"content\"}, ...]}")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="conversations held out in RUN/data/val for evaluation (with train.eval_every_steps)")
    p.set_defaults(func=sft, accepts_config_overrides=True)

    p = subparsers.add_parser("dpo", help="direct preference optimisation against the frozen --from model")
    _add_common_arguments(p, "configs/dpo.py",
                          "JSONL pairs: {\"prompt\", \"chosen\", \"rejected\"} (strings or messages)")
    p.set_defaults(func=dpo, accepts_config_overrides=True)
