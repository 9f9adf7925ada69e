"""Does `launch.entrypoint` exist where it will run? Checked before anything starts: here for a
local run, on every node over SSH (backends/ssh.py), on the submitting machine for Slurm
(backends/slurm.py). One check, `MISSING_CODE`, run in-process here and as `python -c` there, so
the three cannot disagree.

A script is looked up relative to the directory the job runs in (the node's workdir); a module
(`-m pkg.mod`) the way `python -m` finds it from there, without importing it (importing would run
the package's code, maybe `import torch`, on every node just to check a name).
"""

from __future__ import annotations

import os
from typing import Any

from job.config import JobConfig
from job.errors import ConfigError

#: `missing(kind, target, cwd)` → None when found, else why not. Plain stdlib: it also runs as
#: `python -c` on a node, with that node's interpreter.
MISSING_CODE = r'''
import importlib.util, os, sys

def missing(kind, target, cwd):
    if kind == "script":
        path = os.path.join(cwd, os.path.expanduser(target))
        if os.path.isfile(path):
            return None
        return "is a directory, not a script" if os.path.isdir(path) else "no such file"
    top, *rest = target.split(".")
    sys.path.insert(0, cwd)  # `python -m` puts the working directory first
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        spec = None
    finally:
        sys.path.pop(0)
    if spec is None:
        return f"no module named {top!r}"
    places = list(spec.submodule_search_locations or [])
    for i, part in enumerate(rest):
        found = [p for p in places if os.path.isfile(os.path.join(p, part + ".py"))
                 or os.path.isdir(os.path.join(p, part))]
        if not found:
            return f"no module named {'.'.join([top, *rest[:i + 1]])!r}"
        places = [os.path.join(p, part) for p in found if os.path.isdir(os.path.join(p, part))]
    return None
'''

_CHECK_MAIN = MISSING_CODE + r'''
why = missing(sys.argv[1], sys.argv[2], os.getcwd())
if why:
    print(why)
    sys.exit(1)
'''


def target(cfg: JobConfig) -> tuple[str, str] | None:
    """(`script` | `module`, its path or dotted name), or None for the built-in trainer."""
    entry = cfg.launch.entrypoint
    if entry is None:
        return None
    return ("module", entry[1]) if entry[0] == "-m" else ("script", entry[0])


def describe(kind: str, name: str) -> str:
    return f"entrypoint {'module' if kind == 'module' else 'script'} {name}"


def check_here(cfg: JobConfig, cwd: str = ".") -> None:
    """Raise one ConfigError when the entrypoint is not found under `cwd` on this machine."""
    found = target(cfg)
    if found is None:
        return
    ns: dict[str, Any] = {}
    exec(compile(MISSING_CODE, "<entrypoint check>", "exec"), ns)
    why = ns["missing"](*found, os.path.abspath(os.path.expanduser(cwd)))
    if why:
        raise ConfigError(f"{describe(*found)}: {why} (looked in {os.path.abspath(cwd)}); fix launch.entrypoint "
                          "(or the words after `--`), relative to the directory the job runs in")


def remote_check_argv(cfg: JobConfig) -> tuple[str, list[str]] | None:
    """(python code, its arguments) that a node runs in its workdir; exit 1 prints why."""
    found = target(cfg)
    return None if found is None else (_CHECK_MAIN, list(found))


def failure_line(cfg: JobConfig, failures: dict[str, str], where: str) -> str:
    """One line for every node that lacks the entrypoint: `node: why` each."""
    found = target(cfg)
    assert found is not None
    nodes = "; ".join(f"{n}: {why}" for n, why in failures.items())
    return (f"{describe(*found)} not found on {len(failures)} {where} ({nodes}); nothing started. Put it there "
            "(or set cluster.sync: true to push the project), relative to each node's workdir")
