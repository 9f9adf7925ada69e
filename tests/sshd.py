"""pytest plugin: real OpenSSH sshd "nodes" on loopback addresses, for SSH and launcher tests.

Load it from tests/conftest.py with `pytest_plugins = ["tests.sshd"]` (or `pytest -p tests.sshd`).
Fixtures:

- `ssh_cluster` (session): an `SSHCluster`. `ssh_cluster(n)` / `ssh_cluster.nodes(n)` returns
  the first n shared nodes (started on demand, restarted if a test stopped one);
  `ssh_cluster.spawn()` starts a private node that a test may break (stop, change its host key).
  Every node shares one client key (`ssh_cluster.identity_file`) and one known_hosts file
  (`ssh_cluster.known_hosts`) that already holds each node's host key as `[host]:port`.
- `ssh_nodes` (function): shorthand for `ssh_cluster(3)`.

Each node is its own `sshd -D -e -f <config>` on 127.0.0.N (N = 2, 3, ...) and a free port,
with its own ed25519 host key, a pid file, a work directory and a log (`node.log_tail()`).
It logs in as the current user (root here: PermitRootLogin prohibit-password). Tests that use
it live under tests/ssh/ (tests/conftest.py marks them `ssh` and `slow`); without an sshd binary
they are skipped.

The remote side is a login shell with sshd's default PATH
(/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin): this virtualenv's bin is NOT on
it. Code under test must name interpreters by absolute path (sys.executable, cluster.python);
`python3` on the remote side is the system one.
"""

from __future__ import annotations

import ctypes
import getpass
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

SSHD = shutil.which("sshd") or ("/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else None)
SSH_KEYGEN = shutil.which("ssh-keygen")
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # sshd is a daemon: if pytest is killed without running its finalizers, the kernel still
    # takes the node down. (Fires when the forking *thread* exits: nodes start on the main one.)
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def _keygen(path: Path, comment: str) -> None:
    subprocess.run(
        [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
        capture_output=True,
    )


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def _kill_processes(procs: list[psutil.Process], timeout: float = 3.0) -> None:
    # SIGKILL: a stopped node is a crashed node, and sshd's pre-auth children can take more
    # than a second to act on SIGTERM.
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    # A dead process whose parent died too is reparented to pid 1, which in some containers
    # never reaps it: count zombies as gone rather than waiting for them.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in procs):
        time.sleep(0.01)


def _alive(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@dataclass
class SSHNode:
    """One sshd "node". `host`, `port`, `user`, `identity_file`, `known_hosts` are what a
    launcher config needs; `workdir` is a directory of this node's own."""

    name: str
    host: str
    port: int
    user: str
    identity_file: str
    known_hosts: str
    workdir: str
    dir: Path
    authorized_keys: str
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    @property
    def host_key_path(self) -> Path:
        return self.dir / "ssh_host_ed25519_key"

    @property
    def host_public_key(self) -> str:
        """`ssh-ed25519 AAAA...` (no comment)."""
        kind, b64, *_ = (self.dir / "ssh_host_ed25519_key.pub").read_text().split()
        return f"{kind} {b64}"

    @property
    def known_hosts_line(self) -> str:
        return f"[{self.host}]:{self.port} {self.host_public_key}"

    @property
    def log_path(self) -> Path:
        return self.dir / "sshd.log"

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""

    def _write_config(self) -> Path:
        cfg = self.dir / "sshd_config"
        cfg.write_text(
            "\n".join(
                [
                    f"ListenAddress {self.host}:{self.port}",
                    f"HostKey {self.host_key_path}",
                    f"PidFile {self.dir / 'sshd.pid'}",
                    f"AuthorizedKeysFile {self.authorized_keys}",
                    "StrictModes no",  # temp dirs are not root-owned 0700 trees
                    "UsePAM no",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PubkeyAuthentication yes",
                    "PermitRootLogin prohibit-password",
                    "MaxStartups 100:30:200",  # parallel connects must not be dropped
                    "MaxSessions 50",
                    # No AcceptEnv line: like most servers, accept no client environment, so the
                    # launcher must put variables into the command.
                    "PermitUserEnvironment no",
                    "AllowTcpForwarding yes",  # ProxyJump through a node
                    "X11Forwarding no",
                    "PrintMotd no",
                    "PrintLastLog no",
                    "ClientAliveInterval 5",
                    "ClientAliveCountMax 3",
                    "Subsystem sftp internal-sftp",  # no dependence on sftp-server's path
                    "LogLevel INFO",
                    "",
                ]
            )
        )
        return cfg

    def start(self, timeout: float = 10.0) -> None:
        """Start (or restart) this node's sshd on its port and wait until it accepts."""
        if self.running:
            return
        cfg = self._write_config()
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(cfg)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"sshd for {self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            if _port_open(self.host, self.port):
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(
            f"sshd for {self.name} did not listen within {timeout}s:\n{self.log_tail()}"
        )

    def sshd_children(self) -> list[psutil.Process]:
        """The per-connection sshd processes (and whatever runs under them)."""
        if self.pid is None:
            return []
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> None:
        """Stop sshd and every session under it (a dropped node)."""
        if self.proc is None:
            return
        # Sessions first, while sshd is alive to reap them (orphans may never be reaped if the
        # container's pid 1 does not), then sshd itself.
        _kill_processes(self.sshd_children())
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=3)
        self.proc = None

    def regenerate_host_key(self) -> None:
        """Give the node a new host key (a reinstalled node, or a man in the middle)."""
        was_running = self.running
        self.stop()
        for p in (self.host_key_path, self.host_key_path.with_suffix(".pub")):
            p.unlink(missing_ok=True)
        _keygen(self.host_key_path, f"host-{self.name}")
        if was_running:
            self.start()

    def target(self, **overrides):
        """An `launcher.ssh.SSHTarget` for this node; ~/.ssh/config is not read."""
        from launcher.ssh import SSHTarget

        fields = dict(
            host=self.host,
            port=self.port,
            user=self.user,
            identity_file=self.identity_file,
            known_hosts=self.known_hosts,
            ssh_config=str(self.dir.parent / "empty_ssh_config"),
            connect_timeout=5.0,
            name=self.name,
        )
        fields.update(overrides)
        return SSHTarget(**fields)


class SSHCluster:
    """A pool of sshd nodes sharing one client key and one known_hosts file."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.user = getpass.getuser()
        self.identity_file = str(root / "id_ed25519")
        self.known_hosts = str(root / "known_hosts")
        self.authorized_keys = str(root / "authorized_keys")
        self.empty_ssh_config = str(root / "empty_ssh_config")
        self._shared: list[SSHNode] = []
        self._all: list[SSHNode] = []
        # Under pytest-xdist each worker has its own sshd nodes: its own loopback addresses too.
        worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
        self._next_ip = 2 + 60 * int(worker[2:] or 0) if worker.startswith("gw") else 2
        _keygen(Path(self.identity_file), "mlaunch-tests")
        Path(self.authorized_keys).write_text(Path(self.identity_file + ".pub").read_text())
        Path(self.known_hosts).write_text("")
        Path(self.empty_ssh_config).write_text("")
        # sshd running as root needs its privilege-separation directory.
        try:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        except OSError:
            pass

    def __call__(self, n: int) -> list[SSHNode]:
        return self.nodes(n)

    def nodes(self, n: int) -> list[SSHNode]:
        """The first n shared nodes, all running."""
        while len(self._shared) < n:
            self._shared.append(self._new_node())
        for node in self._shared[:n]:
            node.start()  # a test may have stopped it
        return self._shared[:n]

    def spawn(self) -> SSHNode:
        """A private node, for tests that break it (stopped at the end of the session)."""
        return self._new_node()

    def _new_node(self) -> SSHNode:
        assert self._next_ip < 255, "out of loopback addresses"
        host = f"127.0.0.{self._next_ip}"
        self._next_ip += 1
        name = f"node{len(self._all)}"
        d = self.root / name
        d.mkdir()
        (d / "work").mkdir()
        _keygen(d / "ssh_host_ed25519_key", f"host-{name}")
        node = SSHNode(
            name=name,
            host=host,
            port=0,
            user=self.user,
            identity_file=self.identity_file,
            known_hosts=self.known_hosts,
            workdir=str(d / "work"),
            dir=d,
            authorized_keys=self.authorized_keys,
        )
        # A free port can be taken between probing and sshd's bind: retry with another.
        for attempt in range(5):
            node.port = _free_port(host)
            try:
                node.start()
                break
            except RuntimeError:
                if attempt == 4:
                    raise
        self._all.append(node)
        with open(self.known_hosts, "a") as f:
            f.write(node.known_hosts_line + "\n")
        return node

    def close(self) -> None:
        for node in self._all:
            node.stop()


@pytest.fixture(scope="session")
def ssh_cluster():
    if SSHD is None or SSH_KEYGEN is None:
        pytest.skip("OpenSSH sshd/ssh-keygen not installed (apt-get install openssh-server)")
    root = Path(tempfile.mkdtemp(prefix="mlaunch-sshd-"))
    cluster = SSHCluster(root)
    try:
        yield cluster
    finally:
        cluster.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def ssh_nodes(ssh_cluster) -> list[SSHNode]:
    return ssh_cluster(3)
