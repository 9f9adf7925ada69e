"""Examples → padded tensors: right-pad a micro-batch to the longest example (or to
`data.max_length` for `pad_to_max`); pads are PAD_ID with label IGNORE_INDEX, mask 0."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

import datasets
import numpy as np
import torch

from job.baichuan import IGNORE_INDEX, PAD_ID
from job.config import DataConfig


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
