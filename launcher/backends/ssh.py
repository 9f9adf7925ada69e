"""The SSH backend: torchrun on every listed node, each in a pty over its own connection.

provision: connect to every node in parallel (every failure reported, nothing started), resolve
addresses in Python, count GPUs. setup: sync the project, write the resolved config, check the
rendezvous port on the master. start: each node's torchrun in a pty (an SSH hangup reaches it).
stop: SIGTERM to the recorded torchrun, grace, then everything carrying this run's id, on all
nodes at once, each over a fresh connection if its own has dropped.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from job.config import JobConfig, to_yaml
from job.errors import ConfigError, MlaunchError
from launcher.backends.base import Backend, Job, NodeOutcome, Provisioned, Worker, count_stacks, save_stacks, stacks_script
from launcher.console import say
from launcher.fanout import fan_out
from launcher.procs import scoped
from launcher.plan import NodePlan, Plan
from launcher.planning import write_resolved_config
from launcher.shell import python_command, quote_path, shell_command


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


def login_target(cfg: JobConfig) -> Any:
    """The Slurm login node (`cluster.slurm.login`: `[user@]host[:port]` or an ssh alias), with
    the cluster's SSH settings."""
    from launcher import ssh

    cluster = cfg.cluster
    assert cluster is not None and cluster.slurm is not None and cluster.slurm.login
    s = cluster.ssh
    spec = cluster.slurm.login
    user, _, hostport = spec.rpartition("@")
    host, sep, port = hostport.rpartition(":") if hostport.count(":") == 1 else ("", "", "")
    host, port_n = (host, int(port)) if sep and port.isdigit() else (hostport, None)
    return ssh.SSHTarget(
        host=host, port=port_n or (s.port if s.port != 22 else None), user=user or s.user,
        identity_file=_expand(s.identity_file), known_hosts=_expand(s.known_hosts), host_key_policy=s.host_key_policy,
        connect_timeout=s.connect_timeout_s, keepalive=s.keepalive_s, proxy_jump=s.proxy_jump,
        ssh_config=_expand(s.config_file) if s.config_file and Path(os.path.expanduser(s.config_file)).exists() else None,
        name=spec,
    )


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


def probe_gpus(conns: dict[str, Any], max_parallel: int = 32) -> dict[str, int]:
    """GPU count per node via nvidia-smi (0 when absent), all nodes in parallel; every node's failure reported."""

    def one(_name: str, conn: Any) -> int:
        res = conn.run("nvidia-smi -L 2>/dev/null || true", timeout=30)
        return sum(1 for line in res.stdout.splitlines() if line.startswith("GPU "))

    return fan_out(one, conns, max_parallel).values("counting GPUs")


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


def check_entrypoint(cfg: JobConfig, conns: dict[str, Any], plan: Plan) -> None:
    """`launch.entrypoint` looked up on every node, in its workdir (after `sync`), with its own
    python; every node that lacks it named in one line, before anything starts."""
    from launcher import entrypoint

    check = entrypoint.remote_check_argv(cfg)
    if check is None:
        return
    code, args = check

    def one(name: str, node: NodePlan) -> str | None:
        # In the node's workdir, after its setup (e.g. a venv's activate), as the job itself will run.
        cmd = shell_command([node.python, "-c", code, *args], cwd=node.workdir, prelude=node.setup, exec_=False)
        res = conns[name].run(cmd, timeout=30)
        if res.exit_code == 0:
            return None
        return res.stdout.strip() or (res.stderr.strip().splitlines() or [f"exit {res.exit_code}"])[-1]

    found = fan_out(one, {n.name: n for n in plan.nodes}, cfg.cluster.ssh.max_parallel).values(  # type: ignore[union-attr]
        "looking for the entrypoint")
    failures = {n: why for n, why in found.items() if why}
    if failures:
        raise ConfigError(entrypoint.failure_line(cfg, failures, "node(s)"))


class SSHBackend(Backend):
    name = "ssh"

    def __init__(self, cfg: JobConfig) -> None:
        super().__init__(cfg)
        self.targets: dict[str, Any] = {}
        self.conns: dict[str, Any] = {}

    def provision(self) -> Provisioned:
        cluster = self.cfg.cluster
        assert cluster is not None
        self.targets, self.conns = connect_cluster(self.cfg)
        names = list(self.targets)
        addrs = {i: resolve_addr(self.targets[n]) for i, n in enumerate(names) if not cluster.nodes[i].addr}
        gpus = None
        if self.cfg.launch.nproc_per_node == "auto":
            found = probe_gpus(self.conns, cluster.ssh.max_parallel)
            gpus = {i: found[n] for i, n in enumerate(names)}
        return Provisioned(addrs, gpus)

    def setup(self, plan: Plan) -> None:
        cfg, cluster = self.cfg, self.cfg.cluster
        assert cluster is not None and plan.rendezvous is not None
        write_resolved_config(plan.resolved, Path(plan.config_path))
        project = Path.cwd()
        config_text = to_yaml(plan.resolved)

        def prepare(name: str, node: NodePlan) -> None:
            conn = self.conns[name]
            if cluster.sync:
                excludes = [cfg.output_dir, "runs", *cluster.sync_exclude]
                stats = conn.put_tree(project, node.workdir, exclude_globs=excludes)
                say(f"{node.name}: synced {stats}")
            # Atomic (tmp + rename): a rank never reads half a config.
            path = plan.config_path
            conn.put_text(path if path.startswith("/") else f"{node.workdir.rstrip('/')}/{path}", config_text, timeout=60)

        fan_out(prepare, {n.name: n for n in plan.nodes}, cluster.ssh.max_parallel).values("preparing the nodes")
        check_entrypoint(cfg, self.conns, plan)

        master = plan.nodes[0]
        if plan.rendezvous.master_addr == master.addr:
            reason = check_port_free(self.conns[master.name], master.python, master.addr, plan.rendezvous.port)
            if reason:
                raise MlaunchError(f"rendezvous port {plan.rendezvous.port} on {master.name} ({master.addr}) is not free: "
                                   f"{reason}; stop what holds it or set launch.rdzv.port")

    def start(self, plan: Plan) -> Job:
        workers = []
        for node in plan.nodes:
            proc = self.conns[node.name].start(node.command(), pty=True)
            workers.append(SSHWorker(node, self.conns[node.name], self.targets[node.name], proc,
                                     Path(plan.output_dir) / "logs" / f"{_safe(node.name)}.log"))
        # Each node's pid line is read now, before its reader thread takes over the channel: a
        # RemoteProcess has one reader. Two threads pumping it race on its buffer, and one can
        # block in recv() on output the other already took.
        for w in workers:
            try:
                w.pid = w.proc.wait_pid(timeout=30)
            except MlaunchError:
                w.pid = None
        s = self.cfg.cluster.ssh  # type: ignore[union-attr]
        if s.keepalive_s:
            for w in workers:
                w.conn.watch_liveness(s.keepalive_s)
        return SSHJob(plan, workers, lost_after_s=s.keepalive_s * s.keepalive_count if s.keepalive_s else None)

    def teardown(self) -> None:
        from launcher import ssh

        ssh.close_all(self.conns)

    def describe(self, plan: Plan) -> str:
        r = plan.rendezvous
        return (f"{len(plan.nodes)} node(s), world size {plan.world_size}, {plan.running()}, "
                f"rendezvous {r.endpoint if r else '-'}")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


class SSHWorker(Worker):
    def __init__(self, node: NodePlan, conn: Any, target: Any, proc: Any, log_path: Path) -> None:
        self.name, self.node, self.conn, self.target, self.proc, self.log_path = node.name, node, conn, target, proc, log_path
        self.pid: int | None = None

    def lines(self) -> Iterator[str]:
        return iter(self.proc.lines())

    def outcome(self) -> NodeOutcome:
        code = self.proc.exit_status(timeout=30)
        if code != -1:
            return NodeOutcome(code=code)
        # No exit status: the job was killed by a signal (sshd then sends exit-signal, which
        # paramiko does not report) or the connection went away. A dying transport closes its
        # channels just before it marks itself inactive: give it a moment to tell the two apart.
        deadline = time.monotonic() + 1.0
        while self.conn.is_active and time.monotonic() < deadline:
            time.sleep(0.05)
        return NodeOutcome(lost="lost its SSH connection") if not self.conn.is_active else NodeOutcome(code=-1)


class SSHJob(Job):
    def __init__(self, plan: Plan, workers: list[SSHWorker], lost_after_s: float | None = None) -> None:
        self.plan, self._workers, self.lost_after_s = plan, workers, lost_after_s
        self.unanswering: set[str] = set()  # nodes declared lost for not answering: not reachable to stop

    def workers(self) -> list[Worker]:
        return list(self._workers)

    def poll(self) -> dict[str, NodeOutcome]:
        lost = {}
        for w in self._workers:
            if not w.conn.is_active:
                lost[w.name] = NodeOutcome(lost="lost its SSH connection")
            elif self.lost_after_s is not None and (silent := w.conn.silent_for()) >= self.lost_after_s:
                self.unanswering.add(w.name)
                lost[w.name] = NodeOutcome(lost=f"stopped answering SSH for {silent:.0f} s (frozen, or cut off from here)")
        return lost

    def stop(self, grace_s: float, force: bool = False) -> list[str]:
        """SIGTERM each node's torchrun, then everything carrying the run id, in parallel on all nodes."""
        reachable = {w.name: w for w in self._workers if w.name not in self.unanswering}
        results = fan_out(lambda _n, w: _stop_node(self.plan.run_id, w, grace_s, force), reachable)
        for w in self._workers:
            try:
                w.proc.close()  # hangs up the pty as well: a second path to the same end
            except Exception:
                pass
        gone = [f"{n}: not answering, so not stopped from here; its connection is closed, so its job ends with the "
                f"SSH hangup once the node answers again (check with `ps -eo pid,cmd e | grep {self.plan.run_id}`)"
                for n in sorted(self.unanswering)]
        return [m for m in results.ok.values() if m] + [f"{n}: {e}" for n, e in results.failed.items()] + gone

    def _answering(self) -> dict[str, SSHWorker]:
        """The nodes to ask for stacks: answering, over a live connection."""
        return {w.name: w for w in self._workers if w.name not in self.unanswering and w.conn.is_active}

    def dump_stacks(self) -> None:
        import signal

        from launcher import ssh

        fan_out(lambda _n, w: ssh.signal_workers(w.conn, scoped(self.plan.run_id, w.name), signal.SIGUSR1,
                                                 python=w.node.python), self._answering())

    def collect_stacks(self, dest: Path) -> int:
        """Each reachable node's stack files (under its workdir) into `dest/<node>.txt`."""
        out = self.plan.output_dir.rstrip("/")

        def fetch(name: str, w: SSHWorker) -> int:
            script = stacks_script(quote_path(f"{out}/logs/stacks"))
            res = w.conn.run(f"cd {quote_path(w.node.workdir)} && {script}", timeout=30)
            return save_stacks(res.stdout, dest / f"{_safe(name)}.txt")

        got = fan_out(fetch, self._answering()).ok
        return max(sum(got.values()), count_stacks(dest))

    def record(self) -> dict[str, Any]:
        """Per node: the recorded torchrun pid (= its process group and session id) for this run."""
        return {"nodes": {w.name: {"host": w.node.host, "port": w.node.port, "pid": w.pid, "sid": w.pid} for w in self._workers}}


def _stop_node(run_id: str, w: SSHWorker, grace: float, force: bool = False) -> str | None:
    from launcher import ssh

    conn = w.conn
    fresh = None
    try:
        if not conn.is_active:
            # The job's connection dropped: the pty hangup should have ended it; verify over a new one.
            fresh = conn = ssh.connect(w.target)
        pids = [w.proc.pid] if w.proc and w.proc.pid else []
        if force:
            import signal

            ssh.signal_workers(conn, scoped(run_id, w.name), signal.SIGKILL, python=w.node.python)
        report = ssh.kill_run(conn, scoped(run_id, w.name), pids=pids, grace_s=grace, python=w.node.python)
        if report.remaining:
            return f"{w.name}: processes {report.remaining} of run {run_id} survived SIGKILL"
        return None
    except Exception as e:
        return f"{w.name}: could not verify cleanup ({e}); check with `ps -eo pid,cmd e | grep {run_id}`"
    finally:
        if fresh is not None:
            fresh.close()
