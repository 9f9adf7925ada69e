"""Malformed job YAMLs: every one exits 2 with one line naming the problem — never a traceback."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from job.config import TUTORIAL_TEMPLATE, load_config, parse_override
from job.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
#: Seven levels of nine aliases ("billion laughs"): 9**7 = 4.8 million strings from 7 lines.
BOMB = 'l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n' + "".join(
    f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 7))
GOOD_TRAIN = "train:\n  model:\n    init: {hidden_size: 32}\n"

# (name, yaml text, extra CLI args, a fragment the one-line error must contain)
BAD = [
    ("syntax", "train: [unclosed\n", [], "invalid YAML"),
    ("tab-indent", "train:\n\tmodel: x\n", [], "invalid YAML"),
    ("not-mapping", "- a\n- b\n", [], "is a mapping"),
    ("unknown-top", GOOD_TRAIN + "trian: {}\n", [], "unknown key `trian`"),
    ("unknown-train", GOOD_TRAIN + "  epoch: 2\n", [], "did you mean `epochs`"),
    ("unknown-optim", GOOD_TRAIN + "  optim:\n    lrr: 1\n", [], "did you mean `lr`"),
    ("unknown-launch", GOOD_TRAIN + "launch:\n  nproc_per_nod: 2\n", [], "did you mean `nproc_per_node`"),
    ("unknown-rdzv", GOOD_TRAIN + "launch:\n  rdzv:\n    endpiont: a:1\n", [], "did you mean `endpoint`"),
    ("unknown-cluster", GOOD_TRAIN + "cluster:\n  nodes: [{host: a}]\n  workdri: /x\n", [], "did you mean `workdir`"),
    ("unknown-node", GOOD_TRAIN + "cluster:\n  nodes:\n    - host: a\n      prot: 22\n", [], "did you mean `port`"),
    ("unknown-ssh", GOOD_TRAIN + "cluster:\n  nodes: [{host: a}]\n  ssh:\n    identityfile: k\n", [], "did you mean `identity_file`"),
    ("wrong-type-int", GOOD_TRAIN + "  epochs: many\n", [], "train.epochs"),
    ("wrong-type-float", GOOD_TRAIN + "  optim:\n    lr: fast\n", [], "train.optim.lr"),
    ("negative-epochs", GOOD_TRAIN + "  epochs: -1\n", [], "greater than or equal to 1"),
    ("negative-nproc", GOOD_TRAIN + "launch:\n  nproc_per_node: -2\n", [], "launch.nproc_per_node"),
    ("zero-batch", GOOD_TRAIN + "  data:\n    micro_batch_size: 0\n", [], "train.data.micro_batch_size"),
    ("bad-port", GOOD_TRAIN + "cluster:\n  nodes:\n    - host: a\n      port: 70000\n", [], "cluster.nodes[0].port"),
    ("empty-nodes", GOOD_TRAIN + "cluster:\n  nodes: []\n", [], "node list is empty"),
    ("duplicate-hosts", GOOD_TRAIN + "cluster:\n  nodes:\n    - host: a\n    - host: a\n", [], "same host a:22"),
    ("duplicate-key", GOOD_TRAIN + "  epochs: 1\n  epochs: 2\n", [], "duplicate key"),
    ("bad-strategy", GOOD_TRAIN + "  parallel:\n    strategy: zero3\n", [], "train.parallel.strategy"),
    ("bad-nnodes", GOOD_TRAIN + "launch:\n  nnodes: 4:2\n", [], "MIN:MAX"),
    ("missing-train", "launch: {}\n", [], "`train` is required"),
    ("missing-model-source", "train:\n  model: {}\n", [], "name_or_path"),
    ("missing-env-var", GOOD_TRAIN + "  output_dir: ${MLAUNCH_SURELY_UNSET_VAR}\n", [], "MLAUNCH_SURELY_UNSET_VAR is not set"),
    ("missing-cluster-file", GOOD_TRAIN + "cluster: no/such/cluster.yaml\n", [], "does not exist"),
    ("set-no-equals", GOOD_TRAIN, ["--set", "train.epochs"], "expected dotted.key=value"),
    ("set-unknown-key", GOOD_TRAIN, ["--set", "train.optim.lrr=1"], "did you mean `lr`"),
    ("set-unknown-section", GOOD_TRAIN, ["--set", "train.optm.lr=1"], "did you mean `optim`"),
    ("set-wrong-type", GOOD_TRAIN, ["--set", "train.max_steps=soon"], "train.max_steps"),
    ("empty-file", "", [], "the file is empty"),
    ("only-comments", "# nothing here\n", [], "the file is empty"),
    ("alias-bomb", BOMB + GOOD_TRAIN, [], "aliases expand to more than 100,000 values"),
    ("env-list", GOOD_TRAIN + "cluster:\n  nodes: [{host: a}]\n  env: {NCCL_X: [1, 2]}\n", [], "NCCL_X: a list is not a value"),
    ("env-null", GOOD_TRAIN + "cluster:\n  nodes: [{host: a}]\n  env: {NCCL_X: }\n", [], "NCCL_X has no value"),
]


@pytest.mark.parametrize("name,text,args,fragment", BAD, ids=[b[0] for b in BAD])
def test_bad_config_is_one_line_exit_2(tmp_path: Path, name: str, text: str, args: list[str], fragment: str) -> None:
    cfg = tmp_path / "job.yaml"
    cfg.write_text(text)
    env = {k: v for k, v in os.environ.items() if k != "MLAUNCH_DEBUG"}
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", "plan", str(cfg), *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert fragment in lines[0], lines[0]
    if not name.startswith("set-"):
        assert str(cfg) in lines[0] or "cluster" in lines[0], "the error names the file"


def test_error_names_line(tmp_path: Path) -> None:
    cfg = tmp_path / "job.yaml"
    cfg.write_text(GOOD_TRAIN + "  optim:\n    lr: 1\n    betas: [0.9, 0.99]\n    wd: 0.1\n")
    with pytest.raises(ConfigError, match=rf"{cfg}:7: unknown key `train.optim.wd`"):
        load_config(cfg)


def test_debug_env_shows_traceback(tmp_path: Path) -> None:
    cfg = tmp_path / "job.yaml"
    cfg.write_text(GOOD_TRAIN + "  epoch: 1\n")
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", "plan", str(cfg)], capture_output=True, text=True,
                          env={**os.environ, "MLAUNCH_DEBUG": "1"}, cwd=ROOT, timeout=60)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_overrides_are_typed(tmp_path: Path) -> None:
    cfg = tmp_path / "job.yaml"
    cfg.write_text(GOOD_TRAIN)
    job = load_config(cfg, ["train.optim.lr=2e-5", "train.max_steps=7", "launch.nproc_per_node=auto",
                            "train.parallel.strategy=fsdp", "train.clip_grad_norm=null"])
    assert job.train.optim.lr == 2e-5 and isinstance(job.train.optim.lr, float)
    assert job.train.max_steps == 7 and job.launch.nproc_per_node == "auto"
    assert job.train.parallel.strategy == "fsdp" and job.train.clip_grad_norm is None
    assert parse_override("a.b=x=y") == (("a", "b"), "x=y")


def test_env_interpolation_and_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLAUNCH_TEST_OUT", "/tmp/out-x")
    cfg = tmp_path / "job.yaml"
    cfg.write_text(GOOD_TRAIN + "  output_dir: ${MLAUNCH_TEST_OUT}/run\n  data:\n    path: ${MLAUNCH_NOPE:-local.jsonl}\n")
    job = load_config(cfg)
    assert job.train.output_dir == "/tmp/out-x/run" and job.train.data.path == "local.jsonl"
    assert job.train.data.template == TUTORIAL_TEMPLATE and job.name == "job"


def test_cluster_from_file_and_errors_point_into_it(tmp_path: Path) -> None:
    (tmp_path / "cluster.yaml").write_text("nodes:\n  - host: a\n  - host: b\nssh:\n  port: 2222\n")
    cfg = tmp_path / "job.yaml"
    cfg.write_text("cluster: cluster.yaml\n" + GOOD_TRAIN)
    job = load_config(cfg)
    assert [n.host for n in job.cluster.nodes] == ["a", "b"] and job.cluster.node_port(1) == 2222
    (tmp_path / "cluster.yaml").write_text("nodes:\n  - host: a\n    gpu: 8\n")
    with pytest.raises(ConfigError, match=r"cluster.yaml:3: unknown key `cluster.nodes\[0\].gpu`; did you mean `gpus`"):
        load_config(cfg)


def test_shipped_configs_load() -> None:
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(path)


def test_schema_module_does_not_import_torch() -> None:
    code = "import sys, job.config, launcher.plan, launcher.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


def _imports(path: Path) -> list[tuple[int, str, bool]]:
    """(line, absolute module name, at module top level) for every import in one source file.
    Imports inside a function are not top level; those under `if TYPE_CHECKING:` never run."""
    package = ".".join(path.relative_to(ROOT).parts[:-1])
    found: list[tuple[int, str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name, top) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            found.append((node.lineno, ".".join([*base, *filter(None, [node.module])]), top))
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for stmt in node.orelse:
                visit(stmt, top)
            return
        top = top and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, top)

    visit(ast.parse(path.read_text(), str(path)), True)
    return found


# (packages scanned, packages they must not import, only at module top level?)
IMPORT_RULES = [
    (("launcher",), ("train",), False),  # the launcher runs train as a subprocess, never imports it
    (("job",), ("launcher", "train"), False),  # job/ is the shared base: it imports neither side
    (("job", "launcher"), ("torch",), True),  # `mlaunch --help`/`plan` stay instant; torch only lazily
]


@pytest.mark.parametrize(("scanned", "forbidden", "top_only"), IMPORT_RULES,
                         ids=["launcher-not-train", "job-not-launcher-or-train", "no-torch-at-top-level"])
def test_dependencies_point_one_way(scanned: tuple[str, ...], forbidden: tuple[str, ...], top_only: bool) -> None:
    bad = [f"{path.relative_to(ROOT)}:{line}: imports {module}"
           for package in scanned for path in sorted((ROOT / package).rglob("*.py"))
           for line, module, top in _imports(path)
           if module.split(".")[0] in forbidden and (top or not top_only)]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("args,fragment", [
    (["bogus"], "No such command"),
    (["plan"], "Missing argument"),
    (["plan", "configs/tiny.yaml", "--bogus"], "No such option"),
    (["nodes", "check", "/nonexistent/cluster.yaml"], "not found"),
])
def test_usage_errors_are_one_line_exit_2(args: list[str], fragment: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MLAUNCH_DEBUG"}
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and fragment in proc.stderr and "Traceback" not in proc.stderr


def test_env_numbers_and_booleans_pass_as_a_shell_sees_them(tmp_path: Path) -> None:
    cfg = tmp_path / "job.yaml"
    cfg.write_text(GOOD_TRAIN + "cluster:\n  nodes: [{host: a}]\n"
                   "  env: {OMP_NUM_THREADS: 4, NCCL_IB_DISABLE: 0, TOKENIZERS_PARALLELISM: false, LR: 0.5, S: x}\n")
    env = load_config(cfg).cluster.env
    assert env == {"OMP_NUM_THREADS": "4", "NCCL_IB_DISABLE": "0", "TOKENIZERS_PARALLELISM": "false", "LR": "0.5", "S": "x"}


def test_an_alias_bomb_is_refused_at_once(tmp_path: Path) -> None:
    import time

    cfg = tmp_path / "bomb.yaml"
    cfg.write_text(BOMB + GOOD_TRAIN)
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="aliases expand"):
        load_config(cfg)
    assert time.monotonic() - t0 < 1.0  # a guard, not a benchmark: the expansion is never done
