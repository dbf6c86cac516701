"""Run- and model-level subcommands: train, branch, extend, upcycle, import-hf, export-hf, convert-bin, params, demo."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger("minicpm_jax")


def register_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="start a run, or resume one from its latest checkpoint")
    p.add_argument("--config", help="config file (needed to start a run; a resumed run uses its own config.json)")
    p.add_argument("--workdir", required=True, help="run directory: a local path, gs://bucket/... or s3://bucket/...")
    p.add_argument("--allow-data-change", action="store_true",
                   help="resume although a prepared folder changed since the run recorded it (the change is "
                        "recorded in RUN/data_sources.json); without it such a resume is refused")
    _add_distributed_arguments(p)
    p.set_defaults(func=train, accepts_config_overrides=True)

    p = subparsers.add_parser("branch", help="decay a stable checkpoint of a run in a new run (then train it)")
    p.add_argument("--from", dest="source", required=True, help="source run directory")
    p.add_argument("--step", type=int, required=True, help="stable-phase checkpoint step to branch from")
    p.add_argument("--workdir", required=True, help="new run directory for the branch")
    p.add_argument("--decay-steps", type=int, default=None, help="decay length D (default: the source's)")
    p.add_argument("--untie-head", action="store_true",
                   help="give the branch its own LM head, initialised from the embedding (long-context runs)")
    p.add_argument("--allow-decay-checkpoint", action="store_true",
                   help="branch from a decay-phase checkpoint too: re-warms the lr to the peak from an annealed "
                        "checkpoint (refused without this flag)")
    p.add_argument("--no-train", action="store_true", help="only create the branch")
    _add_distributed_arguments(p)
    p.set_defaults(func=branch, accepts_config_overrides=True)

    p = subparsers.add_parser("extend", help="lengthen a WSD run's stable phase to --steps in all (then resume it "
                                             "with train --workdir)")
    p.add_argument("--workdir", required=True, help="run directory, finished or in progress, not yet in its decay")
    p.add_argument("--steps", type=int, required=True, help="the run's new train.steps")
    p.add_argument("--decay-steps", type=int, default=None,
                   help="decay length D, moved to the end (default: the run's; 0 = an open-ended stable phase)")
    p.set_defaults(func=extend)

    p = subparsers.add_parser("upcycle", help="turn a dense run's checkpoint into an MoE run whose experts copy "
                                              "the MLP (then train it)")
    p.add_argument("--from", dest="source", required=True, help="dense source run directory")
    p.add_argument("--step", type=int, default=None, help="checkpoint step to upcycle (default: latest); the paper "
                                                          "upcycles a stable-phase checkpoint")
    p.add_argument("--workdir", required=True, help="new run directory for the MoE run")
    p.add_argument("--config", required=True, help="the MoE run's config: the source's model shape plus "
                                                   "model.num_experts, e.g. configs/minicpm_moe_8x2b.py")
    p.add_argument("--no-train", action="store_true", help="only create the run")
    _add_distributed_arguments(p)
    p.set_defaults(func=upcycle, accepts_config_overrides=True)

    p = subparsers.add_parser("import-hf", help="turn an HF MiniCPM/Granite folder into a run directory")
    p.add_argument("--hf", required=True, help="folder with config.json and safetensors")
    p.add_argument("--workdir", required=True, help="new run directory")
    p.add_argument("--param-dtype", default="float32", help="dtype to store the weights in (default float32)")
    p.set_defaults(func=import_hf)

    p = subparsers.add_parser("export-hf", help="write a run's weights as an HF checkpoint")
    p.add_argument("--workdir", required=True, help="run directory")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--arch", choices=("minicpm", "granite"), default="minicpm",
                   help="minicpm: vLLM / llama.cpp / MiniCPM remote code; granite: native transformers")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in --out")
    p.add_argument("--tokenizer", default=None, help="SentencePiece .model to ship with the chat template "
                                                     "(default: the run's data.tokenizer)")
    p.add_argument("--remote-code", action="store_true",
                   help="(--arch minicpm) also write configuration_minicpm.py and modeling_minicpm.py, so that "
                        "transformers loads the export with trust_remote_code=True")
    p.set_defaults(func=export_hf)

    p = subparsers.add_parser("convert-bin", help="convert pickled pytorch_model*.bin to safetensors (explicit)")
    p.add_argument("--hf", required=True, help="folder with pytorch_model*.bin")
    p.add_argument("--out", required=True, help="new folder for the safetensors copy")
    p.set_defaults(func=convert_bin)

    p = subparsers.add_parser("params", help="count a config's parameters (abstract shapes, nothing allocated)")
    p.add_argument("--config", required=True, help="config file, e.g. configs/minicpm_2b.py")
    p.set_defaults(func=params, accepts_config_overrides=True)

    p = subparsers.add_parser("demo", help="corpus → tokenizer → shards → WSD training → decay branch → HF export → "
                                           "transformers (what `make demo` runs)")
    p.add_argument("--out", default="demo_out", help="folder for everything the demo writes (replaced if present)")
    p.set_defaults(func=demo)


def _add_distributed_arguments(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("multi-host (not needed on TPU pods or SLURM, where jax detects the job)")
    group.add_argument("--coordinator-address", help="HOST:PORT of process 0 (env MINICPM_COORDINATOR_ADDRESS)")
    group.add_argument("--num-processes", type=int, help="processes in the job (env MINICPM_NUM_PROCESSES)")
    group.add_argument("--process-id", type=int, help="this process's index (env MINICPM_PROCESS_ID)")
    group.add_argument("--heartbeat-timeout", type=int, metavar="SECONDS",
                       help="a process silent this long counts as dead and ends the job with an error naming it "
                            "(env MINICPM_HEARTBEAT_TIMEOUT; default 100)")


def _initialize_distributed(args: argparse.Namespace) -> None:
    from minicpm_jax.parallel import distributed

    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id, args.heartbeat_timeout)


def train(args: argparse.Namespace) -> None:
    from minicpm_jax import config
    from minicpm_jax.train import loop as train_lib

    if args.config_overrides and not args.config:
        # A resumed run keeps its config; only where it runs (the mesh) may change.
        cfg = None
        mesh_only = all(item.startswith("--config.mesh.") for item in args.config_overrides)
        if not mesh_only:
            raise config.ConfigError("--config.* overrides need --config (a resumed run keeps its own config; "
                                     "only --config.mesh.* may change where it runs)")
    else:
        cfg = config.load(args.config, args.config_overrides) if args.config else None
    _initialize_distributed(args)
    cfg = train_lib.prepare_workdir(args.workdir, cfg, args.config_overrides, allow_data_change=args.allow_data_change)
    if cfg is not None and not args.config:
        config.apply_overrides(cfg, args.config_overrides)
    train_lib.train(cfg, args.workdir)


def branch(args: argparse.Namespace) -> None:
    from minicpm_jax.run import branch as branch_lib
    from minicpm_jax.train import loop as train_lib

    _initialize_distributed(args)
    cfg = branch_lib.create_branch(args.source, args.step, args.workdir, args.decay_steps, args.config_overrides,
                                   untie_head=args.untie_head, allow_decay_checkpoint=args.allow_decay_checkpoint)
    if not args.no_train:
        train_lib.train(cfg, args.workdir)


def extend(args: argparse.Namespace) -> None:
    from minicpm_jax.run.extend import extend_run

    extend_run(args.workdir, args.steps, args.decay_steps)


def upcycle(args: argparse.Namespace) -> None:
    from minicpm_jax import config
    from minicpm_jax.run.upcycle import create_upcycled_run
    from minicpm_jax.train import loop as train_lib

    cfg = config.load(args.config, args.config_overrides)
    _initialize_distributed(args)
    cfg = create_upcycled_run(args.source, args.step, args.workdir, cfg)
    if not args.no_train:
        train_lib.train(cfg, args.workdir)


def import_hf(args: argparse.Namespace) -> None:
    from minicpm_jax.hf.runs import import_run

    import_run(args.hf, args.workdir, args.param_dtype)


def export_hf(args: argparse.Namespace) -> None:
    from minicpm_jax.hf.runs import export_run

    export_run(args.workdir, args.out, step=args.step, arch=args.arch, dtype=args.dtype, overwrite=args.overwrite,
               tokenizer=args.tokenizer, remote_code=args.remote_code)


def convert_bin(args: argparse.Namespace) -> None:
    from minicpm_jax.hf.convert_bin import convert_bin_to_safetensors

    shards = convert_bin_to_safetensors(args.hf, args.out)
    log.info("wrote %s to %s; load it with `minicpm-jax import-hf --hf %s`", ", ".join(shards), args.out, args.out)


def params(args: argparse.Namespace) -> None:
    from minicpm_jax import config
    from minicpm_jax.model import count_params

    cfg = config.load(args.config, args.config_overrides)
    print(f"non-embedding parameters: {count_params(cfg.model):,}")
    print(f"total parameters:         {count_params(cfg.model, include_embedding=True):,}")
    if cfg.model.num_experts:
        print(f"active non-embedding:     {count_params(cfg.model, active=True):,} "
              f"({cfg.model.num_experts_per_tok} of {cfg.model.num_experts} experts per token)")


def demo(args: argparse.Namespace) -> None:
    from minicpm_jax.demo import run_demo

    run_demo(args.out)
