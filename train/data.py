"""Data: rows → prompt text → token ids (once per node, cached) → length-grouped batches.

The tutorial this project grew from pads every example to 1024 tokens although the Bitext rows
average ~150: most of each step's compute went into padding. Here every example is tokenised
once (one process per node, cached under the run's output directory), batches are built from
examples of similar length and padded only to the longest of the batch, so nearly every token a
GPU processes is real.

The flow, as the training entry point uses it::

    tok_path = ensure_tokenizer(cfg, model_dir, cache_dir, local_rank=lr, barrier=dist.barrier)
    data = prepare_data(cfg, BaichuanTokenizer(tok_path), cache_dir, local_rank=lr, barrier=dist.barrier)
    sampler = make_batch_sampler(cfg.data, data.train["length"], dp_rank=r, dp_size=w, seed=cfg.seed)
    for batch in iter_batches(data.train, sampler, cfg.data): ...   # input_ids, attention_mask, labels

Conventions: no BOS is added (Baichuan's published tokenizer configs do not add one); every
example ends with EOS (id 2), also when truncated; pads are id 0 with label -100.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import shutil
import string
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from job.config import DataConfig, TrainConfig
from job.errors import ConfigError, MlaunchError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label value cross-entropy skips (PyTorch's and HF's default)
PAD_ID = 0  # Baichuan pads with <unk>
EOS_ID = 2
LOCAL_FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# Bump when the tokenised output changes for the same inputs, so old caches are not reused.
CACHE_VERSION = 1
# `data.path` relative to the working directory, else to the project root (the bundled sample).
_PROJECT_ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------- loading
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


# ------------------------------------------------------------------------- template and rows
@dataclass(frozen=True)
class PromptTemplate:
    """`cfg.template` split at its first `{response}`: the prompt is the text before it."""

    prompt: str  # format string of the prompt (everything before `{response}`)
    rest: str  # format string from `{response}` on (the answer and any suffix)
    fields: tuple[str, ...]  # template field names, in order of first use

    @classmethod
    def parse(cls, template: str) -> "PromptTemplate":
        prompt: list[str] = []
        rest: list[str] = []
        fields: list[str] = []
        seen_response = False
        try:
            pieces = list(string.Formatter().parse(template))
        except ValueError as e:
            raise ConfigError(f"data.template: {e}; write literal braces as {{{{ and }}}}") from e
        for literal, name, spec, conv in pieces:
            out = rest if seen_response else prompt
            out.append(literal.replace("{", "{{").replace("}", "}}"))
            if name is None:
                continue
            if not name.isidentifier():
                raise ConfigError(f"data.template: field {{{name}}} is not a column name; use names such as "
                                  "{instruction} and {response}")
            if name not in fields:
                fields.append(name)
            text = "{" + name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
            if name == "response" and not seen_response:
                seen_response = True
                rest.append(text)
            else:
                (rest if seen_response else prompt).append(text)
        if not seen_response:
            raise ConfigError("data.template: has no {response} field; the text before it is the prompt, "
                              "so the template must contain {response}")
        return cls("".join(prompt), "".join(rest), tuple(fields))

    def format(self, values: Mapping[str, str]) -> tuple[str, str]:
        return self.prompt.format_map(values), self.rest.format_map(values)


def column_for(field: str, cfg: DataConfig, available: Sequence[str]) -> str:
    """The dataset column that fills template field `field` (cfg.columns, else the same name)."""
    mapped = getattr(cfg.columns, field, None) if field in type(cfg.columns).model_fields else None
    if field == "flags" and mapped is None:
        # `flags` in the hub schema, `tags` in the older Bitext release.
        mapped = next((c for c in ("flags", "tags") if c in available), "flags")
    column = mapped or field
    if column not in available:
        close = difflib.get_close_matches(column, available, n=1, cutoff=0.6)
        hint = f"did you mean `{close[0]}`?" if close else f"columns are: {', '.join(available)}"
        key = f"data.columns.{field}" if field in type(cfg.columns).model_fields else f"data.template {{{field}}}"
        raise ConfigError(f"{key}: column `{column}` is not in the dataset; {hint}")
    return column


def _bad_value(value: Any) -> str | None:
    if value is None:
        return "is missing"
    if not isinstance(value, str):
        return f"is a {type(value).__name__} ({value!r:.40}), not text"
    if not value.strip():
        return "is empty"
    return None


def drop_bad_rows(ds: datasets.Dataset, cfg: DataConfig, source: str, *, quiet: bool = False) -> tuple[datasets.Dataset, int]:
    """Rows whose template fields are missing/None/empty/non-text: dropped and counted
    (`bad_rows: skip`), or a ConfigError naming the first one (`bad_rows: error`)."""
    template = PromptTemplate.parse(cfg.template)
    columns = {f: column_for(f, cfg, ds.column_names) for f in template.fields}
    bad: list[int] = []
    first: tuple[int, str, str, str] | None = None
    # Whole columns at once: datasets decodes them (mixed-type JSON columns included) in C.
    values = {f: ds[c][:] for f, c in columns.items()}
    for i in range(len(ds)):
        for f in template.fields:
            reason = _bad_value(values[f][i])
            if reason is not None:
                bad.append(i)
                first = first or (i, f, columns[f], reason)
                break
    if bad and cfg.bad_rows == "error":
        i, f, col, reason = first  # type: ignore[misc]
        raise ConfigError(f"{source}: row {i} (0-based): field `{f}` (column `{col}`) {reason}; fix the row "
                          f"or set train.data.bad_rows: skip ({len(bad)} bad row(s) in all)")
    if bad:
        i, f, col, reason = first  # type: ignore[misc]
        # Said once per job (global rank 0), not once per rank and per pass over the rows.
        if not quiet and os.environ.get("RANK", "0") == "0":
            log.warning("skipped %d bad row(s) of %s (first: row %d, field `%s` %s)", len(bad), source, i, f, reason)
        bad_set = set(bad)
        ds = ds.select([i for i in range(len(ds)) if i not in bad_set])
    return ds, len(bad)


def split_indices(n: int, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) row indices: a seeded random `eval_fraction` held out, both sorted."""
    if eval_fraction <= 0:
        return np.arange(n), np.arange(0)
    n_eval = max(1, round(n * eval_fraction))
    if n_eval >= n:
        raise ConfigError(f"data.eval_fraction: {eval_fraction} of {n} rows leaves nothing to train on; lower it")
    perm = np.random.default_rng(_seed_words(seed, 0x5EED)).permutation(n)
    return np.sort(perm[n_eval:]), np.sort(perm[:n_eval])


def _seed_words(*values: int) -> list[int]:
    # SeedSequence wants non-negative ints; the config's seed may be negative.
    return [v % 2**63 for v in values]


# ---------------------------------------------------------------------------------- tokenising
class _Tokenize:
    """The batched `datasets.map` function: format, encode prompt and rest, append EOS, truncate.

    Prompt and answer are encoded separately and concatenated, so the prompt/answer boundary is
    a token boundary and `loss_on: response` masks exactly the prompt's tokens."""

    def __init__(self, tokenizer: Any, cfg: DataConfig, columns: Mapping[str, str]) -> None:
        self.tokenizer = tokenizer
        self.template = PromptTemplate.parse(cfg.template)
        self.columns = dict(columns)
        self.max_length = cfg.max_length
        self.mask_prompt = cfg.loss_on == "response"
        self.eos_id = getattr(tokenizer, "eos_id", EOS_ID)

    def __call__(self, batch: Mapping[str, list]) -> dict[str, list]:
        n = len(batch[next(iter(self.columns.values()))])
        texts = [self.template.format({f: batch[c][i] for f, c in self.columns.items()}) for i in range(n)]
        prompts = _encode_many(self.tokenizer, [p for p, _ in texts])
        rests = _encode_many(self.tokenizer, [r for _, r in texts])
        input_ids, labels, lengths = [], [], []
        for p, r in zip(prompts, rests):
            ids = (list(p) + list(r))[: self.max_length - 1] + [self.eos_id]  # EOS survives truncation
            if self.mask_prompt:
                n_prompt = min(len(p), len(ids) - 1)  # EOS keeps its label even after a cut
                lab = [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
            else:
                lab = ids
            input_ids.append(ids)
            labels.append(lab)
            lengths.append(len(ids))
        return {"input_ids": input_ids, "labels": labels, "length": lengths}


def _encode_many(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    batch = getattr(tokenizer, "encode_batch", None)
    return batch(texts) if batch is not None else tokenizer.encode(texts)


_TOKENIZED_FEATURES = datasets.Features({
    "input_ids": datasets.List(datasets.Value("int32")),  # int32: Baichuan2's 125,696 ids fit
    "labels": datasets.List(datasets.Value("int32")),
    "length": datasets.Value("int32"),
})


def tokenize_rows(ds: datasets.Dataset, cfg: DataConfig, tokenizer: Any, fingerprint: str) -> datasets.Dataset:
    """Clean rows → input_ids / labels / length, in memory (the caller saves the result)."""
    template = PromptTemplate.parse(cfg.template)
    columns = {f: column_for(f, cfg, ds.column_names) for f in template.fields}
    return ds.map(
        _Tokenize(tokenizer, cfg, columns), batched=True, remove_columns=ds.column_names,
        features=_TOKENIZED_FEATURES, num_proc=cfg.num_proc if cfg.num_proc > 1 else None,
        keep_in_memory=True, load_from_cache_file=False,
        # Our own key, so datasets does not hash the tokenizer object (slow, and it warns).
        new_fingerprint=fingerprint, desc="tokenising",
    )


# ------------------------------------------------------------------------- prepare, cached
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
    from_cache = True
    error: Exception | None = None
    if local_rank == 0:
        try:
            source, key, rows = _data_key(cfg, tokenizer)
            final = cache_dir / f"data-{key}"
            if not (final / "meta.json").is_file():
                # Published folders are complete (atomic rename); one without meta.json was
                # tampered with: rebuild it rather than fail on every run.
                shutil.rmtree(final, ignore_errors=True)
                from_cache = False
                _build(cfg, tokenizer, final, key, source, rows)
        except Exception as e:  # re-raised after the barrier
            error = e
    barrier()
    if error is not None:
        raise error
    if local_rank != 0:
        # After the barrier: for a hub dataset rank 0 has filled the HF cache by now.
        _, key, _ = _data_key(cfg, tokenizer)
    final = cache_dir / f"data-{key}"
    if not (final / "meta.json").is_file():
        raise MlaunchError(f"local rank 0 did not prepare {final}; see its error above")
    meta = json.loads((final / "meta.json").read_text())
    train = datasets.load_from_disk(str(final / "train"))
    evals = datasets.load_from_disk(str(final / "eval")) if (final / "eval").is_dir() else None
    stats = DataStats(**meta["stats"])
    return PreparedData(train, evals, stats.skipped, stats, from_cache, final)


def _data_key(cfg: TrainConfig, tokenizer: Any) -> tuple[str, str, datasets.Dataset | None]:
    source, identity, rows = _source_identity(cfg.data)
    key = _hash({"what": "data", "v": CACHE_VERSION, "source": identity, **_data_settings(cfg),
                 "max_length": cfg.data.max_length, "loss_on": cfg.data.loss_on,
                 "tokenizer": _file_hash(Path(tokenizer.model_file))})
    return source, key, rows


def _data_settings(cfg: TrainConfig) -> dict[str, Any]:
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

    _publish_dir(final, write)
    log.info("tokenised %s: %s → %s", source, stats.to_dict(), final)


def _publish_dir(final: Path, write: Callable[[Path], None]) -> None:
    """Write into a private temp folder, then rename it into place: a reader (or a crash) never
    sees half a cache, and two nodes sharing the folder cannot interleave their files."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # not "another node won the race"
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _source_identity(d: DataConfig) -> tuple[str, str, datasets.Dataset | None]:
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


def _hash(payload: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def training_texts(cfg: TrainConfig) -> list[str]:
    """The formatted texts of the training split (what a bootstrapped tokenizer is trained on)."""
    source, _, rows = _source_identity(cfg.data)
    rows = load_rows(cfg.data) if rows is None else rows
    clean, _ = drop_bad_rows(rows, cfg.data, source, quiet=True)
    train_idx, _ = split_indices(len(clean), cfg.data.eval_fraction, cfg.seed)
    template = PromptTemplate.parse(cfg.data.template)
    columns = {f: column_for(f, cfg.data, clean.column_names) for f in template.fields}
    values = {f: clean[c][:] for f, c in columns.items()}
    return ["".join(template.format({f: values[f][i] for f in columns})) for i in train_idx]


def ensure_tokenizer(cfg: TrainConfig, model_dir: str | os.PathLike | None, cache_dir: str | os.PathLike, *,
                     local_rank: int, barrier: Callable[[], None]) -> Path:
    """The tokenizer.model to use: `train.tokenizer.path`, else `<model_dir>/tokenizer.model`, else
    one trained on the training texts (`train.tokenizer.train_vocab_size`; once per node, cached
    under `cache_dir`, deterministic, written atomically), else a ConfigError.

    Every rank calls this; `barrier` is called once by all of them only in the training case."""
    tok = cfg.tokenizer
    if tok.path:
        path = Path(os.path.expanduser(tok.path))
        if not path.is_file():
            raise ConfigError(f"train.tokenizer.path: {path} does not exist; "
                              "point it at a SentencePiece tokenizer.model")
        return path
    if model_dir is not None and (Path(model_dir) / "tokenizer.model").is_file():
        return Path(model_dir) / "tokenizer.model"
    if not tok.train_vocab_size:
        where = f"{model_dir} has no tokenizer.model" if model_dir is not None else "the model is built from `init`"
        raise ConfigError(f"train.tokenizer: {where}; set train.tokenizer.path, or train.tokenizer.train_vocab_size "
                          "to train one on the data")
    from train.tokenizer import train_sentencepiece

    cache_dir = Path(cache_dir)
    error: Exception | None = None
    if local_rank == 0:
        try:
            out = _tokenizer_path(cfg, cache_dir)
            if not out.is_file():
                try:
                    train_sentencepiece(training_texts(cfg), out, tok.train_vocab_size)  # writes atomically
                except ValueError as e:
                    raise ConfigError(f"train.tokenizer.train_vocab_size: {e}") from e
                log.info("trained a %d-piece tokenizer on %s → %s", tok.train_vocab_size, cfg.data.path, out)
        except Exception as e:  # re-raised after the barrier, so no rank waits forever
            error = e
    barrier()
    if error is not None:
        raise error
    out = _tokenizer_path(cfg, cache_dir)
    if not out.is_file():
        raise MlaunchError(f"local rank 0 did not produce {out}; see its error above")
    return out


def _tokenizer_path(cfg: TrainConfig, cache_dir: Path) -> Path:
    _, identity, _ = _source_identity(cfg.data)
    key = _hash({"what": "tokenizer", "source": identity, **_data_settings(cfg),
                 "vocab": cfg.tokenizer.train_vocab_size})
    return cache_dir / f"tokenizer-{key}.model"


# ------------------------------------------------------------------------------------ batching
class _GlobalBatchSampler:
    """Yields this data-parallel rank's micro-batch (a list of example indices) per step.

    Every micro-step has one GLOBAL batch of `micro_batch_size × dp_size` examples, a function of
    (lengths, global batch size, seed, epoch) only; rank r takes its slice [r·b, (r+1)·b). So
    "2 ranks × micro-batch b" sees exactly the examples of "1 rank × micro-batch 2b".

    Iterating continues where the sampler stands: the rest of the current epoch, after which
    `epoch` advances. `state_dict()` after k batches were handed out resumes at batch k (the
    position counts batches yielded; a DataLoader with worker prefetch would run ahead of it,
    so iterate the sampler directly or use num_workers=0). The last incomplete global batch of
    each epoch is dropped: every step then has the same global batch size (equal loss scale,
    identical shapes across ranks); the order is reshuffled every epoch, so different examples
    fall off each time."""

    def __init__(self, lengths: Sequence[int] | np.ndarray, micro_batch_size: int, *, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0) -> None:
        assert 0 <= dp_rank < dp_size and micro_batch_size >= 1
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.global_batch_size = micro_batch_size * dp_size
        if len(self.lengths) < self.global_batch_size:
            raise ConfigError(f"data: {len(self.lengths)} training examples cannot fill one global batch of "
                              f"{self.global_batch_size} (micro_batch_size {micro_batch_size} × {dp_size} "
                              "data-parallel ranks); lower data.micro_batch_size or add data")
        self.epoch = 0
        self.next_batch = 0

    def __len__(self) -> int:
        """Micro-batches per epoch for this rank (= global batches per epoch)."""
        return len(self.lengths) // self.global_batch_size

    def global_batches(self, epoch: int) -> np.ndarray:
        """All global batches of `epoch`, shape (len(self), global_batch_size)."""
        raise NotImplementedError

    def _rng(self, epoch: int) -> np.random.Generator:
        return np.random.default_rng(_seed_words(self.seed, epoch))

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.global_batches(self.epoch)
        lo = self.dp_rank * self.micro_batch_size
        while self.next_batch < len(batches):
            i = self.next_batch
            self.next_batch += 1  # before yielding: a state_dict taken now resumes after this batch
            yield batches[i, lo:lo + self.micro_batch_size].tolist()
        self.epoch += 1
        self.next_batch = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "next_batch": self.next_batch, "seed": self.seed,
                "global_batch_size": self.global_batch_size, "num_examples": len(self.lengths)}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        # dp_size may change (same global batch size); anything else would silently change the order.
        for k in ("seed", "global_batch_size", "num_examples"):
            if state[k] != self.state_dict()[k]:
                raise ConfigError(f"cannot resume the data order: the checkpoint has {k}={state[k]}, this run "
                                  f"{self.state_dict()[k]}; keep the seed, data and micro_batch_size × data-parallel "
                                  "size of the run you resume")
        self.epoch, self.next_batch = int(state["epoch"]), int(state["next_batch"])


class LengthGroupedBatches(_GlobalBatchSampler):
    """Global batches of similar lengths, in random order: almost no padding, still shuffled.

    Per epoch: shuffle (seed, epoch); cut into chunks of `chunk_batches` global batches; sort each
    chunk by length; cut it into global batches; shuffle the batch order. Bigger chunks pad less
    but vary batch composition less across epochs. The batch holding the longest example goes
    first, so an out-of-memory error shows at step 1 rather than hours into the run."""

    def __init__(self, lengths: Sequence[int] | np.ndarray, micro_batch_size: int, *, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0, chunk_batches: int = 64) -> None:
        super().__init__(lengths, micro_batch_size, dp_rank=dp_rank, dp_size=dp_size, seed=seed)
        assert chunk_batches >= 1
        self.chunk_batches = chunk_batches

    def global_batches(self, epoch: int) -> np.ndarray:
        g = self.global_batch_size
        rng = self._rng(epoch)
        perm = rng.permutation(len(self.lengths))[: len(self) * g]  # drop the incomplete tail
        chunk = self.chunk_batches * g
        groups = []
        for start in range(0, len(perm), chunk):
            c = perm[start:start + chunk]
            c = c[np.argsort(-self.lengths[c], kind="stable")]
            groups.append(c.reshape(-1, g))
        batches = np.concatenate(groups)[rng.permutation(len(self))]
        first = int(np.argmax(self.lengths[batches].max(axis=1)))
        batches[[0, first]] = batches[[first, 0]]
        return batches


class PadToMaxBatches(_GlobalBatchSampler):
    """The tutorial's batching: random order (seed, epoch); collate with pad_to=max_length.
    Kept as the baseline the benchmark compares against."""

    def global_batches(self, epoch: int) -> np.ndarray:
        g = self.global_batch_size
        return self._rng(epoch).permutation(len(self.lengths))[: len(self) * g].reshape(-1, g)


def make_batch_sampler(cfg: DataConfig, lengths: Sequence[int] | np.ndarray, *, dp_rank: int, dp_size: int,
                       seed: int) -> _GlobalBatchSampler:
    """The sampler `cfg.batching` asks for (`lengths`: the dataset's `length` column)."""
    cls = LengthGroupedBatches if cfg.batching == "length_grouped" else PadToMaxBatches
    return cls(np.asarray(lengths), cfg.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size, seed=seed)


def collate(examples: Sequence[Mapping[str, Sequence[int]]] | Mapping[str, Sequence[Sequence[int]]],
            pad_id: int = PAD_ID, pad_to: int | None = None, multiple_of: int = 8,
            max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids (pads = `pad_id`), attention_mask (1 = real), labels (-100 on pads).

    `examples`: a list of rows, or a column dict (what `dataset[list_of_indices]` returns). Width:
    `pad_to` if given (pad_to_max batching), else the longest example rounded up to
    `multiple_of` (tensor-core friendly shapes) but never beyond `max_length`."""
    if isinstance(examples, Mapping):
        ids_list = examples["input_ids"]
        label_list = examples.get("labels")
    else:
        ids_list = [e["input_ids"] for e in examples]
        label_list = [e["labels"] for e in examples] if examples and "labels" in examples[0] else None
    assert len(ids_list) > 0, "collate needs at least one example"
    lengths = np.fromiter((len(x) for x in ids_list), dtype=np.int64, count=len(ids_list))
    longest = int(lengths.max())
    if pad_to is not None:
        if pad_to < longest:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest example ({longest})")
        width = pad_to
    else:
        width = -(-longest // multiple_of) * multiple_of
        if max_length is not None:
            width = min(width, max(max_length, longest))
    # One vectorised fill instead of a loop over rows and tokens: the mask's True cells, in row
    # order, are exactly the concatenated examples.
    mask = np.arange(width)[None, :] < lengths[:, None]
    flat_ids = np.concatenate([np.asarray(x, dtype=np.int64) for x in ids_list])
    input_ids = np.full((len(lengths), width), pad_id, dtype=np.int64)
    input_ids[mask] = flat_ids
    labels = np.full((len(lengths), width), IGNORE_INDEX, dtype=np.int64)
    if label_list is None:
        labels[mask] = flat_ids
    else:
        labels[mask] = np.concatenate([np.asarray(x, dtype=np.int64) for x in label_list])
    return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask.astype(np.int64)),
            "labels": torch.from_numpy(labels)}


def iter_batches(dataset: datasets.Dataset, sampler: Iterable[list[int]], cfg: DataConfig, *,
                 pad_id: int = PAD_ID) -> Iterator[dict[str, torch.Tensor]]:
    """Collated micro-batches in the sampler's order (padding as `cfg.batching` says)."""
    pad_to = cfg.max_length if cfg.batching == "pad_to_max" else None
    for indices in sampler:
        yield collate(dataset[indices], pad_id=pad_id, pad_to=pad_to, max_length=cfg.max_length)


def real_token_fraction(batches: Iterable[Mapping[str, torch.Tensor]]) -> float:
    """Share of the processed token positions that are real (not padding), over `batches`."""
    real = total = 0
    for b in batches:
        mask = b["attention_mask"]
        real += int(mask.sum())
        total += mask.numel()
    return real / total if total else 0.0
