"""`mlaunch nodes check` on a Slurm config: is the partition up, are there enough nodes that can
be allocated, with the GPUs asked for — and with `--collective`, does a short all-reduce job across
the requested nodes work? Asked of the controller (sinfo, scontrol), never by SSH to the nodes.
One report per node of the partition, plus one for the partition as a whole.
"""

from __future__ import annotations

import re
import time

from job.config import JobConfig
from job.errors import MlaunchError
from job.markers import EXIT
from launcher.backends.slurm import FINAL_STATES, first_line, job_info, open_host, parse_fields, require_tools, slurm_cmd
from launcher.backends.slurm_host import SlurmHost
from launcher.nodes import _ALLREDUCE, NodeReport, probe_argv

#: Node states (sinfo %t, without its suffix flags) in which a node can take a job.
USABLE = {"idle", "mix", "alloc", "comp", "resv", "plnd"}
COLLECTIVE_TIMEOUT_S = 180.0


def check_slurm(job: JobConfig, *, collective: bool) -> dict[str, NodeReport]:
    host = open_host(job)
    try:
        return _check(host, job, collective=collective)
    finally:
        host.close()


def _check(host: SlurmHost, job: JobConfig, *, collective: bool) -> dict[str, NodeReport]:
    require_tools(host, ("sinfo", "scontrol", "sbatch", "scancel"))
    cluster = job.cluster
    assert cluster is not None and cluster.slurm is not None
    slurm = cluster.slurm
    part = slurm.partition or _default_partition(host)
    summary = NodeReport(f"partition {part}")
    res = slurm_cmd(host, "scontrol", "show", "partition", "-o", part)
    if res.returncode != 0:
        summary.add("partition", False, first_line(res.stderr) or f"no partition {part}",
                    "set cluster.slurm.partition to one `sinfo -s` lists")
        return {summary.node: summary}
    info = parse_fields(res.stdout)
    up = info.get("State") == "UP"
    summary.add("partition", up, f"{part} {info.get('State', '?').lower()}", f"the partition is {info.get('State')}: ask the admins, or pick another")
    reports: dict[str, NodeReport] = {}
    usable = 0
    for line in slurm_cmd(host, "sinfo", "-h", "-N", "-p", part, "-o", "%N|%t|%G|%c", check=True).stdout.splitlines():
        name, state, gres, cpus = (line.split("|") + ["", "", ""])[:4]
        if name in reports:
            continue
        rep = reports[name] = NodeReport(name)
        base = state.rstrip("*~#!%$@^-")
        fit = base in USABLE and not state.endswith("*")  # `*`: not responding
        rep.add("state", fit, state, "the node is down or drained: `scontrol show node` says why")
        gpus = _gpu_count(gres)
        rep.facts.update({"cpus": int(cpus) if cpus.isdigit() else None, "gpus": gpus, "state": state})
        if slurm.gpus_per_node:
            rep.add("gpus", gpus >= slurm.gpus_per_node, f"{gpus} (gres {gres})",
                    f"this node has fewer than cluster.slurm.gpus_per_node={slurm.gpus_per_node} GPUs")
            fit = fit and gpus >= slurm.gpus_per_node
        else:
            rep.add("gpus", True, f"{gpus}" if gpus else "none (CPU, gloo)")
        usable += fit
    summary.add("nodes", usable >= slurm.nodes, f"{usable} of {len(reports)} usable, {slurm.nodes} asked",
                f"lower cluster.slurm.nodes to {usable} or wait for nodes to come back" if usable else "no usable node in the partition")
    summary.facts.update({"total_nodes": len(reports), "usable_nodes": usable, "asked": slurm.nodes})
    if collective:
        if summary.ok:
            _collective(host, job, summary, reports)
        else:
            summary.add("collective", False, "skipped: the partition cannot run the job", "fix the failures above first")
    return {summary.node: summary, **reports}


def _default_partition(host: SlurmHost) -> str:
    for line in slurm_cmd(host, "sinfo", "-h", "-o", "%P", check=True).stdout.split():
        if line.endswith("*"):
            return line.rstrip("*")
    raise MlaunchError("this Slurm cluster has no default partition: set cluster.slurm.partition (`sinfo -s` lists them)")


def _gpu_count(gres: str) -> int:
    """`gpu:8`, `gpu:h100:8(S:0-1)`, `gpu:a100:4,shard:8` → the GPU count."""
    return sum(int(m.group(1)) for m in re.finditer(r"gpu(?::[\w.-]+)?:(\d+)", gres))


def _collective(host: SlurmHost, job: JobConfig, summary: NodeReport, reports: dict[str, NodeReport]) -> None:
    """One sbatch job, the plan's own script with a tiny all-reduce in place of the trainer."""
    from launcher import sbatch
    from launcher.planning import build_plan

    work = f".mlaunch/nodes-check-{time.strftime('%Y%m%d-%H%M%S')}"  # under the submit directory
    cfg = job.with_output_dir(work)
    cfg.launch.nproc_per_node = 1
    the_plan, _ = build_plan(cfg, standalone=False, probe=False)
    host.prepare(work)
    probe = f"{work}/allreduce.py"
    host.write(probe, _ALLREDUCE)
    node = the_plan.nodes[0]
    argv = probe_argv(node.argv, probe)
    assert cfg.cluster is not None and cfg.cluster.slurm is not None
    script = f"{work}/slurm/allreduce.sbatch"
    host.write(script, sbatch.script(cfg.cluster.slurm.model_copy(update={"signal_s": 0}), job_name="mlaunch-allreduce",
                                     run_id=the_plan.run_id, nodes=cfg.cluster.slurm.nodes, output_dir=work,
                                     workdir=None, argv=argv, env=node.env, setup=cfg.cluster.setup,
                                     rdzv_port_base=cfg.launch.rdzv.port))
    res = slurm_cmd(host, "sbatch", "--parsable", "--wait", script, timeout=COLLECTIVE_TIMEOUT_S + 30)
    job_id = res.stdout.strip().split(";")[0]
    try:
        if res.returncode != 0 and not job_id:
            summary.add("collective", False, f"sbatch: {first_line(res.stderr)}", "see `mlaunch plan` for the script")
            return
        info = job_info(host, job_id) or {}
        nodes = slurm_cmd(host, "scontrol", "show", "hostnames", info.get("NodeList", ""), check=False).stdout.split()
        ok_line = ""
        for name in nodes:
            lines = (host.read(f"{work}/logs/{name}.log") or "").splitlines()
            ok_line = ok_line or next((x for x in lines if "ALLREDUCE_OK" in x), "")
            code = next((int(x[len(EXIT):].split()[0]) for x in reversed(lines) if x.startswith(EXIT)), None)
            rep = reports.setdefault(name, NodeReport(name))
            rep.add("collective", code == 0, "all-reduce ok" if code == 0 else
                    f"exit {code}: {(lines or [''])[-2 if code is not None and len(lines) > 1 else -1][:160]}",
                    "check NCCL_SOCKET_IFNAME/GLOO_SOCKET_IFNAME and that the nodes reach each other on all ports")
        state = info.get("JobState", "?")
        summary.add("collective", state == "COMPLETED" and bool(ok_line),
                    ok_line.strip() or f"job {job_id} {state.lower()} ({info.get('ExitCode', '?')})",
                    f"the all-reduce job {job_id} failed: its logs are in {work}/")
    finally:
        state = (job_info(host, job_id) or {}).get("JobState") if job_id else None
        if state is not None and state not in FINAL_STATES:
            slurm_cmd(host, "scancel", job_id)
        if summary.ok:  # a failed check keeps its logs to read
            host.run(["sh", "-c", f"rm -rf {work} && rmdir .mlaunch 2>/dev/null; true"], timeout=30)
