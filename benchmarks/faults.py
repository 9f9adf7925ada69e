"""The fault matrix: how fast a 2-node SSH run is stopped, and how clean, for each kind of fault.

Two OpenSSH sshd "nodes" on loopback (tests/sshd.py), the tiny CPU job of tests/ssh (2 ranks per
node), started with `mlaunch run` as a user runs it; once training is under way (step 2), node 2
gets one fault:

  ctrl-c        SIGINT to mlaunch
  kill          SIGKILL to node 2's torchrun (its process group)
  drop          SIGKILL to node 2's sshd session processes (the connection drops)
  frozen        SIGSTOP to every process of node 2, its sshd included (resumed after mlaunch exits)
  hung          SIGSTOP to node 2's training processes only (launch.hang_timeout_s: 20)

Per kind and run: the time from the fault to mlaunch's exit, its exit code, whether the node was
named, and the processes of the run still alive 15 s after the exit (after the node is resumed).

    python benchmarks/faults.py [--runs 3] [--kinds ctrl-c,kill,drop,frozen,hung] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tests.sshd as sshd_nodes  # noqa: E402
from tests.helpers import process_tree, send_all, tiny_tokenizer, wait_until  # noqa: E402
from tests.ssh.test_multinode import ENDLESS, run_processes, write_job  # noqa: E402

KINDS = ["ctrl-c", "kill", "drop", "frozen", "hung"]



def one(kind: str, work: Path, cluster: sshd_nodes.SSHCluster, nodes: list, tokenizer: str) -> dict:
    job = write_job(work, cluster, nodes, tokenizer, tag=kind, max_steps=ENDLESS)
    if kind == "hung":
        data = yaml.safe_load(job.path.read_text())
        data["launch"]["hang_timeout_s"] = 20
        job.path.write_text(yaml.safe_dump(data, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k not in ("MLAUNCH_DEBUG", "MLAUNCH_RUN_ID")}
    err = work / f"{job.name}.stderr"
    with open(err, "wb") as e:
        proc = subprocess.Popen([sys.executable, "-m", "launcher.cli", "run", str(job.path)], cwd=ROOT, env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=e, start_new_session=True)
    info_path, metrics = job.logs / "run.json", job.out / "metrics.jsonl"

    def ready() -> bool:
        try:
            info = json.loads(info_path.read_text())
            steps = [json.loads(x).get("step", 0) for x in metrics.read_text().splitlines() if x]
            return all(n.get("pid") for n in info["nodes"].values()) and max(steps, default=0) >= 2
        except (OSError, ValueError):
            return False

    assert wait_until(lambda: ready() or proc.poll() is not None, 180, 0.2) and ready(), err.read_text()
    info = json.loads(info_path.read_text())
    victim = job.node_names()[1]
    torchrun = info["nodes"][victim]["pid"]
    stopped: list[psutil.Process] = []
    t0 = time.monotonic()
    if kind == "ctrl-c":
        proc.send_signal(signal.SIGINT)
    elif kind == "kill":
        os.killpg(torchrun, signal.SIGKILL)
    elif kind == "drop":
        send_all([p for p in nodes[1].sshd_children() if p.ppid() == nodes[1].pid], signal.SIGKILL)
    elif kind == "frozen":
        stopped = process_tree(nodes[1].pid)
        send_all(stopped, signal.SIGSTOP)
    elif kind == "hung":
        stopped = [p for p in process_tree(torchrun)[1:] if "LOCAL_RANK" in p.environ()]
        send_all(stopped, signal.SIGSTOP)
    try:
        code = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        code = None
    took = time.monotonic() - t0
    send_all(stopped, signal.SIGCONT)
    run_id = info["run_id"]
    wait_until(lambda: not run_processes(lambda r: r == run_id), 15, 0.2)
    left = run_processes(lambda r: r == run_id)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    text = err.read_text(errors="replace")
    named = kind == "ctrl-c" or f"node {victim}" in text or f"on node {victim}" in text
    return {"kind": kind, "seconds": round(took, 2), "exit": code, "named": named, "left": len(left)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mlaunch-faults-"))
    (root / "sshd").mkdir()
    cluster = sshd_nodes.SSHCluster(root / "sshd")
    try:
        nodes = [cluster.nodes(1)[0], cluster.spawn()]  # node 2 is frozen and thawed: keep it private
        tokenizer = str(tiny_tokenizer(root))
        rows = []
        for r in range(args.runs):
            for kind in args.kinds.split(","):
                work = root / f"{kind}-{r}"
                work.mkdir()
                row = one(kind, work, cluster, nodes, tokenizer)
                print(json.dumps(row), flush=True)
                rows.append(row)
        lines = ["| fault | runs | fault → stopped, median | worst | exit codes | node named | processes left |",
                 "|---|---|---|---|---|---|---|"]
        for kind in args.kinds.split(","):
            mine = [x for x in rows if x["kind"] == kind]
            secs = [x["seconds"] for x in mine]
            lines.append(f"| {kind} | {len(mine)} | {statistics.median(secs):.1f} s | {max(secs):.1f} s | "
                         f"{sorted({x['exit'] for x in mine}, key=str)} | {sum(x['named'] for x in mine)}/{len(mine)} | "
                         f"{sum(x['left'] for x in mine)} |")
        text = "\n".join(lines)
        print(text)
        if args.out:
            args.out.write_text(text + "\n")
    finally:
        cluster.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
