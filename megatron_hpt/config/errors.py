"""The errors a command reports as a message alone, without a traceback.

``ReportedError`` is the root: its message is complete (it names the key, value,
file or directory at fault and what to do), so the command line prints only the
message and exits with ``exit_code``. ``InputError`` and its kinds are the user's
input (a config value, a path, a run directory): exit code 2, like a usage error.
Anything else that escapes a command is a bug and keeps its traceback.
"""

from __future__ import annotations


class ReportedError(Exception):
    """An error whose message says everything; the command line prints it and exits ``exit_code``."""

    exit_code = 1


class InputError(ReportedError):
    """Bad input: a config key or value, a path, a run directory (exit code 2)."""

    exit_code = 2


class ConfigError(InputError, ValueError):
    """A config value or key is wrong; the message names the dotted key and the value."""


class InputNotFoundError(InputError, FileNotFoundError):
    """A file or directory the input names does not exist; the message says what was expected there."""
