"""LoRA vs full fine-tuning on CPU, side by side in one run: tokens/s and the bytes one rank holds
in parameters + gradients + AdamW state, with the planner's prediction of the latter.

Both arms run the project's own step (`train.parallel` world of 1, `train.loop.build_optimizer`,
`train.lora.apply_lora` for LoRA) on the same model and the same random batches; the rounds
alternate the arms, and each figure is the median over `--repeats` rounds (a round's tokens/s is
its median step after `--warmup` steps). Bytes are counted as tests/dist/test_memory_model.py
counts them: distinct storages of the parameters, their gradients after backward, and AdamW's
exp_avg / exp_avg_sq after the step.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/lora.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = dict(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8)


def _storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def one_round(lora: bool, args) -> dict:
    import torch

    from job.baichuan import BaichuanConfig
    from job.config import TrainConfig
    from job.layout import Layout
    from job.planner import Adapters, state_bytes_per_rank
    from train.lora import apply_lora, init_adapters
    from train.loop import build_optimizer
    from train.models.baichuan.model import BaichuanForCausalLM, init_weights
    from train.models.baichuan.parallelize import BAICHUAN
    from train.parallel.base import parallelize, target_tokens

    device = torch.device("cpu")
    cfg = TrainConfig.model_validate({"model": {"init": {}}, "device": "cpu", "optim": {"lr": 1e-4},
                                      "lora": {"r": args.r, "alpha": 2 * args.r} if lora else None})
    mcfg = BaichuanConfig(**MODEL, norm_head=True)
    torch.manual_seed(0)
    model = BaichuanForCausalLM(mcfg)
    init_weights(model)
    if lora:
        apply_lora(model, cfg.lora, device, torch.float32)
        init_adapters(model, 0)
    layout = Layout(dp_replicate=1)
    par = parallelize(model, layout=layout, mesh=None, cfg=cfg, device=device, z_loss_weight=0.0, arch=BAICHUAN)
    opt = build_optimizer(par, cfg, device)
    gen = torch.Generator().manual_seed(1)
    times, parts = [], {}
    for step in range(args.warmup + args.steps):
        ids = torch.randint(3, mcfg.vocab_size, (args.micro_batch, args.seq), generator=gen)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        t0 = time.perf_counter()
        par.forward_backward(batch, 1.0 / target_tokens(batch), sync=True)
        if step == 0:
            params = list(par.parameters())
            parts = {"params": _storage_bytes(params), "grads": _storage_bytes(p.grad for p in params if p.grad is not None)}
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step == 0:
            parts["optimizer"] = _storage_bytes(s[k] for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq"))
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    predicted = state_bytes_per_rank(mcfg, layout, lora=Adapters(r=args.r) if lora else None)
    return {"tokens_per_s": args.micro_batch * args.seq / statistics.median(times), "bytes": sum(parts.values()),
            "parts": parts, "predicted_bytes": predicted, "trainable": sum(p.numel() for p in par.parameters() if p.requires_grad)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--r", type=int, default=8)
    args = ap.parse_args()
    rounds: dict[str, list[dict]] = {"full": [], "lora": []}
    for _ in range(args.repeats):
        for arm in ("full", "lora"):
            rounds[arm].append(one_round(arm == "lora", args))
    out = {}
    for arm, rs in rounds.items():
        out[arm] = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                    "tokens_per_s_all": [round(r["tokens_per_s"]) for r in rs],
                    "bytes": rs[0]["bytes"], "parts": rs[0]["parts"], "predicted_bytes": rs[0]["predicted_bytes"],
                    "trainable": rs[0]["trainable"]}
        print(f"{arm:5s} {out[arm]['tokens_per_s']:8.0f} tokens/s (rounds {out[arm]['tokens_per_s_all']}); "
              f"params+grads+AdamW {out[arm]['bytes'] / 2**20:.2f} MiB {out[arm]['parts']} "
              f"(planner {out[arm]['predicted_bytes'] / 2**20:.2f} MiB); {out[arm]['trainable']:,} trainable")
    print(f"lora/full: tokens/s {out['lora']['tokens_per_s'] / out['full']['tokens_per_s']:.2f}x, "
          f"state bytes {out['lora']['bytes'] / out['full']['bytes']:.2f}x")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
