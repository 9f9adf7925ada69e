"""Process-group setup and teardown, device selection, and the rank helpers.

`python -m train` runs alone (world size 1, no process group, like nanoGPT when RANK is unset)
or under torchrun (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE set). Every helper here works in
both cases, so the loop never asks which one it is in.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist

from job.errors import ConfigError
from job.files import publish_file
from job.markers import CHECKPOINT_REQUEST_VAR



@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job. Read from torchrun's environment, no torch needed."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @property
    def under_torchrun(self) -> bool:
        return "RANK" in os.environ

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "DistEnv":
        if "RANK" not in os.environ:
            return cls()
        return cls(
            rank=int(os.environ["RANK"]),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
            world_size=int(os.environ["WORLD_SIZE"]),
            local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
        )


def select_device(requested: str, local_rank: int) -> torch.device:
    """`auto` → this rank's GPU when CUDA is available, else CPU. `cuda` without a GPU is a user
    error, reported by the caller."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("train.device is `cuda` but no CUDA GPU is visible; use `auto` or `cpu`")
    # One GPU per local rank: set it before NCCL starts, or every rank lands on GPU 0.
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def set_cpu_threads(env: DistEnv, device: torch.device) -> None:
    """On CPU, share the cores among the local ranks unless the user chose OMP_NUM_THREADS
    (torchrun sets it to 1 for several workers; alone, torch would take every core per rank)."""
    if device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // env.local_world_size))


def init_process_group(env: DistEnv, device: torch.device, timeout_s: float) -> None:
    """NCCL for GPU tensors plus gloo for CPU ones (DCP and object collectives use both); gloo
    alone on CPU. Alone (no torchrun) there is no process group at all. `timeout_s`
    (train.dist_timeout_s) bounds every collective: a peer that never comes fails it."""
    if not env.under_torchrun:
        return
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s), **kwargs)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_rank0() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


T = TypeVar("T")


def local_rank0_first(fn: Callable[[], T], *, local_rank: int, barrier: Callable[[], None]) -> T | None:
    """Run `fn` on local rank 0 while the node's other ranks wait in `barrier`; `fn`'s result on
    local rank 0, None on the others (they then read what it left, e.g. a cache folder).

    Every rank calls `barrier` exactly once, also when `fn` raises: local rank 0 re-raises the
    error after the barrier, so no rank waits forever (the others find the output missing)."""
    result: T | None = None
    error: Exception | None = None
    if local_rank == 0:
        try:
            result = fn()
        except Exception as e:  # re-raised after the barrier
            error = e
    barrier()
    if error is not None:
        raise error
    return result


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """In-place sum over `group` (default: every rank); a no-op alone."""
    if is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def all_reduce_counts(*counts: int) -> list[int]:
    """Integer counts summed over every rank in one all-reduce (float64: exact below 2**53)."""
    t = torch.tensor([float(c) for c in counts], dtype=torch.float64)
    all_reduce_sum(t)
    return [int(c) for c in t.tolist()]


def broadcast_object(obj, src: int = 0):
    """`obj` as rank `src` has it, on every rank (small picklable values: paths, decisions)."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class StopFlag:
    """Set by SIGTERM (torchrun forwards it to workers on stop) or Ctrl-C (`python -m train` run
    by hand). The loop agrees on it across ranks at the next step boundary, so every rank stops
    at the same step; a second Ctrl-C interrupts at once.

    `save_requested` is the other way to stop: the checkpoint request file exists (polled once a
    step, one stat), and the run checkpoints before it stops."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        request = os.environ.get(CHECKPOINT_REQUEST_VAR)
        self.request_file = Path(request) if request else None

    @property
    def save_requested(self) -> bool:
        return self.request_file is not None and self.request_file.exists()

    def acknowledge_save(self, step: int) -> None:
        """Rank 0, once the requested checkpoint is complete: the batch shell then requeues the job."""
        if self.request_file is not None:
            publish_file(self.request_file.with_name(self.request_file.name + ".done"), f"{step}\n")

    def install(self) -> "StopFlag":
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.signum = self.signum or signum
        signal.signal(signal.SIGINT, signal.default_int_handler)

    @property
    def exit_code(self) -> int:
        """128 + the signal, as shells report a job ended by it (130 for Ctrl-C, 143 for SIGTERM)."""
        return 128 + (self.signum or signal.SIGTERM)


def shutdown(exit_code: int, *, clean: bool) -> None:
    """End the worker without returning to the interpreter's exit path.

    gloo aborts at interpreter exit in roughly 1 run in 6-10 (SIGABRT, "terminate called
    without an active exception"; PyTorch issue #190489). What held in 40 of 40 runs: barrier, destroy,
    flush, `os._exit`. After an error the peers may be stuck in some other collective, where a
    barrier or an NCCL teardown could hang, so `clean=False` goes straight to `os._exit`:
    torchrun tears the other workers down when this one exits non-zero.
    """
    try:
        if clean and is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)
