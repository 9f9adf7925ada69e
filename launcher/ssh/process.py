"""A streaming remote job: `RemoteProcess`, what `Connection.start` returns — the job's output
lines as they arrive (read from a pty channel, so an SSH hangup reaches the job), its remote pid,
and its end, every wait with a deadline.
"""

from __future__ import annotations

import collections
import select
import time
from typing import Iterator

import paramiko

from launcher.shell import PID_MARKER
from launcher.ssh.errors import RemoteTimeout


class RemoteProcess:
    """A job started by `Connection.start`: its output lines as they arrive, and its end.

    Iterating yields lines without their line ending (a pty ends lines with \\r\\n). A first line
    `MLAUNCH_PID=<pid>` (printed by `job_command`) is consumed and stored in `pid` instead.
    Lines are buffered while `exit_status()` or `wait_pid()` wait, and yielded later.
    """

    def __init__(self, chan: paramiko.Channel, label: str) -> None:
        self._chan = chan
        self.label = label
        self.pid: int | None = None
        self._buf = b""
        self._lines: collections.deque[str] = collections.deque()
        self._eof = False

    def __repr__(self) -> str:
        return f"<RemoteProcess {self.label} pid={self.pid} exit={self.poll()}>"

    def __enter__(self) -> "RemoteProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _push(self, raw: bytes) -> None:
        line = raw.rstrip(b"\r").decode("utf-8", "replace")
        if self.pid is None and line.startswith(PID_MARKER) and line[len(PID_MARKER) :].isdigit():
            self.pid = int(line[len(PID_MARKER) :])
            return
        self._lines.append(line)

    def _pump(self, timeout: float | None) -> None:
        """Read whatever arrives within `timeout` seconds (None: until something does)."""
        if self._eof:
            return
        # Wake at least every second: a transport that died without closing the channel would
        # otherwise block us forever.
        wait = 1.0 if timeout is None else max(0.0, min(timeout, 1.0))
        ready, _, _ = select.select([self._chan], [], [], wait)
        if not ready:
            t = self._chan.get_transport()
            if t is None or not t.is_active():
                self._finish()
            return
        data = self._chan.recv(1 << 16)
        if not data:
            self._finish()
            return
        self._buf += data
        *complete, self._buf = self._buf.split(b"\n")
        for raw in complete:
            self._push(raw)

    def _finish(self) -> None:
        self._eof = True
        if self._buf:
            self._push(self._buf)
            self._buf = b""

    def __iter__(self) -> Iterator[str]:
        return self.lines()

    def lines(self) -> Iterator[str]:
        """Yield output lines as they arrive, until the job's output ends."""
        while True:
            while self._lines:
                yield self._lines.popleft()
            if self._eof:
                return
            self._pump(None)

    def read_lines(self, timeout: float = 0.0) -> list[str]:
        """The lines available within `timeout` seconds (for polling many jobs in one thread)."""
        deadline = time.monotonic() + timeout
        while not self._lines and not self._eof:
            remaining = deadline - time.monotonic()
            self._pump(max(0.0, remaining))
            if remaining <= 0:
                break
        out = list(self._lines)
        self._lines.clear()
        return out

    @property
    def at_eof(self) -> bool:
        return self._eof and not self._lines

    def wait_pid(self, timeout: float = 10.0) -> int:
        """The remote pid from the job's first line (see `job_command`)."""
        deadline = time.monotonic() + timeout
        while self.pid is None and not self._eof:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._pump(remaining)
        if self.pid is None:
            raise RemoteTimeout(
                f"node {self.label}: the job did not report its pid within {timeout:g}s"
            )
        return self.pid

    def poll(self) -> int | None:
        """The exit code if the job has ended (-1: killed by a signal or channel closed)."""
        if self._chan.exit_status_ready():
            return self._chan.recv_exit_status()
        return None

    def exit_status(self, timeout: float | None = None) -> int:
        """Wait for the job to end (reading and keeping its output meanwhile)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._eof or not self._chan.exit_status_ready():
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise RemoteTimeout(f"node {self.label}: the job did not end within {timeout:g}s")
            if self._eof:
                self._chan.status_event.wait(1.0 if remaining is None else min(remaining, 1.0))
            else:
                self._pump(remaining)
        return self._chan.recv_exit_status()

    def close(self) -> None:
        """Close the channel; with a pty this hangs up the job (SIGHUP)."""
        self._chan.close()
