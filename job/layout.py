"""The parallel layout of a job: its degrees, in one torch-free type.

`Layout` is what the planner's candidates carry, what `mlaunch` checks against the world size
before it starts anything, and what every rank builds its DeviceMesh from — nothing else spells
a layout. Degrees follow torchtitan's `ParallelDims`: `dp_replicate` (DDP-style replicas),
`dp_shard` (FSDP sharding), `pp` (pipeline stages), `tp` (room for tensor parallel; 1 today).
The strategy is *derived* from the degrees, never stored beside them.

The config (`train.parallel`) speaks in strategies: `Layout.from_config` is the one translation
from it, `Layout.to_config` the one back (what `parallel: auto` writes into the resolved config).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from job.errors import ConfigError

if TYPE_CHECKING:
    from job.config import ParallelConfig


@dataclass(frozen=True)
class Layout:
    """Degrees of one job; their product is the world size.

    Rank order (the DeviceMesh's dims, outermost first): `pp`, then `dp_replicate`, then
    `dp_shard`. `pp` outermost keeps the ranks of one stage neighbours (same node), so the
    gradient all-reduce stays on fast links and only the small activations cross nodes; `dp_shard`
    innermost keeps FSDP's all-gathers inside a node for hsdp."""

    dp_replicate: int = 1
    dp_shard: int = 1
    pp: int = 1
    tp: int = 1

    def __post_init__(self) -> None:
        for name in ("dp_replicate", "dp_shard", "pp", "tp"):
            value = getattr(self, name)
            assert isinstance(value, int) and value >= 1, f"Layout.{name} must be a positive int, got {value!r}"
        assert self.tp == 1, "tensor parallelism is not built yet"

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.pp * self.tp

    @property
    def dp(self) -> int:
        """Data-parallel replicas of the model: each sees a different slice of the global batch."""
        return self.dp_replicate * self.dp_shard

    @property
    def strategy(self) -> str:
        """`pipeline` with stages; else `hsdp` (sharded and replicated), `fsdp` or `ddp`. One rank
        (or one node's worth of shards) needs no more than that: fsdp on one rank is ddp."""
        if self.pp > 1:
            return "pipeline"
        if self.dp_shard > 1:
            return "hsdp" if self.dp_replicate > 1 else "fsdp"
        return "ddp"

    @property
    def stage_dp(self) -> str:
        """How each pipeline stage is kept across its data-parallel replicas: `fsdp` or `ddp`."""
        return "fsdp" if self.dp_shard > 1 else "ddp"

    @property
    def name(self) -> str:
        """The planner's name for the layout: the strategy, with the stage's data parallelism for
        a pipeline that has replicas (`pipeline+ddp`, `pipeline+fsdp`)."""
        if self.pp > 1 and self.dp > 1:
            return f"pipeline+{self.stage_dp}"
        return self.strategy

    @property
    def degrees(self) -> dict[str, int]:
        """The degrees above 1, outermost first (`{"dp_replicate": 1}` for a single rank)."""
        out = {k: v for k, v in (("pp", self.pp), ("dp_replicate", self.dp_replicate), ("dp_shard", self.dp_shard))
               if v > 1}
        return out or {"dp_replicate": 1}

    def __str__(self) -> str:
        return f"{self.name}({', '.join(f'{k}={v}' for k, v in self.degrees.items())})"

    def mesh_shape(self) -> tuple[tuple[int, ...], tuple[str, ...]]:
        """(shape, dim names) of the DeviceMesh. A pipeline's data-parallel ranks form one `dp`
        dim whatever keeps them (DDP or FSDP); hsdp is the 2-D (replicate, shard) grid."""
        if self.pp > 1:
            return (self.pp, self.dp), ("pp", "dp")
        if self.strategy == "hsdp":
            return (self.dp_replicate, self.dp_shard), ("dp_replicate", "dp_shard")
        return (self.dp,), ("dp",)

    # ------------------------------------------------------------------ the config's words
    @classmethod
    def from_config(cls, pcfg: "ParallelConfig", world_size: int, nproc_per_node: int) -> "Layout":
        """`train.parallel` → degrees for this world, checked once. The launcher calls it before
        touching a node and every rank before init_process_group (torchrun sets WORLD_SIZE and
        LOCAL_WORLD_SIZE), so a bad layout fails in one line before any rendezvous."""
        strategy, pp = pcfg.strategy, pcfg.pp
        assert strategy != "auto", "resolve `auto` first (job.autoplan.resolve_parallel)"
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
            dp = world_size // pp
            if pcfg.stage_dp == "fsdp":
                return cls(dp_shard=dp, pp=pp)
            return cls(dp_replicate=dp, pp=pp)
        if strategy == "hsdp":
            if world_size % nproc_per_node:
                raise ConfigError(
                    f"hsdp shards within a node: the world size {world_size} is not a multiple "
                    f"of nproc_per_node {nproc_per_node}"
                )
            return cls(dp_replicate=world_size // nproc_per_node, dp_shard=nproc_per_node)
        if strategy == "fsdp":
            return cls(dp_shard=world_size)
        return cls(dp_replicate=world_size)

    def to_config(self, pcfg: "ParallelConfig") -> "ParallelConfig":
        """A copy of `pcfg` saying this layout, such that `from_config` on the same world gives it
        back (hsdp shards over one node's processes, as the planner's hsdp candidates do)."""
        out = pcfg.model_copy(deep=True)
        out.strategy = self.strategy  # type: ignore[assignment]
        out.pp = self.pp
        out.stage_dp = self.stage_dp  # type: ignore[assignment]
        return out


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(2, n + 1) if n % d == 0) or "none (world size 1)"
