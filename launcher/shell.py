"""Shell lines for the nodes: pure string building, shared by the plan (what is shown) and the
SSH runner (what is run), so the two can never differ."""

from __future__ import annotations

import re
import shlex
from typing import Mapping, Sequence

from job.errors import ConfigError
from launcher.procs import RUN_ID_VAR

#: First line a job prints (see `job_command`): the pid of the shell that then execs the job.
PID_MARKER = "MLAUNCH_PID="

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*\Z")


def check_env_names(env: Mapping[str, str]) -> None:
    for k in env:
        if not _ENV_NAME.match(k):
            raise ConfigError(
                f"environment variable name {k!r} is not valid (letters, digits and _, not "
                f"starting with a digit); fix cluster.env"
            )


def quote_path(path: str) -> str:
    # Keep a leading ~/ unquoted so the remote shell expands it; quote the rest.
    path = str(path)
    if path == "~":
        return "~"
    if path.startswith("~/"):
        return "~/" + shlex.quote(path[2:])
    return shlex.quote(path)


def shell_command(
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    prelude: str | None = None,
    exec_: bool = True,
) -> str:
    """One `sh -c`-safe line: `cd <cwd> && <prelude> && exec env K=V ... argv...`.

    Every argument and env value is quoted with shlex.quote, so `$(...)`, backticks, quotes,
    spaces and newlines arrive verbatim. The environment goes into the command itself because
    sshd drops paramiko's `environment=` unless the server has `AcceptEnv`. `prelude` is shell
    code run first (e.g. `. .venv/bin/activate`) and is NOT quoted. With `exec_` the shell is
    replaced by the program, so the program gets the pty's hangup and keeps the shell's pid.
    """
    assert argv, "argv must not be empty"
    env = dict(env or {})
    check_env_names(env)
    steps = []
    if cwd:
        steps.append("cd " + quote_path(cwd))
    if prelude and prelude.strip():
        steps.append(prelude.strip())
    words = ["exec"] if exec_ else []
    if env:
        words.append("env")
        words += [f"{k}={shlex.quote(str(v))}" for k, v in env.items()]
    # argv[0] may be `~/venv/bin/python`: its tilde must reach the shell unquoted to expand.
    words += [quote_path(str(argv[0]))] + [shlex.quote(str(a)) for a in argv[1:]]
    steps.append(" ".join(words))
    return " && ".join(steps)


def threads_line(processes: int) -> str:
    """Shell that sets OMP_NUM_THREADS, unless already set, to the node's cores (those this shell
    may use: nproc honours cpusets and Slurm's binding) divided among its `processes`. Unset,
    torchrun sets 1 per process and prints a banner asking for exactly this."""
    cores = "$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN)"
    return (f'if [ -z "${{OMP_NUM_THREADS:-}}" ]; then OMP_NUM_THREADS=$(( {cores} / {int(processes)} )); '
            f'[ "$OMP_NUM_THREADS" -ge 1 ] 2>/dev/null || OMP_NUM_THREADS=1; export OMP_NUM_THREADS; fi')


def job_command(
    argv: Sequence[str],
    env: Mapping[str, str] | None,
    run_id: str,
    cwd: str | None = None,
    prelude: str | None = None,
    processes: int | None = None,
) -> str:
    """The line that starts one node's job (torchrun) for `Connection.start(..., pty=True)`.

    It prints `MLAUNCH_PID=$$` first — `$$` survives `exec`, so it is the job's own pid, which
    is also its process group and session (sshd makes the pty's shell a session leader) — and
    puts `MLAUNCH_RUN_ID=<run_id>` into the job's environment, which torchrun's workers inherit,
    so `kill_run` can find every process of the run later. With `processes` (ranks on the node),
    OMP_NUM_THREADS is set from the node's cores when neither the environment nor `env` sets it.
    """
    assert _RUN_ID.match(run_id), f"run id {run_id!r} must match {_RUN_ID.pattern}"
    full_env = {**(env or {}), RUN_ID_VAR: run_id}
    marker = f"printf '{PID_MARKER}%s\\n' \"$$\""
    if processes and "OMP_NUM_THREADS" not in full_env:
        prelude = threads_line(processes) + (f" && {prelude.strip()}" if prelude and prelude.strip() else "")
    return f"{marker}; " + shell_command(argv, full_env, cwd=cwd, prelude=prelude, exec_=True)


def python_command(python: str, code: str, *args: str) -> str:
    """`<python> -c <code> <args>` as one line for a node's shell: the code and arguments quoted,
    a leading `~/` of the interpreter left to expand (cluster.python is often ~/venv/bin/python)."""
    return " ".join([quote_path(python), "-c", shlex.quote(code), *(shlex.quote(str(a)) for a in args)])
