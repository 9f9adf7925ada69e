"""The launcher's own voice: one-line messages on stderr, `[mlaunch] ...`, apart from the ranks'
output that the runners stream to stdout."""

from __future__ import annotations

import sys

from launcher.live import LOCK

PREFIX = "[mlaunch]"


def say(msg: str) -> None:
    """One line from the launcher itself (not from a rank), flushed at once. Under the same lock
    as the nodes' lines, so a line is never cut by another (and the live view stays below)."""
    with LOCK:
        print(f"{PREFIX} {msg}", file=sys.stderr, flush=True)
