"""One-GPU check: a Baichuan2-7B-shaped model cut to a few layers, trained through the project's own
step (`parallelize` → DDPParallel alone, `build_optimizer`), measured against the planner.

What runs: hidden 4096, FFN 11008, 32 heads, vocab 125,696 (Baichuan2-7B's shapes; NormHead, RoPE),
`--layers` decoder layers (default 4), synthetic full-length batches of `--seq` tokens (2048), fp32
master weights with bf16 autocast, SDPA on unpadded batches (no mask: the flash kernel), selective
recomputation (every other layer), fused AdamW, gradient clipping at 1.0 — the loop's step.

What it prints: tokens/s; MFU = tokens/s × `BaichuanConfig.flops_per_token` (6·N + 12·L·h·s, N without
the embedding: torchtitan's count, the project's one definition) / the card's dense bf16 peak (H100 SXM
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

The loss is the training default (`train.loss_chunk_tokens`, chunked; `--loss-chunk-tokens 0` for
the full logits) and `--compile blocks` compiles each decoder layer (`train.compile`).

`--all` is the prepared run for a lent GPU (≤ 8 minutes on one H100/H200): the most decoder layers
(at least 8) that the planner fits with the full-logits loss at the largest micro-batch of 8, 4,
2, 1 — so every variant runs the same shapes — then four variants one after another in this
process (full logits / chunked loss × eager / compiled blocks), each with its share of the time
budget, its own peak memory against the planner's prediction for that variant, tokens/s and MFU;
with 2+ GPUs visible, the chunked variants again under fsdp over NCCL (torchrun, one rank per GPU,
the model built on the meta device, sharded by FSDP2 and filled by `train.build.fill_weights`, as
`python -m train` does). One summary table, then one JSON line with every figure.

    python benchmarks/gpu_check.py                    # on an H100/H200
    python benchmarks/gpu_check.py --layers 8 --steps 40 --compile blocks
    python benchmarks/gpu_check.py --all              # the prepared matrix (tee it into results/)
    python benchmarks/gpu_check.py --cpu-smoke        # tiny shapes on CPU: a quick correctness check
    python benchmarks/gpu_check.py --all --cpu-smoke  # the matrix's code paths on CPU (fsdp: 2 gloo ranks)
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
MIN_ALL_LAYERS, MAX_ALL_LAYERS = 8, 32  # --all: at least 8 decoder layers, at most the real 7B's 32
ALL_BUDGET_S = 420.0  # --all: 7 minutes of measuring, inside the 8 the prepared run may take


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
    ap.add_argument("--loss-chunk-tokens", type=int, default=None,
                    help="tokens per loss chunk (train.loss_chunk_tokens; 0 = full logits); default: the training default")
    ap.add_argument("--compile", choices=("none", "blocks"), default="none", help="train.compile: torch.compile per decoder layer")
    ap.add_argument("--all", action="store_true",
                    help=f"the prepared matrix: full/chunked loss x eager/compiled at the most layers that fit (>= {MIN_ALL_LAYERS}), "
                         "then fsdp over NCCL with 2+ GPUs; default --time-budget 420 s")
    ap.add_argument("--fsdp-ranks", type=int, default=None,
                    help="--all: ranks of the fsdp part (default: the visible GPUs; 2 gloo ranks with --cpu-smoke; 0 = skip)")
    ap.add_argument("--fsdp-worker", default=None, help=argparse.SUPPRESS)  # internal: a torchrun rank of --all, writes JSON here
    ap.add_argument("--simulate-oom", type=int, default=0, help=argparse.SUPPRESS)  # tests: fail the first N attempts
    args = ap.parse_args(argv)
    if args.loss_chunk_tokens is None:
        from job.config import TrainConfig

        args.loss_chunk_tokens = TrainConfig.model_fields["loss_chunk_tokens"].default
    if args.all and "--time-budget" not in (argv if argv is not None else sys.argv[1:]):
        args.time_budget = ALL_BUDGET_S
    if args.all and "--steps" not in (argv if argv is not None else sys.argv[1:]):
        args.steps = 15  # per variant: 3 warm-up + 12 timed, or fewer when its share of the budget runs out
    if args.cpu_smoke:
        args.layers, args.seq = min(args.layers, 2), min(args.seq, 128)
        args.steps, args.warmup = min(args.steps, 4), min(args.warmup, 1)
        # Inductor's C++ builds take minutes on a small CPU; aot_eager captures and differentiates
        # the same graphs (train.compile's documented knob). A GPU run keeps inductor.
        os.environ.setdefault("MLAUNCH_COMPILE_BACKEND", "aot_eager")
    if args.steps <= args.warmup:
        ap.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    return args


def model_config(args: argparse.Namespace, layers: int | None = None):
    from job.baichuan import BaichuanConfig, variant

    layers = layers or args.layers
    if args.cpu_smoke:
        return BaichuanConfig(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=layers,
                              num_attention_heads=4, position="rope", norm_head=True)
    return variant("baichuan2-7b", num_hidden_layers=layers)


def planner_prediction(mcfg, args: argparse.Namespace, micro_batch: int, gpu_name: str,
                       loss_chunk_tokens: int | None = None, ranks: int = 1) -> dict:
    """The planner's memory for this exact shape per GPU: a `ddp` candidate of world size 1, or
    with `ranks` > 1 the `fsdp` candidate over that many GPUs of one node."""
    from job.planner import ClusterSpec, Workload, enumerate_candidates

    chunk = args.loss_chunk_tokens if loss_chunk_tokens is None else loss_chunk_tokens
    cluster = ClusterSpec.from_gpu_type(gpu_name, nnodes=1, gpus_per_node=ranks)
    work = Workload(seq_len=args.seq, micro_batch=micro_batch, mixed_precision=not args.cpu_smoke,
                    loss_chunk_tokens=chunk)
    (cand,) = enumerate_candidates(mcfg, cluster, work, allowed=["ddp" if ranks == 1 else "fsdp"],
                                   recompute=[args.recompute])
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


def fits(mcfg, args: argparse.Namespace, micro_batch: int, gpu_name: str, loss_chunk_tokens: int) -> bool:
    pred = planner_prediction(mcfg, args, micro_batch, gpu_name, loss_chunk_tokens)
    return pred["memory"]["total"] <= 0.9 * pred["gpu_mem_bytes"]


def most_layers(args: argparse.Namespace, micro_batch: int, gpu_name: str, loss_chunk_tokens: int) -> int:
    """The most decoder layers (up to 32) the planner fits in 90 % of the card; 0 if not even one."""
    fitting = [n for n in range(1, MAX_ALL_LAYERS + 1)
               if fits(model_config(args, n), args, micro_batch, gpu_name, loss_chunk_tokens)]
    return max(fitting, default=0)


def shapes_for_all(args: argparse.Namespace, gpu_name: str) -> tuple[int, int]:
    """(layers, micro_batch) of `--all`: the largest micro-batch of the ladder at which at least 8
    layers fit with the full-logits loss (the hungriest variant), and the most layers that do."""
    if args.cpu_smoke:
        return args.layers, args.micro_batch or 2
    ladder = [args.micro_batch] if args.micro_batch else list(MICRO_BATCH_LADDER)
    for mb in ladder:
        n = most_layers(args, mb, gpu_name, 0)
        if n >= MIN_ALL_LAYERS:
            return n, mb
    return MIN_ALL_LAYERS, ladder[-1]


def attempt(mcfg, args: argparse.Namespace, micro_batch: int, device, deadline: float,
            loss_chunk_tokens: int | None = None, compile_mode: str | None = None, ranks: int = 1) -> dict:
    """Build, train `args.steps` steps, measure. Raises torch.OutOfMemoryError on OOM.

    Alone (`ranks` 1): the model is built complete on the device and run by DDPParallel alone.
    Under torchrun (`ranks` > 1): built on the meta device, sharded over every rank (fsdp) and
    filled by `fill_weights`, as `python -m train` does."""
    import torch

    from job.config import TrainConfig
    from train.build import PendingWeights, fill_weights
    from train.compile import compile_blocks
    from train.loop import build_optimizer
    from train.models.baichuan.model import BaichuanForCausalLM, init_weights, set_activation_checkpointing
    from job.layout import Layout
    from train.models.baichuan.parallelize import BAICHUAN
    from train.parallel.base import parallelize, target_tokens
    from train.parallel.mesh import build_mesh

    chunk = args.loss_chunk_tokens if loss_chunk_tokens is None else loss_chunk_tokens
    compile_mode = compile_mode or args.compile
    if args.simulate_oom > 0:
        args.simulate_oom -= 1
        raise torch.OutOfMemoryError(f"simulated OOM at micro-batch {micro_batch}")
    cfg = TrainConfig.model_validate({
        "model": {"init": {}, "activation_checkpointing": args.recompute},
        "device": device.type, "optim": {"lr": 1e-4, "implementation": "auto"}, "clip_grad_norm": 1.0,
        "loss_chunk_tokens": chunk, "compile": compile_mode,
        "parallel": {"strategy": "fsdp" if ranks > 1 else "ddp"},
    })
    torch.manual_seed(0)
    layout = Layout(dp_shard=ranks) if ranks > 1 else Layout()
    if ranks > 1:
        with torch.device("meta"):  # each rank allocates only its shards (fsdp)
            model = BaichuanForCausalLM(mcfg)
    else:
        with device:  # parameters are created on the device: no host copy of a 2-3 B parameter model
            model = BaichuanForCausalLM(mcfg)
        init_weights(model, mcfg.initializer_range)
    set_activation_checkpointing(model, args.recompute)
    compiled = None
    if compile_mode == "blocks":  # after activation checkpointing, before the strategy wraps the layers
        compiled = compile_blocks(model.model.layers.values(), device)
    mesh = build_mesh(layout, device) if ranks > 1 else None
    par = parallelize(model, layout=layout, mesh=mesh, cfg=cfg, device=device, z_loss_weight=0.0, arch=BAICHUAN)
    if ranks > 1:
        fill_weights(par, PendingWeights(None, 0, mcfg.initializer_range), mcfg, layout)
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
        n = target_tokens(b) * ranks  # every rank its own batch: the global token count (dp_size / n per rank)
        loss_sum, _ = par.forward_backward(b, par.dp_size / n, sync=True)
        par.clip_grad_norm_(cfg.clip_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss_sum) * ranks / n)  # a host sync: the step is over
        sync()
        times.append(time.perf_counter() - t0)
        if ranks > 1:  # the slowest rank's time: every rank stops at the same step
            from train import distributed as D

            over = D.all_reduce_sum(torch.tensor([float(time.perf_counter() > deadline)], device=device))
            times[-1] = float(D.all_reduce_sum(torch.tensor([times[-1]], device=device))) / ranks
            if step >= args.warmup and float(over) > 0:
                break
        elif step >= args.warmup and time.perf_counter() > deadline:
            break
    timed = times[args.warmup:]
    if not timed:
        raise RuntimeError("time budget spent before the first timed step; raise --time-budget or lower --layers")
    step_time = sum(timed) / len(timed)
    result = {
        "loss_chunk_tokens": chunk, "compile": compile_mode, "compile_log": compiled, "ranks": ranks,
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


def measure(mcfg, args: argparse.Namespace, device, gpu_name: str, micro_batch: int, deadline: float, *,
            loss_chunk_tokens: int | None = None, compile_mode: str | None = None, ranks: int = 1) -> dict:
    """One configuration: `attempt` with the OOM retry (alone only), then every figure of it."""
    import torch

    from train.metrics import gpu_peak_flops

    ooms: list[str] = []
    result = None
    while result is None:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            result = attempt(mcfg, args, micro_batch, device, deadline, loss_chunk_tokens, compile_mode, ranks)
        except (torch.OutOfMemoryError, RuntimeError) as e:
            # Some kernels (cuBLAS workspaces, NCCL-free here) report OOM as a plain RuntimeError.
            if ranks > 1 or (not isinstance(e, torch.OutOfMemoryError) and "out of memory" not in str(e)):
                raise
            ooms.append(f"micro_batch {micro_batch}: {str(e).splitlines()[0][:160]}")
            if micro_batch == 1:
                raise SystemExit(f"out of memory even at micro-batch 1 with {mcfg.num_hidden_layers} layers; lower "
                                 f"--layers or --seq ({ooms[-1]})") from None
        if result is None:
            # Outside the except block: the exception and the frames holding the failed attempt's
            # tensors are gone, so the cache can really be emptied.
            micro_batch //= 2
            release(device)
            print(f"OOM, retrying with micro-batch {micro_batch}", flush=True)

    per_token = mcfg.flops_per_token(args.seq)
    peak = gpu_peak_flops(device) if device.type == "cuda" else None
    if device.type == "cuda" and peak is None:
        peak = DEFAULT_PEAK_TFLOPS * 1e12  # unknown card name: assume an H100's peak, and say so below
    pred = planner_prediction(mcfg, args, result["micro_batch"], gpu_name, result["loss_chunk_tokens"], ranks)
    return {
        "device": gpu_name, "layers": mcfg.num_hidden_layers, "hidden": mcfg.hidden_size, "vocab": mcfg.vocab_size,
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
    }


def release(device) -> None:
    import torch

    gc.collect()
    torch._dynamo.reset()  # a compiled variant's graphs hold no memory worth keeping, but its cache does
    if device.type == "cuda":
        torch.cuda.empty_cache()


def report(f: dict) -> None:
    gib = 1024**3
    chunk = f["loss_chunk_tokens"]
    what = (f"loss {f'chunks of {chunk}' if chunk else 'full logits'}, compile {f['compile']}"
            + (f", fsdp over {f['ranks']} ranks" if f["ranks"] > 1 else ""))
    print(f"{f['device']}: {f['layers']} layers, seq {f['seq']}, micro-batch {f['micro_batch']} "
          f"({len(f['oom_retries'])} OOM retries), {f['steps_timed']} timed steps; {what}")
    if f.get("compile_log"):
        print(f"  {f['compile_log']}")
    print(f"  tokens/s {f['tokens_per_s']:,.0f}{' per rank' if f['ranks'] > 1 else ''}   "
          f"step {f['step_time_s'] * 1e3:.1f} ms   loss {f['loss_first']:.3f} -> {f['loss_last']:.3f}")
    if f["peak_tflops"]:
        print(f"  MFU {f['mfu']:.1%} ({f['achieved_tflops']:.0f} of {f['peak_tflops']:.0f} TFLOP/s, "
              f"flops_per_token {f['flops_per_token'] / 1e9:.2f} GFLOP)")
    if "peak_allocated_bytes" in f:
        print(f"  peak allocated {f['peak_allocated_bytes'] / gib:.2f} GiB vs planner {f['predicted_allocated_bytes'] / gib:.2f} GiB "
              f"(ratio {f['memory_ratio_measured_over_predicted']:.3f})", flush=True)


def setup_device(args: argparse.Namespace, local_rank: int = 0):
    import torch

    if args.cpu_smoke:
        return torch.device("cpu"), "cpu"
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible; use --cpu-smoke for the CPU check")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device, torch.cuda.get_device_name(device)


def visible_gpus(args: argparse.Namespace) -> int:
    import torch

    return 0 if args.cpu_smoke else torch.cuda.device_count()


VARIANTS = (("full logits", 0, "none"), ("chunked", None, "none"),
            ("full logits, compiled", 0, "blocks"), ("chunked, compiled", None, "blocks"))


def run_all(args: argparse.Namespace, t_start: float) -> dict:
    """The prepared matrix (see the module docstring); returns every figure."""
    deadline = t_start + args.time_budget
    device, gpu_name = setup_device(args)
    layers, micro_batch = shapes_for_all(args, gpu_name)
    args.layers = layers
    mcfg = model_config(args, layers)
    chunk = args.loss_chunk_tokens or 2048
    fsdp_ranks = args.fsdp_ranks if args.fsdp_ranks is not None else (2 if args.cpu_smoke else visible_gpus(args))
    if fsdp_ranks == 1:
        fsdp_ranks = 0
    fsdp_variants = [("chunked, fsdp", chunk, "none"), ("chunked, compiled, fsdp", chunk, "blocks")] if fsdp_ranks else []
    if args.cpu_smoke:  # one torchrun launch is enough to check the path (FSDP hooks around compiled layers)
        fsdp_variants = fsdp_variants[1:]
    n_parts = len(VARIANTS) + len(fsdp_variants)
    planned = {"layers": layers, "micro_batch": micro_batch,
               "most_layers_chunked": None if args.cpu_smoke else most_layers(args, micro_batch, gpu_name, chunk)}
    print(f"--all on {gpu_name}: {layers} layers (the most the planner fits with full logits at micro-batch "
          f"{micro_batch}; with chunked loss: {planned['most_layers_chunked']}), seq {args.seq}, "
          f"{n_parts} runs in {args.time_budget:.0f} s", flush=True)
    runs: list[dict] = []
    for k, (name, c, comp) in enumerate(VARIANTS):
        share = (deadline - time.perf_counter()) / (n_parts - k)
        try:
            f = measure(mcfg, args, device, gpu_name, micro_batch, time.perf_counter() + share,
                        loss_chunk_tokens=chunk if c is None else c, compile_mode=comp)
        except (RuntimeError, SystemExit) as e:  # one failed variant must not cost the others
            f = {"variant": name, "error": str(e).splitlines()[0][:300] if str(e) else type(e).__name__}
            print(f"{name}: failed: {f['error']}", flush=True)
        else:
            f["variant"] = name
            report(f)
        runs.append(f)
        release(device)
    for k, (name, c, comp) in enumerate(fsdp_variants):
        share = (deadline - time.perf_counter()) / (len(fsdp_variants) - k)
        runs.append(run_fsdp(args, name, fsdp_ranks, layers, micro_batch, c, comp, share))
    summary(runs)
    return {"planned": planned, "runs": runs, "wall_s": time.perf_counter() - t_start}


def run_fsdp(args: argparse.Namespace, name: str, ranks: int, layers: int, micro_batch: int, chunk: int,
             compile_mode: str, budget: float) -> dict:
    """One fsdp configuration under torchrun (a rank per GPU; gloo ranks on CPU with --cpu-smoke)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "fsdp.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               str(Path(__file__).resolve()), "--fsdp-worker", str(out), "--layers", str(layers),
               "--micro-batch", str(micro_batch), "--seq", str(args.seq), "--recompute", args.recompute,
               "--loss-chunk-tokens", str(chunk), "--compile", compile_mode, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--time-budget", str(max(budget - 30.0, 10.0))]
        if args.cpu_smoke:
            cmd.append("--cpu-smoke")
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        if args.cpu_smoke:
            env.setdefault("OMP_NUM_THREADS", "1")
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=budget + 60)
        except subprocess.TimeoutExpired:
            f = {"variant": name, "error": f"torchrun did not finish within {budget + 60:.0f} s"}
            print(f"{name}: failed: {f['error']}", flush=True)
            return f
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-12:]
            f = {"variant": name, "error": f"torchrun exited {proc.returncode}", "stderr_tail": tail}
            print(f"{name}: failed: torchrun exited {proc.returncode}\n  " + "\n  ".join(tail), flush=True)
            return f
        f = json.loads(out.read_text())
    f["variant"] = name
    report(f)
    return f


def fsdp_worker(args: argparse.Namespace, out_path: str) -> None:
    """A torchrun rank of `--all`'s fsdp part; rank 0 writes the figures to `out_path`."""
    import torch

    from train import distributed as D

    env = D.DistEnv.from_env()
    code, clean = 1, False
    try:
        device, gpu_name = setup_device(args, env.local_rank)
        D.init_process_group(env, device, 600.0)
        mcfg = model_config(args)
        f = measure(mcfg, args, device, gpu_name, args.micro_batch or 1, time.perf_counter() + args.time_budget,
                    ranks=env.world_size)
        if device.type == "cuda":  # the largest rank's peak (ranks hold nearly the same)
            import torch.distributed as dist

            peak = torch.tensor([float(f["peak_allocated_bytes"])], device=device)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            f["peak_allocated_bytes"] = int(peak)
            f["memory_ratio_measured_over_predicted"] = f["peak_allocated_bytes"] / f["predicted_allocated_bytes"]
        if env.is_rank0:
            Path(out_path).write_text(json.dumps(f))
        code, clean = 0, True
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        D.shutdown(code, clean=clean)


def summary(runs: list[dict]) -> None:
    gib = 1024**3
    print("\nvariant                      ranks  tokens/s/GPU     MFU   peak GiB  planner GiB  ratio")
    for f in runs:
        if "error" in f:
            print(f"{f['variant']:<28} failed: {f['error'][:60]}")
            continue
        mfu = f"{f['mfu']:.1%}" if f["mfu"] is not None else "-"
        peak = f.get("peak_allocated_bytes")
        ratio = f.get("memory_ratio_measured_over_predicted")
        print(f"{f['variant']:<28} {f['ranks']:>5}  {f['tokens_per_s']:>12,.0f}  {mfu:>6}  "
              f"{peak / gib if peak else float('nan'):>9.2f}  {f['predicted_allocated_bytes'] / gib:>11.2f}  "
              f"{ratio if ratio else float('nan'):>5.3f}", flush=True)


def main(argv: list[str] | None = None) -> dict:
    t_start = time.perf_counter()
    args = parse_args(argv)
    if args.fsdp_worker:
        fsdp_worker(args, args.fsdp_worker)
    if args.all:
        figures = run_all(args, t_start)
        print(json.dumps(figures), flush=True)
        return figures
    device, gpu_name = setup_device(args)
    mcfg = model_config(args)
    micro_batch = first_micro_batch(mcfg, args, gpu_name)
    figures = measure(mcfg, args, device, gpu_name, micro_batch, t_start + args.time_budget)
    figures["wall_s"] = time.perf_counter() - t_start
    report(figures)
    print(json.dumps(figures), flush=True)
    return figures


if __name__ == "__main__":
    main()
