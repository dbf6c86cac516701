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

from minicpm_jax import errors
from minicpm_jax.parallel import tpu_flags

_COMMAND_MODULES = ("minicpm_jax.cli.run", "minicpm_jax.cli.data", "minicpm_jax.cli.plan",
                    "minicpm_jax.cli.compile",
                    "minicpm_jax.cli.infer", "minicpm_jax.cli.science", "minicpm_jax.cli.align")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minicpm-jax", description=__doc__.split("\n\n")[0],
                                     epilog="Exit codes: 0 done; 1 a check said no (plan, compile: does not fit) or a "
                                            "run stopped itself (a non-finite loss); 2 a mistake in the command, a "
                                            "config, a file or a checkpoint (one line naming it); 130 Ctrl-C.")
    verbose_help = "debug logging, and the full traceback of an error"
    parser.add_argument("-v", "--verbose", action="store_true", help=verbose_help)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in _COMMAND_MODULES:
        importlib.import_module(module_name).register_commands(subparsers)
    for command in subparsers.choices.values():  # --verbose after the command name works too
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose_help)
    return parser


def _config_overrides(extras: list[str]) -> tuple[list[str], list[str]]:
    """(`--config.a.b=v` overrides, the other unparsed arguments). The absl form `--config.a.b v` (a space
    where the '=' goes) is accepted too: a value that follows a `--config.*` key without '=' joins it."""
    overrides, unknown, i = [], [], 0
    while i < len(extras):
        item = extras[i]
        if not item.startswith("--config."):
            unknown.append(item)
        elif "=" not in item and i + 1 < len(extras) and not extras[i + 1].startswith("--"):
            overrides.append(f"{item}={extras[i + 1]}")
            i += 1
        else:
            overrides.append(item)
        i += 1
    return overrides, unknown


def main(argv: list[str] | None = None) -> int:
    """Runs one command; returns its exit code (see build_parser's epilog). A user's mistake (errors.UserError,
    or a ValueError/OSError naming a path) prints one line on stderr, with the traceback only under --verbose;
    any other exception is a bug and keeps its traceback."""
    parser = build_parser()
    # `--config.a.b=v` overrides are not argparse options; collect them for the commands that take a config.
    args, extras = parser.parse_known_args(argv)
    overrides, unknown = _config_overrides(extras)
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
    if not args.verbose:
        # Orbax logs each failure of a background save with its whole traceback (hundreds of lines) before
        # our one line names the step and the fix: keep its message, drop the traceback.
        logging.getLogger("absl").addFilter(_without_traceback)
    from minicpm_jax.train.step_decisions import TrainingStopped

    def report(kind: str, message: str, code: int) -> int:
        print(f"minicpm-jax {args.command}: {kind}: {message}", file=sys.stderr)
        return code

    try:
        return int(args.func(args) or 0)
    except TrainingStopped as stopped:  # asked to stop, and saved: a clean exit that a launcher need not retry
        logging.getLogger("minicpm_jax").warning("%s", stopped)
        return 0
    except KeyboardInterrupt:
        if args.verbose:
            raise
        return report("interrupted", "Ctrl-C", errors.INTERRUPTED_EXIT)
    except FloatingPointError as err:  # the non-finite-loss stop: its message names the step and the checkpoint
        if args.verbose:
            raise
        return report("stopped", errors.one_line(err), errors.STOPPED_EXIT)
    except Exception as err:
        message = errors.user_error_message(err)
        if message is None or args.verbose:  # a bug keeps its traceback; --verbose keeps every traceback
            raise
        return report("error", message, errors.USER_ERROR_EXIT)


if __name__ == "__main__":
    sys.exit(main())


def _without_traceback(record: logging.LogRecord) -> bool:
    record.exc_info, record.exc_text, record.stack_info = None, None, None
    return True

