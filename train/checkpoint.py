"""Resumable checkpoints with torch.distributed.checkpoint (DCP), written atomically.

Layout of `<checkpoint.dir>/step_000123/`:
  .metadata, __<rank>_0.distcp   DCP: model + optimizer, keyed by published parameter names,
                                 each rank writing its own shard (readable under any strategy)
  trainer.pt                     rank 0: step, epoch, position in the epoch, scheduler, sampler
  rng_rank<r>.pt                 each rank: torch CPU/CUDA, python and numpy RNG states
  COMPLETE                       JSON: step and every file with its size; written last

Atomicity: every rank writes into `step_000123.tmp/`; after a barrier rank 0 writes COMPLETE and
renames the folder to `step_000123/` (one rename: a folder without `.tmp` always has its marker).
Readers take only folders with the marker, so a run killed mid-save resumes from the previous
checkpoint; rank 0 deletes such leftovers on the next start. Pruning removes COMPLETE before the
files, so a crash while deleting never leaves a "complete" checkpoint with missing shards.

The checkpoint folder must be on a filesystem every rank sees (a shared one across nodes).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp

from job.errors import ConfigError
from train import distributed as D

MARKER = "COMPLETE"
TRAINER_FILE = "trainer.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


# ------------------------------------------------------------------------------ discovery
def is_complete(path: Path) -> bool:
    """A checkpoint is usable when its marker exists and every file it lists has its size."""
    marker = path / MARKER
    if not marker.is_file():
        return False
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError):
        return False
    return all((path / name).is_file() and (path / name).stat().st_size == size for name, size in files.items())


def complete_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    found = []
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir() and is_complete(p):
                found.append((int(m.group(1)), p))
    return sorted(found)


def clean_incomplete(ckpt_dir: Path) -> list[Path]:
    """Delete half-written checkpoints (`.tmp` folders, step folders without a valid marker).
    Rank 0 only, at start, before any rank saves."""
    removed = []
    if not ckpt_dir.is_dir():
        return removed
    for p in ckpt_dir.iterdir():
        tmp = p.name.endswith(".tmp") and _STEP_DIR.match(p.name[: -len(".tmp")])
        if p.is_dir() and (tmp or (_STEP_DIR.match(p.name) and not is_complete(p))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def find_resume(ckpt_dir: Path, resume: str) -> Path | None:
    """`auto`: the newest complete checkpoint (None if there is none); `never`: None; else the
    given checkpoint, which must be complete."""
    if resume == "never":
        return None
    if resume == "auto":
        found = complete_checkpoints(ckpt_dir)
        return found[-1][1] if found else None
    path = Path(resume).expanduser()
    if not path.is_dir():
        raise ConfigError(f"train.checkpoint.resume: {path} is not a folder; use `auto`, `never` or a step_* checkpoint folder")
    if not is_complete(path):
        raise ConfigError(f"train.checkpoint.resume: {path} has no valid {MARKER} marker (half-written?); pick another checkpoint")
    return path


# ------------------------------------------------------------------------------ RNG state
def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        # numpy's key array as a tensor: the file then loads with weights_only=True.
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ------------------------------------------------------------------------------ save / load
def _fsync_tree(path: Path) -> None:
    for f in [*path.iterdir(), path]:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save(ckpt_dir: Path, step: int, par, optimizer: torch.optim.Optimizer, trainer_state: dict[str, Any],
         keep: int) -> Path:
    """Write the checkpoint of `step` atomically and prune to the newest `keep`. Collective."""
    final = ckpt_dir / step_dir_name(step)
    tmp = ckpt_dir / (final.name + ".tmp")
    if D.is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)  # leftover of a crash at this very step
        tmp.mkdir(parents=True)
    D.barrier()
    state = {"model": _trained_state(par), "optim": par.optim_state_dict(optimizer)}
    with _single_process_ok():
        dcp.save(state, checkpoint_id=str(tmp), no_dist=not D.is_initialized())
    rank = D.get_rank()
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    if rank == 0:
        torch.save(trainer_state, tmp / TRAINER_FILE)
    D.barrier()  # every rank's files are in place
    if rank == 0:
        _fsync_tree(tmp)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        marker = tmp / MARKER
        marker.write_text(json.dumps({"step": step, "world_size": D.get_world_size(), "files": files}, indent=1))
        _fsync_tree(tmp)
        if final.exists():  # a complete checkpoint of the same step from an earlier attempt
            _remove(final)
        os.replace(tmp, final)
        _prune(ckpt_dir, keep)
    D.barrier()  # nobody reads or saves again before the rename
    return final


@contextlib.contextmanager
def _single_process_ok():
    """Alone (no process group) DCP warns that it assumes one process: that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _remove(path: Path) -> None:
    # Marker first: an interrupted delete leaves an incomplete folder, never a broken "complete" one.
    (path / MARKER).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def _prune(ckpt_dir: Path, keep: int) -> None:
    for _, path in complete_checkpoints(ckpt_dir)[:-keep]:
        _remove(path)


def _frozen_names(par) -> set[str]:
    return {name for name, p in par.named_parameters() if not p.requires_grad}


def _trained_state(par) -> dict[str, Any]:
    """The model state a checkpoint holds: what trains. With LoRA only the adapters (the frozen
    base is rebuilt from its source on resume): a 13B checkpoint of megabytes, not 26 GB."""
    state = par.model_state_dict()
    if not _frozen_names(par):
        return state
    # Kept by name: QLoRA's 4-bit layers add quantisation constants to the state dict as well.
    trained = {name for name, p in par.named_parameters() if p.requires_grad}
    return {k: v for k, v in state.items() if k in trained}


def load(path: Path, par, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model, optimizer and this rank's RNG from `path`; return the trainer state.
    Collective. Must run after the optimizer and scheduler exist, and before the first step."""
    state = {"model": _trained_state(par), "optim": par.optim_state_dict(optimizer)}
    with _single_process_ok():
        dcp.load(state, checkpoint_id=str(path), no_dist=not D.is_initialized())
    if _frozen_names(par):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        # Only what trains was saved; the frozen base is already in place (built from its source).
        set_model_state_dict(par.state_dict_module(), state["model"], options=StateDictOptions(strict=False))
    else:
        par.load_model_state_dict(state["model"])
    par.load_optim_state_dict(optimizer, state["optim"])
    rng_file = path / f"rng_rank{D.get_rank()}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    # else: resumed at another world size; the seeded streams stay (no dropout in the model).
    return torch.load(path / TRAINER_FILE, weights_only=True)


def check_shared(ckpt_dir: Path, is_rank0: bool) -> None:
    """Every rank must see the same checkpoint folder: DCP has each rank write its own shard and
    rank 0 seal the folder. On node-local disks rank 0 would seal a folder missing the other
    nodes' shards, a checkpoint that looks complete and is not. Collective; one line if not."""
    import uuid

    from job.errors import ConfigError
    from train import distributed as D

    if not D.is_initialized() or D.get_world_size() == 1:
        return
    token = D.broadcast_object(uuid.uuid4().hex if is_rank0 else None)
    probe = ckpt_dir / f".shared-check-{token}"
    if is_rank0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text(token)
    D.barrier()
    missing = torch.tensor([0.0 if probe.is_file() else 1.0])
    D.all_reduce_sum(missing)
    D.barrier()
    if is_rank0:
        probe.unlink(missing_ok=True)
    if missing.item():
        raise ConfigError(f"train.checkpoint.dir {ckpt_dir} is not one folder for every node ({int(missing.item())} "
                          "rank(s) cannot see rank 0's files); put it (or train.output_dir) on shared storage")
