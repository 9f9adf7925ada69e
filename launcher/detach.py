"""`mlaunch run --detach`: the run's supervisor as a process of its own, in its own session, so the
run outlives the terminal, the shell and the login that started it.

The launching process checks the config (every mistake is still one line, before anything
starts), registers the run, starts `python -m launcher.detach RUN_ID` — stdin closed, output to
`<output_dir>/logs/supervisor.log` — and waits until the supervisor says every node has started
(or the Slurm job is submitted), or the run has failed before that. Everything a supervisor
promises holds as in an attached run: it is the same code (launcher/launch.py); only its lines go
to the log instead of a terminal.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from job.errors import MlaunchError
from launcher.console import say
from launcher.registry import Entry, find

#: How long the launching process waits for a supervisor that has not even claimed its entry.
CLAIM_TIMEOUT_S = 60.0
POLL_S = 0.2


def supervisor_log(entry: Entry) -> Path:
    return entry.logs / "supervisor.log"


def detach(config: Path, overrides: list[str], *, standalone: bool, entrypoint: list[str] | None = None) -> int:
    from job.config import load_config
    from launcher.launch import register

    cfg = load_config(config, overrides, entrypoint=entrypoint)
    request = {"config": str(Path(config).resolve()), "set": list(overrides), "standalone": standalone,
               "entrypoint": entrypoint, "cwd": os.getcwd()}
    entry = register(cfg, standalone=standalone, detached=True, request=request)
    log = supervisor_log(entry)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        # MLAUNCH_PLAIN: its output is a file, whatever the environment says.
        proc = subprocess.Popen([sys.executable, "-m", "launcher.detach", entry.run_id], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "MLAUNCH_PLAIN": "1"})
    try:
        entry = _wait_started(entry, proc)
    except KeyboardInterrupt:
        # Not yet detached: Ctrl-C means "do not run it", and the supervisor stops what it started.
        say(f"interrupted before run {entry.run_id} had started: stopping it")
        proc.terminate()
        proc.wait()
        return 130
    if not entry.live:
        cause = entry.cause or f"see {log}"
        say(f"run {entry.run_id} {entry.state} before it started: {cause}")
        _show_tail(log)
        return entry.exit_code or 1
    where = (f"Slurm job {entry.slurm.get('job_id')} {str(entry.slurm.get('state') or 'submitted').lower()}"
             if entry.backend == "slurm" else f"started on {len(entry.nodes)} node(s)")
    say(f"run {entry.run_id} detached: {where}; supervisor pid {proc.pid}, its log {log}")
    print(f"  follow:  mlaunch attach {entry.run_id}    (or: mlaunch logs {entry.run_id} -f)\n"
          f"  status:  mlaunch status {entry.run_id}\n"
          f"  stop:    mlaunch stop {entry.run_id}", flush=True)
    return 0


def _wait_started(entry: Entry, proc: subprocess.Popen) -> Entry:
    """Until the supervisor records `running` / `pending` (or an end), or dies without a word."""
    t0 = time.monotonic()
    while True:
        try:
            entry = Entry.load(entry.path)
        except (OSError, ValueError):
            pass  # being replaced this instant
        if entry.state != "starting" or not entry.live:
            return entry
        code = proc.poll()
        if code is not None:
            entry = Entry.load(entry.path)
            if entry.live:  # it died before it could record why
                entry.state, entry.exit_code, entry.ended = "failed", code or 1, time.time()
                entry.cause = entry.cause or f"its supervisor exited with code {code} before the nodes started"
                entry.save()
            return entry
        if not entry.supervisor and time.monotonic() - t0 > CLAIM_TIMEOUT_S:
            proc.kill()
            raise MlaunchError(f"the supervisor of run {entry.run_id} did not start within {CLAIM_TIMEOUT_S:g}s; "
                               f"see {supervisor_log(entry)}")
        time.sleep(POLL_S)


def _show_tail(log: Path, lines: int = 15) -> None:
    try:
        tail = log.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return
    if tail:
        print("\n".join(f"    {line}" for line in tail), file=sys.stderr)


def main(run_id: str) -> int:
    """The detached supervisor: the run as `mlaunch run` would do it, with this entry."""
    from job.config import load_config
    from launcher.launch import launch

    entry = find(run_id)
    os.chdir(entry.request.get("cwd") or ".")
    req = entry.request
    try:
        cfg = load_config(Path(req["config"]), req.get("set") or [], entrypoint=req.get("entrypoint"))
        return launch(cfg, standalone=bool(req.get("standalone")), entry=entry)
    except MlaunchError as e:
        print(f"mlaunch: error: {e}", file=sys.stderr, flush=True)
        entry = Entry.load(entry.path)
        if entry.live:
            entry.state, entry.exit_code, entry.cause, entry.ended = "failed", e.exit_code, str(e), time.time()
            entry.save()
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
