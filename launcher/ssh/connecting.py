"""Opening connections: `connect` (one node, through its ProxyJump chain if it has one),
`connect_all` / `check_connected` / `close_all` (every node at once, a connection *or* an
exception per node, like fabric's GroupResult), and `_connect_error`, which turns whatever
paramiko or the socket raised into one line that names the node and says how to fix it.

(Named `connecting`, not `connect`, so that the submodule does not shadow `ssh.connect`.)
"""

from __future__ import annotations

import os
import shlex
import socket
from dataclasses import replace
from typing import Iterable, Mapping

import paramiko

from job.errors import ConfigError, MlaunchError
from launcher.ssh.connection import Connection
from launcher.ssh.errors import one_line
from launcher.ssh.hostkeys import HostKeyPolicy, fingerprint, known_hosts_name, load_known_hosts
from launcher.ssh.target import SSHTarget, jump_target, resolve

_MAX_JUMP_DEPTH = 8


def connect(target: SSHTarget) -> Connection:
    """Open an authenticated SSH connection to one node, or raise a one-line MlaunchError."""
    return _connect_resolved(resolve(target), depth=0)


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


def _connect_resolved(t: SSHTarget, depth: int) -> Connection:
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
        jt = jump_target(t)
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
                f"{t.host}:{t.port} ({one_line(getattr(e, 'text', e))}); check that "
                f"{jt.host} can reach it and "
                f"allows TCP forwarding (AllowTcpForwarding)"
            ) from e

    client = paramiko.SSHClient()
    keys = load_known_hosts(str(t.known_hosts))
    for hostname in keys.keys():
        for keytype, key in keys[hostname].items():
            client.get_host_keys().add(hostname, keytype, key)
    # Never AutoAddPolicy: unknown keys are refused, or recorded on disk with accept-new.
    client.set_missing_host_key_policy(HostKeyPolicy(t))

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
        name = known_hosts_name(t.host, t.port)
        return MlaunchError(
            f"{where}: host key CHANGED: the server offers {e.key.get_name()} "
            f"{fingerprint(e.key)} but {t.known_hosts} has {fingerprint(e.expected_key)} "
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
            f"{where}: cannot resolve host name {t.host!r} ({one_line(e.strerror or e)}); "
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
            f"{where}: SSH handshake with {t.host}:{t.port} failed ({one_line(e)}); check that "
            f"an SSH server answers on that port"
        )
    if isinstance(e, OSError):
        return MlaunchError(
            f"{where}: cannot connect to {t.host}:{t.port} ({one_line(e.strerror or e)}); "
            f"check the address and the network path"
        )
    return MlaunchError(f"{where}: {type(e).__name__}: {one_line(e)}")


def connect_all(
    targets: Mapping[str, SSHTarget] | Iterable[SSHTarget], max_workers: int = 32
) -> dict[str, Connection | Exception]:
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
    from launcher.fanout import fan_out

    return dict(fan_out(lambda _name, t: connect(t), dict(items), max_workers).results)  # type: ignore[arg-type]


def check_connected(results: Mapping[str, Connection | Exception]) -> dict[str, Connection]:
    """The connections, or — if any node failed — close them all and raise one error that has
    one line per failed node."""
    failed = {n: r for n, r in results.items() if isinstance(r, Exception)}
    ok = {n: r for n, r in results.items() if not isinstance(r, Exception)}
    if failed:
        close_all(ok)
        lines = [one_line(e) for e in failed.values()]
        raise MlaunchError(
            f"cannot connect to {len(failed)} of {len(results)} nodes:\n  " + "\n  ".join(lines)
        )
    return ok


def close_all(conns: Mapping[str, Connection | Exception] | Iterable[Connection]) -> None:
    """Close every Connection among `conns` (exceptions from `connect_all` are skipped)."""
    values = conns.values() if isinstance(conns, Mapping) else conns
    for c in values:
        if isinstance(c, Connection):
            c.close()
