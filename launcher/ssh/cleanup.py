"""Run bookkeeping on a node: find and end exactly the processes whose environment carries
`MLAUNCH_RUN_ID=<run id>` (`list_run_processes`, `kill_run`, `KillReport`). torchrun starts its
workers in new sessions, so neither its process group nor a name match reaches them.

The process bookkeeping runs a short `python3` snippet on the node (`python=` to override).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from job.errors import MlaunchError
from launcher import procs
from launcher.shell import python_command
from launcher.ssh.connection import Connection
from launcher.ssh.errors import one_line

_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*(@[A-Za-z0-9_.:-]+)?\Z")  # RUN_ID[@NODE] (procs.scoped)


def _check_run_id(run_id: str) -> None:
    assert _RUN_ID.match(run_id), f"run id {run_id!r} must match {_RUN_ID.pattern}"


# The run's processes are found and ended on the node by launcher/procs.py itself, sent as the
# source of `python3 -c` (it imports only the standard library): one implementation of the
# cleanup rule for this machine and for every node. argv: run_id, mode, grace, recorded pids.
_PROC_SNIPPET = Path(procs.__file__).read_text()


@dataclass
class KillReport:
    """What `kill_run` did on one node (pids)."""

    found: list[int]
    sigterm: list[int]
    sigkill: list[int]
    remaining: list[int]

    @property
    def killed(self) -> list[int]:
        """Every process of the run that is gone now."""
        return sorted((set(self.found) | set(self.sigterm)) - set(self.remaining))


def _run_snippet(conn: Connection, args: list[str], timeout: float, python: str) -> dict:
    cmd = python_command(python, _PROC_SNIPPET, *args)
    res = conn.run(cmd, timeout=timeout)
    if not res.ok:
        tail = one_line(res.stderr.strip().splitlines()[-1]) if res.stderr.strip() else ""
        raise MlaunchError(
            f"node {conn.label}: process cleanup needs {python} on the node and it failed "
            f"(exit {res.exit_code}{': ' + tail if tail else ''})"
        )
    return json.loads(res.stdout.strip().splitlines()[-1])


def list_run_processes(conn: Connection, run_id: str, python: str = "python3") -> list[int]:
    """Pids of the processes on this node whose environment has MLAUNCH_RUN_ID=<run_id>."""
    _check_run_id(run_id)
    return _run_snippet(conn, [run_id, "list", "0"], timeout=30.0, python=python)["pids"]


def signal_workers(conn: Connection, run_id: str, signum: int, python: str = "python3") -> list[int]:
    """Send `signum` to the run's rank processes on this node (see procs.run_workers); their pids."""
    _check_run_id(run_id)
    return _run_snippet(conn, [run_id, "signal-workers", str(int(signum))], timeout=30.0, python=python)["pids"]


def kill_run(
    conn: Connection,
    run_id: str,
    pids: Iterable[int] = (),
    grace_s: float = 10.0,
    python: str = "python3",
) -> KillReport:
    """End exactly the processes of run `run_id` on this node.

    SIGTERM to the recorded torchrun pid(s) first (torchrun then stops its workers), up to
    `grace_s` for everything carrying the run id to exit, then SIGTERM to whatever is left,
    then SIGKILL. Never SIGKILL torchrun first: that orphans its workers. Processes of other
    runs or without the id are never touched.
    """
    _check_run_id(run_id)
    args = [run_id, "kill", repr(float(grace_s)), *(str(int(p)) for p in pids)]
    timeout = grace_s + min(grace_s, 3.0) + 3.0 + 30.0
    data = _run_snippet(conn, args, timeout=timeout, python=python)
    return KillReport(data["found"], data["sigterm"], data["sigkill"], data["remaining"])
