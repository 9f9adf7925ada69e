"""DDP training: the parallel layout checks, the lr schedule, and real torchrun runs on CPU/gloo."""

from __future__ import annotations

import math

import pytest

from job.config import ParallelConfig, validate
from job.errors import ConfigError
from tests.helpers import read_eval_metrics, read_metrics, run_train, write_job
from train.loop import lr_factor
from train.parallel.base import ParallelDims, resolve_auto


# ------------------------------------------------------------------------------ pure checks
def test_parallel_dims_ddp_and_pipeline():
    assert ParallelDims.from_config(ParallelConfig(strategy="ddp"), 8, 4).mesh_shape() == ((8,), ("dp",))
    dims = ParallelDims.from_config(ParallelConfig(strategy="pipeline", pp=2), 8, 4)
    assert (dims.dp, dims.pp) == (4, 2) and dims.mesh_shape() == ((2, 4), ("pp", "dp"))
    hsdp = ParallelDims.from_config(ParallelConfig(strategy="hsdp"), 16, 8)
    assert (hsdp.dp_replicate, hsdp.dp_shard_in_node) == (2, 8)

    job = validate({"train": {"model": {"init": {}}, "parallel": {"strategy": "auto"}}})
    resolved, why = resolve_auto(job, 2, 2, has_gpu=False)
    assert resolved.train.parallel.strategy in ("ddp", "fsdp") and why.startswith("parallel auto: ")
    assert resolve_auto(resolved, 2, 2, has_gpu=False) == (resolved, None)


@pytest.mark.parametrize(
    ("pcfg", "world", "nproc", "message"),
    [
        (ParallelConfig(strategy="ddp", pp=2), 4, 4, "need `strategy: pipeline`"),
        (ParallelConfig(strategy="pipeline", pp=3), 4, 4, "does not divide the world size 4"),
        (ParallelConfig(strategy="pipeline", pp=1), 4, 4, "pp >= 2"),
        (ParallelConfig(strategy="hsdp"), 6, 4, "not a multiple of nproc_per_node 4"),
    ],
)
def test_parallel_dims_rejects_bad_layouts(pcfg, world, nproc, message):
    with pytest.raises(ConfigError, match=message) as e:
        ParallelDims.from_config(pcfg, world, nproc)
    assert "\n" not in str(e.value)


def test_lr_schedule_warmup_then_decay_to_min():
    kw = dict(warmup=2, total=10, min_ratio=0.1)
    cosine = [lr_factor(s, decay="cosine", **kw) for s in range(10)]
    assert cosine[:3] == [0.5, 1.0, 1.0]
    assert cosine[-1] == pytest.approx(0.1) and all(a >= b for a, b in zip(cosine[1:], cosine[2:]))
    linear = [lr_factor(s, decay="linear", **kw) for s in range(10)]
    assert linear[2] == 1.0 and linear[-1] == pytest.approx(0.1) and linear[6] == pytest.approx(0.1 + 0.9 * 3 / 7)
    assert [lr_factor(s, decay="constant", **kw) for s in (2, 9)] == [1.0, 1.0]


# ------------------------------------------------------------------------------ real runs
@pytest.mark.slow
def test_world2_micro_b_matches_world1_micro_2b(tmp_path):
    """Loss normalised by the global token count: 2 ranks × micro-batch 1 follow the trajectory of
    1 rank × micro-batch 2 (same global batches, other padding), with gradient accumulation and
    DDP's no_sync in play. 16 rows repeated over ~2 epochs: the loss must also fall."""
    common = dict(max_steps=8, grad_accum=2, eval_every=4, checkpoint={"export": False})
    two = write_job(tmp_path / "w2", **common, data={"max_rows": 16, "micro_batch_size": 1})
    one = write_job(tmp_path / "w1", **common, data={"max_rows": 16, "micro_batch_size": 2})
    r2 = run_train(two, nproc=2, timeout=90)
    assert r2.returncode == 0, r2.stderr
    r1 = run_train(one, nproc=1, timeout=90)
    assert r1.returncode == 0, r1.stderr

    m2, m1 = read_metrics(tmp_path / "w2" / "run"), read_metrics(tmp_path / "w1" / "run")
    assert [r["step"] for r in m2] == [r["step"] for r in m1] == list(range(1, 9))
    for a, b in zip(m2, m1):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a, b)
        assert a["lr"] == b["lr"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["tokens_per_s"] > 0 and 0 < a["real_token_fraction"] <= 1 and a["elapsed_s"] >= 0
    e2, e1 = read_eval_metrics(tmp_path / "w2" / "run"), read_eval_metrics(tmp_path / "w1" / "run")
    assert [r["step"] for r in e2] == [4, 8]
    assert all(abs(a["eval_loss"] - b["eval_loss"]) <= 1e-5 for a, b in zip(e2, e1))
    # World 2 pads each half of a global batch to its own longest example: less padding.
    assert sum(r["real_token_fraction"] for r in m2) >= sum(r["real_token_fraction"] for r in m1)
    assert m1[-1]["loss"] < m1[0]["loss"] - 1.0 and math.isfinite(m1[-1]["loss"])
