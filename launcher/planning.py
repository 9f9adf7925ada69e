"""From a loaded config to a checked plan, for every command that needs one (`mlaunch plan`,
both runners, `mlaunch nodes check --collective`): a run id, `parallel: auto` resolved, the
plan made (launcher/plan.py, pure), the parallel layout checked against the planned world.

Unlike launcher/plan.py this may look at the machine it runs on (the environment, nvidia-smi);
it never touches the network or starts the job.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from job.config import JobConfig, to_yaml
from job.files import publish_file
from launcher.plan import Plan, make_plan


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
    autoplan.check_lora(cfg, standalone=local, gpus=gpus)
    if local and probe:  # about to run here: a missing entrypoint is one line now, not a torchrun trace
        from launcher.entrypoint import check_here

        check_here(cfg)
    cfg, decision = autoplan.resolve_parallel(cfg, standalone=local, gpus=gpus)
    config_path = str(Path(cfg.output_dir) / "config.yaml")
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
    check_layout(the_plan)
    return the_plan, decision


def check_layout(the_plan: Plan) -> None:
    """The parallel degrees against the planned world: a bad layout is one line here, before any
    node is touched (the ranks check again with the world that actually started)."""
    from job.layout import Layout

    if the_plan.resolved.train is None:  # an entrypoint run: the script lays itself out
        return
    nprocs = {n.nproc_per_node for n in the_plan.nodes}
    elastic = the_plan.rendezvous is not None and ":" in the_plan.rendezvous.nnodes
    if len(nprocs) == 1 and not elastic:
        Layout.from_config(the_plan.resolved.train.parallel, the_plan.world_size, nprocs.pop())


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
    publish_file(path, to_yaml(cfg))
