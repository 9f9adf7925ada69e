"""Project sync over SFTP: `put_tree` sends only new or changed files (size + mtime), renames
each one into place whole, and tolerates other nodes syncing into the same shared directory at
the same time. `Connection.put_tree` is the way in; this module only needs an SFTP client.
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import paramiko

from job.errors import MlaunchError
from launcher.ssh.errors import one_line

#: Never pushed to the nodes: VCS data, virtualenvs (also any directory holding pyvenv.cfg, checked
#: separately), bytecode and tool caches. Callers add the run output directories.
DEFAULT_EXCLUDES = (".git", ".hg", ".venv", "venv", "__pycache__", "*.pyc", ".pytest_cache")


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


def put_tree(
    open_sftp: Callable[[], paramiko.SFTPClient],
    local_root: str | os.PathLike,
    remote_root: str,
    label: str,
    exclude_globs: Iterable[str] = (),
    progress_cb: Callable[[str, int], None] | None = None,
) -> SyncStats:
    """`Connection.put_tree` (see there), given the node's `label` and a function that returns
    its SFTP client (called once `local_root` is known to be a directory)."""
    local = Path(local_root)
    if not local.is_dir():
        raise MlaunchError(f"cannot sync {local}: not a directory")
    patterns = [p.rstrip("/") for p in (*DEFAULT_EXCLUDES, *exclude_globs) if p.strip("/")]

    def excluded(rel: str, name: str) -> bool:
        return any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(rel, p) for p in patterns)

    sftp = open_sftp()
    root = _sftp_path(remote_root)
    stats = SyncStats()
    started = time.monotonic()
    current = root
    try:
        _makedirs(sftp, root, stats)
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
            f"node {label}: syncing {local} to {current} failed: {one_line(e)}"
        ) from e
    stats.seconds = time.monotonic() - started
    return stats


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
