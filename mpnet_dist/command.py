"""How every mpnet-dist command talks to its user: one help layout, one error line, one --debug switch.

- A command raises a UserError subclass (ConfigError, DataError, CheckpointError, ExportError, UsageError) for
  anything the user can fix. `run_command` prints it as `PROG: error: MESSAGE`, one line on stderr, and returns
  exit code 2, without a traceback. `--debug` on the command line re-raises it with its traceback. Any other
  exception is a bug in mpnet-dist and keeps its traceback (exit code 1).
- Under a launcher only rank 0 prints: every rank checks the same flags and the same (shared) files, and N
  identical lines help nobody. Every rank also leaves its line in torch elastic's error file, where
  `mpnet-dist launch` finds a rank whose error differs from rank 0's and prints it.
- `Parser` is argparse with one-line usage errors (with a did-you-mean) and each default shown once.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import sys
import time
from collections.abc import Callable

from mpnet_dist.errors import UserError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a program stopped by Ctrl-C
DEBUG_FLAG = "--debug"


class UsageError(UserError):
    """A command line argparse cannot parse."""


def run_command(prog: str, main: Callable[[list[str]], int | None], argv: list[str]) -> int:
    """main(argv) -> its exit code; a UserError -> one line on stderr and 2; Ctrl-C -> one line and 130."""
    debug = DEBUG_FLAG in argv
    try:
        return main(argv) or 0
    except UserError as err:
        if debug:
            raise
        report_error(prog, str(err))
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        if debug:
            raise
        report_error(prog, "interrupted (Ctrl-C); stopped at once, nothing more was written", label="stopped")
        return EXIT_INTERRUPTED


def is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


def report_error(prog: str, message: str, label: str = "error") -> str:
    """Print `PROG: LABEL: MESSAGE` as one line on stderr (rank 0 only) and leave it in the elastic error file."""
    line = f"{prog}: {label}: {one_line(message)}"
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:  # torch elastic reads {"message": str, "timestamp": int} back as this rank's failure
        try:
            with open(error_file, "w") as fh:
                json.dump({"message": line, "timestamp": int(time.time())}, fh)
        except OSError:
            pass  # the line on stderr (rank 0) is what matters
    if is_rank_zero():
        print(line, file=sys.stderr, flush=True)
    return line


def one_line(message: str) -> str:
    """Library messages arrive with newlines and indentation; an error is one line.

    A UserError raised in a DataLoader worker reaches the main process re-raised by torch with the worker's
    traceback in its text ("Caught DataError in DataLoader worker process 0. Original Traceback ..."): only
    the original message, the traceback's last line, is kept."""
    if "Original Traceback (most recent call last):" in message:
        last = message.strip().splitlines()[-1]
        message = re.sub(r"^[\w.]+: ", "", last)
    return re.sub(r"\s*\n\s*", " ", message.strip())


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each flag's default appears once: taken from the parser unless the help text already states one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or not action.option_strings or default in (None, False, argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse, except that a bad command line raises UsageError (one line, exit 2) instead of printing the
    whole usage (train's runs to dozens of lines)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message}{self._suggestion(message)}; see {self.prog} --help")

    def _suggestion(self, message: str) -> str:
        unknown = re.match(r"unrecognized arguments: (\S+)", message)
        if not unknown or not unknown.group(1).startswith("-"):
            return ""
        known = [s for action in self._actions for s in action.option_strings if s.startswith("--")]
        close = difflib.get_close_matches(unknown.group(1).split("=")[0], known, n=1)
        return f" (did you mean {close[0]}?)" if close else ""
