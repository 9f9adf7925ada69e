"""The run registry: one JSON file per run under `$MLAUNCH_HOME/runs/` (default `~/.mlaunch/runs/`),
written by the run's supervisor, read by `mlaunch status / logs / stop / attach / plot`.

Every run is registered, attached or detached (`sky status` lists both too). The supervisor owns
its entry and rewrites it atomically (job/files.py) on every change of state and, at most every
`PROGRESS_EVERY_S`, with rank 0's progress; readers never write it, except to say that a
supervisor died (`state: lost`). A reader trusts `state` only while the recorded supervisor is
alive: its pid *and* process start time are kept, so a reused pid is never taken for it.

Torch-free and quick: `mlaunch status` reads 100 entries in well under half a second.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from job.errors import MlaunchError
from job.files import publish_file

#: States a run can be in. `starting` → (`pending` on Slurm) → `running` → one of FINAL.
FINAL = ("done", "failed", "stopped", "hung", "lost")
PROGRESS_EVERY_S = 2.0


def home() -> Path:
    return Path(os.environ.get("MLAUNCH_HOME") or "~/.mlaunch").expanduser()


def runs_dir() -> Path:
    return home() / "runs"


def process_start(pid: int) -> float | None:
    """The start time of `pid` (seconds since boot, from /proc: no psutil import), None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    fields = stat[stat.rindex(b")") + 2:].split()
    if fields[0] == b"Z":  # a zombie has finished; its parent has not reaped it yet
        return None
    return float(fields[19])  # field 22, starttime in clock ticks


@dataclass
class Entry:
    """One run as the registry keeps it."""

    run_id: str
    name: str
    backend: str
    output_dir: str
    config: str
    nodes: list[str] = field(default_factory=list)
    state: str = "starting"
    started: float = field(default_factory=time.time)
    ended: float | None = None
    exit_code: int | None = None
    cause: str | None = None
    detached: bool = False
    #: The supervisor: pid, its /proc start time, the host it runs on.
    supervisor: dict[str, Any] = field(default_factory=dict)
    #: Per node: state and exit code as the supervisor saw them.
    node_states: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Rank 0's latest progress (launcher/progress.py's snapshot).
    progress: dict[str, Any] = field(default_factory=dict)
    #: Slurm: the job id, and where Slurm's commands run ("here" or the login node).
    slurm: dict[str, Any] = field(default_factory=dict)
    #: How the run was asked for, so a detached supervisor can start it: config path, --set, --standalone.
    request: dict[str, Any] = field(default_factory=dict)
    #: The run ids of job_restarts' later attempts (each attempt is a torchrun run of its own).
    attempts: list[str] = field(default_factory=list)
    #: The end-of-run summary, as it was said (launcher/summary.py).
    summary: list[str] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return runs_dir() / f"{self.run_id}.json"

    @property
    def logs(self) -> Path:
        return Path(self.output_dir) / "logs"

    def save(self) -> None:
        publish_file(self.path, json.dumps(self.__dict__, indent=1))

    @classmethod
    def load(cls, path: Path) -> "Entry":
        data = json.loads(path.read_text())
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    # ------------------------------------------------------------------ the supervisor's side
    def claim(self) -> None:
        """This process is the run's supervisor from now on."""
        self.supervisor = {"pid": os.getpid(), "start": process_start(os.getpid()), "host": os.uname().nodename}
        self.save()

    # ------------------------------------------------------------------ readers' side
    def supervisor_alive(self) -> bool:
        pid, start = self.supervisor.get("pid"), self.supervisor.get("start")
        if not pid or self.supervisor.get("host", os.uname().nodename) != os.uname().nodename:
            return bool(pid)  # another machine's supervisor: we cannot tell; trust the entry
        return process_start(pid) == start

    def observed(self) -> "Entry":
        """The entry as it really stands: a run not final whose supervisor is gone is `lost`
        (and recorded so, once). Slurm runs then show the job's own state (`slurm.state`)."""
        if self.state in FINAL or self.supervisor_alive():
            return self
        if not self.supervisor:  # registered, its supervisor not yet up: a second at most
            if time.time() - self.started < 30:
                return self
        self.state, self.ended = "lost", self.ended or time.time()
        self.cause = self.cause or "its supervisor died (killed, or its machine rebooted)"
        try:
            self.save()
        except OSError:
            pass
        return self

    @property
    def live(self) -> bool:
        return self.state not in FINAL


def all_entries() -> list[Entry]:
    """Every registered run, newest first; unreadable files skipped."""
    folder = runs_dir()
    if not folder.is_dir():
        return []
    entries = []
    for path in folder.glob("*.json"):
        try:
            entries.append(Entry.load(path))
        except (OSError, ValueError, TypeError):
            continue  # a file being replaced this instant, or not ours
    entries.sort(key=lambda e: e.started, reverse=True)
    return entries


def find(prefix: str) -> Entry:
    """The run whose id is `prefix` or starts with it (unique); also accepts a run's output dir."""
    exact = runs_dir() / f"{prefix}.json"
    if exact.is_file():
        return Entry.load(exact)
    entries = all_entries()
    matches = [e for e in entries if e.run_id.startswith(prefix)]
    if not matches:
        as_dir = Path(prefix).expanduser().resolve()
        matches = [e for e in entries if Path(e.output_dir) == as_dir][:1]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise MlaunchError(f"no run {prefix!r} in {runs_dir()}; `mlaunch status` lists the runs", exit_code=2)
    ids = ", ".join(e.run_id for e in matches[:5]) + (", …" if len(matches) > 5 else "")
    raise MlaunchError(f"run id prefix {prefix!r} is ambiguous ({len(matches)} runs: {ids}); give more of it", exit_code=2)
