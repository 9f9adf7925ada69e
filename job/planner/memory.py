"""How the model is cut (pipeline stages, FSDP shards) and what one rank holds: model state
and activations, in bytes. The training code cuts the model with these same functions, so the
prediction and the run agree."""

from __future__ import annotations

import math
from functools import lru_cache

from job.baichuan import BaichuanConfig
from job.layout import Layout
from job.planner.inputs import NF4_BYTES, Adapters


# --------------------------------------------------------------------------------------
# How the model is cut
# --------------------------------------------------------------------------------------
def _stage_cost_units(model: BaichuanConfig) -> tuple[int, int, int]:
    """Balance weights (first-stage extra, per layer, last-stage extra): parameters (memory) plus
    matmul FLOPs per token / 6 (time). The embedding is a lookup: memory, no FLOPs."""
    layer = 2 * model.layer_params
    return model.embed_params, layer, 2 * model.vocab_size * model.hidden_size + model.hidden_size


def split_layers(model: BaichuanConfig, pp: int) -> list[range]:
    """Contiguous, non-empty layer ranges for `pp` pipeline stages, minimising the heaviest stage
    (then the spread) of params + FLOPs, counting the embedding on the first stage and the norm
    + head on the last. The training code cuts the model with this same function."""
    if not 1 <= pp <= model.num_hidden_layers:
        raise ValueError(f"pipeline degree {pp} must be between 1 and n_layers={model.num_hidden_layers}")
    counts = _stage_layer_counts(model, pp)
    starts = [sum(counts[:i]) for i in range(pp)]
    return [range(s, s + n) for s, n in zip(starts, counts)]


@lru_cache(maxsize=256)
def _stage_layer_counts(model: BaichuanConfig, pp: int) -> tuple[int, ...]:
    """Dynamic programme over (stages placed, layers placed): small (pp · L²) and exact."""
    first, per_layer, last = _stage_cost_units(model)

    def cost(stage: int, n: int) -> int:
        return n * per_layer + (first if stage == 0 else 0) + (last if stage == pp - 1 else 0)

    # best[j] = ((max cost, sum of squared costs), layer counts) for the first j layers.
    best: dict[int, tuple[tuple[int, int], tuple[int, ...]]] = {0: ((0, 0), ())}
    for stage in range(pp):
        nxt: dict[int, tuple[tuple[int, int], tuple[int, ...]]] = {}
        stages_after = pp - stage - 1  # each still needs at least one layer
        for j, ((worst, squares), counts) in best.items():
            for n in range(1, model.num_hidden_layers - j - stages_after + 1):
                c = cost(stage, n)
                key = (max(worst, c), squares + c * c)
                if j + n not in nxt or key < nxt[j + n][0]:
                    nxt[j + n] = (key, counts + (n,))
        best = nxt
    return best[model.num_hidden_layers][1]


def stage_shapes(model: BaichuanConfig, pp: int, stage: int) -> list[tuple[str, tuple[int, ...]]]:
    layers = split_layers(model, pp)[stage]
    return model.param_shapes(layers, first=stage == 0, last=stage == pp - 1)


def sharded_elems(shapes: list[tuple[str, tuple[int, ...]]], shard: int) -> int:
    """Elements one rank holds when each tensor's dim 0 is padded to a multiple of `shard` and
    split (FSDP2): exact for rank 0, an upper bound for the others."""
    total = 0
    for _, shape in shapes:
        rest = math.prod(shape[1:])
        total += -(-shape[0] // shard) * rest
    return total


def fsdp_unit_params(model: BaichuanConfig) -> list[int]:
    """Parameter counts of FSDP's wrapping units: embedding, each layer, norm + head."""
    return [model.embed_params] + [model.layer_params] * model.num_hidden_layers + [model.head_params]


def lora_state_bytes(model: BaichuanConfig, lora: Adapters, shard: int, frozen_bytes: float) -> dict[str, int]:
    """Model state of a LoRA rank: the frozen base at its storage size (`frozen_bytes` per
    element: bf16 2 on GPU, fp32 4 on CPU; QLoRA's decoder linears NF4), and fp32 adapters with
    their gradients and AdamW moments (4 + 4 + 8). FSDP shards both on dim 0, padded."""
    adapter = sharded_elems(model.lora_shapes(lora.r, lora.target_modules), shard)
    base = sharded_elems(model.param_shapes(), shard)
    params = frozen_bytes * base
    if lora.quantize == "4bit":
        linear = -(-model.linear_params() // shard)
        params -= (frozen_bytes - NF4_BYTES) * linear
    return {"params": int(params) + 4 * adapter, "grads": 4 * adapter, "optimizer": 8 * adapter}


def state_bytes_per_rank(model: BaichuanConfig, layout: Layout, rank_stage: int | None = None,
                         param_bytes: int = 4, grad_bytes: int = 4, optim_bytes: int = 8,
                         lora: Adapters | None = None) -> int:
    """Parameters + gradients + optimizer state held by one rank (defaults: fp32 AdamW, as on
    CPU). FSDP/HSDP shard every tensor over `layout.dp_shard` with dim-0 padding; a pipeline rank
    holds its stage (`rank_stage`; None = the heaviest stage), sharded for pipeline+fsdp. With
    `lora` the base is frozen at `param_bytes` and only the adapters train (`lora_state_bytes`)."""
    per_elem = param_bytes + grad_bytes + optim_bytes
    shard, pp = layout.dp_shard, layout.pp
    if lora is not None:
        assert pp == 1, "LoRA runs under ddp and fsdp/hsdp"
        return sum(lora_state_bytes(model, lora, shard, param_bytes).values())
    if pp == 1:
        return per_elem * sharded_elems(model.param_shapes(), shard)
    stages = range(pp) if rank_stage is None else [rank_stage]
    return per_elem * max(sharded_elems(stage_shapes(model, pp, s), shard) for s in stages)


# --------------------------------------------------------------------------------------
# Memory model
# --------------------------------------------------------------------------------------
def layer_activation_bytes(model: BaichuanConfig, tokens: int, act_bytes: int = 2) -> int:
    """Bytes one decoder layer keeps for backward without recomputation (Korthikanti et al. 2022's
    count, redone for this layer: fused SDPA, RMSNorm in fp32, SwiGLU, no dropout):

      2 RMSNorms:  fp32 up-cast input (4h) + normalised output (e·h)      each
      attention:   W_pack input (e·h) + q,k,v (3e·h) + kernel output (e·h)  [+ rotated q,k 2e·h]
      MLP:         gate/up input (e·h) + gate, silu, up, product (4e·ffn)
    """
    h, e = model.hidden_size, act_bytes
    per_token = 8 * h + e * (8 * h + 4 * model.intermediate_size)
    if model.position == "rope":
        per_token += 2 * e * h
    return tokens * per_token


def checkpointed_layers(layers: range, recompute: str) -> int:
    """How many of `layers` are recomputed: all (full), the even-indexed ones (selective — as
    `train.models.baichuan.model.set_activation_checkpointing` does), or none."""
    if recompute == "full":
        return len(layers)
    if recompute == "selective":
        return sum(1 for i in layers if i % 2 == 0)
    return 0


def activation_bytes(model: BaichuanConfig, layers: range, recompute: str, micro_batch: int,
                     seq_len: int, act_bytes: int = 2, in_flight: int = 1) -> int:
    """Activations of `layers` for `in_flight` micro-batches. A recomputed layer keeps only its
    input (e·s·b·h); while it is recomputed in backward one layer's full set lives once more."""
    tokens = micro_batch * seq_len
    full_layer = layer_activation_bytes(model, tokens, act_bytes)
    n_ckpt = checkpointed_layers(layers, recompute)
    kept = n_ckpt * act_bytes * tokens * model.hidden_size + (len(layers) - n_ckpt) * full_layer
    # ALiBi's additive mask [b, heads, s, s] is built once per forward and shared by the layers.
    mask = micro_batch * model.num_attention_heads * seq_len * seq_len * act_bytes if model.position == "alibi" else 0
    return in_flight * (kept + mask) + (full_layer if n_ckpt else 0)


def logits_bytes(model: BaichuanConfig, micro_batch: int, seq_len: int, act_bytes: int = 2,
                 chunk_tokens: int = 0) -> int:
    """Peak of the loss over s·b tokens and V words.

    From full logits (`chunk_tokens` 0): the logits (e bytes), their fp32 copy's log-softmax kept
    for backward (4), and the fp32 gradients in and out of log-softmax during backward (4 + 4):
    s·b·V·(e + 12).

    Chunked (`train.loss.linear_cross_entropy`): one chunk of c = min(chunk_tokens, s·b) tokens'
    logits at a time, in fp32 (4) plus, below fp32, their compute-dtype copy while it is cast (e):
    c·V·(4 + e), or c·V·4 in fp32; the hidden states' gradient, kept from the loss's forward to its
    backward (s·b·h·e); below fp32 also the head's compute-dtype copy and one chunk's partial head
    gradient (2·e·V·h). The fp32 accumulator of the head's gradient is that gradient itself
    (handed to autograd), counted with the other gradients."""
    tokens, vocab, h = micro_batch * seq_len, model.vocab_size, model.hidden_size
    if not chunk_tokens:
        return tokens * vocab * (act_bytes + 12)
    chunk = min(chunk_tokens, tokens)
    if act_bytes == 4:
        return chunk * vocab * 4 + tokens * h * 4
    return chunk * vocab * (4 + act_bytes) + tokens * h * act_bytes + 2 * act_bytes * vocab * h

