"""Pick a parallel strategy for a Baichuan fine-tune, and say why.

Pure Python (stdlib only, no torch): `mlaunch plan` must stay instant, and every number here is
a formula of the model's shape, the cluster and the batch, so it can be unit-tested and read.
docs/planner.md writes the formulas down with their sources.

The pieces, in the order they are used:

* `ModelDims`, `ClusterSpec`, `Workload` — the three inputs.
* `split_layers`, `state_bytes_per_rank` — how the model is cut (pipeline stages, FSDP shards);
  the training code uses the same functions, so the prediction and the run agree.
* `plan_parallel` — enumerates candidates (strategy × degrees × recomputation), predicts each one's
  memory per GPU and step time, and chooses the fastest that fits.
* `format_decision`, `decision_to_dict`, `render_table` — for the CLI.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Iterable

from job.errors import ConfigError

GiB = 1024**3
GB = 10**9

# --------------------------------------------------------------------------------------
# Assumptions (each one is explained in docs/planner.md)
# --------------------------------------------------------------------------------------
DEFAULT_MFU = 0.45
"""Fraction of peak bf16 FLOP/s that the executed matmul FLOPs sustain (well-tuned dense
training of 7–13B models reaches 0.4–0.55 on A100/H100)."""

NON_OVERLAPPED = 0.2
"""Share of the communication that stays on the critical path even when compute could hide it
(the first all-gather, the last bucket's all-reduce, NCCL kernels slowing the matmuls)."""

TIE_MARGIN = 0.05
"""Predictions within 5 % of the fastest are a tie: the model is not more accurate than that, and
the simpler layout (then the one with less recomputation) is easier to run and debug."""

STRATEGIES = ("ddp", "fsdp", "hsdp", "pipeline", "pipeline+ddp", "pipeline+fsdp")
FAMILIES = ("ddp", "fsdp", "hsdp", "pipeline")
RECOMPUTE = ("none", "selective", "full")
# Simplicity ranks for tie-breaking: fewer moving parts first.
_COMPLEXITY = {"ddp": 0, "fsdp": 1, "hsdp": 2, "pipeline": 3, "pipeline+ddp": 3, "pipeline+fsdp": 4}


# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelDims:
    """The shape of a Baichuan-style decoder: all the planner needs to know about the model.

    `n_params` is computed, never given, so it always matches the shapes (`param_shapes`).
    `position` ("rope" or "alibi") only changes the activation estimate slightly."""

    n_layers: int
    hidden: int
    ffn: int
    heads: int
    vocab: int
    position: str = "rope"
    n_params: int = field(init=False)

    def __post_init__(self) -> None:
        for name in ("n_layers", "hidden", "ffn", "heads", "vocab"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelDims.{name} must be a positive integer, got {value!r}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} is not divisible by heads {self.heads}")
        if self.position not in ("rope", "alibi"):
            raise ValueError(f"position must be 'rope' or 'alibi', got {self.position!r}")
        total = self.embed_params + self.n_layers * self.layer_params + self.head_params
        object.__setattr__(self, "n_params", total)

    @property
    def layer_params(self) -> int:
        """W_pack (3h²) + o_proj (h²) + SwiGLU gate/up/down (3·h·ffn) + two RMSNorm weights (2h)."""
        h = self.hidden
        return 4 * h * h + 3 * h * self.ffn + 2 * h

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def head_params(self) -> int:
        """Final RMSNorm (h) plus the untied lm_head (V·h): they always travel together."""
        return self.hidden + self.vocab * self.hidden

    def param_shapes(self, layers: Iterable[int] | None = None, first: bool = True,
                     last: bool = True) -> list[tuple[str, tuple[int, ...]]]:
        """(hub name, shape) of every parameter; a pipeline stage passes its layers and whether
        it is the first (embeddings) or the last (norm + head) stage."""
        h, f = self.hidden, self.ffn
        shapes: list[tuple[str, tuple[int, ...]]] = []
        if first:
            shapes.append(("model.embed_tokens.weight", (self.vocab, h)))
        for i in range(self.n_layers) if layers is None else layers:
            p = f"model.layers.{i}."
            shapes += [
                (p + "self_attn.W_pack.weight", (3 * h, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (f, h)),
                (p + "mlp.up_proj.weight", (f, h)),
                (p + "mlp.down_proj.weight", (h, f)),
                (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,)),
            ]
        if last:
            shapes += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return shapes

    @classmethod
    def from_hf_config(cls, d: dict, position: str | None = None) -> "ModelDims":
        """From a Baichuan `config.json` dict. ALiBi configs (13B) carry `model_max_length` but no
        `max_position_embeddings` (DESIGN.md); pass `position` to override the guess."""
        try:
            dims = {
                "n_layers": int(d["num_hidden_layers"]),
                "hidden": int(d["hidden_size"]),
                "ffn": int(d["intermediate_size"]),
                "heads": int(d["num_attention_heads"]),
                "vocab": int(d["vocab_size"]),
            }
        except KeyError as e:
            raise ConfigError(f"model config.json lacks {e.args[0]!r}") from None
        if position is None:
            alibi = "max_position_embeddings" not in d and "model_max_length" in d
            position = "alibi" if alibi else "rope"
        return cls(**dims, position=position)

    @classmethod
    def by_name(cls, name: str) -> "ModelDims":
        return by_name(name)


KNOWN: dict[str, ModelDims] = {
    "baichuan-7b": ModelDims(n_layers=32, hidden=4096, ffn=11008, heads=32, vocab=64000, position="rope"),
    "baichuan-13b": ModelDims(n_layers=40, hidden=5120, ffn=13696, heads=40, vocab=64000, position="alibi"),
    "baichuan2-7b": ModelDims(n_layers=32, hidden=4096, ffn=11008, heads=32, vocab=125696, position="rope"),
    "baichuan2-13b": ModelDims(n_layers=40, hidden=5120, ffn=13696, heads=40, vocab=125696, position="alibi"),
}

_HUB_NAME = re.compile(r"baichuan(2?)-(7|13)b")


def by_name(name: str) -> ModelDims:
    """Map a hub id or local path ("baichuan-inc/Baichuan2-13B-Base", "Baichuan-13B-Chat",
    "/models/baichuan2-7b-chat") to the published dimensions, case-insensitively."""
    base = name.rstrip("/").rsplit("/", 1)[-1].lower()
    match = _HUB_NAME.search(base)
    if not match:
        raise ConfigError(
            f"unknown model {name!r}: the planner knows {', '.join(KNOWN)} (any hub name that "
            "contains one of them); give the model's config.json for anything else"
        )
    return KNOWN[f"baichuan{match.group(1)}-{match.group(2)}b"]


# --------------------------------------------------------------------------------------
# The cluster
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GpuType:
    """Defaults for one accelerator type. Bandwidths are *achievable* bus bandwidths (≈ 80 % of
    line rate, what nccl-tests report as busbw), not the datasheet's bidirectional totals."""

    mem_bytes: int
    peak_flops: float  # dense bf16 (fp32 for "cpu")
    intra_bw_bytes_s: float  # per GPU, within a node
    inter_bw_bytes_s: float  # per node, all its NICs together
    overhead_bytes: int  # CUDA context, cuBLAS workspaces, NCCL buffers


_NVLINK4 = 0.8 * 450 * GB  # H100/H200 NVLink 4: 900 GB/s both ways = 450 GB/s each way
_NVLINK3 = 0.8 * 300 * GB  # A100 NVLink 3: 600 GB/s both ways
_PCIE = 12 * GB  # PCIe 4.0 ×16 boxes, GPUs sharing host bridges (no NVLink)
_HGX_400G = 0.8 * 8 * (400 / 8) * GB  # HGX reference design: 8 NICs × 400 Gb/s (50 GB/s) per node
_HGX_200G = 0.8 * 8 * (200 / 8) * GB  # DGX A100: 8 NICs × 200 Gb/s HDR per node
_ETH_100G = 0.8 * (100 / 8) * GB  # one 100 GbE NIC per node (typical for 24 GB-class boxes)
_ETH_10G = 0.8 * (10 / 8) * GB  # plain 10 GbE between CPU hosts

GPU_DEFAULTS: dict[str, GpuType] = {
    "H100": GpuType(80 * GiB, 989e12, _NVLINK4, _HGX_400G, 2 * GiB),
    "H200": GpuType(141 * GiB, 989e12, _NVLINK4, _HGX_400G, 2 * GiB),
    "A100-80GB": GpuType(80 * GiB, 312e12, _NVLINK3, _HGX_200G, 2 * GiB),
    "A100-40GB": GpuType(40 * GiB, 312e12, _NVLINK3, _HGX_200G, 2 * GiB),
    "A10": GpuType(24 * GiB, 125e12, _PCIE, _ETH_100G, 2 * GiB),
    "RTX4090": GpuType(24 * GiB, 165e12, _PCIE, _ETH_100G, 2 * GiB),
    "L4": GpuType(24 * GiB, 121e12, _PCIE, _ETH_100G, 2 * GiB),
    # One process per core group; memory is the host RAM share (filled in by from_gpu_type).
    "cpu": GpuType(16 * GiB, 0.1e12, 2 * GB, _ETH_10G, GiB // 2),
}


def _gpu_key(name: str) -> str:
    """Accept nvidia-smi and marketing spellings: "NVIDIA H100 80GB HBM3", "a100-sxm4-40gb"."""
    n = re.sub(r"[^a-z0-9]", "", name.lower()).removeprefix("nvidia").removeprefix("geforce")
    if n.startswith("h100"):
        return "H100"
    if n.startswith("h200"):
        return "H200"
    if n.startswith("a100"):
        return "A100-40GB" if "40g" in n else "A100-80GB"
    aliases = {"a10": "A10", "a1024gb": "A10", "l4": "L4", "l424gb": "L4", "rtx4090": "RTX4090",
               "4090": "RTX4090", "cpu": "cpu"}
    if n in aliases:
        return aliases[n]
    raise ConfigError(f"unknown GPU type {name!r}; known: {', '.join(GPU_DEFAULTS)} "
                      "(or give memory, FLOP/s and bandwidths explicitly)")


def _host_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return GPU_DEFAULTS["cpu"].mem_bytes


@dataclass(frozen=True)
class ClusterSpec:
    """`nnodes` identical nodes of `gpus_per_node` accelerators (processes, for "cpu")."""

    nnodes: int
    gpus_per_node: int
    gpu_name: str
    gpu_mem_bytes: int
    peak_flops: float  # dense bf16 FLOP/s per GPU
    intra_bw_bytes_s: float  # per GPU, inside a node (NVLink / PCIe bus bandwidth)
    inter_bw_bytes_s: float  # per node, all its NICs together
    overhead_bytes: int = 2 * GiB  # per process, outside the PyTorch tensors we count

    def __post_init__(self) -> None:
        if self.nnodes < 1 or self.gpus_per_node < 1:
            raise ValueError(f"need at least 1 node × 1 GPU, got {self.nnodes} × {self.gpus_per_node}")
        for name in ("gpu_mem_bytes", "peak_flops", "intra_bw_bytes_s", "inter_bw_bytes_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ClusterSpec.{name} must be positive")

    @property
    def world_size(self) -> int:
        return self.nnodes * self.gpus_per_node

    def node_of(self, rank: int) -> int:
        return rank // self.gpus_per_node

    def describe(self) -> str:
        return f"{self.nnodes} × {self.gpus_per_node} × {self.gpu_name} ({_gib(self.gpu_mem_bytes)})"

    @classmethod
    def from_gpu_type(cls, name: str, nnodes: int = 1, gpus_per_node: int = 8, *,
                      gpu_mem_bytes: int | None = None, peak_flops: float | None = None,
                      intra_bw_bytes_s: float | None = None, inter_bw_bytes_s: float | None = None,
                      overhead_bytes: int | None = None) -> "ClusterSpec":
        """A cluster of `name` GPUs with GPU_DEFAULTS, any of which can be overridden. For "cpu"
        the memory per process defaults to this host's RAM divided by the processes per node."""
        key = _gpu_key(name)
        t = GPU_DEFAULTS[key]
        mem = t.mem_bytes if key != "cpu" else _host_memory_bytes() // gpus_per_node
        return cls(
            nnodes=nnodes,
            gpus_per_node=gpus_per_node,
            gpu_name=key,
            gpu_mem_bytes=gpu_mem_bytes or mem,
            peak_flops=peak_flops or t.peak_flops,
            intra_bw_bytes_s=intra_bw_bytes_s or t.intra_bw_bytes_s,
            inter_bw_bytes_s=inter_bw_bytes_s or t.inter_bw_bytes_s,
            overhead_bytes=t.overhead_bytes if overhead_bytes is None else overhead_bytes,
        )


# --------------------------------------------------------------------------------------
# The batch
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    """One optimizer step: every rank (every pipeline, for pipeline layouts) sees `micro_batch`
    sequences of `seq_len` tokens, `grad_accum` times. The global batch is therefore
    micro_batch × grad_accum × world_size sequences for every candidate, so step times compare
    like with like; a pipeline gets pp × grad_accum micro-batches unless `pp_microbatches` says
    otherwise."""

    seq_len: int
    micro_batch: int = 1
    grad_accum: int = 1
    mixed_precision: bool = True  # bf16 compute with fp32 master weights; False = pure fp32 (CPU)
    pp_microbatches: int | None = None
    pp_schedule: str = "1f1b"  # or "gpipe"

    def __post_init__(self) -> None:
        for name in ("seq_len", "micro_batch", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"Workload.{name} must be ≥ 1, got {getattr(self, name)}")
        if self.pp_microbatches is not None and self.pp_microbatches < 1:
            raise ValueError("Workload.pp_microbatches must be ≥ 1")
        if self.pp_schedule not in ("1f1b", "gpipe"):
            raise ValueError(f"pp_schedule must be '1f1b' or 'gpipe', got {self.pp_schedule!r}")

    @property
    def act_bytes(self) -> int:
        """Bytes of one activation / compute-dtype element (bf16 2, fp32 4)."""
        return 2 if self.mixed_precision else 4

    def state_bytes(self) -> tuple[int, int, int]:
        """(weights, grads, optimizer) bytes per parameter for AdamW: ZeRO's 2 + 2 + 12 in mixed
        precision (fp32 master, m, v); 4 + 4 + 8 in fp32. Both are 16."""
        return (2, 2, 12) if self.mixed_precision else (4, 4, 8)


# --------------------------------------------------------------------------------------
# How the model is cut
# --------------------------------------------------------------------------------------
def _stage_cost_units(model: ModelDims) -> tuple[int, int, int]:
    """Balance weights (first-stage extra, per layer, last-stage extra): parameters (memory) plus
    matmul FLOPs per token / 6 (time). The embedding is a lookup: memory, no FLOPs."""
    layer = 2 * model.layer_params
    return model.embed_params, layer, 2 * model.vocab * model.hidden + model.hidden


def split_layers(model: ModelDims, pp: int) -> list[range]:
    """Contiguous, non-empty layer ranges for `pp` pipeline stages, minimising the heaviest stage
    (then the spread) of params + FLOPs, counting the embedding on the first stage and the norm
    + head on the last. The training code cuts the model with this same function."""
    if not 1 <= pp <= model.n_layers:
        raise ValueError(f"pipeline degree {pp} must be between 1 and n_layers={model.n_layers}")
    counts = _stage_layer_counts(model, pp)
    starts = [sum(counts[:i]) for i in range(pp)]
    return [range(s, s + n) for s, n in zip(starts, counts)]


@lru_cache(maxsize=256)
def _stage_layer_counts(model: ModelDims, pp: int) -> tuple[int, ...]:
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
            for n in range(1, model.n_layers - j - stages_after + 1):
                c = cost(stage, n)
                key = (max(worst, c), squares + c * c)
                if j + n not in nxt or key < nxt[j + n][0]:
                    nxt[j + n] = (key, counts + (n,))
        best = nxt
    return best[model.n_layers][1]


def _stage_shapes(model: ModelDims, pp: int, stage: int) -> list[tuple[str, tuple[int, ...]]]:
    layers = split_layers(model, pp)[stage]
    return model.param_shapes(layers, first=stage == 0, last=stage == pp - 1)


def _sharded_elems(shapes: list[tuple[str, tuple[int, ...]]], shard: int) -> int:
    """Elements one rank holds when each tensor's dim 0 is padded to a multiple of `shard` and
    split (FSDP2): exact for rank 0, an upper bound for the others."""
    total = 0
    for _, shape in shapes:
        rest = math.prod(shape[1:])
        total += -(-shape[0] // shard) * rest
    return total


_DEGREE_KEYS = {
    "ddp": {"dp"}, "fsdp": {"shard"}, "hsdp": {"replicate", "shard"}, "pipeline": {"pp"},
    "pipeline+ddp": {"pp", "dp"}, "pipeline+fsdp": {"pp", "shard"},
}


def _check_degrees(strategy: str, degrees: dict[str, int]) -> None:
    if strategy not in _DEGREE_KEYS:
        raise ValueError(f"unknown strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    if set(degrees) != _DEGREE_KEYS[strategy] or any(v < 1 for v in degrees.values()):
        raise ValueError(f"{strategy} takes degrees {sorted(_DEGREE_KEYS[strategy])}, got {degrees}")


def state_bytes_per_rank(model: ModelDims, strategy: str, degrees: dict[str, int],
                         rank_stage: int | None = None, param_bytes: int = 4,
                         grad_bytes: int = 4, optim_bytes: int = 8) -> int:
    """Parameters + gradients + optimizer state held by one rank (defaults: fp32 AdamW, as on
    CPU). FSDP/HSDP shard every tensor over `degrees["shard"]` with dim-0 padding; a pipeline
    rank holds its stage (`rank_stage`; None = the heaviest stage), sharded for pipeline+fsdp."""
    _check_degrees(strategy, degrees)
    per_elem = param_bytes + grad_bytes + optim_bytes
    shard = degrees.get("shard", 1)
    pp = degrees.get("pp", 1)
    if pp == 1:
        return per_elem * _sharded_elems(model.param_shapes(), shard)
    stages = range(pp) if rank_stage is None else [rank_stage]
    return per_elem * max(_sharded_elems(_stage_shapes(model, pp, s), shard) for s in stages)


# --------------------------------------------------------------------------------------
# Memory model
# --------------------------------------------------------------------------------------
def layer_activation_bytes(model: ModelDims, tokens: int, act_bytes: int = 2) -> int:
    """Bytes one decoder layer keeps for backward without recomputation (Korthikanti et al. 2022's
    count, redone for this layer: fused SDPA, RMSNorm in fp32, SwiGLU, no dropout):

      2 RMSNorms:  fp32 up-cast input (4h) + normalised output (e·h)      each
      attention:   W_pack input (e·h) + q,k,v (3e·h) + kernel output (e·h)  [+ rotated q,k 2e·h]
      MLP:         gate/up input (e·h) + gate, silu, up, product (4e·ffn)
    """
    h, e = model.hidden, act_bytes
    per_token = 8 * h + e * (8 * h + 4 * model.ffn)
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


def activation_bytes(model: ModelDims, layers: range, recompute: str, micro_batch: int,
                     seq_len: int, act_bytes: int = 2, in_flight: int = 1) -> int:
    """Activations of `layers` for `in_flight` micro-batches. A recomputed layer keeps only its
    input (e·s·b·h); while it is recomputed in backward one layer's full set lives once more."""
    tokens = micro_batch * seq_len
    full_layer = layer_activation_bytes(model, tokens, act_bytes)
    n_ckpt = checkpointed_layers(layers, recompute)
    kept = n_ckpt * act_bytes * tokens * model.hidden + (len(layers) - n_ckpt) * full_layer
    # ALiBi's additive mask [b, heads, s, s] is built once per forward and shared by the layers.
    mask = micro_batch * model.heads * seq_len * seq_len * act_bytes if model.position == "alibi" else 0
    return in_flight * (kept + mask) + (full_layer if n_ckpt else 0)


def logits_bytes(model: ModelDims, micro_batch: int, seq_len: int, act_bytes: int = 2) -> int:
    """Peak of the loss over s·b·V: the logits (e bytes), their fp32 copy's log-softmax kept for
    backward (4), and the fp32 gradients in and out of log-softmax during backward (4 + 4)."""
    return micro_batch * seq_len * model.vocab * (act_bytes + 12)


# --------------------------------------------------------------------------------------
# Time model
# --------------------------------------------------------------------------------------
def bubble_fraction(pp: int, microbatches: int) -> float:
    """Idle share of a GPipe/1F1B step: (p − 1) / (m + p − 1) (Huang et al. 2019; Narayanan et
    al. 2021)."""
    return (pp - 1) / (microbatches + pp - 1)


def layer_flops_per_token(model: ModelDims, seq_len: int) -> float:
    """Forward + backward matmul FLOPs of one layer for one token: 6 × its params + 12·h·s for
    attention scores (PaLM, appendix B)."""
    return 6 * model.layer_params + 12 * model.hidden * seq_len


def flops_per_token(model: ModelDims, seq_len: int) -> float:
    """6·N + 12·L·h·s with N excluding the input embedding (a lookup, no matmul)."""
    return model.n_layers * layer_flops_per_token(model, seq_len) + 6 * model.head_params


def _stage_flops_per_token(model: ModelDims, layers: range, last: bool, seq_len: int,
                           recompute: str) -> float:
    """Executed FLOPs per token on a stage: recomputed layers run their forward (1/3) twice."""
    per_layer = layer_flops_per_token(model, seq_len)
    flops = len(layers) * per_layer + checkpointed_layers(layers, recompute) * per_layer / 3
    return flops + (6 * model.head_params if last else 0)


def _ring_factor(kind: str, n: int) -> float:
    """Bytes each rank moves per byte of the full tensor: all-reduce 2(n−1)/n, all-gather and
    reduce-scatter (n−1)/n (ring algorithms, as NCCL's bus bandwidth is defined); a
    point-to-point send moves the tensor once."""
    if kind == "p2p":
        return 1.0
    return (2 if kind == "all_reduce" else 1) * (n - 1) / n


@dataclass(frozen=True)
class _GroupSet:
    """Process groups that communicate at the same time, reduced to what costs time."""

    size: int  # ranks per group
    crossing: int  # the most groups that leave any one node (they share its NICs)


def _group_set(groups: list[list[int]], cluster: ClusterSpec) -> _GroupSet:
    per_node = [0] * cluster.nnodes
    for group in groups:
        nodes = {cluster.node_of(r) for r in group}
        if len(nodes) > 1:
            for node in nodes:
                per_node[node] += 1
    return _GroupSet(size=len(groups[0]), crossing=max(per_node))


def _seconds(kind: str, nbytes: float, gs: _GroupSet, cluster: ClusterSpec) -> float:
    if gs.size == 1:
        return 0.0
    traffic = _ring_factor(kind, gs.size) * nbytes
    seconds = traffic / cluster.intra_bw_bytes_s
    if gs.crossing:
        seconds = max(seconds, traffic * gs.crossing / cluster.inter_bw_bytes_s)
    return seconds


def collective_seconds(kind: str, nbytes: float, groups: list[list[int]],
                       cluster: ClusterSpec) -> float:
    """Time of one collective ("all_reduce", "all_gather", "reduce_scatter", "p2p") on a tensor
    of `nbytes`, run by all `groups` at once. Within a node each rank drives its own NVLink/PCIe
    share; a group that spans nodes passes its ring traffic through each node's NICs once,
    shared with the other groups crossing the same node."""
    return _seconds(kind, nbytes, _group_set(groups, cluster), cluster)


def exposed_seconds(comm: float, window: float) -> float:
    """Communication left on the critical path when it can hide behind `window` seconds of
    compute: what does not fit in the window, plus NON_OVERLAPPED of what does."""
    hidden = min(comm, window)
    return comm - hidden + NON_OVERLAPPED * hidden


# --------------------------------------------------------------------------------------
# Candidates
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Candidate:
    strategy: str
    degrees: dict[str, int]
    recompute: str
    memory: dict[str, int]  # params, grads, optimizer, unsharded, activations, logits, overhead, total
    step_time: dict[str, float]  # compute, bubble, comm (exposed), comm_total, total
    fits: bool
    tokens_per_step: int
    verdict: str = ""
    microbatches: int | None = None  # pipeline only
    stages: tuple[range, ...] = ()  # pipeline only
    worst_stage: int | None = None  # pipeline only: the stage whose memory is reported

    @property
    def step_time_s(self) -> float:
        return self.step_time["total"]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_time_s

    @property
    def family(self) -> str:
        return self.strategy.split("+")[0]

    @property
    def layout(self) -> str:
        return f"{self.strategy}({', '.join(f'{k}={v}' for k, v in self.degrees.items())})"

    @property
    def label(self) -> str:
        return self.layout + ("" if self.recompute == "none" else f" + {self.recompute} recompute")


@dataclass(frozen=True)
class Decision:
    """The ranked candidates (chosen first, then the others that fit by speed, then the rest by
    memory), the choice, and the explanation. When nothing fits, `smallest_cluster` is the
    fewest nodes of the same kind on which something does."""

    candidates: list[Candidate]
    chosen: Candidate | None
    reason: str
    budget_bytes: int
    smallest_cluster_hint: str = ""
    smallest_cluster: ClusterSpec | None = None
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Layout:
    strategy: str
    degrees: dict[str, int]
    shard: int  # FSDP shard degree (1 = unsharded)
    pp: int = 1
    microbatches: int = 1
    pp_micro_batch: int = 1  # sequences per pipeline micro-batch


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _layouts(model: ModelDims, cluster: ClusterSpec, work: Workload,
             notes: list[str]) -> list[_Layout]:
    world, g = cluster.world_size, cluster.gpus_per_node
    out = [_Layout("ddp", {"dp": world}, shard=1)]
    if world > 1:
        out.append(_Layout("fsdp", {"shard": world}, shard=world))
    if cluster.nnodes > 1 and g > 1:
        out.append(_Layout("hsdp", {"replicate": cluster.nnodes, "shard": g}, shard=g))
    for pp in _divisors(world):
        if not 2 <= pp <= model.n_layers:
            continue
        dp = world // pp
        per_pipeline = work.micro_batch * work.grad_accum * pp  # sequences, global batch kept
        m = work.pp_microbatches or pp * work.grad_accum
        if per_pipeline % m:
            notes.append(f"pp={pp} skipped: {per_pipeline} sequences per pipeline do not split "
                         f"into {m} micro-batches")
            continue
        common = dict(pp=pp, microbatches=m, pp_micro_batch=per_pipeline // m)
        if dp == 1:
            out.append(_Layout("pipeline", {"pp": pp}, shard=1, **common))
        else:
            out.append(_Layout("pipeline+ddp", {"pp": pp, "dp": dp}, shard=1, **common))
            out.append(_Layout("pipeline+fsdp", {"pp": pp, "shard": dp}, shard=dp, **common))
    return out


def _fsdp_units(model: ModelDims) -> list[int]:
    """Parameter counts of FSDP's wrapping units: embedding, each layer, norm + head."""
    return [model.embed_params] + [model.layer_params] * model.n_layers + [model.head_params]


def _memory(model: ModelDims, cluster: ClusterSpec, work: Workload, lay: _Layout,
            recompute: str) -> tuple[dict[str, int], int | None]:
    """Per-GPU bytes of the layout (for pipelines: its heaviest stage) and that stage."""
    e = work.act_bytes
    wb, gb, ob = work.state_bytes()
    if lay.pp == 1:
        stages = [(model.param_shapes(), range(model.n_layers), True, 1)]
        micro = work.micro_batch
    else:
        ranges = split_layers(model, lay.pp)
        stages = []
        for i, r in enumerate(ranges):
            # 1F1B: stage i has at most p − i forwards waiting for their backward; GPipe all m.
            in_flight = lay.microbatches if work.pp_schedule == "gpipe" else min(lay.pp - i, lay.microbatches)
            stages.append((_stage_shapes(model, lay.pp, i), r, i == lay.pp - 1, in_flight))
        micro = lay.pp_micro_batch

    best: tuple[dict[str, int], int | None] | None = None
    for index, (shapes, layers, last, in_flight) in enumerate(stages):
        elems = _sharded_elems(shapes, lay.shard)
        mem = {"params": wb * elems, "grads": gb * elems, "optimizer": ob * elems}
        mem["unsharded"] = _unsharded_bytes(model, lay, shapes, e)
        mem["activations"] = activation_bytes(model, layers, recompute, micro, work.seq_len, e, in_flight)
        mem["logits"] = _logit_sets(lay, work, last) * logits_bytes(model, micro, work.seq_len, e)
        mem["overhead"] = cluster.overhead_bytes
        mem["total"] = sum(mem.values())
        if best is None or mem["total"] > best[0]["total"]:
            best = (mem, index if lay.pp > 1 else None)
    assert best is not None
    return best


def _logit_sets(lay: _Layout, work: Workload, last: bool) -> int:
    """Micro-batches whose loss is alive at once on a stage. 1F1B's last stage runs each
    backward right after its forward; GPipe runs every forward first."""
    if not last:
        return 0
    return lay.microbatches if lay.pp > 1 and work.pp_schedule == "gpipe" else 1


def _unsharded_bytes(model: ModelDims, lay: _Layout, shapes, e: int) -> int:
    """Full-size copies FSDP materialises. Plain FSDP/HSDP: two units' params in flight (current +
    prefetched) and one unit's grads before reduce-scatter. Pipeline+FSDP keeps the whole stage
    unsharded (params and grads) across micro-batches, as torch.distributed.pipelining does."""
    if lay.shard == 1:
        return 0
    if lay.pp > 1:
        return 2 * e * sum(math.prod(shape) for _, shape in shapes)
    units = sorted(_fsdp_units(model), reverse=True)
    return e * (units[0] + units[1] + units[0])


@lru_cache(maxsize=256)
def _groups(cluster: ClusterSpec, strategy: str, pp: int) -> dict[str, _GroupSet]:
    """Rank groups, pipeline stages outermost (stage i = ranks [i·d, (i+1)·d)), so a stage's
    data-parallel group sits inside a node whenever it fits and stages span nodes."""
    world, g, n = cluster.world_size, cluster.gpus_per_node, cluster.nnodes
    if strategy == "hsdp":
        return {
            "shard": _group_set([[i * g + j for j in range(g)] for i in range(n)], cluster),
            "replicate": _group_set([[i * g + j for i in range(n)] for j in range(g)], cluster),
        }
    d = world // pp
    groups = {"dp": _group_set([[i * d + j for j in range(d)] for i in range(pp)], cluster)}
    if pp > 1:
        pairs = [[i * d + j, (i + 1) * d + j] for i in range(pp - 1) for j in range(d)]
        groups["p2p"] = _group_set(pairs, cluster)
    return groups


def _step_time(model: ModelDims, cluster: ClusterSpec, work: Workload, lay: _Layout,
               recompute: str, mfu: float) -> dict[str, float]:
    """Seconds per optimizer step: compute (at `mfu` of peak), the pipeline bubble, and the
    communication that compute cannot hide (`exposed_seconds`)."""
    rate = cluster.peak_flops * mfu
    e, s = work.act_bytes, work.seq_len
    groups = _groups(cluster, lay.strategy, lay.pp)
    if lay.pp == 1:
        per_token = _stage_flops_per_token(model, range(model.n_layers), True, s, recompute)
        per_micro = work.micro_batch * s * per_token / rate
        compute, bubble = work.grad_accum * per_micro, 0.0
        comm = _sharding_comm(model.n_params * e, lay, groups, cluster, work.grad_accum)
        # DDP accumulates under no_sync: its one all-reduce overlaps only the last backward
        # (2/3 of a micro-batch). FSDP's gathers and reduce-scatters run alongside every pass.
        window = per_micro * 2 / 3 if lay.strategy == "ddp" else compute
        exposed = exposed_seconds(comm, window)
    else:
        ranges = split_layers(model, lay.pp)
        per_micro = max(  # the slowest stage sets the pace of the whole pipeline
            lay.pp_micro_batch * s * _stage_flops_per_token(model, r, i == lay.pp - 1, s, recompute)
            for i, r in enumerate(ranges)
        ) / rate
        compute = lay.microbatches * per_micro
        bubble = (lay.pp - 1) * per_micro  # so bubble / (compute + bubble) = bubble_fraction
        stage_bytes = e * max(_stage_elems(model, lay.pp, i) for i in range(lay.pp))
        dp_comm = _sharding_comm(stage_bytes, lay, groups, cluster, 1)
        # Every schedule slot sends an activation forward and a gradient back; counted in full.
        p2p_bytes = lay.pp_micro_batch * s * model.hidden * e
        p2p = (lay.microbatches + lay.pp - 1) * 2 * _seconds("p2p", p2p_bytes, groups["p2p"], cluster)
        # The stage's gradient sync can only overlap its last backward (2/3 of a slot); FSDP's
        # gather and reduce-scatter get the first forward and the last backward (one slot).
        window = per_micro * (1 if lay.shard > 1 else 2 / 3)
        comm = dp_comm + p2p
        exposed = p2p + exposed_seconds(dp_comm, window)
    return {"compute": compute, "bubble": bubble, "comm": exposed, "comm_total": comm,
            "total": compute + bubble + exposed}


def _stage_elems(model: ModelDims, pp: int, stage: int) -> int:
    return sum(math.prod(shape) for _, shape in _stage_shapes(model, pp, stage))


def _sharding_comm(nbytes: float, lay: _Layout, groups: dict[str, _GroupSet],
                   cluster: ClusterSpec, grad_accum: int) -> float:
    """Seconds of gradient / parameter traffic per step for the data-parallel part of a layout.
    `nbytes` is the full (unsharded) model or stage in the compute dtype."""
    if lay.strategy in ("ddp", "pipeline", "pipeline+ddp"):
        return _seconds("all_reduce", nbytes, groups["dp"], cluster)
    if lay.strategy == "pipeline+fsdp":  # gathered once, reduce-scattered once per step
        return (_seconds("all_gather", nbytes, groups["dp"], cluster)
                + _seconds("reduce_scatter", nbytes, groups["dp"], cluster))
    shard_groups = groups["shard"] if lay.strategy == "hsdp" else groups["dp"]
    # Per micro-batch: all-gather in forward, again in backward, reduce-scatter the gradients.
    per_micro = (2 * _seconds("all_gather", nbytes, shard_groups, cluster)
                 + _seconds("reduce_scatter", nbytes, shard_groups, cluster))
    if lay.strategy == "hsdp":  # then each 1/shard slice is all-reduced across the replicas
        per_micro += _seconds("all_reduce", nbytes / lay.shard, groups["replicate"], cluster)
    return grad_accum * per_micro


def _candidate(model: ModelDims, cluster: ClusterSpec, work: Workload, lay: _Layout,
               recompute: str, budget: int, mfu: float) -> Candidate:
    memory, worst = _memory(model, cluster, work, lay, recompute)
    step = _step_time(model, cluster, work, lay, recompute, mfu)
    tokens = work.micro_batch * work.grad_accum * cluster.world_size * work.seq_len
    return Candidate(
        strategy=lay.strategy, degrees=dict(lay.degrees), recompute=recompute, memory=memory,
        step_time=step, fits=memory["total"] <= budget, tokens_per_step=tokens,
        microbatches=lay.microbatches if lay.pp > 1 else None,
        stages=tuple(split_layers(model, lay.pp)) if lay.pp > 1 else (),
        worst_stage=worst,
    )


def _allowed_strategies(allowed: Iterable[str] | None) -> set[str]:
    if allowed is None:
        return set(STRATEGIES)
    names = {allowed} if isinstance(allowed, str) else set(allowed)
    if "auto" in names:
        return set(STRATEGIES)
    unknown = names - set(STRATEGIES)
    if unknown:
        raise ConfigError(f"unknown parallel strategy {sorted(unknown)[0]!r}; known: "
                          f"{', '.join(FAMILIES)}, auto (or one of {', '.join(STRATEGIES[4:])})")
    # A family name ("pipeline") admits its combinations ("pipeline+ddp", "pipeline+fsdp").
    return {s for s in STRATEGIES if s in names or (s.split("+")[0] in names and "+" in s)}


def enumerate_candidates(model: ModelDims, cluster: ClusterSpec, work: Workload,
                         memory_budget: float = 0.9, allowed: Iterable[str] | None = None,
                         recompute: Iterable[str] = RECOMPUTE, mfu: float = DEFAULT_MFU,
                         notes: list[str] | None = None) -> list[Candidate]:
    """Every allowed layout × recomputation mode, with memory and step time, unranked."""
    strategies = _allowed_strategies(allowed)
    modes = list(recompute)
    if set(modes) - set(RECOMPUTE):
        raise ConfigError(f"recompute must be among {', '.join(RECOMPUTE)}, got {modes}")
    budget = int(memory_budget * cluster.gpu_mem_bytes)
    notes = [] if notes is None else notes
    return [
        _candidate(model, cluster, work, lay, mode, budget, mfu)
        for lay in _layouts(model, cluster, work, notes) if lay.strategy in strategies
        for mode in modes
    ]


def plan_parallel(model: ModelDims, cluster: ClusterSpec, work: Workload,
                  memory_budget: float = 0.9, allowed: Iterable[str] | None = None, *,
                  recompute: Iterable[str] = RECOMPUTE, mfu: float = DEFAULT_MFU,
                  hint: bool = True) -> Decision:
    """Choose the fastest predicted candidate that fits in `memory_budget` × GPU memory; ties
    (within TIE_MARGIN) go to the simpler layout, then to less recomputation.

    `allowed` restricts the strategies (a family name such as "pipeline" admits its
    combinations; None or "auto" admits all); `recompute` the recomputation modes. With `hint`,
    a plan where nothing fits also searches for the smallest cluster where something does."""
    if not 0 < memory_budget <= 1:
        raise ValueError(f"memory_budget is a fraction of GPU memory, got {memory_budget}")
    notes: list[str] = []
    candidates = enumerate_candidates(model, cluster, work, memory_budget, allowed, recompute, mfu, notes)
    budget = int(memory_budget * cluster.gpu_mem_bytes)
    if not candidates:
        raise ConfigError(
            f"no {'/'.join(sorted(_allowed_strategies(allowed)))} layout exists on "
            f"{cluster.describe()}: fsdp needs ≥ 2 GPUs, hsdp ≥ 2 nodes of ≥ 2 GPUs, a pipeline "
            f"2 to {model.n_layers} stages dividing the {cluster.world_size} GPUs"
        )
    candidates = _with_verdicts(candidates, _choose(candidates), budget)
    chosen = next((c for c in candidates if c.verdict.startswith("chosen")), None)
    if chosen is not None:
        return Decision(candidates, chosen, _reason(candidates, chosen, budget), budget, notes=notes)

    leanest = _leanest(candidates)
    reason = (f"Nothing fits in {_gib(budget)} per GPU on {cluster.describe()}: the leanest "
              f"candidate, {leanest.label}, needs {_gib(leanest.memory['total'])}.")
    if not hint:
        return Decision(candidates, None, reason, budget, notes=notes)
    small_hint, small = smallest_cluster(model, cluster, work, memory_budget, allowed, recompute, mfu)
    return Decision(candidates, None, f"{reason} {small_hint}", budget, small_hint, small, notes)


def _choose(candidates: list[Candidate]) -> Candidate | None:
    fitting = [c for c in candidates if c.fits]
    if not fitting:
        return None
    fastest = min(c.step_time_s for c in fitting)
    ties = [c for c in fitting if c.step_time_s <= fastest * (1 + TIE_MARGIN)]
    return min(ties, key=lambda c: (_COMPLEXITY[c.strategy], RECOMPUTE.index(c.recompute), c.step_time_s))


def _leanest(candidates: list[Candidate]) -> Candidate:
    return min(candidates, key=lambda c: c.memory["total"])


def _with_verdicts(candidates: list[Candidate], chosen: Candidate | None,
                   budget: int) -> list[Candidate]:
    out = []
    for c in candidates:
        if c is chosen:
            fastest = min(x.step_time_s for x in candidates if x.fits)
            why = ("fastest that fits" if c.step_time_s <= fastest
                   else f"simplest within {TIE_MARGIN:.0%} of the fastest")
            verdict = f"chosen: {why}"
        elif not c.fits:
            verdict = f"does not fit: needs {_gib(c.memory['total'], budget)} > {_gib(budget)} budget"
        elif c.step_time_s >= chosen.step_time_s * 1.005:
            verdict = f"fits; slower than {chosen.label} by {c.step_time_s / chosen.step_time_s:.2f}×"
        else:
            verdict = "fits; " + _tie_note(c, chosen)
        out.append(replace(c, verdict=verdict))
    return sorted(out, key=lambda c: (not c.verdict.startswith("chosen"), not c.fits,
                                      c.step_time_s if c.fits else c.memory["total"]))


def _tie_note(c: Candidate, chosen: Candidate) -> str:
    speed = ("as fast as" if c.step_time_s >= chosen.step_time_s
             else f"{chosen.step_time_s / c.step_time_s - 1:.0%} faster than")
    if _COMPLEXITY[c.strategy] > _COMPLEXITY[chosen.strategy]:
        why = f"the simpler {chosen.strategy} wins"
    elif RECOMPUTE.index(c.recompute) > RECOMPUTE.index(chosen.recompute):
        why = "less recomputation wins"
    else:
        why = "the faster one wins"
    return f"predicted {speed} the chosen one, within the {TIE_MARGIN:.0%} tie margin where {why}"


def _reason(candidates: list[Candidate], chosen: Candidate, budget: int) -> str:
    """Why the chosen one, and for each other strategy why its best candidate lost."""
    n_fit = sum(c.fits for c in candidates)
    parts = [
        f"{chosen.label}: fits ({_gib(chosen.memory['total'])} of {_gib(budget)} per GPU), "
        f"predicted {chosen.step_time_s:.3g} s per step ({chosen.tokens_per_s:,.0f} tokens/s): "
        f"the {chosen.verdict.removeprefix('chosen: ')} ({n_fit} of {len(candidates)} candidates "
        "fit)."
    ]
    lighter = [c for c in candidates if c.layout == chosen.layout and not c.fits
               and RECOMPUTE.index(c.recompute) < RECOMPUTE.index(chosen.recompute)]
    if lighter:
        c = max(lighter, key=lambda x: RECOMPUTE.index(x.recompute))
        parts.append(f"With {c.recompute} recompute it would need "
                     f"{_gib(c.memory['total'], budget)} > {_gib(budget)}.")
    for strategy in STRATEGIES:
        mine = [c for c in candidates if c.strategy == strategy]
        if strategy == chosen.strategy or not mine:
            continue
        fitting = [c for c in mine if c.fits]
        if fitting:
            best = min(fitting, key=lambda c: c.step_time_s)
            parts.append(f"{best.label}: {best.verdict.removeprefix('fits; ')}.")
        else:
            best = _leanest(mine)
            parts.append(f"{strategy}: does not fit even as {best.label} — {_why_too_big(best, budget)}.")
    return " ".join(parts)


def _why_too_big(c: Candidate, budget: int) -> str:
    state = c.memory["params"] + c.memory["grads"] + c.memory["optimizer"]
    if state > budget:
        return (f"parameters, gradients and AdamW state alone take {_gib(state)} per GPU "
                f"> {_gib(budget)}")
    rest = c.memory["total"] - state
    return (f"needs {_gib(c.memory['total'])} > {_gib(budget)} ({_gib(state)} model state + "
            f"{_gib(rest)} activations, logits, gathered parameters and overhead)")


# --------------------------------------------------------------------------------------
# When nothing fits
# --------------------------------------------------------------------------------------
MAX_HINT_NODES = 1024


def smallest_cluster(model: ModelDims, cluster: ClusterSpec, work: Workload,
                     memory_budget: float = 0.9, allowed: Iterable[str] | None = None,
                     recompute: Iterable[str] = RECOMPUTE,
                     mfu: float = DEFAULT_MFU) -> tuple[str, ClusterSpec | None]:
    """The fewest nodes of the same kind on which some candidate fits, and a sentence saying so.

    Per-GPU activations do not shrink with more GPUs, so first check whether any node count can
    help at all. Then double the node count until something fits and bisect back (memory per
    GPU falls as nodes are added; the answer is always re-checked to fit)."""
    modes = list(recompute)
    budget = int(memory_budget * cluster.gpu_mem_bytes)
    leanest_mode = max(modes, key=RECOMPUTE.index)
    floor = (activation_bytes(model, range(model.n_layers), leanest_mode, work.micro_batch,
                              work.seq_len, work.act_bytes)
             + logits_bytes(model, work.micro_batch, work.seq_len, work.act_bytes)
             + cluster.overhead_bytes)
    if floor > budget and work.pp_microbatches is None:
        return (f"No number of {cluster.gpu_name} nodes helps: activations and logits of "
                f"micro_batch {work.micro_batch} × seq_len {work.seq_len} alone need {_gib(floor)} "
                f"> {_gib(budget)} per GPU; lower the micro-batch or the sequence length.", None)

    def best_at(nnodes: int) -> Candidate | None:
        bigger = replace(cluster, nnodes=nnodes)
        return _choose(enumerate_candidates(model, bigger, work, memory_budget, allowed, modes, mfu))

    low, high = cluster.nnodes, cluster.nnodes + 1  # low does not fit
    while best_at(high) is None:
        if high >= MAX_HINT_NODES:
            return (f"Even {high} nodes of {cluster.gpus_per_node} × {cluster.gpu_name} are not "
                    "enough.", None)
        low, high = high, min(2 * high, MAX_HINT_NODES)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if best_at(mid) is not None else (mid, high)
    pick = best_at(high)
    assert pick is not None
    return (f"Needs at least {high} nodes × {cluster.gpus_per_node} × {cluster.gpu_name} "
            f"({_gib(cluster.gpu_mem_bytes)}): there {pick.label} fits in "
            f"{_gib(pick.memory['total'])} per GPU.", replace(cluster, nnodes=high))


# --------------------------------------------------------------------------------------
# Presentation
# --------------------------------------------------------------------------------------
TABLE_COLUMNS = ("strategy", "degrees", "recompute", "memory/GPU", "fits", "step (s)", "tokens/s", "verdict")


def _gib(nbytes: float, other: float | None = None) -> str:
    """GiB with one decimal — more when needed to tell `nbytes` apart from `other`."""
    digits = 1
    while other is not None and digits < 4 and round(nbytes / GiB, digits) == round(other / GiB, digits):
        digits += 1
    return f"{nbytes / GiB:.{digits}f} GiB"


def format_decision(decision: Decision, all_candidates: bool = False) -> list[tuple[str, ...]]:
    """Rows for TABLE_COLUMNS. By default one row per layout: the chosen recomputation mode, the
    least recomputation that fits, or — when none fits — the leanest mode."""
    rows = []
    seen: set[str] = set()
    for c in decision.candidates:  # already ordered: chosen, fitting by speed, the rest by memory
        if not all_candidates:
            if c.layout in seen:
                continue
            same = [x for x in decision.candidates if x.layout == c.layout]
            fitting = [x for x in same if x.fits]
            c = (next((x for x in same if x is decision.chosen), None)
                 or (min(fitting, key=lambda x: RECOMPUTE.index(x.recompute)) if fitting else _leanest(same)))
            seen.add(c.layout)
        rows.append((
            c.strategy,
            " ".join(f"{k}={v}" for k, v in c.degrees.items()),
            c.recompute,
            _gib(c.memory["total"]),
            "yes" if c.fits else "no",
            f"{c.step_time_s:.3g}",
            f"{c.tokens_per_s:,.0f}",
            c.verdict,
        ))
    return rows


def decision_to_dict(decision: Decision) -> dict:
    """JSON-ready form for `mlaunch plan --json`."""
    def cand(c: Candidate) -> dict:
        return {
            "strategy": c.strategy, "degrees": c.degrees, "recompute": c.recompute,
            "memory_bytes": c.memory, "step_time_s": c.step_time, "fits": c.fits,
            "tokens_per_s": c.tokens_per_s, "verdict": c.verdict,
            "microbatches": c.microbatches,
            "stages": [[r.start, r.stop] for r in c.stages], "worst_stage": c.worst_stage,
        }
    return {
        "strategy": decision.chosen.strategy if decision.chosen else None,
        "chosen": cand(decision.chosen) if decision.chosen else None,
        "reason": decision.reason,
        "budget_bytes": decision.budget_bytes,
        "smallest_cluster_hint": decision.smallest_cluster_hint,
        "notes": decision.notes,
        "candidates": [cand(c) for c in decision.candidates],
    }


def render_table(decision: Decision, all_candidates: bool = False):
    """A rich Table of the candidates (rich is imported only here)."""
    from rich.table import Table

    table = Table(title="parallel plan", caption=decision.reason)
    for name in TABLE_COLUMNS:
        table.add_column(name, justify="right" if name in ("memory/GPU", "step (s)", "tokens/s") else "left")
    for row in format_decision(decision, all_candidates):
        style = "bold green" if row[-1].startswith("chosen") else ("dim" if row[4] == "no" else None)
        table.add_row(*row, style=style)
    return table
