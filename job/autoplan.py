"""`parallel: auto`: ask the planner, then write its choice into the config the ranks read.

The planner (job/planner.py) is pure arithmetic over model and cluster dimensions; this
module gathers those dimensions from the config — the checkpoint's config.json when the
launcher can read it, else the known Baichuan variants by name, else `model.init` — and turns
the chosen candidate back into config fields, so `train` runs exactly what `plan` printed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from job.config import VARIANT_LAYOUT, JobConfig
from job.errors import ConfigError

# A tiny model's vocabulary when neither init.vocab_size nor a tokenizer size says it.
_FALLBACK_VOCAB = 64000


def model_dims(cfg: JobConfig) -> tuple[Any, str]:
    """(ModelDims, where they came from)."""
    from job import planner

    m = cfg.train.model
    position = None if m.position == "auto" else m.position
    if m.init is not None:
        i = m.init
        vocab = i.vocab_size or cfg.train.tokenizer.train_vocab_size or _FALLBACK_VOCAB
        pos = position or VARIANT_LAYOUT.get(m.variant, VARIANT_LAYOUT["baichuan2-7b"])[0]
        return planner.ModelDims(n_layers=i.num_hidden_layers, hidden=i.hidden_size, ffn=i.intermediate_size,
                                 heads=i.num_attention_heads, vocab=vocab, position=pos), "train.model.init"
    assert m.name_or_path is not None
    config_json = Path(m.name_or_path).expanduser() / "config.json"
    if config_json.is_file():
        return planner.ModelDims.from_hf_config(json.loads(config_json.read_text()), position=position), str(config_json)
    try:
        return planner.by_name(m.variant if m.variant != "auto" else m.name_or_path), "known Baichuan variant"
    except ConfigError:
        raise ConfigError(
            f"train.parallel.strategy auto: cannot tell the size of `{m.name_or_path}` (no config.json readable "
            "here, not a known Baichuan name); set train.model.variant or pick a strategy") from None


def cluster_spec(cfg: JobConfig, *, standalone: bool, gpus: dict[int, int] | None) -> Any:
    from job import planner

    cluster = cfg.cluster
    nnodes = 1 if standalone or cluster is None else len(cluster.nodes)
    nproc = cfg.launch.nproc_per_node
    known = [g for g in (gpus or {}).values() if g is not None]
    declared = [n.gpus for n in cluster.nodes if n.gpus is not None] if cluster else []
    if isinstance(nproc, int):
        per_node = nproc
    else:
        per_node = max(1, min(known or declared or [1]))
    has_gpu = bool(known and min(known) > 0) or bool(declared and min(declared) > 0)
    if not has_gpu and (known or not declared):
        gpu_type = "cpu"
    else:
        gpu_type = cluster.gpu.type if cluster else "H100"
    g = cluster.gpu if cluster else None
    gb = 1e9
    return planner.ClusterSpec.from_gpu_type(
        gpu_type, nnodes=nnodes, gpus_per_node=per_node,
        gpu_mem_bytes=int(g.memory_gb * gb) if g and g.memory_gb else None,
        peak_flops=g.peak_tflops * 1e12 if g and g.peak_tflops else None,
        intra_bw_bytes_s=g.intra_node_gbps * gb if g and g.intra_node_gbps else None,
        inter_bw_bytes_s=g.inter_node_gbps * gb if g and g.inter_node_gbps else None,
    )


def _workload(cfg: JobConfig, spec: Any) -> Any:
    from job import planner

    par = cfg.train.parallel
    return planner.Workload(seq_len=cfg.train.data.max_length, micro_batch=cfg.train.data.micro_batch_size,
                            grad_accum=cfg.train.grad_accum, mixed_precision=spec.gpu_name != "cpu",
                            pp_microbatches=par.microbatches,
                            pp_schedule="gpipe" if par.schedule == "gpipe" else "1f1b")


def assess(cfg: JobConfig, *, standalone: bool, gpus: dict[int, int] | None) -> Any:
    """The planner's estimate for the layout the user chose (not `auto`): (the candidate with the
    same strategy, degrees and recomputation, the memory budget in bytes), or None when the
    model's size is unknown here.
    `mlaunch plan` shows it, and warns when it predicts the layout will not fit."""
    from job import planner

    par = cfg.train.parallel
    try:
        dims, _ = model_dims(cfg)
    except ConfigError:
        return None
    spec = cluster_spec(cfg, standalone=standalone, gpus=gpus)
    world = spec.world_size
    if par.strategy == "pipeline":
        dp = world // par.pp
        strategy = "pipeline" if dp == 1 else ("pipeline+fsdp" if par.dp_shard else "pipeline+ddp")
        degrees = {"pp": par.pp} if dp == 1 else {"pp": par.pp, ("shard" if par.dp_shard else "dp"): dp}
    elif par.strategy == "hsdp":
        strategy, degrees = "hsdp", {"replicate": spec.nnodes, "shard": spec.gpus_per_node}
    elif par.strategy == "fsdp":
        strategy, degrees = "fsdp", {"shard": world}
    else:
        strategy, degrees = "ddp", {"dp": world}
    try:
        candidates = planner.enumerate_candidates(dims, spec, _workload(cfg, spec), par.memory_budget, allowed=[strategy],
                                                  recompute=[cfg.train.model.activation_checkpointing])
    except (ConfigError, ValueError):
        return None
    chosen = next((c for c in candidates if c.strategy == strategy and c.degrees == degrees), None)
    return None if chosen is None else (chosen, int(par.memory_budget * spec.gpu_mem_bytes))


def resolve_parallel(cfg: JobConfig, *, standalone: bool, gpus: dict[int, int] | None) -> tuple[JobConfig, Any]:
    """For `auto`: (config with the chosen strategy written in, planner Decision); else (cfg, None)."""
    par = cfg.train.parallel
    if par.strategy != "auto":
        return cfg, None
    from job import planner

    dims, source = model_dims(cfg)
    spec = cluster_spec(cfg, standalone=standalone, gpus=gpus)
    decision = planner.plan_parallel(dims, spec, _workload(cfg, spec), memory_budget=par.memory_budget)
    decision.notes.append(f"model dimensions from {source}; cluster {spec.describe()}")
    chosen = decision.chosen
    if chosen is None:
        raise ConfigError(f"train.parallel.strategy auto: {decision.reason}")
    resolved = cfg.model_copy(deep=True)
    rp = resolved.train.parallel
    rp.strategy = chosen.family
    if chosen.family == "pipeline":
        rp.pp = chosen.degrees["pp"]
        rp.dp_shard = "shard" in chosen.degrees
        rp.microbatches = chosen.microbatches
    # The memory estimate assumed this recomputation: auto owns the setting, like the strategy.
    resolved.train.model.activation_checkpointing = chosen.recompute  # type: ignore[assignment]
    return resolved, decision


def summary(cfg: JobConfig, decision: Any, estimate: Any = None) -> dict[str, Any]:
    """What `plan --json` shows under `parallel`: the strategy the ranks will run, and why (the
    planner's decision for `auto`, its estimate of the chosen layout otherwise)."""
    par = cfg.train.parallel
    out: dict[str, Any] = {"strategy": par.strategy, "activation_checkpointing": cfg.train.model.activation_checkpointing}
    if par.strategy == "pipeline":
        out.update(pp=par.pp, schedule=par.schedule, microbatches=par.microbatches or 2 * par.pp, dp_shard=par.dp_shard)
    if decision is not None:
        from job import planner

        out["chosen_by"] = "auto"
        out["reason"] = decision.reason
        out["decision"] = planner.decision_to_dict(decision)
    if estimate is not None:
        cand, budget = estimate
        out["estimate"] = {"layout": cand.label, "memory_bytes": cand.memory["total"], "budget_bytes": budget,
                           "fits": cand.fits, "step_time_s": cand.step_time_s, "tokens_per_s": cand.tokens_per_s}
    return out


def print_decision(console: Any, decision: Any) -> None:
    from job import planner

    console.print(planner.render_table(decision))
    for note in decision.notes:
        console.print(f"note: {note}")
