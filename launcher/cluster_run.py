"""`mlaunch run` on a cluster: torchrun on every node over SSH, logs streamed, and the promise
that nothing outlives the run.

Order of events: connect to every node in parallel (report every failure, start nothing) →
resolve addresses and GPU counts → plan → sync code and the resolved config → check the
rendezvous port on the master → start each node's torchrun in a pty → stream prefixed logs →
on the first failure, dropped connection, Ctrl-C or SIGTERM stop every node (SIGTERM to the
recorded torchrun, grace, then everything carrying this run's id) → verify nothing is left.
"""

from __future__ import annotations

import collections
import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from job.config import JobConfig, to_yaml
from job.errors import MlaunchError
from job.markers import STARTED, is_marker
from launcher.console import say
from launcher.plan import NodePlan, Plan
from launcher.planning import build_plan, write_resolved_config
from launcher.shell import python_command
from launcher.stopping import Stop

#: Other nodes are stopped within this many seconds of a node's failure (the issue's promise).
STOP_DEADLINE_S = 15.0
TAIL_LINES = 20
_COLOURS = ["36", "33", "35", "32", "34", "31", "96", "93", "95", "92", "94", "91"]


def targets_for(cfg: JobConfig) -> dict[str, Any]:
    """One SSHTarget per node, keyed by node name, settings merged node > cluster.ssh > ~/.ssh/config."""
    from launcher import ssh

    cluster = cfg.cluster
    assert cluster is not None
    s = cluster.ssh
    out = {}
    for i, node in enumerate(cluster.nodes):
        name = cluster.node_name(i)
        out[name] = ssh.SSHTarget(
            host=node.host,
            port=node.port or (s.port if s.port != 22 else None),
            user=node.user or s.user,
            identity_file=_expand(node.identity_file or s.identity_file),
            known_hosts=_expand(s.known_hosts),
            host_key_policy=s.host_key_policy,
            connect_timeout=s.connect_timeout_s,
            keepalive=s.keepalive_s,
            proxy_jump=s.proxy_jump,
            ssh_config=_expand(s.config_file) if s.config_file and Path(os.path.expanduser(s.config_file)).exists() else None,
            name=name,
        )
    return out


def _expand(path: str | None) -> str | None:
    return os.path.expanduser(path) if path else None


def connect_cluster(cfg: JobConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Connect in parallel; raise one MlaunchError listing every node that failed."""
    from launcher import ssh

    targets = targets_for(cfg)
    results = ssh.connect_all(targets, max_workers=cfg.cluster.ssh.max_parallel)  # type: ignore[union-attr]
    failed = {n: r for n, r in results.items() if isinstance(r, Exception)}
    if failed:
        ssh.close_all(results)
        lines = "; ".join(f"{e}" for e in failed.values())
        raise MlaunchError(f"{len(failed)} of {len(results)} node(s) unreachable, nothing started: {lines}")
    return targets, results


def resolve_addr(target: Any) -> str:
    """The address other nodes dial: resolved in Python from the ssh HostName, never `hostname -I`."""
    from launcher import ssh

    host = ssh.resolve(target).host
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror:
        return host
    v4 = [i[4][0] for i in infos if i[0] == socket.AF_INET]
    return (v4 or [infos[0][4][0]])[0]


def probe_gpus(conns: dict[str, Any]) -> dict[str, int]:
    """GPU count per node via nvidia-smi (0 when absent), all nodes in parallel."""
    from concurrent.futures import ThreadPoolExecutor

    def one(conn: Any) -> int:
        res = conn.run("nvidia-smi -L 2>/dev/null || true", timeout=30)
        return sum(1 for line in res.stdout.splitlines() if line.startswith("GPU "))

    with ThreadPoolExecutor(max_workers=min(32, len(conns))) as pool:
        return dict(zip(conns, pool.map(one, conns.values())))


_PORT_CHECK = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind((sys.argv[1], int(sys.argv[2])))
except OSError as e:
    print(e.strerror); sys.exit(1)
"""


def check_port_free(conn: Any, python: str, addr: str, port: int) -> str | None:
    """None when `addr:port` can be bound on the node, else the reason."""
    res = conn.run(python_command(python, _PORT_CHECK, addr, str(port)), timeout=30)
    return None if res.exit_code == 0 else (res.stdout.strip() or res.stderr.strip() or f"exit {res.exit_code}")


@dataclass
class NodeJob:
    plan: NodePlan
    conn: Any
    target: Any
    proc: Any = None
    log: Any = None
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=TAIL_LINES))
    exit_code: int | None = None
    dropped: bool = False
    started: bool = False  # its output carried job/markers.py's STARTED: the rendezvous is complete
    reader: threading.Thread | None = None
    last_output: float = field(default_factory=time.monotonic)


def run_on_cluster(cfg: JobConfig) -> int:
    from launcher import ssh

    assert cfg.cluster is not None
    targets, conns = connect_cluster(cfg)
    jobs: dict[str, NodeJob] = {}
    try:
        names = list(targets)
        addrs = {i: resolve_addr(targets[n]) for i, n in enumerate(names) if not cfg.cluster.nodes[i].addr}
        gpus = None
        if cfg.launch.nproc_per_node == "auto":
            found = probe_gpus(conns)
            gpus = {i: found[n] for i, n in enumerate(names)}
        the_plan, _ = build_plan(cfg, standalone=False, probe=False, addrs=addrs, gpus=gpus)
        out = Path(cfg.train.output_dir)
        (out / "logs").mkdir(parents=True, exist_ok=True)
        write_resolved_config(the_plan.resolved, Path(the_plan.config_path))
        _prepare_nodes(cfg, the_plan, conns)
        say(f"run {the_plan.run_id}: {len(the_plan.nodes)} node(s), world size {the_plan.world_size}, "
            f"strategy {the_plan.parallel.get('strategy')}, rendezvous {the_plan.rendezvous.endpoint if the_plan.rendezvous else '-'}")
        for node in the_plan.nodes:
            jobs[node.name] = NodeJob(node, conns[node.name], targets[node.name])
        return _execute(cfg, the_plan, jobs)
    finally:
        ssh.close_all(conns)


def _prepare_nodes(cfg: JobConfig, the_plan: Plan, conns: dict[str, Any]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    cluster = cfg.cluster
    assert cluster is not None and the_plan.rendezvous is not None
    project = Path.cwd()
    config_text = to_yaml(the_plan.resolved)

    def prepare(node: NodePlan) -> None:
        conn = conns[node.name]
        if cluster.sync:
            excludes = [cfg.train.output_dir, "runs", *cluster.sync_exclude]
            stats = conn.put_tree(project, node.workdir, exclude_globs=excludes)
            say(f"{node.name}: synced {stats}")
        _put_text(conn, node.workdir, the_plan.config_path, config_text)

    with ThreadPoolExecutor(max_workers=min(cluster.ssh.max_parallel, len(the_plan.nodes))) as pool:
        errors = [f.exception() for f in [pool.submit(prepare, n) for n in the_plan.nodes]]
    errs = [e for e in errors if e is not None]
    if len(errs) == 1 and isinstance(errs[0], MlaunchError):
        raise errs[0]
    if errs:  # every node that failed, not just the first
        raise MlaunchError(f"preparing {len(errs)} node(s) failed, nothing started: " + "; ".join(str(e) for e in errs))

    master = the_plan.nodes[0]
    if the_plan.rendezvous.master_addr == master.addr:
        reason = check_port_free(conns[master.name], master.python, master.addr, the_plan.rendezvous.port)
        if reason:
            raise MlaunchError(f"rendezvous port {the_plan.rendezvous.port} on {master.name} ({master.addr}) is not free: "
                               f"{reason}; stop what holds it or set launch.rdzv.port")


def _put_text(conn: Any, workdir: str, relpath: str, text: str) -> None:
    """Write a file under the node's workdir atomically (tmp + rename): a rank never reads half a config."""
    conn.put_text(relpath if relpath.startswith("/") else f"{workdir.rstrip('/')}/{relpath}", text, timeout=60)


def _execute(cfg: JobConfig, the_plan: Plan, jobs: dict[str, NodeJob]) -> int:
    out = Path(cfg.train.output_dir)
    colour = sys.stdout.isatty()
    width = max(len(n) for n in jobs)
    print_lock = threading.Lock()
    changed = threading.Event()
    quiet = threading.Event()  # set once we stop the run: shutdown noise goes to the logs only
    grace = cfg.launch.grace_period_s

    with Stop() as stop:
        for name, job in jobs.items():
            job.log = open(out / "logs" / f"{_safe(name)}.log", "a", encoding="utf-8")
            job.proc = job.conn.start(job.plan.command(), pty=True)
        # Each job's pid line is read before its reader thread takes over the channel: a
        # RemoteProcess has one reader. Two threads pumping it race on its buffer, and one can
        # block in recv() on output the other already took: on a quiet node, for the whole run,
        # with run.json unwritten and Ctrl-C unanswered.
        _record(out, the_plan, jobs)
        for i, (name, job) in enumerate(jobs.items()):
            prefix = f"\x1b[{_COLOURS[i % len(_COLOURS)]}m{name:<{width}}\x1b[0m | " if colour else f"{name:<{width}} | "
            job.reader = threading.Thread(target=_read, args=(job, prefix, print_lock, changed, quiet), daemon=True,
                                          name=f"mlaunch-log-{name}")
            job.reader.start()

        failed: NodeJob | None = None
        watch = _Silence(the_plan, cfg, jobs)
        while not stop.event.is_set():
            if all(j.exit_code is not None for j in jobs.values()):
                break
            failed = next((j for j in jobs.values() if j.dropped or (j.exit_code not in (None, 0))), None)
            if failed:
                break
            changed.wait(0.5)
            changed.clear()
            _check_transports(jobs, changed)
            watch.check()

        if stop.signum is not None:
            say(f"stopping run {the_plan.run_id} on every node (signal {stop.signum})")
            quiet.set()
            _stop_all(the_plan, jobs, grace)
            say(f"stopped on all {len(jobs)} node(s); shutdown output is in {out / 'logs'}/")
            return stop.exit_code
        if failed is not None:
            why = ("lost its SSH connection" if failed.dropped else "was killed by a signal"
                   if failed.exit_code == -1 else f"exited with code {failed.exit_code}")
            say(f"node {failed.plan.name} {why}; stopping the other nodes")
            quiet.set()
            t0 = time.monotonic()
            _stop_all(the_plan, jobs, min(grace, STOP_DEADLINE_S - 3))
            say(f"all nodes stopped in {time.monotonic() - t0:.1f}s")
            tail = "\n".join(f"    {line}" for line in failed.tail)
            say(f"last lines of {failed.plan.name}:\n{tail}")
            code = failed.exit_code if (failed.exit_code not in (None, 0, -1) and not failed.dropped) else 255
            say(f"run failed on node {failed.plan.name} ({why}); logs: {out / 'logs'}")
            return code
        for job in jobs.values():
            if job.reader:
                job.reader.join(timeout=5)
            job.log.close()
        _verify_clean(the_plan, jobs)
        say(f"run {the_plan.run_id} finished on all {len(jobs)} node(s); outputs in {out}/")
        return 0


class _Silence:
    """Reports, at most every `launch.silence_warning_s`, that all nodes have gone quiet and what
    they wait for: a rendezvous that cannot complete (a node that cannot reach the master, a
    firewall) would otherwise wait out its join timeout without a word."""

    def __init__(self, the_plan: Plan, cfg: JobConfig, jobs: dict[str, NodeJob]) -> None:
        self.plan, self.cfg, self.jobs = the_plan, cfg, jobs
        self.reported = time.monotonic()
        self.after = cfg.launch.silence_warning_s

    def check(self) -> None:
        now = time.monotonic()
        last = max(j.last_output for j in self.jobs.values())
        if now - last < self.after or now - self.reported < self.after:
            return
        self.reported = now
        started = any(j.started for j in self.jobs.values())
        if not started and self.plan.rendezvous is not None:
            r = self.plan.rendezvous
            say(f"no output from any node for {now - last:.0f}s: still waiting for all {r.nnodes} node(s) to join the "
                f"rendezvous at {r.endpoint} (gives up after launch.rdzv.join_timeout_s="
                f"{self.cfg.launch.rdzv.join_timeout_s}s); `mlaunch nodes check` tests that every node reaches it")
        else:
            quietest = min(self.jobs.values(), key=lambda j: j.last_output)
            say(f"no output from any node for {now - last:.0f}s (quietest: {quietest.plan.name}, last line: "
                f"{(quietest.tail[-1] if quietest.tail else '-')[:120]!r}); Ctrl-C stops the run on every node")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _read(job: NodeJob, prefix: str, lock: threading.Lock, changed: threading.Event, quiet: threading.Event) -> None:
    """Drain one node's output: prefixed to our stdout, verbatim to its log file."""
    try:
        for raw in job.proc.lines():
            # A carriage-return redraw (a progress bar that slipped through): keep its final state.
            line = raw.rstrip("\r").rsplit("\r", 1)[-1]
            job.last_output = time.monotonic()
            job.log.write(line + "\n")
            job.log.flush()
            if is_marker(line):  # for us, not for the terminal or the failure report's tail
                job.started = job.started or line.startswith(STARTED)
                continue
            job.tail.append(line)
            if not quiet.is_set():
                with lock:
                    sys.stdout.write(prefix + line + "\n")
                    sys.stdout.flush()
        job.exit_code = job.proc.exit_status(timeout=30)
    except Exception:  # the transport died under us
        job.dropped = True
    if job.exit_code == -1:
        # No exit status: the job was killed by a signal (sshd then sends exit-signal, which
        # paramiko does not report) or the connection went away. A dying transport closes its
        # channels just before it marks itself inactive: give it a moment to tell the two apart.
        deadline = time.monotonic() + 1.0
        while job.conn.is_active and time.monotonic() < deadline:
            time.sleep(0.05)
        job.dropped = not job.conn.is_active
    changed.set()


def _check_transports(jobs: dict[str, NodeJob], changed: threading.Event) -> None:
    for job in jobs.values():
        if job.exit_code is None and not job.dropped and not job.conn.is_active:
            job.dropped = True
            changed.set()


def _record(out: Path, the_plan: Plan, jobs: dict[str, NodeJob]) -> None:
    """Per node: the recorded torchrun pid (= its process group and session id) for this run."""
    pids = {}
    for name, job in jobs.items():
        try:
            pids[name] = job.proc.wait_pid(timeout=30)
        except MlaunchError:
            pids[name] = None
    (out / "logs" / "run.json").write_text(json.dumps(
        {"run_id": the_plan.run_id, "nodes": {n: {"host": j.plan.host, "port": j.plan.port, "pid": pids[n], "sid": pids[n]}
                                              for n, j in jobs.items()}}, indent=2))


def _stop_all(the_plan: Plan, jobs: dict[str, NodeJob], grace: float) -> None:
    """SIGTERM each node's torchrun, then everything carrying the run id, in parallel on all nodes."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        results = list(pool.map(lambda j: _stop_node(the_plan.run_id, j, grace), jobs.values()))
    for job in jobs.values():
        try:
            job.proc.close()  # hangs up the pty as well: a second path to the same end
        except Exception:
            pass
    for msg in results:
        if msg:
            say(msg)


def _stop_node(run_id: str, job: NodeJob, grace: float) -> str | None:
    from launcher import ssh

    conn = job.conn
    fresh = None
    try:
        if not conn.is_active:
            # The job's connection dropped: the pty hangup should have ended it; verify over a new one.
            fresh = conn = ssh.connect(job.target)
        pids = [job.proc.pid] if job.proc and job.proc.pid else []
        report = ssh.kill_run(conn, run_id, pids=pids, grace_s=grace, python=job.plan.python)
        if report.remaining:
            return f"{job.plan.name}: processes {report.remaining} of run {run_id} survived SIGKILL"
        return None
    except Exception as e:
        return f"{job.plan.name}: could not verify cleanup ({e}); check with `ps -eo pid,cmd e | grep {run_id}`"
    finally:
        if fresh is not None:
            fresh.close()


def _verify_clean(the_plan: Plan, jobs: dict[str, NodeJob]) -> None:
    """After a clean finish torchrun has reaped its workers; anything else carrying the id is ended."""
    _stop_all(the_plan, jobs, grace=3.0)
