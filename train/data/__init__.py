"""Data: rows → prompt text → token ids (once per node, cached) → length-grouped batches.

The tutorial this project grew from pads every example to 1024 tokens although the Bitext rows
average ~150: most of each step's compute went into padding. Here every example is tokenised
once (one process per node, cached under the run's output directory), batches are built from
examples of similar length and padded only to the longest of the batch, so nearly every token a
GPU processes is real.

The flow, as the training entry point uses it (`ensure_tokenizer` is in train/tokenizer.py)::

    tok_path = ensure_tokenizer(cfg, model_dir, cache_dir, local_rank=lr, barrier=dist.barrier)
    data = prepare_data(cfg, BaichuanTokenizer(tok_path), cache_dir, local_rank=lr, barrier=dist.barrier)
    sampler = make_batch_sampler(cfg.data, data.train["length"], dp_rank=r, dp_size=w, seed=cfg.seed)
    for batch in iter_batches(data.train, sampler, cfg.data): ...   # input_ids, attention_mask, labels

The modules, in that order: `sources` (hub or local rows, the bundled sample), `examples` (the
template, bad rows, the split, tokenising), `cache` (the per-node tokenised cache), `sampler`
(length-grouped distributed batches), `padding` (collate). Token ids are job.baichuan's: no BOS
is added (Baichuan's published tokenizer configs do not add one); every example ends with EOS,
also when truncated; pads are PAD_ID with label IGNORE_INDEX.
"""

from train.data.cache import DataStats, PreparedData, prepare_data
from train.data.examples import (
    PromptTemplate, column_for, drop_bad_rows, split_indices, tokenize_rows, training_texts,
)
from train.data.padding import collate, iter_batches, real_token_fraction
from train.data.sampler import LengthGroupedBatches, PadToMaxBatches, make_batch_sampler
from train.data.sources import load_rows, resolve_local_path

__all__ = [
    "DataStats", "LengthGroupedBatches", "PadToMaxBatches", "PreparedData", "PromptTemplate", "collate",
    "column_for", "drop_bad_rows", "iter_batches", "load_rows", "make_batch_sampler", "prepare_data",
    "real_token_fraction", "resolve_local_path", "split_indices", "tokenize_rows", "training_texts",
]
