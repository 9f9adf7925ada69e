"""`mlaunch run`: one flow for every backend, top to bottom.

provision (reach the nodes, learn addresses and GPUs; every failure reported, nothing started)
→ plan (pure: launcher/plan.py) → setup (code, resolved config, port checks) → start →
supervise (launcher/supervisor.py: streaming, liveness, hangs, first failure stops all, report)
→ teardown (connections closed; the supervisor has already stopped and verified every node).

With `launch.job_restarts: N`, a run that failed for a reason another start could cure (a node
failed, was lost or hung) goes round again, up to N times: a new run id, the same output
directory, so the trainer resumes from its newest complete checkpoint (`resume: auto`).

Every run has an entry in the run registry (launcher/registry.py) from before its provisioning
to its end, whether the terminal holds it or a detached supervisor does (launcher/detach.py).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

from job.config import JobConfig
from job.errors import MlaunchError
from launcher.backends import backend_for
from launcher.backends.base import Backend
from launcher.console import say
from launcher.planning import build_plan, new_run_id
from launcher.registry import Entry
from launcher.supervisor import Supervisor, Verdict


def register(cfg: JobConfig, *, standalone: bool, detached: bool = False, request: dict | None = None) -> Entry:
    """A new run's registry entry (state `starting`), before anything is reached or started."""
    backend = "local" if standalone or cfg.cluster is None else cfg.cluster.backend
    nodes = (["local"] if backend == "local" else
             [cfg.cluster.node_name(i) for i in range(len(cfg.cluster.nodes))] if backend == "ssh" else [])
    entry = Entry(run_id=new_run_id(cfg.name or "job"), name=cfg.name or "job", backend=backend,
                  output_dir=str(Path(cfg.output_dir).resolve()), config=str((request or {}).get("config", "")),
                  nodes=nodes, detached=detached, request=request or {})
    entry.save()
    return entry


def launch(cfg: JobConfig, backend: Backend | None = None, *, standalone: bool = False,
           entry: Entry | None = None) -> int:
    if entry is None:  # attached: this process is the supervisor
        entry = register(cfg, standalone=standalone, request={"config": "", "standalone": standalone, "cwd": os.getcwd()})
    entry.claim()
    try:
        code = _attempts(cfg, backend, standalone, entry)
    except BaseException as e:  # provisioning and set-up errors: the entry says how the run ended
        if entry.live:
            entry.state = "stopped" if isinstance(e, KeyboardInterrupt) else "failed"
            entry.exit_code = getattr(e, "exit_code", 130 if isinstance(e, KeyboardInterrupt) else 1)
            entry.cause, entry.ended = str(e) or type(e).__name__, time.time()
            entry.save()
        raise
    return code


def _attempts(cfg: JobConfig, backend: Backend | None, standalone: bool, entry: Entry) -> int:
    restarts = cfg.launch.job_restarts
    for attempt in range(restarts + 1):
        if attempt:
            cfg = nodes_for_restart(cfg)
        run_id = entry.run_id if attempt == 0 else new_run_id(cfg.name or "job")
        if attempt:
            entry.attempts.append(run_id)
        verdict = launch_once(cfg, backend if attempt == 0 and backend else backend_for(cfg, standalone=standalone),
                              run_id=run_id, entry=entry, restarts_left=restarts - attempt)
        if verdict.code == 0 or not verdict.retry:
            return verdict.code
        if attempt == restarts:
            if restarts:
                say(f"giving up: the job failed again after {restarts} restart(s) (launch.job_restarts)")
            return verdict.code
        say(f"restart {attempt + 1} of {restarts} (launch.job_restarts) after: {verdict.cause}; "
            "the job resumes from its newest complete checkpoint")
    raise AssertionError("unreachable")


def launch_once(cfg: JobConfig, backend: Backend, *, run_id: str | None = None, entry: Entry | None = None,
                restarts_left: int = 0) -> Verdict:
    local = backend.name == "local"
    try:
        found = backend.provision()
        plan, _ = build_plan(cfg, standalone=local, probe=local, run_id=run_id, addrs=found.addrs, gpus=found.gpus)
        (Path(plan.output_dir) / "logs").mkdir(parents=True, exist_ok=True)
        backend.setup(plan)
        say(f"run {plan.run_id}: {backend.describe(plan)}")
        job = backend.start(plan)
        try:
            supervisor = Supervisor(cfg, plan, job, prefixed=not local, entry=entry,
                                    echo=not (entry and entry.detached), restarts_left=restarts_left)
            supervisor.run()
            return supervisor.verdict
        finally:
            job.close()
    finally:
        backend.teardown()


def nodes_for_restart(cfg: JobConfig) -> JobConfig:
    """Before a restart over SSH: check that every node answers. With `launch.nnodes: MIN:MAX`,
    go on without the ones that do not, if at least MIN answer; otherwise stop here, naming them."""
    cluster = cfg.cluster
    if cluster is None or cluster.backend != "ssh":
        return cfg
    from launcher import ssh
    from launcher.backends.ssh import targets_for
    from launcher.plan import nnodes_bounds

    results = ssh.connect_all(targets_for(cfg), max_workers=cluster.ssh.max_parallel)
    ssh.close_all(results)
    names = list(results)
    down = [n for n, r in results.items() if isinstance(r, Exception)]
    if not down:
        return cfg
    lo, hi = nnodes_bounds(cfg.launch.nnodes or str(len(names)))
    healthy = len(names) - len(down)
    why = "; ".join(str(results[n]) for n in down)
    if lo == hi or healthy < lo:
        raise MlaunchError(f"cannot restart: {len(down)} of {len(names)} node(s) do not answer ({why}); "
                           + (f"fewer than launch.nnodes minimum {lo} remain" if lo != hi else
                              "launch.nnodes: MIN:MAX lets a restart go on without them"))
    kept = [node for i, node in enumerate(cluster.nodes) if cluster.node_name(i) not in down]
    if cfg.train is None:  # an entrypoint run: its batch sizes are the script's own business
        say(f"restarting without {', '.join(down)} (not answering): {healthy} node(s), launch.nnodes={lo}:{hi}")
        return cfg.model_copy(update={"cluster": cluster.model_copy(update={"nodes": kept}),
                                      "launch": cfg.launch.model_copy(update={"nnodes": f"{lo}:{min(hi, healthy)}"})})
    # The resume keeps the data order only with the same global batch per micro-step (micro-batch
    # × data-parallel size; train/data/sampler.py): fewer nodes, proportionally larger micro-batches.
    total, micro = len(names), cfg.train.data.micro_batch_size
    if (micro * total) % healthy:
        raise MlaunchError(f"cannot restart on {healthy} of {total} node(s) ({', '.join(down)} do not answer): keeping the "
                           f"global batch needs train.data.micro_batch_size × {total} / {healthy} to be whole (it is "
                           f"{micro}); a micro_batch_size that is a multiple of {healthy // math.gcd(total, healthy)} allows it")
    new_micro = micro * total // healthy
    say(f"restarting without {', '.join(down)} (not answering): {healthy} node(s), launch.nnodes={lo}:{hi}, "
        f"train.data.micro_batch_size {micro} → {new_micro} (the same global batch, the same data order)")
    train = cfg.train.model_copy(update={"data": cfg.train.data.model_copy(update={"micro_batch_size": new_micro})})
    return cfg.model_copy(update={"cluster": cluster.model_copy(update={"nodes": kept}),
                                  "launch": cfg.launch.model_copy(update={"nnodes": f"{lo}:{min(hi, healthy)}"}),
                                  "train": train})

