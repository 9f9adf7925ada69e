"""Training throughput on the real Bitext rows, CPU, the same tiny Baichuan in every arm.

(a) tutorial: the product tutorial's recipe — every example padded to 1024 tokens, a plain
    PyTorch loop (forward, mean loss over non-pad tokens, backward, AdamW);
(b) train:    `python -m train` with its defaults (length-grouped batches, dynamic padding).
Reported: real (non-pad) tokens/s and the real-token fraction of each, and (b)/(a).

Wrapper overhead: at identical fixed shapes (every batch padded to the same length, so both
sides do the same arithmetic), `python -m train`'s step against a bare PyTorch loop over the
same model, optimizer and batches: padded tokens/s, and the ratio train/bare.

Each arm runs `--repeats` times (median of the per-run medians; a run's median skips the first
`--warmup` steps). Data: ../shared/data/bitext/customer_support_train_4514.csv, read in place.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/train_throughput.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BITEXT = ROOT.parent / "shared" / "data" / "bitext" / "customer_support_train_4514.csv"
MODEL = {"hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 4, "num_attention_heads": 4}


def job(tmp: Path, tokenizer: Path, out: str, steps: int, **data) -> Path:
    cfg = {
        "name": "bench",
        "train": {
            "model": {"init": MODEL, "variant": "baichuan2-13b"},
            "tokenizer": {"path": str(tokenizer)},
            "data": {"path": str(BITEXT), "max_length": 1024, "micro_batch_size": 8, "eval_fraction": 0.0, **data},
            "optim": {"lr": 1e-3, "implementation": "foreach"},
            "max_steps": steps,
            "checkpoint": {"export": False, "resume": "never"},
            "output_dir": str(tmp / out),
            "device": "cpu",
        },
    }
    path = tmp / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_train(cfg_path: Path, warmup: int, key: str) -> tuple[float, float]:
    """(median of `key` after warm-up, mean real-token fraction) from a `python -m train` run."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out_dir = Path(yaml.safe_load(cfg_path.read_text())["train"]["output_dir"])
    subprocess.run(["rm", "-rf", str(out_dir)], check=True)
    proc = subprocess.run([sys.executable, "-m", "train", str(cfg_path)], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"train failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "tokens_per_s" in r][warmup:]
    return statistics.median(r[key] for r in rows), statistics.mean(r["real_token_fraction"] for r in rows)


def bare_loop(batches: list[dict], steps: int, warmup: int, clip: float | None) -> tuple[float, float, float]:
    """A plain PyTorch loop; returns (median real tokens/s, median padded tokens/s, real fraction)."""
    import torch

    from job.baichuan import BaichuanConfig
    from train.loss import causal_lm_loss
    from train.models.baichuan.model import BaichuanForCausalLM, init_weights

    torch.manual_seed(0)
    vocab = batches[0]["vocab"]
    cfg = BaichuanConfig(vocab_size=vocab, hidden_size=MODEL["hidden_size"], intermediate_size=MODEL["intermediate_size"],
                         num_hidden_layers=MODEL["num_hidden_layers"], num_attention_heads=MODEL["num_attention_heads"],
                         position="alibi", norm_head=True)
    model = BaichuanForCausalLM(cfg)
    init_weights(model, 0.02)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    real_rates, padded_rates, fractions = [], [], []
    for step in range(steps):
        b = batches[step % len(batches)]
        t = time.perf_counter()
        logits = model(b["input_ids"], b["attention_mask"])
        loss_sum, n = causal_lm_loss(logits, b["labels"])
        (loss_sum / n).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t
        real = int(b["attention_mask"].sum())
        if step >= warmup:
            real_rates.append(real / dt)
            padded_rates.append(b["input_ids"].numel() / dt)
            fractions.append(real / b["input_ids"].numel())
    return statistics.median(real_rates), statistics.median(padded_rates), statistics.mean(fractions)


def bare_in_fresh_process(tokenizer: Path, length: int, n_batches: int, seed: int, steps: int, warmup: int,
                          clip: float | None) -> tuple[float, float, float]:
    """`bare_loop` in a new process, like `python -m train` gets: a process that already ran other
    shapes has a warmed-up allocator (glibc raises its mmap threshold after large frees), which
    made the same loop ~20% faster here and the comparison unfair."""
    args = {"tokenizer": str(tokenizer), "length": length, "n": n_batches, "seed": seed, "steps": steps,
            "warmup": warmup, "clip": clip}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(args)], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        raise SystemExit(f"bare loop failed:\n{proc.stderr[-3000:]}")
    return tuple(json.loads(proc.stdout.strip().splitlines()[-1]))


def worker(spec: str) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    a = json.loads(spec)
    batches = tutorial_batches(Path(a["tokenizer"]), a["length"], 8, a["n"], seed=a["seed"])
    print(json.dumps(bare_loop(batches, a["steps"], a["warmup"], a["clip"])))


def tutorial_batches(tokenizer: Path, length: int, batch: int, n: int, seed: int = 0) -> list[dict]:
    """The tutorial's tokenisation: prompt + response + EOS, padded (pad id 0) to `length`, labels -100 on pads."""
    import random

    import torch

    from job.config import validate
    from train.data import training_texts
    from train.tokenizer import BaichuanTokenizer

    tok = BaichuanTokenizer(str(tokenizer))
    cfg = validate({"train": {"model": {"init": {}}, "data": {"path": str(BITEXT), "eval_fraction": 0.0}}}).train
    texts = training_texts(cfg)
    random.Random(seed).shuffle(texts)
    out = []
    for i in range(n):
        ids = [x[: length - 1] + [tok.eos_id] for x in tok.encode_batch(texts[i * batch:(i + 1) * batch])]
        input_ids = torch.zeros(batch, length, dtype=torch.long)
        mask = torch.zeros(batch, length, dtype=torch.long)
        for r, seq in enumerate(ids):
            input_ids[r, : len(seq)] = torch.tensor(seq)
            mask[r, : len(seq)] = 1
        labels = input_ids.masked_fill(mask == 0, -100)
        out.append({"input_ids": input_ids, "attention_mask": mask, "labels": labels, "vocab": tok.vocab_size})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--tutorial-steps", type=int, default=8)
    ap.add_argument("--train-steps", type=int, default=40)
    ap.add_argument("--fixed-length", type=int, default=256)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker)
    if not BITEXT.is_file():
        raise SystemExit(f"{BITEXT} not found: the benchmark reads the real Bitext rows in place")
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    from job.config import validate
    from train.data import training_texts
    from train.tokenizer import train_sentencepiece

    tmp = Path(tempfile.mkdtemp(prefix="mlaunch-bench-"))
    cfg = validate({"train": {"model": {"init": {}}, "data": {"path": str(BITEXT), "eval_fraction": 0.0}}}).train
    tokenizer = train_sentencepiece(training_texts(cfg), tmp / "tokenizer.model", vocab_size=8000)

    # Every arm runs in a fresh process (`python -m train` does by nature), rounds interleaved.
    results: dict[str, list] = {"tutorial": [], "train": [], "bare_fixed": [], "train_fixed": []}
    for rep in range(args.repeats):
        real, _, frac = bare_in_fresh_process(tokenizer, 1024, args.tutorial_steps, 0, args.tutorial_steps,
                                              args.warmup, clip=None)
        results["tutorial"].append((real, frac))
        real, frac = run_train(job(tmp, tokenizer, f"train{rep}", args.train_steps), args.warmup, "tokens_per_s")
        results["train"].append((real, frac))
        _, padded, frac = bare_in_fresh_process(tokenizer, args.fixed_length, 16, 1, args.train_steps, args.warmup,
                                                clip=1.0)
        results["bare_fixed"].append((padded, frac))
        padded, frac = run_train(job(tmp, tokenizer, f"fixed{rep}", args.train_steps, batching="pad_to_max",
                                     max_length=args.fixed_length), args.warmup, "padded_tokens_per_s")
        results["train_fixed"].append((padded, frac))
        print(f"repeat {rep + 1}: " + ", ".join(f"{k} {v[-1][0]:,.0f}" for k, v in results.items()), flush=True)

    med = {k: statistics.median(x[0] for x in v) for k, v in results.items()}
    frac = {k: statistics.mean(x[1] for x in v) for k, v in results.items()}
    print("\n| arm | what | tokens/s (median of runs) | real-token fraction |")
    print("|---|---|---|---|")
    print(f"| (a) tutorial | pad to 1024, plain loop | {med['tutorial']:,.0f} real | {frac['tutorial']:.1%} |")
    print(f"| (b) train | length-grouped, `python -m train` | {med['train']:,.0f} real | {frac['train']:.1%} |")
    print(f"| bare loop | fixed {args.fixed_length}-token batches | {med['bare_fixed']:,.0f} padded | {frac['bare_fixed']:.1%} |")
    print(f"| train | same fixed shapes (`batching: pad_to_max`) | {med['train_fixed']:,.0f} padded | {frac['train_fixed']:.1%} |")
    print(f"\n(b)/(a) real tokens/s: {med['train'] / med['tutorial']:.2f}x (target >= 5x)")
    print(f"train/bare at fixed shapes: {med['train_fixed'] / med['bare_fixed']:.3f}x (target >= 0.95x)")
    print(json.dumps({"median": med, "real_fraction": frac, "runs": results}))


if __name__ == "__main__":
    main()
