"""Detached runs on 2 sshd nodes: `mlaunch stop` from another process, and a node that fails while
nobody watches."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

from tests.helpers import wait_until
from tests.ssh.test_multinode import MLAUNCH, ROOT, cmdline, run_processes, tokenizer, write_job  # noqa: F401

ENDLESS = 100_000


def mlaunch(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("MLAUNCH_DEBUG", None)
    env.pop("MLAUNCH_RUN_ID", None)
    return subprocess.run([*MLAUNCH, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def status_of(run_id: str) -> dict:
    res = mlaunch("status", run_id, "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def detach(job) -> str:
    res = mlaunch("run", str(job.path), "--detach")
    assert res.returncode == 0, res.stdout + res.stderr
    return next(line.split()[2] for line in res.stderr.splitlines() if " detached: started on 2 node(s)" in line)


def reached(run_id: str, step: int) -> bool:
    return (status_of(run_id)["progress"].get("step") or 0) >= step


def test_stop_from_another_process_leaves_nothing_on_any_node(tmp_path, ssh_cluster, tokenizer):
    nodes = ssh_cluster(2)
    job = write_job(tmp_path, ssh_cluster, nodes, tokenizer, tag="dstop", max_steps=ENDLESS)
    run_id = detach(job)
    try:
        assert wait_until(lambda: reached(run_id, 2), 120), status_of(run_id)
        assert len(run_processes(lambda r: r.startswith(run_id))) >= 6, "torchrun + 2 workers on each node"
        res = mlaunch("stop", run_id[:-2])
        assert res.returncode == 0, res.stderr
        st = status_of(run_id)
        assert st["state"] == "stopped", st
        left = run_processes(lambda r: r.startswith(run_id))
        assert not left, f"left after stop: {[cmdline(p) for p in left]}"
        logs = mlaunch("logs", run_id, "--node", job.node_names()[1])
        assert logs.returncode == 0 and all(line.startswith(job.node_names()[1]) for line in logs.stdout.splitlines())
        assert "node ready in" in logs.stdout
    finally:
        for pid in run_processes(lambda r: r.startswith(run_id)):
            os.kill(pid, signal.SIGKILL)


def test_a_detached_run_whose_node_fails_is_failed_and_names_the_node(tmp_path, ssh_cluster, tokenizer):
    nodes = ssh_cluster(2)
    job = write_job(tmp_path, ssh_cluster, nodes, tokenizer, tag="dfail", max_steps=ENDLESS)
    run_id = detach(job)
    try:
        assert wait_until(lambda: reached(run_id, 2), 120), status_of(run_id)
        victim = job.node_names()[1]
        pid = json.loads((job.logs / "run.json").read_text())["nodes"][victim]["pid"]
        os.killpg(pid, signal.SIGKILL)
        assert wait_until(lambda: status_of(run_id)["state"] != "running", 30), status_of(run_id)
        st = status_of(run_id)
        assert st["state"] == "failed" and victim in st["cause"], st
        assert st["node_states"][victim]["state"] == "failed", st["node_states"]
        assert wait_until(lambda: not run_processes(lambda r: r.startswith(run_id)), 15)
        shown = mlaunch("status", run_id).stdout
        assert f"node {victim}" in shown and "failed" in shown, shown
    finally:
        for pid in run_processes(lambda r: r.startswith(run_id)):
            os.kill(pid, signal.SIGKILL)
        time.sleep(0)
