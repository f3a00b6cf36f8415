"""The root of every error a user can fix: a flag, a recipe, a file, a checkpoint, a tokenizer.

Each part of the package raises its own subclass (ConfigError, DataError, CheckpointError, ExportError) with a
message that names the flag or file and the fix; `command.run_command` turns any of them into one line on
stderr and exit code 2. Every other exception is a bug in mpnet-dist and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; the message names the culprit (flag or file) and the fix."""


class ConfigError(UserError, ValueError):
    """A bad flag or recipe value; the message names the flag to fix. Defined here rather than in config.py so
    that modules config.py depends on (distributed.py through the checkpoint package) can raise it too."""
