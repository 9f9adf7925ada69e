"""Host keys: known_hosts read the way ssh reads it, keys appended (never rewritten) under
`accept-new`, SHA256 fingerprints for messages, and the policy paramiko calls for a host it has
no key for — which refuses it with the command that records the key, unless the target says
`accept-new`. There is no AutoAddPolicy anywhere: a host key is never trusted silently.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import os
import threading

import paramiko

from job.errors import MlaunchError
from launcher.ssh.errors import one_line
from launcher.ssh.target import SSHTarget

# accept-new may append to the same known_hosts from several connect_all threads at once.
_KNOWN_HOSTS_LOCK = threading.Lock()


def fingerprint(key: paramiko.PKey) -> str:
    """`SHA256:...`, as `ssh` and `ssh-keygen -l` print a key."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def known_hosts_name(host: str, port: int) -> str:
    """How known_hosts names `host` on `port`."""
    # OpenSSH (and paramiko's lookup) write non-default ports as [host]:port.
    return host if port == 22 else f"[{host}]:{port}"


def load_known_hosts(path: str) -> paramiko.HostKeys:
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
            raise MlaunchError(f"cannot read known_hosts {p}: {one_line(e)}") from e
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


class HostKeyPolicy(paramiko.MissingHostKeyPolicy):
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
            f"({key.get_name()} {fingerprint(key)}); {how} "
            f"or set cluster.ssh.host_key_policy: accept-new"
        )
