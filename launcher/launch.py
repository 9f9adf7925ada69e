"""`mlaunch run`: one flow for every backend, top to bottom.

provision (reach the nodes, learn addresses and GPUs; every failure reported, nothing started)
→ plan (pure: launcher/plan.py) → setup (code, resolved config, port checks) → start →
supervise (launcher/supervisor.py: streaming, watchdog, first failure stops all, report) →
teardown (connections closed; the supervisor has already stopped and verified every node).
"""

from __future__ import annotations

from pathlib import Path

from job.config import JobConfig
from launcher.backends import backend_for
from launcher.backends.base import Backend
from launcher.console import say
from launcher.planning import build_plan
from launcher.supervisor import Supervisor


def launch(cfg: JobConfig, backend: Backend | None = None, *, standalone: bool = False) -> int:
    backend = backend or backend_for(cfg, standalone=standalone)
    local = backend.name == "local"
    try:
        found = backend.provision()
        plan, _ = build_plan(cfg, standalone=local, probe=local, addrs=found.addrs, gpus=found.gpus)
        (Path(plan.output_dir) / "logs").mkdir(parents=True, exist_ok=True)
        backend.setup(plan)
        say(f"run {plan.run_id}: {backend.describe(plan)}")
        job = backend.start(plan)
        try:
            return Supervisor(cfg, plan, job, prefixed=not local).run()
        finally:
            job.close()
    finally:
        backend.teardown()
