"""`mlaunch status` with 100 runs in the registry: median wall time of the installed console
script, and `python -X importtime` evidence that it imports neither torch nor paramiko.

The registry is a temporary `MLAUNCH_HOME` holding 100 entries like a busy user's: 90 finished,
5 running (this process stands in for their live supervisor), 5 whose supervisor died (found
`lost` on the first call, as recorded from then on).

    .venv/bin/python benchmarks/status.py [--runs 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def fill(n: int) -> None:
    from launcher.registry import Entry, process_start

    me = {"pid": os.getpid(), "start": process_start(os.getpid()), "host": os.uname().nodename}
    for i in range(n):
        state = "running" if i < 5 else "lost-to-be" if i < 10 else "done"
        e = Entry(run_id=f"job{i:03d}-20261202-0000{i % 60:02d}-{i:06x}", name=f"job{i:03d}", backend="ssh",
                  output_dir=f"/scratch/runs/job{i:03d}", config="job.yaml", nodes=["gpu-1", "gpu-2"],
                  state="running" if state != "done" else "done", started=time.time() - 3600 * i,
                  supervisor=me if state == "running" else {"pid": 999_999, "start": 1.0, "host": me["host"]},
                  node_states={"gpu-1": {"state": "running"}, "gpu-2": {"state": "running"}},
                  progress={"step": 100 + i, "total_steps": 1000, "loss": 2.0 - i / 100, "eta_at": time.time() + 600},
                  summary=[f"final eval loss {1.5:.4f}"] * 6, exit_code=0 if state == "done" else None)
        e.save()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as home:
        os.environ["MLAUNCH_HOME"] = home
        fill(100)
        exe = str(Path(sys.executable).with_name("mlaunch"))
        times = []
        for _ in range(args.runs):
            t = time.perf_counter()
            res = subprocess.run([exe, "status"], capture_output=True, text=True, check=True)
            times.append(time.perf_counter() - t)
        assert len(res.stdout.splitlines()) == 101 and res.stdout.count("lost (supervisor died)") == 5, res.stdout
        imp = subprocess.run([sys.executable, "-X", "importtime", "-m", "launcher.cli", "status"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stderr
        top = {line.split("|")[-1].strip() for line in imp.splitlines()
               if line.startswith("import time:") and not line.split("|")[-1].startswith("  ")}
        print(f"mlaunch status, 100 runs: median {statistics.median(times):.3f} s over {args.runs} "
              f"(min {min(times):.3f}, max {max(times):.3f}); imports torch: {'torch' in top}, "
              f"paramiko: {'paramiko' in top}")


if __name__ == "__main__":
    main()
