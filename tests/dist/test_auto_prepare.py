"""`train.auto.prepare` on the product tutorial's own loop (examples/tutorial.py) with a tiny
transformers LlamaForCausalLM saved to a folder: the planner picks ddp on a roomy memory budget and
fsdp on a tight one, and both follow a single-process reference's losses; the HF Trainer example
runs 2 ranks through `mlaunch run`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Rows are longer than 16 tokens: no padding, so each rank's mean loss over its half of the batch
# averages to the whole batch's mean loss (what the reference computes).
COMMON = ["--max-length", "16", "--lr", "1e-3", "--max-steps", "4"]
#: Per-rank bytes for the model's tensors: ddp needs ~9.6 MB for this model and batch, fsdp ~8.1 MB.
ROOMY_GB, TIGHT_GB = "1", "0.0088"


def env(tmp: Path) -> dict[str, str]:
    out = {**os.environ, "HF_DATASETS_CACHE": str(tmp / "hf-datasets"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "PYTHONUNBUFFERED": "1"}
    out.pop("MLAUNCH_DEBUG", None)
    return out


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    subprocess.run([sys.executable, "examples/make_tiny_llama.py", str(folder), "--hidden-size", "128"], cwd=ROOT,
                   check=True, capture_output=True, timeout=120)
    return folder


def losses(folder: Path, rank: int) -> tuple[dict, list[float]]:
    lines = [json.loads(x) for x in (folder / f"rank{rank}.jsonl").read_text().splitlines()]
    return lines[0]["plan"], [x["loss"] for x in lines[1:]]


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]


def test_prepare_picks_ddp_then_fsdp_and_both_follow_the_reference(tiny_llama: Path, tmp_path: Path) -> None:
    tutorial = "examples/tutorial.py"
    ref = subprocess.Popen([sys.executable, tutorial, str(tiny_llama), *COMMON, "--batch-size", "4",
                            "--metrics", str(tmp_path / "ref")], cwd=ROOT, env=env(tmp_path),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    runs = {}
    for name, budget in (("roomy", ROOMY_GB), ("tight", TIGHT_GB)):
        res = subprocess.run(torchrun(tutorial, str(tiny_llama), *COMMON, "--batch-size", "2", "--memory-budget-gb",
                                      budget, "--metrics", str(tmp_path / name)),
                             cwd=ROOT, env=env(tmp_path), capture_output=True, text=True, timeout=180)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
        runs[name] = res.stdout
    assert ref.wait(timeout=180) == 0, ref.stdout.read()[-3000:]

    _, reference = losses(tmp_path / "ref", 0)
    assert len(reference) == 4
    for name, strategy in (("roomy", "ddp"), ("tight", "fsdp")):
        (plan0, l0), (plan1, l1) = losses(tmp_path / name, 0), losses(tmp_path / name, 1)
        assert plan0["strategy"] == plan1["strategy"] == strategy, (name, plan0)
        assert plan0["block_class"] == "LlamaDecoderLayer" and plan0["blocks"] == 2 and plan0["world_size"] == 2
        mean = [(a + b) / 2 for a, b in zip(l0, l1)]
        assert max(abs(m - r) for m, r in zip(mean, reference)) < 1e-4, (name, mean, reference)
        assert l0 != l1, "each rank trained on its own half of the batch"
        # The planner's table, once (rank 0 alone prints it), with the choice marked.
        assert runs[name].count("parallel plan") == 1 and f"{strategy}(" in runs[name]


def test_hf_trainer_example_two_ranks_through_mlaunch(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "trainer-out"
    cfg = tmp_path / "hf.yaml"
    cfg.write_text(f"launch:\n  nproc_per_node: 2\n  output_dir: {tmp_path}/run\n")
    res = subprocess.run([sys.executable, "-m", "launcher.cli", "run", str(cfg), "--set",
                          f"launch.entrypoint=[examples/hf_trainer.py, {tiny_llama}, {out}, --max-length, '16', "
                          "--batch-size, '2', --max-steps, '3']"],
                         cwd=ROOT, env=env(tmp_path), capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == 2 and result["steps"] == 3 and result["rank"] == 0
    assert "trained 3 steps on 2 rank(s)" in (tmp_path / "run" / "logs" / "local.log").read_text()
