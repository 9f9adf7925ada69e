"""Baichuan and Baichuan2 (7B RoPE, 13B ALiBi) as one plain PyTorch module.

The parameter names are exactly the published ones, so hub checkpoints load without a
conversion step and exports load back into the published ``trust_remote_code`` models.

Designed for distributed training first; generation gets a KV cache through a separate
path (`KVCache`, `BaichuanForCausalLM.decode`) that the training forward never takes:

* ``model.layers`` is an ``nn.ModuleDict`` keyed ``"0".."L-1"``: a pipeline stage can drop
  layers (and ``embed_tokens``/``norm``/``lm_head`` can be set to ``None``) while every
  remaining state-dict key keeps its published name.
* Nothing depends on buffers: RoPE frequencies and ALiBi slopes are computed per forward,
  so meta-device construction followed by ``to_empty`` never leaves stale state behind.
* The attention mask (or ALiBi bias) and the RoPE tables are built once per forward and
  shared by every layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from job.baichuan import BaichuanConfig
from train.loss import causal_lm_loss, linear_cross_entropy

CheckpointMode = Literal["none", "full", "selective"]


# --------------------------------------------------------------------------------------
# Position encodings and the shared attention mask
# --------------------------------------------------------------------------------------
def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi head slopes (Press et al.), as the published Baichuan-13B code orders them."""

    def power_of_two_slopes(n: int) -> list[float]:
        return [2.0 ** (-8.0 * k / n) for k in range(1, n + 1)]

    if math.log2(num_heads).is_integer():
        slopes = power_of_two_slopes(num_heads)
    else:
        # Not a power of two (40 heads): the nearest lower power's slopes, topped up with
        # every other slope of the doubled series so the extra heads interleave.
        m = 2 ** math.floor(math.log2(num_heads))
        slopes = power_of_two_slopes(m) + power_of_two_slopes(2 * m)[0::2][: num_heads - m]
    return torch.tensor(slopes, dtype=torch.float32)


def _rope_tables(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [B or 1, 1, S, head_dim] in the rotate_half layout of the published code."""
    # Angles in fp32: bf16 positions above 256 lose integer precision.
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    )
    angles = positions.to(torch.float32)[..., None] * inv_freq
    emb = torch.cat((angles, angles), dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


@dataclass
class _AttnContext:
    """Per-forward state shared by every layer (built once, not per layer)."""

    mask: torch.Tensor | None  # bool (True = attend) or additive float; None = causal
    rope: tuple[torch.Tensor, torch.Tensor] | None = None


def _build_context(
    cfg: BaichuanConfig,
    attention_mask: torch.Tensor | None,
    seq_len: int,
    device: torch.device,
    dtype: torch.dtype,
) -> _AttnContext:
    if attention_mask is not None and bool(attention_mask.all()):
        # No padding in this batch: drop the mask so RoPE can take SDPA's flash path.
        # (One host sync per forward, worth it for the kernel it unlocks.)
        attention_mask = None

    allowed = None
    if attention_mask is not None:
        valid = attention_mask.to(device=device, dtype=torch.bool)
        idx = torch.arange(seq_len, device=device)
        causal = idx[None, :] <= idx[:, None]
        allowed = causal[None] & valid[:, None, :]
        # A padded query row would see no key at all and softmax to NaN; letting it see
        # itself keeps it finite (its output is never used).
        allowed = allowed | torch.eye(seq_len, dtype=torch.bool, device=device)[None]
        allowed = allowed[:, None]  # [B, 1, S, S]

    rope = None
    if cfg.position == "rope":
        if attention_mask is None:
            positions = torch.arange(seq_len, device=device)[None]
        else:
            # Count only real tokens so a left-padded row starts at position 0.
            positions = (attention_mask.to(device).long().cumsum(-1) - 1).clamp(min=0)
        rope = _rope_tables(positions, cfg.head_dim, cfg.rope_theta, dtype)
        return _AttnContext(mask=allowed, rope=rope)

    # ALiBi: slope·(j − i) rather than the published slope·j. Softmax cannot tell them
    # apart, but relative distances stay small near the diagonal, where bf16 keeps them
    # exact, and they are invariant to left padding.
    idx = torch.arange(seq_len, device=device, dtype=torch.float32)
    rel = idx[None, :] - idx[:, None]
    bias = alibi_slopes(cfg.num_attention_heads).to(device)[:, None, None] * rel  # [H, S, S]
    if allowed is None:
        allowed = (rel <= 0)[None, None]
    # Cast before broadcasting over the batch: the [B, H, S, S] result is the big tensor.
    mask = torch.where(allowed, bias.to(dtype)[None], float("-inf"))  # [B or 1, H, S, S]
    return _AttnContext(mask=mask)


# --------------------------------------------------------------------------------------
# Generation: the KV cache and the attention context of the positions that follow it
# --------------------------------------------------------------------------------------
class KVCache:
    """Keys and values of every position decoded so far, per decoder layer (generation only).

    Buffers of ``max_length`` positions are allocated on a layer's first use, so a step writes
    its new keys in place instead of concatenating the whole history again. ``length`` is the
    number of cached positions; ``BaichuanForCausalLM.decode`` advances it."""

    def __init__(self, max_length: int) -> None:
        self.max_length = max_length
        self.length = 0
        self._buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.head_weight: torch.Tensor | None = None  # a NormHead's normalised rows, computed once

    def layer(self, idx: int) -> "LayerCache":
        return LayerCache(self, idx)


class LayerCache:
    """One decoder layer's view of a ``KVCache``."""

    def __init__(self, owner: KVCache, idx: int) -> None:
        self.owner, self.idx = owner, idx

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions' k, v [B, H, S, D]; return the keys and values of all positions."""
        owner = self.owner
        start, end = owner.length, owner.length + k.shape[2]
        if end > owner.max_length:
            raise ValueError(f"the KV cache holds {owner.max_length} positions; {end} were asked for")
        if self.idx not in owner._buffers:
            shape = (k.shape[0], k.shape[1], owner.max_length, k.shape[3])
            owner._buffers[self.idx] = (k.new_empty(shape), v.new_empty(shape))
        keys, values = owner._buffers[self.idx]
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        return keys[:, :, :end], values[:, :, :end]


def _decode_context(cfg: BaichuanConfig, past: int, seq_len: int, device: torch.device,
                    dtype: torch.dtype) -> _AttnContext:
    """``_build_context`` for ``seq_len`` new positions after ``past`` cached ones (no padding):
    RoPE angles and ALiBi distances are those of the absolute positions past..past+seq_len-1, so
    every number equals the one the full forward computes for that position."""
    total = past + seq_len
    q_pos = torch.arange(past, total, device=device)
    k_pos = torch.arange(total, device=device)
    if cfg.position == "rope":
        rope = _rope_tables(q_pos[None], cfg.head_dim, cfg.rope_theta, dtype)
        # No past (the prompt): SDPA's causal path, exactly as the full forward takes it. Otherwise
        # is_causal would align the query rows to the first keys, not to the last.
        mask = None if past == 0 else (k_pos[None, :] <= q_pos[:, None])[None, None]
        return _AttnContext(mask=mask, rope=rope)
    rel = k_pos.to(torch.float32)[None, :] - q_pos.to(torch.float32)[:, None]
    bias = alibi_slopes(cfg.num_attention_heads).to(device)[:, None, None] * rel  # [H, S, past+S]
    return _AttnContext(mask=torch.where((rel <= 0)[None, None], bias.to(dtype)[None], float("-inf")))


# --------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Variance in fp32: in bf16 the mean of squares of a 5120-wide row is too coarse.
        xf = x.to(torch.float32)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(self.weight.dtype)


class LMHead(nn.Linear):
    """The output projection, which can also return the loss instead of the logits.

    ``forward(x)``: logits [B, S, V]. ``forward(x, labels, z_loss_weight, chunk_tokens)``: the
    loss sum over real target tokens (`train.loss`): with ``chunk_tokens`` > 0 chunk by chunk,
    so the [tokens × vocab] logits never exist whole; 0 computes the full logits first. The loss
    runs inside the head's own forward so that FSDP's hooks gather (and reshard) its weight
    around it, as for the plain matmul."""

    def head_weight(self) -> torch.Tensor:
        return self.weight

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, z_loss_weight: float = 0.0,
                chunk_tokens: int = 0) -> torch.Tensor:
        if labels is None:
            return F.linear(x, self.head_weight())
        if chunk_tokens:
            return linear_cross_entropy(x, self.head_weight(), labels, z_loss_weight, chunk_tokens)[0]
        return causal_lm_loss(F.linear(x, self.head_weight()), labels, z_loss_weight)[0]


class NormHead(LMHead):
    """Baichuan2's head: rows L2-normalised at use time, every forward.

    The published code swaps in a normalised copy of the parameter when switching to eval;
    that breaks FSDP sharding and the optimizer's reference to the parameter, so here the
    parameter itself is never replaced."""

    def head_weight(self) -> torch.Tensor:
        return F.normalize(self.weight, dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: BaichuanConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        self.W_pack = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=False)
        self.o_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, ctx: _AttnContext, cache: LayerCache | None = None) -> torch.Tensor:
        b, s, h = x.shape
        qkv = self.W_pack(x).view(b, s, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, S, D]
        if ctx.rope is not None:
            cos, sin = ctx.rope
            q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        if cache is not None:  # decoding: attend to the cached positions too (keys stored rotated)
            k, v = cache.append(k, v)
        if ctx.mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, h))


class MLP(nn.Module):
    def __init__(self, cfg: BaichuanConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: BaichuanConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # A plain attribute, not a wrapper module, so state-dict keys never change.
        self.activation_checkpointing = False

    def _forward(self, x: torch.Tensor, ctx: _AttnContext, cache: LayerCache | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx, cache)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward(self, x: torch.Tensor, ctx: _AttnContext, cache: LayerCache | None = None) -> torch.Tensor:
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, ctx, use_reentrant=False)
        return self._forward(x, ctx, cache)


class BaichuanModel(nn.Module):
    def __init__(self, cfg: BaichuanConfig) -> None:
        super().__init__()
        self.embed_tokens: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleDict(
            {str(i): DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)}
        )
        self.norm: RMSNorm | None = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class BaichuanForCausalLM(nn.Module):
    """Baichuan/Baichuan2 causal LM; also serves as a pipeline stage.

    ``forward(input_ids_or_hidden, attention_mask=None)``: token ids [B, S] when
    ``model.embed_tokens`` is present, else hidden states [B, S, h]. Returns logits
    [B, S, V] when ``lm_head`` is present, else hidden states. ``attention_mask`` is the
    usual [B, S] 1/0 padding mask (left or right padding); None means no padding.

    Training passes ``labels`` [B, S] (-100 = ignored) instead: a model with its head then
    returns the loss sum over real target tokens (`LMHead`), computed ``loss_chunk_tokens``
    tokens at a time (0: from the full logits), with Baichuan2's z-loss at ``z_loss_weight``.
    A stage without the head ignores them and returns hidden states as before.
    """

    def __init__(self, cfg: BaichuanConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = BaichuanModel(cfg)
        head_cls = NormHead if cfg.norm_head else LMHead
        self.lm_head: LMHead | None = head_cls(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(
        self, input_ids_or_hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None, z_loss_weight: float = 0.0, loss_chunk_tokens: int = 0,
    ) -> torch.Tensor:
        m = self.model
        if m.embed_tokens is not None:
            x = m.embed_tokens(input_ids_or_hidden)
        else:
            x = input_ids_or_hidden
        ctx = _build_context(self.config, attention_mask, x.shape[1], x.device, x.dtype)
        for layer in m.layers.values():
            x = layer(x, ctx)
        if m.norm is not None:
            x = m.norm(x)
        if self.lm_head is not None:
            if labels is not None:
                return self.lm_head(x, labels, z_loss_weight, loss_chunk_tokens)
            x = self.lm_head(x)
        return x

    def decode(self, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Generation: logits [B, S, V] of the S new tokens ``input_ids`` [B, S] that follow the
        ``cache.length`` positions already in ``cache``, which then holds these too.

        The first call (an empty cache) takes the prompt, later ones the sampled tokens. A
        complete model (not a pipeline stage) and no padding; the training forward is untouched."""
        m = self.model
        x = m.embed_tokens(input_ids)
        ctx = _decode_context(self.config, cache.length, x.shape[1], x.device, x.dtype)
        for layer in m.layers.values():
            x = layer(x, ctx, cache.layer(layer.layer_idx))
        cache.length += x.shape[1]
        x = m.norm(x)
        if isinstance(self.lm_head, NormHead):
            # The weights do not change while generating: normalise the head's rows once per
            # answer, not once per token (Baichuan2's 125,696 x 4096 head, every step).
            if cache.head_weight is None:
                cache.head_weight = F.normalize(self.lm_head.weight, dim=-1)
            return F.linear(x, cache.head_weight)
        return self.lm_head(x)


# --------------------------------------------------------------------------------------
# Training helpers
# --------------------------------------------------------------------------------------
def set_activation_checkpointing(model: BaichuanForCausalLM, mode: CheckpointMode) -> None:
    """Turn activation recomputation on per decoder layer.

    * ``"none"``: keep every activation.
    * ``"full"``: recompute every decoder layer in backward; only each layer's input is
      kept (≈ 2·s·b·h bytes per layer in bf16).
    * ``"selective"``: recompute every other layer (those with an even index). With SDPA
      the attention core already stores no s×s scores, so the remaining activations are
      spread evenly across the layer; checkpointing alternate layers halves activation
      memory for half of full recomputation's extra compute, and the memory is easy to
      predict for a planner.

    Only a flag on each layer changes, so state-dict keys and FSDP wrapping are unaffected.
    The layer index is the published one, so a pipeline stage makes the same choice for
    the layers it holds as the full model would.
    """
    if mode not in ("none", "full", "selective"):
        raise ValueError(f"activation checkpointing mode must be none|full|selective, got {mode!r}")
    for layer in model.model.layers.values():
        if mode == "full":
            layer.activation_checkpointing = True
        elif mode == "selective":
            layer.activation_checkpointing = layer.layer_idx % 2 == 0
        else:
            layer.activation_checkpointing = False


@torch.no_grad()
def init_weights(model: nn.Module, std: float = 0.02) -> None:
    """N(0, std) for linears and embeddings, ones for RMSNorm.

    RMSNorm is included on purpose: the published 13B code creates its weights with
    ``torch.empty`` and so leaves them uninitialised."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
