"""How much of each batch is real tokens: the tutorial's pad-to-1024 vs length-grouped batching.

Reads the real Bitext rows from ../shared/data/bitext/ at run time (never copied into the
project), trains a SentencePiece tokenizer (~8000 pieces) on them in a temp folder, tokenises
with the tutorial's prompt through train/data/, and prints token-length statistics and the
real-token fraction of three batchings at micro-batch 8:

  * pad_to_max      the tutorial's: random batches, every example padded to max_length (1024);
  * random/longest  random batches padded to their longest example (what grouping adds on top);
  * length_grouped  this project's default.

The bundled generated sample is measured with the same tokenizer, to check that its lengths
resemble the real data's.

    OMP_NUM_THREADS=1 python benchmarks/data_stats.py [--csv PATH] [--vocab 8000] [--micro-batch 8]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from job.config import TrainConfig  # noqa: E402
from train.data import (  # noqa: E402
    LengthGroupedBatches, PadToMaxBatches, collate, prepare_data, real_token_fraction,
)
from train.tokenizer import BaichuanTokenizer, ensure_tokenizer  # noqa: E402

DEFAULT_CSV = ROOT.parent / "shared" / "data" / "bitext" / "customer_support_train_4514.csv"
SAMPLE = ROOT / "train" / "data" / "bitext_sample.jsonl"


def no_barrier() -> None:
    pass


def measure(train, sampler, *, pad_to: int | None, max_length: int) -> float:
    batches = (collate(train[idx], pad_to=pad_to, max_length=max_length) for idx in sampler)
    return real_token_fraction(batches)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", type=Path, default=DEFAULT_CSV)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not args.csv.is_file():
        print(f"skipped: {args.csv} not found (the Bitext data lives in ../shared/data/bitext/)")
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    import datasets

    datasets.disable_progress_bars()

    with tempfile.TemporaryDirectory(prefix="data_stats-") as tmp:
        def cfg_for(path: Path) -> TrainConfig:
            return TrainConfig.model_validate({
                "model": {"init": {}}, "tokenizer": {"train_vocab_size": args.vocab}, "seed": args.seed,
                "data": {"path": str(path), "max_length": args.max_length, "eval_fraction": 0,
                         "micro_batch_size": args.micro_batch}})

        cfg = cfg_for(args.csv)
        t0 = time.perf_counter()
        tok_path = ensure_tokenizer(cfg, None, tmp, local_rank=0, barrier=no_barrier)
        t1 = time.perf_counter()
        tok = BaichuanTokenizer(tok_path)
        real = prepare_data(cfg, tok, tmp, local_rank=0, barrier=no_barrier)
        t2 = time.perf_counter()
        sample = prepare_data(cfg_for(SAMPLE), tok, tmp, local_rank=0, barrier=no_barrier)

        print(f"tokenizer: {tok.vocab_size} pieces trained in {t1 - t0:.1f} s; "
              f"tokenising {real.stats.rows} rows took {t2 - t1:.1f} s")
        print(f"\n{'data':<34}{'rows':>6}{'skipped':>9}{'mean':>8}{'p50':>6}{'p95':>6}{'max':>6}")
        for name, prep in ((args.csv.name, real), (SAMPLE.name + " (bundled)", sample)):
            lengths = np.asarray(prep.train["length"][:])
            print(f"{name:<34}{len(lengths):>6}{prep.skipped:>9}{lengths.mean():>8.1f}"
                  f"{np.percentile(lengths, 50):>6.0f}{np.percentile(lengths, 95):>6.0f}{lengths.max():>6}")

        lengths = np.asarray(real.train["length"][:])
        b = args.micro_batch
        rows = [
            (f"pad_to_max ({args.max_length}, tutorial)", PadToMaxBatches(lengths, b, seed=args.seed), args.max_length),
            ("random batches, pad to longest", PadToMaxBatches(lengths, b, seed=args.seed), None),
            ("length_grouped (default)", LengthGroupedBatches(lengths, b, seed=args.seed), None),
        ]
        print(f"\nreal-token fraction, micro-batch {b}, {args.csv.name} ({len(lengths) // b} batches):")
        print(f"{'batching':<36}{'real tokens':>12}{'compute vs pad_to_max':>24}")
        base = None
        for name, sampler, pad_to in rows:
            frac = measure(real.train, sampler, pad_to=pad_to, max_length=args.max_length)
            base = base or frac
            print(f"{name:<36}{frac:>11.1%}{base / frac:>23.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
