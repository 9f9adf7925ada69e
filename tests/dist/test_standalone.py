"""`mlaunch run CONFIG --standalone`: the real `train` under a real torchrun, and Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from launcher.procs import run_processes

ROOT = Path(__file__).resolve().parents[2]


def mlaunch(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MLAUNCH_DEBUG", None)
    return subprocess.Popen([sys.executable, "-m", "launcher.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_tiny_yaml_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = mlaunch("run", "configs/tiny.yaml", "--standalone", "--set", f"train.output_dir={out}")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if "loss" in x]
    assert train_lines and all({"step", "loss", "lr", "tokens_per_s"} <= set(x) for x in train_lines)
    assert train_lines[-1]["loss"] < train_lines[0]["loss"], "the tiny model learns"
    assert (out / "config.yaml").is_file() and (out / "logs" / "local.log").stat().st_size > 0
    assert (out / "export" / "config.json").is_file()
    assert "step" in stdout


def test_sigint_stops_everything_and_exits_130(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = mlaunch("run", "configs/tiny.yaml", "--standalone", "--set", f"train.output_dir={out}",
                   "--set", "train.max_steps=100000", "--set", "train.checkpoint.every_steps=100000")
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (metrics.exists() and metrics.read_text().strip()):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "training never logged a step"
        time.sleep(0.3)
    run_id = json.loads((out / "logs" / "run.json").read_text())["run_id"]
    assert len(run_processes(run_id)) >= 3, "torchrun and its 2 workers carry the run id"
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-3000:]
    assert time.monotonic() - t0 < 30
    assert "Traceback" not in stderr.split("stopping run")[0]
    assert run_processes(run_id) == [], "no process of the run is left"


def test_errors_print_even_from_filtered_ranks(tmp_path: Path) -> None:
    """`local_ranks_filter` hides rank 0's output, yet its error reaches the user: through
    torchrun's error-file summary and mlaunch's one-line cause."""
    out = tmp_path / "run"
    proc = mlaunch("run", "configs/tiny.yaml", "--standalone", "--set", f"train.output_dir={out}",
                   "--set", "launch.local_ranks_filter=[1]", "--set", "train.tokenizer.path=/nonexistent/tokenizer.model")
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode != 0
    assert "/nonexistent/tokenizer.model does not exist" in stdout  # torchrun's root-cause summary
    assert "run failed" in stderr and "/nonexistent/tokenizer.model does not exist" in stderr.splitlines()[-1]


def test_a_hung_rank_is_found_its_peers_stacks_kept_and_nothing_left(tmp_path: Path) -> None:
    """Standalone too: rank 1 SIGSTOPped mid-run, launch.hang_timeout_s 10 → exit 124 well within
    timeout + 15 s, rank 1 named, rank 0's stack (blocked in the step) saved, no process left."""
    from launcher.procs import run_workers

    out = tmp_path / "run"
    proc = mlaunch("run", "configs/tiny.yaml", "--standalone", "--set", f"train.output_dir={out}",
                   "--set", "train.max_steps=100000", "--set", "launch.hang_timeout_s=10")
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "training never logged a step"
        time.sleep(0.3)
    run_id = json.loads((out / "logs" / "run.json").read_text())["run_id"]
    rank1 = [p for p in run_workers(run_id) if b"RANK=1\0" in Path(f"/proc/{p}/environ").read_bytes()]
    assert rank1, "rank 1 not found"
    os.kill(rank1[0], signal.SIGSTOP)
    t0 = time.monotonic()
    _, stderr = proc.communicate(timeout=90)
    assert proc.returncode == 124 and time.monotonic() - t0 < 25, stderr[-3000:]
    hung = [line for line in stderr.splitlines() if "is hung" in line]
    assert hung and "rank 1 on node local" in hung[0] and "stopped reporting" in hung[0], stderr[-3000:]
    stack = (out / "logs" / "stacks" / "rank-00000.txt").read_text()
    assert "train/loop.py" in stack, stack[:2000]
    assert run_processes(run_id) == [], "no process of the run is left"
