"""The plan: a pure function from a `JobConfig` to what every node will run.

No network, no processes, no torch: `mlaunch plan` prints exactly this, the runners execute
exactly this, and tests compare it against golden files.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from job.config import JobConfig
from job.errors import ConfigError
from job.markers import CHECKPOINT_REQUEST_VAR
from launcher.procs import NODE_VAR
from launcher.shell import RUN_ID_VAR, job_command

TORCHRUN = ["-m", "torch.distributed.run"]
_SECRET = re.compile(r"TOKEN(?!IZER)|KEY|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)  # not TOKENIZERS_PARALLELISM


@dataclass(frozen=True)
class Rendezvous:
    backend: str  # c10d | static
    endpoint: str  # host:port every node dials
    id: str
    nnodes: str  # "N" or "MIN:MAX"
    master_addr: str
    port: int


@dataclass(frozen=True)
class NodePlan:
    node_rank: int
    name: str
    host: str
    port: int
    user: str | None
    addr: str
    workdir: str
    nproc_per_node: int
    nproc_source: str  # why this many processes (shown by `mlaunch plan`)
    python: str  # the node's interpreter: argv[0], and what the runner's helper scripts run with
    argv: list[str]
    env: dict[str, str]
    setup: str | None

    def command(self, mask: bool = False) -> str:
        """The node's exact shell command: `printf MLAUNCH_PID=$$; cd workdir && [setup &&] exec env K=V ... torchrun ...`.

        `$$` survives `exec`: the first output line is torchrun's own pid, which (sshd making the
        pty's shell a session leader) is also its process group and session id, recorded per run."""
        env = masked_env(self.env) if mask else self.env
        return job_command(self.argv, env, env[RUN_ID_VAR], cwd=self.workdir, prelude=self.setup,
                           processes=self.nproc_per_node)


@dataclass(frozen=True)
class Plan:
    job: str
    run_id: str
    standalone: bool
    rendezvous: Rendezvous | None
    nodes: list[NodePlan]
    world_size: int
    config_path: str  # the resolved config every rank reads, relative to the workdir
    output_dir: str
    resolved: JobConfig = field(compare=False, repr=False)  # what every rank reads
    parallel: dict[str, Any] = field(default_factory=dict)
    backend: str = "local"  # local | ssh | slurm: which of launcher/backends/ executes it
    sbatch: str | None = None  # slurm: the batch script submitted as it is

    def running(self) -> str:
        """What every rank runs, for one-line descriptions: the strategy, or the user's entrypoint."""
        ep = self.resolved.launch.entrypoint
        return f"entrypoint `{' '.join(ep)}`" if ep else f"strategy {self.parallel.get('strategy')}"

    def sbatch_text(self, mask: bool = False) -> str | None:
        """The batch script; with `mask`, secret-looking env values shown as ****."""
        if self.sbatch is None or not mask:
            return self.sbatch
        n = self.nodes[0]
        return self.sbatch.replace(_task_command(n, False), _task_command(n, True))

    def to_json(self, mask: bool = True) -> dict[str, Any]:
        nodes = []
        for n in self.nodes:
            d = asdict(n)
            del d["python"]  # argv[0] shows it; the printed plan stays as it was
            d["env"] = masked_env(n.env) if mask else dict(n.env)
            d["command"] = n.command(mask=mask) if self.backend != "slurm" else _task_command(n, mask)
            nodes.append(d)
        return {
            "job": self.job,
            "run_id": self.run_id,
            "standalone": self.standalone,
            "rendezvous": asdict(self.rendezvous) if self.rendezvous else None,
            "world_size": self.world_size,
            "config_path": self.config_path,
            "output_dir": self.output_dir,
            # Only for a script of the user's own (the built-in trainer's plans keep their shape).
            **({"entrypoint": list(self.resolved.launch.entrypoint)} if self.resolved.launch.entrypoint else {}),
            "parallel": self.parallel,
            "backend": self.backend,
            "nodes": nodes,
            **({"slurm": {"script": self.sbatch_text(mask)}} if self.sbatch is not None else {}),
        }


def _task_command(n: NodePlan, mask: bool) -> str:
    from launcher.sbatch import task_command

    return task_command(n.argv, masked_env(n.env) if mask else n.env)


def is_secret(name: str) -> bool:
    return bool(_SECRET.search(name))


def masked_env(env: Mapping[str, str]) -> dict[str, str]:
    return {k: ("****" if is_secret(k) and v else v) for k, v in env.items()}


def passthrough_env(patterns: list[str], local_env: Mapping[str, str]) -> dict[str, str]:
    """Local variables matching the globs, in a stable order."""
    return {k: local_env[k] for k in sorted(local_env) if any(fnmatch.fnmatchcase(k, p) for p in patterns)}


def nnodes_bounds(nnodes: str) -> tuple[int, int]:
    lo, _, hi = nnodes.partition(":")
    return int(lo), int(hi or lo)


def entry_args(cfg: JobConfig, config_path: str) -> list[str]:
    """What torchrun runs on every rank, after its own options: the built-in trainer
    (`-m train CONFIG`), or `launch.entrypoint` as written — torchrun's own forms, a script path
    (`script.py args`) or `-m module args`. The entrypoint is not given the config path: it gets
    torchrun's environment, `cluster.env` and the run id, nothing implicit."""
    if cfg.launch.entrypoint is not None:
        return list(cfg.launch.entrypoint)
    return ["-m", "train", config_path]


def make_plan(
    cfg: JobConfig,
    *,
    run_id: str,
    config_path: str,
    local_env: Mapping[str, str] | None = None,
    standalone: bool = False,
    addrs: Mapping[int, str] | None = None,
    gpus: Mapping[int, int] | None = None,
    python: str | None = None,
    parallel: dict[str, Any] | None = None,
) -> Plan:
    """Per-node torchrun argv + env for `cfg`.

    `addrs` are node addresses resolved by the caller (the runner resolves host names in Python;
    the plan itself never touches the network); `gpus` are GPU counts probed on the nodes, for
    `nproc_per_node: auto`. `python` replaces the interpreter (standalone runs use sys.executable).
    """
    local_env = dict(local_env or {})
    launch = cfg.launch
    job = cfg.name or "job"
    base_env = {RUN_ID_VAR: run_id, "PYTHONUNBUFFERED": "1"}
    train_args = entry_args(cfg, config_path)
    ranks_filter = []
    if launch.local_ranks_filter is not None:
        ranks_filter = ["--local-ranks-filter", ",".join(str(r) for r in launch.local_ranks_filter)]

    if standalone or cfg.cluster is None:
        nproc, why = _nproc(launch.nproc_per_node, (gpus or {}).get(0), None)
        env = {**passthrough_env(cfg.cluster.env_passthrough if cfg.cluster else [], local_env),
               **(cfg.cluster.env if cfg.cluster else {}), **base_env}
        python = python or "python3"
        argv = [python, *TORCHRUN, "--standalone", "--nnodes", "1", "--nproc-per-node", str(nproc),
                "--max-restarts", str(launch.max_restarts), "--monitor-interval", _num(launch.monitor_interval_s),
                *ranks_filter, *train_args]
        node = NodePlan(0, "local", "localhost", 0, None, "127.0.0.1", ".", nproc, why, python, argv, env, None)
        return Plan(job, run_id, True, None, [node], nproc, config_path, cfg.output_dir, cfg, parallel or {})

    cluster = cfg.cluster
    # The job runs in a pty (so an SSH hangup reaches it) or under srun, and its output becomes
    # prefixed log lines: no progress-bar redraws.
    quiet = {"MLAUNCH_NONINTERACTIVE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    env_common = {**quiet, **passthrough_env(cluster.env_passthrough, local_env), **cluster.env, **base_env}
    if cluster.slurm is not None:
        return _slurm_plan(cfg, job=job, run_id=run_id, config_path=config_path, env=env_common,
                           head=[python or cluster.python, *TORCHRUN], tail=[*ranks_filter, *train_args],
                           parallel=parallel or {})
    addrs = addrs or {}
    node_addr = {i: n.addr or addrs.get(i) or n.host for i, n in enumerate(cluster.nodes)}
    nnodes = launch.nnodes or str(len(cluster.nodes))
    lo, hi = nnodes_bounds(nnodes)
    if hi > len(cluster.nodes):
        raise ConfigError(f"launch.nnodes={nnodes} asks for up to {hi} nodes but cluster.nodes lists {len(cluster.nodes)}; add nodes or lower nnodes")
    rdzv_cfg = launch.rdzv
    if rdzv_cfg.endpoint:
        host, _, port = rdzv_cfg.endpoint.rpartition(":") if ":" in rdzv_cfg.endpoint else (rdzv_cfg.endpoint, "", "")
        master_addr, rdzv_port = host, int(port) if port else rdzv_cfg.port
    else:
        master_addr, rdzv_port = node_addr[0], rdzv_cfg.port
    rdzv = Rendezvous(rdzv_cfg.backend, f"{master_addr}:{rdzv_port}", rdzv_cfg.id or run_id, nnodes, master_addr, rdzv_port)
    if rdzv_cfg.backend == "static" and lo != hi:
        raise ConfigError("launch.nnodes MIN:MAX (elastic) needs launch.rdzv.backend: c10d; static rendezvous has a fixed size")

    nodes = []
    world = 0
    for i, spec in enumerate(cluster.nodes):
        nproc, why = _nproc(launch.nproc_per_node, (gpus or {}).get(i), spec.gpus)
        world += nproc
        node_python = python or cluster.node_python(i)
        argv = [node_python, *TORCHRUN, "--nnodes", nnodes, "--nproc-per-node", str(nproc)]
        if rdzv.backend == "static":
            argv += ["--node-rank", str(i), "--master-addr", rdzv.master_addr, "--master-port", str(rdzv.port)]
        else:
            # Every agent on a multi-address host would otherwise believe it is the host and hand
            # its workers MASTER_ADDR=localhost; is_host pins the TCPStore to the endpoint node.
            is_host = int(node_addr[i] == master_addr)
            argv += ["--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv.endpoint, "--rdzv-id", rdzv.id,
                     "--rdzv-conf", f"join_timeout={rdzv_cfg.join_timeout_s},is_host={is_host}",
                     "--local-addr", node_addr[i]]
        argv += ["--max-restarts", str(launch.max_restarts), "--monitor-interval", _num(launch.monitor_interval_s),
                 *ranks_filter, *train_args]
        nodes.append(NodePlan(i, cluster.node_name(i), spec.host, cluster.node_port(i), spec.user or cluster.ssh.user,
                              node_addr[i], cluster.node_workdir(i), nproc, why, node_python, argv,
                              {**env_common, NODE_VAR: cluster.node_name(i)},
                              cluster.setup))
    return Plan(job, run_id, False, rdzv, nodes, world, config_path, cfg.output_dir, cfg, parallel or {}, "ssh")


def submit_dir(cluster: Any) -> str | None:
    """Where sbatch runs, so where the job runs and its relative paths point: `cluster.workdir`
    when set (always on a login node), else None = the directory mlaunch runs in."""
    return cluster.workdir if ("workdir" in cluster.model_fields_set or cluster.slurm.login) else None


def _slurm_plan(cfg: JobConfig, *, job: str, run_id: str, config_path: str, env: dict[str, str],
                head: list[str], tail: list[str], parallel: dict[str, Any]) -> Plan:
    """Nodes that Slurm allocates: one NodePlan per node index (hosts are known once the job runs),
    all running the same command, whose rendezvous and addresses the batch shell fills in."""
    from launcher import sbatch

    cluster, launch = cfg.cluster, cfg.launch
    assert cluster is not None and cluster.slurm is not None
    slurm = cluster.slurm
    if launch.nnodes and launch.nnodes != str(slurm.nodes):
        raise ConfigError(f"launch.nnodes={launch.nnodes} with cluster.slurm.nodes={slurm.nodes}: Slurm allocates "
                          "a fixed number of nodes; drop launch.nnodes or make them equal")
    if launch.rdzv.backend != "c10d" or launch.rdzv.endpoint:
        raise ConfigError("on Slurm the rendezvous is c10d on the first allocated node; drop launch.rdzv.backend/endpoint")
    if cluster.sync and not slurm.login:
        raise ConfigError("cluster.sync pushes code to SSH nodes (or to cluster.slurm.login); Slurm nodes share the "
                          "filesystem the job is submitted from: drop sync")
    nproc, why = _nproc(launch.nproc_per_node, None, slurm.gpus_per_node)
    if not isinstance(launch.nproc_per_node, int):
        why = f"auto: cluster.slurm.gpus_per_node = {slurm.gpus_per_node}" + ("" if slurm.gpus_per_node else ", 1 process (CPU)")
    workdir = submit_dir(cluster)
    env = {**env, CHECKPOINT_REQUEST_VAR: f"{cfg.output_dir.rstrip('/')}/{sbatch.CHECKPOINT_REQUEST}"}
    endpoint = f"{sbatch.RDZV_ADDR}:{sbatch.RDZV_PORT}"
    argv = [*head, "--nnodes", str(slurm.nodes), "--nproc-per-node", str(nproc),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", sbatch.JOB_ID,
            "--rdzv-conf", f"join_timeout={launch.rdzv.join_timeout_s},is_host={sbatch.IS_HOST}",
            "--local-addr", sbatch.NODE_ADDR,
            "--max-restarts", str(launch.max_restarts), "--monitor-interval", _num(launch.monitor_interval_s), *tail]
    rdzv = Rendezvous("c10d", endpoint, sbatch.JOB_ID, str(slurm.nodes), sbatch.RDZV_ADDR, launch.rdzv.port)
    nodes = [NodePlan(i, f"slurm-node-{i}", "(allocated by Slurm)", 0, None, sbatch.NODE_ADDR, workdir or ".", nproc, why,
                      head[0], argv, dict(env), cluster.setup) for i in range(slurm.nodes)]
    text = sbatch.script(slurm, job_name=job, run_id=run_id, nodes=slurm.nodes, output_dir=cfg.output_dir,
                         workdir=workdir, argv=argv, env=env, setup=cluster.setup, rdzv_port_base=launch.rdzv.port,
                         job_restarts=launch.job_restarts, processes=nproc)
    return Plan(job, run_id, False, rdzv, nodes, nproc * slurm.nodes, config_path, cfg.output_dir, cfg, parallel,
                "slurm", text)


def _nproc(setting: int | str, probed: int | None, declared: int | None) -> tuple[int, str]:
    if isinstance(setting, int):
        return setting, "launch.nproc_per_node"
    if probed is not None:
        return max(probed, 1), f"auto: {probed} GPU(s) found" if probed else "auto: no GPU found, 1 process (CPU)"
    if declared is not None:
        return max(declared, 1), f"auto: cluster.nodes[].gpus = {declared}" if declared else "auto: gpus: 0, 1 process (CPU)"
    return 1, "auto: GPU count unknown until the node is probed; 1 process assumed"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)
