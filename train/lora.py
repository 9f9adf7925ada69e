"""LoRA and QLoRA on the project's own Baichuan, through `peft` (`train.lora`).

`peft.inject_adapter_in_model` replaces each target `nn.Linear` (e.g. `self_attn.W_pack`) by peft's
`lora.Linear`, which keeps the original layer as `base_layer` and adds `lora_A`/`lora_B`: the
module tree stays ours (decoder layers, FSDP's units, activation checkpointing flags), only the
names under a target gain `.base_layer` / `.lora_A.default`. Every other parameter is frozen.

The order in a run (train/build.py, train/loop.py):
  build (complete, or on the meta device) → `apply_lora` → parallelize → fill the base
  (`PublishedNames` maps the checkpoint's names onto the wrapped ones) → `init_adapters`
  (seeded, the same values on every rank whatever the strategy) → AdamW over what trains.

The export (`export_lora`, `<output_dir>/export`) is a peft adapter folder: `adapter_config.json`
+ `adapter_model.safetensors` (keys `base_model.model.<name>.lora_A.weight`, as
`PeftModel.save_pretrained` writes them), loadable with
`PeftModel.from_pretrained(base, export_dir)` on this project's `BaichuanForCausalLM` holding the
base weights. A base built from `model.init` has no folder of its own: it is written to
`export/base/`. With `merge: true` the merged weights are in `export/merged/` (hub layout).
`load_for_inference` is what `mlaunch generate` / `mlaunch eval` call on such a folder.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from job.baichuan import BaichuanConfig, read_config_json
from job.errors import ConfigError

if TYPE_CHECKING:
    from job.config import LoraConfig, TrainConfig
    from train.models.baichuan.model import BaichuanForCausalLM


ADAPTER = "default"  # peft's adapter name; saved files drop it
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TRAIN_CONFIG = "train_config.yaml"
SAVED_PREFIX = "base_model.model."  # PeftModel's prefix in adapter_model.safetensors


# --------------------------------------------------------------------------------------
# Applying LoRA
# --------------------------------------------------------------------------------------
def peft_config(lora: "LoraConfig", base_model_name_or_path: str | None = None):
    import peft

    return peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                           target_modules=list(lora.target_modules), bias="none",
                           base_model_name_or_path=base_model_name_or_path)


def linear_names(model: nn.Module) -> list[str]:
    """The names of the decoder layers' Linear modules (what `target_modules` may name)."""
    names: dict[str, None] = {}
    for layer in model.model.layers.values():
        for full, module in layer.named_modules():
            if isinstance(module, nn.Linear) and full:
                names[full.rsplit(".", 1)[-1]] = None
    return list(names)


def check_targets(model: nn.Module, targets: list[str]) -> None:
    known = linear_names(model)
    unknown = [t for t in targets if t not in known]
    if unknown:
        raise ConfigError(f"train.lora.target_modules: {', '.join(unknown)} "
                          f"{'is' if len(unknown) == 1 else 'are'} not a module of the model; "
                          f"its linear layers are {', '.join(known)}")


def apply_lora(model: "BaichuanForCausalLM", lora: "LoraConfig", device: torch.device,
               frozen_dtype: torch.dtype) -> "BaichuanForCausalLM":
    """Inject the adapters into `model` in place (also on the meta device) and freeze the rest,
    the frozen weights cast to `frozen_dtype` (bf16 on GPU: the base is never updated, so it needs
    no fp32 master copy). With `quantize: 4bit` the decoder layers' linears become bitsandbytes
    NF4 layers first (QLoRA; CUDA, a complete model). The adapters' values are set by
    `init_adapters`, not here."""
    from peft import inject_adapter_in_model

    check_targets(model, list(lora.target_modules))
    if lora.quantize == "4bit":
        _quantize_4bit(model, device)
        model.is_loaded_in_4bit = True  # how peft knows to wrap bitsandbytes layers with its 4-bit LoRA
    # peft draws the adapters' initial values from the global RNG: keep that stream untouched, so
    # a run's RNG state does not depend on where (meta or not) the model was built.
    with torch.random.fork_rng(devices=[]):
        inject_adapter_in_model(peft_config(lora), model, adapter_name=ADAPTER)
    for name, p in model.named_parameters():
        trains = ".lora_" in name
        p.requires_grad_(trains)
        if not trains and p.dtype != frozen_dtype and p.is_floating_point():
            p.data = p.data.to(frozen_dtype)
    return model


def _quantize_4bit(model: "BaichuanForCausalLM", device: torch.device) -> None:
    """QLoRA (Dettmers et al. 2023): the frozen decoder-layer linears in NF4 with double
    quantisation, computing in bf16. bitsandbytes quantises a `Params4bit` when it moves to CUDA."""
    if device.type != "cuda":
        raise ConfigError("train.lora.quantize: 4bit needs CUDA (bitsandbytes); on CPU use `quantize: none`")
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError("train.lora.quantize: 4bit needs bitsandbytes; `pip install bitsandbytes` "
                          "on every node, or use `quantize: none`") from None
    for layer in model.model.layers.values():
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if not isinstance(lin, nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.bfloat16,
                                      compress_statistics=True, quant_type="nf4", device="cpu")
                q.weight = bnb.nn.Params4bit(lin.weight.data.to("cpu", torch.bfloat16), requires_grad=False,
                                             compress_statistics=True, quant_type="nf4")
                setattr(parent, name, q.to(device))


def frozen_dtype_for(device: torch.device, mixed_precision: str) -> torch.dtype:
    """bf16 on GPU (autocast computes in bf16 anyway); fp32 on CPU and with `mixed_precision: fp32`."""
    return torch.bfloat16 if device.type == "cuda" and mixed_precision != "fp32" else torch.float32


def adapter_names(module: nn.Module) -> list[str]:
    return [n for n, _ in module.named_parameters() if ".lora_" in n]


@torch.no_grad()
def init_adapters(module: nn.Module, seed: int) -> None:
    """peft's initialisation (A: Kaiming-uniform as nn.Linear, B: zeros, so training starts from
    the base model) drawn from a generator seeded with `seed`, in the model's parameter order, on
    CPU: every rank computes the same full values and keeps its part (FSDP shards), whether the
    model was built complete or on the meta device."""
    from train.models.baichuan.hub import copy_full_

    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if ".lora_A." in name:
            full = torch.empty(p.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=gen)
            copy_full_(p, full)
        elif ".lora_B." in name:
            copy_full_(p, torch.zeros(p.shape, dtype=torch.float32))


class PublishedNames:
    """The parallelised model seen under the published names: `...W_pack.weight` for peft's
    `...W_pack.base_layer.weight`; adapters left out. Enough for the weight fillers
    (`train.build.fill_weights`, `hub.load_weights_distributed` reading on every rank), which
    only ask for `state_dict(keep_vars=True)`."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def state_dict(self, keep_vars: bool = False) -> dict[str, torch.Tensor]:
        return {published_name(k): v for k, v in self.module.state_dict(keep_vars=keep_vars).items()
                if ".lora_" not in k}


def published_name(name: str) -> str:
    return name.replace(".base_layer.", ".")


# --------------------------------------------------------------------------------------
# Merging and exporting
# --------------------------------------------------------------------------------------
def split_state(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A LoRA model's full state dict → (base under published names, adapters under peft's saved
    names without the `base_model.model.` prefix: `model.layers.0.self_attn.W_pack.lora_A.weight`)."""
    base, adapters = {}, {}
    for k, v in state.items():
        if ".lora_" in k:
            adapters[k.replace(f".{ADAPTER}.", ".")] = v
        else:
            base[published_name(k)] = v
    return base, adapters


def merged_state(base: Mapping[str, torch.Tensor], adapters: Mapping[str, torch.Tensor],
                 scaling: float) -> dict[str, torch.Tensor]:
    """W + (alpha / r) · B·A for every adapted weight (computed in fp32), the rest as it is."""
    out = dict(base)
    for a_name, a in adapters.items():
        if ".lora_A." not in a_name:
            continue
        prefix = a_name.split(".lora_A.")[0]
        b = adapters[f"{prefix}.lora_B.weight"]
        w = out[f"{prefix}.weight"]
        out[f"{prefix}.weight"] = (w.float() + scaling * (b.float() @ a.float())).to(w.dtype)
    return out


def _readme(base_ref: str, lora: "LoraConfig", n_params: int, merged: bool) -> str:
    return f"""# LoRA adapter (mlaunch)

Rank {lora.r}, alpha {lora.alpha:g}, targets {', '.join(lora.target_modules)}: {n_params:,} adapter parameters.

Base model it needs: `{base_ref}` (`base_model_name_or_path` in adapter_config.json).

Load it with peft onto the project's model:

    from peft import PeftModel
    from train.models.baichuan.hub import load_pretrained
    base, _ = load_pretrained("{base_ref}")
    model = PeftModel.from_pretrained(base, "<this folder>")

or merged, as mlaunch generate / eval do: `train.lora.load_for_inference(<this folder>, device, dtype)`.
{"The merged full weights (hub layout) are in `merged/`." if merged else ""}
"""


def export_lora(state: Mapping[str, torch.Tensor], mcfg: BaichuanConfig, cfg: "TrainConfig", out_dir: Path, *,
                dtype: torch.dtype, tokenizer_file: Path | None, model_dir: Path | None,
                train_config_yaml: str | None = None) -> Path:
    """Write the LoRA export (rank 0): the adapter folder, `base/` when the base came from
    `model.init`, `merged/` with `merge: true`. `state` is the trained model's full state dict
    (peft names); with QLoRA its base is 4-bit, so the base is read again from its source."""
    from safetensors.torch import save_file

    from job.files import publish_dir
    from train.models.baichuan.hub import save_state_dict

    lora = cfg.lora
    assert lora is not None
    base, adapters = split_state(state)
    adapters = {k: v.detach().to("cpu", dtype).contiguous() for k, v in adapters.items()}
    if lora.quantize == "4bit":
        base = dict(base_state_from_source(cfg, mcfg, model_dir))
    base = {k: v.to(dtype) for k, v in base.items()}
    out_dir = Path(out_dir).resolve()
    if model_dir is None:
        base_ref = str(out_dir / "base")
    else:
        # A hub id stays an id (what peft's AutoPeftModel resolves); a folder, its absolute path.
        name = cfg.model.name_or_path or str(model_dir)
        base_ref = str(Path(name).expanduser().resolve()) if Path(name).expanduser().is_dir() else name

    def write(tmp: Path) -> None:
        save_file({SAVED_PREFIX + k: v for k, v in adapters.items()}, str(tmp / ADAPTER_WEIGHTS),
                  metadata={"format": "pt"})
        saved = peft_config(lora, base_ref)
        saved.inference_mode = True  # as PeftModel.save_pretrained writes it
        saved.save_pretrained(str(tmp))
        (tmp / "README.md").write_text(_readme(base_ref, lora, sum(v.numel() for v in adapters.values()), lora.merge))
        if train_config_yaml is not None:
            (tmp / TRAIN_CONFIG).write_text(train_config_yaml)
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, tmp / "tokenizer.model")
        if model_dir is None:
            save_state_dict(base, mcfg, tmp / "base", tokenizer_file=tokenizer_file)
        if lora.merge:
            save_state_dict(merged_state(base, adapters, lora.alpha / lora.r), mcfg, tmp / "merged",
                            tokenizer_file=tokenizer_file)
        umask = os.umask(0)
        os.umask(umask)
        for f in tmp.iterdir():  # safetensors makes its files 0600; an export is for the team
            if f.is_file():
                os.chmod(f, 0o666 & ~umask)

    publish_dir(out_dir, write, replace_existing=True, fsync=True)
    return out_dir


def base_state_from_source(cfg: "TrainConfig", mcfg: BaichuanConfig,
                           model_dir: Path | None) -> Iterator[tuple[str, torch.Tensor]]:
    """The base weights as the run started from them: the pretrained folder's tensors, or the
    seeded `model.init` replayed piece by piece (`train.build.init_pieces`)."""
    if model_dir is not None:
        from train.models.baichuan.hub import iter_checkpoint_tensors

        for name, t in iter_checkpoint_tensors(model_dir):
            if not name.endswith("rotary_emb.inv_freq"):
                yield name, t
        return
    from train.build import init_pieces

    for piece in init_pieces(mcfg, cfg.seed, mcfg.initializer_range):
        yield from piece.items()


# --------------------------------------------------------------------------------------
# Loading an export (mlaunch generate / eval)
# --------------------------------------------------------------------------------------
def is_lora_export(path: Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file() and (Path(path) / ADAPTER_WEIGHTS).is_file()


def load_for_inference(export_dir: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
                       ) -> tuple["BaichuanForCausalLM", Path | None, "TrainConfig | None"]:
    """The project's `BaichuanForCausalLM` with a LoRA export's adapter merged into its base, in
    `dtype` on `device`, in eval mode; the tokenizer.model to use (None if the export has none
    and neither has its base); the training config the export was made with (None when absent).

    The base is `base_model_name_or_path` of adapter_config.json (`base/` for a `model.init`
    base, else the pretrained folder or hub id); `merged/`, when present, is used as it is.
    Raises ConfigError (one line) for a folder that is not a LoRA export or a base that is missing."""
    from safetensors.torch import load_file

    from train.models.baichuan.hub import build_empty_model, iter_checkpoint_tensors, load_weights_into, \
        resolve_checkpoint_dir

    export_dir = Path(export_dir)
    if not is_lora_export(export_dir):
        raise ConfigError(f"{export_dir}: not a LoRA export (no {ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}); "
                          "pass a run's <output_dir>/export folder")
    acfg = json.loads((export_dir / ADAPTER_CONFIG).read_text())
    base_ref = acfg.get("base_model_name_or_path")
    train_cfg = _train_config(export_dir)
    merged_dir = export_dir / "merged"
    try:
        if (merged_dir / "config.json").is_file():
            source = merged_dir
            adapters: dict[str, torch.Tensor] = {}
        else:
            if not base_ref:
                raise ConfigError(f"{export_dir / ADAPTER_CONFIG}: no base_model_name_or_path; the adapter "
                                  "cannot be loaded without its base")
            source = resolve_checkpoint_dir(base_ref)
            adapters = {k.removeprefix(SAVED_PREFIX): v for k, v in load_file(str(export_dir / ADAPTER_WEIGHTS)).items()}
        mcfg = _model_spec(source, train_cfg)
        model = build_empty_model(mcfg, dtype=torch.float32, device="cpu")
        if adapters:
            r, alpha = int(acfg["r"]), float(acfg["lora_alpha"])
            base = {k: v for k, v in iter_checkpoint_tensors(source) if not k.endswith("rotary_emb.inv_freq")}
            model.load_state_dict(merged_state(base, adapters, alpha / r))
        else:
            load_weights_into(model, source)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as e:
        raise ConfigError(f"{export_dir}: cannot load the LoRA export: {str(e).splitlines()[0]}") from None
    tokenizer = next((p for p in (export_dir / "tokenizer.model", source / "tokenizer.model") if p.is_file()), None)
    return model.to(device=device, dtype=dtype).eval(), tokenizer, train_cfg


def _train_config(export_dir: Path) -> "TrainConfig | None":
    from job.config import load_config

    for path in (export_dir / TRAIN_CONFIG, export_dir.parent / "config.yaml"):
        if path.is_file():
            return load_config(path).train
    return None


def _model_spec(folder: Path, train_cfg: "TrainConfig | None") -> BaichuanConfig:
    """The architecture of a base folder: its config.json, with the training config's overrides
    (position, norm_head) when known, as the run built it."""
    from job.baichuan import from_model_config

    hf = read_config_json(folder)
    if train_cfg is None:
        return BaichuanConfig.from_hf_dict(hf)
    m = train_cfg.model.model_copy(update={"init": None, "name_or_path": str(folder)})
    return from_model_config(m, hf_config=hf)


def trainable_summary(module: nn.Module, mcfg: BaichuanConfig, lora: "LoraConfig") -> str:
    n = sum(p.numel() for p in module.parameters() if p.requires_grad)
    expected = mcfg.lora_params(lora.r, lora.target_modules)
    shown = f"{expected:,}" if n == expected else f"{expected:,} (this rank holds {n:,})"
    return (f"lora r={lora.r} alpha={lora.alpha:g} on {', '.join(lora.target_modules)}: {shown} trainable "
            f"parameters ({expected / mcfg.num_params:.2%} of {mcfg.num_params:,}); the base is frozen"
            + (" in NF4 (QLoRA)" if lora.quantize == "4bit" else ""))
