"""Checkpoints: atomic layout and discovery, in-process (the SIGKILL + resume runs are in
tests/dist/test_checkpoint.py)."""

from __future__ import annotations

import pytest
import torch

from job.config import ParallelConfig, TrainConfig
from job.errors import ConfigError
from train import checkpoint as ckpt
from job.baichuan import BaichuanConfig
from job.layout import Layout
from train.models.baichuan.model import BaichuanForCausalLM, init_weights
from train.models.baichuan.parallelize import BAICHUAN
from train.parallel.ddp import DDPParallel

TINY = BaichuanConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)


def _tiny_setup(seed: int):
    torch.manual_seed(seed)
    model = BaichuanForCausalLM(TINY)
    init_weights(model)
    layout = Layout.from_config(ParallelConfig(), 1, 1)
    par = DDPParallel.build(model, layout=layout, mesh=None, cfg=TrainConfig(model={"init": {}}), device=torch.device("cpu"),
                            z_loss_weight=0.0, arch=BAICHUAN)
    return par, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _one_step(par, opt):
    ids = torch.randint(3, 64, (2, 8))
    par.forward_backward({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}, 1 / 14, sync=True)
    opt.step()
    opt.zero_grad()


def test_save_load_roundtrip_atomic_layout_and_pruning(tmp_path):
    par, opt = _tiny_setup(0)
    for step in (1, 2, 3):
        _one_step(par, opt)
        path = ckpt.save(tmp_path, step, par, opt, {"step": step, "sampler": {"epoch": 0}}, keep=2)
    assert path.name == "step_000003" and (path / ckpt.MARKER).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000002", "step_000003"]  # keep-last-K
    expected = {k: v.clone() for k, v in par.model.state_dict().items()}
    random_after = torch.rand(3)

    other, other_opt = _tiny_setup(1)  # different weights, fresh optimizer without moments
    torch.rand(5)  # move the RNG on: load must restore it
    state = ckpt.load(ckpt.find_resume(tmp_path, "auto"), other, other_opt)
    assert state["step"] == 3
    assert all(torch.equal(v, expected[k]) for k, v in other.model.state_dict().items())
    assert torch.equal(torch.rand(3), random_after)
    # Same optimizer state → the next update is bit-identical too.
    torch.manual_seed(7)
    _one_step(par, opt)
    torch.manual_seed(7)
    _one_step(other, other_opt)
    assert all(torch.equal(a, b) for a, b in zip(par.model.parameters(), other.model.parameters()))


def test_half_written_checkpoints_are_ignored_and_cleaned(tmp_path):
    par, opt = _tiny_setup(0)
    _one_step(par, opt)
    good = ckpt.save(tmp_path, 4, par, opt, {"step": 4}, keep=3)
    (tmp_path / "step_000009.tmp").mkdir()  # killed while saving
    no_marker = tmp_path / "step_000008"  # marker never written
    no_marker.mkdir()
    (no_marker / "__0_0.distcp").write_bytes(b"partial")
    truncated = tmp_path / "step_000007"  # marker present but a file is shorter than listed
    truncated.mkdir()
    for f in good.iterdir():
        (truncated / f.name).write_bytes(f.read_bytes())
    shard = next(truncated.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:10])

    assert ckpt.find_resume(tmp_path, "auto") == good
    assert [s for s, _ in ckpt.complete_checkpoints(tmp_path)] == [4]
    with pytest.raises(ConfigError, match="no valid COMPLETE marker"):
        ckpt.find_resume(tmp_path, str(no_marker))
    assert ckpt.find_resume(tmp_path, "never") is None
    removed = ckpt.clean_incomplete(tmp_path)
    assert sorted(p.name for p in removed) == ["step_000007", "step_000008", "step_000009.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == ["step_000004"]
