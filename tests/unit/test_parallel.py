"""Parallel layouts in-process: bad layouts fail in one line before any process group, and the
pipeline's pieces (the real torchrun runs are in tests/dist/test_parallel.py)."""

from __future__ import annotations

import pytest

from tests.helpers import tiny_baichuan_config


def test_bad_layouts_fail_in_one_line_before_any_process_group():
    """Checked by Layout.from_config, which `python -m train` calls before init_process_group."""
    from job.config import ParallelConfig
    from job.errors import ConfigError
    from job.layout import Layout

    for pcfg, world, message in [
        (ParallelConfig(strategy="pipeline", pp=3), 4, "does not divide the world size 4"),
        (ParallelConfig(strategy="ddp", pp=2), 4, "need `strategy: pipeline`"),
        (ParallelConfig(strategy="fsdp", pp=2), 4, "need `strategy: pipeline`"),
    ]:
        with pytest.raises(ConfigError, match=message) as e:
            Layout.from_config(pcfg, world, world)
        assert "\n" not in str(e.value)


def test_pipeline_pieces():
    """In-process: the planner's split, the cut model's keys, the shape ladder and the padding."""
    import torch

    from job.config import ParallelConfig
    from job.errors import ConfigError
    from train.models.baichuan.model import BaichuanForCausalLM
    from job.planner import split_layers
    from train.models.baichuan.parallelize import build_pipeline_stages
    from train.parallel.pipeline import bucket_length, check_pipeline, pad_batch

    model = BaichuanForCausalLM(tiny_baichuan_config(vocab_size=128, intermediate_size=88))
    full_keys = set(model.state_dict())
    split = split_layers(model.config, 4)
    chunks, mine = build_pipeline_stages(model, 1, 2, 2)
    assert mine == [1, 3]
    assert set(model.state_dict()) <= full_keys  # no key renamed
    assert "lm_head.weight" in model.state_dict() and "model.embed_tokens.weight" not in model.state_dict()
    assert sorted(model.model.layers.keys()) == sorted(str(i) for k in mine for i in split[k])
    assert set().union(*(c.state_dict() for c in chunks)) == set(model.state_dict())
    assert [bucket_length(n, 64) for n in (1, 16, 17, 24, 25, 40, 64, 65)] == [16, 16, 24, 24, 32, 48, 64, 65]
    batch = {"input_ids": torch.ones(3, 5, dtype=torch.long), "attention_mask": torch.ones(3, 5, dtype=torch.long),
             "labels": torch.ones(3, 5, dtype=torch.long)}
    padded = pad_batch(batch, 4, 16)
    assert padded["input_ids"].shape == (4, 16) and int(padded["attention_mask"].sum()) == 15
    assert int((padded["labels"] != -100).sum()) == 15
    with pytest.raises(ConfigError, match="at least 8 decoder layers"):
        check_pipeline(ParallelConfig(strategy="pipeline", pp=4, schedule="interleaved_1f1b"), 4, 4)
    with pytest.raises(ConfigError, match="at least pp=4"):
        check_pipeline(ParallelConfig(strategy="pipeline", pp=4, microbatches=2), 4, 4)
