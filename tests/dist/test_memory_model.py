"""The planner's model-state memory per rank against what the strategies really hold.

`job.planner.state_bytes_per_rank` predicts parameters + gradients + AdamW moments per rank
(fp32 on CPU: 4 + 4 + 8 bytes per element, FSDP shards padded on dim 0, a pipeline rank holding
its stages). Here real torchrun workers build each strategy, take one optimizer step, and add up
the storage they hold: local parameter shards, gradients (after backward) and exp_avg /
exp_avg_sq (after the step), each storage counted once (DDP's gradients are views into its
buckets, FSDP's into its reduce-scatter output). Prediction and measurement must agree within 5 %
on every rank. The FFN width (170) does not divide by 4 on purpose: FSDP pads those shards.

This file is also the worker: `torchrun ... tests/test_memory_model.py OUT.json WORLD`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import torchrun_worker

ROOT = Path(__file__).resolve().parents[1]
DIMS = dict(n_layers=4, hidden=64, ffn=170, heads=4, vocab=256)
TOLERANCE = 0.05


def _launch(tmp_path: Path, world: int) -> list[dict]:
    out = tmp_path / f"memory{world}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
           str(Path(__file__)), str(out), str(world)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, f"workers failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_predicted_state_bytes_match_held_bytes(tmp_path, world):
    rows = _launch(tmp_path, world)
    expected = {2: {"ddp", "fsdp", "hsdp", "pipeline", "pipeline-interleaved"},
                4: {"ddp", "fsdp", "hsdp", "pipeline+ddp", "pipeline+fsdp", "pipeline-pp4"}}[world]
    assert {r["layout"] for r in rows} == expected
    assert len(rows) == len(expected) * world  # one row per layout and rank
    for r in rows:
        ratio = r["measured"] / r["predicted"]
        assert abs(ratio - 1) <= TOLERANCE, f"{r['layout']} rank {r['rank']}: held {r['measured']} B, " \
                                            f"predicted {r['predicted']} B ({r['parts']})"
        if r["layout"] != "ddp":  # sharding or stages really cut the per-rank state
            full = next(x for x in rows if x["layout"] == "ddp" and x["rank"] == r["rank"])["measured"]
            assert r["measured"] < 0.8 * full, r


@pytest.mark.slow
def test_gpu_check_cpu_smoke_retries_after_oom(tmp_path):
    """benchmarks/gpu_check.py in its CPU mode: the planner comparison and the OOM retry run (one
    simulated OOM halves the micro-batch), and the last line is the JSON of every figure."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu-smoke", "--simulate-oom", "1"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert figures["micro_batch"] == 1 and len(figures["oom_retries"]) == 1
    assert figures["finite"] and figures["tokens_per_s"] > 0 and figures["steps_timed"] >= 1
    assert figures["predicted_allocated_bytes"] > 0 and figures["flops_per_token"] > 6 * figures["params"]


# ============================================================================== worker side
def _layouts(world: int):
    """(name, ParallelDims, train.parallel settings, planner strategy, planner degrees)."""
    from train.parallel.base import ParallelDims

    pipe = {"strategy": "pipeline", "pp": 2, "microbatches": 2}
    if world == 2:
        return [
            ("ddp", ParallelDims(2, "ddp", dp=2), {"strategy": "ddp"}, "ddp", {"dp": 2}),
            ("fsdp", ParallelDims(2, "fsdp", dp=2), {"strategy": "fsdp"}, "fsdp", {"shard": 2}),
            ("hsdp", ParallelDims(2, "hsdp", dp=2, dp_shard_in_node=2), {"strategy": "hsdp"}, "hsdp",
             {"replicate": 1, "shard": 2}),
            ("pipeline", ParallelDims(2, "pipeline", dp=1, pp=2), pipe, "pipeline", {"pp": 2}),
            ("pipeline-interleaved", ParallelDims(2, "pipeline", dp=1, pp=2),
             {**pipe, "schedule": "interleaved_1f1b", "stages_per_rank": 2}, "pipeline", {"pp": 4}),
        ]
    return [
        ("ddp", ParallelDims(4, "ddp", dp=4), {"strategy": "ddp"}, "ddp", {"dp": 4}),
        ("fsdp", ParallelDims(4, "fsdp", dp=4), {"strategy": "fsdp"}, "fsdp", {"shard": 4}),
        ("hsdp", ParallelDims(4, "hsdp", dp=4, dp_shard_in_node=2), {"strategy": "hsdp"}, "hsdp",
         {"replicate": 2, "shard": 2}),
        ("pipeline+ddp", ParallelDims(4, "pipeline", dp=2, pp=2), pipe, "pipeline+ddp", {"pp": 2, "dp": 2}),
        ("pipeline+fsdp", ParallelDims(4, "pipeline", dp=2, pp=2), {**pipe, "dp_shard": True}, "pipeline+fsdp",
         {"pp": 2, "shard": 2}),
        ("pipeline-pp4", ParallelDims(4, "pipeline", dp=1, pp=4), {**pipe, "pp": 4, "microbatches": 4}, "pipeline",
         {"pp": 4}),
    ]


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (DTensors: their local shards)."""
    from torch.distributed.tensor import DTensor

    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, DTensor):
            t = t.to_local()
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _measure(name, dims, parallel, strategy, degrees, rank: int) -> dict:
    import torch

    from job.config import TrainConfig
    from job.planner import ModelDims, state_bytes_per_rank
    from train.loop import build_optimizer
    from train.models.baichuan.model import BaichuanConfig, BaichuanForCausalLM, init_weights
    from train.parallel.base import parallelize, target_tokens
    from train.parallel.mesh import build_mesh

    device = torch.device("cpu")
    cfg = TrainConfig.model_validate({"model": {"init": {}}, "device": "cpu", "parallel": parallel,
                                      "data": {"max_length": 32}})
    d = DIMS
    mcfg = BaichuanConfig(vocab_size=d["vocab"], hidden_size=d["hidden"], intermediate_size=d["ffn"],
                          num_hidden_layers=d["n_layers"], num_attention_heads=d["heads"], norm_head=True)
    torch.manual_seed(0)
    model = BaichuanForCausalLM(mcfg)
    init_weights(model)
    par = parallelize(model, dims=dims, mesh=build_mesh(dims, device), cfg=cfg, device=device, z_loss_weight=0.0)
    opt = build_optimizer(par, cfg, device)

    ids = torch.randint(3, d["vocab"], (4, 24), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    par.forward_backward(batch, par.dp_size / (target_tokens(batch) * par.dp_size), sync=True)
    params = list(par.parameters())
    parts = {"params": _storage_bytes(params),
             "grads": _storage_bytes(p.grad for p in params if p.grad is not None)}
    opt.step()
    parts["optimizer"] = _storage_bytes(s[k] for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq"))

    model_dims = ModelDims(**DIMS)
    if strategy.startswith("pipeline"):
        # Stage k of pp·v lives on pipeline rank k mod pp (interleaved: several stages per rank).
        n_stages, pp = degrees["pp"], dims.pp
        pp_rank = par.pp_rank
        predicted = sum(state_bytes_per_rank(model_dims, strategy, degrees, rank_stage=k)
                        for k in range(n_stages) if k % pp == pp_rank)
    else:
        predicted = state_bytes_per_rank(model_dims, strategy, degrees)
    return {"layout": name, "rank": rank, "measured": sum(parts.values()), "predicted": predicted, "parts": parts}


def _worker(out_path: str, world: int) -> None:
    import gc

    import torch.distributed as dist

    def body(env) -> None:
        rows = []
        for layout in _layouts(world):
            rows.append(_measure(*layout, rank=env.rank))
            gc.collect()
        gathered: list = [None] * world
        dist.all_gather_object(gathered, rows)
        if env.is_rank0:
            Path(out_path).write_text(json.dumps([r for per_rank in gathered for r in per_rank], indent=1))

    torchrun_worker(body)


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]))
