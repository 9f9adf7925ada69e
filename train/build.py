"""Building the model a rank trains: new (`model.init`) or pretrained (`name_or_path`), complete
on the device (ddp, a world of 1) or on the meta device and filled after the strategy has cut it
(fsdp/hsdp shards, a pipeline rank's stages), so no rank ever holds the full fp32 model it does
not need.

`build_model` → `parallelize` (train/parallel) → `fill_weights`; `init_pieces` reproduces the
seeded full-model init one piece at a time, bit for bit.
"""

from __future__ import annotations

import copy
from collections.abc import Container, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from job.baichuan import BaichuanConfig, from_model_config, read_config_json
from job.config import TrainConfig
from job.errors import ConfigError
from job.layout import Layout
from train import distributed as D
from train.models.baichuan.model import BaichuanForCausalLM, init_weights, set_activation_checkpointing
from train.parallel.base import Parallelized


def model_dir_of(cfg: TrainConfig) -> Path | None:
    if cfg.model.name_or_path is None:
        return None
    from train.models.baichuan.hub import resolve_checkpoint_dir

    try:
        return resolve_checkpoint_dir(cfg.model.name_or_path)
    except FileNotFoundError as e:
        raise ConfigError(f"train.model.name_or_path: {e}") from None


def _built_on_meta(layout: Layout | None) -> bool:
    """Whether this rank builds the model on the meta device and lets the strategy allocate only
    its part: FSDP/HSDP shards, or a pipeline rank's stages. DDP holds the full model anyway (and
    every layout of a world of 1 is ddp: nothing to shard)."""
    return layout is not None and layout.strategy != "ddp"


def _ddp_replica(layout: Layout | None) -> bool:
    """A DDP rank other than 0: its weights arrive by DDP's broadcast from rank 0."""
    return layout is not None and layout.strategy == "ddp" and layout.world_size > 1 and D.get_rank() != 0


@dataclass(frozen=True)
class PendingWeights:
    """What a model built on the meta device is filled with once parallelised (`fill_weights`):
    the pretrained folder, or (None) `model.init` with today's seed and std."""

    checkpoint: Path | None
    seed: int
    init_std: float


def build_model(cfg: TrainConfig, vocab_size: int, model_dir: Path | None, device: torch.device,
                layout: Layout | None = None) -> tuple[BaichuanForCausalLM, BaichuanConfig, PendingWeights | None]:
    """A new model from `model.init` (same weights on every rank: seeded, built on CPU) or the
    pretrained one in `model_dir`; fp32 master weights either way.

    Under fsdp/hsdp/pipeline with several ranks, the model comes back on the meta device with the
    `PendingWeights` to fill it with after `parallelize` (`fill_weights`): no rank ever holds the
    full fp32 model (13B: 52 GB) on its device. Otherwise the model is complete and on `device`
    (pending is None)."""
    m = cfg.model
    meta = _built_on_meta(layout)
    pending = None
    if m.init is not None:
        mcfg = from_model_config(m, vocab_size=vocab_size)
        if meta:
            pending = PendingWeights(None, cfg.seed, mcfg.initializer_range)
        else:
            torch.manual_seed(cfg.seed)
            model = BaichuanForCausalLM(mcfg)  # on CPU, so CPU and GPU runs start from the same weights
            init_weights(model, mcfg.initializer_range)
            model.to(device)
    else:
        from train.models.baichuan.hub import build_empty_model, checkpoint_weight_files, load_weights_into

        try:
            mcfg = from_model_config(m, hf_config=read_config_json(model_dir))
            if meta:
                checkpoint_weight_files(model_dir)  # a folder without weights fails here, on every rank
                pending = PendingWeights(model_dir, cfg.seed, mcfg.initializer_range)
            elif _ddp_replica(layout):
                # DDP broadcasts rank 0's parameters when it wraps the model: the other ranks only
                # need storage, not a read of the whole checkpoint each (7B: 15 GB per rank).
                checkpoint_weight_files(model_dir)
                with torch.device("meta"):
                    model = BaichuanForCausalLM(mcfg)
                model.to_empty(device=device)
            else:
                # LoRA: the frozen base is read straight into its storage dtype (13B in bf16: 26 GB,
                # not 52); QLoRA reads it on the host and quantises it on the way to the GPU.
                dtype, where = torch.float32, device
                if cfg.lora is not None:
                    from train.lora import frozen_dtype_for

                    dtype = frozen_dtype_for(device, cfg.parallel.mixed_precision)
                    where = torch.device("cpu") if cfg.lora.quantize == "4bit" else device
                model = build_empty_model(mcfg, dtype=dtype, device=where)
                load_weights_into(model, model_dir)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"train.model.name_or_path: {e}") from None
    if meta:
        with torch.device("meta"):  # fp32 parameters without storage; the strategy allocates its part
            model = BaichuanForCausalLM(mcfg)
    if vocab_size > mcfg.vocab_size:
        raise ConfigError(
            f"the tokenizer has {vocab_size} tokens but the model's vocab_size is {mcfg.vocab_size}; "
            "use the model's own tokenizer.model (train.tokenizer.path) or a larger model.init.vocab_size"
        )
    set_activation_checkpointing(model, m.activation_checkpointing)
    if cfg.lora is not None:
        _add_adapters(model, cfg, device, layout, complete=not meta)
    return model, mcfg, pending


def _add_adapters(model: BaichuanForCausalLM, cfg: TrainConfig, device: torch.device, layout: Layout | None,
                  complete: bool) -> None:
    """`train.lora`: peft's adapters on the frozen base, before the strategy wraps the model. A
    complete model gets its adapters' values now; a meta-built one in `fill_weights`."""
    from train import lora

    strategy = layout.strategy if layout is not None else "ddp"
    if strategy == "pipeline":
        raise ConfigError("train.lora works with ddp and fsdp/hsdp, not pipeline: the adapters are small, "
                          "and the frozen base shards with fsdp; set train.parallel.strategy")
    if cfg.lora.quantize == "4bit" and not complete:
        raise ConfigError("train.lora.quantize: 4bit runs with ddp (each GPU holds the whole 4-bit base, a "
                          "quarter of bf16); set train.parallel.strategy: ddp")
    lora.apply_lora(model, cfg.lora, device, lora.frozen_dtype_for(device, cfg.parallel.mixed_precision))
    if cfg.lora.quantize == "4bit":
        model.to(device)  # what stayed on the host: embedding, norms, head, the adapters
    if complete:
        lora.init_adapters(model, cfg.seed)


def init_pieces(mcfg: BaichuanConfig, seed: int, std: float,
                keep: Container[str] | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """The weights `build_model` gives a full model from `model.init` (seed, construction on CPU,
    then `init_weights`), one piece at a time (the embedding, each layer, the norm, the head) as
    {published name: CPU tensor}; with `keep`, only the pieces holding any of those names.

    Bit-identical to the full model because the global RNG sees the same draws in the same
    order: first the draws the constructor makes (each Linear/Embedding's `reset_parameters`,
    replayed piece by piece and thrown away), then `init_weights`'s, piece by piece. Peak host
    memory is one piece (13B: the 2.5 GB head), not the model. tests/unit/test_pretrained.py checks the
    equality, so a change to the model's constructor cannot silently break it."""
    with torch.device("meta"):
        skeleton = BaichuanForCausalLM(mcfg)
    inner = skeleton.model
    pieces: list[tuple[str, nn.Module]] = [("model.embed_tokens", inner.embed_tokens)]
    pieces += [(f"model.layers.{i}", layer) for i, layer in inner.layers.items()]
    pieces += [("model.norm", inner.norm), ("lm_head", skeleton.lm_head)]
    # The pieces must be the model's modules in construction (= registration) order.
    assert [k for p, mod in pieces for k in (f"{p}.{n}" for n in mod.state_dict())] == list(skeleton.state_dict())

    def materialise(module: nn.Module) -> nn.Module:
        return copy.deepcopy(module).to_empty(device="cpu")

    torch.manual_seed(seed)
    for _, piece in pieces:
        for sub in materialise(piece).modules():
            if hasattr(sub, "reset_parameters"):
                sub.reset_parameters()
    for prefix, piece in pieces:
        real = materialise(piece)
        init_weights(real, std)  # draws even when the piece is not kept: the next pieces' values depend on it
        names = {f"{prefix}.{n}": t for n, t in real.state_dict().items()}
        if keep is None or any(n in keep for n in names):
            yield names


def fill_weights(par: Parallelized, pending: PendingWeights, mcfg: BaichuanConfig, layout: Layout) -> None:
    """Fill the parts a strategy allocated for a meta-device model (collective on every rank).

    * pretrained, fsdp/hsdp: rank 0 alone reads the checkpoint, one file at a time, and each
      tensor is broadcast; every rank keeps its shard (`hub.load_weights_distributed`).
    * pretrained, pipeline: each rank reads only its stages' tensors.
    * `model.init`: every rank replays the seeded init piece by piece (`init_pieces`) and keeps
      its part: no communication, and the same draws each rank made before (the full model)."""
    from train.models.baichuan.hub import copy_full_, load_weights_distributed

    from train import lora

    module = par.state_dict_module()  # the state-dict view: published names, this rank's parameters
    adapters = lora.adapter_names(module)
    # LoRA: the base under its published names (peft renamed the targets' weights `base_layer`);
    # the adapters get their seeded values after it. Every rank reads the checkpoint itself: the
    # broadcasting loader needs the module's own names.
    view = lora.PublishedNames(module) if adapters else module
    if pending.checkpoint is not None:
        try:
            load_weights_distributed(view, pending.checkpoint,
                                     broadcast_from_rank0=layout.strategy != "pipeline" and not adapters,
                                     allow_unexpected=layout.strategy == "pipeline")
        except ValueError as e:
            raise ConfigError(f"train.model.name_or_path: {e}") from None
        if adapters:
            lora.init_adapters(module, pending.seed)
        return
    targets = view.state_dict(keep_vars=True)
    filled = set()
    for piece in init_pieces(mcfg, pending.seed, pending.init_std, keep=targets):
        for name, tensor in piece.items():
            if name in targets:
                copy_full_(targets[name], tensor)
                filled.add(name)
    assert filled == set(targets), set(targets) - filled
    if adapters:
        lora.init_adapters(module, pending.seed)


def params_held_per_rank(par: Parallelized) -> list[int]:
    """Parameter elements each rank holds (FSDP: its local shards). Collective."""
    from torch.distributed.tensor import DTensor

    local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in par.parameters())
    held = torch.zeros(D.get_world_size(), dtype=torch.float64)
    held[D.get_rank()] = local
    return [int(x) for x in D.all_reduce_sum(held).tolist()]


def describe_weights(cfg: TrainConfig, layout: Layout, pending: PendingWeights | None) -> str:
    source = f"pretrained {cfg.model.name_or_path}" if cfg.model.name_or_path else f"init (seed {cfg.seed})"
    if pending is None and cfg.model.name_or_path and layout.strategy == "ddp" and layout.world_size > 1:
        return f"{source}, read by rank 0 and broadcast by DDP to the full replica on every rank"
    if pending is None:
        return f"{source}, full model on every rank"
    if pending.checkpoint is None:
        return f"{source}, built on the meta device, each rank initialised only its part"
    if layout.strategy == "pipeline":
        return f"{source}, each rank read only its stages' tensors"
    if cfg.lora is not None:
        return f"{source}, read by every rank into its shards of the frozen base"
    return f"{source}, read by rank 0 one file at a time and broadcast into the shards"
