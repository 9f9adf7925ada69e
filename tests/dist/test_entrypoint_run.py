"""`launch.entrypoint` under a real torchrun through `mlaunch run` on this machine: every rank runs
the user's script with torchrun's environment; a missing script is one line before anything starts,
a failing one names its node and exit code, and Ctrl-C leaves no process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from launcher.procs import run_processes
from tests.helpers import wait_until

ROOT = Path(__file__).resolve().parents[2]

#: The test's entrypoint: records what each rank was given, then holds or fails when asked to.
RECORDER = '''
import json, os, sys, time
out = sys.argv[1]
os.makedirs(out, exist_ok=True)
rank = os.environ["RANK"]
with open(os.path.join(out, f"rank{rank}.json.tmp"), "w") as f:
    json.dump({"argv": sys.argv[1:], "cwd": os.getcwd(), "env": dict(os.environ)}, f)
os.replace(os.path.join(out, f"rank{rank}.json.tmp"), os.path.join(out, f"rank{rank}.json"))
if "--hold" in sys.argv:
    time.sleep(600)
if "--fail-rank" in sys.argv and rank == sys.argv[sys.argv.index("--fail-rank") + 1]:
    print(f"rank {rank} fails on purpose", flush=True)
    sys.exit(7)
'''

TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
                 "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def write_recorder(folder: Path) -> Path:
    script = folder / "record_env.py"
    script.write_text(RECORDER)
    return script


def check_ranks(out: Path, world: int, per_node: int, run_id: str, argv_tail: list[str]) -> list[dict]:
    """Every rank present once, torchrun's values right, the run id and the arguments passed through."""
    recs = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    assert sorted(p.name for p in out.glob("rank*.json")) == [f"rank{r}.json" for r in range(world)]
    for r, rec in enumerate(recs):
        env = rec["env"]
        assert all(k in env for k in TORCHRUN_VARS), sorted(env)
        assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"]) == (str(r), str(world), str(per_node))
        assert env["LOCAL_RANK"] == str(r % per_node) and env["GROUP_RANK"] == str(r // per_node)
        assert env["MLAUNCH_RUN_ID"] == run_id and rec["argv"][1:] == argv_tail
    assert len({rec["env"]["MASTER_ADDR"] + rec["env"]["MASTER_PORT"] for rec in recs}) == 1
    return recs


def mlaunch(*args: str, cwd: Path = ROOT) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MLAUNCH_DEBUG", None)
    return subprocess.Popen([sys.executable, "-m", "launcher.cli", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_entrypoint_standalone_env_failure_missing_and_ctrl_c(tmp_path: Path) -> None:
    script = write_recorder(tmp_path)
    cfg = tmp_path / "mine.yaml"
    cfg.write_text(f"launch:\n  nproc_per_node: 2\n  entrypoint: \"{script} {tmp_path}/ok --tag 'a b'\"\n"
                   f"  output_dir: {tmp_path}/run\n")
    proc = mlaunch("run", str(cfg))
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    run_id = json.loads((tmp_path / "run" / "logs" / "run.json").read_text())["run_id"]
    check_ranks(tmp_path / "ok", 2, 2, run_id, ["--tag", "a b"])
    assert (tmp_path / "run" / "config.yaml").is_file()  # the resolved config, written down as for train

    # A script that fails: the run fails with the script's own exit code (torchrun reports 1), and
    # the node's log holds torchrun's root cause with the script's exit code and rank.
    proc = mlaunch("run", str(cfg), "--set", f"launch.entrypoint=[{script}, {tmp_path}/bad, --fail-rank, '1']",
                   "--set", f"launch.output_dir={tmp_path}/bad-run")
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 7 and "run failed" in stderr, stderr[-3000:]
    log = (tmp_path / "bad-run" / "logs" / "local.log").read_text()
    assert "rank 1 fails on purpose" in log and "exitcode: 7" in log and "local_rank: 1" in log, log[-3000:]

    # A script that does not exist: one line, exit 2, nothing started (no run directory made).
    proc = mlaunch("run", str(cfg), "--set", "launch.entrypoint=no/such/script.py --x",
                   "--set", f"launch.output_dir={tmp_path}/never")
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 2 and stderr.strip().splitlines() == [
        f"mlaunch: error: entrypoint script no/such/script.py: no such file (looked in {ROOT}); fix launch.entrypoint "
        "(or the words after `--`), relative to the directory the job runs in"], stderr
    assert not (tmp_path / "never" / "logs").exists()

    # Ctrl-C while the ranks run: exit 130, no process of the run left.
    proc = mlaunch("run", str(cfg), "--set", f"launch.entrypoint=[{script}, {tmp_path}/held, --hold]",
                   "--set", f"launch.output_dir={tmp_path}/held-run")
    assert wait_until(lambda: len(list((tmp_path / "held").glob("rank?.json"))) == 2 or proc.poll() is not None, 90)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    run_id = json.loads((tmp_path / "held-run" / "logs" / "run.json").read_text())["run_id"]
    assert len(run_processes(run_id)) >= 3, "torchrun and its 2 workers carry the run id"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-3000:]
    assert wait_until(lambda: run_processes(run_id) == [], 10), run_processes(run_id)
