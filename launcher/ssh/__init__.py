"""The one seam between mlaunch and SSH: every use of paramiko lives in this package, and this
file is its only public surface (`from launcher import ssh`; `ssh.connect(...)`).

Import it lazily (inside the function that needs it): paramiko and cryptography cost import time
that `mlaunch --help` and `mlaunch plan` should not pay. It takes plain arguments (`SSHTarget`,
argv lists, env dicts) and knows nothing of the YAML config or the plan.

What it gives the launcher, and where each part lives:
- `target.py`: `SSHTarget` and `resolve(target)` — ~/.ssh/config applied, ProxyJump parsed.
- `hostkeys.py`: host keys checked against known_hosts, never silently trusted
  (`host_key_policy`: reject, or accept-new to record a first-seen key).
- `connecting.py`: `connect(target)` / `connect_all(targets)` / `check_connected` / `close_all` —
  every failure turned into one line that names the node and says how to fix it; `connect_all`
  collects a connection *or* an exception per node and never stops at the first bad one.
- `connection.py`: `Connection.run` (drains stdout and stderr while waiting, with a deadline),
  `Connection.start` (a streaming job in a pty, so an SSH hangup reaches it; `process.py`'s
  `RemoteProcess`), `Connection.put_text` (one file, atomically), `Connection.ping` (the SSH
  round trip), `Connection.put_tree` (SFTP sync of only the changed files; `sftp.py`).
- `cleanup.py`: `list_run_processes` / `kill_run` — find and end exactly the processes whose
  environment carries `MLAUNCH_RUN_ID=<run id>`.
- `errors.py`: `RemoteTimeout` and the one-line message helpers the modules share.

The remote side is a login shell of the node's user (sshd runs `$SHELL -c <command>`), assumed
POSIX (sh, bash, dash, zsh). Its PATH is sshd's default, not the launcher's: a virtualenv's bin
directory is not on it, so callers pass interpreters by absolute path (`cluster.python`).
"""

import logging

# paramiko logs failures (e.g. "Secsh channel 0 open FAILED") that we turn into one-line
# MlaunchErrors; without a handler of its own, Python's last-resort handler would print them to
# stderr as well. Records still propagate to the root logger if the application configures one.
logging.getLogger("paramiko").addHandler(logging.NullHandler())

from launcher.ssh.cleanup import KillReport, kill_run, list_run_processes, signal_workers  # noqa: E402
from launcher.ssh.connecting import check_connected, close_all, connect, connect_all  # noqa: E402
from launcher.ssh.connection import Connection, Result  # noqa: E402
from launcher.ssh.errors import RemoteTimeout  # noqa: E402
from launcher.ssh.process import RemoteProcess  # noqa: E402
from launcher.ssh.sftp import DEFAULT_EXCLUDES, SyncStats  # noqa: E402
from launcher.ssh.target import HOST_KEY_POLICIES, SSHTarget, resolve  # noqa: E402

__all__ = [
    "DEFAULT_EXCLUDES",
    "HOST_KEY_POLICIES",
    "Connection",
    "KillReport",
    "RemoteProcess",
    "RemoteTimeout",
    "Result",
    "SSHTarget",
    "SyncStats",
    "check_connected",
    "close_all",
    "connect",
    "connect_all",
    "kill_run",
    "list_run_processes",
    "resolve",
    "signal_workers",
]
