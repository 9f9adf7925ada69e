"""`train.auto.prepare` overhead: the same training loop with a hand-written DDP set-up and with the
one `prepare` line, tokens/s at fixed shapes on CPU (2 ranks, gloo).

    OMP_NUM_THREADS=1 python benchmarks/prepare_overhead.py --runs 3

Each round starts both arms (torchrun, 2 processes each), alternating which goes first; the
figure is the median over rounds of (prepare tokens/s) / (plain tokens/s). The model is a tiny
transformers LlamaForCausalLM (hidden 128, 2 layers, vocabulary 512) in fp32, built from a config
(no hub); the batch is 4 × 128 random tokens per rank; 5 warm-up steps, then `--steps` timed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEQ, BATCH, ROWS, WARMUP = 128, 4, 512, 5


def worker(arm: str, steps: int) -> None:
    sys.path.insert(0, str(ROOT))
    import torch
    import torch.distributed as dist
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=SEQ)
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, 512, (ROWS, SEQ))
    data = TensorDataset(ids)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if arm == "plain":  # what one writes by hand
        dist.init_process_group("gloo")
        model = torch.nn.parallel.DistributedDataParallel(model)
        sampler = DistributedSampler(data, shuffle=False)
        loader = DataLoader(data, batch_size=BATCH, sampler=sampler)
    else:
        from train.auto import prepare

        loader = DataLoader(data, batch_size=BATCH)
        model, optimizer, loader = prepare(model, optimizer, loader, memory_budget_gb=16, verbose=False)
        assert model.mlaunch_plan.strategy == "ddp", model.mlaunch_plan
    world = dist.get_world_size()
    model.train()
    done, t0 = 0, None
    while done < WARMUP + steps:
        for (batch,) in loader:
            if done == WARMUP:
                dist.barrier()
                t0 = time.perf_counter()
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            done += 1
            if done == WARMUP + steps:
                break
    dist.barrier()
    elapsed = time.perf_counter() - t0
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps({"arm": arm, "tokens_per_s": steps * BATCH * SEQ * world / elapsed}), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # the gloo-exit pitfall (DESIGN.md)


def run_arm(arm: str, steps: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          __file__, "--worker", arm, "--steps", str(steps)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode or not lines:
        raise SystemExit(f"{arm} arm failed (exit {out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return json.loads(lines[0][len("RESULT "):])["tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--worker", choices=("plain", "prepare"))
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps)
        return
    rows = []
    for r in range(args.runs):
        order = ("plain", "prepare") if r % 2 == 0 else ("prepare", "plain")
        got = {arm: run_arm(arm, args.steps) for arm in order}
        rows.append(got)
        print(f"round {r + 1}: plain {got['plain']:,.0f} tokens/s, prepare {got['prepare']:,.0f} tokens/s, "
              f"ratio {got['prepare'] / got['plain']:.3f}", flush=True)
    plain = statistics.median(x["plain"] for x in rows)
    prep = statistics.median(x["prepare"] for x in rows)
    ratio = statistics.median(x["prepare"] / x["plain"] for x in rows)
    print(f"median of {args.runs}: plain {plain:,.0f} tokens/s, prepare {prep:,.0f} tokens/s, "
          f"prepare/plain {ratio:.3f} (target >= 0.97)")


if __name__ == "__main__":
    main()
