"""A live connection to one node: `Connection` runs commands to completion (`run`, draining
stdout and stderr while it waits, under a deadline), starts streaming jobs (`start`, in a pty),
writes one small file atomically (`put_text`), measures the SSH round trip (`ping`) and syncs a
directory (`put_tree`, see `sftp.py`). Every channel mlaunch opens is opened here.

The commands it runs are built by `launcher.shell` (`shell_command` / `job_command`): one
`sh -c`-safe line with the environment inside the command (paramiko's `environment=` is dropped
unless the server has `AcceptEnv`).
"""

from __future__ import annotations

import os
import posixpath
import select
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import paramiko

from job.errors import MlaunchError
from launcher.shell import quote_path
from launcher.ssh import sftp as sftp_sync
from launcher.ssh.errors import RemoteTimeout, one_line, short
from launcher.ssh.process import RemoteProcess
from launcher.ssh.sftp import SyncStats
from launcher.ssh.target import SSHTarget


@dataclass
class Result:
    """What a finished remote command left: its exit code (-1: killed by a signal) and output."""

    exit_code: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


class Connection:
    """One authenticated SSH connection to a node (and its ProxyJump connection, if any)."""

    def __init__(
        self, client: paramiko.SSHClient, target: SSHTarget, jump: "Connection | None" = None
    ) -> None:
        self.client = client
        self.target = target
        self.label = target.label
        self._jump = jump
        self._sftp: paramiko.SFTPClient | None = None
        self._last_reply: float | None = None  # set once `watch_liveness` runs

    def __repr__(self) -> str:
        return f"<Connection {self.label} {self.target.user}@{self.target.host}:{self.target.port}>"

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def transport(self) -> paramiko.Transport:
        t = self.client.get_transport()
        if t is None or not t.is_active():
            raise MlaunchError(f"node {self.label}: the SSH connection is closed")
        return t

    @property
    def is_active(self) -> bool:
        """False once the connection is closed or the transport has died."""
        t = self.client.get_transport()
        return t is not None and t.is_active()

    def watch_liveness(self, interval_s: float) -> None:
        """Ask the node's sshd for a reply every `interval_s` (OpenSSH's ServerAliveInterval): a
        `keepalive@openssh.com` global request with want-reply, which any sshd answers (with a
        failure message, which is an answer). paramiko's own keepalive wants no reply, so a peer
        whose sshd is frozen — its kernel still ACKs TCP — would never be noticed.
        `silent_for()` then says how long the node has not answered."""
        if self._last_reply is not None:
            return
        self._last_reply = time.monotonic()
        threading.Thread(target=self._liveness, args=(interval_s,), daemon=True, name=f"mlaunch-alive-{self.label}").start()

    def _liveness(self, interval_s: float) -> None:
        while True:
            t = self.client.get_transport()
            if t is None or not t.is_active():
                return
            sent = time.monotonic()
            try:
                # The one caller of global_request on this transport (paramiko keeps one pending
                # request per transport); blocks until the reply, or the transport dies.
                t.global_request("keepalive@openssh.com", wait=True)
            except Exception:
                return
            if not t.is_active():
                return
            self._last_reply = time.monotonic()
            time.sleep(max(0.0, interval_s - (self._last_reply - sent)))

    def silent_for(self) -> float:
        """Seconds since the node last answered a liveness request (0 when not watched)."""
        return 0.0 if self._last_reply is None else time.monotonic() - self._last_reply

    def _open_session(self, timeout: float | None = None) -> paramiko.Channel:
        """A new session channel, opened within `timeout` (default: target.connect_timeout)."""
        try:
            return self.transport.open_session(
                timeout=self.target.connect_timeout if timeout is None else timeout
            )
        except (paramiko.SSHException, OSError) as e:
            raise MlaunchError(
                f"node {self.label}: cannot open an SSH session ({one_line(e)}); the node may "
                f"be down or its sshd out of sessions (MaxSessions)"
            ) from e

    def ping(self, timeout: float = 10.0) -> float:
        """Seconds to open and close one session channel: an SSH round trip to the node's sshd,
        no process started there. Raises a one-line MlaunchError when no channel opens in time."""
        start = time.monotonic()
        self._open_session(timeout=timeout).close()
        return time.monotonic() - start

    def run(self, cmd: str, timeout: float = 60.0, check: bool = False) -> Result:
        """Run `cmd` (a shell line, see `shell_command`) to completion and return its output.

        stdout and stderr are drained while waiting: a channel whose window fills (2 MiB) stops
        the remote writer, so waiting for the exit status first would deadlock. On timeout the
        channel is closed and RemoteTimeout raised (a command without a pty may keep running).
        """
        chan = self._open_session()
        out: list[bytes] = []
        err: list[bytes] = []
        deadline = time.monotonic() + timeout
        try:
            chan.exec_command(cmd)
            # fileno() is a pipe paramiko sets when stdout or stderr has data, or at EOF.
            fd = chan.fileno()
            while True:
                got = False
                while chan.recv_ready():
                    out.append(chan.recv(1 << 16))
                    got = True
                while chan.recv_stderr_ready():
                    err.append(chan.recv_stderr(1 << 16))
                    got = True
                if (chan.eof_received or chan.closed) and not (
                    chan.recv_ready() or chan.recv_stderr_ready()
                ):
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._timeout(cmd, timeout)
                if not got:
                    select.select([fd], [], [], min(remaining, 0.5))
            # exit-status may trail the EOF by a packet.
            if not chan.status_event.wait(max(0.0, deadline - time.monotonic())):
                raise self._timeout(cmd, timeout)
            result = Result(
                chan.recv_exit_status(),
                b"".join(out).decode("utf-8", "replace"),
                b"".join(err).decode("utf-8", "replace"),
            )
        finally:
            chan.close()
        if check and not result.ok:
            err_lines = result.stderr.strip().splitlines()
            tail = one_line(err_lines[-1]) if err_lines else ""
            raise MlaunchError(
                f"node {self.label}: `{short(cmd)}` exited with {result.exit_code}"
                + (f": {tail}" if tail else "")
            )
        return result

    def _timeout(self, cmd: str, timeout: float) -> RemoteTimeout:
        return RemoteTimeout(
            f"node {self.label}: `{short(cmd)}` did not finish within {timeout:g}s"
        )

    def put_text(self, remote_path: str, text: str, timeout: float = 60.0) -> None:
        """Write `text` to `remote_path` (absolute, `~/...`, or relative to the remote home),
        creating its directory; atomically — written beside, then renamed over — so that a
        reader (a rank loading its config) never sees half a file. For small files: the text
        goes through `cat` on one channel, under one deadline.
        """
        parent = posixpath.dirname(remote_path) or "."
        quoted = quote_path(remote_path)
        cmd = (
            f"mkdir -p {quote_path(parent)} && cat > {quoted}.tmp$$ "
            f"&& mv -f {quoted}.tmp$$ {quoted}"
        )
        late = RemoteTimeout(
            f"node {self.label}: writing {remote_path} did not finish within {timeout:g}s; "
            f"check the node and its disk"
        )
        deadline = time.monotonic() + timeout
        chan = self._open_session()
        try:
            chan.settimeout(timeout)  # every operation has a deadline
            try:
                chan.exec_command(cmd)
                chan.sendall(text.encode())
                chan.shutdown_write()
            except (socket.timeout, TimeoutError) as e:
                raise late from e
            if not chan.status_event.wait(max(0.0, deadline - time.monotonic())):
                raise late
            code = chan.recv_exit_status()
            err = chan.recv_stderr(1 << 16) if chan.recv_stderr_ready() else b""
        finally:
            chan.close()
        if code != 0:
            lines = err.decode("utf-8", "replace").strip().splitlines()
            tail = f": {one_line(lines[-1])}" if lines else ""
            raise MlaunchError(
                f"node {self.label}: cannot write {remote_path} (exit {code}{tail}); check that "
                f"{parent} is writable there"
            )

    def start(self, cmd: str, pty: bool = True) -> RemoteProcess:
        """Start a long job and return at once; iterate the result for its output lines.

        With `pty=True` (the default, and what jobs must use) closing the channel or losing the
        connection hangs up the pty, and the kernel's SIGHUP reaches the job — provided the
        command `exec`s it (see `job_command`). A pty merges stderr into stdout.
        """
        chan = self._open_session()
        try:
            if pty:
                # A wide, dumb terminal: no colour codes guessed from TERM, no early wrapping by
                # programs that ask for the width (tqdm, rich).
                chan.get_pty(term="dumb", width=200, height=50)
            else:
                chan.set_combine_stderr(True)
            chan.exec_command(cmd)
        except BaseException:
            chan.close()
            raise
        return RemoteProcess(chan, self.label)

    # -- files ---------------------------------------------------------------------------

    def sftp(self) -> paramiko.SFTPClient:
        if self._sftp is None:
            try:
                self._sftp = self.client.open_sftp()
            except (paramiko.SSHException, OSError) as e:
                raise MlaunchError(
                    f"node {self.label}: cannot start SFTP ({one_line(e)}); enable the sftp "
                    f"Subsystem in the node's sshd_config"
                ) from e
        return self._sftp

    def put_tree(
        self,
        local_root: str | os.PathLike,
        remote_root: str,
        exclude_globs: Iterable[str] = (),
        progress_cb: Callable[[str, int], None] | None = None,
    ) -> SyncStats:
        """Push `local_root` to `remote_root` over SFTP, sending only new or changed files.

        A file is unchanged when the remote copy has the same size and mtime (whole seconds);
        after an upload the remote mtime (and permission bits) are set from the local file, so
        the next sync skips it. Nothing remote is deleted. Excluded: DEFAULT_EXCLUDES, any
        directory holding a pyvenv.cfg, symlinked directories, and `exclude_globs` — fnmatch
        patterns matched against both the name and the '/'-separated path under `local_root`
        (e.g. "runs", "outputs/*", "*.ckpt"). `remote_root` is absolute or relative to the
        remote home ("~/x" works). `progress_cb(relpath, nbytes)` is called after each upload.
        """
        return sftp_sync.put_tree(
            self.sftp, local_root, remote_root, self.label, exclude_globs, progress_cb
        )

    def close(self) -> None:
        if self._sftp is not None:
            try:
                self._sftp.close()
            except Exception:  # the transport may already be gone
                pass
            self._sftp = None
        self.client.close()
        if self._jump is not None:
            self._jump.close()
            self._jump = None
