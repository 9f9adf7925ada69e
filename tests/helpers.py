"""Helpers shared by the test tiers, mostly for tests that run real training jobs (`python -m train`,
alone or under torchrun).

    from tests.helpers import write_job, run_train, read_metrics

    cfg = write_job(tmp_path, max_steps=5, data={"micro_batch_size": 2})
    result = run_train(cfg, nproc=2)              # torchrun --standalone --nproc-per-node 2 -m train
    assert result.returncode == 0, result.stderr
    steps = read_metrics(tmp_path / "run")

`write_job` writes a tiny, fast job (2-layer hidden-32 model, the bundled Bitext sample cut to
64 rows with the intent as a short answer: 25-60 token examples, so batches carry padding; a
512-piece SentencePiece tokenizer trained once per session) and returns the
YAML's path; keyword arguments are deep-merged into the `train:` section. Jobs run with
OMP_NUM_THREADS=1 and MLAUNCH_RUN_ID set, so `kill_run` can SIGKILL exactly that job's
processes, torchrun's workers included (they live in sessions of their own): it finds them with
`launcher.procs.run_processes`, the launcher's own rule.

Also here: `tiny_baichuan_config`/`write_hub_folder` (a tiny model and a published-style folder of
it) and `NASTY`/`ECHO_BACK` (values that break naive shell quoting, and a program that echoes them).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import yaml

from launcher.procs import run_processes

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DATA = ROOT / "train" / "data" / "bitext_sample.jsonl"
_TOKENIZER_CACHE: dict[str, Path] = {}


# Values that break naive quoting: each must arrive byte for byte.
NASTY = [
    "$(echo pwned)",
    "`echo pwned`",
    "it's",
    'say "hi"',
    "two  spaces ",
    "line1\nline2",
    "$HOME ${PATH} \\ ; | & > < * ? ~ #",
    "",
    "-n",
    "ünïcødé",
]

ECHO_BACK = (
    "import json, os, sys; "
    "print(json.dumps({'argv': sys.argv[1:], 'env': dict(os.environ), 'cwd': os.getcwd()}))"
)


def tiny_tokenizer(directory: Path) -> Path:
    """A small SentencePiece model trained on the bundled sample, once per test session."""
    key = str(SAMPLE_DATA)
    if key not in _TOKENIZER_CACHE or not _TOKENIZER_CACHE[key].is_file():
        from train.tokenizer import train_sentencepiece

        rows = map(json.loads, SAMPLE_DATA.read_text().splitlines()[:200])
        # The sample has deliberately bad rows (missing or non-text fields): keep only text.
        texts = [f"{r.get('instruction')} {r.get('response')}" for r in rows if isinstance(r.get("response"), str)]
        _TOKENIZER_CACHE[key] = train_sentencepiece(texts, directory / "tokenizer.model", vocab_size=512)
    return _TOKENIZER_CACHE[key]


def _merge(base: dict, extra: dict) -> dict:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v
    return base


def write_job(tmp_path: Path, name: str = "job", **train: Any) -> Path:
    """Write `<tmp_path>/<name>.yaml` for a tiny CPU job whose outputs go to `<tmp_path>/run`
    (override with output_dir=...). Keyword arguments are deep-merged into `train:`."""
    section: dict[str, Any] = {
        "model": {"init": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}},
        "tokenizer": {"path": str(tiny_tokenizer(tmp_path.parent))},
        # The intent as the "response": 25-60 token examples, so batches really carry padding.
        "data": {"path": str(SAMPLE_DATA), "template": "[INST] {instruction} [/INST]\n{response}",
                 "columns": {"response": "intent"}, "max_rows": 64, "max_length": 64, "micro_batch_size": 2,
                 "eval_fraction": 0.1},
        "optim": {"lr": 3e-3},
        "schedule": {"warmup_steps": 1, "decay": "cosine"},
        "max_steps": 5,
        "device": "cpu",
        # fp32 exports: tests compare exported weights with fp32 references at 1e-4 or bit for bit.
        "checkpoint": {"export_dtype": "float32"},
        "output_dir": str(tmp_path / "run"),
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"train": _merge(section, train)}, sort_keys=False))
    return path


def train_command(config: Path, nproc: int | None, overrides: tuple[str, ...] = ()) -> list[str]:
    """`python -m train CONFIG` when nproc is None, else torchrun --standalone with nproc workers."""
    sets = [a for o in overrides for a in ("--set", o)]
    if nproc is None:
        return [sys.executable, "-m", "train", str(config), *sets]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "train", str(config), *sets]


def job_env(run_id: str | None = None, extra: dict[str, str] | None = None) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path, MLAUNCH_RUN_ID=run_id or uuid.uuid4().hex)
    env.pop("MLAUNCH_DEBUG", None)
    env.update(extra or {})
    return env


def run_train(config: Path, nproc: int | None = None, *, overrides: tuple[str, ...] = (), timeout: float = 120,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a job to completion (text output captured); on timeout kill all of it and raise."""
    run_id = uuid.uuid4().hex
    proc = start_train(config, nproc, overrides=overrides, run_id=run_id, env=env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_run(proc, run_id)
        out, err = proc.communicate()
        raise AssertionError(f"training did not finish in {timeout} s\nstdout:\n{out}\nstderr:\n{err}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def start_train(config: Path, nproc: int | None = None, *, overrides: tuple[str, ...] = (), run_id: str,
                env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a job in the background, in its own process group, tagged with MLAUNCH_RUN_ID=run_id."""
    return subprocess.Popen(train_command(config, nproc, overrides), cwd=ROOT, env=job_env(run_id, env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def kill_run(proc: subprocess.Popen, run_id: str, sig: int = signal.SIGKILL) -> None:
    """Send `sig` to the job's process group and to every process carrying its run id (torchrun's
    workers are in their own sessions: killing torchrun alone would orphan them)."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    for pid in run_processes(run_id):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def process_tree(pid: int) -> list:
    """The process and all its descendants (psutil.Process objects)."""
    import psutil

    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def send_all(procs: list, sig: int) -> None:
    """`sig` to each of `procs` that is still there (SIGSTOP / SIGCONT a node, a rank ...)."""
    import psutil

    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def wait_until(pred: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    """Poll `pred` until it holds or `timeout` s pass; its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


def wait_gone(run_id: str, timeout: float = 10) -> None:
    """Wait until no process of the run is left (SIGKILLed workers take a moment to be reaped)."""
    deadline = time.monotonic() + timeout
    while run_processes(run_id):
        if time.monotonic() > deadline:
            raise AssertionError(f"processes of run {run_id} still alive: {run_processes(run_id)}")
        time.sleep(0.05)


def read_metrics(output_dir: Path) -> list[dict[str, Any]]:
    """The training records of `<output_dir>/metrics.jsonl` (eval records left out)."""
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def read_eval_metrics(output_dir: Path) -> list[dict[str, Any]]:
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "eval_loss" in r]


def torchrun_worker(body: Callable[[Any], None]) -> None:
    """The frame of a test script that torchrun runs on every rank: a gloo process group, `body(env)`,
    and always the exit through `train.distributed.shutdown` (barrier, destroy, flush, os._exit),
    without which gloo aborts at interpreter exit in about 1 run in 8 (PyTorch issue #190489)."""
    import traceback

    import torch

    from train import distributed as D

    env = D.DistEnv.from_env()
    code, clean = 1, False
    try:
        D.init_process_group(env, torch.device("cpu"), 300.0)
        body(env)
        code, clean = 0, True
    except BaseException:
        traceback.print_exc()
    finally:
        D.shutdown(code, clean=clean)


def tiny_baichuan_config(**overrides):
    """A 4-layer hidden-32 Baichuan config for building, sharding and loading tests."""
    from job.baichuan import BaichuanConfig

    # vocab 129: the embedding and head shard unevenly over 2 ranks (65 + 64 rows), as FSDP pads.
    kw = dict(vocab_size=129, hidden_size=32, intermediate_size=72, num_hidden_layers=4, num_attention_heads=4,
              position="rope", norm_head=True, z_loss_weight=1e-3)
    return BaichuanConfig(**{**kw, **overrides})


def write_hub_folder(folder: Path, cfg, *, seed: int, dtype=None, fmt="safetensors-sharded"):
    """A published-style folder (config.json, two weight files) of a random model in `dtype`
    (default bfloat16); returns its weights."""
    import torch

    from train.models.baichuan.model import BaichuanForCausalLM, init_weights
    from train.models.baichuan.hub import write_hub_checkpoint

    dtype = torch.bfloat16 if dtype is None else dtype
    torch.manual_seed(seed)
    model = BaichuanForCausalLM(cfg)
    init_weights(model, 0.05)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)  # not all ones: a norm left unloaded would show
    model.to(dtype)
    write_hub_checkpoint(model, cfg, folder, fmt)
    return {k: v.clone() for k, v in model.state_dict().items()}
