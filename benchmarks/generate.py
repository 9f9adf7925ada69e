"""Generation tokens/s on CPU with and without the KV cache, side by side in one run.

Two randomly initialised models (no download): configs/tiny.yaml's shape (hidden 128, 4 layers,
ALiBi + NormHead, vocab 1000) and a small RoPE one (hidden 512, 8 layers, 8 heads, vocab 8000).
Each arm greedily generates `--new` tokens after a `--prompt`-token prompt with EOS disabled (so
every run does the same work), through `train.generate.generate_ids`, the loop `mlaunch generate`
runs; new tokens / wall time, the prompt's forward included. Arms interleaved, `--runs` rounds,
median reported.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/generate.py [--runs 3] [--prompt 64] [--new 128]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    "tiny (configs/tiny.yaml: h128 L4, ALiBi)": dict(vocab_size=1000, hidden_size=128, intermediate_size=344,
                                                     num_hidden_layers=4, num_attention_heads=4, position="alibi",
                                                     norm_head=True),
    "small (h512 L8, RoPE)": dict(vocab_size=8000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                                  num_attention_heads=8, position="rope", norm_head=True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    parser.add_argument("--new", type=int, default=128, help="new tokens per answer")
    args = parser.parse_args()

    import torch

    from job.baichuan import BaichuanConfig
    from train.generate import generate_ids
    from train.models.baichuan.model import BaichuanForCausalLM, init_weights

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; prompt {args.prompt} tokens, "
          f"{args.new} new tokens, greedy, median of {args.runs}")
    print("| model | KV cache tokens/s | no cache tokens/s | speed-up |\n|---|---|---|---|")
    for label, shape in SHAPES.items():
        torch.manual_seed(0)
        model = BaichuanForCausalLM(BaichuanConfig(**shape))
        init_weights(model)
        model.eval()
        prompt = torch.randint(3, shape["vocab_size"], (args.prompt,)).tolist()
        rates: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.runs):
            for use_cache in (True, False):
                t0 = time.perf_counter()
                n = sum(1 for _ in generate_ids(model, prompt, max_new_tokens=args.new, use_cache=use_cache, eos_id=-1))
                rates[use_cache].append(n / (time.perf_counter() - t0))
        cached, full = statistics.median(rates[True]), statistics.median(rates[False])
        print(f"| {label} | {cached:,.0f} | {full:,.0f} | {cached / full:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
