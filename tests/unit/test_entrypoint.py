"""`launch.entrypoint`: the config (string or list, `-m module`, `train:` optional), the plan's
argv on every backend (standalone, SSH, the sbatch script), `mlaunch plan`'s printout, and the
lookup that finds a missing script before anything starts."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pytest

from job.config import load_config, validate, with_entrypoint
from job.errors import ConfigError
from launcher.entrypoint import check_here
from launcher.nodes import probe_argv
from launcher.plan import make_plan
from launcher.planning import build_plan

SSH2 = {"nodes": [{"host": "n0", "addr": "10.0.0.1"}, {"host": "n1", "addr": "10.0.0.2"}], "workdir": "~/proj"}


def job(**launch) -> dict:
    return {"name": "mine", "launch": {"nproc_per_node": 2, **launch}}


def test_entrypoint_string_list_and_module(tmp_path: Path) -> None:
    cfg = validate(job(entrypoint="train_mine.py --name 'a b' --lr 1e-4"))
    assert cfg.launch.entrypoint == ["train_mine.py", "--name", "a b", "--lr", "1e-4"]
    assert cfg.train is None and cfg.output_dir == "runs/mine"  # no train: section is no error
    # YAML numbers in a list are words too; `-m module args` is torchrun's own module form.
    (tmp_path / "j.yaml").write_text("launch:\n  entrypoint: [-m, pkg.train, --epochs, 3]\n  output_dir: out/here\n")
    loaded = load_config(tmp_path / "j.yaml")
    assert loaded.launch.entrypoint == ["-m", "pkg.train", "--epochs", "3"] and loaded.output_dir == "out/here"
    assert loaded.with_output_dir("x").output_dir == "x"


@pytest.mark.parametrize("entry, says", [
    ("", "is empty"),
    ("-m", "needs a module name"),
    ("--nproc-per-node 2 x.py", "starts with the option"),
    ("python x.py", "write the script itself"),
    ("x.py 'unclosed", "check its quotes"),
])
def test_bad_entrypoints_are_one_line(tmp_path: Path, entry: str, says: str) -> None:
    (tmp_path / "j.yaml").write_text(f"launch:\n  entrypoint: {json.dumps(entry)}\n")
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "j.yaml")
    assert says in str(e.value) and "launch.entrypoint" in str(e.value) and "\n" not in str(e.value)


def test_train_required_without_entrypoint_and_output_dir_rule(tmp_path: Path) -> None:
    (tmp_path / "j.yaml").write_text("launch:\n  nproc_per_node: 2\n")
    with pytest.raises(ConfigError, match=r"j\.yaml: `train` is required .*launch\.entrypoint"):
        load_config(tmp_path / "j.yaml")
    # The same YAML is complete with the words after `mlaunch run CONFIG --`.
    cfg = load_config(tmp_path / "j.yaml", entrypoint=["s.py", "--x", "1"])
    assert cfg.launch.entrypoint == ["s.py", "--x", "1"] and cfg.launch.nproc_per_node == 2
    (tmp_path / "t.yaml").write_text("launch:\n  output_dir: o\ntrain:\n  model: {init: {}}\n")
    with pytest.raises(ConfigError, match="launch.output_dir.*train.output_dir"):
        load_config(tmp_path / "t.yaml")


def test_with_entrypoint_replaces_and_checks() -> None:
    base = validate({**job(entrypoint="a.py"), "train": {"model": {"init": {}}, "output_dir": "runs/t"}})
    cfg = with_entrypoint(base, ["b.py", "--flag"])
    assert cfg.launch.entrypoint == ["b.py", "--flag"] and base.launch.entrypoint == ["a.py"]
    assert cfg.output_dir == "runs/t"  # with train: its output_dir
    with pytest.raises(ConfigError, match=r"^`-- python b.py`: the entrypoint starts with 'python'"):
        with_entrypoint(base, ["python", "b.py"])


def test_plan_runs_the_entrypoint_on_every_node() -> None:
    local = make_plan(validate(job(entrypoint="s.py --a 'x y'")), run_id="r1", config_path="runs/mine/config.yaml",
                      standalone=True, python="/py")
    argv = local.nodes[0].argv
    assert argv[:4] == ["/py", "-m", "torch.distributed.run", "--standalone"] and argv[-3:] == ["s.py", "--a", "x y"]
    assert "train" not in argv and local.output_dir == "runs/mine"
    assert shlex.split(local.nodes[0].command())[-3:] == ["s.py", "--a", "x y"]

    cfg = validate({**job(entrypoint=["-m", "pkg.mod", "--k", "v"]), "cluster": SSH2})
    plan = make_plan(cfg, run_id="r2", config_path="runs/mine/config.yaml")
    assert [n.argv[-4:] for n in plan.nodes] == [["-m", "pkg.mod", "--k", "v"]] * 2
    assert all(n.argv.index("--local-addr") < n.argv.index("pkg.mod") for n in plan.nodes)
    data = plan.to_json()
    assert data["entrypoint"] == ["-m", "pkg.mod", "--k", "v"] and data["output_dir"] == "runs/mine"
    assert all(node["command"].endswith("-m pkg.mod --k v") for node in data["nodes"])
    # `nodes check --collective` swaps what runs for its probe: the entrypoint goes, torchrun's options stay.
    probe = probe_argv(plan.nodes[0].argv, "/tmp/p.py")
    assert probe[-1] == "/tmp/p.py" and "pkg.mod" not in probe and "--local-addr" in probe


def test_sbatch_script_runs_the_entrypoint() -> None:
    cfg = validate({**job(entrypoint="s.py --lr 1e-4"), "cluster": {"slurm": {"nodes": 2}}})
    plan = make_plan(cfg, run_id="sl-run", config_path="runs/mine/config.yaml")
    task = next(line for line in plan.sbatch.splitlines() if "torch.distributed.run" in line)
    assert task.rstrip().endswith("s.py --lr 1e-4 ) &") and "-m train" not in plan.sbatch
    assert "--output=runs/mine/slurm/slurm-%j.out" in plan.sbatch


def test_build_plan_skips_the_planner_and_mlaunch_plan_shows_the_command(capsys) -> None:
    from launcher.render import print_plan

    cfg = validate(job(entrypoint="s.py --a 1"))
    plan, decision = build_plan(cfg, standalone=True, probe=False)  # `mlaunch plan`: no file lookup
    assert decision is None and plan.parallel["strategy"] is None and "entrypoint" in plan.parallel["decided_by"]
    print_plan(plan, cfg, decision)
    out = capsys.readouterr().out
    assert "entrypoint (every rank): s.py --a 1" in out and "decided by the entrypoint" in out
    assert "--nproc-per-node 2 --max-restarts 0 --monitor-interval 1 s.py --a 1" in out


def test_missing_entrypoint_is_found_here(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("raise SystemExit('imported: the check must not run the package')\n")
    (tmp_path / "pkg" / "train.py").write_text("")
    (tmp_path / "s.py").write_text("")
    monkeypatch.chdir(tmp_path)
    for ok in (["s.py"], ["-m", "pkg.train"], ["-m", "json.tool"]):
        check_here(validate(job(entrypoint=ok)))
    for bad, why in ((["nope.py", "--x"], "entrypoint script nope.py: no such file"),
                     (["pkg"], "entrypoint script pkg: is a directory"),
                     (["-m", "pkg.nope"], "entrypoint module pkg.nope: no module named 'pkg.nope'"),
                     (["-m", "nosuchpkg_mlaunch"], "entrypoint module nosuchpkg_mlaunch: no module named")):
        with pytest.raises(ConfigError) as e:
            check_here(validate(job(entrypoint=bad)))
        assert str(e.value).startswith(why) and str(tmp_path) in str(e.value)
    # A run (probe=True, here) looks before anything starts.
    with pytest.raises(ConfigError, match="nope.py: no such file"):
        build_plan(validate(job(entrypoint="nope.py")), standalone=True, probe=True)
    assert os.getcwd() == str(tmp_path)


def test_the_example_yaml_plans_the_tutorial(monkeypatch) -> None:
    monkeypatch.setenv("TINY_LLAMA", "/models/tiny")
    cfg = load_config(Path(__file__).resolve().parents[2] / "examples" / "tutorial.yaml")
    assert cfg.train is None and cfg.launch.entrypoint[:2] == ["examples/tutorial.py", "/models/tiny"]
    plan, _ = build_plan(cfg, standalone=True, probe=False)
    assert plan.nodes[0].argv[-len(cfg.launch.entrypoint):] == cfg.launch.entrypoint
    assert plan.output_dir == "runs/tutorial" and plan.config_path == "runs/tutorial/config.yaml"
