"""CPU: the loss step (head matmul + cross-entropy + z-loss, forward and backward) through full
logits against `train.loss.linear_cross_entropy`'s chunks, at Baichuan2's vocabulary.

Each variant runs in a fresh process, alternating, `--repeats` times: the process's peak resident
memory (ru_maxrss) above what it held once the inputs existed is that step's peak, with no other
variant's freed-but-kept heap in the way. Within a process the step runs once to warm up, then
`--steps` times timed; the figure is the median over processes of each one's median step.

    python benchmarks/loss_chunking.py                        # 2048 tokens, vocab 125,696, hidden 256
    python benchmarks/loss_chunking.py --tokens 4096 --chunks 1024 2048
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _child(tokens: int, vocab: int, hidden: int, chunk: int, steps: int) -> dict:
    import gc

    import torch

    sys.path.insert(0, str(ROOT))
    from train.loss import causal_lm_loss, linear_cross_entropy

    g = torch.Generator().manual_seed(0)
    h = torch.randn(1, tokens, hidden, generator=g).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * 0.02).requires_grad_()
    labels = torch.randint(0, vocab, (1, tokens), generator=g)

    def step() -> float:
        if chunk:
            loss, _ = linear_cross_entropy(h, torch.nn.functional.normalize(w, dim=-1), labels, 2e-4, chunk)
        else:
            loss, _ = causal_lm_loss(h @ torch.nn.functional.normalize(w, dim=-1).T, labels, 2e-4)
        loss.backward()
        h.grad = w.grad = None
        return float(loss)

    gc.collect()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    loss = step()  # warm-up (and the peak: every step allocates the same)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"chunk": chunk, "loss": loss, "step_s": statistics.median(times), "peak_bytes": peak}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=125_696)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--chunks", type=int, nargs="+", default=[2048, 1024], help="chunk sizes to compare with 0 (full logits)")
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per variant (median over them)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per process")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        print(json.dumps(_child(args.tokens, args.vocab, args.hidden, args.child, args.steps)))
        return {}
    variants = [0, *args.chunks]
    runs: dict[int, list[dict]] = {c: [] for c in variants}
    for _ in range(args.repeats):
        for c in variants:  # alternating, so a change in machine load hits every variant alike
            cmd = [sys.executable, __file__, "--child", str(c), "--tokens", str(args.tokens), "--vocab",
                   str(args.vocab), "--hidden", str(args.hidden), "--steps", str(args.steps)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs[c].append(json.loads(out.strip().splitlines()[-1]))
    load = os.getloadavg()[0]
    rows = []
    print(f"loss step, {args.tokens} tokens x vocab {args.vocab:,} x hidden {args.hidden}, fp32, "
          f"torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}, load avg {load:.1f}; "
          f"median of {args.repeats} processes x {args.steps} steps")
    for c in variants:
        step_s = statistics.median(r["step_s"] for r in runs[c])
        peak = statistics.median(r["peak_bytes"] for r in runs[c])
        rows.append({"chunk_tokens": c, "step_s": step_s, "tokens_per_s": args.tokens / step_s, "peak_bytes": peak,
                     "loss": runs[c][0]["loss"]})
        name = "full logits" if c == 0 else f"chunks of {c}"
        print(f"  {name:>16}: {args.tokens / step_s:>9,.0f} tokens/s  step {step_s * 1e3:7.1f} ms  "
              f"peak {peak / 2**20:7.0f} MiB  loss {runs[c][0]['loss']:.6f}")
    result = {"tokens": args.tokens, "vocab": args.vocab, "hidden": args.hidden, "load_avg": load, "rows": rows}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
