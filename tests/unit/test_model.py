"""The Baichuan module against independent references (transformers' Llama for RoPE, a naive
ALiBi written from the paper here), plus padding, NormHead, checkpointing and loss checks."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from job.baichuan import VARIANTS
from job.baichuan import BaichuanConfig
from train.loss import causal_lm_loss
from train.models.baichuan.model import (
    BaichuanForCausalLM,
    alibi_slopes,
    init_weights,
    set_activation_checkpointing,
)

VOCAB = 300


def tiny_config(
    position: str = "rope", norm_head: bool = False, layers: int = 2, heads: int = 4
) -> BaichuanConfig:
    return BaichuanConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        position=position,
        norm_head=norm_head,
    )


def tiny_model(
    position: str = "rope", norm_head: bool = False, layers: int = 2, seed: int = 0, heads: int = 4
):
    torch.manual_seed(seed)
    cfg = tiny_config(position, norm_head, layers, heads)
    model = BaichuanForCausalLM(cfg)
    init_weights(model, std=0.1)
    # Non-unit norm weights so a mix-up between norms would show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.eval(), cfg


def published_keys(layers: int) -> set[str]:
    keys = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(layers):
        p = f"model.layers.{i}."
        keys |= {
            p + "self_attn.W_pack.weight",
            p + "self_attn.o_proj.weight",
            p + "mlp.gate_proj.weight",
            p + "mlp.up_proj.weight",
            p + "mlp.down_proj.weight",
            p + "input_layernorm.weight",
            p + "post_attention_layernorm.weight",
        }
    return keys


@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_state_dict_keys_are_the_published_names(position):
    model, _ = tiny_model(position, layers=3)
    assert set(model.state_dict()) == published_keys(3)
    assert model.state_dict()["model.layers.0.self_attn.W_pack.weight"].shape == (3 * 64, 64)


# --------------------------------------------------------------------------------------
# RoPE: against transformers' Llama (same rotate_half convention as the published code)
# --------------------------------------------------------------------------------------
def test_rope_matches_transformers_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    model, cfg = tiny_model("rope", layers=2)
    llama_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads,
        rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=False,
    )
    llama_cfg._attn_implementation = "eager"
    llama = LlamaForCausalLM(llama_cfg).eval()

    state = {}
    for k, v in model.state_dict().items():
        if k.endswith("W_pack.weight"):
            q, kk, vv = v.chunk(3, dim=0)  # output rows are [Q; K; V]
            base = k.removesuffix("W_pack.weight")
            state[base + "q_proj.weight"] = q
            state[base + "k_proj.weight"] = kk
            state[base + "v_proj.weight"] = vv
        else:
            state[k] = v
    missing, unexpected = llama.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing)

    ids = torch.randint(3, VOCAB, (2, 17))
    with torch.no_grad():
        ours = model(ids)
        theirs = llama(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------
# ALiBi: slopes from the paper, and the whole model against a naive reference
# --------------------------------------------------------------------------------------
def paper_slopes(n: int) -> list[float]:
    """ALiBi paper: a geometric sequence starting at 2^(-8/n) with that same ratio; for n not
    a power of two, the closest lower power's slopes plus every other of the 2× series."""

    def geometric(k: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(k) - 3)))
        return [start * start**i for i in range(k)]

    if n & (n - 1) == 0:
        return geometric(n)
    m = 1 << (n.bit_length() - 1)
    return geometric(m) + geometric(2 * m)[::2][: n - m]


@pytest.mark.parametrize("heads", [8, 32, 40, 12])
def test_alibi_slopes_match_paper(heads):
    ours = alibi_slopes(heads)
    assert ours.shape == (heads,)
    torch.testing.assert_close(ours, torch.tensor(paper_slopes(heads)), rtol=1e-6, atol=0)
    if heads == 40:  # 32 power-of-two slopes, then 8 interleaved from the 64 series
        assert ours[32].item() == pytest.approx(2 ** (-8 / 64))
        assert ours[33].item() == pytest.approx(2 ** (-8 * 3 / 64))


@pytest.mark.parametrize("heads", [8, 12])
def test_alibi_bias_is_slope_times_distance_on_causal_mask(heads):
    from train.models.baichuan.model import _build_context

    cfg = BaichuanConfig(VOCAB, 8 * heads, 32, 1, heads, position="alibi")
    s = 6
    mask = _build_context(cfg, None, s, torch.device("cpu"), torch.float32).mask
    assert mask.shape == (1, heads, s, s)
    slopes = paper_slopes(heads)
    for h in range(heads):
        for i in range(s):
            for j in range(s):
                if j > i:
                    assert mask[0, h, i, j] == float("-inf")
                else:
                    assert mask[0, h, i, j].item() == pytest.approx(slopes[h] * (j - i))


def naive_alibi_forward(model: BaichuanForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """Eager reference in the published 13B form: bias slope·j (key position) + causal mask."""
    cfg = model.config
    sd = model.state_dict()
    h, nh, d = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
    s = ids.shape[1]
    slopes = torch.tensor(paper_slopes(nh))
    bias = slopes[:, None, None] * torch.arange(s)[None, None, :].float()
    causal = torch.full((s, s), float("-inf")).triu(1)

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps))

    x = sd["model.embed_tokens.weight"][ids]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        y = rms(x, sd[p + "input_layernorm.weight"])
        qkv = y @ sd[p + "self_attn.W_pack.weight"].T
        q, k, v = (t.view(-1, s, nh, d).transpose(1, 2) for t in qkv.split(h, dim=-1))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d) + bias + causal
        att = torch.softmax(scores, -1) @ v
        x = x + att.transpose(1, 2).reshape(-1, s, h) @ sd[p + "self_attn.o_proj.weight"].T
        y = rms(x, sd[p + "post_attention_layernorm.weight"])
        gate = F.silu(y @ sd[p + "mlp.gate_proj.weight"].T)
        x = x + (gate * (y @ sd[p + "mlp.up_proj.weight"].T)) @ sd[p + "mlp.down_proj.weight"].T
    x = rms(x, sd["model.norm.weight"])
    return x @ sd["lm_head.weight"].T


def test_alibi_model_matches_naive_reference():
    model, _ = tiny_model("alibi", layers=2)
    ids = torch.randint(3, VOCAB, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), naive_alibi_forward(model, ids), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------
# Padding: real tokens' logits do not depend on padding side or batch mates
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("position", ["rope", "alibi"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_does_not_change_real_logits(position, side):
    model, _ = tiny_model(position, layers=2)
    short = torch.randint(3, VOCAB, (1, 5))
    long = torch.randint(3, VOCAB, (1, 9))
    pad = torch.zeros(1, 4, dtype=torch.long)
    padded = torch.cat([pad, short], 1) if side == "left" else torch.cat([short, pad], 1)
    batch = torch.cat([padded, long], 0)
    mask = (torch.arange(9) >= 4) if side == "left" else (torch.arange(9) < 5)
    attention_mask = torch.stack([mask.long(), torch.ones(9, dtype=torch.long)])

    with torch.no_grad():
        alone_short = model(short)
        alone_long = model(long)
        out = model(batch, attention_mask)
    assert torch.isfinite(out).all()  # padded query rows included
    real = out[0, 4:] if side == "left" else out[0, :5]
    torch.testing.assert_close(real, alone_short[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], alone_long[0], atol=1e-5, rtol=1e-5)


def test_rope_positions_count_only_real_tokens():
    # RoPE scores are shift-invariant, so logits alone cannot show this; large positions
    # do lose precision, and the published code numbers a left-padded row from 0.
    from train.models.baichuan.model import _build_context

    cfg = tiny_config("rope")
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    cos, _ = _build_context(cfg, mask, 5, torch.device("cpu"), torch.float32).rope
    ref, _ = _build_context(cfg, None, 5, torch.device("cpu"), torch.float32).rope
    torch.testing.assert_close(cos[0, 0, 2:], ref[0, 0, :3])
    torch.testing.assert_close(cos[1, 0, :3], ref[0, 0, :3])


@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_all_ones_mask_equals_no_mask(position):
    model, _ = tiny_model(position)
    ids = torch.randint(3, VOCAB, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, torch.ones_like(ids)), model(ids), atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------------------
# Pipeline stages: None modules and missing layers
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_split_into_stages_composes_to_full_model(position):
    full, _ = tiny_model(position, layers=4)
    first, second = copy.deepcopy(full), copy.deepcopy(full)
    del first.model.layers["2"], first.model.layers["3"]
    first.model.norm = None
    first.lm_head = None
    second.model.embed_tokens = None
    del second.model.layers["0"], second.model.layers["1"]

    keys = set(full.state_dict())
    assert set(first.state_dict()) | set(second.state_dict()) == keys
    assert not set(first.state_dict()) & set(second.state_dict())

    ids = torch.randint(3, VOCAB, (2, 8))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        hidden = first(ids, mask)
        assert hidden.shape == (2, 8, 64)
        torch.testing.assert_close(second(hidden, mask), full(ids, mask), atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------------------
# NormHead (Baichuan2)
# --------------------------------------------------------------------------------------
def test_norm_head_equals_plain_head_with_normalised_rows():
    normed, _ = tiny_model("rope", norm_head=True)
    plain = BaichuanForCausalLM(tiny_config("rope", norm_head=False)).eval()
    state = dict(normed.state_dict())
    state["lm_head.weight"] = F.normalize(state["lm_head.weight"], dim=-1)
    plain.load_state_dict(state)
    ids = torch.randint(3, VOCAB, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(normed(ids), plain(ids), atol=1e-6, rtol=1e-6)
    # The stored parameter is the raw one; normalisation happens only at use time.
    assert not torch.allclose(normed.lm_head.weight.norm(dim=-1), torch.ones(VOCAB))


def test_norm_head_keeps_parameter_identity_and_gets_gradients():
    model, _ = tiny_model("alibi", norm_head=True)
    before = [id(p) for p in model.parameters()]
    head = model.lm_head.weight
    model.eval()
    with torch.no_grad():
        eval_out = model(torch.randint(3, VOCAB, (1, 5)))
    model.train()
    assert [id(p) for p in model.parameters()] == before
    assert model.lm_head.weight is head
    assert torch.isfinite(eval_out).all()

    ids = torch.randint(3, VOCAB, (2, 6))
    loss, n = causal_lm_loss(model(ids), ids)
    (loss / n).backward()
    assert head.grad is not None and head.grad.abs().sum() > 0
    # Row-normalisation makes each row's gradient orthogonal to the row itself.
    radial = (head.grad * head.detach()).sum(-1)
    assert radial.abs().max() < 1e-5


# --------------------------------------------------------------------------------------
# Activation checkpointing
# --------------------------------------------------------------------------------------
def _loss_and_grads(model, ids, mask):
    model.zero_grad(set_to_none=True)
    loss, n = causal_lm_loss(model(ids, mask), ids.masked_fill(mask == 0, -100))
    (loss / n).backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["full", "selective"])
@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_activation_checkpointing_keeps_loss_grads_and_keys(mode, position):
    model, _ = tiny_model(position, layers=3)
    model.train()
    ids = torch.randint(3, VOCAB, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    keys = list(model.state_dict())
    ref_loss, ref_grads = _loss_and_grads(model, ids, mask)

    set_activation_checkpointing(model, mode)
    flags = [layer.activation_checkpointing for layer in model.model.layers.values()]
    assert flags == ([True] * 3 if mode == "full" else [True, False, True])
    loss, grads = _loss_and_grads(model, ids, mask)
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], atol=1e-6, rtol=1e-5)

    set_activation_checkpointing(model, "none")
    assert not any(layer.activation_checkpointing for layer in model.model.layers.values())
    with pytest.raises(ValueError, match="none\\|full\\|selective"):
        set_activation_checkpointing(model, "sometimes")


# --------------------------------------------------------------------------------------
# Init, loss, sizes
# --------------------------------------------------------------------------------------
def test_init_weights_sets_norms_to_one_after_meta_construction():
    with torch.device("meta"):
        model = BaichuanForCausalLM(tiny_config("alibi"))
    model.to_empty(device="cpu")
    init_weights(model, std=0.02)
    for name, p in model.named_parameters():
        if "norm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            assert abs(p.std().item() - 0.02) < 0.005, name


def test_causal_lm_loss_sum_and_count_match_mean_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11)
    labels = torch.randint(0, 11, (3, 7))
    labels[0, 4:] = -100
    labels[2, :2] = -100
    loss_sum, n = causal_lm_loss(logits, labels)
    mean = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
    expected_n = (labels[:, 1:] != -100).sum()
    assert n.item() == expected_n.item()
    torch.testing.assert_close(loss_sum / n, mean)

    # bf16 logits are upcast: the same values in bf16 give the fp32 answer on those values.
    bf = logits.bfloat16()
    torch.testing.assert_close(causal_lm_loss(bf, labels)[0], causal_lm_loss(bf.float(), labels)[0])


def test_z_loss_adds_weighted_squared_logsumexp_of_real_tokens():
    torch.manual_seed(1)
    logits = torch.randn(2, 6, 9) * 3
    labels = torch.randint(0, 9, (2, 6))
    labels[1, 3:] = -100
    plain, n = causal_lm_loss(logits, labels)
    with_z, n2 = causal_lm_loss(logits, labels, z_loss_weight=1e-3)
    real = labels[:, 1:] != -100
    lse = torch.logsumexp(logits[:, :-1], -1)
    torch.testing.assert_close(with_z - plain, 1e-3 * lse[real].pow(2).sum())
    assert n.item() == n2.item() == real.sum().item()


@pytest.mark.parametrize("position,norm_head", [("rope", False), ("alibi", True)])
def test_num_params_counts_every_parameter(position, norm_head):
    model, cfg = tiny_model(position, norm_head=norm_head, layers=3)
    assert cfg.num_params == sum(p.numel() for p in model.parameters())


def test_published_sizes_are_plausible():
    sizes = {name: cfg.num_params / 1e9 for name, cfg in VARIANTS.items()}
    assert 6.9 < sizes["baichuan-7b"] < 7.1
    assert 13.1 < sizes["baichuan-13b"] < 13.4
    assert 7.4 < sizes["baichuan2-7b"] < 7.6
    assert 13.8 < sizes["baichuan2-13b"] < 14.0
    assert VARIANTS["baichuan2-13b"].position == "alibi"
    assert VARIANTS["baichuan2-13b"].norm_head
    assert not VARIANTS["baichuan-7b"].norm_head


def test_flops_per_token_follows_palm_without_the_embedding_lookup():
    # torchtitan's convention: 6·(N − embedding) + 12·L·h·s; the embedding is a lookup, no matmul.
    cfg = VARIANTS["baichuan2-7b"]
    assert cfg.flops_per_token(1024) == 6 * (cfg.num_params - 125696 * 4096) + 12 * 32 * 4096 * 1024


def test_config_rejects_bad_shapes():
    with pytest.raises(ValueError, match="divisible"):
        BaichuanConfig(VOCAB, 65, 96, 2, 4)
    with pytest.raises(ValueError, match="position"):
        BaichuanConfig(VOCAB, 64, 96, 2, 4, position="learned")
