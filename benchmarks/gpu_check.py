"""One-GPU check: a Baichuan2-7B-shaped model cut to a few layers, trained through the project's own
step (`parallelize` → DDPParallel alone, `build_optimizer`), measured against the planner.

What runs: hidden 4096, FFN 11008, 32 heads, vocab 125,696 (Baichuan2-7B's shapes; NormHead, RoPE),
`--layers` decoder layers (default 4), synthetic full-length batches of `--seq` tokens (2048), fp32
master weights with bf16 autocast, SDPA on unpadded batches (no mask: the flash kernel), selective
recomputation (every other layer), fused AdamW, gradient clipping at 1.0 — the loop's step.

What it prints: tokens/s; MFU = tokens/s × (6N + 12·L·h·s) / the card's dense bf16 peak (H100 SXM
and H200: 989 TFLOP/s); the peak of torch.cuda.max_memory_allocated against the planner's
prediction for the same shape (`job.planner`, a one-GPU `ddp` candidate, its CUDA-context
overhead left out since the allocator does not see it). Last line: one JSON object with every
figure.

Expected gap between prediction and measurement: the planner counts ZeRO's 16 bytes per
parameter (bf16 weights and gradients, fp32 master and moments); this step keeps fp32 weights and
gradients (4 + 4 + 8) and autocast adds a bf16 copy of every matmul weight for the backward (+2),
so the measurement may exceed the prediction by up to ~2N bytes (≈ 7 % at 4 layers).

Robust by design: the first micro-batch is the largest (of 8, 4, 2, 1) the planner says fits in 90 %
of the card; a CUDA OOM halves it and retries from a clean allocator; a time budget stops the
timed loop early (and says so), so the whole run stays under 4 minutes.

    python benchmarks/gpu_check.py                    # on an H100/H200
    python benchmarks/gpu_check.py --layers 8 --steps 40
    python benchmarks/gpu_check.py --cpu-smoke        # tiny shapes on CPU: a quick correctness check
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Set before CUDA starts: fewer fragmentation OOMs at the large, changing logits allocations.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

DEFAULT_PEAK_TFLOPS = 989.0  # H100 SXM / H200 dense bf16
MICRO_BATCH_LADDER = (8, 4, 2, 1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4, help="decoder layers (4-8 fit an 80 GB card)")
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps, warm-up included")
    ap.add_argument("--warmup", type=int, default=3, help="steps left out of the timing (kernel selection, allocator growth)")
    ap.add_argument("--seq", type=int, default=2048, help="tokens per sequence")
    ap.add_argument("--micro-batch", type=int, default=None, help="sequences per step; default: the planner's largest that fits")
    ap.add_argument("--recompute", choices=("none", "selective", "full"), default="selective")
    ap.add_argument("--time-budget", type=float, default=180.0, help="seconds for everything; the timed loop stops early past it")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU, fp32: checks the script, not the GPU")
    ap.add_argument("--simulate-oom", type=int, default=0, help=argparse.SUPPRESS)  # tests: fail the first N attempts
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        args.layers, args.seq = min(args.layers, 2), min(args.seq, 128)
        args.steps, args.warmup = min(args.steps, 4), min(args.warmup, 1)
    if args.steps <= args.warmup:
        ap.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    return args


def model_config(args: argparse.Namespace):
    from job.baichuan import BaichuanConfig, variant

    if args.cpu_smoke:
        return BaichuanConfig(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=args.layers,
                              num_attention_heads=4, position="rope", norm_head=True)
    return variant("baichuan2-7b", num_hidden_layers=args.layers)


def planner_prediction(mcfg, args: argparse.Namespace, micro_batch: int, gpu_name: str) -> dict:
    """The planner's memory for this exact shape on one GPU (a `ddp` candidate of world size 1)."""
    from job.planner import ClusterSpec, Workload, enumerate_candidates

    cluster = ClusterSpec.from_gpu_type(gpu_name, nnodes=1, gpus_per_node=1)
    work = Workload(seq_len=args.seq, micro_batch=micro_batch, mixed_precision=not args.cpu_smoke)
    (cand,) = enumerate_candidates(mcfg, cluster, work, allowed=["ddp"], recompute=[args.recompute])
    mem = dict(cand.memory)
    return {"memory": mem, "allocated": mem["total"] - mem["overhead"], "gpu_mem_bytes": cluster.gpu_mem_bytes,
            "step_time_s": cand.step_time_s}


def first_micro_batch(mcfg, args: argparse.Namespace, gpu_name: str) -> int:
    if args.micro_batch:
        return args.micro_batch
    if args.cpu_smoke:
        return 2
    for mb in MICRO_BATCH_LADDER:
        pred = planner_prediction(mcfg, args, mb, gpu_name)
        if pred["memory"]["total"] <= 0.9 * pred["gpu_mem_bytes"]:
            return mb
    return 1


def attempt(mcfg, args: argparse.Namespace, micro_batch: int, device, deadline: float) -> dict:
    """Build, train `args.steps` steps, measure. Raises torch.OutOfMemoryError on OOM."""
    import torch

    from job.config import TrainConfig
    from train.loop import build_optimizer
    from train.models.baichuan.model import BaichuanForCausalLM, init_weights, set_activation_checkpointing
    from job.layout import Layout
    from train.models.baichuan.parallelize import BAICHUAN
    from train.parallel.base import parallelize, target_tokens

    if args.simulate_oom > 0:
        args.simulate_oom -= 1
        raise torch.OutOfMemoryError(f"simulated OOM at micro-batch {micro_batch}")
    cfg = TrainConfig.model_validate({
        "model": {"init": {}, "activation_checkpointing": args.recompute},
        "device": device.type, "optim": {"lr": 1e-4, "implementation": "auto"}, "clip_grad_norm": 1.0,
    })
    torch.manual_seed(0)
    with device:  # parameters are created on the device: no host copy of a 2-3 B parameter model
        model = BaichuanForCausalLM(mcfg)
    init_weights(model, mcfg.initializer_range)
    set_activation_checkpointing(model, args.recompute)
    par = parallelize(model, layout=Layout(), mesh=None, cfg=cfg, device=device, z_loss_weight=0.0, arch=BAICHUAN)
    opt = build_optimizer(par, cfg, device)
    fused = bool(opt.defaults.get("fused"))

    # A few fixed full-length batches (no padding: the mask is dropped and SDPA takes its flash
    # path), cycled so the loss has something to learn.
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(4):
        ids = torch.randint(3, mcfg.vocab_size, (micro_batch, args.seq), generator=g)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    losses, times = [], []
    for step in range(args.steps):
        sync()
        t0 = time.perf_counter()
        b = batches[step % len(batches)]
        n = target_tokens(b)
        loss_sum, _ = par.forward_backward(b, 1.0 / n, sync=True)
        par.clip_grad_norm_(cfg.clip_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss_sum) / n)  # a host sync: the step is over
        sync()
        times.append(time.perf_counter() - t0)
        if step >= args.warmup and time.perf_counter() > deadline:
            break
    timed = times[args.warmup:]
    if not timed:
        raise RuntimeError("time budget spent before the first timed step; raise --time-budget or lower --layers")
    step_time = sum(timed) / len(timed)
    result = {
        "micro_batch": micro_batch, "steps_run": len(times), "steps_timed": len(timed),
        "stopped_by_time_budget": len(times) < args.steps,
        "step_time_s": step_time, "tokens_per_s": micro_batch * args.seq / step_time,
        "loss_first": losses[0], "loss_last": losses[-1], "fused_adamw": fused,
        "finite": all(math.isfinite(x) for x in losses),
    }
    if device.type == "cuda":
        result["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        result["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    return result


def main(argv: list[str] | None = None) -> dict:
    t_start = time.perf_counter()
    args = parse_args(argv)
    import torch

    from train.metrics import gpu_peak_flops

    if args.cpu_smoke:
        device = torch.device("cpu")
        gpu_name = "cpu"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU visible; use --cpu-smoke for the CPU check")
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
        gpu_name = torch.cuda.get_device_name(device)
    deadline = t_start + args.time_budget
    mcfg = model_config(args)
    micro_batch = first_micro_batch(mcfg, args, gpu_name if not args.cpu_smoke else "cpu")
    ooms: list[str] = []
    result = None
    while result is None:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            result = attempt(mcfg, args, micro_batch, device, deadline)
        except (torch.OutOfMemoryError, RuntimeError) as e:
            # Some kernels (cuBLAS workspaces, NCCL-free here) report OOM as a plain RuntimeError.
            if not isinstance(e, torch.OutOfMemoryError) and "out of memory" not in str(e):
                raise
            ooms.append(f"micro_batch {micro_batch}: {str(e).splitlines()[0][:160]}")
            if micro_batch == 1:
                raise SystemExit(f"out of memory even at micro-batch 1 with {args.layers} layers; lower --layers "
                                 f"or --seq ({ooms[-1]})") from None
        if result is None:
            # Outside the except block: the exception and the frames holding the failed attempt's
            # tensors are gone, so the cache can really be emptied.
            micro_batch //= 2
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print(f"OOM, retrying with micro-batch {micro_batch}", flush=True)

    per_token = mcfg.flops_per_token(args.seq)
    peak = gpu_peak_flops(device) if device.type == "cuda" else None
    if device.type == "cuda" and peak is None:
        peak = DEFAULT_PEAK_TFLOPS * 1e12  # unknown card name: assume an H100's peak, and say so below
    pred = planner_prediction(mcfg, args, result["micro_batch"], gpu_name if not args.cpu_smoke else "cpu")
    figures = {
        "device": gpu_name, "layers": args.layers, "hidden": mcfg.hidden_size, "vocab": mcfg.vocab_size,
        "seq": args.seq, "params": mcfg.num_params, "recompute": args.recompute,
        "precision": "fp32 master + bf16 autocast" if device.type == "cuda" else "fp32",
        **result,
        "flops_per_token": per_token,
        "achieved_tflops": result["tokens_per_s"] * per_token / 1e12,
        "peak_tflops": peak / 1e12 if peak else None,
        "mfu": result["tokens_per_s"] * per_token / peak if peak else None,
        "predicted_allocated_bytes": pred["allocated"],
        "predicted_breakdown_bytes": pred["memory"],
        "memory_ratio_measured_over_predicted": (result["peak_allocated_bytes"] / pred["allocated"]
                                                 if "peak_allocated_bytes" in result else None),
        "predicted_step_time_s": pred["step_time_s"],
        "oom_retries": ooms,
        "wall_s": time.perf_counter() - t_start,
    }
    gib = 1024**3
    print(f"{gpu_name}: {args.layers} layers, seq {args.seq}, micro-batch {result['micro_batch']} "
          f"({len(ooms)} OOM retries), {result['steps_timed']} timed steps")
    print(f"  tokens/s {figures['tokens_per_s']:,.0f}   step {figures['step_time_s'] * 1e3:.1f} ms   "
          f"loss {figures['loss_first']:.3f} -> {figures['loss_last']:.3f}")
    if peak:
        print(f"  MFU {figures['mfu']:.1%} ({figures['achieved_tflops']:.0f} of {peak / 1e12:.0f} TFLOP/s, "
              f"6N+12Lhs = {per_token / 1e9:.2f} GFLOP/token)")
    if "peak_allocated_bytes" in result:
        print(f"  peak allocated {result['peak_allocated_bytes'] / gib:.2f} GiB vs planner {pred['allocated'] / gib:.2f} GiB "
              f"(ratio {figures['memory_ratio_measured_over_predicted']:.3f})")
    print(json.dumps(figures), flush=True)
    return figures


if __name__ == "__main__":
    main()
