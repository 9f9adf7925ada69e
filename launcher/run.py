"""Executing a plan: on this machine (`--standalone`) or on every node over SSH.

The plan (launcher/plan.py) decides what runs; this module only makes it happen: it writes the
resolved config, starts the processes, streams their output, and guarantees teardown.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

from job.config import JobConfig, to_yaml
from job.errors import MlaunchError
from launcher.plan import Plan, make_plan

EXIT_SIGINT = 130
EXIT_SIGTERM = 143


def new_run_id(job: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in job)[:40]
    return f"{safe}-{datetime.now().strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def build_plan(
    cfg: JobConfig,
    *,
    standalone: bool,
    probe: bool,
    run_id: str | None = None,
    addrs: dict[int, str] | None = None,
    gpus: dict[int, int] | None = None,
) -> tuple[Plan, Any]:
    """Resolve `parallel: auto`, then make the plan. Returns (plan, planner decision or None).

    With `probe`, the local GPU count is asked (nvidia-smi, no torch import) for `nproc_per_node: auto`.
    """
    from job import autoplan

    run_id = run_id or new_run_id(cfg.name or "job")
    local = standalone or cfg.cluster is None
    if local and probe and gpus is None:
        gpus = {0: local_gpu_count()}
    cfg, decision = autoplan.resolve_parallel(cfg, standalone=local, gpus=gpus)
    config_path = str(Path(cfg.train.output_dir) / "config.yaml")
    the_plan = make_plan(
        cfg,
        run_id=run_id,
        config_path=config_path,
        local_env=os.environ,
        standalone=standalone,
        addrs=addrs,
        gpus=gpus,
        python=sys.executable if local else None,
        parallel=autoplan.summary(cfg, decision, None if decision else autoplan.assess(cfg, standalone=local, gpus=gpus)),
    )
    _check_layout(the_plan)
    return the_plan, decision


def _check_layout(the_plan: Plan) -> None:
    """The parallel degrees against the planned world: a bad layout is one line here, before any
    node is touched (the ranks check again with the world that actually started)."""
    from job.layout import ParallelDims  # torch-free

    assert the_plan.resolved is not None
    nprocs = {n.nproc_per_node for n in the_plan.nodes}
    elastic = the_plan.rendezvous is not None and ":" in the_plan.rendezvous.nnodes
    if len(nprocs) == 1 and not elastic:
        ParallelDims.from_config(the_plan.resolved.train.parallel, the_plan.world_size, nprocs.pop())


def local_gpu_count() -> int:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def write_resolved_config(cfg: JobConfig, path: Path) -> None:
    """Atomic: a rank must never read a half-written config."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(to_yaml(cfg))
    os.replace(tmp, path)


class _Stop:
    """Turns SIGINT/SIGTERM into a recorded request to stop, answered by the run loop."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.event = threading.Event()
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_Stop":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
        self.event.set()

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    @property
    def exit_code(self) -> int:
        return EXIT_SIGINT if self.signum == signal.SIGINT else EXIT_SIGTERM


def run_standalone(cfg: JobConfig) -> int:
    """`torchrun --standalone` here: stream its output, tee it to <output_dir>/logs/local.log,
    and on Ctrl-C/SIGTERM stop every worker (torchrun first, then the run id as a backstop)."""
    from launcher import procs

    the_plan, decision = build_plan(cfg, standalone=True, probe=True)
    out = Path(cfg.train.output_dir)
    assert the_plan.resolved is not None
    write_resolved_config(the_plan.resolved, Path(the_plan.config_path))
    (out / "logs").mkdir(parents=True, exist_ok=True)
    node = the_plan.nodes[0]
    _say(f"run {the_plan.run_id}: torchrun --standalone, {node.nproc_per_node} process(es), "
         f"strategy {the_plan.parallel.get('strategy')}, outputs in {out}/")
    env = {**os.environ, **node.env}
    grace = cfg.launch.grace_period_s
    with open(out / "logs" / "local.log", "ab") as log, _Stop() as stop:
        try:
            # A new session: the terminal's Ctrl-C reaches only us, and we stop torchrun in order.
            proc = subprocess.Popen(node.argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as e:
            raise MlaunchError(f"cannot start torchrun ({node.argv[0]}): {e.strerror}; check the python interpreter") from None
        (out / "logs" / "run.json").write_text(json.dumps(
            {"run_id": the_plan.run_id, "nodes": {"local": {"host": "localhost", "pid": proc.pid, "sid": proc.pid}}}, indent=2))
        quiet = threading.Event()
        errors: list[str] = []
        pump = threading.Thread(target=_pump, args=(proc.stdout, log, quiet, errors), daemon=True)
        pump.start()
        while proc.poll() is None and not stop.event.is_set():
            stop.event.wait(0.2)
        if stop.signum is not None:
            _say(f"stopping run {the_plan.run_id} (signal {stop.signum}); grace {grace:g}s")
            # torchrun answers SIGTERM with its own traceback: keep it in the log, off the terminal.
            quiet.set()
            _terminate(proc, grace)
        code = proc.wait()
        left = procs.end_run(the_plan.run_id, grace_s=grace)["sigterm"]
        if left:
            _say(f"ended {len(left)} leftover process(es) of run {the_plan.run_id}")
        pump.join(timeout=5)
    if stop.signum is not None:
        _say(f"stopped: no process of run {the_plan.run_id} is left; torchrun's shutdown output is in {out / 'logs' / 'local.log'}")
        return stop.exit_code
    if code != 0:
        # torchrun's failure report is long; say first what went wrong, in the rank's own words.
        cause = f": {errors[0]}" if errors else ""
        _say(f"run failed (torchrun exit code {code}){cause}; full log: {out / 'logs' / 'local.log'}")
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


def _pump(stream: Any, log: Any, quiet: threading.Event, errors: list[str]) -> None:
    for line in iter(stream.readline, b""):
        # A rank's one-line user error (train/__main__.py), or the same error as torchrun's failure
        # summary quotes it from the rank's error file (the only copy when --local-ranks-filter
        # hides that rank).
        text = line.decode(errors="replace").strip()
        for marker in ("error: ", "job.errors.ConfigError: "):
            if text.startswith(marker):
                errors.append(text[len(marker):])
        log.write(line)
        log.flush()
        if not quiet.is_set():
            sys.stdout.buffer.write(line)
            sys.stdout.flush()


def _say(msg: str) -> None:
    print(f"[mlaunch] {msg}", file=sys.stderr, flush=True)


def run_cluster(cfg: JobConfig) -> int:
    from launcher.cluster_run import run_on_cluster

    return run_on_cluster(cfg)
