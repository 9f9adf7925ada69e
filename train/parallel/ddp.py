"""Data parallel: a full replica per rank, gradients averaged by DistributedDataParallel."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from job.layout import Layout
from train.parallel.base import ModelParallelism, Parallelized
from train.parallel.mesh import dp_group

if TYPE_CHECKING:
    from job.config import TrainConfig


def apply_ddp(model: nn.Module, *, group, device: torch.device) -> nn.Module:
    """Wrap `model` in DDP over `group` (None = the default group)."""
    return DDP(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        process_group=group,
        # Gradients alias the all-reduce buckets: one copy of the gradients instead of two.
        gradient_as_bucket_view=True,
    )


class DDPParallel(Parallelized):
    """One replica per rank. With world size 1 the model is not wrapped at all (DDP would only
    add hooks and a bucket copy)."""

    def __init__(self, model: nn.Module, wrapped: nn.Module, *, layout: Layout, device: torch.device,
                 dp_rank: int, z_loss_weight: float) -> None:
        self.model = model  # the bare module: eval forward and state dicts
        self.wrapped = wrapped  # what training calls (DDP, or the bare model alone)
        self.modules = [wrapped]
        self.layout = layout
        self.device = device
        self.dp_rank = dp_rank
        self.dp_size = layout.dp
        self.has_loss = True
        self.z_loss_weight = z_loss_weight

    @classmethod
    def build(cls, model: nn.Module, *, layout: Layout, mesh: Any, cfg: "TrainConfig",
              device: torch.device, z_loss_weight: float, arch: ModelParallelism) -> "DDPParallel":
        assert layout.strategy == "ddp" and layout.pp == 1, layout
        if layout.world_size == 1:
            return cls(model, model, layout=layout, device=device, dp_rank=0, z_loss_weight=z_loss_weight)
        group = dp_group(mesh)
        wrapped = apply_ddp(model, group=group, device=device)
        return cls(model, wrapped, layout=layout, device=device, dp_rank=mesh.get_local_rank("dp"),
                   z_loss_weight=z_loss_weight)

    def forward_backward(self, batch: dict[str, torch.Tensor], loss_scale: float, sync: bool) -> tuple[torch.Tensor, int]:
        no_sync = self.wrapped.no_sync() if (not sync and isinstance(self.wrapped, DDP)) else contextlib.nullcontext()
        with no_sync:
            loss_sum, n_tokens = self.micro_batch_loss(self.wrapped, batch)
            (loss_sum * loss_scale).backward()
        return loss_sum.detach(), n_tokens

    def settle_after_resume(self) -> None:
        """DDP rebuilds its gradient buckets once, after the first backward, in the order gradients
        became ready; that layout decides the order in which the all-reduce sums each element.
        An uninterrupted run has rebuilt buckets from step 2 on; a resumed one would take its first
        step on the initial layout and so, with more than 2 replicas, differ in the last bits from
        then on. One backward on a tiny batch (gradients dropped, no optimizer step) rebuilds them
        as the uninterrupted run did: the ready order follows the graph, not the data."""
        if not isinstance(self.wrapped, DDP):
            return
        ids = torch.ones((1, 4), dtype=torch.long)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        loss_sum, _ = self.micro_batch_loss(self.wrapped, batch)
        (loss_sum * 0.0).backward()
        for p in self.model.parameters():
            p.grad = None

    # State dicts from the bare module: same published names with or without the DDP wrapper.
    def state_dict_module(self) -> nn.Module:
        return self.model
