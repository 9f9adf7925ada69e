"""Reading and writing Baichuan checkpoints in the published Hugging Face layouts.

Four layouts exist in the wild and all load here: ``pytorch_model.bin``, sharded
``pytorch_model-0000x-of-0000y.bin`` + ``pytorch_model.bin.index.json``,
``model.safetensors``, and sharded ``model-0000x-of-0000y.safetensors`` +
``model.safetensors.index.json``. Exports are always safetensors.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Container, Iterator, Mapping
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from job.baichuan import BaichuanConfig, Position, read_config_json
from job.files import publish_dir
from train.models.baichuan.model import BaichuanForCausalLM

HUB_ALLOW_PATTERNS = ["config.json", "*.bin", "*.safetensors", "*.index.json", "tokenizer.model"]
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
HubFormat = Literal["bin", "bin-sharded", "safetensors", "safetensors-sharded"]

# Published RoPE checkpoints carry the cached frequencies; we recompute them instead.
_IGNORED_KEY = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# --------------------------------------------------------------------------------------
# Locating a checkpoint
# --------------------------------------------------------------------------------------
def resolve_checkpoint_dir(name_or_path: str | os.PathLike[str]) -> Path:
    """A local directory as is; otherwise a hub repo id fetched via ``snapshot_download``.

    The download honours the usual Hugging Face cache and ``HF_HUB_OFFLINE``, and fetches
    only what training needs (config, weights, index, ``tokenizer.model``)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    text = str(name_or_path)
    if path.exists():
        raise FileNotFoundError(f"checkpoint path is not a directory: {text}")
    if text.startswith((".", "/", "~")) or not _REPO_ID.match(text):
        raise FileNotFoundError(f"checkpoint directory does not exist: {text}")

    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - huggingface_hub ships with transformers
        raise FileNotFoundError(
            f"{text} is not a local directory and huggingface_hub is not installed"
        ) from e
    try:
        return Path(snapshot_download(text, allow_patterns=HUB_ALLOW_PATTERNS))
    except Exception as e:  # hub errors are many and varied; the user needs one line
        raise FileNotFoundError(
            f"{text} is not a local directory and could not be fetched from the Hugging Face "
            f"hub ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'})"
        ) from e


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------
def _weight_files(ckpt_dir: Path) -> list[Path]:
    """Weight files of a checkpoint, safetensors preferred when both are present."""
    for index_name, single_name in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = ckpt_dir / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index} has no weight_map")
            files = [ckpt_dir / name for name in dict.fromkeys(weight_map.values())]
            missing = [str(f.name) for f in files if not f.is_file()]
            if missing:
                raise FileNotFoundError(f"{index} names missing shard(s): {', '.join(missing)}")
            return files
        if (ckpt_dir / single_name).is_file():
            return [ckpt_dir / single_name]
    raise FileNotFoundError(
        f"no weights in {ckpt_dir} (looked for model.safetensors[.index.json] and "
        "pytorch_model.bin[.index.json])"
    )


def iter_checkpoint_tensors(ckpt_dir: str | os.PathLike[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one file at a time, so peak memory is one shard, not the model."""
    for path in _weight_files(Path(ckpt_dir)):
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        else:
            try:
                # mmap keeps a 10 GB shard out of RAM until each tensor is copied.
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) pickles cannot be memory-mapped
                state = torch.load(path, map_location="cpu", weights_only=True)
            yield from state.items()
            del state


def _describe(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


@torch.no_grad()
def load_weights_into(
    model: nn.Module, ckpt_dir: str | os.PathLike[str], *, allow_unexpected: bool = False
) -> None:
    """Copy a hub checkpoint's tensors into ``model`` in place (dtype converted on copy).

    Strict: every model key must be present and every shape must match. Checkpoint keys the
    model lacks are an error unless ``allow_unexpected`` (a pipeline stage holding only
    some layers wants exactly that); ``rotary_emb.inv_freq`` is always skipped."""
    targets = model.state_dict(keep_vars=True)
    seen: set[str] = set()
    unexpected: list[str] = []
    for name, tensor in iter_checkpoint_tensors(ckpt_dir):
        if _IGNORED_KEY.search(name):
            continue
        target = targets.get(name)
        if target is None:
            unexpected.append(name)
            continue
        if target.shape != tensor.shape:
            raise ValueError(
                f"shape mismatch for {name}: checkpoint {tuple(tensor.shape)} vs model "
                f"{tuple(target.shape)} (wrong config.json or variant override?)"
            )
        target.data.copy_(tensor)
        seen.add(name)
    missing = [k for k in targets if k not in seen]
    problems = []
    if missing:
        problems.append(f"missing keys: {_describe(missing)}")
    if unexpected and not allow_unexpected:
        problems.append(f"unexpected keys: {_describe(unexpected)}")
    if problems:
        raise ValueError(f"checkpoint {ckpt_dir} does not match the model; " + "; ".join(problems))


def build_empty_model(
    cfg: BaichuanConfig, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> BaichuanForCausalLM:
    """Allocate the model once, directly in ``dtype`` on ``device``, without initialising it.

    Built on the meta device first so a 13B model never exists twice (fp32 then cast)."""
    with torch.device("meta"):
        model = BaichuanForCausalLM(cfg)
    model.to(dtype)
    return model.to_empty(device=device)


def load_pretrained(
    ckpt_dir: str | os.PathLike[str],
    *,
    position: Position | None = None,
    norm_head: bool | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[BaichuanForCausalLM, BaichuanConfig]:
    """Build the model described by ``config.json`` and load its published weights."""
    path = resolve_checkpoint_dir(ckpt_dir)
    cfg = BaichuanConfig.from_hf_dict(read_config_json(path), position=position, norm_head=norm_head)
    model = build_empty_model(cfg, dtype=dtype, device=device)
    load_weights_into(model, path)
    return model, cfg


# --------------------------------------------------------------------------------------
# Loading into a sharded or cut model (FSDP/HSDP shards, pipeline stages)
# --------------------------------------------------------------------------------------
def checkpoint_weight_files(ckpt_dir: str | os.PathLike[str]) -> list[Path]:
    """The weight files of a checkpoint, in load order. Raises FileNotFoundError/ValueError as
    the loaders do, without reading any tensor: every rank can check a folder cheaply before
    rank 0 alone starts reading it."""
    return _weight_files(Path(ckpt_dir))


def iter_checkpoint_files(
    ckpt_dir: str | os.PathLike[str], names: Container[str] | None = None
) -> Iterator[tuple[Path, dict[str, torch.Tensor]]]:
    """Yield (file, {name: tensor}) one weight file at a time, ``rotary_emb.inv_freq`` left out.

    For loaders that hand tensors on a file's worth at a time (rank 0 broadcasting to FSDP
    shards): peak memory is one file. With ``names``, only those tensors are read (a pipeline
    stage's share: safetensors files are then read tensor by tensor) and files holding none
    of them yield nothing."""

    def wanted(name: str) -> bool:
        return not _IGNORED_KEY.search(name) and (names is None or name in names)

    for path in _weight_files(Path(ckpt_dir)):
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:
                tensors = {n: f.get_tensor(n) for n in f.keys() if wanted(n)}
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) pickles cannot be memory-mapped
                state = torch.load(path, map_location="cpu", weights_only=True)
            tensors = {n: t for n, t in state.items() if wanted(n)}
            del state
        if tensors:
            yield path, tensors
        del tensors  # before the next file is read: one file in memory, not two


@torch.no_grad()
def copy_full_(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy the whole (unsharded) tensor ``full`` into ``target``: a plain tensor, or a DTensor
    (an FSDP shard) of which only this rank's part is written. No communication: every rank
    that calls it holds ``full``. The dtype is converted on copy (bf16 checkpoint, fp32 model)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(target, DTensor):
        # src_data_rank=None: cut the local part out of this rank's own copy (torch.chunk
        # semantics on the sharded dims, as FSDP2 shards), instead of scattering from rank 0.
        part = distribute_tensor(full.detach(), target.device_mesh, target.placements, src_data_rank=None)
        target.to_local().copy_(part.to_local())
    else:
        target.copy_(full)


def _check_file(
    path: Path, tensors: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]],
    allow_unexpected: bool,
) -> str | None:
    """load_weights_into's checks for one file's tensors against the model's (global) shapes."""
    for name, t in tensors.items():
        if name in shapes and tuple(t.shape) != shapes[name]:
            return (f"shape mismatch for {name}: checkpoint {tuple(t.shape)} vs model {shapes[name]} "
                    "(wrong config.json or variant override?)")
    unexpected = [n for n in tensors if n not in shapes]
    if unexpected and not allow_unexpected:
        return f"checkpoint {path.parent} does not match the model; unexpected keys: {_describe(unexpected)}"
    return None


def _read_error(ckpt_dir: str | os.PathLike[str], e: Exception) -> str:
    detail = str(e).splitlines()[0] if str(e) else "no detail"
    return f"cannot read the checkpoint in {ckpt_dir}: {type(e).__name__}: {detail}"


def _agree_on_error(error: str | None) -> None:
    """Collective: raise the first rank's error (ValueError) on every rank, or return."""
    import torch.distributed as dist

    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    if first:
        raise ValueError(first)


@torch.no_grad()
def load_weights_distributed(
    model: nn.Module, ckpt_dir: str | os.PathLike[str], *, broadcast_from_rank0: bool,
    allow_unexpected: bool = False,
) -> None:
    """Fill a parallelised model's parameters (FSDP shards, or a pipeline rank's stages) from a
    hub checkpoint, with ``load_weights_into``'s checks. Collective over the default group.

    ``broadcast_from_rank0`` (FSDP/HSDP: every rank holds part of every tensor): only global
    rank 0 reads the files, one at a time; each file's tensors reach the other ranks through
    ``set_model_state_dict(..., broadcast_from_rank0=True)``, which broadcasts one tensor at a
    time and keeps each rank's slice. Peak host memory: rank 0 one file, the others one tensor;
    device memory: the shards plus one full tensor in flight.

    Otherwise (pipeline: each rank holds other tensors) every rank reads only the tensors its
    model has, skipping the rest, and keeps its slice where a stage is sharded over its dp ranks.
    ``allow_unexpected`` (broadcast only) tolerates checkpoint keys the model lacks.

    A problem found on any rank (missing keys, shapes, an unreadable file) raises the same
    ValueError on every rank: a bad checkpoint is one line, not a hang in a collective."""
    import torch.distributed as dist

    targets = model.state_dict(keep_vars=True)
    shapes = {n: tuple(t.shape) for n, t in targets.items()}  # DTensor.shape is the global shape
    seen: set[str] = set()
    if not broadcast_from_rank0:
        error = None
        try:
            for path, tensors in iter_checkpoint_files(ckpt_dir, names=shapes):
                error = _check_file(path, tensors, shapes, allow_unexpected=True)
                if error:
                    break
                for name, t in tensors.items():
                    copy_full_(targets[name], t)
                seen.update(tensors)
        except Exception as e:  # any failure to read (truncated file, SafetensorError) must reach the peers
            error = _read_error(ckpt_dir, e)
        missing = [n for n in shapes if n not in seen]
        if not error and missing:
            error = f"checkpoint {ckpt_dir} does not match the model; missing keys: {_describe(missing)}"
        _agree_on_error(error)
        return

    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    # strict=False: each call carries one file's keys; completeness is checked here instead.
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    rank0 = dist.get_rank() == 0
    files = iter_checkpoint_files(ckpt_dir) if rank0 else None
    while True:
        tensors: dict[str, torch.Tensor] = {}
        error = None
        if rank0:
            try:
                path, tensors = next(files, (None, {}))
                if path is not None:
                    error = _check_file(path, tensors, shapes, allow_unexpected)
                    seen.update(tensors)
                else:
                    missing = [n for n in shapes if n not in seen]
                    if missing:
                        error = f"checkpoint {ckpt_dir} does not match the model; missing keys: {_describe(missing)}"
            except Exception as e:  # any failure to read must reach the peers waiting in the broadcast
                error = _read_error(ckpt_dir, e)
        # Rank 0 says whether a file follows (and whether it is bad) before anyone enters the
        # broadcast inside set_model_state_dict.
        box = [(bool(tensors), error)]
        dist.broadcast_object_list(box, src=0)
        more, error = box[0]
        if error:
            raise ValueError(error)
        if not more:
            return
        tensors = {n: t for n, t in tensors.items() if n in shapes}  # unexpected ones, if allowed
        set_model_state_dict(model, tensors if rank0 else {}, options=options)
        del tensors


# --------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------
def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _plan_shards(
    state_dict: Mapping[str, torch.Tensor], max_shard_size_bytes: int
) -> list[dict[str, torch.Tensor]]:
    """Greedy in key order, so each layer's tensors stay together like the published shards.
    A single tensor larger than the limit gets a shard of its own."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state_dict.items():
        n = _nbytes(tensor)
        if shards[-1] and size + n > max_shard_size_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += n
    return shards


def _write_atomically(out_dir: Path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` fills a fresh folder, which then replaces `out_dir` (an old export) in one
    step: a crash before the swap leaves the old export untouched and only a hidden temp dir."""

    def write_for_the_team(tmp: Path) -> None:
        write(tmp)
        # safetensors makes its files 0600: an export is for the team, so they get the modes a
        # plain open would (the user's umask), as the folder does.
        umask = os.umask(0)
        os.umask(umask)
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)

    publish_dir(out_dir, write_for_the_team, replace_existing=True, fsync=True)
    return Path(out_dir)


def _cpu_contiguous(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU tensors that each own their whole storage, as safetensors demands.

    Clones only what needs it (views, shared or tied storage): a gathered 13B state dict
    is already ~26 GB on rank 0 and must not be copied wholesale."""
    out: dict[str, torch.Tensor] = {}
    seen_storage: set[int] = set()
    for k, v in state_dict.items():
        if _IGNORED_KEY.search(k):
            continue
        t = v.detach().to("cpu")
        storage = t.untyped_storage()
        if (
            not t.is_contiguous()
            or t.storage_offset() != 0
            or storage.nbytes() != _nbytes(t)
            or storage.data_ptr() in seen_storage
        ):
            t = t.clone()
            storage = t.untyped_storage()
        seen_storage.add(storage.data_ptr())
        out[k] = t
    return out


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_safetensors(folder: Path, tensors: Mapping[str, torch.Tensor], max_shard_size_bytes: int) -> None:
    """`model.safetensors`, or shards plus `model.safetensors.index.json` (the hub's layout)."""
    from safetensors.torch import save_file

    shards = _plan_shards(tensors, max_shard_size_bytes)
    meta = {"format": "pt"}  # transformers refuses safetensors files without it
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata=meta)
        return
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata=meta)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(_nbytes(t) for t in tensors.values())
    _write_json(folder / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def save_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    cfg: BaichuanConfig,
    out_dir: str | os.PathLike[str],
    *,
    max_shard_size_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    tokenizer_file: str | os.PathLike[str] | None = None,
    export_format: Literal["baichuan", "llama"] = "baichuan",
) -> Path:
    """Export a full state dict (published key names) as a hub-layout safetensors checkpoint.

    One ``model.safetensors`` up to ``max_shard_size_bytes``; above it
    ``model-0000x-of-0000y.safetensors`` plus ``model.safetensors.index.json``. The whole
    directory appears at once (written to a temp dir, then renamed), with a README.md saying
    what loads it. ``export_format="llama"`` writes a stock LlamaForCausalLM instead (RoPE
    variants only; train/models/baichuan/llama_export.py)."""
    if export_format == "llama":
        from train.models.baichuan.llama_export import save_llama_state_dict

        return save_llama_state_dict(state_dict, cfg, out_dir, max_shard_size_bytes=max_shard_size_bytes,
                                     tokenizer_file=tokenizer_file)

    tensors = _cpu_contiguous(state_dict)
    if not tensors:
        raise ValueError("refusing to export an empty state dict")
    dtypes = {t.dtype for t in tensors.values()}
    torch_dtype = tensors["lm_head.weight"].dtype if "lm_head.weight" in tensors else dtypes.pop()
    if tokenizer_file is not None and not Path(tokenizer_file).is_file():
        raise FileNotFoundError(f"tokenizer file does not exist: {tokenizer_file}")

    def write(tmp: Path) -> None:
        write_safetensors(tmp, tensors, max_shard_size_bytes)
        _write_json(tmp / "config.json", cfg.to_hf_dict(torch_dtype=torch_dtype))
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, tmp / "tokenizer.model")
            _write_json(tmp / "tokenizer_config.json", cfg.tokenizer_config())
        (tmp / "README.md").write_text(baichuan_layout_readme(cfg))

    return _write_atomically(Path(out_dir), write)


def baichuan_layout_readme(cfg: BaichuanConfig) -> str:
    """What an export in the published layout loads with (measured, issue 12): the published remote
    code gives the project's logits only on transformers 4.33–4.40; from 5.x it fails."""
    repo, _ = cfg.published_code()
    return f"""# Fine-tuned Baichuan, published hub layout

Written by mlaunch: the weights under Baichuan's own names (`W_pack`, ...), a `config.json` whose
`auto_map` points at the remote code of `{repo}`, and the SentencePiece `tokenizer.model`.

* **mlaunch** needs no transformers at all: `mlaunch generate <this folder or the run's output_dir>
  --prompt "..."` and `mlaunch eval <the run's output_dir>`.
* **transformers with the published remote code** (`trust_remote_code=True`): transformers
  **>= 4.33, < 4.41** (`pip install "transformers>=4.33,<4.41"`); there it gives the project's
  logits (measured). Its published tokenizer class breaks from 4.34 on (read `tokenizer.model` with
  `sentencepiece` there), and the published models fail in transformers 5.x (NaN logits,
  meta-tensor errors).
* **Today's transformers without remote code**: export the RoPE models (Baichuan-7B,
  Baichuan2-7B) with `train.checkpoint.export_format: llama`, which writes a stock
  `LlamaForCausalLM` folder instead.
"""


def save_pretrained(
    model: nn.Module,
    cfg: BaichuanConfig,
    out_dir: str | os.PathLike[str],
    max_shard_size_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    tokenizer_file: str | os.PathLike[str] | None = None,
) -> Path:
    """Export a (non-sharded, complete) model; see ``save_state_dict``."""
    return save_state_dict(
        model.state_dict(),
        cfg,
        out_dir,
        max_shard_size_bytes=max_shard_size_bytes,
        tokenizer_file=tokenizer_file,
    )


# --------------------------------------------------------------------------------------
# Test helper: write the layouts the hub actually serves
# --------------------------------------------------------------------------------------
def write_hub_checkpoint(
    model: nn.Module, cfg: BaichuanConfig, out_dir: str | os.PathLike[str], fmt: HubFormat
) -> Path:
    """Write ``model`` as a published-style checkpoint in layout ``fmt`` (for tests).

    RoPE checkpoints get the ``rotary_emb.inv_freq`` entries the published .bin files carry,
    so loaders are exercised on them too. Sharded layouts use two shards."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = _cpu_contiguous(model.state_dict())
    if cfg.position == "rope" and fmt.startswith("bin"):
        inv_freq = 1.0 / (
            cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim)
        )
        for i in range(cfg.num_hidden_layers):
            state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    torch_dtype = next(iter(state.values())).dtype
    _write_json(out / "config.json", cfg.to_hf_dict(torch_dtype=torch_dtype))

    if fmt == "bin":
        torch.save(state, out / "pytorch_model.bin")
    elif fmt == "safetensors":
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    elif fmt in ("bin-sharded", "safetensors-sharded"):
        keys = list(state)
        halves = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
        is_bin = fmt == "bin-sharded"
        weight_map = {}
        for i, part in enumerate(halves, start=1):
            shard = {k: state[k] for k in part}
            if is_bin:
                name = f"pytorch_model-{i:05d}-of-00002.bin"
                torch.save(shard, out / name)
            else:
                name = f"model-{i:05d}-of-00002.safetensors"
                save_file(shard, str(out / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, name))
        index = "pytorch_model.bin.index.json" if is_bin else "model.safetensors.index.json"
        total = sum(_nbytes(t) for t in state.values())
        _write_json(out / index, {"metadata": {"total_size": total}, "weight_map": weight_map})
    else:
        raise ValueError(f"unknown checkpoint format {fmt!r}")
    return out
