"""`mlaunch run` on a real Slurm cluster (tests/slurmd.py: munged + slurmctld + a slurmd per node):
the tiny job end to end on 2 nodes × 2 CPU ranks, Ctrl-C, a killed rank, a requeue that resumes
bit for bit, a job that can never start, and `mlaunch nodes check`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from launcher.procs import run_processes
from tests.helpers import read_metrics, wait_gone, write_job

MLAUNCH = [sys.executable, "-m", "launcher.cli"]


def slurm_job(tmp_path: Path, slurm: Any, name: str = "job", nodes: int = 2, **train: Any) -> Path:
    """The tiny CPU job of tests/helpers.py, on `nodes` Slurm nodes × 2 ranks."""
    path = write_job(tmp_path, name, **train)
    data = yaml.safe_load(path.read_text())
    data["cluster"] = {"slurm": {"nodes": nodes, "partition": slurm.partition}, "python": sys.executable,
                       "env": {"OMP_NUM_THREADS": "1"}}
    data["launch"] = {"nproc_per_node": 2}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def start(config: Path, slurm: Any, *args: str) -> subprocess.Popen:
    return subprocess.Popen([*MLAUNCH, "run", str(config), *args], cwd=config.parent, env=slurm.env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 180) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        raise AssertionError(f"mlaunch did not finish in {timeout}s\nstdout:\n{out[-3000:]}\nstderr:\n{err}") from None
    return proc.returncode, out, err


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)


def node_log(out: Path, node: str) -> str:
    path = out / "logs" / f"{node}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def steps_done(out: Path) -> int:
    path = out / "metrics.jsonl"
    if not path.exists():
        return 0
    return max([r["step"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r], default=0)


def start_training(tmp_path: Path, slurm: Any, steps: int = 2) -> tuple[subprocess.Popen, Path, str]:
    """A long job started and past its first `steps` steps: (mlaunch's process, output dir, run id)."""
    proc = start(slurm_job(tmp_path, slurm, max_steps=2000), slurm)
    out = tmp_path / "run"
    wait_for(lambda: steps_done(out) >= steps or proc.poll() is not None, 120, "training steps")
    assert proc.poll() is None, proc.communicate()
    return proc, out, run_id_of(out)


def run_id_of(out: Path) -> str:
    return json.loads((out / "logs" / "run.json").read_text())["run_id"]


def job_id_of(out: Path) -> str:
    return json.loads((out / "logs" / "run.json").read_text())["slurm"]["job_id"]


def test_two_slurm_nodes_train_end_to_end(tmp_path: Path, slurm: Any) -> None:
    config = slurm_job(tmp_path, slurm, max_steps=6)
    out = tmp_path / "run"
    code, stdout, stderr = finish(start(config, slurm))
    assert code == 0, stderr + stdout[-3000:]
    assert "submitted batch job" in stderr and "finished on all 2 node(s)" in stderr
    assert [r["step"] for r in read_metrics(out)][-1] == 6
    # Only rank 0 prints steps, and c10d puts it on either node: one of them is in the stream.
    assert any(line.startswith(tuple(f"{n} | step" for n in slurm.nodes)) for line in stdout.splitlines()), stdout[-2000:]
    for node in slurm.nodes:
        assert "MLAUNCH_EXIT=0 " in node_log(out, node)  # each node's own log, under <output_dir>/logs/
    assert "MLAUNCH_EXIT" not in stdout  # markers stay in the logs
    record = json.loads((out / "logs" / "run.json").read_text())
    assert record["backend"] == "slurm" and set(record["nodes"]) == set(slurm.nodes)
    assert (out / "slurm" / f"{record['run_id']}.sbatch").read_text().startswith("#!/bin/bash")
    assert not slurm.squeue_ids()


def test_ctrl_c_cancels_the_job_and_leaves_nothing(tmp_path: Path, slurm: Any) -> None:
    proc, out, run_id = start_training(tmp_path, slurm)
    assert run_processes(run_id), "the job's processes are not visible"
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    code, _, stderr = finish(proc, timeout=60)
    assert code == 130, stderr
    assert time.monotonic() - t0 < 20
    assert not slurm.squeue_ids(), "the job is still queued"
    wait_gone(run_id, timeout=10)  # Slurm ended every process of the job on both nodes


def test_a_killed_rank_fails_the_run_fast_and_names_its_node(tmp_path: Path, slurm: Any) -> None:
    proc, out, run_id = start_training(tmp_path, slurm)
    import psutil

    ranks = [p for p in map(psutil.Process, run_processes(run_id)) if "-m train" in " ".join(p.cmdline())
             and "torch.distributed.run" not in " ".join(p.cmdline())]
    victim = ranks[0]
    node = victim.environ()["SLURMD_NODENAME"]
    t0 = time.monotonic()
    victim.kill()
    code, _, stderr = finish(proc, timeout=60)
    assert code != 0 and time.monotonic() - t0 < 15, stderr
    assert f"run failed on node {node} " in stderr, stderr
    assert not slurm.squeue_ids()
    wait_gone(run_id, timeout=10)


def test_a_job_that_can_never_start_is_cancelled_in_one_line(tmp_path: Path, slurm: Any) -> None:
    config = slurm_job(tmp_path, slurm, nodes=len(slurm.nodes) + 1)
    t0 = time.monotonic()
    code, _, stderr = finish(start(config, slurm), timeout=60)
    assert code != 0 and time.monotonic() - t0 < 15
    failed = [line for line in stderr.splitlines() if "cannot start" in line]
    assert len(failed) == 1 and "cluster.slurm.nodes" in failed[0] and "cancelled" in failed[0], stderr
    assert "Traceback" not in stderr
    assert not slurm.squeue_ids(), "a job that cannot start is left queued"


def test_sbatch_rejecting_the_job_is_one_line_exit_2(tmp_path: Path, slurm: Any) -> None:
    config = slurm_job(tmp_path, slurm)
    code, _, stderr = finish(start(config, slurm, "--set", "cluster.slurm.partition=nosuchpart"), timeout=60)
    assert code == 2
    assert stderr.strip().splitlines()[-1].startswith("mlaunch: error: sbatch rejected the job: invalid partition"), stderr
    assert not slurm.squeue_ids()


def _export(out: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    files = sorted((out / "export").glob("*.safetensors"))
    assert files, f"no export in {out}"
    return {k: v for f in files for k, v in load_file(f).items()}


def test_warning_signal_and_requeue_resume_bit_identically(tmp_path: Path, slurm: Any) -> None:
    """The warning signal (as before a time limit or preemption) checkpoints and requeues; an
    administrator's `scontrol requeue` kills the job mid-run; both times it resumes, and its final
    weights equal an uninterrupted run's, bit for bit."""
    steps = dict(max_steps=30, checkpoint={"every_steps": 8, "export_dtype": "float32"})
    ref = slurm_job(tmp_path / "ref", slurm, **steps)
    code, _, stderr = finish(start(ref, slurm))
    assert code == 0, stderr

    config = slurm_job(tmp_path / "pre", slurm, **steps)
    out = tmp_path / "pre" / "run"
    proc = start(config, slurm)
    wait_for(lambda: steps_done(out) >= 3 or proc.poll() is not None, 120, "first steps")
    job = job_id_of(out)
    slurm.run("scancel", "--batch", "--signal=USR1", job)  # what --signal=B:USR1@N delivers
    wait_for(lambda: slurm.job_info(job).get("Restarts") == "1" and slurm.job_state(job) == "PENDING", 60, "the requeue")
    slurm.release(job)
    wait_for(lambda: "resumed from" in node_log(out, slurm.nodes[0]) + node_log(out, slurm.nodes[1]), 120, "the resume")
    first_resume = steps_done(out)
    wait_for(lambda: steps_done(out) >= min(first_resume + 12, 26) or proc.poll() is not None, 120, "more steps")
    slurm.run("scontrol", "requeue", job)  # the administrator's requeue: the job is killed mid-step
    wait_for(lambda: slurm.job_info(job).get("Restarts") == "2" and slurm.job_state(job) == "PENDING", 60, "the 2nd requeue")
    slurm.release(job)
    code, _, stderr = finish(proc)
    assert code == 0, stderr
    assert stderr.count("requeued (restart") == 2, stderr
    batch = (out / "slurm" / f"slurm-{job}.out").read_text()
    assert "(restart 0)" in batch and "(restart 1)" in batch and "(restart 2)" in batch  # one log, appended
    assert "checkpointed at step" in node_log(out, slurm.nodes[0]) + node_log(out, slurm.nodes[1])

    got, want = _export(out), _export(tmp_path / "ref" / "run")
    assert got.keys() == want.keys()
    different = [k for k in want if not bool((got[k] == want[k]).all())]
    assert not different, f"weights differ after requeues: {different[:5]}"


def test_nodes_check_reports_the_partition_and_runs_an_all_reduce(tmp_path: Path, slurm: Any) -> None:
    config = slurm_job(tmp_path, slurm)
    res = subprocess.run([*MLAUNCH, "nodes", "check", str(config), "--json", "--collective"], cwd=tmp_path,
                         env=slurm.env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads(res.stdout)
    assert report["ok"] and set(slurm.nodes) <= set(report["nodes"])
    part = report["nodes"][f"partition {slurm.partition}"]
    checks = {c["name"]: c for c in part["checks"]}
    assert checks["partition"]["ok"] and checks["nodes"]["ok"] and "ALLREDUCE_OK world=2" in checks["collective"]["detail"]

    res = subprocess.run([*MLAUNCH, "nodes", "check", str(config), "--json", "--set", "cluster.slurm.nodes=3"],
                         cwd=tmp_path, env=slurm.env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    nodes = {c["name"]: c for c in json.loads(res.stdout)["nodes"][f"partition {slurm.partition}"]["checks"]}["nodes"]
    assert not nodes["ok"] and "3 asked" in nodes["detail"]


def test_inside_an_allocation_the_job_is_one_step(tmp_path: Path, slurm: Any) -> None:
    config = slurm_job(tmp_path, slurm, max_steps=3)
    res = subprocess.run(["salloc", "-N", "2", *MLAUNCH, "run", str(config)],
                         cwd=tmp_path, env=slurm.env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr
    assert "inside allocation" in res.stderr and "submitted batch job" not in res.stderr
    assert [r["step"] for r in read_metrics(tmp_path / "run")][-1] == 3


def test_through_a_login_node_over_ssh(tmp_path: Path, slurm: Any, ssh_cluster: Any) -> None:
    """mlaunch on a "laptop" that has no Slurm configuration: sbatch, scontrol and the logs go
    through SSH to a login node (an sshd node here) whose `cluster.setup` points at the cluster."""
    login = ssh_cluster(1)[0]
    laptop, remote = tmp_path / "laptop", tmp_path / "login"
    config = slurm_job(laptop, slurm, max_steps=3, output_dir="run")  # relative: on the login node's workdir
    data = yaml.safe_load(config.read_text())
    data["cluster"]["slurm"]["login"] = f"{login.host}:{login.port}"
    data["cluster"]["ssh"] = {"identity_file": ssh_cluster.identity_file, "known_hosts": ssh_cluster.known_hosts,
                              "config_file": ssh_cluster.empty_ssh_config}
    data["cluster"]["workdir"] = str(remote)
    data["cluster"]["setup"] = f"export SLURM_CONF={slurm.conf}"
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    env = {k: v for k, v in slurm.env.items() if k != "SLURM_CONF"}  # a Slurm command run here would fail
    res = subprocess.run([*MLAUNCH, "run", str(config)], cwd=laptop, env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr
    assert f"on the login node {login.host}:{login.port}" in res.stderr
    assert [r["step"] for r in read_metrics(remote / "run")][-1] == 3  # the job ran in the login node's workdir
    for node in slurm.nodes:  # and the laptop keeps a copy of every node's log
        assert "MLAUNCH_EXIT=0 " in node_log(remote / "run", node) and "MLAUNCH_EXIT=0 " in node_log(laptop / "run", node)
    assert json.loads((laptop / "run" / "logs" / "run.json").read_text())["slurm"]["host"].startswith("login node")


def _ranks_on(run_id: str, node: str) -> list:
    import psutil

    procs = [psutil.Process(p) for p in run_processes(run_id)]
    return [p for p in procs if p.environ().get("SLURMD_NODENAME") == node and "LOCAL_RANK" in p.environ()]


def _current_run(out: Path) -> str | None:
    try:
        return run_id_of(out)
    except (OSError, ValueError, KeyError):
        return None


def _with_launch(config: Path, **keys: Any) -> Path:
    data = yaml.safe_load(config.read_text())
    data["launch"].update(keys)
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    return config


def test_a_hung_rank_on_slurm_is_found_named_and_recovered(tmp_path: Path, slurm: Any) -> None:
    """SIGSTOP of one node's ranks: the hang is found in launch.hang_timeout_s, the node named,
    the other ranks' stacks kept; with job_restarts: 1 the job is submitted again and completes."""
    config = _with_launch(slurm_job(tmp_path, slurm, max_steps=40, checkpoint={"every_steps": 5}),
                          hang_timeout_s=20, job_restarts=1)
    out = tmp_path / "run"
    proc = start(config, slurm)
    wait_for(lambda: steps_done(out) >= 6 or proc.poll() is not None, 120, "training steps")
    run_id = run_id_of(out)
    node = slurm.nodes[1]
    ranks = _ranks_on(run_id, node)
    assert len(ranks) == 2, ranks
    for p in ranks:
        p.suspend()
    t0 = time.monotonic()
    try:
        wait_for(lambda: proc.poll() is not None or _current_run(out) not in (run_id, None), 60,
                 "the hang to be found and the job submitted again")
        found = time.monotonic() - t0
    finally:
        for p in ranks:
            try:
                p.resume()
            except Exception:
                pass
    code, _, stderr = finish(proc, timeout=240)
    assert code == 0, stderr
    assert found <= 20 + 15, f"{found:.1f}s"
    hung = [line for line in stderr.splitlines() if "is hung" in line]
    assert hung and f"on node {node}" in hung[0] and "stopped reporting" in hung[0], stderr
    assert "restart 1 of 1 (launch.job_restarts) after: hung" in stderr
    assert [r["step"] for r in read_metrics(out)][-1] == 40
    assert any(p.stat().st_size for p in (out / "logs" / "stacks").glob("*.txt")), "no stack kept"
    wait_gone(run_id, timeout=15)
    assert not slurm.squeue_ids()


def test_detached_slurm_run_shows_the_jobs_own_state_and_stops_without_its_supervisor(tmp_path: Path, slurm: Any) -> None:
    """--detach returns once the job is submitted; with its supervisor killed, `status` shows the
    job's own Slurm state, and `stop` cancels the job itself."""
    config = slurm_job(tmp_path, slurm, max_steps=2000)
    out = tmp_path / "run"
    res = subprocess.run([*MLAUNCH, "run", str(config), "--detach"], cwd=config.parent, env=slurm.env, text=True,
                         capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "detached: Slurm job" in res.stderr, res.stderr
    run_id = next(line.split()[2] for line in res.stderr.splitlines() if " detached: " in line)

    def status() -> dict:
        st = subprocess.run([*MLAUNCH, "status", run_id, "--json"], env=slurm.env, text=True, capture_output=True,
                            timeout=30)
        assert st.returncode == 0, st.stderr
        return json.loads(st.stdout)

    wait_for(lambda: steps_done(out) >= 2, 120, "training steps")
    os.kill(status()["supervisor"]["pid"], signal.SIGKILL)
    wait_for(lambda: status()["state"] == "lost", 10, "the run shown lost")
    assert status()["slurm_state"] == "RUNNING", "Slurm's job goes on without the supervisor"
    table = subprocess.run([*MLAUNCH, "status"], env=slurm.env, text=True, capture_output=True, timeout=30).stdout
    assert "lost (supervisor died), slurm RUNNING" in table, table
    stop = subprocess.run([*MLAUNCH, "stop", run_id], env=slurm.env, text=True, capture_output=True, timeout=60)
    assert stop.returncode == 0 and "cancelled Slurm job" in stop.stderr, stop.stderr
    wait_for(lambda: not slurm.squeue_ids(), 30, "an empty queue")
    wait_gone(run_id_of(out), timeout=15)
    assert status()["state"] == "stopped"
