"""The one place that builds the DeviceMesh, from validated `Layout`."""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from train.distributed import is_initialized
from job.layout import Layout


def build_mesh(layout: Layout, device: torch.device) -> DeviceMesh | None:
    """Named mesh over the world: ("dp",) for ddp/fsdp, ("dp_replicate", "dp_shard") for hsdp,
    ("pp", "dp") for pipeline. None when running alone without a process group (world size 1:
    nothing to communicate, and init_device_mesh would try to start a rendezvous)."""
    if not is_initialized():
        assert layout.world_size == 1, layout
        return None
    shape, names = layout.mesh_shape()
    return init_device_mesh(device.type, shape, mesh_dim_names=names)


def dp_group(mesh: DeviceMesh | None):
    """The process group of the ("dp",) mesh dimension; None alone (no communication)."""
    if mesh is None:
        return None
    return mesh.get_group("dp")
