"""Rows → examples: the prompt template, bad rows, the train/eval split, tokenising.

An example is `input_ids` (prompt tokens + answer tokens + EOS, cut to `data.max_length` with
EOS kept), `labels` (the same ids; with `loss_on: response` the prompt's are IGNORE_INDEX) and
its `length`. No BOS is added (Baichuan's published tokenizer configs do not add one). Pads, added
later per batch (train/data/padding.py), are PAD_ID with label IGNORE_INDEX."""

from __future__ import annotations

import difflib
import logging
import os
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np

from job.baichuan import EOS_ID, IGNORE_INDEX
from job.config import DataConfig, TrainConfig
from job.errors import ConfigError
from train.data.sources import load_rows, source_identity

log = logging.getLogger(__name__)


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
    perm = np.random.default_rng(seed_words(seed, 0x5EED)).permutation(n)
    return np.sort(perm[n_eval:]), np.sort(perm[:n_eval])


def seed_words(*values: int) -> list[int]:
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


def training_texts(cfg: TrainConfig) -> list[str]:
    """The formatted texts of the training split (what a bootstrapped tokenizer is trained on)."""
    source, _, rows = source_identity(cfg.data)
    rows = load_rows(cfg.data) if rows is None else rows
    clean, _ = drop_bad_rows(rows, cfg.data, source, quiet=True)
    train_idx, _ = split_indices(len(clean), cfg.data.eval_fraction, cfg.seed)
    template = PromptTemplate.parse(cfg.data.template)
    columns = {f: column_for(f, cfg.data, clean.column_names) for f in template.fields}
    values = {f: clean[c][:] for f, c in columns.items()}
    return ["".join(template.format({f: values[f][i] for f in columns})) for i in train_idx]
