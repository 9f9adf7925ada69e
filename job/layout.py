"""Parallel degrees of a job, validated in one place — without torch, so the launcher checks a
layout against the world size before it starts anything, and every rank checks it again before
init_process_group."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from job.errors import ConfigError

if TYPE_CHECKING:
    from job.config import ParallelConfig


@dataclass(frozen=True)
class ParallelDims:
    """Parallel degrees of one job, computed and checked in one place.

    `dp` is the number of data-parallel replicas (each sees a different slice of the global
    batch), `pp` the pipeline stages; `dp * pp == world_size`. For `hsdp`, the data-parallel
    ranks are a (replicate × shard) grid: parameters are sharded across the `dp_shard_in_node`
    GPUs of a node and replicated across nodes.
    """

    world_size: int
    strategy: str  # ddp | fsdp | hsdp | pipeline (never `auto`: resolved in `from_config`)
    dp: int
    pp: int = 1
    dp_shard_in_node: int = 1  # hsdp: shard degree (= nproc_per_node); 1 otherwise

    @property
    def dp_replicate(self) -> int:
        return self.dp // self.dp_shard_in_node

    @classmethod
    def from_config(cls, pcfg: "ParallelConfig", world_size: int, nproc_per_node: int) -> "ParallelDims":
        """Validate `train.parallel` against the world size; called before init_process_group
        (torchrun sets WORLD_SIZE and LOCAL_WORLD_SIZE), so a bad layout fails in one line
        before any rendezvous."""
        strategy = pcfg.strategy
        assert strategy != "auto", "resolve `auto` first (resolve_auto)"
        pp = pcfg.pp
        if strategy != "pipeline" and pp != 1:
            raise ConfigError(
                f"train.parallel.pp is {pp} but train.parallel.strategy is `{strategy}`; "
                "pipeline stages need `strategy: pipeline` (or set pp: 1)"
            )
        if strategy == "pipeline":
            if pp < 2:
                raise ConfigError("train.parallel.strategy `pipeline` needs train.parallel.pp >= 2 stages")
            if world_size % pp:
                raise ConfigError(
                    f"train.parallel.pp={pp} does not divide the world size {world_size} "
                    f"(nnodes x nproc_per_node); pick pp among {_divisors(world_size)}"
                )
        shard = 1
        if strategy == "hsdp":
            if world_size % nproc_per_node:
                raise ConfigError(
                    f"hsdp shards within a node: the world size {world_size} is not a multiple "
                    f"of nproc_per_node {nproc_per_node}"
                )
            shard = nproc_per_node
        dims = cls(world_size=world_size, strategy=strategy, dp=world_size // pp, pp=pp, dp_shard_in_node=shard)
        assert dims.dp * dims.pp == world_size and dims.dp % dims.dp_shard_in_node == 0, dims
        return dims

    def mesh_shape(self) -> tuple[tuple[int, ...], tuple[str, ...]]:
        """(shape, dim names) of the DeviceMesh. `pp` is the outer dim, so the ranks of one
        stage are neighbours (same node): the gradient all-reduce stays on fast links and only
        the small activations cross nodes."""
        if self.strategy == "pipeline":
            return (self.pp, self.dp), ("pp", "dp")
        if self.strategy == "hsdp":
            return (self.dp_replicate, self.dp_shard_in_node), ("dp_replicate", "dp_shard")
        return (self.dp,), ("dp",)


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(2, n + 1) if n % d == 0) or "none (world size 1)"
