"""User-facing errors.

A `MlaunchError` is a mistake the user can fix (bad YAML, unreachable node, ...): the CLI prints
its message as one line and exits with `exit_code`, with no traceback unless MLAUNCH_DEBUG=1.
Programmer errors stay `assert`s and keep their tracebacks.
"""

from __future__ import annotations


class MlaunchError(Exception):
    """An error whose message is one line that says what went wrong, where, and how to fix it."""

    exit_code: int = 1

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ConfigError(MlaunchError):
    """The job YAML (or a --set override) is wrong: usage errors exit with 2, like argparse."""

    exit_code = 2
