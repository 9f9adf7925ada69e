"""Start-up cost of the launcher: `mlaunch --help` and `mlaunch plan configs/baichuan13b.yaml`.

Median wall time over N runs of the installed console script, plus `python -X importtime`
evidence that neither torch nor paramiko is imported on these paths.

    .venv/bin/python benchmarks/cli_startup.py [--runs 7]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(argv: list[str], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        out.append(time.perf_counter() - t)
    return out


def heavy_imports(args: list[str]) -> dict[str, object]:
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "launcher.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    modules = [line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    top = [m for m in modules if not m.startswith(" ")]
    cumulative = sum(int(line.split("|")[1]) for line in proc.stderr.splitlines()
                     if line.startswith("import time:") and not line.split("|")[-1].startswith("  ") and line.split("|")[1].strip().isdigit())
    return {"torch": "torch" in top, "paramiko": "paramiko" in top, "modules": len(modules), "import_us": cumulative}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    exe = shutil.which("mlaunch", path=str(Path(sys.executable).parent)) or "mlaunch"
    cases = {"mlaunch --help": [exe, "--help"], "mlaunch plan configs/baichuan13b.yaml": [exe, "plan", "configs/baichuan13b.yaml"]}
    results = {}
    for name, argv in cases.items():
        times = timed(argv, args.runs)
        results[name] = {"median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3), "runs": args.runs,
                         "imports": heavy_imports(argv[1:])}
        r = results[name]
        print(f"{name:45s} median {r['median_s']:.3f}s  min {r['min_s']:.3f}s  torch imported: {r['imports']['torch']}  "
              f"paramiko imported: {r['imports']['paramiko']}  ({r['imports']['modules']} modules)")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
