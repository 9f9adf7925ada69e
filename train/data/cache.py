"""The tokenised cache: rows → examples once per node, saved under the run's output directory in a
folder keyed by everything that decides its contents, memory-mapped by every local rank.

Local rank 0 builds it (or finds it) while the node's other ranks wait at a barrier; the folder
is published atomically, so a reader, a crash or another node sharing the directory never sees
half of it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from job.config import TrainConfig
from job.errors import ConfigError, MlaunchError
from job.files import publish_dir
from train.data.examples import drop_bad_rows, split_indices, tokenize_rows
from train.data.sources import load_rows, source_identity
from train.distributed import local_rank0_first

log = logging.getLogger(__name__)

# Bump when the tokenised output changes for the same inputs, so old caches are not reused.
CACHE_VERSION = 1


@dataclass(frozen=True)
class DataStats:
    rows: int  # rows read (after max_rows)
    skipped: int  # bad rows dropped
    train_examples: int
    eval_examples: int
    train_tokens: int  # real tokens in the training split, per epoch
    mean_length: float  # over all kept examples, EOS included
    p95_length: float
    max_length: int  # longest example seen
    at_max_length: int  # examples at `data.max_length` (almost all of them truncated)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PreparedData:
    train: datasets.Dataset  # columns input_ids, labels, length
    eval: datasets.Dataset | None
    skipped: int
    stats: DataStats
    from_cache: bool  # True when this call reused a tokenised cache (nothing was re-tokenised)
    cache_path: Path


def prepare_data(cfg: TrainConfig, tokenizer: Any, cache_dir: str | os.PathLike, *, local_rank: int,
                 barrier: Callable[[], None]) -> PreparedData:
    """Load, clean, tokenise and split the data once per node; every rank gets the same result.

    Local rank 0 does the work, or finds it cached under `cache_dir` in a folder keyed by a hash
    of the data source (path, size and mtime of its files; a hub dataset's fingerprint), the
    template, columns, max_length, loss_on, split settings and the tokenizer file. The other
    local ranks wait at `barrier`, then compute the same key and memory-map the saved arrow
    files. Every rank calls `barrier` exactly once, also when rank 0 fails, so a bad config never
    leaves the others hanging. `tokenizer` needs `encode`/`encode_batch`, `eos_id`, `model_file`."""
    cache_dir = Path(cache_dir)
    built = local_rank0_first(lambda: _find_or_build(cfg, tokenizer, cache_dir), local_rank=local_rank,
                              barrier=barrier)
    if built is None:
        # After the barrier: for a hub dataset rank 0 has filled the HF cache by now.
        _, key, _ = _data_key(cfg, tokenizer)
        from_cache = True
    else:
        key, from_cache = built
    final = cache_dir / f"data-{key}"
    if not (final / "meta.json").is_file():
        raise MlaunchError(f"local rank 0 did not prepare {final}; see its error above")
    meta = json.loads((final / "meta.json").read_text())
    train = datasets.load_from_disk(str(final / "train"))
    evals = datasets.load_from_disk(str(final / "eval")) if (final / "eval").is_dir() else None
    stats = DataStats(**meta["stats"])
    return PreparedData(train, evals, stats.skipped, stats, from_cache, final)


def _find_or_build(cfg: TrainConfig, tokenizer: Any, cache_dir: Path) -> tuple[str, bool]:
    """(cache key, True if the cache was there already); local rank 0 only."""
    source, key, rows = _data_key(cfg, tokenizer)
    final = cache_dir / f"data-{key}"
    if (final / "meta.json").is_file():
        return key, True
    # Published folders are complete (atomic rename); one without meta.json was
    # tampered with: rebuild it rather than fail on every run.
    shutil.rmtree(final, ignore_errors=True)
    _build(cfg, tokenizer, final, key, source, rows)
    return key, False


def _data_key(cfg: TrainConfig, tokenizer: Any) -> tuple[str, str, datasets.Dataset | None]:
    source, identity, rows = source_identity(cfg.data)
    key = cache_key({"what": "data", "v": CACHE_VERSION, "source": identity, **data_settings(cfg),
                     "max_length": cfg.data.max_length, "loss_on": cfg.data.loss_on,
                     "tokenizer": _file_hash(Path(tokenizer.model_file))})
    return source, key, rows


def data_settings(cfg: TrainConfig) -> dict[str, Any]:
    """What decides which rows and texts are used (shared by the data and tokenizer cache keys)."""
    d = cfg.data
    return {"split": d.split, "max_rows": d.max_rows, "columns": d.columns.model_dump(), "template": d.template,
            "bad_rows": d.bad_rows, "eval_fraction": d.eval_fraction, "seed": cfg.seed}


def _build(cfg: TrainConfig, tokenizer: Any, final: Path, key: str, source: str,
           rows: datasets.Dataset | None) -> None:
    d = cfg.data
    rows = load_rows(d) if rows is None else rows
    n_rows = len(rows)
    clean, skipped = drop_bad_rows(rows, d, source)
    train_idx, eval_idx = split_indices(len(clean), d.eval_fraction, cfg.seed)
    tokens = tokenize_rows(clean, d, tokenizer, fingerprint=key)
    lengths = np.asarray(tokens["length"][:], dtype=np.int64)
    if len(lengths) == 0:
        raise ConfigError(f"{source}: no usable rows ({skipped} bad row(s) skipped); check data.columns and the file")
    stats = DataStats(
        rows=n_rows, skipped=skipped, train_examples=len(train_idx), eval_examples=len(eval_idx),
        train_tokens=int(lengths[train_idx].sum()), mean_length=round(float(lengths.mean()), 2),
        p95_length=round(float(np.percentile(lengths, 95)), 2), max_length=int(lengths.max()),
        at_max_length=int((lengths >= d.max_length).sum()))

    def write(tmp: Path) -> None:
        tokens.select(train_idx).save_to_disk(str(tmp / "train"))
        if len(eval_idx):
            tokens.select(eval_idx).save_to_disk(str(tmp / "eval"))
        (tmp / "meta.json").write_text(json.dumps({"key": key, "source": source, "stats": stats.to_dict()}, indent=1))

    publish_dir(final, write, replace_existing=False)  # another node may publish the same folder first
    log.info("tokenised %s: %s → %s", source, stats.to_dict(), final)


def cache_key(payload: Mapping[str, Any]) -> str:
    """A short stable hash of `payload` (the name of a cache entry)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
