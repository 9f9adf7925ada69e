"""Fan-out over SSH: how the launcher's cost grows from 1 to 32 nodes, beside pdsh.

Starts 32 local OpenSSH sshd "nodes" (tests/sshd.py's nodes, on 127.0.0.2 … 127.0.0.33, all on
one port so that pdsh, which takes one port for all hosts, can reach them), then times, for
1, 4, 16 and 32 nodes, interleaved round by round so that load from elsewhere hits every column
alike:

  (a) `mlaunch nodes check CLUSTER --json` — a subprocess, as a user runs it (no --collective);
  (b) the fan-out part of a launch through launcher.ssh, in this process: `connect_all` on fresh
      connections, `Connection.run("true")` on every node in parallel, `close_all`;
  (b0) the same without the command: `connect_all` + `close_all` (handshakes and auth only);
  (c) `pdsh -R ssh -w <hosts> true` (OpenSSH client processes, pdsh's fan-out of 32).

Every "node" is this machine: remote-side work (sshd's handshake, the login shell, and for (a)
the probe's `import torch`) shares its cores with the launcher. The CPU seconds of the launcher
process are reported beside the wall time to separate the two.

    python benchmarks/fanout.py [--sizes 1,4,16,32] [--repeat 5] [--out FILE]

Needs sshd (openssh-server), ssh (openssh-client) and pdsh (`apt-get install -y pdsh`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tests.sshd as sshd_nodes  # noqa: E402  (the test suite's sshd node class)


def common_port(n: int) -> int:
    """A port free on all of 127.0.0.2 … 127.0.0.(n+1)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.2", 0))
            port = s.getsockname()[1]
        try:
            for i in range(n):
                with socket.socket() as s:
                    s.bind((f"127.0.0.{i + 2}", port))
            return port
        except OSError:
            continue
    raise RuntimeError("no port free on every loopback address")


def start_cluster(root: Path, n: int) -> tuple[sshd_nodes.SSHCluster, list[sshd_nodes.SSHNode], int]:
    port = common_port(n)
    cluster = sshd_nodes.SSHCluster(root)
    original = sshd_nodes._free_port
    sshd_nodes._free_port = lambda host: port  # every node on the same port, different addresses
    try:
        nodes = cluster.nodes(n)
    finally:
        sshd_nodes._free_port = original
    assert [nd.host for nd in nodes] == [f"127.0.0.{i + 2}" for i in range(n)]
    assert all(nd.port == port for nd in nodes)
    return cluster, nodes, port


def cluster_yaml(root: Path, cluster: sshd_nodes.SSHCluster, nodes: list, rdzv_port: int) -> Path:
    import yaml

    job = {
        "cluster": {
            "nodes": [{"host": nd.host, "port": nd.port} for nd in nodes],
            "ssh": {"identity_file": cluster.identity_file, "known_hosts": cluster.known_hosts,
                    "config_file": cluster.empty_ssh_config},
            "workdir": str(ROOT),
            "python": sys.executable,
        },
        "launch": {"rdzv": {"port": rdzv_port}},
        "train": {"model": {"init": {}}},
    }
    path = root / f"cluster-{len(nodes)}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def run_timed(argv: list[str], env: dict[str, str] | None = None, timeout: float = 300) -> tuple[float, float, int, str]:
    """(wall s, CPU s of the process tree we waited for, exit code, stdout)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    res = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                         stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, res.returncode, res.stdout + res.stderr


def nodes_check(path: Path) -> tuple[float, float, int, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLAUNCH_DEBUG"}
    wall, cpu, code, out = run_timed([sys.executable, "-m", "launcher.cli", "nodes", "check", str(path), "--json"], env)
    detail = ""
    if code != 0:
        try:
            report = json.loads(out[: out.rindex("}") + 1])
            bad = [f"{n}:{c['name']}={c['detail']}" for n, r in report["nodes"].items() for c in r["checks"] if not c["ok"]]
            detail = "; ".join(bad[:3])
        except ValueError:
            detail = out.strip().splitlines()[-1] if out.strip() else ""
    return wall, cpu, code, detail


def ssh_fanout(nodes: list) -> tuple[float, float, int, str]:
    from launcher import ssh

    targets = {nd.name: nd.target() for nd in nodes}
    cpu0, t = time.process_time(), time.perf_counter()
    conns = ssh.connect_all(targets, max_workers=32)
    try:
        failed = [str(c) for c in conns.values() if isinstance(c, Exception)]
        if failed:
            return time.perf_counter() - t, time.process_time() - cpu0, 1, failed[0]
        with ThreadPoolExecutor(max_workers=min(32, len(conns))) as pool:
            results = list(pool.map(lambda c: c.run("true", timeout=60), conns.values()))
    finally:
        ssh.close_all(conns)
    wall, cpu = time.perf_counter() - t, time.process_time() - cpu0
    bad = [r for r in results if not r.ok]
    return wall, cpu, 1 if bad else 0, (bad[0].stderr.strip() if bad else "")


def ssh_connect_only(nodes: list) -> tuple[float, float, int, str]:
    """`connect_all` + `close_all`: handshakes and authentication only, no remote command."""
    from launcher import ssh

    targets = {nd.name: nd.target() for nd in nodes}
    cpu0, t = time.process_time(), time.perf_counter()
    conns = ssh.connect_all(targets, max_workers=32)
    ssh.close_all(conns)
    failed = [str(c) for c in conns.values() if isinstance(c, Exception)]
    return time.perf_counter() - t, time.process_time() - cpu0, 1 if failed else 0, failed[0] if failed else ""


def pdsh(nodes: list, cluster: sshd_nodes.SSHCluster, port: int) -> tuple[float, float, int, str]:
    env = dict(os.environ)
    env["PDSH_SSH_ARGS_APPEND"] = (f"-F /dev/null -p {port} -i {cluster.identity_file} -o BatchMode=yes "
                                   f"-o UserKnownHostsFile={cluster.known_hosts} -o StrictHostKeyChecking=yes")
    hosts = ",".join(nd.host for nd in nodes)
    wall, cpu, code, out = run_timed(["pdsh", "-R", "ssh", "-f", "32", "-w", hosts, "true"], env)
    return wall, cpu, code, out.strip().splitlines()[0] if code and out.strip() else ""


def remote_cpu(nodes: list) -> float:
    """CPU seconds the nodes' sshd have reaped from their sessions so far (handshakes, login
    shells, and whatever ran under them): the remote side's share of a measurement."""
    import psutil

    total = 0.0
    for nd in nodes:
        t = psutil.Process(nd.pid).cpu_times()
        total += t.user + t.system + t.children_user + t.children_system
    return total


def fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1,4,16,32")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "fanout_results.md"))
    ap.add_argument("--skip", default="", help="comma-separated methods to leave out: check,ssh,conn,pdsh")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    skip = set(filter(None, args.skip.split(",")))
    if "pdsh" not in skip and not shutil.which("pdsh"):
        sys.exit("pdsh not found: apt-get install -y pdsh (or --skip pdsh)")

    root = Path(tempfile.mkdtemp(prefix="mlaunch-fanout-"))
    cluster, nodes, port = start_cluster(root, max(sizes))
    try:
        rdzv = common_port(1)
        paths = {n: cluster_yaml(root, cluster, nodes[:n], rdzv) for n in sizes}
        methods = {
            "check": ("(a) mlaunch nodes check", lambda n: nodes_check(paths[n])),
            "ssh": ("(b) launcher.ssh connect_all + run `true`", lambda n: ssh_fanout(nodes[:n])),
            "conn": ("(b0) launcher.ssh connect_all only", lambda n: ssh_connect_only(nodes[:n])),
            "pdsh": ("(c) pdsh -R ssh true", lambda n: pdsh(nodes[:n], cluster, port)),
        }
        methods = {k: v for k, v in methods.items() if k not in skip}
        wall: dict[tuple[str, int], list[float]] = {(m, n): [] for m in methods for n in sizes}
        cpu: dict[tuple[str, int], list[float]] = {(m, n): [] for m in methods for n in sizes}
        rcpu: dict[tuple[str, int], list[float]] = {(m, n): [] for m in methods for n in sizes}
        failures: list[str] = []
        for n in sizes:  # warm-up: first connections, page cache, bytecode
            for m, (_, fn) in methods.items():
                fn(n)
        for rep in range(args.repeat):
            for n in sizes:
                for m, (label, fn) in methods.items():
                    r0 = remote_cpu(nodes)
                    w, c, code, detail = fn(n)
                    time.sleep(0.5)  # let the sessions end and be reaped before reading the remote CPU
                    rcpu[m, n].append(remote_cpu(nodes) - r0)
                    wall[m, n].append(w)
                    cpu[m, n].append(c)
                    if code != 0:
                        failures.append(f"round {rep + 1}, {n} node(s), {label}: exit {code}: {detail}")
                    print(f"round {rep + 1} n={n:>2} {m:<5} {w:6.2f}s wall {c:6.2f}s cpu {rcpu[m, n][-1]:6.2f}s remote cpu "
                          f"exit {code}", file=sys.stderr, flush=True)

        one = sizes[0]
        lines = [
            f"# SSH fan-out: 1 → {max(sizes)} nodes",
            "",
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}, {platform.node()}, {os.cpu_count()} CPU(s), "
            f"load average {os.getloadavg()[0]:.1f} at the end; python {platform.python_version()}; "
            f"every node a local sshd on 127.0.0.x:{port}. Median of {args.repeat} runs per cell, rounds interleaved.",
            "",
            "Wall seconds (median; min–max), and the ratio to the 1-node time:",
            "",
            "| nodes | " + " | ".join(label for label, _ in methods.values()) + " |",
            "|---:|" + "---|" * len(methods),
        ]
        for n in sizes:
            cells = []
            for m in methods:
                xs = wall[m, n]
                ratio = statistics.median(xs) / statistics.median(wall[m, one])
                cells.append(f"{fmt(xs)} ({min(xs):.2f}–{max(xs):.2f}) ×{ratio:.1f}")
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines += ["", "CPU seconds of the launcher side (median): mlaunch's process tree for (a), this process's "
                  "threads for (b), pdsh and its ssh clients for (c):", "",
                  "| nodes | " + " | ".join(m for m in methods) + " |", "|---:|" + "---:|" * len(methods)]
        for n in sizes:
            lines.append(f"| {n} | " + " | ".join(fmt(cpu[m, n]) for m in methods) + " |")
        lines += ["", "CPU seconds on the nodes' side (median; sshd sessions and everything under them, on "
                  f"the same {os.cpu_count()} core(s) as the launcher):", "",
                  "| nodes | " + " | ".join(m for m in methods) + " |", "|---:|" + "---:|" * len(methods)]
        for n in sizes:
            lines.append(f"| {n} | " + " | ".join(fmt(rcpu[m, n]) for m in methods) + " |")
        if "ssh" in methods and "pdsh" in methods:
            lines += ["", "launcher.ssh ÷ pdsh (median wall): " + ", ".join(
                f"{n} node(s) {statistics.median(wall['ssh', n]) / statistics.median(wall['pdsh', n]):.2f}"
                for n in sizes)]
        lines += ["", "Failures: " + ("none" if not failures else "")] + [f"- {f}" for f in failures]
        lines += ["", "Raw wall seconds:", "", "```"]
        for m in methods:
            for n in sizes:
                lines.append(f"{m:<5} n={n:<2} " + " ".join(f"{x:.3f}" for x in wall[m, n]))
        lines.append("```")
        text = "\n".join(lines) + "\n"
        print(text)
        Path(args.out).write_text(text)
        return 0
    finally:
        cluster.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
