"""`launch.entrypoint` on the real Slurm cluster (tests/slurmd.py), 2 nodes × 2 ranks: every rank of
the user's script present with torchrun's values, a missing script refused on the submitting
machine before sbatch, and Ctrl-C cancelling the job with nothing left."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.dist.test_entrypoint_run import check_ranks, write_recorder
from tests.helpers import wait_gone, wait_until
from tests.slurm.test_run import finish, run_id_of, start


def entry_job(tmp_path: Path, slurm: Any, entrypoint: list[str], tag: str) -> tuple[Path, Path]:
    out = tmp_path / f"run-{tag}"
    data = {"name": f"ep-{tag}", "launch": {"nproc_per_node": 2, "entrypoint": entrypoint, "output_dir": str(out)},
            "cluster": {"slurm": {"nodes": 2, "partition": slurm.partition}, "python": sys.executable,
                        "env": {"OMP_NUM_THREADS": "1", "MY_SETTING": "from cluster.env"}}}
    path = tmp_path / f"ep-{tag}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path, out


def test_entrypoint_on_two_slurm_nodes(tmp_path: Path, slurm: Any) -> None:
    script = write_recorder(tmp_path)
    config, out = entry_job(tmp_path, slurm, [str(script), str(tmp_path / "ok"), "--k", "v"], "ok")
    code, stdout, stderr = finish(start(config, slurm))
    assert code == 0, stderr + stdout[-3000:]
    recs = check_ranks(tmp_path / "ok", 4, 2, run_id_of(out), ["--k", "v"])
    assert {rec["env"]["SLURMD_NODENAME"] for rec in recs} == set(slurm.nodes)
    assert all(rec["env"]["MY_SETTING"] == "from cluster.env" for rec in recs)
    assert str(script) in (out / "slurm" / f"{run_id_of(out)}.sbatch").read_text()

    # Missing where the job runs (the submit directory): one line, nothing submitted.
    config, out = entry_job(tmp_path, slurm, ["missing.py"], "missing")
    code, _, stderr = finish(start(config, slurm), timeout=60)
    assert code == 2 and stderr.strip().splitlines()[-1].startswith(
        "mlaunch: error: entrypoint script missing.py not found on 1 submitting machine (here: no such file)"), stderr
    assert not slurm.squeue_ids()

    # Ctrl-C while the ranks run: the job cancelled, no process left on either node.
    config, out = entry_job(tmp_path, slurm, [str(script), str(tmp_path / "held"), "--hold"], "held")
    proc = start(config, slurm)
    assert wait_until(lambda: len(list((tmp_path / "held").glob("rank?.json"))) == 4 or proc.poll() is not None, 120)
    assert proc.poll() is None, proc.communicate()
    run_id = json.loads((out / "logs" / "run.json").read_text())["run_id"]
    os.killpg(proc.pid, signal.SIGINT)
    code, _, stderr = finish(proc, timeout=60)
    assert code == 130, stderr
    assert not slurm.squeue_ids(), "the job is still queued"
    wait_gone(run_id, timeout=10)
