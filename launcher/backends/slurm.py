"""The Slurm backend: nodes come from an allocation, not a list. On a login node `mlaunch run`
writes the plan's batch script to `<output_dir>/slurm/`, submits it (`sbatch --parsable`) and
follows the job (pending → running → requeued → … → done) through `scontrol show job`; inside an
existing allocation (`salloc`, or the user's own sbatch script: `SLURM_JOB_ID` is set) it runs the
same script directly, whose `srun` then starts one step in that allocation.

The nodes write their own logs (`<output_dir>/logs/<node>.log`, on the filesystem that login and
compute nodes share, as on every Slurm cluster); the workers here follow those files, so a
requeued job's output continues in the same stream. Stopping is `scancel`: Slurm ends every
process of the job on every node.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from job.config import JobConfig, to_yaml
from job.errors import ConfigError, MlaunchError
from job.markers import EXIT, PEER_LOST, SIGNAL_DEATH
from launcher.backends.base import Backend, Job, NodeOutcome, Provisioned, Worker, count_stacks, save_stacks, stacks_script
from launcher.backends.local import user_error_in
from launcher.backends.slurm_host import LocalHost, LoginHost, Ran, SlurmHost
from launcher.console import say
from launcher.plan import Plan, submit_dir
from launcher.planning import write_resolved_config

POLL_S = 1.0
_CMD_TIMEOUT_S = 30.0

#: Job states after which nothing more happens (REQUEUED / PREEMPTED go back to PENDING).
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "SPECIAL_EXIT", "REVOKED"}

#: Pending reasons that cannot clear by waiting, and how to fix each. sbatch accepts such jobs
#: (`-N3` on a 2-node partition pends forever as PartitionNodeLimit): they are cancelled at once.
HOPELESS = {
    "PartitionNodeLimit": "more nodes than the partition allows: lower cluster.slurm.nodes or pick another cluster.slurm.partition (`sinfo -s`)",
    "PartitionTimeLimit": "cluster.slurm.time exceeds the partition's limit: lower it (`sinfo -o '%P %l'`)",
    "PartitionConfig": "the partition cannot run this job as asked (nodes, GPUs, features): lower cluster.slurm.nodes / gpus_per_node or pick another partition (`sinfo -s`)",
    "BadConstraints": "no node has those features or GPUs: check cluster.slurm.constraint / gpus_per_node against `sinfo -o '%N %f %G'`",
    "InvalidAccount": "set cluster.slurm.account to an account you belong to (`sacctmgr show assoc user=$USER`)",
    "InvalidQOS": "set cluster.slurm.qos to a QOS your account may use",
    "AccountNotAllowed": "this account may not use the partition: change cluster.slurm.account or partition",
    "QOSNotAllowed": "this QOS may not use the partition: change cluster.slurm.qos or partition",
    "QOSMaxNodePerJobLimit": "more nodes than the QOS allows per job: lower cluster.slurm.nodes or change qos",
    "QOSMaxWallDurationPerJobLimit": "cluster.slurm.time exceeds the QOS's limit: lower it",
    "AssocMaxNodesPerJobLimit": "more nodes than your association allows per job: lower cluster.slurm.nodes",
    "AssocMaxWallDurationPerJobLimit": "cluster.slurm.time exceeds your association's limit: lower it",
}

_TOOLS = ("sbatch", "srun", "scontrol", "scancel")


def require_tools(host: SlurmHost, names: tuple[str, ...] = _TOOLS) -> None:
    missing = host.missing(names)
    if missing:
        where = "" if host.where == "here" else f" on the {host.where}"
        raise MlaunchError(f"{', '.join(missing)} not found on PATH{where}: run mlaunch on a Slurm login node, or "
                           "install Slurm's client commands (Debian: `apt install slurm-client`; HPC sites: `module load slurm`"
                           + (" in cluster.setup)" if where else ")"))


def slurm_cmd(host: SlurmHost, *argv: str, timeout: float = _CMD_TIMEOUT_S, check: bool = False) -> Ran:
    """A Slurm client command with that host's environment (SLURM_CONF, SBATCH_* and all)."""
    try:
        res = host.run(list(argv), timeout=timeout)
    except subprocess.TimeoutExpired:
        raise MlaunchError(f"`{' '.join(argv[:3])}` did not answer within {timeout:g}s: is slurmctld up (`scontrol ping`)?") from None
    except FileNotFoundError:
        require_tools(host, (argv[0],))
        raise
    if check and res.returncode != 0:
        raise MlaunchError(f"`{' '.join(argv[:3])}` failed: {first_line(res.stderr) or f'exit {res.returncode}'}")
    return res


def first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


#: Tries of `scontrol show job` before the job's state counts as unknowable.
JOB_INFO_TRIES = 3


def job_info(host: SlurmHost, job_id: str) -> dict[str, str] | None:
    """`scontrol show job -o`, as key → value; None once the job is gone from the controller."""
    for attempt in range(JOB_INFO_TRIES):
        res = slurm_cmd(host, "scontrol", "show", "job", "-o", job_id)
        if res.returncode == 0:
            return parse_fields(res.stdout)
        if "Invalid job id" in res.stderr:
            return None
        # A busy controller can fail a query without a word: one poll lost is not a run lost.
        time.sleep(0.5 * (attempt + 1))
    raise MlaunchError(f"`scontrol show job {job_id}` failed {JOB_INFO_TRIES} times: "
                       f"{first_line(res.stderr) or f'exit code {res.returncode}'}; is slurmctld up (`scontrol ping`)?")


def parse_fields(line: str) -> dict[str, str]:
    """`Key=Value Key2=Value with spaces ...` (scontrol's one-line form) as a dict."""
    fields: dict[str, str] = {}
    for m in re.finditer(r"(?:^|\s)([A-Za-z][A-Za-z0-9_:/]*)=(.*?)(?=\s+[A-Za-z][A-Za-z0-9_:/]*=|\s*$)", line.strip()):
        fields.setdefault(m.group(1), m.group(2))
    return fields


def _partition_facts(host: SlurmHost, info: dict[str, str]) -> str:
    """`; asks 3 node(s), partition debug has 2`: the numbers behind a partition reason."""
    part = info.get("Partition", "")
    res = slurm_cmd(host, "scontrol", "show", "partition", "-o", part) if part else None
    if res is None or res.returncode != 0:
        return ""
    total = parse_fields(res.stdout).get("TotalNodes")
    return f"; asks {info.get('NumNodes', '?').split('-')[0]} node(s), partition {part} has {total}" if total else ""


def hostnames(host: SlurmHost, nodelist: str) -> list[str]:
    """`node[1-3],gpu7` → the node names, in the allocation's (SLURM_NODEID) order."""
    if not nodelist or nodelist in ("(null)", "None"):
        return []
    return slurm_cmd(host, "scontrol", "show", "hostnames", nodelist, check=True).stdout.split()


def open_host(cfg: JobConfig) -> SlurmHost:
    """This machine, or the login node over SSH (its host key checked as for any node)."""
    cluster = cfg.cluster
    assert cluster is not None and cluster.slurm is not None
    if not cluster.slurm.login:
        return LocalHost(submit_dir(cluster))
    from launcher import ssh
    from launcher.backends.ssh import login_target

    target = login_target(cfg)
    return LoginHost(ssh.connect(target), cluster.slurm.login, cluster.workdir, cluster.setup)


def check_entrypoint(cfg: JobConfig, host: SlurmHost) -> None:
    """`launch.entrypoint` looked up on the submitting machine (here, or the login node), in the
    directory the job runs in: the allocated nodes share that filesystem."""
    from launcher import entrypoint

    check = entrypoint.remote_check_argv(cfg)
    if check is None:
        return
    code, args = check
    assert cfg.cluster is not None
    res = host.run([cfg.cluster.python, "-c", code, *args], timeout=60)
    if res.returncode != 0:
        why = res.stdout.strip() or first_line(res.stderr) or f"exit {res.returncode}"
        raise ConfigError(entrypoint.failure_line(cfg, {host.where: why}, "submitting machine"))


class SlurmBackend(Backend):
    name = "slurm"

    def __init__(self, cfg: JobConfig) -> None:
        super().__init__(cfg)
        assert cfg.cluster is not None and cfg.cluster.slurm is not None
        self.slurm = cfg.cluster.slurm
        #: Inside an allocation (salloc, or the user's own batch script): start a step there.
        self.allocation = None if self.slurm.login else os.environ.get("SLURM_JOB_ID")
        self.host: SlurmHost | None = None

    def provision(self) -> Provisioned:
        self.host = open_host(self.cfg)
        require_tools(self.host, ("srun", "scontrol") if self.allocation else _TOOLS)
        if self.allocation:
            want = self.slurm.nodes
            have = int(os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES") or want)
            if have < want:
                raise MlaunchError(f"inside allocation {self.allocation} of {have} node(s), but cluster.slurm.nodes={want}; "
                                   f"allocate {want} (`salloc -N {want}`) or lower cluster.slurm.nodes")
        return Provisioned()

    def setup(self, plan: Plan) -> None:
        assert self.host is not None and plan.sbatch is not None
        cluster = self.cfg.cluster
        assert cluster is not None
        if cluster.sync and isinstance(self.host, LoginHost):
            stats = self.host.conn.put_tree(Path.cwd(), cluster.workdir,
                                            exclude_globs=[self.cfg.output_dir, "runs", *cluster.sync_exclude])
            say(f"{self.host.where}: synced {stats}")
        check_entrypoint(self.cfg, self.host)
        self.offsets = self.host.prepare(plan.output_dir)
        self.host.write(plan.config_path, to_yaml(plan.resolved))
        self.script = f"{plan.output_dir.rstrip('/')}/slurm/{plan.run_id}.sbatch"
        self.host.write(self.script, plan.sbatch)
        if isinstance(self.host, LoginHost):  # the launcher's own copy, beside its run.json
            write_resolved_config(plan.resolved, Path(plan.config_path))

    def start(self, plan: Plan) -> Job:
        assert self.host is not None
        if self.allocation:
            assert isinstance(self.host, LocalHost)
            # The batch script is plain bash: run here, its srun is one step of this allocation.
            batch_log = self.host.path(f"{plan.output_dir}/slurm/slurm-{self.allocation}.out")
            proc = subprocess.Popen(["bash", str(self.host.path(self.script))], stdin=subprocess.DEVNULL,
                                    start_new_session=True, cwd=self.host.base, stdout=open(batch_log, "ab"),
                                    stderr=subprocess.STDOUT)
            say(f"inside allocation {self.allocation}: starting the job as a step (script {self.script})")
            return SlurmJob(plan, self.host, self.allocation, self.offsets, step=proc)
        res = slurm_cmd(self.host, "sbatch", "--parsable", self.script, timeout=60)
        if res.returncode != 0:
            why = first_line(res.stderr).removeprefix("sbatch: error: ") or f"exit {res.returncode}"
            raise MlaunchError(f"sbatch rejected the job: {why} "
                               f"(script {self.script}; `mlaunch plan` shows it)", exit_code=2)
        job_id = res.stdout.strip().split(";")[0]
        where = "" if self.host.where == "here" else f" on the {self.host.where}"
        say(f"submitted batch job {job_id}{where} (script {self.script}); Ctrl-C cancels it")
        return SlurmJob(plan, self.host, job_id, self.offsets)

    def teardown(self) -> None:
        if self.host is not None:
            self.host.close()

    def describe(self, plan: Plan) -> str:
        s = self.slurm
        return (f"{s.nodes} Slurm node(s){f' in partition {s.partition}' if s.partition else ''}, world size "
                f"{plan.world_size}, {plan.running()}")


class SlurmWorker(Worker):
    """Follows one node's log (written by the node itself on the shared filesystem) until the job
    is over; through a login node, the supervisor keeps a local copy (`log_path`)."""

    def __init__(self, name: str, path: str, offset: int, job: "SlurmJob", log_path: Path | None) -> None:
        self.name, self.path, self.offset, self.job, self.log_path = name, path, offset, job, log_path
        self.markers: list[tuple[float, int, int]] = []  # (time, code, restart) of each task end seen
        self.signalled: set[int] = set()  # restarts in which torchrun reported a rank ended by a signal

    def lines(self) -> Iterator[str]:
        for line in self.job.host.follow(self.path, self.offset, self.job.over):
            if line.startswith(EXIT):
                self._marker(line)
            elif re.search(SIGNAL_DEATH, line):
                self.signalled.add(self.job.restarts)
            yield line

    def _marker(self, line: str) -> None:
        parts = line[len(EXIT):].split()
        try:
            code, at, restart = int(parts[0]), float(parts[1]), int(parts[2]) if len(parts) > 2 else 0
        except (IndexError, ValueError):
            return
        self.markers.append((at, code, restart))

    def outcome(self) -> NodeOutcome:
        # Only the last attempt counts: an earlier one was requeued, not failed.
        mine = [m for m in self.markers if m[2] == self.job.restarts]
        if not mine:
            return NodeOutcome()  # killed with the job (kill-on-bad-exit, scancel, time limit): the job says why
        at, code, _ = mine[-1]
        return NodeOutcome(code=code, at=at)


class BatchWorker(SlurmWorker):
    """The batch shell's own log (`slurm-<job>.out`): requeues, srun's errors. Never a node failure."""

    def outcome(self) -> NodeOutcome:
        return NodeOutcome()


class SlurmJob(Job):
    def __init__(self, plan: Plan, host: SlurmHost, job_id: str, offsets: dict[str, int],
                 step: subprocess.Popen | None = None) -> None:
        self.plan, self.host, self.job_id, self.offsets, self.step = plan, host, job_id, offsets, step
        self.out = plan.output_dir.rstrip("/")
        # Through a login node the logs are remote: the supervisor keeps copies here.
        self.local_logs = Path(plan.output_dir) / "logs" if isinstance(host, LoginHost) else None
        self.state = "PENDING"
        self.info: dict[str, str] = {}
        self.restarts = 0
        self.over = threading.Event()
        self._workers: dict[str, SlurmWorker] = {}
        self._polled = 0.0
        self._said: tuple[str, str] | None = None
        self.hopeless: str | None = None
        self._add("batch", f"{self.out}/slurm/slurm-{job_id}.out", BatchWorker)

    def _add(self, name: str, path: str, kind: type = SlurmWorker) -> None:
        local = self.local_logs / f"{name}.log" if self.local_logs is not None else None
        offset = self.offsets.get(name, 0) if kind is SlurmWorker else 0
        self._workers[name] = kind(name, path, offset, self, local)

    def workers(self) -> list[Worker]:
        return list(self._workers.values())

    def poll(self) -> dict[str, NodeOutcome]:
        now = time.monotonic()
        if now - self._polled < POLL_S or self.over.is_set():
            return {}
        self._polled = now
        info = job_info(self.host, self.job_id)
        if self.step is not None and self.step.poll() is not None:
            self.state, self.info = ("COMPLETED" if self.step.returncode == 0 else "FAILED"), info or {}
            self.over.set()
            return {}
        if info is None:  # purged from the controller (MinJobAge): it ended while we were not looking
            self.state = self.state if self.state in FINAL_STATES else "COMPLETED"
            self.over.set()
            return {}
        self.info = info
        state = info.get("JobState", "UNKNOWN")
        reason = info.get("Reason", "None")
        restarts = int(info.get("Restarts", "0") or 0)
        if self.step is None and restarts != self.restarts:
            say(f"job {self.job_id} requeued (restart {restarts}); it resumes from the newest complete checkpoint")
            self.restarts = restarts
        if (state, reason) != self._said:
            self._said = (state, reason)
            if state == "PENDING":
                say(f"job {self.job_id} pending" + (f" ({reason})" if reason not in ("None", "") else ""))
            elif state == "RUNNING":
                say(f"job {self.job_id} running on {info.get('NodeList', '?')}")
        if state == "PENDING" and reason in HOPELESS:
            self.hopeless = f"job {self.job_id} cannot start ({reason}{_partition_facts(self.host, info)}): {HOPELESS[reason]}"
            slurm_cmd(self.host, "scancel", self.job_id)
            self._wait_final(30)
            self.hopeless += "; the job was cancelled, nothing is queued"
            self.over.set()
            return {}
        if state in ("RUNNING", "COMPLETING") or state in FINAL_STATES:
            for name in hostnames(self.host, info.get("NodeList", "")):
                if name not in self._workers:
                    self._add(name, f"{self.out}/logs/{name}.log")
        self.state = state
        if state in FINAL_STATES:
            self.over.set()
        return {}

    def finished(self, outcomes: dict[str, NodeOutcome]) -> bool:
        return self.over.is_set()

    def final(self) -> tuple[int, str | None]:
        if self.hopeless:
            return 1, self.hopeless
        if self.step is not None:
            code = self.step.returncode
            return code, None if code == 0 else f"the step in allocation {self.job_id} ended with exit code {code}"
        raw = self.info.get("ExitCode", "0:0")
        code, _, sig = raw.partition(":")
        exit_code = int(code or 0) or (128 + int(sig) if sig and sig != "0" else 0)
        if self.state == "COMPLETED" and exit_code == 0:
            return 0, None
        reason = self.info.get("Reason", "None")
        why = f"slurm job {self.job_id} ended {self.state}" + (f" ({reason})" if reason not in ("None", "") else "")
        return exit_code or 1, why + f", exit code {raw}; its batch log is {self.out}/slurm/slurm-{self.job_id}.out"

    def stop(self, grace_s: float, force: bool = False) -> list[str]:  # scancel: Slurm's KillWait does the rest
        if self.step is not None:
            return self._stop_step(grace_s)
        if self.state in FINAL_STATES or self.hopeless:
            return []
        # scancel signals every process of the job on every node (batch shell, srun, torchrun, ranks).
        res = slurm_cmd(self.host, "scancel", self.job_id)
        if res.returncode != 0 and "already completing or completed" not in res.stderr:
            return [f"scancel {self.job_id} failed: {first_line(res.stderr)}; cancel it by hand"]
        state = self._wait_final(grace_s + 30)
        self.over.set()
        if state not in FINAL_STATES and state != "GONE":
            return [f"job {self.job_id} is still {state} {grace_s + 30:g}s after scancel; check `squeue -j {self.job_id}`"]
        return []

    def waiting(self) -> bool:
        return self.state in ("PENDING", "REQUEUED", "CONFIGURING")

    def stopped_note(self) -> str:
        return (f"the step in allocation {self.job_id} has ended" if self.step is not None else
                f"job {self.job_id} is {self.state.lower()}, and Slurm ends its processes on every node")

    def _stop_step(self, grace_s: float) -> list[str]:
        """Inside an allocation: SIGTERM to the script's process group (srun forwards it to every task)."""
        assert self.step is not None
        try:
            os.killpg(self.step.pid, signal.SIGTERM)
            self.step.wait(timeout=grace_s + 10)
        except subprocess.TimeoutExpired:
            os.killpg(self.step.pid, signal.SIGKILL)
            self.step.wait()
        except ProcessLookupError:
            pass
        self.over.set()
        return []

    def _wait_final(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        state = self.state
        while time.monotonic() < deadline:
            info = job_info(self.host, self.job_id)
            if info is None:
                return "GONE"
            state = info.get("JobState", "UNKNOWN")
            self.info = info
            if state in FINAL_STATES:
                self.state = state
                return state
            time.sleep(0.2)
        return state

    def dump_stacks(self) -> None:
        # Into the steps (not the batch shell): each task passes it on to its ranks (sbatch.py),
        # which write their stacks on the shared filesystem.
        if self.step is None:
            slurm_cmd(self.host, "scancel", "--signal=USR1", self.job_id)
        else:
            from launcher import procs

            procs.signal_workers(self.plan.run_id, signal.SIGUSR1)

    def collect_stacks(self, dest: Path) -> int:
        if isinstance(self.host, LoginHost):  # the cluster's filesystem: a copy here
            text = self.host.run(["sh", "-c", stacks_script(f"{self.out}/logs/stacks")], timeout=30).stdout
            return save_stacks(text, dest / "cluster.txt")
        assert isinstance(self.host, LocalHost)
        return count_stacks(self.host.path(f"{self.out}/logs/stacks"))

    def _error_message(self, worker: Worker) -> str | None:
        return self.host.error_message(f"{self.out}/logs/torchrun-error-{worker.name}.json")

    def failure_cause(self, worker: Worker) -> str | None:
        return user_error_in(self._error_message(worker))

    def secondary(self, worker: Worker) -> bool:
        assert isinstance(worker, SlurmWorker)
        message = self._error_message(worker) or ""
        return any(p in message for p in PEER_LOST) and self.restarts not in worker.signalled

    def record(self) -> dict[str, Any]:
        return {"slurm": {"job_id": self.job_id, "allocation": self.step is not None, "host": self.host.where,
                          "script": f"{self.out}/slurm/{self.plan.run_id}.sbatch"},
                "nodes": {n: {"host": n} for n in self._workers if n != "batch"}}
