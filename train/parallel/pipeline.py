"""Pipeline parallel (torch.distributed.pipelining), optionally × data parallel inside each stage.

Layout. The ("pp", "dp") mesh: `pp` ranks hold consecutive parts of the model, and each part is
replicated (DDP, `Layout.dp_replicate`) or sharded (FSDP, `Layout.dp_shard`; `parallel.stage_dp`)
over the `dp` ranks of its stage. The model cuts itself (`ModelParallelism.pipeline_stages`; for
Baichuan by `job.planner.split_layers`, the very function the planner predicts with). With
`interleaved_1f1b` each rank holds `stages_per_rank` virtual stages: the model is cut into
pp × stages_per_rank parts and part k lives on rank k mod pp (the placement the schedule expects).

What a step does. The loop hands every rank of a data-parallel replica the same micro-batch (the
`Parallelized` contract). `forward_backward` runs it as one schedule step: the batch is split on
dim 0 into `microbatches` pipeline micro-batches (default 2·pp). Each stage takes:
  * input_ids (first stage only) as the positional input;
  * attention_mask as a keyword argument on *every* stage: all ranks of a replica have the batch
    locally, so each stage rebuilds its own mask and RoPE positions from it and nothing but the
    hidden states crosses the stage boundary;
  * labels as a keyword argument too (with the z-loss weight and `loss_chunk_tokens`): the last
    stage's forward returns the loss sum itself (the head's chunked loss, `train.loss`), so no
    [tokens × vocab] logits leave it; the schedule's loss_fn only scales that sum.
The loss of a pipeline micro-batch is the `causal_lm_loss` sum × loss_scale, summed (not averaged:
`scale_grads=False`) over the micro-batches, so the gradients equal those of the whole batch
normalised by the loop's global token count, exactly as in DDP.

Fixed shapes. A schedule's receive buffers are sized once, so every pipeline micro-batch of a
step must have the same shape, and each shape gets its own stages and schedule. The batch is
padded on the right to a size ladder (16, 24, 32, 48, 64, 96, … tokens, never beyond
`data.max_length`) and to a multiple of `microbatches` rows, with pad tokens, mask 0 and label
-100: padded rows and columns add nothing to the loss or the gradients, the real tokens' outputs
are unchanged (causal mask + key mask), and the number of distinct schedules stays logarithmic in
the length instead of one per batch. Shapes are given to `PipelineStage` up front (static mode),
so a new shape costs no extra forward. Hidden states cross stages in fp32 whatever the compute
dtype (a fixed dtype for the static shapes; they are the residual stream, kept in fp32 anyway).

Loss for logging. Only the last stage computes a loss; the other ranks return 0. The loop sums
the returned loss over all ranks (its logging all-reduce) and divides by the global token count,
so the logged loss is right on rank 0 without any pipeline-specific code in the loop.

Gradient accumulation (`grad_accum` > 1) runs one schedule step per loop micro-batch; the
data-parallel reduction then happens after each of them (the pipelining runtime always
synchronises at the end of a schedule step). Correct, but prefer more `microbatches` over
`grad_accum` with pipelines: that also shrinks the bubble, (pp − 1)/(m + pp − 1).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
from torch.distributed.tensor import DTensor

from job.baichuan import IGNORE_INDEX, PAD_ID
from job.errors import ConfigError
from job.layout import Layout
from train.parallel.base import ModelParallelism, Parallelized, target_tokens, to_device
from train.parallel.ddp import apply_ddp
from train.parallel.fsdp import apply_fsdp, materialize, mixed_precision_policy, offload_policy

if TYPE_CHECKING:
    from job.config import ParallelConfig, TrainConfig

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B}


# ------------------------------------------------------------------------------ the schedule
def stages_per_rank(pcfg: "ParallelConfig") -> int:
    """Virtual stages per rank: `stages_per_rank` for the interleaved schedule, else 1."""
    return pcfg.stages_per_rank if pcfg.schedule == "interleaved_1f1b" else 1


def num_microbatches(pcfg: "ParallelConfig", pp: int) -> int:
    return pcfg.microbatches or 2 * pp


def check_pipeline(pcfg: "ParallelConfig", pp: int, n_layers: int) -> None:
    """User errors the schedules would otherwise report deep inside torch, as one line each."""
    v = stages_per_rank(pcfg)
    m = num_microbatches(pcfg, pp)
    if pp * v > n_layers:
        raise ConfigError(
            f"train.parallel: {pp} stages x {v} virtual stages per rank need at least {pp * v} decoder layers, "
            f"the model has {n_layers}; lower pp or stages_per_rank"
        )
    if pcfg.schedule == "1f1b" and m < pp:
        raise ConfigError(f"train.parallel.microbatches={m}: the 1f1b schedule needs at least pp={pp} micro-batches")
    if pcfg.schedule == "interleaved_1f1b":
        rounds = max(1, m // pp)
        if m % rounds:
            raise ConfigError(
                f"train.parallel.microbatches={m}: interleaved_1f1b needs a multiple of max(1, microbatches // pp)="
                f"{rounds}; use a multiple of pp={pp}"
            )


# ------------------------------------------------------------------------------ fixed shapes
def bucket_length(n: int, cap: int) -> int:
    """The smallest of 16, 24, 32, 48, 64, 96, … that holds `n` tokens, but at most max(n, cap):
    at most 1.5x padding, and few distinct shapes (each costs a schedule and its buffers)."""
    b = 16
    while True:
        for size in (b, b * 3 // 2):
            if size >= n:
                return max(n, min(size, cap))
        b *= 2


def pad_batch(batch: dict[str, torch.Tensor], rows: int, seq: int) -> dict[str, torch.Tensor]:
    """Right-pad to [rows, seq]: pad ids, attention_mask 0, labels -100 (no loss, no gradient)."""
    fills = {"input_ids": PAD_ID, "attention_mask": 0, "labels": IGNORE_INDEX}
    out = {}
    for key, fill in fills.items():
        t = batch[key]
        if t.shape == (rows, seq):
            out[key] = t
            continue
        padded = t.new_full((rows, seq), fill)
        padded[: t.shape[0], : t.shape[1]] = t
        out[key] = padded
    return out


class _Shape:
    """The stages and the schedule of one micro-batch shape."""

    def __init__(self, stages: list[PipelineStage], schedule: Any) -> None:
        self.stages = stages
        self.schedule = schedule
        self.used = False


# ------------------------------------------------------------------------------ the strategy
class PipelineParallel(Parallelized):
    def __init__(self, model: nn.Module, chunks: list[nn.Module], wrapped: list[nn.Module], *,
                 stage_ids: list[int], n_stages: int, layout: Layout, mesh: Any, cfg: "TrainConfig",
                 device: torch.device, z_loss_weight: float, mp_policy: Any, arch: ModelParallelism) -> None:
        self.model = model  # this rank's parts under published names: state dicts
        self.chunks = chunks  # bare stage modules: eval forward
        self.modules = wrapped  # what the schedules run (DDP / FSDP / bare)
        self.stage_ids = stage_ids
        self.n_stages = n_stages
        self.layout = layout
        self.mesh = mesh
        self.device = device
        self.pp_group = mesh["pp"].get_group()
        self.pp_rank = mesh["pp"].get_local_rank()
        self.dp_rank = mesh["dp"].get_local_rank()
        self.dp_size = layout.dp
        self.has_first = 0 in stage_ids
        self.has_loss = n_stages - 1 in stage_ids
        self.z_loss_weight = z_loss_weight
        self.mp_policy = mp_policy
        self.fsdp = layout.stage_dp == "fsdp"
        self.schedule_name = cfg.parallel.schedule
        self.n_micro = num_microbatches(cfg.parallel, layout.pp)
        self.max_length = cfg.data.max_length
        self.config = model.config  # hidden_size sizes the stages' p2p buffers
        self.arch = arch
        self._shapes: dict[tuple[int, int], _Shape] = {}
        self._loss_scale = 1.0

    @classmethod
    def build(cls, model: nn.Module, *, layout: Layout, mesh: Any, cfg: "TrainConfig",
              device: torch.device, z_loss_weight: float, arch: ModelParallelism) -> "PipelineParallel":
        assert layout.strategy == "pipeline" and layout.pp >= 2 and mesh is not None, layout
        pcfg = cfg.parallel
        check_pipeline(pcfg, layout.pp, model.config.num_hidden_layers)
        v = stages_per_rank(pcfg)
        chunks, stage_ids = arch.pipeline_stages(model, mesh["pp"].get_local_rank(), layout.pp, v)
        # A meta-device model (train.build.build_model) gets storage only now, for this rank's stages
        # alone (the others' layers were just deleted): sharded first where the stage is FSDP.
        mp = None
        if layout.stage_dp != "fsdp":
            materialize(model, device)
        if layout.dp == 1:
            if pcfg.stage_dp == "fsdp" and dist.get_rank() == 0:
                warnings.warn("train.parallel.stage_dp fsdp has no effect: every pipeline stage has a single "
                              "data-parallel rank (world size == pp)", stacklevel=2)
            wrapped: list[nn.Module] = list(chunks)
        elif layout.stage_dp == "fsdp":
            mp = mixed_precision_policy(device, pcfg.mixed_precision)
            # The schedule keeps the stage gathered across a step's micro-batches (it turns
            # resharding after backward off until the step ends); resharding after each forward
            # would only add an all-gather per micro-batch.
            offload = offload_policy(device, pcfg.cpu_offload)
            wrapped = [apply_fsdp(c, mesh["dp"], units=arch.fsdp_units(c), reshard_after_forward=False, mp_policy=mp,
                                  offload=offload) for c in chunks]
            for c in wrapped:
                materialize(c, device, offload)
        else:
            wrapped = [apply_ddp(c, group=mesh["dp"].get_group(), device=device) for c in chunks]
        return cls(model, chunks, wrapped, stage_ids=stage_ids, n_stages=layout.pp * v, layout=layout, mesh=mesh,
                   cfg=cfg, device=device, z_loss_weight=z_loss_weight, mp_policy=mp, arch=arch)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.mp_policy is not None:  # FSDP's policy already computes in bf16
            return contextlib.nullcontext()
        return super().autocast()

    def _bf16_compute(self) -> bool:
        return self.device.type == "cuda" and self.mixed_precision != "fp32"

    # -------------------------------------------------------------- schedules, one per shape
    def _loss_fn(self, loss_sum: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # The last stage's output is already the micro-batch's loss sum (its forward got the labels).
        return loss_sum * self._loss_scale

    def _loss_kwargs(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """What every stage's forward gets besides its input; only the last stage uses it."""
        return {"labels": batch["labels"], "z_loss_weight": self.z_loss_weight,
                "loss_chunk_tokens": self.loss_chunk_tokens}

    def _shape(self, rows: int, seq: int) -> _Shape:
        """Stages and schedule for pipeline micro-batches of [rows, seq], built on first use."""
        key = (rows, seq)
        if key in self._shapes:
            return self._shapes[key]
        h = self.config.hidden_size
        meta = torch.device("meta")
        ids = torch.empty(rows, seq, dtype=torch.long, device=meta)
        # requires_grad on the hidden states: stages send their input gradients back.
        hidden = torch.empty(rows, seq, h, dtype=torch.float32, device=meta, requires_grad=True)
        loss_sum = torch.empty((), dtype=torch.float32, device=meta, requires_grad=True)
        stages = [
            PipelineStage(module, k, self.n_stages, self.device,
                          input_args=(ids if k == 0 else hidden,),
                          output_args=(loss_sum if k == self.n_stages - 1 else hidden,),
                          group=self.pp_group)
            for module, k in zip(self.modules, self.stage_ids)
        ]
        cls = SCHEDULES[self.schedule_name]
        # Sum, do not average, over micro-batches: the loss is already normalised by the loop.
        if cls is ScheduleInterleaved1F1B:
            schedule = cls(stages, self.n_micro, loss_fn=self._loss_fn, scale_grads=False)
        else:
            schedule = cls(stages[0], self.n_micro, loss_fn=self._loss_fn, scale_grads=False)
        self._shapes[key] = _Shape(stages, schedule)
        return self._shapes[key]

    def _fixed_shape(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int, int]:
        b, s = batch["input_ids"].shape
        rows = math.ceil(b / self.n_micro)
        seq = bucket_length(s, self.max_length)
        return pad_batch(batch, rows * self.n_micro, seq), rows, seq

    # -------------------------------------------------------------- training and eval
    def forward_backward(self, batch: dict[str, torch.Tensor], loss_scale: float, sync: bool) -> tuple[torch.Tensor, int]:
        n_tokens = target_tokens(batch)
        padded, rows, seq = self._fixed_shape(batch)
        padded = to_device(padded, self.device)
        shape = self._shape(rows, seq)
        self._loss_scale = loss_scale
        losses: list[torch.Tensor] = []
        # The first step of a new schedule clears FSDP gradients (the pipelining runtime's
        # clean-up after its set-up): keep those accumulated by earlier micro-batches of this step.
        saved = None
        if not shape.used and self.fsdp:
            saved = [(p, p.grad) for p in self.parameters() if p.grad is not None]
        args = (padded["input_ids"],) if self.has_first else ()
        kwargs = {"attention_mask": padded["attention_mask"], **self._loss_kwargs(padded)}
        target = padded["labels"] if self.has_loss else None
        with self.autocast():
            shape.schedule.step(*args, target=target, losses=losses if self.has_loss else None,
                                return_outputs=False, **kwargs)
        shape.used = True
        if saved:
            for p, g in saved:
                p.grad = g if p.grad is None else p.grad + g
        if self.has_loss:
            loss_sum = torch.stack([x.detach().float() for x in losses]).sum() / loss_scale
        else:
            loss_sum = torch.zeros((), device=self.device)
        return loss_sum, n_tokens

    @torch.no_grad()
    def eval_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """Forward only, stage after stage (no schedule: eval needs no overlap, and its batches
        need no fixed shapes). Hidden states go point-to-point to the next stage's rank."""
        n_tokens = target_tokens(batch)
        batch = to_device(batch, self.device)
        mask = batch["attention_mask"]
        b, s = batch["input_ids"].shape
        loss_sum = torch.zeros((), device=self.device)
        x: torch.Tensor | None = None
        # Bare chunks: DDP's hooks have nothing to do without gradients (an FSDP chunk is the
        # sharded module itself and gathers its parameters as usual).
        mine = dict(zip(self.stage_ids, self.chunks))
        pp = self.layout.pp
        with self.autocast():
            for k in range(self.n_stages):
                if k not in mine:
                    continue
                if k == 0:
                    x = batch["input_ids"]
                else:  # the previous stage is always on another rank (pp >= 2)
                    x = torch.empty(b, s, self.config.hidden_size, dtype=torch.float32, device=self.device)
                    dist.recv(x, group=self.pp_group, group_src=(k - 1) % pp)
                y = mine[k](x, mask, **self._loss_kwargs(batch))
                if k == self.n_stages - 1:
                    loss_sum = y
                else:
                    dist.send(y.contiguous(), group=self.pp_group, group_dst=(k + 1) % pp)
        return loss_sum.detach(), n_tokens

    def clip_grad_norm_(self, max_norm: float | None) -> float:
        """Global 2-norm over every stage: each rank's squared norm (reduced over its FSDP shards
        first), summed over the pp group; replicated DDP gradients are counted once."""
        params = [p for p in self.parameters() if p.grad is not None]
        grads = [p.grad for p in params]
        if grads:
            norm = torch.nn.utils.get_total_norm(grads, 2.0)
            if isinstance(norm, DTensor):
                norm = norm.full_tensor()
        else:
            norm = torch.zeros((), device=self.device)
        sq = norm.double().pow(2).reshape(1)
        dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=self.pp_group)
        total = sq.sqrt().reshape(())
        if max_norm is not None and params:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total.float())
        return float(total)

    # -------------------------------------------------------------- state dicts
    # `self.model` holds exactly this rank's parameters under published names: the base class's
    # DCP helpers save and load them as they are (identical names under every strategy, so a
    # pipeline checkpoint loads into ddp/fsdp and back).
    def state_dict_module(self) -> nn.Module:
        return self.model

    def full_state_dict_for_export(self) -> dict[str, torch.Tensor] | None:
        """Every stage's full tensors on global rank 0 (CPU); None elsewhere. Collective: FSDP
        shards are gathered within each stage, then the first rank of each stage's dp group sends
        its tensors to rank 0 one at a time (never a whole pickled stage in memory)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        local: dict[str, torch.Tensor] = {}
        for name, value in get_model_state_dict(self.model).items():
            if isinstance(value, DTensor):
                value = value.full_tensor()  # collective over this stage's dp group
            if self.dp_rank == 0:
                local[name] = value.detach().to("cpu", copy=True)
        rank = dist.get_rank()
        ranks = self.mesh.mesh  # [pp, dp] global ranks
        if rank == 0:
            full = dict(local)
            for r in range(1, self.layout.pp):
                src = int(ranks[r, 0])
                box: list[Any] = [None]
                dist.recv_object_list(box, src=src, device=torch.device("cpu"))
                for name, shape, dtype in box[0]:
                    t = torch.empty(shape, dtype=dtype)
                    dist.recv(t, src=src)
                    full[name] = t
            return dict(sorted(full.items(), key=lambda kv: self.arch.state_dict_order(kv[0])))
        if self.dp_rank == 0:
            meta = [(name, tuple(t.shape), t.dtype) for name, t in local.items()]
            dist.send_object_list([meta], dst=0, device=torch.device("cpu"))
            for t in local.values():
                dist.send(t.contiguous(), dst=0)
        return None
