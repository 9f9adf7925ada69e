"""Where a node is and how to reach it: `SSHTarget`, ~/.ssh/config applied by `resolve`, and the
ProxyJump chain parsed into the target of the next hop (`jump_target`).

Nothing here opens a connection: `connecting.py` takes a resolved target and dials it.
"""

from __future__ import annotations

import getpass
import os
from dataclasses import dataclass, replace
from typing import Mapping, Sequence

import paramiko

from job.errors import ConfigError
from launcher.ssh.errors import one_line

HOST_KEY_POLICIES = ("reject", "accept-new")


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
            raise ConfigError(f"cannot use ssh config {cfg_path}: {one_line(e)}") from e

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


def jump_target(t: SSHTarget) -> SSHTarget:
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
