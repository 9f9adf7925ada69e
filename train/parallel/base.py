"""The seam between the training loop and the parallel strategies.

The loop knows only the `Layout` (the degrees, validated once) and a `Parallelized` (the model as
a strategy runs it). A strategy (ddp.py; fsdp.py for fsdp and hsdp; pipeline.py) is a
`Parallelized` subclass with a `build` classmethod, registered by name in `STRATEGIES`. The
strategies are model-agnostic: what they need to know about a model's modules (FSDP's units,
how to cut pipeline stages, the state-dict order) comes in as a `ModelParallelism`, which each
model provides (train/models/baichuan/parallelize.py).

Contract every strategy keeps, so the loop stays strategy-agnostic:

* **Batches.** Every rank of one data-parallel replica receives the same micro-batch (a pipeline
  stage that does not need the labels or the ids just ignores them). The loop counts tokens on
  every rank and divides the world sum by `world_size // dp_size`.
* **Gradients are averaged over the `dp_size` replicas** (DDP's all-reduce mean, FSDP's
  reduce-scatter mean). The loop therefore scales each micro-batch's loss sum by
  `dp_size / global_target_tokens`, which makes the step's gradient the mean over every real
  target token of the global batch, however it was split.
* **State dicts use the published key names** (`model.layers.3.self_attn.W_pack.weight`) whatever
  the wrapper, through `torch.distributed.checkpoint.state_dict`, so a checkpoint written under one
  strategy can be read under another and exported in the hub layout.
"""

from __future__ import annotations

import abc
import contextlib
import importlib
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from job.baichuan import IGNORE_INDEX
from job.layout import Layout

if TYPE_CHECKING:
    from job.config import TrainConfig

# strategy name → "module:Class"; imported lazily so an unused strategy costs nothing.
STRATEGIES: dict[str, str] = {
    "ddp": "train.parallel.ddp:DDPParallel",
    "fsdp": "train.parallel.fsdp:FSDPParallel",
    "hsdp": "train.parallel.fsdp:FSDPParallel",
    "pipeline": "train.parallel.pipeline:PipelineParallel",
}


class ModelParallelism(Protocol):
    """What the strategies need to know about one model family's modules."""

    def fsdp_units(self, model: nn.Module) -> list[tuple[list[nn.Module], bool | None]]:
        """FSDP's units bottom-up, each with its `reshard_after_forward` (None = the setting)."""

    def pipeline_stages(self, model: nn.Module, pp_rank: int, pp: int,
                        stages_per_rank: int) -> tuple[list[nn.Module], list[int]]:
        """This pipeline rank's chunks and their stage indices; `model` keeps only its parts."""

    state_dict_order: Callable[[str], Any]
    """Sort key that puts published parameter names in the model's own order."""


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def target_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real target tokens of a micro-batch, counted as `causal_lm_loss` counts them (labels
    shifted by one, -100 ignored). The loop counts them before the forward to normalise the loss."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


class Parallelized(abc.ABC):
    """The model as one strategy runs it on this rank.

    Attributes a strategy sets in `__init__`:
      modules   the local model chunks (one for ddp/fsdp; this rank's stages for pipeline),
                wrapped as the strategy needs; `parameters()` iterates them all.
      device    this rank's device.
      dp_rank, dp_size   this rank's data-parallel coordinate (for the sampler).
      has_loss  whether this rank computes the loss (all ranks in ddp/fsdp, the last stage in a
                pipeline); ranks without it return a zero loss sum from `forward_backward`.
      layout    the Layout it was built for.
    """

    modules: list[nn.Module]
    device: torch.device
    dp_rank: int
    dp_size: int
    has_loss: bool
    layout: Layout
    z_loss_weight: float = 0.0

    @classmethod
    @abc.abstractmethod
    def build(
        cls,
        model: nn.Module,
        *,
        layout: Layout,
        mesh: Any,
        cfg: "TrainConfig",
        device: torch.device,
        z_loss_weight: float,
        arch: ModelParallelism,
    ) -> "Parallelized":
        """Wrap the model for this strategy: a complete fp32 model on `device`, or (fsdp/hsdp,
        pipeline) one on the meta device that the strategy cuts and allocates and
        `train.build.fill_weights` fills afterwards. `mesh` is the DeviceMesh from
        `mesh.build_mesh(layout, device)` (None when running alone)."""

    @abc.abstractmethod
    def forward_backward(self, batch: dict[str, torch.Tensor], loss_scale: float, sync: bool) -> tuple[torch.Tensor, int]:
        """Forward and backward of one micro-batch (CPU tensors from `collate`).

        Backward runs on `loss_sum * loss_scale`. `sync=False` on all but the last micro-batch
        of an optimizer step lets the strategy skip gradient communication while accumulating
        (DDP `no_sync`). Returns (this rank's loss sum as a detached 0-dim tensor on the device,
        this rank's count of real target tokens). The loss stays a tensor so GPU runs do not
        pay a host sync per micro-batch; the loop reduces it when it logs.
        """

    @torch.no_grad()
    def eval_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """Forward only, no gradients: (detached loss sum, real target tokens) of a micro-batch.
        Collective-safe: every rank calls it the same number of times. (A pipeline overrides it.)"""
        loss_sum, n_tokens = self.micro_batch_loss(self.state_dict_module(), batch)
        return loss_sum.detach(), n_tokens

    def micro_batch_loss(self, module: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """(loss sum, real target tokens) of one micro-batch through `module` (wrapped or bare),
        under this strategy's autocast: the forward every data-parallel strategy shares."""
        n_tokens = target_tokens(batch)
        batch = to_device(batch, self.device)
        with self.autocast():
            # The model computes the loss itself (its head's forward, `loss_chunk_tokens` at a
            # time), so FSDP gathers the head around it and no full logits are returned.
            loss_sum = module(batch["input_ids"], batch["attention_mask"], labels=batch["labels"],
                              z_loss_weight=self.z_loss_weight, loss_chunk_tokens=self.loss_chunk_tokens)
        return loss_sum, n_tokens

    # ------------------------------------------------------------------ shared implementations
    def parameters(self) -> Iterator[nn.Parameter]:
        for m in self.modules:
            yield from m.parameters()

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Parameters with their published names (wrapper prefixes such as `module.` removed)."""
        for m in self.modules:
            for name, p in m.named_parameters():
                yield name.removeprefix("module.").replace("_orig_mod.", ""), p

    def settle_after_resume(self) -> None:
        """Bring communication state that lives outside the checkpoint to where an uninterrupted
        run has it at this step (see DDPParallel); nothing for most strategies."""

    def train(self, mode: bool = True) -> None:
        for m in self.modules:
            m.train(mode)

    def clip_grad_norm_(self, max_norm: float | None) -> float:
        """Clip to `max_norm` (None = measure only) and return the global 2-norm before clipping.

        Correct for replicated gradients (DDP) and for DTensor shards (FSDP2: the norm is
        reduced over the mesh). A pipeline must override it: each stage holds other
        parameters, so the squared norms are summed across stages."""
        params = [p for p in self.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
        if hasattr(norm, "full_tensor"):  # DTensor (FSDP2)
            norm = norm.full_tensor()
        return float(norm)

    def state_dict_module(self) -> nn.Module:
        assert len(self.modules) == 1, "strategies with several chunks override the state-dict methods"
        return self.modules[0]

    def model_state_dict(self) -> dict[str, Any]:
        """This rank's view of the model state (sharded tensors stay sharded) for DCP."""
        return get_model_state_dict(self.state_dict_module())

    def load_model_state_dict(self, state: dict[str, Any]) -> None:
        set_model_state_dict(self.state_dict_module(), state)

    def optim_state_dict(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Optimizer state keyed by parameter names (not positions), for DCP. On a fresh
        optimizer torch allocates the moments first, so DCP has tensors to load into."""
        return get_optimizer_state_dict(self.state_dict_module(), optimizer)

    def load_optim_state_dict(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.state_dict_module(), optimizer, state)

    def full_state_dict_for_export(self) -> dict[str, torch.Tensor] | None:
        """Full, unsharded CPU tensors with published names on rank 0; None on the others.
        Collective: every rank calls it."""
        from train.distributed import is_rank0

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.state_dict_module(), options=options)
        return state if is_rank0() else None

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on GPU unless `parallel.mixed_precision: fp32`; fp32 on CPU (CPU bf16
        matmuls are slow and the tests compare fp32 runs bit for bit)."""
        if self.device.type == "cuda" and self.mixed_precision != "fp32":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # `train.parallel.mixed_precision`, set by `parallelize` after `build`.
    mixed_precision: str = "auto"
    # `train.loss_chunk_tokens` (0 = the loss from full logits), set by `parallelize` after `build`.
    loss_chunk_tokens: int = 0


def parallelize(
    model: nn.Module,
    *,
    layout: Layout,
    mesh: Any,
    cfg: "TrainConfig",
    device: torch.device,
    z_loss_weight: float,
    arch: ModelParallelism,
) -> Parallelized:
    """Apply the strategy the layout derives (`layout.strategy`) to the model; `arch` says how
    that model's modules are sharded and cut."""
    module_name, cls_name = STRATEGIES[layout.strategy].split(":")
    cls: type[Parallelized] = getattr(importlib.import_module(module_name), cls_name)
    par = cls.build(model, layout=layout, mesh=mesh, cfg=cfg, device=device, z_loss_weight=z_loss_weight, arch=arch)
    par.mixed_precision = cfg.parallel.mixed_precision
    par.loss_chunk_tokens = cfg.loss_chunk_tokens
    return par
