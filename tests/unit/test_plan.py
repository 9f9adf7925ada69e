"""The plan is pure: golden per-node commands for 1, 2 and 16 nodes, and quoting that survives `sh -c`."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from job.config import load_config, validate
from job.errors import ConfigError
from launcher.plan import make_plan, masked_env
from launcher.shell import shell_command as shell_line

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "golden"
LOCAL_ENV = {"NCCL_SOCKET_IFNAME": "eth0", "HF_TOKEN": "hf_secret", "HOME": "/root", "PATH": "/usr/bin", "WANDB_API_KEY": "k"}


def cluster_job(n: int, **launch) -> dict:
    nodes = [{"host": f"node{i:02d}", "addr": f"10.0.{i // 256}.{i % 256 + 1}", "gpus": 8} for i in range(n)]
    return {
        "name": f"golden{n}",
        "cluster": {"nodes": nodes, "ssh": {"user": "trainer", "port": 2222}, "workdir": "~/proj",
                    "python": "~/venv/bin/python", "setup": "source ~/venv/bin/activate",
                    "env": {"NCCL_DEBUG": "WARN", "DB_PASSWORD": "hunter2"}},
        "launch": {"nproc_per_node": "auto", **launch},
        "train": {"model": {"name_or_path": "baichuan-inc/Baichuan2-13B-Base"}, "output_dir": "runs/golden"},
    }


@pytest.mark.parametrize("n", [1, 2, 16])
def test_golden_plans(n: int) -> None:
    cfg = validate(cluster_job(n))
    plan = make_plan(cfg, run_id="golden-run", config_path="runs/golden/config.yaml", local_env=LOCAL_ENV)
    got = plan.to_json(mask=True)
    path = GOLDEN / f"plan_{n}_nodes.json"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.write_text(json.dumps(got, indent=2) + "\n")
    assert got == json.loads(path.read_text())
    assert plan.world_size == 8 * n
    assert got["rendezvous"]["endpoint"] == "10.0.0.1:29400"
    # Only the master hosts the c10d store; every agent binds its own address.
    assert [node["argv"][node["argv"].index("--rdzv-conf") + 1].endswith("is_host=1") for node in got["nodes"]] == [True] + [False] * (n - 1)
    assert all(node["env"]["DB_PASSWORD"] == "****" and node["env"]["HF_TOKEN"] == "****" for node in got["nodes"])
    assert all("HOME" not in node["env"] and node["env"]["NCCL_SOCKET_IFNAME"] == "eth0" for node in got["nodes"])


def test_static_rendezvous_and_elastic_nnodes() -> None:
    cfg = validate(cluster_job(3, rdzv={"backend": "static", "port": 29500}))
    plan = make_plan(cfg, run_id="r", config_path="c.yaml")
    for rank, node in enumerate(plan.nodes):
        assert node.argv[node.argv.index("--node-rank") + 1] == str(rank)
        assert node.argv[node.argv.index("--master-addr") + 1] == "10.0.0.1"
    elastic = make_plan(validate(cluster_job(4, nnodes="2:4")), run_id="r", config_path="c.yaml")
    assert elastic.rendezvous.nnodes == "2:4"
    with pytest.raises(ConfigError, match="static rendezvous has a fixed size"):
        make_plan(validate(cluster_job(4, nnodes="2:4", rdzv={"backend": "static"})), run_id="r", config_path="c.yaml")
    with pytest.raises(ConfigError, match="asks for up to 5 nodes"):
        make_plan(validate(cluster_job(4, nnodes="5")), run_id="r", config_path="c.yaml")


def test_explicit_endpoint_and_addr_resolution() -> None:
    job = cluster_job(2)
    for node in job["cluster"]["nodes"]:
        del node["addr"]
    job["launch"]["rdzv"] = {"endpoint": "node01:29999"}
    plan = make_plan(validate(job), run_id="r", config_path="c.yaml", addrs={0: "192.168.1.5", 1: "192.168.1.6"})
    assert plan.rendezvous.endpoint == "node01:29999"
    assert plan.nodes[1].addr == "192.168.1.6"


NASTY = ["$(touch /tmp/pwned)", "`id`", "it's", 'say "hi"', "two  spaces", "line1\nline2", "back\\slash", "semi;colon", "*glob?", ""]


@pytest.mark.parametrize("value", NASTY)
def test_quoting_round_trips_through_sh(value: str, tmp_path: Path) -> None:
    line = shell_line([sys.executable, "-c", "import os,sys,json; print(json.dumps([os.environ['V'], sys.argv[1]]))", value],
                      {"V": value}, cwd=str(tmp_path))
    out = subprocess.run(["sh", "-c", line], capture_output=True, text=True, check=True, timeout=30).stdout
    assert json.loads(out) == [value, value]
    assert not Path("/tmp/pwned").exists()


def test_tilde_paths_expand() -> None:
    line = shell_line(["~/bin/python", "-V"], {}, cwd="~/my dir")
    assert line == "cd ~/'my dir' && exec ~/bin/python -V"


def test_masking() -> None:
    assert masked_env({"HF_TOKEN": "x", "AWS_SECRET_ACCESS_KEY": "y", "NCCL_DEBUG": "INFO", "MY_PASSWORD": ""}) == {
        "HF_TOKEN": "****", "AWS_SECRET_ACCESS_KEY": "****", "NCCL_DEBUG": "INFO", "MY_PASSWORD": ""}


def test_cli_plan_json(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "launcher.cli", "plan", "configs/baichuan13b.yaml", "--json"],
                         capture_output=True, text=True, cwd=ROOT, check=True, timeout=60).stdout
    data = json.loads(out)
    assert data["rendezvous"]["endpoint"] == "10.0.0.11:29400"
    assert len(data["nodes"]) == 2 and all(shlex.split(n["command"]) for n in data["nodes"])
    assert data["parallel"]["strategy"] in ("ddp", "fsdp", "hsdp", "pipeline")


def test_standalone_plan_uses_this_python() -> None:
    cfg = load_config(ROOT / "configs/tiny.yaml")
    plan = make_plan(cfg, run_id="r", config_path="runs/tiny/config.yaml", standalone=True, python=sys.executable)
    argv = plan.nodes[0].argv
    assert argv[:4] == [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    assert argv[argv.index("--nproc-per-node") + 1] == "2" and argv[-3:] == ["-m", "train", "runs/tiny/config.yaml"]


@pytest.mark.parametrize("overrides,fragment", [
    (["train.parallel.strategy=pipeline", "train.parallel.pp=3"], "does not divide the world size 2"),
    (["train.parallel.pp=2"], "need `strategy: pipeline`"),
])
def test_bad_parallel_layout_fails_before_anything_runs(overrides: list[str], fragment: str) -> None:
    args = [a for o in overrides for a in ("--set", o)]
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", "plan", "configs/tiny.yaml", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2 and fragment in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_per_node_workdir_and_python() -> None:
    job = cluster_job(2)
    job["cluster"]["nodes"][1].update(workdir="/scratch/proj", python="/opt/py/bin/python")
    plan = make_plan(validate(job), run_id="r", config_path="c.yaml")
    assert plan.nodes[0].argv[0] == "~/venv/bin/python" and plan.nodes[0].workdir == "~/proj"
    assert plan.nodes[1].argv[0] == "/opt/py/bin/python" and "cd /scratch/proj &&" in plan.nodes[1].command()
    assert [n.python for n in plan.nodes] == ["~/venv/bin/python", "/opt/py/bin/python"]
    assert plan.resolved is not None and all("python" not in n for n in plan.to_json()["nodes"])


def slurm_job(**slurm) -> dict:
    return {
        "name": "sl",
        "cluster": {"slurm": {"nodes": 4, "gpus_per_node": 8, "partition": "gpu", "account": "proj", "qos": "high",
                              "time": "1-00:00:00", "constraint": "h100", "sbatch_args": ["--exclusive"], **slurm},
                    "python": "~/venv/bin/python", "setup": "source ~/venv/bin/activate",
                    "env": {"DB_PASSWORD": "hunter2"}},
        "launch": {"nproc_per_node": "auto"},
        "train": {"model": {"name_or_path": "baichuan-inc/Baichuan2-13B-Base"}, "output_dir": "runs/sl"},
    }


def test_slurm_plan_is_the_sbatch_script_it_submits(tmp_path: Path) -> None:
    cfg = validate(slurm_job())
    plan = make_plan(cfg, run_id="sl-run", config_path="runs/sl/config.yaml", local_env=LOCAL_ENV)
    assert plan.backend == "slurm" and plan.world_size == 32 and len(plan.nodes) == 4
    assert {n.nproc_per_node for n in plan.nodes} == {8}  # auto = gpus_per_node
    script = plan.sbatch
    for line in ["#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --account=proj", "#SBATCH --qos=high", "#SBATCH --time=1-00:00:00",
                 "#SBATCH --constraint=h100", "#SBATCH --exclusive", "#SBATCH --requeue", "#SBATCH --signal=B:USR1@300"]:
        assert line in script.splitlines(), line
    # The rendezvous: c10d, id = the job id, a port from the job id, the host said explicitly.
    assert '--rdzv-id "${SLURM_JOB_ID}"' in script and "is_host=${MLAUNCH_IS_HOST}" in script
    assert "MLAUNCH_RDZV_PORT=$(( 29400 + SLURM_JOB_ID % 1000 ))" in script
    assert "srun --kill-on-bad-exit=1" in script and "hunter2" in script
    masked = plan.to_json(mask=True)
    assert masked["backend"] == "slurm" and "hunter2" not in json.dumps(masked)
    shown = masked["slurm"]["script"]
    assert "DB_PASSWORD='****'" in shown and "hf_secret" not in shown
    assert [a for a in shown.splitlines() if "****" not in a] == [a for a in script.splitlines() if "hunter2" not in a]
    # bash parses it, and the batch shell's task function is what srun runs on every node.
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0


def test_slurm_config_errors_are_one_line() -> None:
    both = slurm_job()
    both["cluster"]["nodes"] = [{"host": "a"}]
    with pytest.raises(ConfigError, match="both `nodes` and `slurm`"):
        validate(both)
    with pytest.raises(ConfigError, match="sbatch option"):
        validate(slurm_job(sbatch_args=["exclusive"]))
    cfg = validate({**slurm_job(), "launch": {"nnodes": "2"}})
    with pytest.raises(ConfigError, match="Slurm allocates a fixed number of nodes"):
        make_plan(cfg, run_id="r", config_path="c.yaml")


def test_cli_plan_json_for_slurm_needs_no_network(tmp_path: Path) -> None:
    path = tmp_path / "sl.yaml"
    path.write_text(json.dumps(slurm_job()))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    env["PATH"] = "/nonexistent"  # no sbatch, no scontrol: planning asks no one
    res = subprocess.run([sys.executable, "-m", "launcher.cli", "plan", str(path), "--json"], capture_output=True,
                         text=True, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["backend"] == "slurm" and data["slurm"]["script"].startswith("#!/bin/bash")
    assert data["parallel"]["strategy"]


def test_run_without_slurm_tools_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "sl.yaml"
    path.write_text(json.dumps(slurm_job()))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    env["PATH"] = "/nonexistent"
    res = subprocess.run([sys.executable, "-m", "launcher.cli", "run", str(path)], capture_output=True, text=True,
                         env=env, cwd=tmp_path)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [
        "mlaunch: error: sbatch, srun, scontrol, scancel not found on PATH: run mlaunch on a Slurm login node, or "
        "install Slurm's client commands (Debian: `apt install slurm-client`; HPC sites: `module load slurm`)"]
