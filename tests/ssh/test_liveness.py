"""A frozen node and a hung rank, on real sshd nodes: found in seconds, named, stopped, and nothing
left once the node runs again. (The crash cases — a killed torchrun, a cut connection, Ctrl-C —
are in test_multinode.py.)"""

from __future__ import annotations

import signal
import time

import psutil
import yaml

from tests.helpers import process_tree, read_metrics, send_all, wait_until
from tests.ssh.test_multinode import (  # noqa: F401  (fixtures: launch, tokenizer)
    ENDLESS,
    STOP_DEADLINE_S,
    assert_clean_exit_message,
    cmdline,
    launch,
    tokenizer,
    write_job,
)

#: cluster.ssh.keepalive_s × keepalive_count at their defaults (5 × 3), plus the stop.
FROZEN_DEADLINE_S = 20.0
HANG_TIMEOUT_S = 20.0


def _set_launch(job, **launch_keys) -> None:
    data = yaml.safe_load(job.path.read_text())
    data["launch"].update(launch_keys)
    job.path.write_text(yaml.safe_dump(data, sort_keys=False))



def test_a_frozen_node_is_found_within_20_s_and_named(tmp_path, ssh_cluster, tokenizer, launch):
    nodes = [ssh_cluster(1)[0], ssh_cluster.spawn()]  # a private node: this test freezes its sshd
    job = write_job(tmp_path, ssh_cluster, nodes, tokenizer, tag="frozen", max_steps=ENDLESS)
    run = launch(job)
    info = run.run_info()
    run.wait_step(2)
    victim = nodes[1]
    frozen = process_tree(victim.pid)  # its sshd, the session, torchrun and the ranks (their parent is torchrun)
    assert any("torch.distributed.run" in cmdline(p.pid) for p in frozen), [cmdline(p.pid) for p in frozen]
    send_all(frozen, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        code = run.wait(timeout=60)
        took = time.monotonic() - t0
        assert code != 0 and took <= FROZEN_DEADLINE_S, f"{took:.1f}s\n{run.output()}"
        assert_clean_exit_message(run, f"node {job.node_names()[1]} stopped answering SSH for")
        healthy = [p for p in run.processes(info["run_id"]) if p not in {q.pid for q in frozen}]
        assert not healthy, f"left on the healthy node: {[cmdline(p) for p in healthy]}"
    finally:
        send_all(frozen, signal.SIGCONT)
    # Once the node runs again, the closed connection hangs up the job's pty: nothing is left.
    assert wait_until(lambda: not run.processes(info["run_id"]), STOP_DEADLINE_S), (
        f"left after the node thawed: {[cmdline(p) for p in run.processes(info['run_id'])]}")


def test_a_hung_rank_is_found_named_its_stacks_kept(tmp_path, ssh_cluster, tokenizer, launch):
    nodes = ssh_cluster(2)
    job = write_job(tmp_path, ssh_cluster, nodes, tokenizer, tag="hung", max_steps=ENDLESS)
    _set_launch(job, hang_timeout_s=HANG_TIMEOUT_S)
    run = launch(job)
    info = run.run_info()
    run.wait_step(3)
    victim = job.node_names()[1]
    ranks = [p for p in process_tree(info["nodes"][victim]["pid"])[1:] if "LOCAL_RANK" in p.environ()]
    assert len(ranks) == 2, [cmdline(p.pid) for p in ranks]
    send_all(ranks, signal.SIGSTOP)  # the node and its sshd answer; its ranks make no progress
    t0 = time.monotonic()
    try:
        code = run.wait(timeout=90)
        took = time.monotonic() - t0
        assert code == 124 and took <= HANG_TIMEOUT_S + 15, f"{took:.1f}s, exit {code}\n{run.output()}"
        assert_clean_exit_message(run, "is hung", f"on node {victim}", "stopped reporting")
        stacks = sorted((job.out / "logs" / "stacks").glob("*.txt"))
        answered = [p for p in stacks if p.stat().st_size > 0]
        assert answered, f"no stack saved: {stacks}\n{run.output()}"
        assert any("train/loop.py" in p.read_text() for p in answered), answered[0].read_text()[:2000]
    finally:
        send_all(ranks, signal.SIGCONT)
    assert wait_until(lambda: not run.processes(info["run_id"]), STOP_DEADLINE_S), (
        f"left: {[cmdline(p) for p in run.processes(info['run_id'])]}")


def _export(out):
    from safetensors.torch import load_file

    return load_file(str(out / "export" / "model.safetensors"))


RECOVERY = {"max_steps": 24, "checkpoint": {"every_steps": 4, "export": True, "export_dtype": "float32"}}


def test_with_job_restarts_a_killed_torchrun_is_recovered_bit_identically(tmp_path, ssh_cluster, tokenizer, launch):
    nodes = ssh_cluster(2)
    for sub in ("ref", "rec"):
        (tmp_path / sub).mkdir()
    ref = write_job(tmp_path / "ref", ssh_cluster, nodes, tokenizer, tag="ref", train=dict(RECOVERY))
    assert launch(ref).wait(timeout=240) == 0

    job = write_job(tmp_path / "rec", ssh_cluster, nodes, tokenizer, tag="rec", train=dict(RECOVERY))
    _set_launch(job, job_restarts=1)
    run = launch(job)
    info = run.run_info()
    run.wait_step(6)
    victim = job.node_names()[1]
    psutil.Process(info["nodes"][victim]["pid"]).kill()  # node 2's torchrun
    assert run.wait(timeout=240) == 0, run.output()
    assert_clean_exit_message(run, f"restart 1 of 1 (launch.job_restarts) after: node {victim}")
    assert "resumed from" in run.stdout, run.output()
    want, got = _export(ref.out), _export(job.out)
    assert want.keys() == got.keys()
    assert all(bool((want[k] == got[k]).all()) for k in want), "not bit-identical after the restart"


def test_with_job_restarts_a_hung_rank_is_recovered(tmp_path, ssh_cluster, tokenizer, launch):
    nodes = ssh_cluster(2)
    job = write_job(tmp_path, ssh_cluster, nodes, tokenizer, tag="hungrec", train=dict(RECOVERY))
    _set_launch(job, job_restarts=1, hang_timeout_s=HANG_TIMEOUT_S)
    run = launch(job)
    info = run.run_info()
    run.wait_step(6)
    victim = job.node_names()[1]
    ranks = [p for p in process_tree(info["nodes"][victim]["pid"])[1:] if "LOCAL_RANK" in p.environ()]
    send_all(ranks, signal.SIGSTOP)
    try:
        assert run.wait(timeout=240) == 0, run.output()
    finally:
        send_all(ranks, signal.SIGCONT)
    assert_clean_exit_message(run, "is hung", "restart 1 of 1 (launch.job_restarts) after: hung")
    assert max(r["step"] for r in read_metrics(job.out)) == RECOVERY["max_steps"]


def test_an_elastic_restart_goes_on_without_the_node_that_stopped_answering(tmp_path, ssh_cluster, tokenizer, launch):
    """nnodes 2:3, job_restarts 1: node 3 freezes; the restart leaves it out and finishes on 2
    nodes, with micro-batches 3/2 the size so that the global batch and the data order stay."""
    nodes = [*ssh_cluster(2), ssh_cluster.spawn()]
    job = write_job(tmp_path, ssh_cluster, nodes, tokenizer, tag="elastic", train=dict(RECOVERY))
    data = yaml.safe_load(job.path.read_text())
    data["train"]["data"]["micro_batch_size"] = 2
    data["launch"].update(job_restarts=1, nnodes="2:3")
    job.path.write_text(yaml.safe_dump(data, sort_keys=False))
    run = launch(job)
    run.run_info()
    run.wait_step(6)
    frozen = process_tree(nodes[2].pid)
    send_all(frozen, signal.SIGSTOP)
    try:
        assert run.wait(timeout=240) == 0, run.output()
    finally:
        send_all(frozen, signal.SIGCONT)
    assert_clean_exit_message(run, f"node {nodes[2].host} stopped answering SSH",
                              f"restarting without {nodes[2].host}", "micro_batch_size 2 → 3")
    assert max(r["step"] for r in read_metrics(job.out)) == RECOVERY["max_steps"]
