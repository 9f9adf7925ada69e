"""`parallel: auto`: ask the planner, then write its choice into the config the ranks read.

The planner (launcher/planner.py) is pure arithmetic over model and cluster dimensions; this
module gathers those dimensions from the config (config.json when readable, else the known
Baichuan variants, else `model.init`) and turns the chosen candidate back into config fields.
"""

from __future__ import annotations

from typing import Any

from launcher.config import JobConfig


def resolve_parallel(cfg: JobConfig, *, standalone: bool, gpus: dict[int, int] | None) -> tuple[JobConfig, Any]:
    if cfg.train.parallel.strategy != "auto":
        return cfg, None
    raise NotImplementedError("parallel: auto is wired in once launcher/planner.py lands")


def summary(cfg: JobConfig, decision: Any) -> dict[str, Any]:
    par = cfg.train.parallel
    out: dict[str, Any] = {"strategy": par.strategy}
    if par.strategy == "pipeline":
        out.update(pp=par.pp, schedule=par.schedule, microbatches=par.microbatches, dp_shard=par.dp_shard)
    if decision is not None:
        out["reason"] = decision.reason
    return out
