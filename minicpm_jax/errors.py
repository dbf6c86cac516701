"""The one marker for a user's mistake, and how the command line reports one.

A `UserError` is raised for something the user gave (a config file or key, a data file, a checkpoint folder, a
flag) and its message names that file, key or tensor. Library errors that are user mistakes derive from it
alongside the builtin they refine (`config.ConfigError` is a UserError and a ValueError), so code that catches
the builtin keeps working. The CLI prints such an error as one line and exits 2; `--verbose` shows the
traceback. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

USER_ERROR_EXIT = 2  # argparse's own code for a bad command line
STOPPED_EXIT = 1  # a run that stopped itself (a non-finite loss): not the user's mistake, not a crash either
INTERRUPTED_EXIT = 130  # Ctrl-C, as shells report SIGINT


class UserError(Exception):
    """A mistake in what the user gave; the message names the file, key or tensor, and what to do."""


def one_line(message: object) -> str:
    """`message` on one line: its non-empty lines joined by '; '."""
    return "; ".join(line.strip() for line in str(message).splitlines() if line.strip())


def user_error_message(err: BaseException) -> str | None:
    """The one line to print for `err` when it is a user's mistake, else None (a bug: keep the traceback).

    Besides UserError, ValueError and OSError count: ours (the run-directory, storage and missing-file errors)
    name the path, and the libraries' (a JSON file that does not parse, a folder that does not exist) come
    from the files the user named. An ImportError that says what to `pip install` is a missing extra.
    """
    if isinstance(err, KeyError) and isinstance(err, UserError) and err.args:
        return one_line(err.args[0])  # str(KeyError) quotes its message
    if isinstance(err, (UserError, ValueError, OSError)):
        return one_line(err) or type(err).__name__
    if isinstance(err, ImportError) and "pip install" in str(err):
        return one_line(err)
    return None
