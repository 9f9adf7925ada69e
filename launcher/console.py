"""The launcher's own voice: one-line messages on stderr, `[mlaunch] ...`, apart from the ranks'
output that the runners stream to stdout."""

from __future__ import annotations

import sys

PREFIX = "[mlaunch]"


def say(msg: str) -> None:
    """One line from the launcher itself (not from a rank), flushed at once."""
    print(f"{PREFIX} {msg}", file=sys.stderr, flush=True)
