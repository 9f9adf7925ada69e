"""Executing a plan on this machine (`mlaunch run --standalone`); launcher/cluster_run.py runs
it on every node over SSH.

The plan (launcher/planning.py) decides what runs; this module only makes it happen: it writes the
resolved config, starts the processes, streams their output, and guarantees teardown.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from job.config import JobConfig
from job.errors import MlaunchError
from job.markers import is_marker
from launcher.console import say
from launcher.planning import build_plan, write_resolved_config
from launcher.stopping import Stop

#: torchrun writes its root-cause failure here (see `_user_error`), next to local.log.
ERROR_FILE = "torchrun-error.json"


def run_standalone(cfg: JobConfig) -> int:
    """`torchrun --standalone` here: stream its output, tee it to <output_dir>/logs/local.log,
    and on Ctrl-C/SIGTERM stop every worker (torchrun first, then the run id as a backstop)."""
    from launcher import procs

    the_plan, _ = build_plan(cfg, standalone=True, probe=True)
    out = Path(cfg.train.output_dir)
    write_resolved_config(the_plan.resolved, Path(the_plan.config_path))
    (out / "logs").mkdir(parents=True, exist_ok=True)
    node = the_plan.nodes[0]
    say(f"run {the_plan.run_id}: torchrun --standalone, {node.nproc_per_node} process(es), "
        f"strategy {the_plan.parallel.get('strategy')}, outputs in {out}/")
    error_file = out / "logs" / ERROR_FILE
    error_file.unlink(missing_ok=True)  # an earlier run's failure is not this one's
    # torchrun (its main is `@record`ed) copies the first failed worker's error file to its own
    # TORCHELASTIC_ERROR_FILE; each worker gets a file of its own from torchrun, not this one.
    env = {**os.environ, **node.env, "TORCHELASTIC_ERROR_FILE": str(error_file)}
    grace = cfg.launch.grace_period_s
    with open(out / "logs" / "local.log", "ab") as log, Stop() as stop:
        try:
            # A new session: the terminal's Ctrl-C reaches only us, and we stop torchrun in order.
            proc = subprocess.Popen(node.argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as e:
            raise MlaunchError(f"cannot start torchrun ({node.python}): {e.strerror}; check the python interpreter") from None
        (out / "logs" / "run.json").write_text(json.dumps(
            {"run_id": the_plan.run_id, "nodes": {"local": {"host": "localhost", "pid": proc.pid, "sid": proc.pid}}}, indent=2))
        quiet = threading.Event()
        pump = threading.Thread(target=_pump, args=(proc.stdout, log, quiet), daemon=True)
        pump.start()
        while proc.poll() is None and not stop.event.is_set():
            stop.event.wait(0.2)
        if stop.signum is not None:
            say(f"stopping run {the_plan.run_id} (signal {stop.signum}); grace {grace:g}s")
            # torchrun answers SIGTERM with its own traceback: keep it in the log, off the terminal.
            quiet.set()
            _terminate(proc, grace)
        code = proc.wait()
        left = procs.end_run(the_plan.run_id, grace_s=grace)["sigterm"]
        if left:
            say(f"ended {len(left)} leftover process(es) of run {the_plan.run_id}")
        pump.join(timeout=5)
    if stop.signum is not None:
        say(f"stopped: no process of run {the_plan.run_id} is left; torchrun's shutdown output is in {out / 'logs' / 'local.log'}")
        return stop.exit_code
    if code != 0:
        # torchrun's failure report is long; say first what went wrong, in the rank's own words.
        cause = _user_error(error_file)
        say(f"run failed (torchrun exit code {code}){f': {cause}' if cause else ''}; full log: {out / 'logs' / 'local.log'}")
    return code


def _terminate(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM torchrun (it stops its workers), SIGKILL only after the grace period —
    a SIGKILL first would orphan the workers."""
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=grace + 5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _pump(stream: Any, log: Any, quiet: threading.Event) -> None:
    """torchrun's output, verbatim to the log and (but for marker lines) to our stdout."""
    for line in iter(stream.readline, b""):
        log.write(line)
        log.flush()
        if not quiet.is_set() and not is_marker(line.decode(errors="replace")):
            sys.stdout.buffer.write(line)
            sys.stdout.flush()


def _user_error(error_file: Path) -> str | None:
    """The failed rank's one-line user error (a MlaunchError, which train/__main__.py records for
    torchrun), read from torchrun's root-cause error file — there even when --local-ranks-filter
    hides that rank's output. The file is torchrun's JSON,
    `{"message": {"message": "<exception type>: <text>", "extraInfo": {...}}}`; None for any
    other failure (a crash's traceback is in torchrun's summary) or when there is no file."""
    try:
        message = json.loads(error_file.read_text())["message"]["message"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    kind, sep, text = str(message).partition(": ")
    lines = text.strip().splitlines()
    return lines[0] if sep and lines and kind in _user_error_kinds() else None


def _user_error_kinds(cls: type = MlaunchError) -> set[str]:
    """MlaunchError and its subclasses, by the bare type name torchrun's error file records."""
    return {cls.__name__}.union(*(_user_error_kinds(sub) for sub in cls.__subclasses__()))
