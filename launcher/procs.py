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
#: And the node it was started for: where several "nodes" share a machine (tests, or two sshd on
#: one host), stopping one node's job must not wait on, or end, the other's. A run id written
#: `RUN_ID@NODE` selects that node's processes only (run ids never contain `@`).
NODE_VAR = "MLAUNCH_NODE"


def scoped(run_id: str, node: str) -> str:
    """`RUN_ID@NODE` when the node's name can travel as one argument, else the run id alone."""
    ok = node and all(c.isalnum() or c in "_.:-" for c in node)
    return f"{run_id}@{node}" if ok else run_id


def run_processes(run_id: str) -> list[int]:
    """PIDs of live processes whose environment carries this run's id (ours excluded). A zombie's
    environ reads empty, so a process that has died counts as gone before it is reaped."""
    run_id, _, node = run_id.partition("@")
    needle = f"{RUN_ID_VAR}={run_id}".encode()
    node_needle = f"{NODE_VAR}={node}".encode() if node else None
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
        if needle in env and (node_needle is None or node_needle in env):
            found.append(int(name))
    return sorted(found)


def run_workers(run_id: str) -> list[int]:
    """The run's rank processes: those of its processes that torchrun gave a LOCAL_RANK (torchrun
    itself, the shell and helpers have none)."""
    workers = []
    for pid in run_processes(run_id):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if any(v.startswith(b"LOCAL_RANK=") for v in f.read().split(b"\0")):
                    workers.append(pid)
        except OSError:
            continue
    return workers


def signal_workers(run_id: str, sig: int) -> list[int]:
    """Send `sig` to every rank process of the run (e.g. SIGUSR1: dump your stacks); the pids."""
    pids = run_workers(run_id)
    _send(pids, sig)
    return pids


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
    """`RUN_ID list`, `RUN_ID signal-workers SIGNUM` or `RUN_ID kill GRACE [PID ...]`: one JSON
    line on stdout (for the SSH layer)."""
    run_id, mode = argv[0], argv[1]
    if mode == "list":
        print(json.dumps({"pids": run_processes(run_id)}))
    elif mode == "signal-workers":
        print(json.dumps({"pids": signal_workers(run_id, int(argv[2]))}))
    else:
        print(json.dumps(end_run(run_id, float(argv[2]), [int(p) for p in argv[3:]])))


if __name__ == "__main__":
    main(sys.argv[1:])
