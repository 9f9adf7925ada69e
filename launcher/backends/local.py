"""The local backend: `torchrun --standalone` on this machine (`mlaunch run --standalone`, or a
config without `cluster`). Stopping: SIGTERM to torchrun (it stops its workers), SIGKILL to its
process group only after the grace period, then everything carrying the run id."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from job.errors import MlaunchError
from launcher.backends.base import Backend, Job, NodeOutcome, Worker
from launcher.plan import NodePlan, Plan
from launcher.planning import write_resolved_config

#: torchrun writes its root-cause failure here (see `user_error`), next to local.log.
ERROR_FILE = "torchrun-error.json"


_PR_SET_PDEATHSIG = 1


def _end_with_parent() -> None:
    """In the child, before exec: SIGTERM when the supervisor dies, even by SIGKILL — torchrun
    then stops its workers, so a killed supervisor (a detached one too) leaves nothing behind.
    Over SSH the pty's hangup does the same."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() == 1:  # the parent died before the prctl: too late to be told
        os.kill(os.getpid(), signal.SIGTERM)


class LocalBackend(Backend):
    name = "local"

    def setup(self, plan: Plan) -> None:
        write_resolved_config(plan.resolved, Path(plan.config_path))

    def start(self, plan: Plan) -> Job:
        node = plan.nodes[0]
        error_file = Path(plan.output_dir) / "logs" / ERROR_FILE
        error_file.parent.mkdir(parents=True, exist_ok=True)
        error_file.unlink(missing_ok=True)  # an earlier run's failure is not this one's
        # torchrun (its main is `@record`ed) copies the first failed worker's error file to its own
        # TORCHELASTIC_ERROR_FILE; each worker gets a file of its own from torchrun, not this one.
        env = {**os.environ, **node.env, "TORCHELASTIC_ERROR_FILE": str(error_file)}
        # torchrun sets 1 thread per process, with a banner, when this is unset: the cores divided
        # among the processes is what the banner itself asks for.
        env.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // max(1, node.nproc_per_node))))
        try:
            # A new session: the terminal's Ctrl-C reaches only us, and we stop torchrun in order.
            proc = subprocess.Popen(node.argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_end_with_parent)
        except OSError as e:
            raise MlaunchError(f"cannot start torchrun ({node.python}): {e.strerror}; check the python interpreter") from None
        return LocalJob(plan, node, proc, error_file)

    def describe(self, plan: Plan) -> str:
        return (f"torchrun --standalone, {plan.nodes[0].nproc_per_node} process(es), "
                f"{plan.running()}, outputs in {plan.output_dir}/")


class LocalWorker(Worker):
    def __init__(self, proc: subprocess.Popen, log_path: Path) -> None:
        self.name, self.proc, self.log_path = "local", proc, log_path

    def lines(self) -> Iterator[str]:
        assert self.proc.stdout is not None
        for raw in iter(self.proc.stdout.readline, b""):
            yield raw.decode(errors="replace")

    def outcome(self) -> NodeOutcome:
        code = self.proc.wait()
        return NodeOutcome(code=code if code >= 0 else -1)


class LocalJob(Job):
    def __init__(self, plan: Plan, node: NodePlan, proc: subprocess.Popen, error_file: Path) -> None:
        self.plan, self.node, self.proc, self.error_file = plan, node, proc, error_file
        self.worker = LocalWorker(proc, Path(plan.output_dir) / "logs" / "local.log")

    def workers(self) -> list[Worker]:
        return [self.worker]

    def stop(self, grace_s: float, force: bool = False) -> list[str]:
        from launcher import procs

        if force:
            procs.signal_workers(self.plan.run_id, signal.SIGKILL)
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout=grace_s + 5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # only now: a SIGKILL first would orphan the workers
            except ProcessLookupError:
                pass
        self.proc.wait()
        left = procs.end_run(self.plan.run_id, grace_s=grace_s)["sigterm"]
        return [f"ended {len(left)} leftover process(es) of run {self.plan.run_id}"] if left else []

    def failure_cause(self, worker: Worker) -> str | None:
        return user_error(self.error_file)

    def dump_stacks(self) -> None:
        from launcher import procs

        procs.signal_workers(self.plan.run_id, signal.SIGUSR1)

    def record(self) -> dict[str, Any]:
        return {"nodes": {"local": {"host": "localhost", "pid": self.proc.pid, "sid": self.proc.pid}}}


def error_message(error_file: Path) -> str | None:
    """The message of torchrun's root-cause error file (see `message_of`)."""
    try:
        return message_of(error_file.read_text())
    except OSError:
        return None


def message_of(text: str | None) -> str | None:
    """The message in the text of torchrun's error file, `{"message": {"message": ...}}`."""
    try:
        return str(json.loads(text)["message"]["message"]) if text else None
    except (ValueError, KeyError, TypeError):
        return None


def user_error(error_file: Path) -> str | None:
    """The failed rank's one-line user error (a MlaunchError, which train/__main__.py records for
    torchrun), read from torchrun's root-cause error file — there even when --local-ranks-filter
    hides that rank's output. The file is torchrun's JSON,
    `{"message": {"message": "<exception type>: <text>", "extraInfo": {...}}}`; None for any
    other failure (a crash's traceback is in torchrun's summary) or when there is no file."""
    return user_error_in(error_message(error_file))


def user_error_in(message: str | None) -> str | None:
    """The one-line user error in an error file's message (see `user_error`)."""
    if message is None:
        return None
    kind, sep, text = message.partition(": ")
    lines = text.strip().splitlines()
    return lines[0] if sep and lines and kind in _user_error_kinds() else None


def _user_error_kinds(cls: type = MlaunchError) -> set[str]:
    """MlaunchError and its subclasses, by the bare type name torchrun's error file records."""
    return {cls.__name__}.union(*(_user_error_kinds(sub) for sub in cls.__subclasses__()))
