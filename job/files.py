"""Atomic publication: a file or folder appears whole under its final name, or not at all.

Both helpers write into a private temporary beside the target (same folder, so same filesystem)
and rename it into place in one step. A reader, another rank or node, or a crash never sees half
of it; a failure while writing removes the temporary and leaves the target as it was.

    publish_file(run_dir / "config.yaml", to_yaml(job))
    publish_dir(cache_dir / f"data-{key}", write, replace_existing=False)   # write(tmp) fills tmp

Torch-free: the launcher and the ranks both use it.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path


def _tmp_name(final: Path, what: str) -> Path:
    # The pid says who left it behind; the random part keeps two hosts with equal pids (containers)
    # that share the folder apart.
    return final.with_name(f".{final.name}.{what}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def publish_file(path: str | os.PathLike[str], data: str | bytes, *, fsync: bool = False) -> Path:
    """Write `data` (str: as UTF-8) to `path` atomically, replacing any file already there.

    `fsync`: flush the bytes to disk before the rename, so a power loss cannot leave the new
    name pointing at an empty file. The file gets the modes a plain `open` gives (the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path, "tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def publish_dir(final: str | os.PathLike[str], write: Callable[[Path], None], *, replace_existing: bool,
                fsync: bool = False) -> bool:
    """Fill a fresh empty folder with `write(tmp)`, then rename it to `final`.

    `replace_existing=False` — first one wins, for content-keyed folders that several ranks or
    nodes may build at once (a data cache): if `final` already exists when ours is done, ours is
    discarded and `final` kept. Returns False in that case.

    `replace_existing=True` — ours replaces an old `final` (a re-export): the old one is moved
    aside, ours renamed in, the old one deleted. A crash before the swap leaves the old `final`
    untouched. Returns True.

    `fsync`: every file under tmp (and tmp itself) is flushed to disk before the rename. The
    folder is made with the modes a plain `mkdir` gives (the umask); the files keep whatever
    modes `write` gave them. On any error tmp is removed and the error raised."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(final, "tmp")
    tmp.mkdir()
    try:
        write(tmp)
        if fsync:
            for f in sorted(tmp.rglob("*"), reverse=True):  # files before the folders holding them
                _fsync(f)
            _fsync(tmp)
        if not replace_existing:
            try:
                os.rename(tmp, final)
            except OSError:
                if not final.is_dir():  # not "another rank or node published it first"
                    raise
                return False
            return True
        old = None
        if final.exists():
            old = _tmp_name(final, "old")
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
        return True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when the rename happened


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
