"""Finding and ending exactly one run's processes on a machine — this one, or a node.

torchrun starts its workers in new sessions, so neither torchrun's process group nor its
session reaches them, and a crashed torchrun leaves them orphaned. Every process of a run
inherits `MLAUNCH_RUN_ID=<id>` from the job's environment: that, read from /proc, is the handle
cleanup uses. Never a match on process names — that is how launchers kill other users' jobs.

This module is the one implementation of that rule. It imports nothing but the standard
library, so the SSH layer runs this very file on a node (`python3 -c <source> RUN_ID MODE ...`)
and the standalone runner calls it in-process.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

#: Name of the variable that marks every process of one run (torchrun's workers inherit it).
RUN_ID_VAR = "MLAUNCH_RUN_ID"


def run_processes(run_id: str) -> list[int]:
    """PIDs of live processes whose environment carries this run's id (ours excluded). A zombie's
    environ reads empty, so a process that has died counts as gone before it is reaped."""
    needle = f"{RUN_ID_VAR}={run_id}".encode()
    me = os.getpid()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:  # gone meanwhile, or another user's process
            continue
        if needle in env:
            found.append(int(name))
    return sorted(found)


def _send(pids: list[int], sig: int) -> None:
    for p in pids:
        try:
            os.kill(p, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _wait_gone(run_id: str, pids: list[int], seconds: float) -> list[int]:
    alive = set(pids)
    end = time.monotonic() + seconds
    while alive and time.monotonic() < end:
        time.sleep(0.05)
        alive &= set(run_processes(run_id))
    return sorted(alive)


def end_run(run_id: str, grace_s: float, recorded: list[int] = ()) -> dict[str, list[int]]:
    """End every process of the run: SIGTERM to the recorded torchrun pids first (torchrun then
    stops its workers; a SIGKILL first would orphan them) and up to `grace_s` for the run to go,
    then SIGTERM to whatever still carries the id, then SIGKILL. Returns what was found and done."""
    found = run_processes(run_id)
    # Only a recorded pid that still carries the run id is signalled: a recycled pid is never hit.
    first = [p for p in recorded if p in found]
    _send(first, signal.SIGTERM)
    if first:
        _wait_gone(run_id, found, grace_s)
    rest = run_processes(run_id)
    _send(rest, signal.SIGTERM)
    stubborn = _wait_gone(run_id, rest, min(grace_s, 3.0)) if rest else []
    _send(stubborn, signal.SIGKILL)
    remaining = _wait_gone(run_id, stubborn, 3.0) if stubborn else []
    return {"found": found, "sigterm": sorted(set(first) | set(rest)), "sigkill": stubborn, "remaining": remaining}


def main(argv: list[str]) -> None:
    """`RUN_ID list` or `RUN_ID kill GRACE [PID ...]`: one JSON line on stdout (for the SSH layer)."""
    run_id, mode = argv[0], argv[1]
    if mode == "list":
        print(json.dumps({"pids": run_processes(run_id)}))
    else:
        print(json.dumps(end_run(run_id, float(argv[2]), [int(p) for p in argv[3:]])))


if __name__ == "__main__":
    main(sys.argv[1:])
