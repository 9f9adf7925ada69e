"""The one seam between mlaunch and SSH: every use of paramiko lives in this module.

Import this module lazily (inside the function that needs it): paramiko and cryptography cost
import time that `mlaunch --help` and `mlaunch plan` should not pay. It takes plain arguments
(`SSHTarget`, argv lists, env dicts) and knows nothing of the YAML config or the plan.

What it gives the launcher:
- `resolve(target)` / `connect(target)` / `connect_all(targets)`: ~/.ssh/config applied, host keys
  checked against known_hosts (never silently trusted), every failure turned into one line that
  names the node and says how to fix it; `connect_all` collects a connection *or* an exception
  per node and never stops at the first bad one.
- `Connection.run` (drains stdout and stderr while waiting, with a deadline),
  `Connection.start` (a streaming job in a pty, so an SSH hangup reaches it),
  `Connection.put_tree` (SFTP sync of only the changed files).
- The commands it runs are built by `launcher.shell` (`shell_command` / `job_command`): one
  `sh -c`-safe line with the environment inside the command (paramiko's `environment=` is
  dropped unless the server has `AcceptEnv`).
- `list_run_processes` / `kill_run`: find and end exactly the processes whose environment carries
  `MLAUNCH_RUN_ID=<run id>` — torchrun starts its workers in new sessions, so neither its process
  group nor a name match reaches them.

The remote side is a login shell of the node's user (sshd runs `$SHELL -c <command>`), assumed
POSIX (sh, bash, dash, zsh). Its PATH is sshd's default, not the launcher's: a virtualenv's bin
directory is not on it, so callers pass interpreters by absolute path (`cluster.python`). The
process bookkeeping runs a short `python3` snippet on the node (`python=` to override).
"""

from __future__ import annotations

import base64
import collections
import fcntl
import fnmatch
import getpass
import hashlib
import json
import logging
import os
import posixpath
import re
import select
import shlex
import socket
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import paramiko

from launcher import procs
from job.errors import ConfigError, MlaunchError
from launcher.shell import PID_MARKER, python_command

# paramiko logs failures (e.g. "Secsh channel 0 open FAILED") that we turn into one-line
# MlaunchErrors; without a handler of its own, Python's last-resort handler would print them to
# stderr as well. Records still propagate to the root logger if the application configures one.
logging.getLogger("paramiko").addHandler(logging.NullHandler())

HOST_KEY_POLICIES = ("reject", "accept-new")


#: Never pushed to the nodes: VCS data, virtualenvs (also any directory holding pyvenv.cfg, checked
#: separately), bytecode and tool caches. Callers add the run output directories.
DEFAULT_EXCLUDES = (".git", ".hg", ".venv", "venv", "__pycache__", "*.pyc", ".pytest_cache")

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*\Z")
_MAX_JUMP_DEPTH = 8

# accept-new may append to the same known_hosts from several connect_all threads at once.
_KNOWN_HOSTS_LOCK = threading.Lock()


class RemoteTimeout(MlaunchError):
    """A remote command or wait outlived its deadline (the channel has been closed)."""


# --------------------------------------------------------------------------------------------
# Targets and ~/.ssh/config


@dataclass(frozen=True)
class SSHTarget:
    """Where and how to reach one node. `resolve()` fills in what ~/.ssh/config knows.

    `port=None` means "the ssh config's Port, else 22" — pass a port only when the user set one,
    since explicit values win over the ssh config. `identity_file` may be one path or several.
    `known_hosts=None` means the ssh config's UserKnownHostsFile, else ~/.ssh/known_hosts.
    `ssh_config=None` reads ~/.ssh/config when it exists. `name` labels the node in messages
    (default `host:port`).
    """

    host: str
    port: int | None = None
    user: str | None = None
    identity_file: str | os.PathLike | Sequence[str | os.PathLike] | None = None
    known_hosts: str | os.PathLike | None = None
    host_key_policy: str = "reject"
    connect_timeout: float = 10.0
    keepalive: int = 15
    proxy_jump: str | None = None
    ssh_config: str | os.PathLike | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        if self.host_key_policy not in HOST_KEY_POLICIES:
            raise ConfigError(
                f"cluster.ssh.host_key_policy: {self.host_key_policy!r} is not one of "
                f"{', '.join(HOST_KEY_POLICIES)}"
            )
        if not self.host:
            raise ConfigError("a node has an empty host; set cluster.nodes[].host")

    @property
    def label(self) -> str:
        """How messages name this node: its name, else host:port (host alone before resolve()
        when no port was given, so an ssh config alias is not shown with a made-up port)."""
        if self.name:
            return self.name
        return self.host if self.port is None else f"{self.host}:{self.port}"

    @property
    def identity_files(self) -> tuple[str, ...]:
        f = self.identity_file
        if f is None:
            return ()
        if isinstance(f, (str, os.PathLike)):
            f = [f]
        return tuple(os.path.expanduser(os.fspath(p)) for p in f)


def _one_line(exc: BaseException | str) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def resolve(target: SSHTarget) -> SSHTarget:
    """Apply ~/.ssh/config (HostName, User, Port, IdentityFile, ProxyJump, UserKnownHostsFile).

    Values set on `target` win over the ssh config; the result has every field concrete (port,
    user, known_hosts) so that connecting needs no further lookups.
    """
    cfg_path: str | None
    if target.ssh_config is None:
        default = os.path.expanduser("~/.ssh/config")
        cfg_path = default if os.path.isfile(default) else None
    else:
        cfg_path = os.path.expanduser(os.fspath(target.ssh_config))
        if not os.path.isfile(cfg_path):
            raise ConfigError(f"ssh config {cfg_path} does not exist; fix the path or drop it")

    opts: Mapping[str, object] = {}
    if cfg_path is not None:
        try:
            opts = paramiko.SSHConfig.from_path(cfg_path).lookup(target.host)
        except Exception as e:  # ConfigParseError, bad Match exec, unreadable file, ...
            raise ConfigError(f"cannot use ssh config {cfg_path}: {_one_line(e)}") from e

    hostname = str(opts.get("hostname") or target.host)
    name = target.name
    if name is None and hostname != target.host:
        name = target.host  # keep the alias the user wrote in messages

    port = target.port
    if port is None:
        try:
            port = int(opts.get("port", 22))
        except ValueError as e:
            raise ConfigError(f"ssh config {cfg_path}: bad Port for {target.host}: {e}") from e

    user = target.user or opts.get("user") or getpass.getuser()

    identity = target.identity_file
    if identity is None and opts.get("identityfile"):
        identity = tuple(os.path.expanduser(p) for p in opts["identityfile"])

    known_hosts = target.known_hosts
    if known_hosts is None and opts.get("userknownhostsfile"):
        known_hosts = str(opts["userknownhostsfile"]).split()[0]
    known_hosts = os.path.expanduser(os.fspath(known_hosts or "~/.ssh/known_hosts"))

    jump = target.proxy_jump if target.proxy_jump is not None else opts.get("proxyjump")
    if jump is not None and str(jump).strip().lower() in ("", "none"):
        jump = None

    return replace(
        target,
        host=hostname,
        port=port,
        user=str(user),
        identity_file=identity,
        known_hosts=known_hosts,
        proxy_jump=jump,
        ssh_config=cfg_path,
        name=name,
    )


def _parse_jump_hop(spec: str) -> tuple[str | None, str, int | None]:
    """`[user@]host[:port]` (also `ssh://...` and `[v6addr]:port`) → (user, host, port)."""
    s = spec.strip()
    if s.startswith("ssh://"):
        s = s[len("ssh://") :]
    user = None
    if "@" in s:
        user, s = s.rsplit("@", 1)
    port: int | None = None
    if s.startswith("["):
        host, _, rest = s[1:].partition("]")
        if rest.startswith(":"):
            port = int(rest[1:])
    elif s.count(":") == 1:
        host, p = s.split(":")
        port = int(p)
    else:
        host = s
    if not host:
        raise ValueError(f"no host in {spec!r}")
    return user, host, port


# --------------------------------------------------------------------------------------------
# Host keys


def _fingerprint(key: paramiko.PKey) -> str:
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def _known_hosts_name(host: str, port: int) -> str:
    # OpenSSH (and paramiko's lookup) write non-default ports as [host]:port.
    return host if port == 22 else f"[{host}]:{port}"


def _load_known_hosts(path: str) -> paramiko.HostKeys:
    """known_hosts as paramiko host keys, tolerating lines paramiko cannot use.

    paramiko's own loader raises on a corrupt line and misreads @cert-authority/@revoked marker
    lines; we skip those (mlaunch neither trusts CAs nor needs revocation lists), like ssh skips
    what it cannot parse. The system-wide /etc/ssh/ssh_known_hosts is read first, as ssh does.
    """
    keys = paramiko.HostKeys()
    for p in ("/etc/ssh/ssh_known_hosts", path):
        try:
            with open(p, encoding="utf-8", errors="replace") as f:
                lines = f.readlines()
        except FileNotFoundError:
            continue
        except OSError as e:
            raise MlaunchError(f"cannot read known_hosts {p}: {_one_line(e)}") from e
        for lineno, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line.startswith(("#", "@")):
                continue
            try:
                entry = paramiko.hostkeys.HostKeyEntry.from_line(line, lineno)
            except Exception:  # InvalidHostKey, bad base64, unknown key type
                continue
            if entry is None or entry.key is None:
                continue
            for hostname in entry.hostnames:
                keys.add(hostname, entry.key.get_name(), entry.key)
    return keys


def _append_known_host(path: str, hostname: str, key: paramiko.PKey) -> None:
    """Append one `hostname keytype base64` line; never rewrites what is already there."""
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, mode=0o700, exist_ok=True)
    line = f"{hostname} {key.get_name()} {key.get_base64()}\n".encode()
    with _KNOWN_HOSTS_LOCK:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "r+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # other mlaunch processes may be adding keys too
            size = f.seek(0, os.SEEK_END)
            if size:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    line = b"\n" + line
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


class _HostKeyPolicy(paramiko.MissingHostKeyPolicy):
    """Called by paramiko only for a host with no known key (a changed key raises elsewhere)."""

    def __init__(self, target: SSHTarget) -> None:
        self.target = target

    def missing_host_key(self, client, hostname, key):
        t = self.target
        if t.host_key_policy == "accept-new":
            _append_known_host(str(t.known_hosts), hostname, key)
            client.get_host_keys().add(hostname, key.get_name(), key)
            return
        if t.proxy_jump:
            how = (
                f"connect once with `ssh -J {t.proxy_jump} -p {t.port} {t.user}@{t.host}` "
                f"to check and record it"
            )
        else:
            port = f"-p {t.port} " if t.port != 22 else ""
            how = f"run `ssh-keyscan {port}{t.host} >> {t.known_hosts}`"
        raise MlaunchError(
            f"node {t.label}: host key not in {t.known_hosts} "
            f"({key.get_name()} {_fingerprint(key)}); {how} "
            f"or set cluster.ssh.host_key_policy: accept-new"
        )


# --------------------------------------------------------------------------------------------
# Connecting


@dataclass
class Result:
    """What a finished remote command left: its exit code (-1: killed by a signal) and output."""

    exit_code: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


def connect(target: SSHTarget) -> "Connection":
    """Open an authenticated SSH connection to one node, or raise a one-line MlaunchError."""
    return _connect_resolved(resolve(target), depth=0)


def _jump_target(t: SSHTarget) -> SSHTarget:
    """The host next to `t` in its ProxyJump chain, reached through the hops before it."""
    hops = [h for h in str(t.proxy_jump).split(",") if h.strip()]
    try:
        user, host, port = _parse_jump_hop(hops[-1])
    except ValueError as e:
        raise ConfigError(f"node {t.label}: bad ProxyJump {t.proxy_jump!r}: {e}") from e
    jt = resolve(
        SSHTarget(
            host=host,
            port=port,
            user=user,
            known_hosts=t.known_hosts,
            host_key_policy=t.host_key_policy,
            connect_timeout=t.connect_timeout,
            keepalive=t.keepalive,
            # Earlier hops are explicit; with a single hop the jump host's own ssh config decides.
            proxy_jump=",".join(hops[:-1]) if len(hops) > 1 else None,
            ssh_config=t.ssh_config,
        )
    )
    if not jt.identity_files and t.identity_files:
        # The cluster's key is the one the user gave us; the jump host most likely takes it too.
        jt = replace(jt, identity_file=t.identity_files)
    return jt


def _check_identity_file(t: SSHTarget, key_path: str) -> None:
    # paramiko would report a bad key file as a failed handshake; say what is really wrong.
    where = f"node {t.label}: identity file {key_path}"
    if not os.path.isfile(key_path):
        raise ConfigError(f"{where} does not exist; fix cluster.ssh.identity_file")
    try:
        paramiko.PKey.from_path(key_path)
    except TypeError as e:  # cryptography: "Password was not given but private key is encrypted"
        raise MlaunchError(
            f"{where} is passphrase-protected; load it into ssh-agent (`ssh-add {key_path}`) "
            f"and leave cluster.ssh.identity_file unset"
        ) from e
    except (ValueError, paramiko.SSHException, OSError) as e:
        raise ConfigError(
            f"{where} is not a private key paramiko can read; point cluster.ssh.identity_file "
            f"at the private key (not the .pub)"
        ) from e


def _connect_resolved(t: SSHTarget, depth: int) -> "Connection":
    for key_path in t.identity_files:
        _check_identity_file(t, key_path)

    jump: Connection | None = None
    sock = None
    if t.proxy_jump:
        if depth >= _MAX_JUMP_DEPTH:
            raise ConfigError(
                f"node {t.label}: ProxyJump chain deeper than {_MAX_JUMP_DEPTH} hops; "
                f"is there a ProxyJump loop in {t.ssh_config}?"
            )
        jt = _jump_target(t)
        try:
            jump = _connect_resolved(jt, depth + 1)
        except MlaunchError as e:
            raise MlaunchError(f"node {t.label} (via ProxyJump {jt.label}): {e}") from e
        try:
            # The jump host opens the TCP connection and resolves the name, as `ssh -J` does.
            sock = jump.transport.open_channel(
                "direct-tcpip", (t.host, t.port), ("127.0.0.1", 0), timeout=t.connect_timeout
            )
        except (paramiko.SSHException, OSError) as e:
            jump.close()
            raise MlaunchError(
                f"node {t.label}: jump host {jt.label} could not open a tunnel to "
                f"{t.host}:{t.port} ({_one_line(getattr(e, 'text', e))}); check that "
                f"{jt.host} can reach it and "
                f"allows TCP forwarding (AllowTcpForwarding)"
            ) from e

    client = paramiko.SSHClient()
    keys = _load_known_hosts(str(t.known_hosts))
    for hostname in keys.keys():
        for keytype, key in keys[hostname].items():
            client.get_host_keys().add(hostname, keytype, key)
    # Never AutoAddPolicy: unknown keys are refused, or recorded on disk with accept-new.
    client.set_missing_host_key_policy(_HostKeyPolicy(t))

    identities = list(t.identity_files)
    try:
        client.connect(
            hostname=t.host,
            port=t.port,
            username=t.user,
            key_filename=identities or None,
            # With an explicit key, use only it: an agent offering many keys can exhaust the
            # server's MaxAuthTries before the right one is tried.
            allow_agent=not identities,
            look_for_keys=not identities,
            timeout=t.connect_timeout,
            banner_timeout=t.connect_timeout,
            auth_timeout=t.connect_timeout,
            channel_timeout=t.connect_timeout,
            sock=sock,
        )
    except BaseException as e:
        client.close()
        if jump is not None:
            jump.close()
        if isinstance(e, Exception):
            raise _connect_error(t, e) from e
        raise
    transport = client.get_transport()
    assert transport is not None
    if t.keepalive:
        # Without traffic a dead node (or a NAT dropping idle flows) would go unnoticed for
        # the whole of a long, quiet training step.
        transport.set_keepalive(int(t.keepalive))
    return Connection(client, t, jump)


def _connect_error(t: SSHTarget, e: Exception) -> MlaunchError:
    """Turn what paramiko/socket raised into one line that names the node and the fix."""
    where = f"node {t.label}"
    if isinstance(e, MlaunchError):
        return e
    if isinstance(e, paramiko.BadHostKeyException):
        name = _known_hosts_name(t.host, t.port)
        return MlaunchError(
            f"{where}: host key CHANGED: the server offers {e.key.get_name()} "
            f"{_fingerprint(e.key)} but {t.known_hosts} has {_fingerprint(e.expected_key)} "
            f"(someone may be intercepting the connection); if the node was reinstalled run "
            f"`ssh-keygen -f {t.known_hosts} -R {shlex.quote(name)}` and connect again"
        )
    if isinstance(e, paramiko.PasswordRequiredException):
        return MlaunchError(
            f"{where}: identity file {', '.join(t.identity_files)} is passphrase-protected; "
            f"load it into ssh-agent (`ssh-add <key>`) and leave cluster.ssh.identity_file unset"
        )
    if isinstance(e, paramiko.AuthenticationException):
        tried = (
            f"key {', '.join(t.identity_files)}"
            if t.identity_files
            else "ssh-agent and default keys (~/.ssh/id_*)"
        )
        first_key = t.identity_files[0] if t.identity_files else "~/.ssh/id_ed25519"
        port = f"-p {t.port} " if t.port != 22 else ""
        return MlaunchError(
            f"{where}: authentication failed for user {t.user} with {tried}; authorize the key "
            f"on the node (`ssh-copy-id -i {first_key}.pub {port}{t.user}@{t.host}`) or set "
            f"cluster.ssh.identity_file"
        )
    if isinstance(e, socket.gaierror):
        return MlaunchError(
            f"{where}: cannot resolve host name {t.host!r} ({_one_line(e.strerror or e)}); "
            f"check cluster.nodes[].host and ~/.ssh/config"
        )
    if isinstance(e, (socket.timeout, TimeoutError)):
        return MlaunchError(
            f"{where}: no answer from {t.host}:{t.port} within {t.connect_timeout:g}s; check "
            f"that the node is up and the port is not firewalled, or raise "
            f"cluster.ssh.connect_timeout"
        )
    refused = isinstance(e, ConnectionRefusedError) or (
        isinstance(e, paramiko.ssh_exception.NoValidConnectionsError)
        and all(isinstance(x, ConnectionRefusedError) for x in e.errors.values())
    )
    if refused:
        return MlaunchError(
            f"{where}: connection refused on {t.host}:{t.port}; is sshd running there and "
            f"is the port right (cluster.nodes[].port)?"
        )
    # A port that accepts TCP but never speaks SSH: paramiko says "Error reading SSH protocol
    # banner", or "No existing session" when its own handshake wait runs out first.
    if isinstance(e, paramiko.SSHException) and any(
        s in str(e).lower() for s in ("banner", "no existing session")
    ):
        return MlaunchError(
            f"{where}: {t.host}:{t.port} accepted the connection but completed no SSH handshake "
            f"within {t.connect_timeout:g}s; is an SSH server listening there, and is it not "
            f"overloaded (MaxStartups)?"
        )
    if isinstance(e, paramiko.SSHException):
        return MlaunchError(
            f"{where}: SSH handshake with {t.host}:{t.port} failed ({_one_line(e)}); check that "
            f"an SSH server answers on that port"
        )
    if isinstance(e, OSError):
        return MlaunchError(
            f"{where}: cannot connect to {t.host}:{t.port} ({_one_line(e.strerror or e)}); "
            f"check the address and the network path"
        )
    return MlaunchError(f"{where}: {type(e).__name__}: {_one_line(e)}")


def connect_all(
    targets: Mapping[str, SSHTarget] | Iterable[SSHTarget], max_workers: int = 32
) -> dict[str, "Connection | Exception"]:
    """Connect to every node in parallel; per node a Connection or the exception it raised.

    Keys are the mapping's keys, or each target's `label`. Never stops at the first bad node:
    the caller reports all of them (see `check_connected`), like fabric's GroupResult.
    """
    if isinstance(targets, Mapping):
        items = [(n, t if t.name else replace(t, name=n)) for n, t in targets.items()]
    else:
        items = [(t.label, t) for t in targets]
    names = [n for n, _ in items]
    assert len(set(names)) == len(names), f"duplicate node names: {names}"
    if not items:
        return {}
    results: dict[str, Connection | Exception] = {}
    workers = max(1, min(max_workers, len(items)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mlaunch-ssh") as pool:
        futures = {name: pool.submit(connect, t) for name, t in items}
        for name, fut in futures.items():
            try:
                results[name] = fut.result()
            except Exception as e:  # one node's failure must not hide the others'
                results[name] = e
    return results


def check_connected(results: Mapping[str, "Connection | Exception"]) -> dict[str, "Connection"]:
    """The connections, or — if any node failed — close them all and raise one error that has
    one line per failed node."""
    failed = {n: r for n, r in results.items() if isinstance(r, Exception)}
    ok = {n: r for n, r in results.items() if not isinstance(r, Exception)}
    if failed:
        close_all(ok)
        lines = [_one_line(e) for e in failed.values()]
        raise MlaunchError(
            f"cannot connect to {len(failed)} of {len(results)} nodes:\n  " + "\n  ".join(lines)
        )
    return ok


def close_all(conns: Mapping[str, "Connection | Exception"] | Iterable["Connection"]) -> None:
    values = conns.values() if isinstance(conns, Mapping) else conns
    for c in values:
        if isinstance(c, Connection):
            c.close()


# --------------------------------------------------------------------------------------------
# A live connection


@dataclass
class SyncStats:
    """What one `put_tree` did."""

    files_seen: int = 0
    files_sent: int = 0
    files_unchanged: int = 0
    bytes_sent: int = 0
    dirs_created: int = 0
    excluded: int = 0
    seconds: float = 0.0
    sent: list[str] = field(default_factory=list, repr=False)  # relative paths, '/'-separated

    def __str__(self) -> str:
        return (
            f"{self.files_sent} files sent ({self.bytes_sent / 1e6:.1f} MB), "
            f"{self.files_unchanged} unchanged, {self.excluded} excluded in {self.seconds:.1f}s"
        )


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

    def _open_session(self) -> paramiko.Channel:
        try:
            return self.transport.open_session(timeout=self.target.connect_timeout)
        except (paramiko.SSHException, OSError) as e:
            raise MlaunchError(
                f"node {self.label}: cannot open an SSH session ({_one_line(e)}); the node may "
                f"be down or its sshd out of sessions (MaxSessions)"
            ) from e

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
            tail = _one_line(err_lines[-1]) if err_lines else ""
            raise MlaunchError(
                f"node {self.label}: `{_short(cmd)}` exited with {result.exit_code}"
                + (f": {tail}" if tail else "")
            )
        return result

    def _timeout(self, cmd: str, timeout: float) -> RemoteTimeout:
        return RemoteTimeout(
            f"node {self.label}: `{_short(cmd)}` did not finish within {timeout:g}s"
        )

    def start(self, cmd: str, pty: bool = True) -> "RemoteProcess":
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
                    f"node {self.label}: cannot start SFTP ({_one_line(e)}); enable the sftp "
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
        local = Path(local_root)
        if not local.is_dir():
            raise MlaunchError(f"cannot sync {local}: not a directory")
        patterns = [p.rstrip("/") for p in (*DEFAULT_EXCLUDES, *exclude_globs) if p.strip("/")]

        def excluded(rel: str, name: str) -> bool:
            return any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(rel, p) for p in patterns)

        sftp = self.sftp()
        root = _sftp_path(remote_root)
        stats = SyncStats()
        started = time.monotonic()
        current = root
        try:
            self._makedirs(sftp, root, stats)
            for dirpath, dirnames, filenames in os.walk(local):
                rel_dir = Path(dirpath).relative_to(local).as_posix()
                rel_dir = "" if rel_dir == "." else rel_dir
                current = posixpath.join(root, rel_dir) if rel_dir else root
                # One round trip per directory instead of one stat per file.
                existing = {a.filename: a for a in sftp.listdir_attr(current)}
                kept = []
                for d in sorted(dirnames):
                    rel = f"{rel_dir}/{d}" if rel_dir else d
                    full = os.path.join(dirpath, d)
                    if (
                        excluded(rel, d)
                        or os.path.islink(full)
                        or os.path.exists(os.path.join(full, "pyvenv.cfg"))
                    ):
                        stats.excluded += 1
                        continue
                    kept.append(d)
                    have = existing.get(d)
                    if have is None or not stat.S_ISDIR(have.st_mode or 0):
                        current = posixpath.join(root, rel)
                        if _mkdir(sftp, current):
                            stats.dirs_created += 1
                dirnames[:] = kept
                for fname in sorted(filenames):
                    rel = f"{rel_dir}/{fname}" if rel_dir else fname
                    if excluded(rel, fname):
                        stats.excluded += 1
                        continue
                    path = os.path.join(dirpath, fname)
                    try:
                        st = os.stat(path)  # follows symlinks to files
                    except FileNotFoundError:  # dangling symlink, or deleted meanwhile
                        continue
                    if not stat.S_ISREG(st.st_mode):
                        continue
                    stats.files_seen += 1
                    have = existing.get(fname)
                    if (
                        have is not None
                        and have.st_size == st.st_size
                        and have.st_mtime == int(st.st_mtime)
                    ):
                        stats.files_unchanged += 1
                        continue
                    current = posixpath.join(root, rel)
                    # Written beside, then renamed over: nodes sharing one filesystem may sync the
                    # same file at once, and a reader never sees half a file.
                    tmp = f"{current}.mlaunch-{os.getpid()}-{threading.get_ident()}.tmp"
                    sftp.put(path, tmp, confirm=True)
                    sftp.utime(tmp, (int(st.st_atime), int(st.st_mtime)))
                    sftp.chmod(tmp, stat.S_IMODE(st.st_mode))
                    sftp.posix_rename(tmp, current)
                    stats.files_sent += 1
                    stats.bytes_sent += st.st_size
                    stats.sent.append(rel)
                    if progress_cb is not None:
                        progress_cb(rel, st.st_size)
        except (OSError, paramiko.SSHException) as e:
            raise MlaunchError(
                f"node {self.label}: syncing {local} to {current} failed: {_one_line(e)}"
            ) from e
        stats.seconds = time.monotonic() - started
        return stats

    @staticmethod
    def _makedirs(sftp: paramiko.SFTPClient, path: str, stats: SyncStats) -> None:
        parts = [p for p in path.split("/") if p]
        cur = "/" if path.startswith("/") else ""
        for part in parts:
            cur = posixpath.join(cur, part) if cur else part
            try:
                if not stat.S_ISDIR(sftp.stat(cur).st_mode or 0):
                    raise NotADirectoryError(f"{cur} exists and is not a directory")
            except FileNotFoundError:
                if _mkdir(sftp, cur):
                    stats.dirs_created += 1

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


def _mkdir(sftp: paramiko.SFTPClient, path: str) -> bool:
    """mkdir that tolerates losing a race: another node syncing into the same shared directory
    may create it first. True when this call created it."""
    try:
        sftp.mkdir(path)
        return True
    except OSError:
        try:
            if stat.S_ISDIR(sftp.stat(path).st_mode or 0):
                return False
        except OSError:
            pass
        raise


def _sftp_path(remote: str) -> str:
    # SFTP has no shell: "~" is not expanded, but relative paths start at the login directory.
    remote = str(remote)
    if remote == "~":
        return "."
    if remote.startswith("~/"):
        return remote[2:] or "."
    return remote


def _short(cmd: str, n: int = 80) -> str:
    cmd = _one_line(cmd)
    return cmd if len(cmd) <= n else cmd[: n - 3] + "..."


# --------------------------------------------------------------------------------------------
# A streaming remote job


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


# --------------------------------------------------------------------------------------------
# Shell lines


# --------------------------------------------------------------------------------------------
# Run bookkeeping on a node: exactly the processes that carry this run's id


def _check_run_id(run_id: str) -> None:
    assert _RUN_ID.match(run_id), f"run id {run_id!r} must match {_RUN_ID.pattern}"


# The run's processes are found and ended on the node by launcher/procs.py itself, sent as the
# source of `python3 -c` (it imports only the standard library): one implementation of the
# cleanup rule for this machine and for every node. argv: run_id, mode, grace, recorded pids.
_PROC_SNIPPET = Path(procs.__file__).read_text()


@dataclass
class KillReport:
    """What `kill_run` did on one node (pids)."""

    found: list[int]
    sigterm: list[int]
    sigkill: list[int]
    remaining: list[int]

    @property
    def killed(self) -> list[int]:
        """Every process of the run that is gone now."""
        return sorted((set(self.found) | set(self.sigterm)) - set(self.remaining))


def _run_snippet(conn: Connection, args: list[str], timeout: float, python: str) -> dict:
    cmd = python_command(python, _PROC_SNIPPET, *args)
    res = conn.run(cmd, timeout=timeout)
    if not res.ok:
        tail = _one_line(res.stderr.strip().splitlines()[-1]) if res.stderr.strip() else ""
        raise MlaunchError(
            f"node {conn.label}: process cleanup needs {python} on the node and it failed "
            f"(exit {res.exit_code}{': ' + tail if tail else ''})"
        )
    return json.loads(res.stdout.strip().splitlines()[-1])


def list_run_processes(conn: Connection, run_id: str, python: str = "python3") -> list[int]:
    """Pids of the processes on this node whose environment has MLAUNCH_RUN_ID=<run_id>."""
    _check_run_id(run_id)
    return _run_snippet(conn, [run_id, "list", "0"], timeout=30.0, python=python)["pids"]


def kill_run(
    conn: Connection,
    run_id: str,
    pids: Iterable[int] = (),
    grace_s: float = 10.0,
    python: str = "python3",
) -> KillReport:
    """End exactly the processes of run `run_id` on this node.

    SIGTERM to the recorded torchrun pid(s) first (torchrun then stops its workers), up to
    `grace_s` for everything carrying the run id to exit, then SIGTERM to whatever is left,
    then SIGKILL. Never SIGKILL torchrun first: that orphans its workers. Processes of other
    runs or without the id are never touched.
    """
    _check_run_id(run_id)
    args = [run_id, "kill", repr(float(grace_s)), *(str(int(p)) for p in pids)]
    timeout = grace_s + min(grace_s, 3.0) + 3.0 + 30.0
    data = _run_snippet(conn, args, timeout=timeout, python=python)
    return KillReport(data["found"], data["sigterm"], data["sigkill"], data["remaining"])
