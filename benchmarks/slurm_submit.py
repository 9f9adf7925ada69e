"""Submission to first optimizer step on Slurm: `mlaunch run` beside a hand-written sbatch script.

Starts the test suite's local 2-node Slurm cluster (tests/slurmd.py: munged + slurmctld + one
slurmd per node), then, interleaved round by round so that load from elsewhere hits both columns
alike, times from the moment the command starts to the first `step 1/` line in a node's log:

  (a) `mlaunch run JOB.yaml` — a subprocess, as a user runs it: config, plan, sbatch, following;
  (b) `sbatch hand.sbatch` — what one writes by hand for the same job: `srun` one task per node,
      `torchrun` with a c10d rendezvous on the first node, `python -m train` on the config
      mlaunch resolved (same model, data, world of 2 nodes × 2 CPU ranks).

Both run the same training to completion (a few steps); only the time to the first step is taken.

    python benchmarks/slurm_submit.py [--repeat 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tests.slurmd as slurmd  # noqa: E402  (the test suite's Slurm cluster)
from tests.helpers import write_job  # noqa: E402

STEP1 = re.compile(r"^step 1/", re.M)

HAND = """#!/bin/bash
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --output={out}/slurm-%j.out
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
addr=$(scontrol show node "$head" | sed -n 's/.*NodeAddr=\\([^ ]*\\).*/\\1/p')
srun bash -c 'exec >>{out}/$SLURMD_NODENAME.log 2>&1; OMP_NUM_THREADS=1 {python} -m torch.distributed.run \\
  --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint '"$addr"':$((29400 + SLURM_JOB_ID % 1000)) \\
  --rdzv-id $SLURM_JOB_ID --rdzv-conf is_host=$(( SLURM_NODEID == 0 )) --local-addr '"$addr"' \\
  -m train {config}'
"""


def first_step_s(logs: list[Path], t0: float, timeout: float = 300) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for log in logs:
            if log.exists() and STEP1.search(log.read_text(errors="replace")):
                return time.monotonic() - t0
        time.sleep(0.05)
    raise TimeoutError(f"no `step 1/` in {logs} after {timeout}s")


def mlaunch_once(cluster: slurmd.SlurmCluster, config: Path, out: Path) -> float:
    subprocess.run(["rm", "-rf", str(out)], check=True)
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "launcher.cli", "run", str(config)], cwd=config.parent,
                            env=cluster.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    took = first_step_s([out / "logs" / f"{n}.log" for n in cluster.nodes], t0)
    assert proc.wait(timeout=300) == 0, "mlaunch run failed"
    return took


def hand_once(cluster: slurmd.SlurmCluster, script: Path, out: Path, config_out: Path) -> float:
    subprocess.run(["rm", "-rf", str(out), str(config_out)], check=True)
    out.mkdir(parents=True)
    t0 = time.monotonic()
    job = cluster.sbatch(script)
    took = first_step_s([out / f"{n}.log" for n in cluster.nodes], t0)
    cluster.wait_state(job, "COMPLETED", "FAILED", timeout=300)
    assert cluster.job_state(job) == "COMPLETED", (out / f"slurm-{job}.out").read_text()
    return took


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mlaunch-slurm-bench-"))
    cluster = slurmd.start_cluster()
    try:
        config = write_job(work / "m", max_steps=3)
        data = yaml.safe_load(config.read_text())
        data["cluster"] = {"slurm": {"nodes": 2}, "python": sys.executable, "env": {"OMP_NUM_THREADS": "1"}}
        data["launch"] = {"nproc_per_node": 2}
        config.write_text(yaml.safe_dump(data, sort_keys=False))
        m_out = work / "m" / "run"
        mlaunch_once(cluster, config, m_out)  # warm: tokenizer trained, data cache built, page cache hot
        # The hand-written job trains on the config mlaunch resolved, into its own output folder.
        resolved = yaml.safe_load((m_out / "config.yaml").read_text())
        h_out = work / "h" / "run"
        resolved["train"]["output_dir"] = str(h_out)
        h_config = work / "h" / "config.yaml"
        h_config.parent.mkdir(parents=True, exist_ok=True)
        h_config.write_text(yaml.safe_dump(resolved, sort_keys=False))
        h_logs = work / "h" / "logs"
        script = work / "h" / "hand.sbatch"
        script.write_text(HAND.format(out=h_logs, python=sys.executable, config=h_config))
        hand_once(cluster, script, h_logs, h_out)
        rows: dict[str, list[float]] = {"mlaunch run": [], "hand-written sbatch": []}
        for _ in range(args.repeat):
            rows["mlaunch run"].append(mlaunch_once(cluster, config, m_out))
            rows["hand-written sbatch"].append(hand_once(cluster, script, h_logs, h_out))
        med = {k: statistics.median(v) for k, v in rows.items()}
        ratio = med["mlaunch run"] / med["hand-written sbatch"]
        lines = ["| path | submission → first step (median) | min | max | runs |", "|---|---|---|---|---|"]
        for k, v in rows.items():
            lines.append(f"| {k} | {med[k]:.2f} s | {min(v):.2f} s | {max(v):.2f} s | {len(v)} |")
        lines.append(f"\nratio mlaunch / hand-written: **{ratio:.2f}×** (target ≤ 1.2×); "
                     f"cluster proctrack {cluster.proctrack}")
        text = "\n".join(lines)
        print(text)
        print(json.dumps({"runs": rows, "median": med, "ratio": ratio}))
        if args.out:
            args.out.write_text(text + "\n")
    finally:
        cluster.close()


if __name__ == "__main__":
    main()
