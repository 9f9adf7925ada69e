"""What the generic strategies (train/parallel/) need to know about Baichuan's modules: which
submodules are FSDP's units, how the model is cut into pipeline stages, and the published
state-dict order. Everything that names `model.embed_tokens`, `model.layers`, `model.norm` or
`lm_head` for parallelism lives here; the strategies take it through `BAICHUAN` (a
`train.parallel.base.ModelParallelism`).
"""

from __future__ import annotations

import torch
from torch import nn

from job.planner import split_layers
from train.models.baichuan.model import BaichuanForCausalLM


def fsdp_units(model: nn.Module) -> list[tuple[list[nn.Module], bool | None]]:
    """FSDP's units of a Baichuan model or of a pipeline chunk of one (any of `embed_tokens`,
    `norm`, `lm_head` may be None and `layers` may hold a subset), bottom-up, each with its
    `reshard_after_forward` (None = the strategy's setting): the embedding, every decoder layer,
    then the final norm together with the head (always used back to back; the norm alone is too
    small for a collective of its own). These are the planner's units
    (`job.planner.memory.fsdp_unit_params`), so its estimate of gathered parameters matches."""
    inner = model.model
    units: list[tuple[list[nn.Module], bool | None]] = []
    if inner.embed_tokens is not None:
        units.append(([inner.embed_tokens], None))
    units += [([layer], None) for layer in inner.layers.values()]
    tail = [m for m in (inner.norm, model.lm_head) if m is not None]
    if tail:
        # Backward starts with the head: resharding it after forward would only make the first
        # backward op wait for an all-gather of the largest unit.
        units.append((tail, False))
    return units


class PipelineChunk(nn.Module):
    """One (virtual) stage: the embedding, a run of decoder layers and/or norm + head of a Baichuan
    model, under the published attribute names (`model.layers.7...`), so its parameter names are
    the hub's. It shares its submodules with the model it was cut from."""

    def __init__(self, full: BaichuanForCausalLM, layers: range, *, first: bool, last: bool) -> None:
        super().__init__()
        self.config = full.config
        self.model = nn.Module()
        self.model.embed_tokens = full.model.embed_tokens if first else None
        self.model.layers = nn.ModuleDict({str(i): full.model.layers[str(i)] for i in layers})
        self.model.norm = full.model.norm if last else None
        self.lm_head = full.lm_head if last else None
        self.is_last = last

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, z_loss_weight: float = 0.0,
                loss_chunk_tokens: int = 0) -> torch.Tensor:
        # The model's own forward: it skips the parts set to None; the last stage returns the
        # loss sum (the labels reach every stage; the others ignore them).
        out = BaichuanForCausalLM.forward(self, x, attention_mask, labels,  # type: ignore[arg-type]
                                          z_loss_weight, loss_chunk_tokens)
        # Hidden states leave in fp32 so the static p2p shapes do not depend on the compute dtype.
        return out if self.is_last else out.float()


def build_pipeline_stages(model: BaichuanForCausalLM, pp_rank: int, pp: int,
                          stages_per_rank: int) -> tuple[list[PipelineChunk], list[int]]:
    """Cut `model` for pipeline rank `pp_rank` into pp × stages_per_rank stages, the layers split
    by `job.planner.split_layers` (parameters + FLOPs balanced, embedding on the first stage, norm
    + head on the last: the very function the planner predicts with); stage k lives on rank
    k mod pp. Returns this rank's chunks and their stage indices, in stage order.

    `model` itself keeps only this rank's parts: the other layers are deleted from
    `model.model.layers` (the remaining keys keep their published indices, so checkpoint keys
    never change) and the embedding / norm / head are set to None where another rank holds them.
    It is the state-dict view of this rank; the chunks share its submodules."""
    n_stages = pp * stages_per_rank
    split = split_layers(model.config, n_stages)
    mine = [k for k in range(n_stages) if k % pp == pp_rank]
    chunks = [PipelineChunk(model, split[k], first=k == 0, last=k == n_stages - 1) for k in mine]
    keep = {str(i) for k in mine for i in split[k]}
    for key in [k for k in model.model.layers.keys() if k not in keep]:
        del model.model.layers[key]
    if 0 not in mine:
        model.model.embed_tokens = None
    if n_stages - 1 not in mine:
        model.model.norm = None
        model.lm_head = None
    return chunks, mine


def state_dict_order(name: str) -> tuple[int, int]:
    """Embedding, layers by index, then norm and head: the model's own state-dict order (a stable
    sort keeps the names inside a layer in the module's order)."""
    if name.startswith("model.embed_tokens"):
        return (0, 0)
    if name.startswith("model.layers."):
        return (1, int(name.split(".")[2]))
    return (2, 0)


class _Baichuan:
    fsdp_units = staticmethod(fsdp_units)
    pipeline_stages = staticmethod(build_pipeline_stages)
    state_dict_order = staticmethod(state_dict_order)


BAICHUAN = _Baichuan()
