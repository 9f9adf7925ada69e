"""pytest plugin: a real N-node Slurm cluster (munged + slurmctld + one slurmd per node) on this
machine, for tests of the Slurm backend. No mocks: jobs go through the real scheduler.

Load it from tests/conftest.py with `pytest_plugins = ["tests.slurmd"]` (or `pytest -p tests.slurmd`).
Fixtures:

- `slurm_cluster` (session): a `SlurmCluster`, started once (~0.3 s) and stopped at the end of the
  session. `.dir` (every file of the cluster), `.conf` (its slurm.conf), `.env` (os.environ with
  SLURM_CONF set and inherited SLURM_*/SBATCH_* dropped: pass it to every subprocess that runs a
  Slurm command), `.nodes` (["node1", "node2"]), `.partition` ("debug"), `.port` (SlurmctldPort;
  the slurmd's listen on the next ports), `.proctrack`, `.jobcomp` (the finished-jobs file).
  Helpers: `.run(*argv)` (a Slurm client command, text output, cwd `.dir`, raises `SlurmError`
  unless check=False), `.sbatch(*args)` (the job id), `.squeue_ids()`, `.job_info(id)` /
  `.job_state(id)` (from `scontrol show job`), `.wait_state(id, *states)`, `.release(id)` (a
  requeued job waits ~120 s for its BeginTime otherwise), `.cancel_all()`, `.reset()`,
  `.log_tail(n)` (slurmctld's and every slurmd's log, for failure messages).
- `slurm` (function): the same cluster, `reset()` before and after the test: an empty queue and
  every node idle, so a test that fails with a job still running does not starve the next one.

Each "node" is `slurmd -D -N nodeX -f slurm.conf` on its own port (Debian's build has
multiple-slurmd): `NodeHostname=localhost NodeAddr=127.0.0.1`, all CPUs of this machine on every
node, RealMemory split between them, one partition `debug` that takes every node. The daemons run
as the current user (root here) in the foreground, started by this plugin and stopped by their
pids; every file (state, spool, logs, munge key and socket) lives under one directory in /tmp.
If pytest is killed without its finalizers, PR_SET_PDEATHSIG takes the daemons down, and a
watchdog process (`python tests/slurmd.py --watch DIR`) SIGKILLs the jobs' processes, which
would otherwise run on. The ports and the first job id are random: other sessions run clusters
of their own on this machine (node1, node2 too), and must not collide with this one.

What a test must know (see also DESIGN.md, "Slurm on one machine"):
- every node has this machine's `hostname`: tell nodes apart by SLURMD_NODENAME / SLURM_NODEID,
  and in `--output` patterns use %j / %t / %n, never %N (the host's name: one file for all);
- a batch job starts 0-1 s after sbatch (the scheduler ticks once a second); poll, never sleep;
- a requeued job pends ~120 s (Reason=BeginTime): `cluster.release(job_id)`;
- `sbatch -N3` on the 2-node partition is accepted and pends (Reason=PartitionNodeLimit);
- no accounting database: `scontrol show job` (kept MinJobAge=300 s after the end) and
  `cluster.jobcomp` stand in for sacct;
- `.proctrack` is proctrack/cgroup where a cgroup v1 freezer is writable (here), else
  proctrack/linuxproc, which misses double-forked processes: a test that needs them caught
  skips without cgroup. With cgroup, cancelling a job whose batch shell runs `srun` takes ~2.7 s
  (the shell's srun is SIGKILLed with it, and each step's slurmstepd retries telling it), ~0.1 s
  with linuxproc; a job that ignores SIGTERM takes ~5 s either way.

Tests that use it live under tests/slurm/ (tests/conftest.py marks them `slurm` and `slow`);
without the daemons (apt-get install slurmctld slurmd slurm-client munge) they are skipped.
"""

from __future__ import annotations

import ctypes
import os
import pwd
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import psutil
import pytest

_SBIN = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")
#: See SlurmCluster.release.
RELEASE_AFTER_S = 1.5


def _which(name: str) -> str | None:
    # The daemons live in /usr/sbin, which a non-root PATH often lacks.
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(_SBIN))


MUNGED, MUNGE, UNMUNGE = _which("munged"), _which("munge"), _which("unmunge")
SLURMCTLD, SLURMD = _which("slurmctld"), _which("slurmd")
CLIENTS = {name: _which(name) for name in ("sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo")}
_PR_SET_PDEATHSIG = 1

#: Environment variables a Slurm client reads as input or a job exports: dropped from `.env`, so
#: that pytest run inside a real allocation does not leak that job's settings into this cluster.
_SLURM_ENV_PREFIXES = ("SLURM_", "SBATCH_", "SALLOC_", "SRUN_", "SQUEUE_", "SINFO_", "SCONTROL_")

#: Slurm's unix sockets (munge's, slurmd's per-step ones under the spool) must fit sun_path.
_MAX_SOCKET_PATH = 107


def _die_with_parent() -> None:
    # The daemons outlive a pytest that is killed without running its finalizers (they are in
    # sessions of their own): the kernel takes them down instead. (Fires when the forking
    # *thread* exits: the cluster starts on the main one.)
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def missing_binaries() -> list[str]:
    """The Slurm/munge programs this plugin needs that are not installed."""
    found = {"munged": MUNGED, "munge": MUNGE, "unmunge": UNMUNGE, "slurmctld": SLURMCTLD, "slurmd": SLURMD}
    found.update(CLIENTS)
    return [name for name, path in found.items() if path is None]


def _ports_free(base: int, count: int) -> bool:
    # slurmctld and slurmd listen on every address: probe the wildcard one, without SO_REUSEADDR
    # so a port still in TIME_WAIT counts as taken too.
    for port in range(base, base + count):
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                return False
    return True


def free_port_base(count: int, attempts: int = 200) -> int:
    """A port P with P .. P+count-1 all free. Below the kernel's ephemeral range (32768+), so no
    client connection is handed one of them while the cluster runs; random, so two sessions on
    one machine do not race for the same block."""
    for _ in range(attempts):
        base = random.randrange(20000, 32000 - count)
        if _ports_free(base, count):
            return base
    raise RuntimeError(f"no block of {count} free ports in 20000-32000")


def default_proctrack() -> str:
    """proctrack/cgroup where a cgroup v1 freezer hierarchy is mounted and writable, else
    proctrack/linuxproc.

    linuxproc finds a job's processes by parentage, so a double-forked one (reparented to pid 1)
    outlives scancel; the freezer cgroup catches it (both measured here). Slurm 22.05's cgroup/v2
    needs systemd to delegate it a subtree, which these daemons do not have: on a v2-only host
    (or a container whose cgroupfs is read-only) linuxproc is what works.
    """
    freezer = Path("/sys/fs/cgroup/freezer")
    probe = freezer / f"mlaunch-probe-{os.getpid()}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError:
        return "proctrack/linuxproc"
    return "proctrack/cgroup"


class SlurmError(subprocess.CalledProcessError):
    """A Slurm command that failed; unlike CalledProcessError, its message holds the output."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstdout: {self.stdout!r}\nstderr: {self.stderr!r}"


class SlurmCluster:
    """munged + slurmctld + one slurmd per node, every file under `dir`. `start()` it, `close()` it."""

    partition = "debug"

    def __init__(self, root: Path, nnodes: int = 2, port: int | None = None, proctrack: str | None = None) -> None:
        assert nnodes >= 1
        self.dir = Path(root)
        self.nodes = [f"node{i}" for i in range(1, nnodes + 1)]
        self.port = port if port is not None else free_port_base(nnodes + 1)  # SlurmctldPort; slurmd's follow
        self.conf = self.dir / "etc" / "slurm.conf"
        self.munge_socket = self.dir / "munge" / "munge.socket"
        self.jobcomp = self.dir / "log" / "jobcomp.txt"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(_SLURM_ENV_PREFIXES)}
        self.env["SLURM_CONF"] = str(self.conf)
        self.proctrack = proctrack if proctrack is not None else default_proctrack()
        self.first_job_id = random.randrange(1000, 60_000_000)
        self._procs: dict[str, subprocess.Popen] = {}  # daemon name -> process, in start order
        assert len(str(self.munge_socket)) <= _MAX_SOCKET_PATH, f"{self.munge_socket}: path too long for a socket"

    # -- set-up ---------------------------------------------------------------------------------

    def _write_files(self) -> None:
        for sub in ("etc", "state", "spool", "log", "munge"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        # munged refuses a socket dir unless it and every parent are o+x and not group/other
        # writable: mkdtemp makes 0700.
        for d in (self.dir, self.dir / "munge"):
            d.chmod(0o755)
        key = self.dir / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            key.chmod(0o400)
        for node in self.nodes:
            (self.dir / "spool" / node).mkdir(exist_ok=True)  # slurmd would log an error first
        if self.proctrack == "proctrack/cgroup":
            # Read from slurm.conf's directory. Track processes only: no limits on the tests' jobs.
            (self.dir / "etc" / "cgroup.conf").write_text(
                "CgroupPlugin=cgroup/v1\nCgroupMountpoint=/sys/fs/cgroup\n"
                "ConstrainCores=no\nConstrainRAMSpace=no\nConstrainDevices=no\n"
            )
        self.conf.write_text(self.slurm_conf())

    def slurm_conf(self) -> str:
        """The slurm.conf this cluster runs with."""
        d, n, p = self.dir, len(self.nodes), self.port
        cpus = len(os.sched_getaffinity(0))
        # Configured memory must not exceed what slurmd finds, or the node is drained.
        mem_mb = psutil.virtual_memory().total // 2**20 // n
        lines = [
            "ClusterName=mltest",
            "SlurmctldHost=localhost",
            f"SlurmUser={_user()}",
            f"SlurmdUser={_user()}",
            f"SlurmctldPort={p}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",  # our munged, not the system's
            f"StateSaveLocation={d}/state",
            f"SlurmdSpoolDir={d}/spool/%n",  # %n: each slurmd its own
            f"SlurmctldPidFile={d}/state/slurmctld.pid",
            f"SlurmdPidFile={d}/spool/slurmd-%n.pid",
            f"SlurmctldLogFile={d}/log/slurmctld.log",
            f"SlurmdLogFile={d}/log/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            f"ProctrackType={self.proctrack}",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill",
            # Submission -> RUNNING in under a second (measured: 0.05-1 s, 0.5 s on average),
            # not 2-3 s: the default batch_sched_delay=3 holds batch jobs back up to 3 s, and
            # the backfill pass (default every 30 s) is what starts the first job after start-up
            # and a released requeued job. Both loops tick once a second: 1 s is the floor.
            "SchedulerParameters=batch_sched_delay=0,bf_interval=1",
            "MpiDefault=none",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            # No slurmdbd: a text file of finished jobs stands in for accounting (`sacct -c`).
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={self.jobcomp}",
            "MailProg=/bin/true",
            "ReturnToService=2",  # a node that was DOWN comes back as soon as its slurmd registers
            "SlurmctldTimeout=30",
            "SlurmdTimeout=30",
            "InactiveLimit=0",
            # SIGTERM -> SIGKILL grace on scancel/requeue/time limit (default 30 s). Lower buys
            # nothing: slurmd waits max(KillWait, 5) s before its SIGKILL (measured: a job that
            # ignores SIGTERM takes 4.8 s to cancel with KillWait=0, 1, 2 or 5).
            "KillWait=5",
            "MinJobAge=300",  # finished jobs stay in `scontrol show job` for 5 minutes
            # proctrack/cgroup names a job's cgroup slurm_<node>/uid_<uid>/job_<id>, the same in
            # every cluster on this kernel: ids that start at a random point keep two sessions'
            # "job 1 on node1" apart.
            f"FirstJobId={self.first_job_id}",
            f"NodeName=node[1-{n}] NodeHostname=localhost NodeAddr=127.0.0.1 Port={p + 1}-{p + n}"
            f" CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN",
            f"PartitionName={self.partition} Nodes=node[1-{n}] Default=YES MaxTime=INFINITE State=UP"
            " OverSubscribe=NO",
            "",
        ]
        return "\n".join(lines)

    def _spawn(self, name: str, argv: list[str]) -> None:
        out = open(self.dir / "log" / f"{name}.out", "ab")  # what a daemon says before its log opens
        try:
            self._procs[name] = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.dir,
                start_new_session=True,  # ^C in pytest's terminal must not reach the daemons
                preexec_fn=_die_with_parent,
            )
        finally:
            out.close()

    def start(self, timeout: float = 30.0) -> None:
        """Start munged, slurmctld, then every slurmd; return when all nodes are idle."""
        self._write_files()
        deadline = time.monotonic() + timeout
        m = self.dir / "munge"
        self._spawn("munged", [
            MUNGED, "--foreground", f"--key-file={m / 'munge.key'}", f"--socket={self.munge_socket}",
            f"--pid-file={m / 'munged.pid'}", f"--seed-file={m / 'munged.seed'}", f"--log-file={m / 'munged.log'}",
        ])  # fmt: skip
        self._spawn("watchdog", [sys.executable, __file__, "--watch", str(self.dir)])
        self._wait("munged to answer", self._munge_ok, deadline)
        self._spawn("slurmctld", [SLURMCTLD, "-D", "-f", str(self.conf)])
        self._wait("slurmctld to answer `scontrol ping`", self._ctld_up, deadline)
        for node in self.nodes:
            self._spawn(f"slurmd-{node}", [SLURMD, "-D", "-N", node, "-f", str(self.conf)])
        self._wait(f"{len(self.nodes)} idle nodes in sinfo", lambda: self._not_idle() == [], deadline)

    def _wait(self, what: str, ready, deadline: float) -> None:
        while True:
            dead = {name: p.returncode for name, p in self._procs.items() if p.poll() is not None}
            if dead:
                raise RuntimeError(f"Slurm daemon(s) exited while waiting for {what}: {dead}\n{self.log_tail()}")
            if ready():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}\n{self.log_tail()}")
            time.sleep(0.05)

    def _munge_ok(self) -> bool:
        sock = f"--socket={self.munge_socket}"
        cred = subprocess.run([MUNGE, sock, "-n"], capture_output=True, timeout=5)
        if cred.returncode != 0:
            return False
        return subprocess.run([UNMUNGE, sock], input=cred.stdout, capture_output=True, timeout=5).returncode == 0

    def _ctld_up(self) -> bool:
        return "is UP" in self.run("scontrol", "ping", check=False, timeout=10).stdout

    def _not_idle(self) -> list[str]:
        """`node state` of each node that is not idle (all nodes, if sinfo fails)."""
        r = self.run("sinfo", "-h", "-N", "-p", self.partition, "-o", "%N %T", check=False, timeout=10)
        if r.returncode != 0:
            return [f"{n} ?" for n in self.nodes]
        states = dict(line.split(None, 1) for line in r.stdout.splitlines() if line.strip())
        return [f"{n} {states.get(n, 'missing')}" for n in self.nodes if states.get(n) != "idle"]

    # -- helpers for tests ----------------------------------------------------------------------

    def run(
        self, *argv: str | os.PathLike, timeout: float = 30.0, check: bool = True, cwd: str | os.PathLike | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client command (`cluster.run("squeue", "-h")`) against this cluster. It
        runs in `.dir` unless told otherwise: a job's default working directory (and so where a
        `slurm-%j.out` without --output lands) is where sbatch ran, never the checkout."""
        args = [str(a) for a in argv]
        r = subprocess.run(
            args, env=self.env, cwd=cwd or self.dir, capture_output=True, text=True, timeout=timeout,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        if check and r.returncode != 0:
            raise SlurmError(r.returncode, shlex.join(args), r.stdout, r.stderr)
        return r

    def sbatch(self, *args: str | os.PathLike, timeout: float = 30.0) -> str:
        """`sbatch --parsable ARGS...`; the job id."""
        out = self.run("sbatch", "--parsable", *args, timeout=timeout).stdout.strip()
        return out.split(";", 1)[0]  # "id;cluster" on a federation

    def squeue_ids(self) -> list[str]:
        """Ids of every job still in the queue (pending, running, completing)."""
        return self.run("squeue", "-h", "-o", "%i").stdout.split()

    def job_info(self, job_id: str) -> dict[str, str]:
        """`scontrol show job -o ID` as a dict (JobState, Reason, NodeList, Restarts, ...)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        info: dict[str, str] = {}
        for field in out.split():  # values with spaces (Command=, Comment=) come out cut: fine here
            key, sep, value = field.partition("=")
            if sep:
                info.setdefault(key, value)
        return info

    def job_state(self, job_id: str) -> str:
        """The job's JobState: PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, ..."""
        return self.job_info(job_id)["JobState"]

    def wait_state(self, job_id: str, *states: str, timeout: float = 30.0, poll: float = 0.1) -> str:
        """Wait until the job is in one of `states`; its state. On timeout, fail with the logs."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.job_state(job_id)
            if state in states:
                return state
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"job {job_id} still {state} after {timeout}s (waiting for {'/'.join(states)}):"
                    f" {self.job_info(job_id)}\n{self.log_tail()}"
                )
            time.sleep(poll)

    def release(self, job_id: str) -> None:
        """Let a requeued job start now: it otherwise waits ~120 s for its BeginTime.

        Not in the second of its requeue: slurmd has revoked the job's credential at a time with
        one-second resolution, and a job started again within that second is refused ("Job
        credential revoked", the job FAILED) — which Slurm's own BeginTime delay exists to avoid."""
        time.sleep(RELEASE_AFTER_S)
        self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")

    def cancel_all(self, timeout: float = 30.0) -> None:
        """scancel every job and wait until the queue is empty (completing jobs included)."""
        ids = self.squeue_ids()
        if ids:
            self.run("scancel", *ids, check=False)  # a job may end on its own in between
        deadline = time.monotonic() + timeout
        while ids:
            if time.monotonic() > deadline:
                raise TimeoutError(f"jobs {ids} still queued {timeout}s after scancel\n{self.log_tail()}")
            time.sleep(0.1)
            ids = self.squeue_ids()

    def reset(self, timeout: float = 30.0) -> None:
        """An empty queue and every node idle: jobs cancelled, a drained or down node resumed."""
        deadline = time.monotonic() + timeout
        self.cancel_all(timeout=timeout)
        for entry in self._not_idle():
            node, state = entry.split(None, 1)
            if any(s in state for s in ("drain", "down", "fail")):
                self.run("scontrol", "update", f"NodeName={node}", "State=RESUME", check=False)
        self._wait("every node idle", lambda: self._not_idle() == [], deadline)

    def log_tail(self, n: int = 20) -> str:
        """The last n lines of slurmctld's and every slurmd's log, for failure messages. What a
        daemon printed to stderr stands in for a log it never opened (a bad slurm.conf), and
        munged's for a munged that exited."""
        log = self.dir / "log"
        daemons = [("slurmctld", log / "slurmctld.log")]
        daemons += [(f"slurmd-{node}", log / f"slurmd-{node}.log") for node in self.nodes]
        munged = self._procs.get("munged")
        if munged is not None and munged.poll() is not None:
            daemons.append(("munged", self.dir / "munge" / "munged.log"))
        parts = []
        for name, path in daemons:
            lines = _lines(path) or _lines(log / f"{name}.out")
            if lines:
                parts.append(f"== {name} ==\n" + "\n".join(lines[-n:]))
        return "\n".join(parts)

    # -- tear-down ------------------------------------------------------------------------------

    def close(self) -> None:
        """Cancel every job, then stop the slurmd's, slurmctld and munged, each by its pid."""
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            try:
                self.cancel_all(timeout=15)
            except (TimeoutError, subprocess.SubprocessError, OSError):
                pass  # stop the daemons anyway
        watchdog = self._procs.pop("watchdog", None)
        if watchdog is not None:
            watchdog.kill()  # its work is what follows
            watchdog.wait()
        # The nodes first, while slurmctld and munged are up to hear them go; munged last.
        _stop([p for name, p in self._procs.items() if name.startswith("slurmd-")])
        _stop([self._procs[name] for name in ("slurmctld", "munged") if name in self._procs])
        self._procs.clear()
        kill_jobs(self.dir)  # whatever cancel_all could not end


def job_processes(root: Path) -> list[psutil.Process]:
    """Every process of the jobs of the cluster in `root`: each slurmstepd (it holds its node's
    log open) and everything under it. A slurmstepd is not its slurmd's child (it double-forks),
    so stopping the daemons leaves the jobs running."""
    logs = str(root / "log") + os.sep
    found: list[psutil.Process] = []
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] != "slurmstepd":
            continue
        try:
            if any(f.path.startswith(logs) for f in proc.open_files()):
                found += [proc, *proc.children(recursive=True)]
        except psutil.Error:
            continue
    return found


def kill_jobs(root: Path, timeout: float = 5.0) -> None:
    """SIGKILL every process of the cluster's jobs, known by pid (never by name)."""
    procs = job_processes(root)
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=timeout)


def _watch(root: Path) -> None:
    # The watchdog (`python tests/slurmd.py --watch DIR`): PR_SET_PDEATHSIG sends it SIGTERM
    # when pytest dies without its finalizers; the daemons go the same way, but their jobs would
    # run on (a training job on a shared 2-core machine): end them.
    signal.signal(signal.SIGTERM, lambda *_: (kill_jobs(root), sys.exit(0)))
    while True:
        signal.pause()


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []


def _user() -> str:
    return pwd.getpwuid(os.getuid()).pw_name


def _stop(procs: list[subprocess.Popen], timeout: float = 5.0) -> None:
    # SIGTERM all at once (slurmd and slurmctld save state and exit), SIGKILL what is left.
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=5)


def start_cluster(nnodes: int = 2, attempts: int = 3) -> SlurmCluster:
    """A started cluster in a fresh directory under /tmp. A free port can be taken between the
    probe and the daemon's bind: such a start is retried on other ports."""
    for attempt in range(attempts):
        # Not pytest's tmp_path: munged needs o+x on every parent, and unix socket paths must
        # stay short.
        root = Path(tempfile.mkdtemp(prefix="mlaunch-slurm-", dir="/tmp"))
        cluster = SlurmCluster(root, nnodes)
        try:
            cluster.start()
            return cluster
        except Exception:
            cluster.close()
            if attempt == attempts - 1 or "Address already in use" not in cluster.log_tail(200):
                raise  # the message holds the logs; the directory stays, to read them whole
            shutil.rmtree(root, ignore_errors=True)
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    missing = missing_binaries()
    if missing:
        pytest.skip(f"Slurm/munge not installed ({', '.join(missing)}): apt-get install slurmctld slurmd slurm-client munge")
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        cluster.close()
        shutil.rmtree(cluster.dir, ignore_errors=True)


@pytest.fixture
def slurm(slurm_cluster: SlurmCluster) -> Iterator[SlurmCluster]:
    slurm_cluster.reset()
    yield slurm_cluster
    slurm_cluster.reset()


if __name__ == "__main__" and sys.argv[1:2] == ["--watch"]:
    _watch(Path(sys.argv[2]))
