"""The one place that builds the DeviceMesh, from validated `ParallelDims`."""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from train.distributed import is_initialized
from train.parallel.base import ParallelDims


def build_mesh(dims: ParallelDims, device: torch.device) -> DeviceMesh | None:
    """Named mesh over the world: ("dp",) for ddp/fsdp, ("dp_replicate", "dp_shard") for hsdp,
    ("pp", "dp") for pipeline. None when running alone without a process group (world size 1:
    nothing to communicate, and init_device_mesh would try to start a rendezvous)."""
    if not is_initialized():
        assert dims.world_size == 1, dims
        return None
    shape, names = dims.mesh_shape()
    return init_device_mesh(device.type, shape, mesh_dim_names=names)


def dp_group(mesh: DeviceMesh | None):
    """The process group of the ("dp",) mesh dimension; None alone (no communication)."""
    if mesh is None:
        return None
    return mesh.get_group("dp")
