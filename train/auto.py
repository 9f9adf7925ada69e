"""One line to parallelise a plain PyTorch training script:

    model, optimizer, loader = prepare(model, optimizer, loader)

run under torchrun (`mlaunch run CONFIG -- script.py`, or torchrun itself), or alone. `prepare`

1. starts the process group if the script did not (torchrun's env; gloo on CPU, NCCL on GPU),
2. moves the model to this rank's device,
3. asks the planner that `parallel: auto` asks (job/planner) which of ddp / fsdp / hsdp, with
   which recomputation, fits: the model's real parameter count and dtype, the world, the GPU
   memory (or `memory_budget_gb`) — and prints its table once, on rank 0,
4. applies it: DDP, or FSDP2 `fully_shard` on every repeated block (the classes named by a
   transformers model's `_no_split_modules`, else the children of the largest container of
   same-class modules) and then the root; recomputation with torch's composable `checkpoint` on
   those blocks (every one for `full`, every other for `selective`),
5. rebuilds the optimizer when the parameters changed: `fully_shard` replaces each parameter by a
   DTensor shard, and an optimizer built before holds the old tensors. torch's advice is to build
   the optimizer after `fully_shard`; `prepare` does so for you — a new optimizer of the same
   class, each param group with its own hyperparameters (lr, betas, weight decay, ...) over the
   same parameters' new versions. It must be called before the first `optimizer.step()` (no state
   is carried over), and a learning-rate scheduler belongs after it,
6. gives the loader a `DistributedSampler` (its shuffle as the loader's; the batch size, collate_fn,
   workers, drop_last kept), whose epoch advances each time the loader is iterated.

The helpers: `save_checkpoint` / `load_checkpoint` (torch.distributed.checkpoint, every rank
writes its own shard; `get_state_dict` / `set_state_dict` make it the same for DDP and FSDP),
`is_rank0`, and `finish`, the clean end of a worker (the gloo-exit pitfall in DESIGN.md).
"""

from __future__ import annotations

import inspect
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler

from job.baichuan import BaichuanConfig
from job.errors import ConfigError
from job.layout import Layout
from train import distributed as D

#: The strategies `prepare` applies (a pipeline needs the model cut into stages: not generic).
STRATEGIES = ("ddp", "fsdp", "hsdp")
GB = 1e9


@dataclass(frozen=True)
class Prepared:
    """What `prepare` decided, kept on the model as `model.mlaunch_plan` (for logs and tests)."""

    strategy: str  # ddp | fsdp | hsdp
    recompute: str  # none | selective | full
    blocks: int  # repeated blocks found (FSDP units, recomputation)
    block_class: str
    world_size: int
    device: str
    reason: str


# ---------------------------------------------------------------------------------- the model
def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: modules of the classes in `_no_split_modules` (transformers'
    own list of what must not be split, e.g. `LlamaDecoderLayer`), else the children of the
    container (ModuleList / Sequential) of same-class modules holding the most parameters."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    if names:
        found = [m for m in model.modules() if type(m).__name__ in names]
        if found:
            return found
    best: list[nn.Module] = []
    best_params = 0
    for module in model.modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue
        children = list(module.children())
        if len(children) < 2 or len({type(c) for c in children}) != 1:
            continue
        params = sum(p.numel() for c in children for p in c.parameters())
        if params > best_params:
            best, best_params = children, params
    return best


def model_spec(model: nn.Module, blocks: list[nn.Module]) -> BaichuanConfig:
    """The planner's model description for any module: L = the blocks found, the hidden size,
    heads and vocabulary from the model's config (transformers) when it has one; the SwiGLU width
    solved so that one spec layer holds exactly one block's real parameters (4h² + 3h·f + 2h).
    What the blocks do not hold is the embedding + head (2·V·h + h); without a known vocabulary V
    is solved from it. A tied embedding is counted twice (the spec's head is untied): an estimate
    on the safe side."""
    cfg = getattr(model, "config", None)
    total = sum(p.numel() for p in _unique_params(model))
    n_blocks = max(1, len(blocks))
    per_block = sum(p.numel() for p in blocks[0].parameters()) if blocks else total // 2
    h = int(getattr(cfg, "hidden_size", 0) or 0) or _hidden_guess(blocks[0] if blocks else model)
    heads = int(getattr(cfg, "num_attention_heads", 0) or 0) or 1
    if h % heads:
        heads = 1
    ffn = max(1, round((per_block - 4 * h * h - 2 * h) / (3 * h)))
    vocab = int(getattr(cfg, "vocab_size", 0) or 0)
    if not vocab:
        rest = max(0, total - n_blocks * per_block)
        vocab = max(3, round((rest - h) / (2 * h)))
    position = "rope" if (h // heads) % 2 == 0 else "alibi"
    return BaichuanConfig(vocab_size=vocab, hidden_size=h, intermediate_size=ffn, num_hidden_layers=n_blocks,
                          num_attention_heads=heads, position=position)


def _unique_params(model: nn.Module) -> list[nn.Parameter]:
    return list(dict.fromkeys(model.parameters()))  # tied weights once


def _hidden_guess(module: nn.Module) -> int:
    """A block's width: the input size of its first Linear (else of its first 2-D weight)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            return m.in_features
    for p in module.parameters():
        if p.dim() == 2:
            return p.shape[1]
    return 64


# ---------------------------------------------------------------------------------- the plan
def plan(model: nn.Module, *, world_size: int, local_world_size: int, device: torch.device,
         seq_len: int, micro_batch: int, memory_budget_gb: float | None = None,
         blocks: list[nn.Module] | None = None) -> Any:
    """The planner's Decision for this model on this world (job.planner.plan_parallel, as
    `parallel: auto` asks it). `memory_budget_gb` replaces the device memory: the bytes this
    model's tensors (parameters, gradients, optimizer state, activations) may take per rank, all
    of it, the process's own overhead (CUDA context, buffers) not counted — so CPU runs and tests
    get the same answer on every machine."""
    from job import planner

    blocks = find_blocks(model) if blocks is None else blocks
    spec = model_spec(model, blocks)
    dtype = next(model.parameters()).dtype
    nnodes = max(1, world_size // max(1, local_world_size))
    per_node = world_size // nnodes
    mem = int(memory_budget_gb * GB) if memory_budget_gb else None
    extra = {"overhead_bytes": 0} if mem else {}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        try:
            cluster = planner.ClusterSpec.from_gpu_type(props.name, nnodes, per_node,
                                                        gpu_mem_bytes=mem or props.total_memory, **extra)
        except ConfigError:  # a GPU the planner has no figures for: its memory, H100's speeds
            cluster = planner.ClusterSpec.from_gpu_type("H100", nnodes, per_node,
                                                        gpu_mem_bytes=mem or props.total_memory, **extra)
    else:
        cluster = planner.ClusterSpec.from_gpu_type("cpu", nnodes, per_node, gpu_mem_bytes=mem, **extra)
    work = planner.Workload(seq_len=max(1, seq_len), micro_batch=max(1, micro_batch),
                            mixed_precision=dtype in (torch.bfloat16, torch.float16))
    decision = planner.plan_parallel(spec, cluster, work, memory_budget=1.0 if mem else 0.9, allowed=STRATEGIES)
    decision.notes.append(f"model: {sum(p.numel() for p in _unique_params(model)):,} parameters ({dtype}), "
                          f"{len(blocks)} × {type(blocks[0]).__name__ if blocks else '(no repeated block)'}; "
                          f"batch {micro_batch} × {seq_len} tokens per rank; cluster {cluster.describe()}")
    return decision


def _batch_shape(loader: DataLoader, model: nn.Module) -> tuple[int, int]:
    """(sequences, tokens per sequence) of one rank's batch, read without iterating the loader
    (which would draw from the RNG and change the script's data order): the loader's batch size,
    the length of the dataset's first `input_ids`, else the model's maximum length."""
    micro = loader.batch_size or 1
    seq = 0
    try:
        first = loader.dataset[0]  # type: ignore[index]
        ids = first.get("input_ids") if isinstance(first, dict) else first[0] if isinstance(first, (tuple, list)) else first
        seq = len(ids)
    except Exception:  # an iterable or exotic dataset: fall back to the model's own limit
        seq = 0
    if not seq:
        seq = int(getattr(getattr(model, "config", None), "max_position_embeddings", 0) or 2048)
    return micro, seq


# ---------------------------------------------------------------------------------- applying it
def _apply_recompute(blocks: list[nn.Module], mode: str) -> None:
    """torch's composable `checkpoint` on the blocks (in place: names and state dicts unchanged),
    every block for `full`, the even-indexed ones for `selective` (what the planner assumed)."""
    if mode == "none":
        return
    from torch.distributed._composable import checkpoint

    for i, block in enumerate(blocks):
        if mode == "full" or i % 2 == 0:
            checkpoint(block)


def _apply_fsdp(model: nn.Module, blocks: list[nn.Module], layout: Layout, device: torch.device) -> nn.Module:
    from torch.distributed.fsdp import OffloadPolicy

    from train.parallel.fsdp import apply_fsdp
    from train.parallel.mesh import build_mesh

    mesh = build_mesh(layout, device)
    return apply_fsdp(model, mesh, units=[([b], None) for b in blocks], reshard_after_forward=True,
                      mp_policy=None, offload=OffloadPolicy())


def _apply_ddp(model: nn.Module, layout: Layout, device: torch.device) -> nn.Module:
    from train.parallel.ddp import apply_ddp
    from train.parallel.mesh import build_mesh, dp_group

    return apply_ddp(model, group=dp_group(build_mesh(layout, device)), device=device)


def rebuild_optimizer(optimizer: torch.optim.Optimizer, old_names: dict[int, str], model: nn.Module) -> torch.optim.Optimizer:
    """A new optimizer of the same class over the model's new parameters (FSDP's DTensors), each
    param group with its own hyperparameters. `old_names` maps id(old parameter) → its name."""
    if any(optimizer.state.values()):
        raise ConfigError("prepare() was called after optimizer.step(): call it right after building the model and "
                          "optimizer, before training (its state cannot follow the parameters into their shards)")
    new = dict(model.named_parameters(remove_duplicate=False))
    groups = []
    for group in optimizer.param_groups:
        params = []
        for p in group["params"]:
            name = old_names.get(id(p))
            if name is None or name not in new:
                raise ConfigError("prepare(): the optimizer holds a tensor that is not a parameter of the model; "
                                  "build it from model.parameters() (or its param groups)")
            params.append(new[name])
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": list(dict.fromkeys(params))})
    cls = type(optimizer)
    accepted = inspect.signature(cls.__init__).parameters
    defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    return cls(groups, **defaults)


class _EpochLoader(DataLoader):
    """A DataLoader whose DistributedSampler moves to the next epoch each time it is iterated:
    the tutorial's `for epoch ...: for batch in loader` shuffles anew every epoch, as alone."""

    def __iter__(self):
        sampler = self.sampler
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(self._mlaunch_epoch)
            self._mlaunch_epoch += 1
        return super().__iter__()


def distribute_loader(loader: DataLoader, num_replicas: int, rank: int, seed: int = 0) -> DataLoader:
    """The same loader over this rank's 1/num_replicas of the dataset (DistributedSampler)."""
    if num_replicas == 1 or isinstance(loader.dataset, IterableDataset):
        if num_replicas > 1 and D.is_rank0():
            print("prepare: the loader's dataset is iterable (no indices to split): each rank must read its own part",
                  file=sys.stderr)
        return loader
    if loader.batch_size is None:
        raise ConfigError("prepare(): the DataLoader has a custom batch_sampler; give it batch_size= instead, or "
                          "split the data per rank yourself (torch.utils.data.DistributedSampler)")
    sampler = DistributedSampler(loader.dataset, num_replicas=num_replicas, rank=rank,
                                 shuffle=isinstance(loader.sampler, RandomSampler), seed=seed,
                                 drop_last=loader.drop_last)
    kw: dict[str, Any] = dict(batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
                              collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                              timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                              persistent_workers=loader.persistent_workers)
    if loader.num_workers:
        kw["prefetch_factor"] = loader.prefetch_factor
    out = _EpochLoader(loader.dataset, **kw)
    out._mlaunch_epoch = 0
    return out


# ---------------------------------------------------------------------------------- prepare
def init_distributed(timeout_s: float = 900.0) -> torch.device:
    """Start the process group when torchrun's env says so and the script has not; this rank's
    device (its GPU, else the CPU, whose cores the local ranks share)."""
    env = D.DistEnv.from_env()
    device = D.select_device("auto", env.local_rank)
    D.set_cpu_threads(env, device)
    if env.under_torchrun and not D.is_initialized():
        D.init_process_group(env, device, timeout_s)
    return device


def prepare(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, loader: DataLoader | None = None, *,
            memory_budget_gb: float | None = None, seq_len: int | None = None, strategy: str = "auto",
            seed: int = 0, verbose: bool = True) -> tuple[nn.Module, Any, Any]:
    """Parallelise a plain training script's model, optimizer and loader (see the module's doc).

    `memory_budget_gb`: the memory per rank a plan may use (default: the GPU's, or this host's RAM
    share on CPU). `seq_len`: tokens per sequence for the planner's activation estimate (default:
    the dataset's first example). `strategy`: `auto` asks the planner; `ddp`/`fsdp`/`hsdp` force
    it (the planner's table still shows what it predicts). `seed`: the sampler's shuffle seed."""
    if strategy not in ("auto", *STRATEGIES):
        raise ConfigError(f"prepare(strategy={strategy!r}): one of auto, {', '.join(STRATEGIES)}")
    device = init_distributed()
    world, rank = D.get_world_size(), D.get_rank()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    old_names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    model.to(device)
    blocks = find_blocks(model)
    micro, seq = _batch_shape(loader, model) if loader is not None else (1, 0)
    decision = plan(model, world_size=world, local_world_size=local_world, device=device, seq_len=seq_len or seq or 2048,
                    micro_batch=micro, memory_budget_gb=memory_budget_gb, blocks=blocks)
    chosen = decision.chosen
    if strategy != "auto":
        forced = [c for c in decision.candidates if c.layout.strategy == strategy]
        if not forced:
            raise ConfigError(f"prepare(strategy={strategy!r}) has no layout on {world} rank(s) "
                              "(fsdp needs 2 ranks, hsdp 2 nodes of 2)")
        chosen = next((c for c in forced if c.fits), forced[0])
    if chosen is None:
        raise ConfigError(f"prepare(): {decision.reason}")
    if verbose and rank == 0:
        _print_decision(decision)
    layout = chosen.layout
    block_class = type(blocks[0]).__name__ if blocks else ""  # before fully_shard renames it (FSDP<cls>)
    _apply_recompute(blocks, chosen.recompute)
    if world == 1:
        prepared = model
    elif layout.strategy == "ddp":
        prepared = _apply_ddp(model, layout, device)
    else:
        if not blocks:
            raise ConfigError("prepare(): FSDP needs the model's repeated blocks and none were found (no "
                              "_no_split_modules, no ModuleList of same-class modules); pass strategy='ddp'")
        prepared = _apply_fsdp(model, blocks, layout, device)
    if optimizer is not None and layout.dp_shard > 1:
        optimizer = rebuild_optimizer(optimizer, old_names, prepared)
    if loader is not None:
        # Every ddp/fsdp/hsdp rank reads its own slice (hsdp's mesh is laid out replica-major, so
        # the global rank is also the data rank).
        loader = distribute_loader(loader, layout.dp, rank, seed=seed)
    prepared.mlaunch_plan = Prepared(layout.strategy, chosen.recompute, len(blocks), block_class, world, str(device),
                                     decision.reason)
    return prepared, optimizer, loader


def _print_decision(decision: Any) -> None:
    """The planner's table, the rows `mlaunch plan` shows, once (rank 0). Plain text: it goes
    into node-prefixed logs and ptys of any width, where a rich table would wrap its cells."""
    from launcher.render import TABLE_COLUMNS, format_decision  # the one table's rows (no torch)

    rows = [TABLE_COLUMNS, *format_decision(decision)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_COLUMNS))]
    lines = ["parallel plan (train.auto.prepare)"]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines += [decision.reason, *(f"note: {note}" for note in decision.notes)]
    print("\n".join(lines), flush=True)


# ---------------------------------------------------------------------------------- helpers
def unwrap(model: nn.Module) -> nn.Module:
    """The bare module under DDP (FSDP2 shards in place: nothing to unwrap)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                    step: int = 0) -> None:
    """A DCP checkpoint of the prepared model (and optimizer) at `path` (a folder every rank can
    write to; each rank writes its own shards). Every rank calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    bare = unwrap(model)
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = {"model": get_model_state_dict(bare)}
    else:
        model_sd, optim_sd = get_state_dict(bare, optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
    state["step"] = torch.tensor(step)
    dcp.save(state, checkpoint_id=os.fspath(path))


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Load a `save_checkpoint` folder into the prepared model (and optimizer), resharded to this
    run's layout; returns the saved step. Every rank calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                         set_state_dict)

    if not os.path.isdir(path):
        raise ConfigError(f"load_checkpoint: {path} is not a checkpoint folder (save_checkpoint writes one)")
    bare = unwrap(model)
    if optimizer is None:
        state = {"model": get_model_state_dict(bare), "step": torch.tensor(0)}
        dcp.load(state, checkpoint_id=os.fspath(path))
        set_model_state_dict(bare, state["model"])
    else:
        model_sd, optim_sd = get_state_dict(bare, optimizer)
        state = {"model": model_sd, "optimizer": optim_sd, "step": torch.tensor(0)}
        dcp.load(state, checkpoint_id=os.fspath(path))
        set_state_dict(bare, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return int(state["step"])


def is_rank0() -> bool:
    """Whether this process is global rank 0 (also alone): the one that prints and writes shared files."""
    return D.is_rank0()


def finish(exit_code: int = 0) -> None:
    """End the worker cleanly, never returning: barrier, destroy the process group, flush,
    `os._exit` — what held against gloo's abort at interpreter exit (DESIGN.md's pitfall; PyTorch
    issue #190489). Call it last, on every rank; alone it just flushes and exits."""
    D.shutdown(exit_code, clean=exit_code == 0)
