"""Building models without a full copy per rank, in-process: the piecewise init is bit-identical
to the full model's (and leaves the RNG where the full init leaves it); the per-file checkpoint
reader reads only the named tensors. The torchrun and `python -m train` checks are in
tests/dist/test_pretrained.py.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import tiny_baichuan_config, write_hub_folder

SEED = 5


@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_init_pieces_equal_the_full_model_init(position):
    """`init_pieces` replays the full model's seeded construction + init_weights piece by piece:
    the same tensors bit for bit, and the global RNG ends where the full build leaves it."""
    from train.build import init_pieces
    from train.models.baichuan.model import BaichuanForCausalLM, init_weights

    cfg = tiny_baichuan_config(position=position, num_hidden_layers=3)
    torch.manual_seed(SEED)
    model = BaichuanForCausalLM(cfg)
    init_weights(model, 0.03)
    next_draw = torch.rand(4)
    full = model.state_dict()

    pieces = list(init_pieces(cfg, SEED, 0.03))
    assert torch.equal(torch.rand(4), next_draw)
    merged = {k: v for piece in pieces for k, v in piece.items()}
    assert list(merged) == list(full) and len(pieces) == cfg.num_hidden_layers + 3
    for k in full:
        assert torch.equal(merged[k], full[k]), k
    # A pipeline rank keeps only its pieces, with the same values.
    kept = [p for p in init_pieces(cfg, SEED, 0.03, keep={"model.layers.2.mlp.up_proj.weight", "lm_head.weight"})]
    assert [sorted(p)[0] for p in kept] == ["model.layers.2.input_layernorm.weight", "lm_head.weight"]
    assert torch.equal(kept[0]["model.layers.2.self_attn.W_pack.weight"], full["model.layers.2.self_attn.W_pack.weight"])
    assert torch.equal(kept[1]["lm_head.weight"], full["lm_head.weight"])


@pytest.mark.parametrize("fmt", ["safetensors-sharded", "bin-sharded"])
def test_checkpoint_files_come_one_at_a_time_and_only_the_named_tensors(tmp_path, fmt):
    from train.models.baichuan.hub import iter_checkpoint_files

    weights = write_hub_folder(tmp_path, tiny_baichuan_config(), seed=1, fmt=fmt)  # .bin carries rotary inv_freq
    files = list(iter_checkpoint_files(tmp_path))
    assert len(files) == 2
    assert sorted(k for _, t in files for k in t) == sorted(weights)  # inv_freq left out
    stage = {"model.layers.3.mlp.up_proj.weight", "lm_head.weight"}
    only = list(iter_checkpoint_files(tmp_path, names=stage))
    assert len(only) == 1 and set(only[0][1]) == stage  # the other file yields nothing
    assert all(torch.equal(only[0][1][k], weights[k]) for k in stage)
