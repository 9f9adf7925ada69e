"""What every backend gives the launch flow (launcher/launch.py) and the supervisor
(launcher/supervisor.py): SkyPilot's provision / setup / execute / teardown, torch elastic's
start / monitor / stop, cut to what a torchrun launcher needs.

A backend knows its substrate (this machine, SSH nodes, a Slurm allocation); it knows nothing of
streaming, watchdogs, reports or exit codes: those are the supervisor's, the same for all.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from job.config import JobConfig
from launcher.plan import Plan


@dataclass
class Provisioned:
    """What provisioning found out, for the plan: node addresses and GPU counts by node index."""

    addrs: dict[int, str] = field(default_factory=dict)
    gpus: dict[int, int] | None = None


@dataclass
class NodeOutcome:
    """How one node's job ended: an exit code, or lost (the reason), and when it was seen."""

    code: int | None = None  # -1: ended by a signal, no code
    lost: str | None = None  # "lost its SSH connection", ...
    at: float = 0.0  # time.time() the end was seen: the first failure is the earliest


class Worker(ABC):
    """One node's running job, as the supervisor sees it: a stream of lines, then an outcome."""

    name: str
    #: Where the supervisor appends this node's output; None when the node writes its own log
    #: (Slurm tasks write <output_dir>/logs/<node>.log on the shared filesystem).
    log_path: Path | None

    @abstractmethod
    def lines(self) -> Iterator[str]:
        """The node's output, line by line, until its job ends (or its transport dies: raise)."""

    @abstractmethod
    def outcome(self) -> NodeOutcome:
        """After `lines` ended: how the job ended (may block briefly)."""


class Job(ABC):
    """A started run: the per-node workers and how to watch and stop the whole of it."""

    @abstractmethod
    def workers(self) -> list[Worker]:
        """The nodes' workers so far (a Slurm job has none until it runs)."""

    def poll(self) -> dict[str, NodeOutcome]:
        """Called by the supervisor every tick: notice what only polling shows (a dead transport,
        a scheduler state change). Returns nodes found lost this way. Never blocks for long."""
        return {}

    def finished(self, outcomes: dict[str, NodeOutcome]) -> bool:
        """The job as a whole is over (given every ended node's outcome so far)."""
        names = [w.name for w in self.workers()]
        return bool(names) and all(n in outcomes for n in names)

    def final(self) -> tuple[int, str | None]:
        """After `finished` with no node failed: the job's exit code and, if not 0, why."""
        return 0, None

    @abstractmethod
    def stop(self, grace_s: float, force: bool = False) -> list[str]:
        """Stop every node, and verify nothing is left; the problems found, as lines to say.
        `force`: the ranks are hung or their peers gone (blocked in a collective, deaf to SIGTERM
        until it returns): SIGKILL them first, then stop torchrun as usual."""

    def waiting(self) -> bool:
        """Silence is expected now (a Slurm job pending in the queue says so itself)."""
        return False

    def stopped_note(self) -> str:
        """After `stop`: what is known of the nodes now (said to the user)."""
        return "no process of the run is left"

    def secondary(self, worker: Worker) -> bool:
        """The node failed because a peer did (its ranks lost a connection): not the one to name."""
        return False

    def dump_stacks(self) -> None:
        """Ask every rank that can answer to write its Python stacks (SIGUSR1: train/heartbeat.py)."""

    def collect_stacks(self, dest: Path) -> int:
        """Bring the ranks' stack files to `dest` (where not already there); how many have content."""
        return count_stacks(dest)

    def failure_cause(self, worker: Worker) -> str | None:
        """The failed node's own one-line reason (a rank's user error), when the backend can read it."""
        return None

    @abstractmethod
    def record(self) -> dict[str, Any]:
        """Per node, what teardown needs to find the run again (pids, hosts, job ids): run.json."""

    def close(self) -> None:
        """Release connections; the processes are gone by now."""


class Backend(ABC):
    """One way to run a plan: provision → (plan) → setup → start; the job stops itself."""

    name: str  # local | ssh | slurm

    def __init__(self, cfg: JobConfig) -> None:
        self.cfg = cfg

    def provision(self) -> Provisioned:
        """Reach the nodes and learn what the plan needs; every node's failure reported, nothing started."""
        return Provisioned()

    @abstractmethod
    def setup(self, plan: Plan) -> None:
        """Code and the resolved config on every node, ports checked. Nothing started yet."""

    @abstractmethod
    def start(self, plan: Plan) -> Job:
        """Start the job on every node."""

    def teardown(self) -> None:
        """Release what provisioning opened (connections). Always called."""

    def describe(self, plan: Plan) -> str:
        return f"{len(plan.nodes)} node(s), world size {plan.world_size}, {plan.running()}"


def stacks_script(folder: str) -> str:
    """Shell that prints every non-empty rank stack file under `folder`, each after `==> path <==`."""
    return f'for f in {folder}/rank-*.txt; do [ -s "$f" ] && echo "==> $f <==" && cat "$f"; done; true'


def save_stacks(text: str, path: Path) -> int:
    """What `stacks_script` printed, kept at `path` (when there is any); how many ranks answered."""
    if text.strip():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return text.count("==> ")


def count_stacks(folder: Path) -> int:
    """Stack files with content (ranks that answered) in `folder` and its sub-folders."""
    return sum(1 for p in folder.rglob("*.txt") if p.stat().st_size > 0) if folder.is_dir() else 0
