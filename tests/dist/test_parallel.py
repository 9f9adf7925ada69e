"""FSDP, HSDP and pipeline strategies against a single-process reference, on real torchrun workers
(CPU, gloo, fp32).

One torchrun launch per world size runs every configuration in-process (this file is also the
worker: `torchrun ... tests/dist/test_parallel.py OUT.json WORLD`), because starting processes is what
costs time here. Each configuration trains the same tiny model on the same global batches
(16 sequences of random lengths per step, so batches carry padding), split the way the loop splits
them: contiguous rows per data-parallel rank, 2 micro-batches of accumulation, loss scaled by
dp_size / global target tokens. Every rank also trains the unwrapped model on the whole batch
alone: that reference is what DDP must match, and so must every other strategy (1e-4 relative).
Checkpoints written under one strategy are loaded under another and training goes on: the next
steps' losses must be the reference's (model weights and AdamW moments both restored).
The in-process checks (bad layouts, the pipeline pieces) are in tests/unit/test_parallel.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import torchrun_worker

ROOT = Path(__file__).resolve().parents[2]
STEPS = 6
GLOBAL_ROWS = 16  # sequences per optimizer step, whatever the layout
GRAD_ACCUM = 2
RESUME_AT = 3  # checkpoint after this many steps, then continue under another strategy
TOL = 1e-4


# ============================================================================== pytest side
def _launch(tmp_path: Path, world: int, timeout: float = 170) -> dict:
    out = tmp_path / f"world{world}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
           str(Path(__file__)), str(out), str(world)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"workers failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    result = json.loads(out.read_text())
    result["wall_s"] = time.monotonic() - t0
    return result


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    return _launch(tmp_path_factory.mktemp("parallel2"), 2)


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    return _launch(tmp_path_factory.mktemp("parallel4"), 4)


def _close(a: list[float], b: list[float], tol: float = TOL) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= tol * max(abs(y), 1e-6) for x, y in zip(a, b))


def _check_runs(result: dict) -> None:
    ref = result["reference"]
    assert ref["loss"][-1] < ref["loss"][0] - 0.3, f"the reference does not learn: {ref['loss']}"
    assert len(result["runs"]) >= 4
    for name, run in result["runs"].items():
        assert _close(run["loss"], ref["loss"]), f"{name}: loss {run['loss']} != reference {ref['loss']}"
        assert _close(run["grad_norm"], ref["grad_norm"]), f"{name}: grad norm {run['grad_norm']} != {ref['grad_norm']}"
        assert abs(run["eval_loss"] - ref["eval_loss"]) <= TOL * ref["eval_loss"], (name, run["eval_loss"], ref["eval_loss"])
        # Adam divides by the gradients' running RMS: rounding-level gradient differences move
        # near-zero-gradient weights by up to ~lr·1e-3 after a few steps.
        assert run["export_max_abs_diff"] <= 1e-4, f"{name}: exported weights differ from the reference's"
        assert run["export_keys_ok"], f"{name}: exported keys are not the published ones"


def _check_resumes(result: dict) -> None:
    ref = result["reference"]["loss"][RESUME_AT:]
    assert len(result["resumes"]) >= 2
    for name, losses in result["resumes"].items():
        assert _close(losses, ref), f"{name}: losses after loading {losses} != reference {ref}"


def test_world2_fsdp_and_pipeline_schedules_match_ddp(world2):
    """fsdp(2); pipeline 2 stages x 4 micro-batches with gpipe, 1f1b and interleaved 1f1b (2 virtual
    stages per rank); ddp, fsdp and a pipeline with activation checkpointing; all equal ddp(2) and
    the single-process reference."""
    assert {"ddp", "fsdp", "pipeline-gpipe", "pipeline-1f1b", "pipeline-interleaved_1f1b",
            "ddp-selective", "fsdp-full", "pipeline-1f1b-full"} <= set(world2["runs"])
    _check_runs(world2)


def test_world2_checkpoints_load_across_strategies(world2):
    assert {"fsdp->ddp", "ddp->fsdp", "pipeline->ddp", "fsdp->pipeline", "pipeline->interleaved"} <= set(world2["resumes"])
    _check_resumes(world2)


def test_world4_fsdp_hsdp_and_pipeline_x_dp_match_ddp(world4):
    """fsdp(4); hsdp 2 replicas x 2 shards; pipeline 2 stages x dp 2 with DDP and with FSDP inside
    each stage; all equal ddp(4)."""
    assert {"ddp", "fsdp", "hsdp", "pipeline-ddp", "pipeline-fsdp"} <= set(world4["runs"])
    _check_runs(world4)


def test_world4_checkpoints_load_across_strategies(world4):
    assert {"hsdp->pipeline-fsdp", "pipeline-ddp->fsdp"} <= set(world4["resumes"])
    _check_resumes(world4)


def test_pipeline_through_the_training_loop_matches_ddp(tmp_path):
    """`python -m train` end to end: a 2-stage pipeline (torchrun, 2 ranks, 1f1b over 4 pipeline
    micro-batches) logs the losses, gradient norms and eval losses of one process alone, and exports
    and checkpoints like it. The loss reaches rank 0's log although only the last stage computes it."""
    from tests.helpers import read_eval_metrics, read_metrics, run_train, write_job

    common = dict(max_steps=4, eval_every=2, data={"max_rows": 32, "micro_batch_size": 4})
    alone = write_job(tmp_path / "alone", **common)
    pipe = write_job(tmp_path / "pipe", **common, parallel={"strategy": "pipeline", "pp": 2})
    r1 = run_train(alone, timeout=90)
    assert r1.returncode == 0, r1.stderr
    r2 = run_train(pipe, nproc=2, timeout=90)
    assert r2.returncode == 0, r2.stderr
    m1, m2 = read_metrics(tmp_path / "alone" / "run"), read_metrics(tmp_path / "pipe" / "run")
    assert [r["step"] for r in m2] == [1, 2, 3, 4]
    assert _close([r["loss"] for r in m2], [r["loss"] for r in m1])
    assert _close([r["grad_norm"] for r in m2], [r["grad_norm"] for r in m1])
    e1, e2 = read_eval_metrics(tmp_path / "alone" / "run"), read_eval_metrics(tmp_path / "pipe" / "run")
    assert _close([r["eval_loss"] for r in e2], [r["eval_loss"] for r in e1]) and len(e2) == 2
    from safetensors.torch import load_file

    w1 = load_file(tmp_path / "alone" / "run" / "export" / "model.safetensors")
    w2 = load_file(tmp_path / "pipe" / "run" / "export" / "model.safetensors")
    assert list(w2) == list(w1)  # every stage gathered, hub order
    assert max(float((w2[k] - w1[k]).abs().max()) for k in w1) <= 1e-4
    assert any((tmp_path / "pipe" / "run" / "checkpoints").glob("step_*/COMPLETE"))


def test_bad_layout_under_torchrun_is_one_line_and_starts_no_process_group(tmp_path):
    import re

    from tests.helpers import run_train, write_job

    cfg = write_job(tmp_path, parallel={"strategy": "pipeline", "pp": 3})
    t0 = time.monotonic()
    result = run_train(cfg, nproc=2, timeout=60)
    assert time.monotonic() - t0 < 30  # no rendezvous wait, no hang
    # torchrun reports the workers' exit code 2 as its own failure (exit 1, a ChildFailedError
    # summary); what the workers themselves wrote is one line from rank 0, no traceback.
    assert result.returncode != 0 and re.search(r"exitcode\s*: 2", result.stderr), result.stderr
    torchrun_report = result.stderr.find("Traceback")
    worker_lines = [line for line in result.stderr[:torchrun_report if torchrun_report >= 0 else None].splitlines()
                    if line.strip() and not re.match(r"[WEI]\d{4} ", line)]
    assert len(worker_lines) == 1, result.stderr
    assert worker_lines[0].startswith("error:") and "does not divide the world size 2" in worker_lines[0]


# ============================================================================== worker side
def _tiny_config():
    from job.baichuan import BaichuanConfig

    # norm_head and a z-loss: the Baichuan2 parts travel through every strategy too.
    return BaichuanConfig(vocab_size=128, hidden_size=32, intermediate_size=88, num_hidden_layers=4,
                          num_attention_heads=4, position="rope", norm_head=True, z_loss_weight=1e-3)


def _global_batches(n_steps: int, seed: int = 1234):
    """Rows per step: (input_ids, labels) lists of random lengths 5..40 tokens."""
    import torch

    g = torch.Generator().manual_seed(seed)
    steps = []
    for _ in range(n_steps):
        rows = []
        for _ in range(GLOBAL_ROWS):
            n = int(torch.randint(5, 41, (1,), generator=g))
            ids = torch.randint(3, 128, (n,), generator=g).tolist()
            rows.append({"input_ids": ids, "labels": ids})
        steps.append(rows)
    return steps


def _micro_batches(rows: list[dict], dp: int, dp_rank: int, grad_accum: int) -> list[dict]:
    from train.data import collate

    mine = rows[dp_rank * len(rows) // dp:(dp_rank + 1) * len(rows) // dp]
    per = len(mine) // grad_accum
    return [collate(mine[i * per:(i + 1) * per]) for i in range(grad_accum)]


def _cfg(parallel: dict):
    from job.config import TrainConfig

    return TrainConfig.model_validate({
        "model": {"init": {}}, "device": "cpu", "parallel": parallel,
        "data": {"max_length": 64}, "optim": {"lr": 1e-2, "weight_decay": 0.01}, "clip_grad_norm": 1.0,
        # Several loss chunks per micro-batch under every strategy and the reference alike (a
        # trajectory of 6 steps at lr 1e-2 amplifies any change of rounding past 1e-4, so all runs
        # take the same loss path; tests/unit/test_loss.py checks it against the full logits).
        "loss_chunk_tokens": 16,
    })


def _fresh_model(seed: int):
    import torch

    from train.models.baichuan.model import BaichuanForCausalLM, init_weights

    torch.manual_seed(seed)
    model = BaichuanForCausalLM(_tiny_config())
    init_weights(model)
    return model


class _Layout:
    def __init__(self, name: str, dims, parallel: dict, recompute: str = "none") -> None:
        self.name, self.dims, self.parallel, self.recompute = name, dims, parallel, recompute


def _layouts(world: int):
    from job.layout import Layout

    def pipe(schedule: str, stage_dp: str = "ddp", **extra) -> dict:
        return {"strategy": "pipeline", "pp": 2, "schedule": schedule, "microbatches": 4, "stages_per_rank": 2,
                "stage_dp": stage_dp, **extra}

    ddp = _Layout("ddp", Layout(dp_replicate=world), {"strategy": "ddp"})
    fsdp = _Layout("fsdp", Layout(dp_shard=world), {"strategy": "fsdp"})
    if world == 2:
        pdims = Layout(pp=2)
        # Activation checkpointing composes with every strategy: same trajectory, less memory.
        recomputed = [_Layout("ddp-selective", ddp.dims, ddp.parallel, "selective"),
                      _Layout("fsdp-full", fsdp.dims, fsdp.parallel, "full"),
                      _Layout("pipeline-1f1b-full", pdims, pipe("1f1b"), "full")]
        return [ddp, fsdp] + [_Layout(f"pipeline-{s}", pdims, pipe(s)) for s in ("gpipe", "1f1b", "interleaved_1f1b")] + recomputed
    return [
        ddp, fsdp,
        # Two "nodes" of 2: shard within, replicate across (torchrun --standalone has one node).
        _Layout("hsdp", Layout(dp_replicate=2, dp_shard=2), {"strategy": "hsdp"}),
        _Layout("pipeline-ddp", Layout(dp_replicate=2, pp=2), pipe("1f1b")),
        _Layout("pipeline-fsdp", Layout(dp_shard=2, pp=2), pipe("gpipe", stage_dp="fsdp")),
    ]


def _resume_pairs(world: int) -> list[tuple[str, str, str]]:
    if world == 2:
        return [("fsdp->ddp", "fsdp", "ddp"), ("ddp->fsdp", "ddp", "fsdp"), ("pipeline->ddp", "pipeline-1f1b", "ddp"),
                ("fsdp->pipeline", "fsdp", "pipeline-gpipe"),
                ("pipeline->interleaved", "pipeline-1f1b", "pipeline-interleaved_1f1b")]
    return [("hsdp->pipeline-fsdp", "hsdp", "pipeline-fsdp"), ("pipeline-ddp->fsdp", "pipeline-ddp", "fsdp")]


class _Trainer:
    """What train/loop.py does per step, reduced to the strategy's contract."""

    def __init__(self, layout: _Layout, seed: int) -> None:
        import torch

        from train.loop import build_optimizer
        from train.models.baichuan.parallelize import BAICHUAN
        from train.parallel.base import parallelize
        from train.parallel.mesh import build_mesh

        self.layout = layout
        self.cfg = _cfg(layout.parallel)
        device = torch.device("cpu")
        mesh = build_mesh(layout.dims, device)
        from train.models.baichuan.model import set_activation_checkpointing

        model = _fresh_model(seed)
        set_activation_checkpointing(model, layout.recompute)
        self.par = parallelize(model, layout=layout.dims, mesh=mesh, cfg=self.cfg, device=device,
                               z_loss_weight=_tiny_config().z_loss_weight, arch=BAICHUAN)
        self.opt = build_optimizer(self.par, self.cfg, device)

    def step(self, rows: list[dict]) -> tuple[float, float]:
        import torch

        from train import distributed as D
        from train.parallel.base import target_tokens

        par = self.par
        batches = _micro_batches(rows, par.dp_size, par.dp_rank, GRAD_ACCUM)
        count = D.all_reduce_sum(torch.tensor([float(sum(target_tokens(b) for b in batches))], dtype=torch.float64))
        n_target = int(count) // (self.layout.dims.world_size // par.dp_size)
        loss_sum = torch.zeros(())
        for k, b in enumerate(batches):
            loss, _ = par.forward_backward(b, par.dp_size / n_target, sync=k == len(batches) - 1)
            loss_sum += loss
        norm = par.clip_grad_norm_(self.cfg.clip_grad_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        total = D.all_reduce_sum(loss_sum.double().reshape(1))
        return float(total) / n_target, norm

    def eval_loss(self, rows: list[dict]) -> float:
        import torch

        from train import distributed as D

        self.par.train(False)
        loss, n = self.par.eval_loss(_micro_batches(rows, self.par.dp_size, self.par.dp_rank, 1)[0])
        self.par.train(True)
        totals = D.all_reduce_sum(torch.tensor([float(loss), float(n)], dtype=torch.float64))
        return float(totals[0]) / (float(totals[1]) / (self.layout.dims.world_size // self.par.dp_size))


def _reference(steps: list[list[dict]], eval_rows: list[dict]) -> tuple[dict, dict]:
    """The unwrapped model on the whole global batch, alone: ddp's math with one replica."""
    import torch

    from train.loop import build_optimizer
    from job.layout import Layout
    from train.loss import causal_lm_loss
    from train.models.baichuan.parallelize import BAICHUAN
    from train.parallel.base import target_tokens
    from train.parallel.ddp import DDPParallel

    cfg = _cfg({"strategy": "ddp"})
    model = _fresh_model(0)
    par = DDPParallel.build(model, layout=Layout(), mesh=None, cfg=cfg, device=torch.device("cpu"),
                            z_loss_weight=_tiny_config().z_loss_weight, arch=BAICHUAN)
    par.loss_chunk_tokens = cfg.loss_chunk_tokens  # what `parallelize` sets for the others
    opt = build_optimizer(par, cfg, torch.device("cpu"))
    out = {"loss": [], "grad_norm": []}
    for rows in steps:
        batches = _micro_batches(rows, 1, 0, GRAD_ACCUM)
        n_target = sum(target_tokens(b) for b in batches)
        total = sum(float(par.forward_backward(b, 1 / n_target, sync=True)[0]) for b in batches)
        out["grad_norm"].append(par.clip_grad_norm_(cfg.clip_grad_norm))
        opt.step()
        opt.zero_grad(set_to_none=True)
        out["loss"].append(total / n_target)
    with torch.no_grad():
        b = _micro_batches(eval_rows, 1, 0, 1)[0]
        loss, n = causal_lm_loss(model(b["input_ids"], b["attention_mask"]), b["labels"], _tiny_config().z_loss_weight)
    out["eval_loss"] = float(loss) / int(n)
    return out, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _worker(out_path: str, world: int) -> None:
    import gc
    import tempfile

    from train import checkpoint as ckpt
    from train import distributed as D

    def body(env) -> None:
        steps = _global_batches(STEPS + 1)
        train_steps, eval_rows = steps[:STEPS], steps[STEPS]
        reference, ref_state = _reference(train_steps, eval_rows)
        result: dict = {"reference": reference, "runs": {}, "resumes": {}, "timings": {}}
        layouts = {layout.name: layout for layout in _layouts(world)}
        ckpt_root = Path(D.broadcast_object(tempfile.mkdtemp(prefix="mlaunch-par-") if env.is_rank0 else None))

        for name, layout in layouts.items():
            t0 = time.perf_counter()
            trainer = _Trainer(layout, seed=0)
            run = {"loss": [], "grad_norm": []}
            for i, rows in enumerate(train_steps):
                loss, norm = trainer.step(rows)
                run["loss"].append(loss)
                run["grad_norm"].append(norm)
                if i + 1 == RESUME_AT:  # a checkpoint for the cross-strategy resumes below
                    ckpt.save(ckpt_root / name, RESUME_AT, trainer.par, trainer.opt, {"step": RESUME_AT}, keep=1)
            run["eval_loss"] = trainer.eval_loss(eval_rows)
            exported = trainer.par.full_state_dict_for_export()
            if env.is_rank0:
                run["export_keys_ok"] = list(exported) == list(ref_state)
                run["export_max_abs_diff"] = max(float((exported[k] - v).abs().max()) for k, v in ref_state.items())
            result["runs"][name] = run
            result["timings"][name] = time.perf_counter() - t0
            del trainer
            gc.collect()

        for label, src, dst in _resume_pairs(world):
            trainer = _Trainer(layouts[dst], seed=99)  # other weights: loading must overwrite them
            ckpt.load(ckpt.find_resume(ckpt_root / src, "auto"), trainer.par, trainer.opt)
            result["resumes"][label] = [trainer.step(rows)[0] for rows in train_steps[RESUME_AT:]]
            del trainer
            gc.collect()

        if env.is_rank0:
            Path(out_path).write_text(json.dumps(result, indent=1))
            import shutil

            shutil.rmtree(ckpt_root, ignore_errors=True)

    torchrun_worker(body)


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]))
