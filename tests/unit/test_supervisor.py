"""The supervisor every backend shares (launcher/supervisor.py) and the per-node fan-out
(launcher/fanout.py), driven by in-process workers: the streaming, the first-failure rule, the
exit codes and run.json are the supervisor's own logic, the same for local, SSH and Slurm."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from job.config import validate
from job.errors import MlaunchError
from launcher.backends.base import Job, NodeOutcome, Worker
from launcher.fanout import fan_out
from launcher.plan import NodePlan, Plan
from launcher.supervisor import Supervisor


class ListWorker(Worker):
    """A node that prints `lines` (pausing `delay` s before each), then ends with `outcome`."""

    def __init__(self, name: str, lines: list[str], outcome: NodeOutcome, log_path: Path, delay: float = 0.0,
                 stopped: threading.Event | None = None) -> None:
        self.name, self._lines, self._outcome, self.log_path, self.delay = name, lines, outcome, log_path, delay
        self.stopped = stopped or threading.Event()

    def lines(self) -> Iterator[str]:
        for line in self._lines:
            if self.stopped.wait(self.delay):
                return
            yield line

    def outcome(self) -> NodeOutcome:
        return NodeOutcome(code=143) if self.stopped.is_set() else NodeOutcome(self._outcome.code, self._outcome.lost)


class ListJob(Job):
    def __init__(self, tmp_path: Path, spec: dict[str, tuple[list[str], Any]], delay: float = 0.0) -> None:
        self.stop_calls: list[float] = []
        self.stopped = threading.Event()
        self._workers = []
        for name, (lines, end) in spec.items():
            outcome = NodeOutcome(lost=end) if isinstance(end, str) else NodeOutcome(code=end)
            self._workers.append(ListWorker(name, lines, outcome, tmp_path / "logs" / f"{name}.log",
                                            delay if outcome.code == 0 else delay / 4, self.stopped))

    def workers(self) -> list[Worker]:
        return list(self._workers)

    def stop(self, grace_s: float, force: bool = False) -> list[str]:
        self.stop_calls.append(grace_s)
        self.stopped.set()
        return []

    def record(self) -> dict[str, Any]:
        return {"nodes": {w.name: {"pid": 1} for w in self._workers}}


def plan_for(tmp_path: Path, names: list[str]) -> Plan:
    cfg = validate({"name": "t", "train": {"model": {"init": {}}, "output_dir": str(tmp_path)}})
    nodes = [NodePlan(i, n, n, 22, None, "127.0.0.1", ".", 1, "", "python3", ["python3"], {}, None)
             for i, n in enumerate(names)]
    return Plan("t", "t-1", False, None, nodes, len(nodes), "c.yaml", str(tmp_path), cfg, {}, "ssh")


def supervise(tmp_path: Path, job: ListJob) -> tuple[Supervisor, int]:
    names = [w.name for w in job.workers()]
    sup = Supervisor(plan_for(tmp_path, names).resolved, plan_for(tmp_path, names), job)
    return sup, sup.run()


def test_a_clean_run_streams_every_node_prefixed_and_logs_each(tmp_path: Path, capsys) -> None:
    job = ListJob(tmp_path, {"a": (["a1", "a2"], 0), "bb": (["b1"], 0)})
    sup, code = supervise(tmp_path, job)
    assert code == 0
    out = capsys.readouterr().out
    assert "a  | a1" in out and "bb | b1" in out
    assert (tmp_path / "logs" / "a.log").read_text() == "a1\na2\n"
    record = json.loads((tmp_path / "logs" / "run.json").read_text())
    assert record["run_id"] == "t-1" and record["backend"] == "ssh" and set(record["nodes"]) == {"a", "bb"}
    assert job.stop_calls == [3.0]  # after a clean end, leftovers are still looked for


def test_the_first_failure_stops_every_node_and_its_code_is_the_exit_code(tmp_path: Path, capsys) -> None:
    job = ListJob(tmp_path, {"ok": (["x"] * 50, 0), "bad": (["boom"], 3)}, delay=0.1)
    t0 = time.monotonic()
    _, code = supervise(tmp_path, job)
    assert code == 3 and time.monotonic() - t0 < 3  # the healthy node did not run its 5 s
    assert job.stop_calls, "the other nodes were not stopped"
    err = capsys.readouterr().err
    assert "node bad exited with code 3; stopping the other nodes" in err
    assert "run failed on node bad (exited with code 3)" in err and "    boom" in err


def test_a_lost_node_fails_the_run_with_255(tmp_path: Path, capsys) -> None:
    job = ListJob(tmp_path, {"a": (["x"] * 50, 0), "b": (["y"], "lost its SSH connection")}, delay=0.1)
    _, code = supervise(tmp_path, job)
    assert code == 255 and job.stop_calls
    assert "node b lost its SSH connection" in capsys.readouterr().err


def test_fan_out_returns_every_nodes_outcome_and_names_every_failure() -> None:
    def probe(name: str, n: int) -> int:
        if n % 2:
            raise MlaunchError(f"node {name}: unreachable")
        return n * 10

    res = fan_out(probe, {"n0": 0, "n1": 1, "n2": 2, "n3": 3})
    assert res.ok == {"n0": 0, "n2": 20} and set(res.failed) == {"n1", "n3"}
    with pytest.raises(MlaunchError, match=r"probing failed on 2 of 4 node\(s\), nothing started: node n1: unreachable; node n3: unreachable"):
        res.values("probing")
    assert fan_out(probe, {"n0": 0}).values("probing") == {"n0": 0}


def _beat(beats, node: str, rank: int, step: int, phase: str = "forward_backward") -> None:
    beats.heard(node, f"MLAUNCH_BEAT={rank} {step} {phase} 0")


def test_hang_detection_names_the_ranks_that_stopped_reporting() -> None:
    from launcher.supervisor import _Beats

    beats = _Beats(timeout_s=0.6)
    for step in (1, 2):
        for rank, node in enumerate(["n1", "n1", "n2", "n2"]):
            _beat(beats, node, rank, step)
    assert beats.check() is None
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline and beats.check() is None:  # n2 went quiet; n1 waits in the collective
        _beat(beats, "n1", 0, 2)
        _beat(beats, "n1", 1, 2)
        time.sleep(0.05)
    why = beats.check()
    assert why is not None and "ranks 2, 3 on node n2" in why and "stopped reporting" in why and "n1" not in why, why


def test_hang_clock_pauses_in_checkpoints_and_adapts_to_the_step_time() -> None:
    from launcher.supervisor import HANG_FLOOR_S, _Beats

    beats = _Beats(timeout_s=0.3)
    _beat(beats, "n1", 0, 1)
    for _ in range(8):  # 0.8 s in a checkpoint, beating: not a hang
        time.sleep(0.1)
        _beat(beats, "n1", 0, 1, "checkpoint")
        assert beats.check() is None
    adaptive = _Beats(timeout_s=None)
    assert adaptive.timeout == HANG_FLOOR_S
    _beat(adaptive, "n", 0, 1)
    adaptive.slowest = 40.0  # as if a step had taken 40 s
    assert adaptive.timeout == 20 * 40.0
