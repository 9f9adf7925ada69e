"""Finding and ending exactly one run's processes on this machine.

torchrun starts its workers in new sessions, so neither torchrun's process group nor its
session reaches them, and a crashed torchrun leaves them orphaned. Every process of a run
inherits `MLAUNCH_RUN_ID=<id>` from the job's environment: that, read from /proc, is the handle
cleanup uses. Never a match on process names — that is how launchers kill other users' jobs.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from launcher.plan import RUN_ID_ENV


def run_processes(run_id: str) -> list[int]:
    """PIDs of live processes whose environment carries this run's id (ours excluded)."""
    needle = f"{RUN_ID_ENV}={run_id}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:  # gone, or not ours to read
            continue
        if state != "Z" and needle in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def end_run(run_id: str, grace_s: float) -> list[int]:
    """SIGTERM every process of the run, SIGKILL what is left after `grace_s`. Returns the pids hit."""
    pids = run_processes(run_id)
    if not pids:
        return []
    signal_all(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not run_processes(run_id):
            return pids
        time.sleep(0.1)
    signal_all(run_processes(run_id), signal.SIGKILL)
    return pids
