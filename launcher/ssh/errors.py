"""The error shapes every module of the SSH seam shares: `RemoteTimeout`, and the one-line
text (`one_line`, `short`) that paramiko's and the remote side's messages are squeezed into
before they are put in a `MlaunchError` that names the node."""

from __future__ import annotations

from job.errors import MlaunchError


class RemoteTimeout(MlaunchError):
    """A remote command or wait outlived its deadline (the channel has been closed)."""


def one_line(exc: BaseException | str) -> str:
    """`exc`'s text on one line (its type's name when it has none)."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def short(cmd: str, n: int = 80) -> str:
    """A command line cut to `n` characters, for messages."""
    cmd = one_line(cmd)
    return cmd if len(cmd) <= n else cmd[: n - 3] + "..."
