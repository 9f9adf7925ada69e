"""Candidates (strategy × degrees × recomputation), each one's predicted memory per GPU and step
time, the choice among them, and — when nothing fits — the smallest cluster where something does."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Iterable

from job.errors import ConfigError
from job.planner.explain import choice_reason, leanest, with_verdicts
from job.baichuan import BaichuanConfig
from job.layout import Layout
from job.planner.inputs import COMPLEXITY, FAMILIES, RECOMPUTE, STRATEGIES, TIE_MARGIN, ClusterSpec, Workload, gib
from job.planner.memory import (activation_bytes, fsdp_unit_params, logits_bytes, lora_state_bytes, sharded_elems,
                                split_layers, stage_shapes)
from job.planner.timing import GroupSet, exposed_seconds, group_seconds, group_set, stage_flops_per_token


# --------------------------------------------------------------------------------------
# Assumptions (explained in docs/planner.md)
# --------------------------------------------------------------------------------------
DEFAULT_MFU = 0.45
"""Fraction of peak bf16 FLOP/s that the executed matmul FLOPs sustain (well-tuned dense
training of 7–13B models reaches 0.4–0.55 on A100/H100)."""


# --------------------------------------------------------------------------------------
# Candidates
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Candidate:
    layout: Layout
    recompute: str
    memory: dict[str, int]  # params, grads, optimizer, unsharded, activations, logits, overhead, total
    step_time: dict[str, float]  # compute, bubble, comm (exposed), comm_total, total
    fits: bool
    tokens_per_step: int
    verdict: str = ""
    microbatches: int | None = None  # pipeline only
    stages: tuple[range, ...] = ()  # pipeline only
    worst_stage: int | None = None  # pipeline only: the stage whose memory is reported

    @property
    def step_time_s(self) -> float:
        return self.step_time["total"]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_time_s

    @property
    def strategy(self) -> str:
        """The layout's name: `ddp`, `fsdp`, `hsdp`, `pipeline`, `pipeline+ddp`, `pipeline+fsdp`."""
        return self.layout.name

    @property
    def degrees(self) -> dict[str, int]:
        return self.layout.degrees

    @property
    def family(self) -> str:
        """The config's strategy for this layout (`Layout.strategy`)."""
        return self.layout.strategy

    @property
    def label(self) -> str:
        return str(self.layout) + ("" if self.recompute == "none" else f" + {self.recompute} recompute")


@dataclass(frozen=True)
class Decision:
    """The ranked candidates (chosen first, then the others that fit by speed, then the rest by
    memory), the choice, and the explanation. When nothing fits, `smallest_cluster` is the
    fewest nodes of the same kind on which something does."""

    candidates: list[Candidate]
    chosen: Candidate | None
    reason: str
    budget_bytes: int
    smallest_cluster_hint: str = ""
    smallest_cluster: ClusterSpec | None = None
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Option:
    """A layout with the pipeline's schedule facts the estimates need."""

    layout: Layout
    microbatches: int = 1
    pp_micro_batch: int = 1  # sequences per pipeline micro-batch

    @property
    def strategy(self) -> str:
        return self.layout.name

    @property
    def shard(self) -> int:
        """FSDP shard degree (1 = unsharded)."""
        return self.layout.dp_shard

    @property
    def pp(self) -> int:
        return self.layout.pp


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _layouts(model: BaichuanConfig, cluster: ClusterSpec, work: Workload,
             notes: list[str]) -> list[_Option]:
    world, g = cluster.world_size, cluster.gpus_per_node
    out = [_Option(Layout(dp_replicate=world))]
    if work.lora is not None:
        # What train.lora runs: ddp and fsdp/hsdp (QLoRA: ddp, each GPU holding the 4-bit base).
        if work.lora.quantize == "4bit":
            notes.append("QLoRA (4-bit base): ddp only")
            return out
        notes.append("LoRA: no pipeline layouts (the adapters are small; fsdp shards the frozen base)")
    if world > 1:
        out.append(_Option(Layout(dp_shard=world)))
    if cluster.nnodes > 1 and g > 1:
        out.append(_Option(Layout(dp_replicate=cluster.nnodes, dp_shard=g)))
    for pp in _divisors(world) if work.lora is None else ():
        if not 2 <= pp <= model.num_hidden_layers:
            continue
        dp = world // pp
        per_pipeline = work.micro_batch * work.grad_accum * pp  # sequences, global batch kept
        m = work.pp_microbatches or pp * work.grad_accum
        if per_pipeline % m:
            notes.append(f"pp={pp} skipped: {per_pipeline} sequences per pipeline do not split "
                         f"into {m} micro-batches")
            continue
        common = dict(microbatches=m, pp_micro_batch=per_pipeline // m)
        out.append(_Option(Layout(dp_replicate=dp, pp=pp), **common))
        if dp > 1:
            out.append(_Option(Layout(dp_shard=dp, pp=pp), **common))
    return out


def _memory(model: BaichuanConfig, cluster: ClusterSpec, work: Workload, lay: _Option,
            recompute: str) -> tuple[dict[str, int], int | None]:
    """Per-GPU bytes of the layout (for pipelines: its heaviest stage) and that stage."""
    e = work.act_bytes
    wb, gb, ob = work.state_bytes()
    if lay.pp == 1:
        stages = [(model.param_shapes(), range(model.num_hidden_layers), True, 1)]
        micro = work.micro_batch
    else:
        ranges = split_layers(model, lay.pp)
        stages = []
        for i, r in enumerate(ranges):
            # 1F1B: stage i has at most p − i forwards waiting for their backward; GPipe all m.
            in_flight = lay.microbatches if work.pp_schedule == "gpipe" else min(lay.pp - i, lay.microbatches)
            stages.append((stage_shapes(model, lay.pp, i), r, i == lay.pp - 1, in_flight))
        micro = lay.pp_micro_batch

    best: tuple[dict[str, int], int | None] | None = None
    for index, (shapes, layers, last, in_flight) in enumerate(stages):
        if work.lora is None:
            elems = sharded_elems(shapes, lay.shard)
            mem = {"params": wb * elems, "grads": gb * elems, "optimizer": ob * elems}
        else:  # the frozen base stored in the compute dtype (no master copy), fp32 adapters
            mem = lora_state_bytes(model, work.lora, lay.shard, frozen_bytes=e)
        mem["unsharded"] = _unsharded_bytes(model, lay, shapes, e, lora=work.lora is not None)
        mem["activations"] = activation_bytes(model, layers, recompute, micro, work.seq_len, e, in_flight)
        mem["logits"] = _logit_sets(lay, work, last) * logits_bytes(model, micro, work.seq_len, e, work.loss_chunk_tokens)
        mem["overhead"] = cluster.overhead_bytes
        mem["total"] = sum(mem.values())
        if best is None or mem["total"] > best[0]["total"]:
            best = (mem, index if lay.pp > 1 else None)
    assert best is not None
    return best


def _logit_sets(lay: _Option, work: Workload, last: bool) -> int:
    """Micro-batches whose loss is alive at once on a stage. 1F1B's last stage runs each
    backward right after its forward; GPipe runs every forward first."""
    if not last:
        return 0
    return lay.microbatches if lay.pp > 1 and work.pp_schedule == "gpipe" else 1


def _unsharded_bytes(model: BaichuanConfig, lay: _Option, shapes, e: int, lora: bool = False) -> int:
    """Full-size copies FSDP materialises. Plain FSDP/HSDP: two units' params in flight (current +
    prefetched) and one unit's grads before reduce-scatter. Pipeline+FSDP keeps the whole stage
    unsharded (params and grads) across micro-batches, as torch.distributed.pipelining does."""
    if lay.shard == 1:
        return 0
    if lay.pp > 1:
        return 2 * e * sum(math.prod(shape) for _, shape in shapes)
    units = sorted(fsdp_unit_params(model), reverse=True)
    # LoRA: a frozen unit has no gradient to gather; its adapters' are negligible.
    return e * (units[0] + units[1] + (0 if lora else units[0]))


@lru_cache(maxsize=256)
def _groups(cluster: ClusterSpec, strategy: str, pp: int) -> dict[str, GroupSet]:
    """Rank groups, pipeline stages outermost (stage i = ranks [i·d, (i+1)·d)), so a stage's
    data-parallel group sits inside a node whenever it fits and stages span nodes."""
    world, g, n = cluster.world_size, cluster.gpus_per_node, cluster.nnodes
    if strategy == "hsdp":
        return {
            "shard": group_set([[i * g + j for j in range(g)] for i in range(n)], cluster),
            "replicate": group_set([[i * g + j for i in range(n)] for j in range(g)], cluster),
        }
    d = world // pp
    groups = {"dp": group_set([[i * d + j for j in range(d)] for i in range(pp)], cluster)}
    if pp > 1:
        pairs = [[i * d + j, (i + 1) * d + j] for i in range(pp - 1) for j in range(d)]
        groups["p2p"] = group_set(pairs, cluster)
    return groups


def _step_time(model: BaichuanConfig, cluster: ClusterSpec, work: Workload, lay: _Option,
               recompute: str, mfu: float) -> dict[str, float]:
    """Seconds per optimizer step: compute (at `mfu` of peak), the pipeline bubble, and the
    communication that compute cannot hide (`exposed_seconds`)."""
    rate = cluster.peak_flops * mfu
    e, s = work.act_bytes, work.seq_len
    groups = _groups(cluster, lay.strategy, lay.pp)
    if lay.pp == 1:
        per_token = stage_flops_per_token(model, range(model.num_hidden_layers), True, s, recompute)
        per_micro = work.micro_batch * s * per_token / rate
        compute, bubble = work.grad_accum * per_micro, 0.0
        # LoRA synchronises only the adapters' fp32 gradients; FSDP still gathers the frozen base.
        grads = None if work.lora is None else 4 * model.lora_params(work.lora.r, work.lora.target_modules)
        comm = _sharding_comm(model.num_params * e, lay, groups, cluster, work.grad_accum, grads)
        # DDP accumulates under no_sync: its one all-reduce overlaps only the last backward
        # (2/3 of a micro-batch). FSDP's gathers and reduce-scatters run alongside every pass.
        window = per_micro * 2 / 3 if lay.strategy == "ddp" else compute
        exposed = exposed_seconds(comm, window)
    else:
        ranges = split_layers(model, lay.pp)
        per_micro = max(  # the slowest stage sets the pace of the whole pipeline
            lay.pp_micro_batch * s * stage_flops_per_token(model, r, i == lay.pp - 1, s, recompute)
            for i, r in enumerate(ranges)
        ) / rate
        compute = lay.microbatches * per_micro
        bubble = (lay.pp - 1) * per_micro  # so bubble / (compute + bubble) = bubble_fraction
        stage_bytes = e * max(_stage_elems(model, lay.pp, i) for i in range(lay.pp))
        dp_comm = _sharding_comm(stage_bytes, lay, groups, cluster, 1)
        # Every schedule slot sends an activation forward and a gradient back; counted in full.
        p2p_bytes = lay.pp_micro_batch * s * model.hidden_size * e
        p2p = (lay.microbatches + lay.pp - 1) * 2 * group_seconds("p2p", p2p_bytes, groups["p2p"], cluster)
        # The stage's gradient sync can only overlap its last backward (2/3 of a slot); FSDP's
        # gather and reduce-scatter get the first forward and the last backward (one slot).
        window = per_micro * (1 if lay.shard > 1 else 2 / 3)
        comm = dp_comm + p2p
        exposed = p2p + exposed_seconds(dp_comm, window)
    return {"compute": compute, "bubble": bubble, "comm": exposed, "comm_total": comm,
            "total": compute + bubble + exposed}


def _stage_elems(model: BaichuanConfig, pp: int, stage: int) -> int:
    return sum(math.prod(shape) for _, shape in stage_shapes(model, pp, stage))


def _sharding_comm(nbytes: float, lay: _Option, groups: dict[str, GroupSet],
                   cluster: ClusterSpec, grad_accum: int, grad_nbytes: float | None = None) -> float:
    """Seconds of gradient / parameter traffic per step for the data-parallel part of a layout.
    `nbytes` is the full (unsharded) model or stage in the compute dtype; `grad_nbytes` the
    gradients that are reduced, when fewer than that (LoRA: only the adapters')."""
    grad_nbytes = nbytes if grad_nbytes is None else grad_nbytes
    if lay.strategy in ("ddp", "pipeline", "pipeline+ddp"):
        return group_seconds("all_reduce", grad_nbytes, groups["dp"], cluster)
    if lay.strategy == "pipeline+fsdp":  # gathered once, reduce-scattered once per step
        return (group_seconds("all_gather", nbytes, groups["dp"], cluster)
                + group_seconds("reduce_scatter", nbytes, groups["dp"], cluster))
    shard_groups = groups["shard"] if lay.strategy == "hsdp" else groups["dp"]
    # Per micro-batch: all-gather in forward, again in backward, reduce-scatter the gradients.
    per_micro = (2 * group_seconds("all_gather", nbytes, shard_groups, cluster)
                 + group_seconds("reduce_scatter", grad_nbytes, shard_groups, cluster))
    if lay.strategy == "hsdp":  # then each 1/shard slice is all-reduced across the replicas
        per_micro += group_seconds("all_reduce", grad_nbytes / lay.shard, groups["replicate"], cluster)
    return grad_accum * per_micro


def _candidate(model: BaichuanConfig, cluster: ClusterSpec, work: Workload, lay: _Option,
               recompute: str, budget: int, mfu: float) -> Candidate:
    memory, worst = _memory(model, cluster, work, lay, recompute)
    step = _step_time(model, cluster, work, lay, recompute, mfu)
    tokens = work.micro_batch * work.grad_accum * cluster.world_size * work.seq_len
    return Candidate(
        layout=lay.layout, recompute=recompute, memory=memory,
        step_time=step, fits=memory["total"] <= budget, tokens_per_step=tokens,
        microbatches=lay.microbatches if lay.pp > 1 else None,
        stages=tuple(split_layers(model, lay.pp)) if lay.pp > 1 else (),
        worst_stage=worst,
    )


def _allowed_strategies(allowed: Iterable[str] | None) -> set[str]:
    if allowed is None:
        return set(STRATEGIES)
    names = {allowed} if isinstance(allowed, str) else set(allowed)
    if "auto" in names:
        return set(STRATEGIES)
    unknown = names - set(STRATEGIES)
    if unknown:
        raise ConfigError(f"unknown parallel strategy {sorted(unknown)[0]!r}; known: "
                          f"{', '.join(FAMILIES)}, auto (or one of {', '.join(STRATEGIES[4:])})")
    # A family name ("pipeline") admits its combinations ("pipeline+ddp", "pipeline+fsdp").
    return {s for s in STRATEGIES if s in names or (s.split("+")[0] in names and "+" in s)}


def enumerate_candidates(model: BaichuanConfig, cluster: ClusterSpec, work: Workload,
                         memory_budget: float = 0.9, allowed: Iterable[str] | None = None,
                         recompute: Iterable[str] = RECOMPUTE, mfu: float = DEFAULT_MFU,
                         notes: list[str] | None = None) -> list[Candidate]:
    """Every allowed layout × recomputation mode, with memory and step time, unranked."""
    strategies = _allowed_strategies(allowed)
    modes = list(recompute)
    if set(modes) - set(RECOMPUTE):
        raise ConfigError(f"recompute must be among {', '.join(RECOMPUTE)}, got {modes}")
    budget = int(memory_budget * cluster.gpu_mem_bytes)
    notes = [] if notes is None else notes
    return [
        _candidate(model, cluster, work, lay, mode, budget, mfu)
        for lay in _layouts(model, cluster, work, notes) if lay.strategy in strategies
        for mode in modes
    ]


def plan_parallel(model: BaichuanConfig, cluster: ClusterSpec, work: Workload,
                  memory_budget: float = 0.9, allowed: Iterable[str] | None = None, *,
                  recompute: Iterable[str] = RECOMPUTE, mfu: float = DEFAULT_MFU,
                  hint: bool = True) -> Decision:
    """Choose the fastest predicted candidate that fits in `memory_budget` × GPU memory; ties
    (within TIE_MARGIN) go to the simpler layout, then to less recomputation.

    `allowed` restricts the strategies (a family name such as "pipeline" admits its
    combinations; None or "auto" admits all); `recompute` the recomputation modes. With `hint`,
    a plan where nothing fits also searches for the smallest cluster where something does."""
    if not 0 < memory_budget <= 1:
        raise ValueError(f"memory_budget is a fraction of GPU memory, got {memory_budget}")
    notes: list[str] = []
    candidates = enumerate_candidates(model, cluster, work, memory_budget, allowed, recompute, mfu, notes)
    budget = int(memory_budget * cluster.gpu_mem_bytes)
    if not candidates:
        raise ConfigError(
            f"no {'/'.join(sorted(_allowed_strategies(allowed)))} layout exists on "
            f"{cluster.describe()}: fsdp needs ≥ 2 GPUs, hsdp ≥ 2 nodes of ≥ 2 GPUs, a pipeline "
            f"2 to {model.num_hidden_layers} stages dividing the {cluster.world_size} GPUs"
        )
    candidates = with_verdicts(candidates, _choose(candidates), budget)
    chosen = next((c for c in candidates if c.verdict.startswith("chosen")), None)
    if chosen is not None:
        return Decision(candidates, chosen, choice_reason(candidates, chosen, budget), budget, notes=notes)

    lean = leanest(candidates)
    reason = (f"Nothing fits in {gib(budget)} per GPU on {cluster.describe()}: the leanest "
              f"candidate, {lean.label}, needs {gib(lean.memory['total'])}.")
    if not hint:
        return Decision(candidates, None, reason, budget, notes=notes)
    small_hint, small = smallest_cluster(model, cluster, work, memory_budget, allowed, recompute, mfu)
    return Decision(candidates, None, f"{reason} {small_hint}", budget, small_hint, small, notes)


def _choose(candidates: list[Candidate]) -> Candidate | None:
    fitting = [c for c in candidates if c.fits]
    if not fitting:
        return None
    fastest = min(c.step_time_s for c in fitting)
    ties = [c for c in fitting if c.step_time_s <= fastest * (1 + TIE_MARGIN)]
    return min(ties, key=lambda c: (COMPLEXITY[c.strategy], RECOMPUTE.index(c.recompute), c.step_time_s))


# --------------------------------------------------------------------------------------
# When nothing fits
# --------------------------------------------------------------------------------------
MAX_HINT_NODES = 1024


def smallest_cluster(model: BaichuanConfig, cluster: ClusterSpec, work: Workload,
                     memory_budget: float = 0.9, allowed: Iterable[str] | None = None,
                     recompute: Iterable[str] = RECOMPUTE,
                     mfu: float = DEFAULT_MFU) -> tuple[str, ClusterSpec | None]:
    """The fewest nodes of the same kind on which some candidate fits, and a sentence saying so.

    Per-GPU activations do not shrink with more GPUs, so first check whether any node count can
    help at all. Then double the node count until something fits and bisect back (memory per
    GPU falls as nodes are added; the answer is always re-checked to fit)."""
    modes = list(recompute)
    budget = int(memory_budget * cluster.gpu_mem_bytes)
    leanest_mode = max(modes, key=RECOMPUTE.index)
    floor = (activation_bytes(model, range(model.num_hidden_layers), leanest_mode, work.micro_batch,
                              work.seq_len, work.act_bytes)
             + logits_bytes(model, work.micro_batch, work.seq_len, work.act_bytes, work.loss_chunk_tokens)
             + cluster.overhead_bytes)
    if floor > budget and work.pp_microbatches is None:
        return (f"No number of {cluster.gpu_name} nodes helps: activations and logits of "
                f"micro_batch {work.micro_batch} × seq_len {work.seq_len} alone need {gib(floor)} "
                f"> {gib(budget)} per GPU; lower the micro-batch or the sequence length.", None)

    def best_at(nnodes: int) -> Candidate | None:
        bigger = replace(cluster, nnodes=nnodes)
        return _choose(enumerate_candidates(model, bigger, work, memory_budget, allowed, modes, mfu))

    low, high = cluster.nnodes, cluster.nnodes + 1  # low does not fit
    while best_at(high) is None:
        if high >= MAX_HINT_NODES:
            return (f"Even {high} nodes of {cluster.gpus_per_node} × {cluster.gpu_name} are not "
                    "enough.", None)
        low, high = high, min(2 * high, MAX_HINT_NODES)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if best_at(mid) is not None else (mid, high)
    pick = best_at(high)
    assert pick is not None
    return (f"Needs at least {high} nodes × {cluster.gpus_per_node} × {cluster.gpu_name} "
            f"({gib(cluster.gpu_mem_bytes)}): there {pick.label} fits in "
            f"{gib(pick.memory['total'])} per GPU.", replace(cluster, nnodes=high))
