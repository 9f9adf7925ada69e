"""The planner's model-state memory per rank against what the strategies really hold.

`job.planner.state_bytes_per_rank` predicts parameters + gradients + AdamW moments per rank
(fp32 on CPU: 4 + 4 + 8 bytes per element, FSDP shards padded on dim 0, a pipeline rank holding
its stages). Here real torchrun workers build each strategy, take one optimizer step, and add up
the storage they hold: local parameter shards, gradients (after backward) and exp_avg /
exp_avg_sq (after the step), each storage counted once (DDP's gradients are views into its
buckets, FSDP's into its reduce-scatter output). Prediction and measurement must agree within 5 %
on every rank. The FFN width (170) does not divide by 4 on purpose: FSDP pads those shards.

This file is also the worker: `torchrun ... tests/dist/test_memory_model.py OUT.json WORLD`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import torchrun_worker

ROOT = Path(__file__).resolve().parents[2]
DIMS = dict(num_hidden_layers=4, hidden_size=64, intermediate_size=170, num_attention_heads=4, vocab_size=256)
TOLERANCE = 0.05


def _launch(tmp_path: Path, world: int) -> list[dict]:
    out = tmp_path / f"memory{world}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
           str(Path(__file__)), str(out), str(world)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, f"workers failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(out.read_text())


@pytest.mark.parametrize("world", [2, 4])
def test_predicted_state_bytes_match_held_bytes(tmp_path, world):
    rows = _launch(tmp_path, world)
    expected = {2: {"ddp", "fsdp", "hsdp", "pipeline", "pipeline-interleaved", "ddp-lora", "fsdp-lora"},
                4: {"ddp", "fsdp", "hsdp", "pipeline+ddp", "pipeline+fsdp", "pipeline-pp4"}}[world]
    assert {r["layout"] for r in rows} == expected
    assert len(rows) == len(expected) * world  # one row per layout and rank
    for r in rows:
        ratio = r["measured"] / r["predicted"]
        assert abs(ratio - 1) <= TOLERANCE, f"{r['layout']} rank {r['rank']}: held {r['measured']} B, " \
                                            f"predicted {r['predicted']} B ({r['parts']})"
        if r["layout"] != "ddp":  # sharding, stages or a frozen base really cut the per-rank state
            full = next(x for x in rows if x["layout"] == "ddp" and x["rank"] == r["rank"])["measured"]
            assert r["measured"] < 0.8 * full, r
        if r["layout"].endswith("-lora"):  # gradients and AdamW moments only for the adapters
            assert r["parts"]["optimizer"] == 2 * r["parts"]["grads"] < 0.2 * r["parts"]["params"], r


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
    assert figures["predicted_allocated_bytes"] > 0
    # MFU's FLOPs: 6·(N − embedding) + 12·L·h·s, the embedding lookup counted as no FLOPs.
    f = figures
    assert f["flops_per_token"] == 6 * (f["params"] - f["vocab"] * f["hidden"]) + 12 * f["layers"] * f["hidden"] * f["seq"]


def test_gpu_check_all_runs_its_matrix_on_cpu(tmp_path):
    """`gpu_check.py --all`, the prepared GPU run, in its CPU mode: the four single-process variants
    (full logits / chunked loss x eager / compiled blocks, aot_eager on CPU) all run and start from
    the same loss (same weights, same batches). The fsdp part (torchrun, `--fsdp-ranks 2` on CPU)
    is left out here: its launch would double this test's time, and test_parallel.py runs fsdp."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--all", "--cpu-smoke", "--fsdp-ranks", "0"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-4000:]
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    runs = {r["variant"]: r for r in figures["runs"]}
    assert set(runs) == {"full logits", "chunked", "full logits, compiled", "chunked, compiled"}, runs
    assert not [r for r in runs.values() if "error" in r], runs
    first = runs["full logits"]
    for name, r in runs.items():
        assert r["tokens_per_s"] > 0 and r["finite"], name
        assert abs(r["loss_first"] - first["loss_first"]) <= 1e-4 * first["loss_first"], (name, r["loss_first"])
    assert runs["chunked"]["predicted_breakdown_bytes"]["logits"] < runs["full logits"]["predicted_breakdown_bytes"]["logits"]


# ============================================================================== worker side
def _layouts(world: int):
    """(name, the Layout the ranks run, train.parallel settings, the Layout the planner predicts;
    they differ only for the interleaved schedule: 2 ranks holding 4 planner stages)."""
    from job.layout import Layout

    pipe = {"strategy": "pipeline", "pp": 2, "microbatches": 2}
    if world == 2:
        return [
            ("ddp", Layout(dp_replicate=2), {"strategy": "ddp"}, Layout(dp_replicate=2)),
            ("fsdp", Layout(dp_shard=2), {"strategy": "fsdp"}, Layout(dp_shard=2)),
            # hsdp on one "node" of 2: one replica of 2 shards (the same layout as fsdp).
            ("hsdp", Layout(dp_replicate=1, dp_shard=2), {"strategy": "hsdp"}, Layout(dp_replicate=1, dp_shard=2)),
            ("pipeline", Layout(pp=2), pipe, Layout(pp=2)),
            ("pipeline-interleaved", Layout(pp=2),
             {**pipe, "schedule": "interleaved_1f1b", "stages_per_rank": 2}, Layout(pp=4)),
            # LoRA (r 4, every linear): the frozen fp32 base, the adapters with their grads and moments.
            ("ddp-lora", Layout(dp_replicate=2), {"strategy": "ddp"}, Layout(dp_replicate=2)),
            ("fsdp-lora", Layout(dp_shard=2), {"strategy": "fsdp"}, Layout(dp_shard=2)),
        ]
    return [
        ("ddp", Layout(dp_replicate=4), {"strategy": "ddp"}, Layout(dp_replicate=4)),
        ("fsdp", Layout(dp_shard=4), {"strategy": "fsdp"}, Layout(dp_shard=4)),
        ("hsdp", Layout(dp_replicate=2, dp_shard=2), {"strategy": "hsdp"}, Layout(dp_replicate=2, dp_shard=2)),
        ("pipeline+ddp", Layout(dp_replicate=2, pp=2), pipe, Layout(dp_replicate=2, pp=2)),
        ("pipeline+fsdp", Layout(dp_shard=2, pp=2), {**pipe, "stage_dp": "fsdp"}, Layout(dp_shard=2, pp=2)),
        ("pipeline-pp4", Layout(pp=4), {**pipe, "pp": 4, "microbatches": 4}, Layout(pp=4)),
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


def _measure(name, layout, parallel, planned, rank: int) -> dict:
    import torch

    from job.config import TrainConfig
    from job.baichuan import BaichuanConfig
    from job.planner import state_bytes_per_rank
    from train.loop import build_optimizer
    from train.models.baichuan.model import BaichuanForCausalLM, init_weights
    from train.models.baichuan.parallelize import BAICHUAN
    from train.parallel.base import parallelize, target_tokens
    from train.parallel.mesh import build_mesh

    device = torch.device("cpu")
    lora = {"r": 4} if name.endswith("-lora") else None
    cfg = TrainConfig.model_validate({"model": {"init": {}}, "device": "cpu", "parallel": parallel,
                                      "data": {"max_length": 32}, "lora": lora})
    mcfg = BaichuanConfig(**DIMS, norm_head=True)
    torch.manual_seed(0)
    model = BaichuanForCausalLM(mcfg)
    init_weights(model)
    if lora is not None:
        from train.lora import apply_lora, init_adapters

        apply_lora(model, cfg.lora, device, torch.float32)
        init_adapters(model, 0)
    par = parallelize(model, layout=layout, mesh=build_mesh(layout, device), cfg=cfg, device=device, z_loss_weight=0.0,
                      arch=BAICHUAN)
    opt = build_optimizer(par, cfg, device)

    ids = torch.randint(3, mcfg.vocab_size, (4, 24), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    par.forward_backward(batch, par.dp_size / (target_tokens(batch) * par.dp_size), sync=True)
    params = list(par.parameters())
    parts = {"params": _storage_bytes(params),
             "grads": _storage_bytes(p.grad for p in params if p.grad is not None)}
    opt.step()
    parts["optimizer"] = _storage_bytes(s[k] for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq"))

    if planned.pp > 1:
        # Stage k of pp·v lives on pipeline rank k mod pp (interleaved: several stages per rank).
        n_stages, pp = planned.pp, layout.pp
        pp_rank = par.pp_rank
        predicted = sum(state_bytes_per_rank(mcfg, planned, rank_stage=k)
                        for k in range(n_stages) if k % pp == pp_rank)
    elif lora is not None:
        from job.planner import Adapters

        predicted = state_bytes_per_rank(mcfg, planned, lora=Adapters(r=4))
    else:
        predicted = state_bytes_per_rank(mcfg, planned)
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
