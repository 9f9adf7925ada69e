"""`mlaunch run` across several nodes, end to end: real OpenSSH sshd "nodes" on loopback
addresses (tests/sshd.py), real torchrun on each, real gloo training, mlaunch as a subprocess.

Every node here is this machine, so "no process of the run is left on any node" is one scan of
/proc for MLAUNCH_RUN_ID=<run id> (the handle the launcher itself cleans up by). Each job has a
unique name, and run ids start with it: the teardown ends whatever a failed test left behind.

What is checked: a clean 2×2 run with a shared workdir and with `sync` into each node's own
(empty) workdir; a node's torchrun SIGKILLed mid-run; Ctrl-C; a cut SSH connection; a node
unreachable at start; a taken rendezvous port; and env values full of shell syntax arriving
verbatim in the workers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import yaml

import tests.sshd
from tests.helpers import tiny_tokenizer, wait_until

ROOT = Path(__file__).resolve().parents[2]
MLAUNCH = [sys.executable, "-m", "launcher.cli"]
#: Steps enough that a run is still going whatever the test does meanwhile (it is stopped).
ENDLESS = 100_000
#: The launcher's promise: every node stopped this long after one node fails.
STOP_DEADLINE_S = 15.0


# ------------------------------------------------------------------------------- processes
def run_processes(match: Callable[[str], bool]) -> dict[int, dict[str, str]]:
    """pid → environment of every live process whose MLAUNCH_RUN_ID satisfies `match`.
    (A zombie's environ reads empty: a dead process never counts.)"""
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            raw = Path(entry.path, "environ").read_bytes()
        except OSError:
            continue
        env = dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)
        run_id = env.get("MLAUNCH_RUN_ID")
        if run_id is not None and match(run_id):
            found[int(entry.name)] = env
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------- jobs
@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> str:
    """A pre-trained tiny SentencePiece: no run spends its time training one."""
    return str(tiny_tokenizer(tmp_path_factory.mktemp("tokenizer")))


@dataclass
class Job:
    path: Path
    name: str  # run ids start with it
    out: Path  # train.output_dir
    nodes: list

    @property
    def logs(self) -> Path:
        return self.out / "logs"

    def node_names(self) -> list[str]:
        return [n.host for n in self.nodes]  # hosts are distinct: a node is named by its host


def write_job(tmp_path: Path, ssh_cluster, nodes, tokenizer: str, *, tag: str, workdir: str = str(ROOT),
              sync: bool = False, env: dict[str, str] | None = None, max_steps: int = 4,
              rdzv_port: int | None = None, train: dict | None = None) -> Job:
    """A 2-processes-per-node CPU job on `nodes`: hidden 32, 2 layers, 64 rows of 64 tokens."""
    name = f"mn-{tag}-{uuid.uuid4().hex[:6]}"
    out = tmp_path / "out"
    job = {
        "name": name,
        "launch": {"nproc_per_node": 2, "rdzv": {"port": rdzv_port or free_port(nodes[0].host)},
                   "grace_period_s": 5},
        "cluster": {
            "nodes": [{"host": n.host, "port": n.port} for n in nodes],
            "ssh": {"identity_file": ssh_cluster.identity_file, "known_hosts": ssh_cluster.known_hosts,
                    "config_file": ssh_cluster.empty_ssh_config, "connect_timeout_s": 5},
            "workdir": workdir,
            "python": sys.executable,
            "sync": sync,
            # Shell code run on every node before torchrun: every node prints a line, and says where.
            "setup": 'echo "node ready in $PWD"',
            "env": {"OMP_NUM_THREADS": "1", **(env or {})},
        },
        "train": {
            "model": {"init": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                               "num_attention_heads": 4}},
            "tokenizer": {"path": tokenizer},
            # Relative: read from the node's working directory, i.e. cluster.workdir.
            "data": {"path": "train/data/bitext_sample.jsonl", "template": "[INST] {instruction} [/INST]\n{response}",
                     "columns": {"response": "intent"}, "max_rows": 64, "max_length": 64, "micro_batch_size": 2,
                     "eval_fraction": 0},
            "max_steps": max_steps,
            "device": "cpu",
            "checkpoint": {"export": False},
            "output_dir": str(out),
            **(train or {}),
        },
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return Job(path, name, out, list(nodes))


@dataclass
class Launch:
    """One `mlaunch run JOB` subprocess, in a session of its own (a Ctrl-C reaches only it)."""

    job: Job
    proc: subprocess.Popen
    stdout_path: Path
    stderr_path: Path
    started: float = field(default_factory=time.monotonic)

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def output(self) -> str:
        return f"--- stdout ---\n{self.stdout[-4000:]}\n--- stderr ---\n{self.stderr[-4000:]}"

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"mlaunch did not end within {timeout:g}s\n{self.output()}")

    def run_info(self, timeout: float = 90) -> dict:
        """logs/run.json once every node's torchrun pid is recorded in it."""
        path = self.job.logs / "run.json"

        def ready() -> bool:
            try:
                info = json.loads(path.read_text())
            except (OSError, ValueError):
                return False
            return all(n.get("pid") for n in info["nodes"].values())

        if not wait_until(lambda: ready() or self.proc.poll() is not None, timeout) or not ready():
            pytest.fail(f"no complete {path} within {timeout:g}s (mlaunch exit {self.proc.poll()})\n{self.output()}")
        return json.loads(path.read_text())

    def wait_step(self, step: int, timeout: float = 120) -> None:
        """Until metrics.jsonl has reached `step` (the run is mid-training)."""
        metrics = self.job.out / "metrics.jsonl"

        def reached() -> bool:
            try:
                return any(json.loads(line).get("step", 0) >= step for line in metrics.read_text().splitlines() if line)
            except (OSError, ValueError):
                return False

        if not wait_until(lambda: reached() or self.proc.poll() is not None, timeout, 0.2) or not reached():
            pytest.fail(f"step {step} not reached within {timeout:g}s (mlaunch exit {self.proc.poll()})\n{self.output()}")

    def processes(self, run_id: str | None = None) -> dict[int, dict[str, str]]:
        if run_id is not None:
            return run_processes(lambda r: r == run_id)
        return run_processes(lambda r: r.startswith(self.job.name + "-"))

    def kill(self) -> None:
        """Teardown: end mlaunch and every process of its runs, whatever state they are in."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)
        for pid in self.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def launch(tmp_path):
    """launch(job) starts `mlaunch run JOB`; anything still running at teardown is killed."""
    started: list[Launch] = []

    def start(job: Job) -> Launch:
        env = dict(os.environ)
        env.pop("MLAUNCH_DEBUG", None)  # errors must be one line, as users see them
        env.pop("MLAUNCH_RUN_ID", None)
        out, err = tmp_path / f"{job.name}.stdout", tmp_path / f"{job.name}.stderr"
        with open(out, "wb") as o, open(err, "wb") as e:
            proc = subprocess.Popen([*MLAUNCH, "run", str(job.path)], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                    stdout=o, stderr=e, start_new_session=True)
        started.append(Launch(job, proc, out, err))
        return started[-1]

    yield start
    for run in started:
        run.kill()


def assert_clean_exit_message(run: Launch, *needles: str) -> None:
    """A user-facing failure: no traceback, and an `[mlaunch]`/`mlaunch: error:` line naming each needle."""
    err = run.stderr
    assert "Traceback" not in err, run.output()
    ours = [line for line in err.splitlines() if line.startswith(("[mlaunch]", "mlaunch: error:"))]
    for needle in needles:
        assert any(needle in line for line in ours), f"no launcher line names {needle!r}\n{run.output()}"


# ------------------------------------------------------------------------------- 1. clean runs
def check_finished_run(run: Launch, job: Job, max_steps: int, workdir: Path = ROOT) -> str:
    """Exit 0, metrics, per-node prefixes and logs, nothing left running. Returns the run id."""
    assert run.wait(timeout=180) == 0, run.output()
    rows = [json.loads(line) for line in (job.out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert rows and all("step" in r and "loss" in r for r in rows), rows
    assert max(r["step"] for r in rows) == max_steps
    lines = run.stdout.splitlines()
    for name in job.node_names():
        prefixed = [line for line in lines if re.match(rf"{re.escape(name)}\s* \| ", line)]
        assert any(line.endswith(f"| node ready in {workdir}") for line in prefixed), (
            f"no line `{name} | node ready in {workdir}`\n{run.output()}")
        log = job.logs / f"{name}.log"
        assert log.is_file() and log.stat().st_size > 0, f"missing {log}"
    # Only rank 0 prints progress; every node printed its setup line above.
    assert any("step 1/" in line and line.startswith(job.node_names()[0]) for line in lines), run.output()
    info = json.loads((job.logs / "run.json").read_text())
    assert set(info["nodes"]) == set(job.node_names())
    assert not run.processes(info["run_id"]), "processes of the finished run are still alive"
    return info["run_id"]


def test_two_nodes_shared_workdir(tmp_path, ssh_cluster, tokenizer, launch):
    nodes = ssh_cluster(2)
    job = write_job(tmp_path, ssh_cluster, nodes, tokenizer, tag="shared", max_steps=4)
    run = launch(job)
    check_finished_run(run, job, max_steps=4)
    assert "world size 4" in run.stderr


def test_hsdp_across_two_nodes_matches_ddp(tmp_path, ssh_cluster, tokenizer, launch):
    """hsdp over SSH: parameters sharded over each node's 2 ranks, replicated across the 2
    nodes (a 2-D mesh spanning both), on the same trajectory as ddp on the same 4 ranks."""
    nodes = ssh_cluster(2)
    losses = {}
    for strategy in ("hsdp", "ddp"):
        (tmp_path / strategy).mkdir()
        job = write_job(tmp_path / strategy, ssh_cluster, nodes, tokenizer, tag=strategy, max_steps=4,
                        train={"parallel": {"strategy": strategy}})
        run = launch(job)
        check_finished_run(run, job, max_steps=4)
        assert f"{strategy} on 4 rank(s)" in run.stdout, run.output()
        losses[strategy] = [json.loads(x)["loss"] for x in (job.out / "metrics.jsonl").read_text().splitlines()
                            if "loss" in json.loads(x)]
    assert len(losses["hsdp"]) == 4
    assert losses["hsdp"] == pytest.approx(losses["ddp"], rel=1e-4)


def test_a_node_late_to_the_rendezvous_is_reported_not_silent(tmp_path, ssh_cluster, tokenizer, launch):
    """The second node starts torchrun 12 s late: the first waits at the rendezvous, and mlaunch
    says so (and where) instead of staying mute; once both have joined the run completes."""
    nodes = ssh_cluster(2)
    job = write_job(tmp_path, ssh_cluster, nodes, tokenizer, tag="late", max_steps=2)
    spec = yaml.safe_load(job.path.read_text())
    spec["launch"]["silence_warning_s"] = 4
    # SSH_CONNECTION holds the server's address: only the second node sleeps before its torchrun.
    spec["cluster"]["setup"] = f'case "$SSH_CONNECTION" in *" {nodes[1].host} "*) sleep 12;; esac; echo "node ready in $PWD"'
    job.path.write_text(yaml.safe_dump(spec, sort_keys=False))
    run = launch(job)
    assert run.wait(timeout=180) == 0, run.output()
    assert "still waiting for all 2 node(s) to join the rendezvous at" in run.stderr, run.output()


_NAMESPACED_SSHD = """#!/bin/sh
# sshd in a mount namespace of its own, in which {target} is this node's private work directory
# (<node dir>/work): one cluster.workdir path, a different disk behind it on every node.
cfg="$4"  # tests/sshd.py runs: sshd -D -e -f <node dir>/sshd_config
exec unshare --mount --propagation private sh -c 'mount --bind "$1" "$2" && shift 2 && exec "$@"' \\
    sh "$(dirname "$cfg")/work" {target} {sshd} "$@"
"""


@pytest.fixture(scope="module")
def private_disk_nodes(ssh_cluster, tmp_path_factory):
    """Two private nodes whose `target` directory is each node's own `workdir` (mount namespaces),
    as if they were separate machines: loopback nodes otherwise share one filesystem, and
    cluster.workdir is one path for all nodes."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare(1) to give each loopback node a private workdir")
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True, timeout=10)
    if probe.returncode != 0:
        pytest.skip(f"mount namespaces unavailable: {probe.stderr.decode().strip()}")
    base = tmp_path_factory.mktemp("private-disk")
    target = base / "workdir"
    target.mkdir()
    wrapper = base / "sshd-ns"
    wrapper.write_text(_NAMESPACED_SSHD.format(target=target, sshd=tests.sshd.SSHD))
    wrapper.chmod(0o755)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tests.sshd, "SSHD", str(wrapper))
        nodes = [ssh_cluster.spawn(), ssh_cluster.spawn()]
    yield target, nodes
    for node in nodes:
        node.stop()


@pytest.fixture
def envs_in_project():
    """Virtualenvs inside the project for the duration of a test: one named like any directory
    (recognised by its pyvenv.cfg) and a `.venv`, beside a plain file that must be synced. Under
    build/, which git ignores, so that the other engineers' `git status` stays clean."""
    created_build = not (ROOT / "build").exists()
    base = ROOT / "build" / f"mlaunch-sync-test-{uuid.uuid4().hex[:6]}"
    for env_dir in (base / "someenv", base / ".venv"):
        (env_dir / "bin").mkdir(parents=True)
        (env_dir / "pyvenv.cfg").write_text("home = /usr/bin\n")
        (env_dir / "bin" / "python").write_text("")
    (base / "kept.txt").write_text("synced\n")
    try:
        yield base.relative_to(ROOT).as_posix()
    finally:
        shutil.rmtree(base, ignore_errors=True)
        if created_build:
            shutil.rmtree(ROOT / "build", ignore_errors=True)


def test_two_nodes_sync_into_own_workdirs(tmp_path, ssh_cluster, tokenizer, launch, private_disk_nodes,
                                          envs_in_project):
    target, nodes = private_disk_nodes
    for node in nodes:
        assert not any(Path(node.workdir).iterdir()), f"{node.workdir} is not empty"
    # No bytecode written on the nodes: any __pycache__ there would have been pushed.
    job = write_job(tmp_path, ssh_cluster, nodes, tokenizer, tag="sync", workdir=str(target), sync=True, max_steps=3,
                    env={"PYTHONDONTWRITEBYTECODE": "1"})
    run = launch(job)
    check_finished_run(run, job, max_steps=3, workdir=target)
    assert not any(target.iterdir()), "a node wrote into the launcher's filesystem instead of its own workdir"
    for node in nodes:
        wd = Path(node.workdir)
        assert f"{node.host}: synced" in run.stderr
        for rel in ("launcher/backends/ssh.py", "train/__main__.py", "train/data/bitext_sample.jsonl",
                    f"{envs_in_project}/kept.txt"):
            assert (wd / rel).read_bytes() == (ROOT / rel).read_bytes(), f"{rel} did not arrive on {node.host}"
        pushed = {p.relative_to(wd).as_posix() for p in wd.rglob("*")}
        leaked = [p for p in pushed if p.split("/")[0] in (".git", "runs", ".pytest_cache")
                  or {"__pycache__", "someenv", ".venv"} & set(p.split("/")) or p.endswith(".pyc")]
        assert not leaked, f"pushed to {node.host}: {sorted(leaked)[:10]}"
    # The data path is relative, so each node read it from its cwd, the synced workdir (a fallback
    # to the launcher's checkout would be recorded as an absolute path).
    metas = [json.loads(p.read_text()) for p in job.out.glob("cache/data-*/meta.json")]
    assert metas and all(m["source"] == "train/data/bitext_sample.jsonl" for m in metas), metas


# ------------------------------------------------------------------------------- 2. a node dies
def test_node_torchrun_killed_stops_every_node(tmp_path, ssh_cluster, tokenizer, launch):
    nodes = ssh_cluster(2)
    job = write_job(tmp_path, ssh_cluster, nodes, tokenizer, tag="kill", max_steps=ENDLESS)
    run = launch(job)
    info = run.run_info()
    run.wait_step(2)
    victim = job.node_names()[1]
    pid = info["nodes"][victim]["pid"]
    os.killpg(pid, signal.SIGKILL)  # torchrun's process group; its workers live in sessions of their own
    killed = time.monotonic()
    code = run.wait(timeout=60)
    assert wait_until(lambda: not run.processes(info["run_id"]), STOP_DEADLINE_S - (time.monotonic() - killed)), (
        f"processes of the run still alive {time.monotonic() - killed:.1f}s after the kill: "
        f"{[cmdline(p) for p in run.processes(info['run_id'])]}")
    assert time.monotonic() - killed <= STOP_DEADLINE_S
    assert code != 0, run.output()
    assert_clean_exit_message(run, f"node {victim} was killed by a signal")
    assert "lost its SSH connection" not in run.stderr, "the connection was fine; the job was killed"


# ------------------------------------------------------------------------------- 3. Ctrl-C
def test_sigint_stops_the_run_on_every_node_and_nothing_else(tmp_path, ssh_cluster, tokenizer, launch):
    nodes = ssh_cluster(2)
    job = write_job(tmp_path, ssh_cluster, nodes, tokenizer, tag="sigint", max_steps=ENDLESS)
    run = launch(job)
    info = run.run_info()
    run.wait_step(2)
    run_id = info["run_id"]
    # Bystanders: a python3 sleeping (cleanup must never match names), and one whose run id only
    # starts like ours (it must match exactly).
    sleeper = subprocess.Popen(["python3", "-c", "import time; time.sleep(300)"], start_new_session=True,
                               stdin=subprocess.DEVNULL)
    lookalike = subprocess.Popen(["python3", "-c", "import time; time.sleep(300)"], start_new_session=True,
                                 stdin=subprocess.DEVNULL, env={**os.environ, "MLAUNCH_RUN_ID": run_id + "-x"})
    try:
        before = run.processes(run_id)
        assert len(before) >= 6, f"expected torchrun + 2 workers on each of 2 nodes: {[cmdline(p) for p in before]}"
        run.proc.send_signal(signal.SIGINT)
        assert run.wait(timeout=60) == 130, run.output()
        left = run.processes(run_id)
        assert not left, f"left running after Ctrl-C: {[cmdline(p) for p in left]}"
        ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True, timeout=10).stdout
        assert not [line for line in ps.splitlines() if str(job.out) in line], ps
        assert sleeper.poll() is None and lookalike.poll() is None, "cleanup ended a process not of this run"
        assert "Traceback" not in run.stderr, run.output()
    finally:
        for p in (sleeper, lookalike):
            p.kill()
            p.wait(timeout=10)


# ------------------------------------------------------------------------------- 4. a cut connection
def test_cut_ssh_connection_ends_the_remote_job(tmp_path, ssh_cluster, tokenizer, launch):
    nodes = ssh_cluster(2)
    job = write_job(tmp_path, ssh_cluster, nodes, tokenizer, tag="cut", max_steps=ENDLESS)
    run = launch(job)
    info = run.run_info()
    run.wait_step(2)
    victim = nodes[1]
    sessions = [p for p in victim.sshd_children() if p.ppid() == victim.pid]
    assert sessions, "no sshd session process for mlaunch's connection"
    for p in sessions:  # the per-connection sshd: the TCP connection and the job's pty go with it
        p.kill()
    cut = time.monotonic()
    assert wait_until(lambda: not run.processes(info["run_id"]), STOP_DEADLINE_S), (
        f"processes of the run alive {STOP_DEADLINE_S:g}s after the cut: "
        f"{[cmdline(p) for p in run.processes(info['run_id'])]}")
    code = run.wait(timeout=60)
    assert code != 0, run.output()
    assert_clean_exit_message(run, f"node {victim.host} lost its SSH connection")
    assert time.monotonic() - cut < 60


# ------------------------------------------------------------------------------- 5-6. nothing starts
def test_unreachable_node_at_start(tmp_path, ssh_cluster, tokenizer, launch):
    healthy = ssh_cluster(1)[0]
    down = ssh_cluster.spawn()
    down.stop()
    job = write_job(tmp_path, ssh_cluster, [healthy, down], tokenizer, tag="down")
    run = launch(job)
    code = run.wait(timeout=60)
    assert code != 0, run.output()
    assert_clean_exit_message(run, down.host)
    assert "nothing started" in run.stderr, run.output()
    assert healthy.host not in run.stderr.replace(f"{healthy.host}:", ""), "the healthy node was reported as failing"
    assert not (job.logs / "run.json").exists()
    assert not run.processes(), "a process of the job started"


def test_rendezvous_port_taken_on_master(tmp_path, ssh_cluster, tokenizer, launch):
    nodes = ssh_cluster(2)
    with socket.socket() as holder:
        holder.bind((nodes[0].host, 0))
        holder.listen()
        port = holder.getsockname()[1]
        job = write_job(tmp_path, ssh_cluster, nodes, tokenizer, tag="port", rdzv_port=port)
        run = launch(job)
        code = run.wait(timeout=60)
    assert code != 0, run.output()
    errors = [line for line in run.stderr.splitlines() if line.startswith("mlaunch: error:")]
    assert len(errors) == 1 and f"port {port}" in errors[0] and "not free" in errors[0], run.output()
    assert "Traceback" not in run.stderr
    assert not (job.logs / "run.json").exists()
    assert not run.processes(), "a process of the job started"


# ------------------------------------------------------------------------------- 7. env verbatim
def test_env_values_reach_the_workers_verbatim(tmp_path, ssh_cluster, tokenizer, launch):
    """cluster.env → plan → shell line → sshd's login shell → torchrun → the workers' environ.

    Read from the live workers' /proc/<pid>/environ: nothing is evaluated on the way, and a
    command substitution that did run would leave its marker file behind."""
    nodes = ssh_cluster(2)
    marker = tmp_path / "evaluated"
    env = {
        "MLT_SUBST": f"$(touch {marker})",
        "MLT_BACKTICKS": f"`touch {marker}`; echo hi",
        "MLT_QUOTES": "it's \"double\" and 'single' \\ back\\slash",
        "MLT_SPACES": "  two  leading, two trailing  ",
        "MLT_NEWLINES": "line one\nline two\n",
        "MLT_MISC": "a;b|c&d>e<f *?[x] ~ $HOME !! #",
    }
    job = write_job(tmp_path, ssh_cluster, nodes, tokenizer, tag="env", env=env, max_steps=ENDLESS)
    run = launch(job)
    info = run.run_info()
    run.wait_step(1)
    procs = run.processes(info["run_id"])
    workers = {pid: e for pid, e in procs.items() if "LOCAL_RANK" in e}  # torchrun's workers
    assert len(workers) == 4, [cmdline(p) for p in procs]
    for pid, worker_env in workers.items():
        for key, value in env.items():
            assert worker_env.get(key) == value, f"{key} in worker {pid}: {worker_env.get(key)!r} != {value!r}"
    assert not marker.exists(), "a value was evaluated by a shell"
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait(timeout=60) == 143, run.output()
    assert not run.processes(info["run_id"])
