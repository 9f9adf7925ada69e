"""`mlaunch status / logs / stop / attach / plot`: runs looked at from any terminal, from the run
registry (launcher/registry.py) and the logs the supervisor writes. Torch-free and quick.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Iterator

from job.errors import MlaunchError
from job.markers import EVENT, is_marker
from launcher.progress import clock
from launcher.registry import Entry, all_entries, find

FOLLOW_POLL_S = 0.25
#: What `attach` shows of the lines written before it attached.
BACKLOG_LINES = 20
#: After `stop`: how long the supervisor gets to stop every node, beyond the run's grace period.
STOP_WAIT_S = 60.0


# ---------------------------------------------------------------------------------- status
def _slurm_states(entries: list[Entry]) -> dict[str, str]:
    """The job's own state, for Slurm runs whose supervisor cannot say (dead, or detached and
    quiet): one `squeue` for all of them, jobs on this machine's controller only."""
    ids = [e.slurm["job_id"] for e in entries if e.backend == "slurm" and e.slurm.get("job_id")
           and e.slurm.get("host", "here") == "here" and (e.live or e.state == "lost")]
    if not ids:
        return {}
    import subprocess

    try:
        res = subprocess.run(["squeue", "-h", "-j", ",".join(ids), "-o", "%i %T"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    states = dict(line.split(None, 1) for line in res.stdout.splitlines() if " " in line)
    # squeue forgets ended jobs after MinJobAge: not listed means over.
    return {i: states.get(i, "ENDED").strip() for i in ids}


def _eta(entry: Entry) -> str:
    eta_at = entry.progress.get("eta_at")
    if not entry.live or eta_at is None:
        return "-"
    return clock(max(0.0, eta_at - time.time()))


def _state(entry: Entry, slurm: dict[str, str]) -> str:
    job = slurm.get(entry.slurm.get("job_id", ""))
    if entry.state == "lost":
        return "lost (supervisor died)" + (f", slurm {job}" if job else "")
    return entry.state + (f" (slurm {job})" if job and entry.live else "")


def _fmt(value: object, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def status_rows(entries: list[Entry]) -> list[dict[str, str]]:
    slurm = _slurm_states(entries)
    rows = []
    for e in entries:
        p = e.progress
        total = p.get("total_steps")
        rows.append({
            "id": e.run_id, "name": e.name, "backend": e.backend, "nodes": str(len(e.nodes) or "-"),
            "state": _state(e, slurm), "step": f"{p.get('step', 0)}/{total}" if total else str(p.get("step") or "-"),
            "loss": _fmt(p.get("loss"), ".4f"), "eta": _eta(e),
            "started": datetime.fromtimestamp(e.started).strftime("%m-%d %H:%M"), "output": e.output_dir,
        })
    return rows


def _table(rows: list[dict[str, str]]) -> str:
    heads = {"id": "RUN", "name": "NAME", "backend": "BACKEND", "nodes": "NODES", "state": "STATE", "step": "STEP",
             "loss": "LOSS", "eta": "ETA", "started": "STARTED", "output": "OUTPUT DIR"}
    widths = {k: max(len(h), *(len(r[k]) for r in rows)) for k, h in heads.items()}
    line = lambda r: "  ".join(r[k].ljust(widths[k]) for k in heads).rstrip()  # noqa: E731
    return "\n".join([line(heads), *(line(r) for r in rows)])


def status(run: str | None, as_json: bool) -> int:
    if run is None:
        entries = [e.observed() for e in all_entries()]
        if as_json:
            print(json.dumps([{**e.__dict__, "state": e.state} for e in entries], indent=1))
        elif not entries:
            print("no runs yet (`mlaunch run CONFIG [--detach]` starts one)")
        else:
            print(_table(status_rows(entries)))
        return 0
    entry = find(run).observed()
    slurm = _slurm_states([entry])
    if as_json:
        print(json.dumps({**entry.__dict__, "slurm_state": slurm.get(entry.slurm.get("job_id", ""))}, indent=1))
        return 0
    row = status_rows([entry])[0]
    print(f"run      {entry.run_id} ({entry.name}, {entry.backend}{', detached' if entry.detached else ''})")
    print(f"state    {row['state']}" + (f", exit code {entry.exit_code}" if entry.exit_code is not None else ""))
    if entry.cause and entry.state != "done":
        print(f"cause    {entry.cause}")
    print(f"progress step {row['step']} · loss {row['loss']} · eval {_fmt(entry.progress.get('eval_loss'), '.4f')}"
          f" · ETA {row['eta']}")
    ended = entry.ended or time.time()
    print(f"started  {datetime.fromtimestamp(entry.started):%Y-%m-%d %H:%M:%S} · wall {clock(ended - entry.started)}")
    if entry.slurm.get("job_id"):
        print(f"slurm    job {entry.slurm['job_id']}" + (f", {slurm[entry.slurm['job_id']]}" if slurm else ""))
    print(f"output   {entry.output_dir}")
    print("nodes")
    for name in entry.nodes or ["-"]:
        st = entry.node_states.get(name, {})
        detail = st.get("why") or (f"exit code {st['exit_code']}" if st.get("exit_code") is not None else "")
        state = st.get("state", "?" if entry.live else "-")
        if entry.state == "lost" and state == "running":
            state = "unknown (supervisor died)"
        print(f"  {name:<24} {state}{f' ({detail})' if detail else ''}   log {entry.logs / (name + '.log')}")
    for line in entry.summary:
        print(f"  {line}")
    return 0


# ---------------------------------------------------------------------------------- logs
def _log_files(entry: Entry, node: str | None) -> dict[str, Path]:
    names = entry.nodes or sorted(p.stem for p in entry.logs.glob("*.log") if p.stem not in ("supervisor",))
    if node is not None:
        if node not in names:
            raise MlaunchError(f"run {entry.run_id} has no node {node!r}; its nodes: {', '.join(names) or '-'}",
                               exit_code=2)
        names = [node]
    return {n: entry.logs / f"{n}.log" for n in names}


class _Tail:
    """New complete lines of one file, from where the last call stopped."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.rest = path, 0, b""

    def lines(self) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return []
        self.offset += len(data)
        data = self.rest + data
        *done, self.rest = data.split(b"\n")
        return [d.decode(errors="replace").rstrip("\r") for d in done]


def _follow(entry: Entry, files: dict[str, Path], follow: bool) -> Iterator[tuple[str | None, str]]:
    """(node, line) for every line so far, then, with `follow`, as they come, until the run is over.
    `(None, "")` once, when the lines so far have all been given."""
    tails = {n: _Tail(p) for n, p in files.items()}
    caught_up = False
    while True:
        got = False
        for name, tail in tails.items():
            for line in tail.lines():
                got = True
                yield name, line
        if not got and not caught_up:
            caught_up = True
            yield None, ""
        if not follow:
            return
        if not got:
            if not entry.observed().live:
                # One more pass: the last lines written before the state changed.
                for name, tail in tails.items():
                    for line in tail.lines():
                        yield name, line
                return
            time.sleep(FOLLOW_POLL_S)
            entry = Entry.load(entry.path)


def logs(run: str, node: str | None, follow: bool) -> int:
    entry = find(run)
    files = _log_files(entry, node)
    width = max(len(n) for n in files)
    try:
        for name, line in _follow(entry, files, follow):
            if name is not None and not is_marker(line):
                print(f"{name:<{width}} | {line}", flush=follow)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `mlaunch logs RUN | head`
        os._exit(0)
    return 0


# ---------------------------------------------------------------------------------- attach
def attach(run: str) -> int:
    """The live view of a running run, from its logs: Ctrl-C leaves it, the run goes on."""
    from job.events import parse_event
    from launcher.live import View
    from launcher.progress import Progress

    entry = find(run).observed()
    files = _log_files(entry, None)
    width = max(len(n) for n in files)
    view = View(Progress(started_at=entry.started))
    backlog: list[str] = []
    try:
        with view:
            first = True
            for name, line in _follow(entry, files, follow=True):
                if name is None:  # caught up: of the story so far, its last lines
                    first = False
                    for text in backlog[-BACKLOG_LINES:]:
                        view.line(text)
                    backlog.clear()
                elif line.startswith(EVENT):
                    event = parse_event(line)
                    if event is not None:
                        view.event(event)
                elif not is_marker(line):
                    text = f"{name:<{width}} | {line}"
                    if first:
                        backlog.append(text)
                    else:
                        view.line(text)
    except KeyboardInterrupt:
        print(f"[mlaunch] detached from run {entry.run_id}; it goes on (`mlaunch stop {entry.run_id}` stops it)",
              file=sys.stderr)
        return 0
    entry = Entry.load(entry.path).observed()
    for line in entry.summary:
        print(f"[mlaunch] {line}", file=sys.stderr)
    print(f"[mlaunch] run {entry.run_id} {entry.state}" + (f": {entry.cause}" if entry.cause and entry.state != "done" else ""),
          file=sys.stderr)
    return 1 if entry.state == "lost" else entry.exit_code or 0


# ---------------------------------------------------------------------------------- stop
def stop(run: str) -> int:
    entry = find(run).observed()
    if entry.state == "lost":
        return _stop_orphaned(entry)
    if not entry.live:
        print(f"run {entry.run_id} is already {entry.state}")
        return 0
    if entry.supervisor_alive():
        os.kill(entry.supervisor["pid"], signal.SIGTERM)  # the supervisor stops every node, in order
        print(f"[mlaunch] stopping run {entry.run_id} (its supervisor, pid {entry.supervisor['pid']}, stops every node)",
              file=sys.stderr, flush=True)
        deadline = time.monotonic() + STOP_WAIT_S
        while time.monotonic() < deadline:
            entry = Entry.load(entry.path).observed()
            if not entry.live:
                break
            time.sleep(0.2)
        else:
            raise MlaunchError(f"run {entry.run_id} is still {entry.state} {STOP_WAIT_S:g}s after its supervisor was "
                               f"asked to stop; see {entry.logs / 'supervisor.log'}")
        print(f"[mlaunch] run {entry.run_id} {entry.state}" + (f": {entry.cause}" if entry.cause else ""), file=sys.stderr)
        return 0
    raise MlaunchError(f"run {entry.run_id} is supervised from {entry.supervisor.get('host')}: stop it there", exit_code=1)


def _stop_orphaned(entry: Entry) -> int:
    """A run whose supervisor died: what may still run without it is ended here."""
    if entry.backend == "slurm" and entry.slurm.get("job_id"):
        import subprocess

        job = entry.slurm["job_id"]
        res = subprocess.run(["scancel", job], capture_output=True, text=True, timeout=30)
        if res.returncode != 0:
            raise MlaunchError(f"scancel {job} failed: {res.stderr.strip() or res.returncode}; cancel it by hand")
        print(f"[mlaunch] run {entry.run_id}: its supervisor had died; cancelled Slurm job {job}", file=sys.stderr)
    elif entry.backend == "local":
        from launcher import procs

        run_id = (entry.attempts or [entry.run_id])[-1]
        left = procs.end_run(run_id, 5.0)
        print(f"[mlaunch] run {entry.run_id}: its supervisor had died; ended {len(left.get('found', []))} process(es) "
              f"of the run", file=sys.stderr)
    else:  # SSH: the nodes' jobs ran in ptys of the supervisor's connections, and ended with them
        print(f"[mlaunch] run {entry.run_id}: its supervisor had died; its nodes' jobs ended when its SSH "
              f"connections closed (they run in ptys of those connections)", file=sys.stderr)
    entry.state = "stopped"
    entry.cause = (entry.cause or "") + "; stopped by `mlaunch stop`"
    entry.save()
    return 0


# ---------------------------------------------------------------------------------- plot
def plot(target: str, out: Path | None) -> int:
    from launcher.plot import load_records, plot_loss

    folder = Path(target).expanduser()
    if not folder.is_dir():
        folder = Path(find(target).output_dir)
    records = load_records(folder)
    if not any("loss" in r or "eval_loss" in r for r in records):
        raise MlaunchError(f"no logged step in {folder} (neither metrics.jsonl nor events in logs/) yet: nothing to "
                           f"plot; try again once the run has logged a step", exit_code=1)
    path = plot_loss(records, out or folder / "loss.png", title=folder.name)
    print(path)
    return 0
