"""`launch.entrypoint` on 2 real sshd "nodes": every rank of a user's script gets torchrun's
environment plus `cluster.env` and the run id, and nothing else from the launching shell; a
script missing on the nodes is one line naming them, before anything starts; Ctrl-C leaves no
process on any node."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import yaml

from tests.dist.test_entrypoint_run import check_ranks, write_recorder
from tests.helpers import wait_until
from tests.ssh.test_multinode import cmdline, free_port, run_processes

ROOT = Path(__file__).resolve().parents[2]


def write_job(tmp_path: Path, ssh_cluster, nodes, entrypoint: list[str], tag: str) -> tuple[Path, str, Path]:
    name = f"ep-{tag}-{uuid.uuid4().hex[:6]}"
    out = tmp_path / f"out-{tag}"
    job = {
        "name": name,
        "launch": {"nproc_per_node": 2, "rdzv": {"port": free_port(nodes[0].host)}, "grace_period_s": 5,
                   "entrypoint": entrypoint, "output_dir": str(out)},
        "cluster": {
            "nodes": [{"host": n.host, "port": n.port} for n in nodes],
            "ssh": {"identity_file": ssh_cluster.identity_file, "known_hosts": ssh_cluster.known_hosts,
                    "config_file": ssh_cluster.empty_ssh_config, "connect_timeout_s": 5},
            "workdir": str(ROOT), "python": sys.executable,
            "env": {"OMP_NUM_THREADS": "1", "MY_SETTING": "from cluster.env"},
        },
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path, name, out


def start(path: Path, tmp_path: Path) -> subprocess.Popen:
    env = {**os.environ, "MLAUNCH_TEST_LEAK": "not for the nodes"}  # matches no env_passthrough pattern
    env.pop("MLAUNCH_DEBUG", None)
    env.pop("MLAUNCH_RUN_ID", None)
    return subprocess.Popen([sys.executable, "-m", "launcher.cli", "run", str(path)], cwd=ROOT, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def test_entrypoint_on_two_ssh_nodes(tmp_path: Path, ssh_cluster) -> None:
    nodes = ssh_cluster(2)
    script = write_recorder(tmp_path)
    path, name, out = write_job(tmp_path, ssh_cluster, nodes, [str(script), str(tmp_path / "ok"), "--k", "v w"], "ok")
    proc = start(path, tmp_path)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-4000:]
    run_id = json.loads((out / "logs" / "run.json").read_text())["run_id"]
    recs = check_ranks(tmp_path / "ok", 4, 2, run_id, ["--k", "v w"])
    for rec in recs:
        assert rec["cwd"] == str(ROOT) and rec["env"]["MY_SETTING"] == "from cluster.env"
        assert "MLAUNCH_TEST_LEAK" not in rec["env"], "nothing implicit from the launching shell"
    assert {rec["env"]["MASTER_ADDR"] for rec in recs} <= {n.host for n in nodes}
    assert {f"{n.host}.log" for n in nodes} <= {p.name for p in (out / "logs").iterdir()}

    # Missing on the nodes (relative to their workdir): one line naming both, exit 2, nothing started.
    path, name, out = write_job(tmp_path, ssh_cluster, nodes, ["no_such_dir/train.py"], "missing")
    proc = start(path, tmp_path)
    _, stderr = proc.communicate(timeout=60)
    lines = [line for line in stderr.strip().splitlines() if not line.startswith("[mlaunch] run ")]
    assert proc.returncode == 2 and len(lines) == 1, stderr
    assert lines[0].startswith("mlaunch: error: entrypoint script no_such_dir/train.py not found on 2 node(s) (")
    assert all(f"{n.host}: no such file" in lines[0] for n in nodes), lines[0]
    assert run_processes(lambda r: r.startswith(name)) == {}

    # Ctrl-C while every rank runs: exit 130, no process of the run on any node.
    path, name, out = write_job(tmp_path, ssh_cluster, nodes, [str(script), str(tmp_path / "held"), "--hold"], "held")
    proc = start(path, tmp_path)
    try:
        assert wait_until(lambda: len(list((tmp_path / "held").glob("rank?.json"))) == 4 or proc.poll() is not None, 90)
        assert proc.poll() is None, proc.communicate()[1][-4000:]
        run_id = json.loads((out / "logs" / "run.json").read_text())["run_id"]
        assert len(run_processes(lambda r: r == run_id)) >= 6, "torchrun + 2 workers on each node"
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 130, stderr[-4000:]
        left = run_processes(lambda r: r == run_id)
        assert wait_until(lambda: not run_processes(lambda r: r == run_id), 10), [cmdline(p) for p in left]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in run_processes(lambda r: r.startswith(name)):
            os.kill(pid, signal.SIGKILL)
