"""Runs you can leave: `mlaunch run --detach` here (standalone), then `status`, `logs`, `plot`,
a supervisor killed, and the live progress line under a real pty."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

from launcher.procs import run_processes
from tests.helpers import wait_until

ROOT = Path(__file__).resolve().parents[2]
MLAUNCH = [sys.executable, "-m", "launcher.cli"]
#: A short tiny run: 10 steps, an eval at 5 and 10, no checkpoints but the last.
#: configs/tiny.yaml cut down: 2 layers, the first 160 rows (its tokenizer trains on fewer).
SMALL = ["--set", "train.model.init.num_hidden_layers=2", "--set", "train.data.max_rows=160"]
SHORT = [*SMALL, "--set", "train.max_steps=10", "--set", "train.eval_every=5", "--set", "train.checkpoint.every_steps=1000"]
ENDLESS = [*SMALL, "--set", "train.max_steps=100000", "--set", "train.checkpoint.every_steps=100000"]
ANSI = re.compile(r"\x1b\[")


def env() -> dict[str, str]:
    e = {**os.environ, "PYTHONUNBUFFERED": "1"}
    e.pop("MLAUNCH_DEBUG", None)
    return e


def mlaunch(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*MLAUNCH, *args], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)


def status_of(run_id: str) -> dict:
    res = mlaunch("status", run_id, "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def detach_from_a_shell(tmp_path: Path, out: Path, *extra: str) -> tuple[str, subprocess.Popen]:
    """`mlaunch run --detach` from a shell in its own process group (a terminal's job), which
    then lingers as a login shell would. Returns the run id and the shell."""
    said = tmp_path / "detach.txt"
    cmd = " ".join([*MLAUNCH, "run", "configs/tiny.yaml", "--standalone", "--detach",
                    "--set", f"train.output_dir={out}", *extra])
    shell = subprocess.Popen(["bash", "-c", f"{cmd} > {said} 2>&1; echo EXIT=$? >> {said}; sleep 600"], cwd=ROOT,
                             env=env(), start_new_session=True, stdin=subprocess.DEVNULL)
    assert wait_until(lambda: "EXIT=" in said.read_text() if said.exists() else False, 120), \
        said.read_text() if said.exists() else "no output"
    text = said.read_text()
    assert "EXIT=0" in text, text
    m = re.search(r"run (\S+) detached", text)
    assert m, text
    assert "mlaunch attach" in text and "mlaunch stop" in text, text
    return m.group(1), shell


def test_a_detached_run_outlives_its_terminal_and_can_be_looked_at(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_id, shell = detach_from_a_shell(tmp_path, out, *SHORT)
    os.killpg(shell.pid, signal.SIGKILL)  # the terminal closes: its whole process group goes
    shell.wait()
    # Another terminal attaches (piped: plain lines) and follows the run to its end.
    attached = mlaunch("attach", run_id, timeout=240)
    assert attached.returncode == 0, attached.stderr
    assert "local | " in attached.stdout and f"run {run_id} done" in attached.stderr, attached.stderr
    assert "eval loss" in attached.stderr, "the summary is shown to whoever attached"
    st = status_of(run_id)
    assert st["state"] == "done" and st["exit_code"] == 0, (st, (out / "logs" / "supervisor.log").read_text()[-3000:])
    assert st["progress"]["step"] == 10 and st["progress"]["loss"] is not None
    assert st["progress"]["eval_loss"] is not None
    assert any("eval loss" in line for line in st["summary"]), st["summary"]

    table = mlaunch("status")
    assert table.returncode == 0 and run_id in table.stdout and "done" in table.stdout, table.stdout
    assert mlaunch("status", run_id[: len(run_id) - 3]).returncode == 0, "a unique prefix is enough"

    logs = mlaunch("logs", run_id)
    assert logs.returncode == 0, logs.stderr
    lines = logs.stdout.splitlines()
    assert any(line.startswith("local | ") and "step 10/10" in line for line in lines), logs.stdout[-2000:]
    assert not any("MLAUNCH_" in line for line in lines), "markers are for the launcher, not the reader"
    assert not ANSI.search(logs.stdout + table.stdout), "piped output carries no control characters"

    (out / "loss.png").unlink()
    plot = mlaunch("plot", run_id)
    assert plot.returncode == 0, plot.stderr
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert run_processes(run_id) == []


def test_a_supervisor_killed_is_shown_lost_and_leaves_no_orphan(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_id, shell = detach_from_a_shell(tmp_path, out, *ENDLESS)
    try:
        assert wait_until(lambda: (status_of(run_id)["progress"].get("step") or 0) >= 2, 120), status_of(run_id)
        assert len(run_processes(run_id)) >= 3, "torchrun and its 2 workers"
        os.kill(status_of(run_id)["supervisor"]["pid"], signal.SIGKILL)
        assert wait_until(lambda: run_processes(run_id) == [], 20), "the run's processes outlived their supervisor"
        st = status_of(run_id)
        assert st["state"] == "lost", st
        table = mlaunch("status").stdout
        assert re.search(rf"{re.escape(run_id)}.*lost \(supervisor died\)", table), table
        assert "supervisor died" in mlaunch("status", run_id).stdout
    finally:
        os.killpg(shell.pid, signal.SIGKILL)
        for pid in run_processes(run_id):
            os.kill(pid, signal.SIGKILL)


def test_the_progress_line_is_drawn_on_a_terminal(tmp_path: Path) -> None:
    """Under a pty: the live line (step/total, ETA) below the lines; the end's summary and loss.png."""
    out = tmp_path / "run"
    pid, fd = pty.fork()
    if pid == 0:  # the child: a terminal of 140 × 40
        os.chdir(ROOT)
        e = env()
        e["TERM"] = "xterm-256color"
        os.execve(sys.executable, [*MLAUNCH, "run", "configs/tiny.yaml", "--standalone",
                                   "--set", f"train.output_dir={out}", *SHORT], e)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 140, 0, 0))
    chunks, deadline = [], time.monotonic() + 240
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if ready:
            try:
                data = os.read(fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    _, status = os.waitpid(pid, 0)
    text = b"".join(chunks).decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text[-3000:]
    assert ANSI.search(text), "a terminal gets the live view"
    assert re.search(r"step \d+/10 \(\d+%\)", text) and "ETA" in text, text[-3000:]
    assert "OMP_NUM_THREADS" not in text, "torchrun's banner is not shown"
    assert "eval loss" in text and "loss curve" in text, text[-3000:]
    assert (out / "loss.png").is_file()
