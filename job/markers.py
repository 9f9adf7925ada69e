"""Marker lines: what a rank prints for the launcher to read, each a fixed prefix at the start
of a line of its own.

The launcher learns how a run goes from these lines, torchrun's error files and exit codes,
never from the wording of the ranks' log sentences (free to change). Torch-free, so the launcher
and the ranks share it; the node shell's `MLAUNCH_PID=` line is launcher/shell.py's.
"""

from __future__ import annotations

#: `MLAUNCH_STARTED=<world size>`: rank 0, once the process group is up. Every node has then
#: joined the rendezvous; before it, a silent run is still waiting for one.
STARTED = "MLAUNCH_STARTED="

#: Every marker, for the runners to keep them in the logs and off the terminal.
ALL = (STARTED,)


def is_marker(line: str) -> bool:
    return line.startswith(ALL)
