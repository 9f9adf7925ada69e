"""`mlaunch nodes check` against real OpenSSH sshd "nodes" on loopback addresses (tests/sshd.py),
run as users run it: a subprocess, reading a bare cluster YAML or a job YAML.

Green on healthy nodes (with and without --collective); red, with the fix it suggests, for a
node whose sshd is down, a node whose host key is unknown, and a rendezvous port already taken,
while the healthy nodes are still reported ok in the same JSON.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def cluster_section(ssh_cluster, nodes, *, known_hosts: str | None = None, workdir: str = str(ROOT)) -> dict:
    return {
        "nodes": [{"host": n.host, "port": n.port} for n in nodes],
        "ssh": {"identity_file": ssh_cluster.identity_file, "known_hosts": known_hosts or ssh_cluster.known_hosts,
                "config_file": ssh_cluster.empty_ssh_config, "connect_timeout_s": 5},
        "workdir": workdir,
        "python": sys.executable,
    }


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def nodes_check(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("MLAUNCH_DEBUG", "MLAUNCH_CLUSTER")}
    full_env.update(env or {})
    try:
        return subprocess.run([sys.executable, "-m", "launcher.cli", "nodes", "check", *args], cwd=ROOT, env=full_env,
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"`mlaunch nodes check {' '.join(args)}` did not finish in {timeout:g}s\n{e.stdout}\n{e.stderr}")


def parse(res: subprocess.CompletedProcess) -> dict:
    try:
        return json.loads(res.stdout)
    except ValueError:
        pytest.fail(f"not JSON (exit {res.returncode}):\n{res.stdout}\n{res.stderr}")


def checks(report: dict, node: str) -> dict[str, dict]:
    return {c["name"]: c for c in report["nodes"][node]["checks"]}


def test_healthy_cluster_from_mlaunch_cluster_env(tmp_path, ssh_cluster):
    """No argument: $MLAUNCH_CLUSTER names a bare cluster YAML. Every check green, exit 0."""
    nodes = ssh_cluster(2)
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(cluster_section(ssh_cluster, nodes)))
    res = nodes_check("--json", env={"MLAUNCH_CLUSTER": str(path)})
    report = parse(res)
    assert res.returncode == 0 and report["ok"], json.dumps(report, indent=1) + res.stderr
    master, other = nodes[0].host, nodes[1].host
    assert list(report["nodes"]) == [master, other]
    for name in (master, other):
        found = checks(report, name)
        assert {"ssh", "python", "torch", "clock", "disk", "gpus"} <= set(found), found
        assert all(c["ok"] for c in found.values()), found
        assert report["nodes"][name]["facts"]["executable"] == sys.executable
    assert "free" in checks(report, master)["rdzv-port"]["detail"]
    assert "reachable" in checks(report, other)["rdzv-reach"]["detail"]


def test_job_yaml_with_collective(tmp_path, ssh_cluster):
    """A job YAML is accepted too (its launch.rdzv.port is the one checked); --collective runs a
    real all-reduce through torchrun across the nodes."""
    nodes = ssh_cluster(2)
    port = free_port(nodes[0].host)
    job = {"name": "check", "cluster": cluster_section(ssh_cluster, nodes), "launch": {"rdzv": {"port": port}},
           "train": {"model": {"init": {"hidden_size": 32}}}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    res = nodes_check(str(path), "--json", "--collective")
    report = parse(res)
    assert res.returncode == 0 and report["ok"], json.dumps(report, indent=1) + res.stderr
    assert checks(report, nodes[0].host)["rdzv-port"]["detail"] == f"{nodes[0].host}:{port} free"
    for node in nodes:
        collective = checks(report, node.host)["collective"]
        assert collective["ok"], collective
    assert "ALLREDUCE_OK world=2" in checks(report, nodes[0].host)["collective"]["detail"]


def test_down_node_and_unknown_host_key_reported_beside_healthy_ones(tmp_path, ssh_cluster):
    healthy = ssh_cluster(2)
    down = ssh_cluster.spawn()
    down.stop()
    stranger = ssh_cluster.spawn()  # running, but its key is missing from the known_hosts we use
    known = tmp_path / "known_hosts"
    known.write_text("".join(n.known_hosts_line + "\n" for n in [*healthy, down]))
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(cluster_section(ssh_cluster, [*healthy, down, stranger], known_hosts=str(known))))
    try:
        res = nodes_check(str(path), "--json")
    finally:
        stranger.stop()
    report = parse(res)
    assert res.returncode == 1 and not report["ok"], json.dumps(report, indent=1) + res.stderr
    for node in healthy:
        assert report["nodes"][node.host]["ok"], report["nodes"][node.host]
    assert checks(report, healthy[1].host)["rdzv-reach"]["ok"]

    dead = checks(report, down.host)["ssh"]
    assert not dead["ok"] and not report["nodes"][down.host]["ok"], dead
    assert f"{down.host}:{down.port}" in dead["detail"] and "refused" in dead["detail"], dead
    assert "sshd" in dead["fix"] and "port" in dead["fix"], dead  # the SSH layer's own fix for a refusal

    unknown = checks(report, stranger.host)["ssh"]
    assert not unknown["ok"], unknown
    assert "host key not in" in unknown["detail"] and str(known) in unknown["detail"], unknown
    assert f"ssh-keyscan -p {stranger.port} {stranger.host}" in unknown["fix"], unknown
    assert "accept-new" in unknown["fix"], unknown
    assert stranger.known_hosts_line not in known.read_text(), "an unknown host key was trusted silently"


def test_rendezvous_port_taken(tmp_path, ssh_cluster):
    nodes = ssh_cluster(2)
    with socket.socket() as holder:
        holder.bind((nodes[0].host, 0))
        holder.listen()
        port = holder.getsockname()[1]
        job = {"cluster": cluster_section(ssh_cluster, nodes), "launch": {"rdzv": {"port": port}},
               "train": {"model": {"init": {}}}}
        path = tmp_path / "job.yaml"
        path.write_text(yaml.safe_dump(job))
        res = nodes_check(str(path), "--json")
    report = parse(res)
    assert res.returncode == 1 and not report["ok"], json.dumps(report, indent=1)
    taken = checks(report, nodes[0].host)["rdzv-port"]
    assert not taken["ok"] and f"{nodes[0].host}:{port} not free" in taken["detail"], taken
    assert "launch.rdzv.port" in taken["fix"], taken
    # Only the port is wrong: every other check of the master, and the other node, are green.
    assert all(c["ok"] for name, c in checks(report, nodes[0].host).items() if name != "rdzv-port")
    assert report["nodes"][nodes[1].host]["ok"], report["nodes"][nodes[1].host]
