"""The run registry, the progress state and its line, `mlaunch status`'s table: in-process."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from job.errors import MlaunchError
from launcher import registry, runs
from launcher.live import View
from launcher.progress import Progress, clock
from launcher.registry import Entry


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MLAUNCH_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def entry(run_id: str, **kw) -> Entry:
    e = Entry(run_id=run_id, name=run_id.split("-")[0], backend="local", output_dir=f"/tmp/{run_id}", config="",
              nodes=["local"], **kw)
    e.save()
    return e


def test_progress_eta_counts_this_attempts_steps_only() -> None:
    p = Progress(started_at=1000.0)
    p.update({"event": "start", "total_steps": 10, "epochs": 2, "start_step": 0}, now=1000.0)
    assert p.eta_s(now=1001.0) is None, "no ETA before two steps"
    p.update({"event": "train", "step": 1, "loss": 3.0, "epoch": 0.1, "total_steps": 10}, now=1030.0)  # set-up was slow
    p.update({"event": "train", "step": 5, "loss": 2.0, "epoch": 0.5, "total_steps": 10, "tokens_per_s": 1234.5}, now=1038.0)
    assert p.eta_s(now=1038.0) == pytest.approx(10.0)  # 2 s a step, 5 left; the set-up not counted
    assert p.eta_s(now=1039.0) == pytest.approx(9.0)
    p.update({"event": "eval", "step": 5, "eval_loss": 2.5}, now=1038.0)
    p.update({"event": "eval", "step": 5, "eval_loss": 2.7}, now=1038.0)
    assert p.best_eval_loss == 2.5 and p.eval_loss == 2.7
    line = p.line(now=1038.0)
    assert "step 5/10 (50%)" in line and "loss 2.0000" in line and "eval 2.7000" in line
    assert "tok/s 1,234" in line and "ETA 0:10" in line and "elapsed 0:38" in line and "MFU" not in line
    p.update({"event": "end", "steps": 10}, now=1050.0)
    assert p.eta_s() == 0.0 and p.step == 10
    assert clock(3725) == "1:02:05" and clock(None) == "-"


def test_a_resumed_run_starts_its_rate_afresh() -> None:
    p = Progress()
    p.update({"event": "start", "total_steps": 100, "start_step": 40}, now=0.0)
    assert p.step == 40
    p.update({"event": "train", "step": 41, "total_steps": 100}, now=100.0)
    p.update({"event": "train", "step": 42, "total_steps": 100}, now=101.0)
    assert p.eta_s(now=101.0) == pytest.approx(58.0)


def test_find_by_prefix_ambiguity_and_absence_are_one_line_exit_2() -> None:
    entry("tiny-20261201-101010-aaaaaa")
    entry("tiny-20261201-101010-bbbbbb")
    entry("big-20261201-101010-cccccc")
    assert registry.find("big").run_id == "big-20261201-101010-cccccc"
    assert registry.find("tiny-20261201-101010-b").run_id.endswith("bbbbbb")
    with pytest.raises(MlaunchError, match="ambiguous .*2 runs") as e:
        registry.find("tiny")
    assert e.value.exit_code == 2
    with pytest.raises(MlaunchError, match="no run 'nope'") as e:
        registry.find("nope")
    assert e.value.exit_code == 2
    assert registry.find("/tmp/big-20261201-101010-cccccc").name == "big", "an output dir names its run"


def test_a_dead_or_recycled_supervisor_is_never_shown_running() -> None:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(done.stdout)
    gone = entry("gone-1", state="running", supervisor={"pid": dead_pid, "start": 1.0, "host": os.uname().nodename})
    recycled = entry("recycled-1", state="running",
                     supervisor={"pid": os.getpid(), "start": -5.0, "host": os.uname().nodename})  # our pid, not our start
    alive = entry("alive-1", state="running")
    alive.claim()
    assert gone.observed().state == "lost" and "supervisor died" in gone.cause
    assert Entry.load(gone.path).state == "lost", "recorded once found"
    assert recycled.observed().state == "lost"
    assert alive.observed().state == "running"
    finished = entry("finished-1", state="done", supervisor={"pid": dead_pid, "start": 1.0})
    assert finished.observed().state == "done", "a final state stays as recorded"


def test_status_table_lists_every_run_and_its_progress(capsys) -> None:
    e = entry("tiny-20261201-101010-aaaaaa", state="done", exit_code=0)
    e.progress = {"step": 46, "total_steps": 46, "loss": 1.23456, "eta_at": None}
    e.save()
    live = entry("big-20261201-111111-bbbbbb", state="running")
    live.claim()
    live.progress = {"step": 3, "total_steps": 10, "loss": 4.0, "eta_at": time.time() + 65}
    live.save()
    assert runs.status(None, as_json=False) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:5] == ["RUN", "NAME", "BACKEND", "NODES", "STATE"]
    assert out[1].startswith("big-") and "running" in out[1] and "3/10" in out[1] and "1:0" in out[1]
    assert out[2].startswith("tiny-") and "done" in out[2] and "46/46" in out[2] and "1.2346" in out[2]
    assert runs.status("tiny", as_json=False) == 0
    detail = capsys.readouterr().out
    assert "state    done, exit code 0" in detail and "local" in detail


def test_plain_view_writes_lines_verbatim(capsys) -> None:
    with View(live=False) as view:
        view.event({"event": "train", "step": 1, "total_steps": 4})
        view.line("local | step 1/4 loss 3.0")
    assert capsys.readouterr().out == "local | step 1/4 loss 3.0\n"


def test_shell_completion_is_typers() -> None:
    res = subprocess.run([sys.executable, "-m", "launcher.cli", "--show-completion", "bash"], capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 0 and "_mlaunch_completion()" in res.stdout and "complete " in res.stdout, res.stderr
