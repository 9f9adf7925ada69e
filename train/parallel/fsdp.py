"""Fully sharded data parallel (FSDP2 `fully_shard`), and HSDP on a 2-D mesh.

Every rank holds 1/shard of each parameter, of its gradient and of the AdamW moments (ZeRO-3).
The units, each all-gathered in one collective before use and freed after, are the model's own
(`ModelParallelism.fsdp_units`: for Baichuan every decoder layer, the embedding, and the final
norm together with the head). The root unit owns nothing left over but drives the prefetching and
the end-of-backward synchronisation.

HSDP is the same call on the ("dp_replicate", "dp_shard") mesh: `fully_shard` shards over the
second dimension (the GPUs of a node, fast links) and replicates over the first (across nodes),
so the slow inter-node links carry one all-reduce of a 1/shard gradient slice per step.

`python -m train` hands over a model built on the meta device (`train.build.build_model`): it is
sharded first and only then given storage (`materialize`), so a rank allocates its shards and never
the full fp32 model; the loop then fills them (`train.build.fill_weights`). A complete model (the
tests' references, a world of 1) is sharded from its real values as before.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from job.layout import Layout
from train.parallel.base import ModelParallelism, Parallelized

if TYPE_CHECKING:
    from job.config import TrainConfig


def mixed_precision_policy(device: torch.device, mixed_precision: str) -> MixedPrecisionPolicy | None:
    """bf16 compute with fp32 gradient reduction on GPU (`auto`/`bf16`); None (fp32) on CPU, where
    bf16 matmuls are slow and the tests compare fp32 runs. The sharded fp32 parameters stay the
    optimizer's master weights either way."""
    if device.type != "cuda" or mixed_precision == "fp32":
        return None
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def offload_policy(device: torch.device, cpu_offload: bool) -> OffloadPolicy:
    """`CPUOffloadPolicy` when asked for on GPU. On CPU the parameters already live in host memory:
    the setting does nothing, which is said once rather than silently ignored."""
    if not cpu_offload:
        return OffloadPolicy()
    if device.type != "cuda":
        from train.distributed import is_rank0

        if is_rank0():
            warnings.warn("train.parallel.cpu_offload has no effect on CPU (parameters already live in host memory)",
                          stacklevel=2)
        return OffloadPolicy()
    # Pinned host memory: the copies to and from the GPU run asynchronously.
    return CPUOffloadPolicy(pin_memory=True)


def apply_fsdp(model: nn.Module, mesh, *, units: list[tuple[list[nn.Module], bool | None]],
               reshard_after_forward: bool, mp_policy: MixedPrecisionPolicy | None,
               offload: OffloadPolicy) -> nn.Module:
    """Shard `model` over `mesh`, bottom-up: each of `units` (modules sharded together, with their
    own `reshard_after_forward` or None for the setting), then the root. A 1-D mesh gives FSDP, a
    2-D mesh (replicate, shard) gives HSDP. Returns `model`, now an FSDPModule (sharded in place)."""
    kw: dict[str, Any] = {"mesh": mesh, "offload_policy": offload}
    if mp_policy is not None:
        kw["mp_policy"] = mp_policy
    for modules, reshard in units:
        target = modules[0] if len(modules) == 1 else modules
        fully_shard(target, reshard_after_forward=reshard_after_forward if reshard is None else reshard, **kw)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kw)
    return model


def on_meta(module: nn.Module) -> bool:
    """Whether `module` was built on the meta device (train.build.build_model does for sharded runs)."""
    return any(p.is_meta for p in module.parameters())


def materialize(module: nn.Module, device: torch.device, offload: OffloadPolicy | None = None) -> None:
    """Allocate, uninitialised, the storage of a module built on the meta device: after
    `fully_shard` only this rank's shards (on the host under CPU offload, where FSDP keeps them).
    The caller fills them (train.build.fill_weights). A module that already has storage is left
    alone (it was built complete and its values are the ones to keep)."""
    if on_meta(module):
        module.to_empty(device="cpu" if isinstance(offload, CPUOffloadPolicy) else device)


class FSDPParallel(Parallelized):
    """`fsdp` over the ("dp",) mesh, `hsdp` over ("dp_replicate", "dp_shard"). Always over at least
    two ranks: a layout with nothing to shard (`dp_shard == 1`, e.g. one rank) is `ddp`."""

    def __init__(self, model: nn.Module, *, layout: Layout, device: torch.device, dp_rank: int,
                 z_loss_weight: float, mp_policy: MixedPrecisionPolicy | None) -> None:
        self.model = model
        self.modules = [model]
        self.layout = layout
        self.device = device
        self.dp_rank = dp_rank
        self.dp_size = layout.dp
        self.has_loss = True
        self.z_loss_weight = z_loss_weight
        self.mp_policy = mp_policy

    @classmethod
    def build(cls, model: nn.Module, *, layout: Layout, mesh: Any, cfg: "TrainConfig",
              device: torch.device, z_loss_weight: float, arch: ModelParallelism) -> "FSDPParallel":
        assert layout.strategy in ("fsdp", "hsdp") and layout.pp == 1 and mesh is not None, layout
        pcfg = cfg.parallel
        mp = mixed_precision_policy(device, pcfg.mixed_precision)
        offload = offload_policy(device, pcfg.cpu_offload)
        apply_fsdp(model, mesh, units=arch.fsdp_units(model), reshard_after_forward=pcfg.reshard_after_forward,
                   mp_policy=mp, offload=offload)
        materialize(model, device, offload)
        if layout.strategy == "hsdp":
            # Replicas outermost: rank (r, s) reads data slice r·shard + s, every rank its own.
            dp_rank = mesh.get_local_rank("dp_replicate") * layout.dp_shard + mesh.get_local_rank("dp_shard")
        else:
            dp_rank = mesh.get_local_rank("dp")
        return cls(model, layout=layout, device=device, dp_rank=dp_rank, z_loss_weight=z_loss_weight, mp_policy=mp)

    def autocast(self) -> contextlib.AbstractContextManager:
        # The mixed-precision policy already runs the layers in bf16; autocast on top would only
        # add casts.
        if self.mp_policy is not None:
            return contextlib.nullcontext()
        return super().autocast()

    def forward_backward(self, batch: dict[str, torch.Tensor], loss_scale: float, sync: bool) -> tuple[torch.Tensor, int]:
        if isinstance(self.model, FSDPModule):
            # While accumulating, skip the reduce-scatter (and HSDP's all-reduce): the unsharded
            # gradients accumulate locally and are reduced once, with the last micro-batch.
            self.model.set_requires_gradient_sync(sync)
        loss_sum, n_tokens = self.micro_batch_loss(self.model, batch)
        (loss_sum * loss_scale).backward()
        return loss_sum.detach(), n_tokens

    # State dicts: the base class's DCP helpers on the root. FSDP2 adds no name prefixes, so keys
    # are the published ones; sharded DTensors go to DCP as they are (each rank writes its shard)
    # and the export gathers full tensors to rank 0.
