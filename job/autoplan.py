"""`parallel: auto`: ask the planner, then write its choice into the config the ranks read.

The planner (job/planner/) is pure arithmetic over model and cluster dimensions; this
module gathers those dimensions from the config — the checkpoint's config.json when the
launcher can read it, else the known Baichuan variants by name, else `model.init` — and turns
the chosen candidate back into config fields, so `train` runs exactly what `plan` printed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from job.baichuan import BaichuanConfig, by_name, from_model_config, read_config_json
from job.config import JobConfig
from job.errors import ConfigError
from job.layout import Layout

#: `plan --json`'s `parallel.decided_by` for an entrypoint run: the launcher plans no layout.
ENTRYPOINT_DECIDES = "the entrypoint (train.auto.prepare asks this planner on the ranks)"

# A tiny model's vocabulary when neither init.vocab_size nor a tokenizer size says it.
_FALLBACK_VOCAB = 64000


def model_config(cfg: JobConfig) -> tuple[BaichuanConfig, str]:
    """(the model's spec, where it came from) — the same `from_model_config` the ranks build from."""
    m = cfg.train.model
    if m.init is not None:
        vocab = m.init.vocab_size or cfg.train.tokenizer.train_vocab_size or _FALLBACK_VOCAB
        return from_model_config(m, vocab_size=vocab), "train.model.init"
    assert m.name_or_path is not None
    folder = Path(m.name_or_path).expanduser()
    if (folder / "config.json").is_file():
        try:
            return from_model_config(m, hf_config=read_config_json(folder)), str(folder / "config.json")
        except ValueError as e:
            raise ConfigError(f"train.model.name_or_path: {e}") from None
    try:
        return by_name(m.variant if m.variant != "auto" else m.name_or_path), "known Baichuan variant"
    except ConfigError:
        raise ConfigError(
            f"train.parallel.strategy auto: cannot tell the size of `{m.name_or_path}` (no config.json readable "
            "here, not a known Baichuan name); set train.model.variant or pick a strategy") from None


def cluster_spec(cfg: JobConfig, *, standalone: bool, gpus: dict[int, int] | None) -> Any:
    from job import planner

    cluster = cfg.cluster
    nnodes = 1 if standalone or cluster is None else cluster.num_nodes
    nproc = cfg.launch.nproc_per_node
    known = [g for g in (gpus or {}).values() if g is not None]
    declared = ([cluster.slurm.gpus_per_node] if cluster and cluster.slurm else
                [n.gpus for n in cluster.nodes if n.gpus is not None] if cluster else [])
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
    lora = cfg.train.lora
    adapters = None if lora is None else planner.Adapters(r=lora.r, target_modules=tuple(lora.target_modules),
                                                          quantize=lora.quantize)
    return planner.Workload(seq_len=cfg.train.data.max_length, micro_batch=cfg.train.data.micro_batch_size,
                            grad_accum=cfg.train.grad_accum, mixed_precision=spec.gpu_name != "cpu",
                            pp_microbatches=par.microbatches,
                            pp_schedule="gpipe" if par.schedule == "gpipe" else "1f1b", lora=adapters,
                            loss_chunk_tokens=cfg.train.loss_chunk_tokens)


def check_lora(cfg: JobConfig, *, standalone: bool, gpus: dict[int, int] | None) -> None:
    """`train.lora` checked before anything starts: QLoRA's 4-bit layers need CUDA (bitsandbytes),
    and every target must be one of the model's linear layers (when its size is known here)."""
    if cfg.train is None:  # an entrypoint run: nothing of the built-in trainer to check
        return
    lora = cfg.train.lora
    if lora is None:
        return
    if cfg.train.parallel.strategy == "pipeline" or (lora.quantize == "4bit" and cfg.train.parallel.strategy in ("fsdp", "hsdp")):
        raise ConfigError(f"train.lora{'.quantize: 4bit' if lora.quantize == '4bit' else ''} runs under "
                          f"{'ddp' if lora.quantize == '4bit' else 'ddp and fsdp/hsdp'}, not "
                          f"{cfg.train.parallel.strategy}; set train.parallel.strategy (or auto)")
    if lora.quantize == "4bit" and (cfg.train.device == "cpu"
                                    or cluster_spec(cfg, standalone=standalone, gpus=gpus).gpu_name == "cpu"):
        raise ConfigError("train.lora.quantize: 4bit (QLoRA) needs CUDA GPUs (bitsandbytes) and this job runs on "
                          "CPU; use `quantize: none` here, or run it on GPU nodes")
    try:
        model, _ = model_config(cfg)
    except ConfigError:
        return  # size unknown here: the ranks check the targets against the real model
    try:
        model.lora_shapes(lora.r, lora.target_modules, layers=[0])
    except ValueError as e:
        raise ConfigError(f"train.lora.target_modules: {e}") from None


def assess(cfg: JobConfig, *, standalone: bool, gpus: dict[int, int] | None) -> Any:
    """The planner's estimate for the layout the user chose (not `auto`): (the candidate with the
    same strategy, degrees and recomputation, the memory budget in bytes), or None when the
    model's size is unknown here.
    `mlaunch plan` shows it, and warns when it predicts the layout will not fit."""
    from job import planner

    if cfg.train is None:  # an entrypoint decides its own layout on the ranks (train.auto.prepare)
        return None
    par = cfg.train.parallel
    try:
        model, _ = model_config(cfg)
    except ConfigError:
        return None
    spec = cluster_spec(cfg, standalone=standalone, gpus=gpus)
    try:
        layout = Layout.from_config(par, spec.world_size, spec.gpus_per_node)
        candidates = planner.enumerate_candidates(model, spec, _workload(cfg, spec), par.memory_budget,
                                                  allowed=[layout.name],
                                                  recompute=[cfg.train.model.activation_checkpointing])
    except (ConfigError, ValueError):
        return None
    chosen = next((c for c in candidates if c.layout == layout), None)
    return None if chosen is None else (chosen, int(par.memory_budget * spec.gpu_mem_bytes))


def resolve_parallel(cfg: JobConfig, *, standalone: bool, gpus: dict[int, int] | None) -> tuple[JobConfig, Any]:
    """For `auto`: (config with the chosen strategy written in, planner Decision); else (cfg, None)."""
    if cfg.train is None:
        return cfg, None
    par = cfg.train.parallel
    if par.strategy != "auto":
        return cfg, None
    from job import planner

    model, source = model_config(cfg)
    spec = cluster_spec(cfg, standalone=standalone, gpus=gpus)
    work = _workload(cfg, spec)
    decision = planner.plan_parallel(model, spec, work, memory_budget=par.memory_budget)
    decision.notes.append(f"model dimensions from {source}; cluster {spec.describe()}")
    if work.lora is not None:
        n = model.lora_params(work.lora.r, work.lora.target_modules)
        decision.notes.append(f"LoRA r={work.lora.r}: {n:,} trainable adapter parameters ({n / model.num_params:.2%}); "
                              f"the frozen base in {'NF4' if work.lora.quantize == '4bit' else 'bf16' if work.mixed_precision else 'fp32'}, "
                              "gradients and AdamW state for the adapters only")
    chosen = decision.chosen
    if chosen is None:
        raise ConfigError(f"train.parallel.strategy auto: {decision.reason}")
    resolved = cfg.model_copy(deep=True)
    resolved.train.parallel = chosen.layout.to_config(resolved.train.parallel)
    if chosen.layout.pp > 1:
        resolved.train.parallel.microbatches = chosen.microbatches
    # The memory estimate assumed this recomputation: auto owns the setting, like the strategy.
    resolved.train.model.activation_checkpointing = chosen.recompute  # type: ignore[assignment]
    return resolved, decision


def summary(cfg: JobConfig, decision: Any, estimate: Any = None) -> dict[str, Any]:
    """What `plan --json` shows under `parallel`: the strategy the ranks will run, and why (the
    planner's decision for `auto`, its estimate of the chosen layout otherwise)."""
    if cfg.train is None:
        return {"strategy": None, "decided_by": ENTRYPOINT_DECIDES}
    par = cfg.train.parallel
    out: dict[str, Any] = {"strategy": par.strategy, "activation_checkpointing": cfg.train.model.activation_checkpointing}
    if par.strategy == "pipeline":
        out.update(pp=par.pp, schedule=par.schedule, microbatches=par.microbatches or 2 * par.pp, stage_dp=par.stage_dp)
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


def resolve_auto(job: JobConfig, world_size: int, nproc_per_node: int, has_gpu: bool) -> tuple[JobConfig, str | None]:
    """`strategy: auto` → the planner's choice for this very world, as `mlaunch run` would write
    it into the resolved config (which it does before launching: ranks see `auto` only when
    `python -m train` or torchrun is started by hand). Returns (job, one-line reason or None)."""
    if job.train.parallel.strategy != "auto":
        return job, None
    nnodes = max(1, world_size // nproc_per_node)
    # Plan for the world that actually started, not for what the YAML's launch section says.
    sized = job.model_copy(deep=True)
    sized.launch.nproc_per_node = nproc_per_node
    gpus = {i: nproc_per_node if has_gpu else 0 for i in range(nnodes)}
    resolved, decision = resolve_parallel(sized, standalone=nnodes == 1, gpus=gpus)
    return resolved, f"parallel auto: {resolved.train.parallel.strategy} ({decision.reason})"
