"""The `minicpm-jax` console script.

Each subcommand lives next to the code it drives; modules listed in `_COMMAND_MODULES` add their
subparsers through `register_commands(subparsers)`. Heavy imports (jax, torch) happen inside the
command functions, so `minicpm-jax --help` is instant. Config overrides use ml_collections' style:
`--config.model.num_layers=4`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from minicpm_jax.parallel import tpu_flags

_COMMAND_MODULES = ("minicpm_jax.cli.run", "minicpm_jax.cli.data", "minicpm_jax.cli.plan",
                    "minicpm_jax.cli.compile",
                    "minicpm_jax.cli.infer", "minicpm_jax.cli.science", "minicpm_jax.cli.align")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minicpm-jax", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in _COMMAND_MODULES:
        importlib.import_module(module_name).register_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # `--config.a.b=v` overrides are not argparse options; collect them for the commands that take a config.
    args, overrides = parser.parse_known_args(argv)
    unknown = [item for item in overrides if not item.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.config_overrides = overrides
    tpu_flags.extend_libtpu_init_args()  # before jax starts: a run on TPU compiles as `compile` measured
    if overrides and not getattr(args, "accepts_config_overrides", False):
        parser.error(f"{args.command} takes no --config.* overrides (got {' '.join(overrides)})")
    # Our progress at INFO; other libraries (jax's backend probing, ...) only at WARNING unless --verbose.
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("minicpm_jax").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    from minicpm_jax.train.step_decisions import TrainingStopped

    try:
        return int(args.func(args) or 0)
    except TrainingStopped as stopped:  # asked to stop, and saved: a clean exit that a launcher need not retry
        logging.getLogger("minicpm_jax").warning("%s", stopped)
        return 0
    except (ValueError, OSError) as err:
        # Our errors (ConfigError, CheckpointFormatError, RunDirError, missing files) already name the
        # key, tensor or path; a traceback would only bury that. --verbose keeps the traceback.
        if args.verbose:
            raise
        print(f"minicpm-jax {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
