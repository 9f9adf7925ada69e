"""`mlaunch nodes check`: is every node reachable and fit, before a job is wasted?

Every node is checked in parallel and every node is reported — a bad node never hides the
others. Each failed check carries the fix it suggests. Exit 0 when all pass, 1 when any fails.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from job.config import ClusterConfig, load_cluster_job
from job.errors import MlaunchError
from launcher.fanout import fan_out
from launcher.shell import job_command, python_command

#: One process per node gathers everything, without importing torch: `import torch` costs 1.5 s
#: of CPU here and tens of seconds from a cold network filesystem, on every node, for facts that
#: the package metadata, torch/version.py and nvidia-smi give in milliseconds. (`--collective`
#: then imports torch for real, to run an all-reduce.)
_PROBE = r"""
import json, os, re, shutil, subprocess, sys, time
out = {"time": time.time(), "python": sys.version.split()[0], "executable": sys.executable}
wd = os.path.expanduser(sys.argv[1])
probe = wd
while probe and not os.path.exists(probe):
    probe = os.path.dirname(probe)
out["workdir_exists"] = os.path.isdir(wd)
try:
    out["disk_free_gb"] = round(shutil.disk_usage(probe or "/").free / 2**30, 1)
except OSError:
    out["disk_free_gb"] = None
from importlib import metadata, util
try:
    out["torch"] = metadata.version("torch")
    spec = util.find_spec("torch")
    text = open(os.path.join(list(spec.submodule_search_locations)[0], "version.py")).read()
    m = re.search(r"^cuda\s*(?::[^=]*)?=\s*['\"]([^'\"]+)['\"]", text, re.M)
    out["torch_cuda"] = m.group(1) if m else None
except Exception as e:
    out["torch_error"] = "torch is not installed for this python" if isinstance(e, metadata.PackageNotFoundError) else f"{type(e).__name__}: {e}"
nccl = [d.metadata["Name"] + " " + d.version for d in metadata.distributions() if (d.metadata["Name"] or "").lower().startswith("nvidia-nccl")]
out["nccl"] = nccl[0].split()[-1] if nccl else None
gpus = []
if shutil.which("nvidia-smi"):
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.free,memory.total", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=20)
        for line in q.stdout.strip().splitlines():
            name, free, total = [x.strip() for x in line.rsplit(",", 2)]
            gpus.append({"name": name, "free_gb": round(float(free) / 1024, 1), "total_gb": round(float(total) / 1024, 1)})
    except Exception as e:
        out["gpu_error"] = f"nvidia-smi: {e}"
out["gpus"] = gpus
out["cuda"] = bool(gpus) and bool(out.get("torch_cuda"))
print("MLAUNCH_PROBE=" + json.dumps(out))
"""

#: Deadline for one short command on a node (connecting has its own, cluster.ssh.connect_timeout_s).
_CMD_TIMEOUT_S = 30.0

_LISTEN = r"""
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(64)
except OSError as e:
    print("BIND_FAILED " + (e.strerror or str(e)), flush=True); sys.exit(1)
print("LISTENING", flush=True)
s.settimeout(float(sys.argv[3]))
end = time.time() + float(sys.argv[3])
while time.time() < end:
    try:
        c, _ = s.accept(); c.close()
    except OSError:
        break
"""

_DIAL = r"""
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close(); print("OK")
except OSError as e:
    print("FAIL " + (e.strerror or type(e).__name__)); sys.exit(1)
"""


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


@dataclass
class NodeReport:
    node: str
    checks: list[Check] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def add(self, name: str, ok: bool, detail: str, fix: str = "") -> None:
        self.checks.append(Check(name, ok, detail, "" if ok else fix))


def check(path: Path, *, overrides: list[str], as_json: bool, collective: bool) -> int:
    from launcher import ssh
    from launcher.backends import ssh as ssh_backend

    job = load_cluster_job(path, overrides)
    cluster = job.cluster
    assert cluster is not None
    if cluster.slurm is not None:
        from launcher.nodes_slurm import check_slurm

        reports = check_slurm(job, collective=collective)
        return report(reports, as_json)
    targets = ssh_backend.targets_for(job)
    names = list(targets)
    reports = {n: NodeReport(n) for n in names}
    conns = ssh.connect_all(targets, max_workers=cluster.ssh.max_parallel)
    rdzv_port = job.launch.rdzv.port
    try:
        def probe(name: str) -> None:
            rep, conn = reports[name], conns[name]
            if isinstance(conn, Exception):
                rep.add("ssh", False, *_ssh_problem(str(conn).removeprefix(f"node {name}: ")))
                return
            i = names.index(name)
            try:
                probe_node(rep, conn, cluster.node_python(i), cluster.node_workdir(i))
            except MlaunchError as e:  # a command timed out or the connection died: this node only
                rep.add("ssh" if not rep.checks else "probe", False, str(e).removeprefix(f"node {name}: "),
                        "check the node's load and the connection; rerun the check")

        def probe_node(rep: NodeReport, conn: Any, python: str, workdir: str) -> None:
            # SSH round trip: opening a channel, no process started on the node.
            rtt = conn.ping(timeout=_CMD_TIMEOUT_S)
            rep.facts["latency_ms"] = round(rtt * 1000, 1)
            rep.add("ssh", True, f"{rtt * 1000:.0f} ms")
            sent = time.time()
            res = conn.run(python_command(python, _PROBE, workdir), timeout=120)
            back = time.time()
            line = next((x for x in res.stdout.splitlines() if x.startswith("MLAUNCH_PROBE=")), None)
            if res.exit_code != 0 or line is None:
                err = (res.stderr.strip().splitlines() or [f"exit {res.exit_code}"])[-1]
                rep.add("python", False, f"{python}: {err}", "set cluster.python (or the node's python) to the interpreter that has torch (e.g. ~/venv/bin/python)")
                return
            facts = json.loads(line.split("=", 1)[1])
            rep.facts.update(facts)
            rep.add("python", True, f"{facts['python']}")
            if "torch_error" in facts:
                rep.add("torch", False, facts["torch_error"], f"install torch in {facts['executable']}")
                return
            rep.add("torch", True, facts["torch"])
            # The node read its clock between `sent` and `back`: the true offset lies in
            # [remote - back, remote - sent]. Red only when all of that window is beyond ±1 s:
            # on a busy node the round trip alone can take over a second.
            lo, hi = facts["time"] - back, facts["time"] - sent
            offset, error = (lo + hi) / 2, (hi - lo) / 2
            rep.facts["clock_offset_s"] = round(offset, 3)
            rep.facts["clock_error_s"] = round(error, 3)
            rep.add("clock", lo <= 1.0 and hi >= -1.0, f"{offset:+.3f} ± {error:.3f} s",
                    "sync the clocks (chrony/ntp): logs and timeouts compare times across nodes")
            disk = facts.get("disk_free_gb")
            rep.add("disk", disk is not None and disk >= 1.0, f"{disk} GB free", f"free space under {workdir}")
            gpus = facts.get("gpus") or []
            if gpus:
                names_ = sorted({g["name"] for g in gpus})
                rep.add("gpus", True, f"{len(gpus)} × {', '.join(names_)}; min free {min(g['free_gb'] for g in gpus)} GB")
                rep.add("cuda", bool(facts.get("torch_cuda")), f"torch built for CUDA {facts.get('torch_cuda')}",
                        f"torch {facts['torch']} is a CPU build: install a CUDA build of torch on this node")
                rep.add("nccl", True, facts.get("nccl") or "bundled with torch")
            else:
                rep.add("gpus", True, "none (CPU, gloo)" if not facts.get("gpu_error") else facts["gpu_error"])

        for name, e in fan_out(lambda n, _: probe(n), dict.fromkeys(names), cluster.ssh.max_parallel).failed.items():
            reports[name].add("probe", False, f"{type(e).__name__}: {e}", "rerun with MLAUNCH_DEBUG=1 and report it")

        _same_torch(reports)
        _check_rendezvous(cluster, names, conns, reports, rdzv_port, targets)
        if collective:
            _collective(job, targets, conns, reports)
    finally:
        ssh.close_all(conns)

    return report(reports, as_json)


def report(reports: dict[str, NodeReport], as_json: bool) -> int:
    ok = all(r.ok for r in reports.values())
    if as_json:
        print(json.dumps({"ok": ok, "nodes": {n: {"ok": r.ok, "checks": [asdict(c) for c in r.checks], "facts": r.facts}
                                             for n, r in reports.items()}}, indent=2))
    else:
        _print(reports, ok)
    return 0 if ok else 1


def _ssh_problem(msg: str) -> tuple[str, str]:
    """(what, fix) of a connection failure. The SSH layer's messages read "what; how to fix it":
    keep its own fix, which knows the case (a missing key file, the ssh-keyscan line to run)."""
    what, _, fix = msg.partition("; ")
    return (what, fix) if fix else (msg, _ssh_fix(msg))


def _ssh_fix(msg: str) -> str:
    if "ssh-keyscan" in msg or "host key" in msg:
        return "add the host key (see the message) or set cluster.ssh.host_key_policy: accept-new"
    if "auth" in msg.lower():
        return "check cluster.ssh.user / identity_file, and that the public key is in the node's authorized_keys"
    return "check that the node is up, sshd listens on that port, and no firewall is in the way"


def _same_torch(reports: dict[str, NodeReport]) -> None:
    versions = {r.facts.get("torch") for r in reports.values() if r.facts.get("torch")}
    if len(versions) > 1:
        for r in reports.values():
            if r.facts.get("torch"):
                r.add("torch-match", False, f"torch versions differ across nodes: {sorted(versions)}",
                      "install the same torch on every node (collectives across versions are undefined)")


def _check_rendezvous(cluster: ClusterConfig, names: list[str], conns: dict, reports: dict[str, NodeReport], port: int,
                      targets: dict[str, Any]) -> None:
    """The port is free on the master, and every other node reaches it by a real TCP connection."""
    from launcher.backends import ssh as ssh_backend

    master = names[0]
    mconn = conns[master]
    if isinstance(mconn, Exception) or not reports[master].ok:
        return
    addr = cluster.nodes[0].addr or ssh_backend.resolve_addr(targets[master])
    # In a pty, so closing the channel hangs the listener up: the port is free again at once.
    listener = mconn.start("exec " + python_command(cluster.node_python(0), _LISTEN, addr, str(port), "60"), pty=True)
    first = ""
    deadline = time.monotonic() + 20
    while not first and time.monotonic() < deadline and not listener.at_eof:
        lines = listener.read_lines(timeout=1.0)
        first = lines[0] if lines else ""
    if not first.startswith("LISTENING"):
        detail = first.removeprefix("BIND_FAILED ") or "no answer"
        reports[master].add("rdzv-port", False, f"{addr}:{port} not free ({detail})",
                            "stop what holds the port (`ss -ltnp`) or set launch.rdzv.port")
        listener.close()
        return
    reports[master].add("rdzv-port", True, f"{addr}:{port} free")
    try:
        def dial(name: str) -> None:
            conn = conns[name]
            if isinstance(conn, Exception) or not reports[name].ok:
                return
            fix = f"open TCP {port} from this node to {addr} (firewall/security group), or set cluster.nodes[0].addr"
            try:
                res = conn.run(python_command(cluster.node_python(names.index(name)), _DIAL, addr, str(port), "5"), timeout=_CMD_TIMEOUT_S)
            except MlaunchError as e:  # this node's report, not the whole check
                reports[name].add("rdzv-reach", False, str(e).removeprefix(f"node {name}: "), fix)
                return
            ok = res.exit_code == 0
            reports[name].add("rdzv-reach", ok, f"{addr}:{port} {'reachable' if ok else res.stdout.strip() or 'unreachable'}", fix)

        for name, e in fan_out(lambda n, _: dial(n), dict.fromkeys(names[1:])).failed.items():
            reports[name].add("rdzv-reach", False, f"{type(e).__name__}: {e}", "rerun with MLAUNCH_DEBUG=1 and report it")
    finally:
        listener.close()


_ALLREDUCE = r"""
import datetime, os, torch, torch.distributed as dist
backend = "nccl" if torch.cuda.is_available() else "gloo"
if backend == "nccl":
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
dist.init_process_group(backend, timeout=datetime.timedelta(seconds=60))
dev = "cuda" if backend == "nccl" else "cpu"
t = torch.ones(1024, device=dev) * (dist.get_rank() + 1)
dist.all_reduce(t)
n = dist.get_world_size()
assert int(t[0].item()) == n * (n + 1) // 2, t[0].item()
dist.barrier()
if dist.get_rank() == 0:
    print(f"ALLREDUCE_OK world={n} backend={backend}", flush=True)
dist.destroy_process_group()
os._exit(0)
"""


#: The all-reduce probe does not wait 10 minutes for a node that does not come.
PROBE_JOIN_TIMEOUT_S = 60


def probe_argv(argv: list[str], script: str) -> list[str]:
    """A node's torchrun argv with `script` in place of what it runs (`-m train CONFIG` or the
    entrypoint), and a short join timeout. The plan's torchrun options are `--name value` pairs
    (only `--standalone` stands alone) after `python -m torch.distributed.run`."""
    i = 3
    while i < len(argv) and argv[i].startswith("--"):
        i += 1 if argv[i] == "--standalone" else 2
    out = argv[:i] + [script]
    if "--rdzv-conf" in out:  # c10d (static rendezvous has no join timeout)
        i = out.index("--rdzv-conf") + 1
        out[i] = re.sub(r"join_timeout=\d+", f"join_timeout={PROBE_JOIN_TIMEOUT_S}", out[i])
    return out


def _collective(job: Any, targets: dict[str, Any], conns: dict, reports: dict[str, NodeReport]) -> None:
    """A tiny all-reduce through torchrun on every node, 1 process each, under a deadline."""
    from launcher.backends import ssh as ssh_backend
    from launcher.planning import build_plan

    if not all(r.ok for r in reports.values()):
        for r in reports.values():
            r.add("collective", False, "skipped: a node failed an earlier check", "fix the failures above first")
        return
    cfg = job.model_copy(deep=True)
    cfg.launch.nproc_per_node = 1
    addrs = {i: ssh_backend.resolve_addr(t) for i, t in enumerate(targets.values()) if not job.cluster.nodes[i].addr}
    the_plan, _ = build_plan(cfg, standalone=False, probe=False, addrs=addrs)
    script = f"/tmp/mlaunch-allreduce-{the_plan.run_id}.py"
    procs = {}
    for node in the_plan.nodes:
        conn = conns[node.name]
        conn.put_text(script, _ALLREDUCE, timeout=60)
        argv = probe_argv(node.argv, script)
        procs[node.name] = conn.start(job_command(argv, node.env, the_plan.run_id, cwd="/tmp"), pty=True)
    for name, proc in procs.items():
        try:
            code = proc.exit_status(timeout=120)
            out = [line for line in proc.lines()]
        except MlaunchError as e:
            code, out = -1, [str(e)]
            proc.close()
        ok = code == 0
        detail = next((line for line in out if "ALLREDUCE_OK" in line), "all-reduce ok" if ok else f"exit {code}: {(out or [''])[-1][:160]}")
        reports[name].add("collective", ok, detail,
                          "check NCCL_SOCKET_IFNAME/GLOO_SOCKET_IFNAME and that all nodes reach each other on all ports")
        conns[name].run(f"rm -f {shlex.quote(script)}", timeout=30)


def _print(reports: dict[str, NodeReport], ok: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
    cols = ["ssh", "partition", "state", "nodes", "python", "torch", "gpus", "cuda", "nccl", "disk", "clock", "rdzv-port",
            "rdzv-reach", "collective"]
    present = [c for c in cols if any(ch.name == c for r in reports.values() for ch in r.checks)]
    table = Table(title="nodes check", title_justify="left")
    table.add_column("node")
    for c in present:
        table.add_column(c)
    table.add_column("result")
    for name, rep in reports.items():
        cells = []
        for c in present:
            found = [ch for ch in rep.checks if ch.name == c]
            cells.append("" if not found else (f"[green]{found[0].detail}[/green]" if found[0].ok else f"[red]{found[0].detail}[/red]"))
        table.add_row(name, *cells, "[green]ok[/green]" if rep.ok else "[red]FAIL[/red]")
    console.print(table)
    for name, rep in reports.items():
        for ch in rep.checks:
            if not ch.ok:
                console.print(f"[red]✗[/red] {name}: {ch.name}: {ch.detail} — fix: {ch.fix}", markup=True)
    bad = sum(not r.ok for r in reports.values())
    console.print("[green]all nodes ready[/green]" if ok else f"[red]{bad} of {len(reports)} node(s) not ready[/red]")
