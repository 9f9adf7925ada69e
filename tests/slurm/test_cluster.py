"""The Slurm test cluster itself (tests/slurmd.py), against the real scheduler: its nodes, a
two-node job, a requeue round trip, and a job too big for the partition.

What these pin down is what the Slurm backend's tests rely on; the pitfalls are in
tests/slurmd.py's docstring and DESIGN.md ("Slurm on one machine").
"""

from __future__ import annotations

from pathlib import Path

from tests.helpers import wait_until
from tests.slurmd import SlurmCluster


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_every_node_is_idle_in_the_default_partition(slurm: SlurmCluster) -> None:
    assert slurm.nodes == ["node1", "node2"]
    out = slurm.run("sinfo", "-h", "-N", "-o", "%N %P %T").stdout
    assert sorted(out.split("\n")[:-1]) == ["node1 debug* idle", "node2 debug* idle"]
    # The nodes' address is the one a job must use (every node's `hostname` is this machine's).
    assert "NodeAddr=127.0.0.1" in slurm.run("scontrol", "show", "node", "node2").stdout


def test_a_two_node_job_runs_one_task_on_each_node(slurm: SlurmCluster, tmp_path: Path) -> None:
    # Single quotes inside: with double quotes the batch shell (on node1) would expand the
    # variables itself and both tasks would print "node1 0".
    job = slurm.sbatch(
        "-N2", "--ntasks-per-node=1", f"--output={tmp_path}/job-%j.out",
        "--wrap", "srun bash -c 'echo $SLURMD_NODENAME $SLURM_NODEID'",
    )  # fmt: skip
    assert slurm.wait_state(job, "COMPLETED", "FAILED", "CANCELLED", timeout=20) == "COMPLETED"
    out = (tmp_path / f"job-{job}.out").read_text()
    assert sorted(out.splitlines()) == ["node1 0", "node2 1"]
    assert slurm.job_info(job)["NodeList"] == "node[1-2]"


def test_a_requeued_job_runs_again_once_released(slurm: SlurmCluster, tmp_path: Path) -> None:
    runs = tmp_path / "runs.txt"
    job = slurm.sbatch(
        "--requeue", "-N1", f"--output={tmp_path}/job-%j.out",
        "--wrap", f"echo restart=${{SLURM_RESTART_COUNT-unset}} >> {runs}; exec sleep 300",
    )  # fmt: skip
    slurm.wait_state(job, "RUNNING", timeout=15)
    assert wait_until(lambda: len(_lines(runs)) == 1, timeout=10), _lines(runs)

    slurm.run("scontrol", "requeue", job)
    slurm.wait_state(job, "PENDING", timeout=15)
    info = slurm.job_info(job)
    assert (info["Reason"], info["Restarts"]) == ("BeginTime", "1")  # ~120 s away: release it

    slurm.release(job)
    slurm.wait_state(job, "RUNNING", timeout=15)
    assert wait_until(lambda: len(_lines(runs)) == 2, timeout=10), _lines(runs)
    assert _lines(runs) == ["restart=unset", "restart=1"]


def test_a_job_wider_than_the_partition_is_accepted_and_pends(slurm: SlurmCluster) -> None:
    job = slurm.sbatch("-N3", "--wrap", "true")  # no EnforcePartLimits: sbatch does not refuse it
    assert wait_until(lambda: slurm.job_info(job)["Reason"] == "PartitionNodeLimit", timeout=10), slurm.job_info(job)
    assert slurm.job_state(job) == "PENDING"
    slurm.run("scancel", job)
    assert slurm.wait_state(job, "CANCELLED", timeout=10) == "CANCELLED"
    assert slurm.squeue_ids() == []
