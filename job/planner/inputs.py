"""The planner's three inputs — the model (`BaichuanConfig`), the cluster (`ClusterSpec`), the batch
(`Workload`) — the strategies and recomputation modes it chooses between, and its units.

Pure Python (stdlib only, no torch). The model is `job.baichuan.BaichuanConfig`, the very spec the
torch model is built from: its shapes, parameter counts and FLOPs per token are defined there.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from job.errors import ConfigError


# --------------------------------------------------------------------------------------
# Units
# --------------------------------------------------------------------------------------
GiB = 1024**3
GB = 10**9


def gib(nbytes: float, other: float | None = None) -> str:
    """GiB with one decimal — more when needed to tell `nbytes` apart from `other`."""
    digits = 1
    while other is not None and digits < 4 and round(nbytes / GiB, digits) == round(other / GiB, digits):
        digits += 1
    return f"{nbytes / GiB:.{digits}f} GiB"


# --------------------------------------------------------------------------------------
# What is chosen between (each rule is explained in docs/planner.md)
# --------------------------------------------------------------------------------------
STRATEGIES = ("ddp", "fsdp", "hsdp", "pipeline", "pipeline+ddp", "pipeline+fsdp")
FAMILIES = ("ddp", "fsdp", "hsdp", "pipeline")
RECOMPUTE = ("none", "selective", "full")
# Simplicity ranks for tie-breaking: fewer moving parts first.
COMPLEXITY = {"ddp": 0, "fsdp": 1, "hsdp": 2, "pipeline": 3, "pipeline+ddp": 3, "pipeline+fsdp": 4}

TIE_MARGIN = 0.05
"""Predictions within 5 % of the fastest are a tie: the model is not more accurate than that, and
the simpler layout (then the one with less recomputation) is easier to run and debug."""


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
        return f"{self.nnodes} × {self.gpus_per_node} × {self.gpu_name} ({gib(self.gpu_mem_bytes)})"

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
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
"""Bytes per weight of a QLoRA layer (bitsandbytes NF4, blocks of 64, double quantisation):
4 bits, an 8-bit absmax per block, an fp32 constant per 256 blocks."""


@dataclass(frozen=True)
class Adapters:
    """`train.lora`: LoRA of rank `r` on `target_modules` (job.baichuan's linear names) over a
    frozen base; `quantize: 4bit` stores the decoder layers' linears in NF4 (QLoRA)."""

    r: int
    target_modules: tuple[str, ...] = ("W_pack", "o_proj", "gate_proj", "up_proj", "down_proj")
    quantize: str = "none"


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
    lora: Adapters | None = None  # None = full fine-tuning
    loss_chunk_tokens: int = 0  # `train.loss_chunk_tokens`: the loss chunk by chunk; 0 = full logits

    def __post_init__(self) -> None:
        if self.loss_chunk_tokens < 0:
            raise ValueError(f"Workload.loss_chunk_tokens must be ≥ 0, got {self.loss_chunk_tokens}")
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

