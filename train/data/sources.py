"""Where rows come from: a hub dataset, a local .csv/.json/.jsonl/.parquet file or folder of
them, or the bundled sample (`train/data/bitext_sample.jsonl`, made by scripts/make_sample.py).

`data.path` is read relative to the working directory, else to the project root, so
`train/data/bitext_sample.jsonl` works from anywhere in a checkout."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import datasets

from job.config import DataConfig
from job.errors import ConfigError

LOCAL_FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_PROJECT_ROOT = Path(__file__).resolve().parents[2]


def load_rows(cfg: DataConfig) -> datasets.Dataset:
    """The raw rows of `cfg.path` (hub name, or a local file or folder), split `cfg.split`,
    cut to `cfg.max_rows`. A local path that does not exist is a ConfigError naming it."""
    local = resolve_local_path(cfg.path)
    try:
        if local is None:
            ds = datasets.load_dataset(cfg.path, split=cfg.split)
        else:
            ds = _load_local(local, cfg.split)
    except ConfigError:
        raise
    except Exception as e:  # datasets raises many kinds; the user needs one line, not a traceback
        what = f"hub dataset {cfg.path!r}" if local is None else str(local)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        hint = ("check the name, the network or the HF cache, or point data.path at a local "
                ".csv/.json/.jsonl/.parquet file") if local is None else "check the file's format and data.split"
        raise ConfigError(f"data.path: cannot load {what} (split {cfg.split!r}): {first}; {hint}") from e
    if cfg.max_rows is not None and cfg.max_rows < len(ds):
        ds = ds.select(range(cfg.max_rows))
    return ds


def resolve_local_path(path: str) -> Path | None:
    """The local file/folder `path` names, or None for a hub dataset name.

    Anything that looks like a path (has a data-file extension, or starts with / . ~) but does
    not exist is a ConfigError: silently asking the hub for it would fail far less clearly."""
    p = Path(os.path.expanduser(path))
    if p.exists():
        return p
    if not p.is_absolute() and (_PROJECT_ROOT / p).exists():
        return _PROJECT_ROOT / p
    if p.suffix.lower() in LOCAL_FORMATS or path.startswith(("/", ".", "~")):
        raise ConfigError(f"data.path: {p} does not exist; fix the path (relative paths are read from "
                          f"the working directory {Path.cwd()}) or give a hub dataset name")
    return None


def _load_local(path: Path, split: str) -> datasets.Dataset:
    files = [path] if path.is_file() else sorted(
        f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in LOCAL_FORMATS
        and not any(part.startswith(".") for part in f.relative_to(path).parts))
    formats = {LOCAL_FORMATS.get(f.suffix.lower()) for f in files}
    if not files or None in formats:
        raise ConfigError(f"data.path: {path} is not a .csv/.json/.jsonl/.parquet file nor a folder of them")
    if len(formats) > 1:
        raise ConfigError(f"data.path: {path} mixes {sorted(formats)} files; keep one format per folder")
    builder = formats.pop()
    kwargs: dict[str, Any] = {}
    if builder == "csv":
        # Read every CSV column as text: pandas would otherwise guess numbers (and turn "NA",
        # "None" or an empty cell into NaN), so a digits-only instruction would stop being text.
        kwargs.update(features=_csv_text_features(files[0]), keep_default_na=False)
    if path.is_file():
        base = split.split("[")[0]  # "train[:10%]" reads the file as split "train"
        return datasets.load_dataset(builder, data_files={base: str(path)}, split=split, **kwargs)
    return datasets.load_dataset(builder, data_dir=str(path), split=split, **kwargs)


def _csv_text_features(file: Path) -> datasets.Features:
    import csv

    with open(file, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), [])
    return datasets.Features({name: datasets.Value("string") for name in header})


def source_identity(d: DataConfig) -> tuple[str, str, datasets.Dataset | None]:
    """(name for messages, identity for cache keys, rows if they had to be loaded already).

    Local data: path + size + mtime of every file, so an edited file is re-tokenised. Hub data:
    the loaded dataset's fingerprint (it changes with the cached revision)."""
    local = resolve_local_path(d.path)
    if local is None:
        rows = load_rows(d)
        return d.path, f"hub:{d.path}:{rows._fingerprint}", rows
    files = [local] if local.is_file() else sorted(f for f in local.rglob("*") if f.is_file())
    parts = [f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
    return str(local), "|".join(parts), None
