"""The Baichuan module on CUDA: bf16 kernels with padding and activation checkpointing
(tests/gpu: run with `pytest -m gpu tests/gpu`; never in CI)."""

from __future__ import annotations

import copy

import pytest
import torch

from job.baichuan import BaichuanConfig
from train.loss import causal_lm_loss
from train.models.baichuan.model import BaichuanForCausalLM, init_weights, set_activation_checkpointing


@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_cuda_bf16_kernels_padding_and_checkpointing(position):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.manual_seed(0)
    cfg = BaichuanConfig(1000, 512, 1024, 4, 8, position=position, norm_head=position == "alibi")
    ref = BaichuanForCausalLM(cfg)
    init_weights(ref, 0.02)
    model = copy.deepcopy(ref).to("cuda", torch.bfloat16)
    s = 256
    ids = torch.randint(3, 1000, (3, s))
    mask = torch.ones_like(ids)
    mask[0, : s // 3] = 0  # left padded
    mask[1, -s // 4 :] = 0  # right padded
    with torch.no_grad():
        expected = ref(ids, mask)
        if position == "rope":  # no padding must reach the flash kernel
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                model(ids.cuda())
        # A mask must not push SDPA to the O(S^2)-memory math fallback.
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
            out = model(ids.cuda(), mask.cuda()).float().cpu()
    assert torch.isfinite(out).all()
    real = mask.bool()
    err = (out - expected)[real].abs().max().item()
    assert err < 0.1 * expected[real].abs().max().item(), err

    model.train()
    set_activation_checkpointing(model, "full")
    labels = ids.masked_fill(mask == 0, -100).cuda()
    loss, n = causal_lm_loss(model(ids.cuda(), mask.cuda()), labels, z_loss_weight=1e-4)
    (loss / n).backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
