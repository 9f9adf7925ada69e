"""DDP training: the parallel layout checks and the lr schedule (the real torchrun runs are in
tests/dist/test_train_ddp.py)."""

from __future__ import annotations

import pytest

from job.config import ParallelConfig, validate
from job.errors import ConfigError
from train.loop import lr_factor
from job.autoplan import resolve_auto
from job.layout import Layout


def test_layout_ddp_and_pipeline():
    assert Layout.from_config(ParallelConfig(strategy="ddp"), 8, 4).mesh_shape() == ((8,), ("dp",))
    dims = Layout.from_config(ParallelConfig(strategy="pipeline", pp=2), 8, 4)
    assert (dims.dp, dims.pp) == (4, 2) and dims.mesh_shape() == ((2, 4), ("pp", "dp"))
    hsdp = Layout.from_config(ParallelConfig(strategy="hsdp"), 16, 8)
    assert (hsdp.dp_replicate, hsdp.dp_shard) == (2, 8)

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
def test_layout_rejects_bad_layouts(pcfg, world, nproc, message):
    with pytest.raises(ConfigError, match=message) as e:
        Layout.from_config(pcfg, world, nproc)
    assert "\n" not in str(e.value)


def test_lr_schedule_warmup_then_decay_to_min():
    kw = dict(warmup=2, total=10, min_ratio=0.1)
    cosine = [lr_factor(s, decay="cosine", **kw) for s in range(10)]
    assert cosine[:3] == [0.5, 1.0, 1.0]
    assert cosine[-1] == pytest.approx(0.1) and all(a >= b for a, b in zip(cosine[1:], cosine[2:]))
    linear = [lr_factor(s, decay="linear", **kw) for s in range(10)]
    assert linear[2] == 1.0 and linear[-1] == pytest.approx(0.1) and linear[6] == pytest.approx(0.1 + 0.9 * 3 / 7)
    assert [lr_factor(s, decay="constant", **kw) for s in (2, 9)] == [1.0, 1.0]
