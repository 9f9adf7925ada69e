"""The training loop: the product tutorial's recipe (prompt → tokens → AdamW on a causal LM) made
real: length-grouped batches instead of padding to 1024, any parallel strategy, exact resume.

Reading order: `train` (set-up, resume, the loop, the end), then the helpers it calls.

Loss normalisation. A step's loss is the mean over every real target token of the global batch
(all micro-batches of the step, all data-parallel ranks). The token counts of the whole step are
summed across ranks before its first forward (one all-reduce, which also carries the SIGTERM
flag), and each micro-batch's loss sum is scaled by dp_size / global_count before backward: the
strategy averages gradients over dp_size replicas, which cancels the dp_size. A world of 2 with
micro-batch b thus follows the same trajectory as a world of 1 with micro-batch 2b.
"""

from __future__ import annotations

import itertools
import math
import time
from pathlib import Path
from typing import Any

import torch

from job.config import JobConfig, TrainConfig, to_yaml
from job.errors import ConfigError, MlaunchError
from job.files import publish_file
from train import checkpoint as ckpt
from train import heartbeat as hb
from train.heartbeat import Heartbeat
from train import distributed as D
from train.distributed import DistEnv, StopFlag
from train.compile import compile_blocks
from train.build import build_model, describe_weights, fill_weights, model_dir_of, params_held_per_rank
from train.metrics import MetricsLogger, gpu_peak_flops, missing_reporter, quiet_libraries, under_mlaunch
from job.layout import Layout
from train.models.baichuan.parallelize import BAICHUAN
from train.parallel.base import Parallelized, parallelize, target_tokens
from train.parallel.mesh import build_mesh




def train(job: JobConfig, env: DistEnv, layout: Layout, device: torch.device, stop: StopFlag,
          beat: Heartbeat | None = None) -> int:
    """Run one training job on this rank; returns the exit code. Collective on every rank.
    `beat` (train/heartbeat.py) is told each phase, for the launcher's hang detection."""
    at = beat.at if beat is not None else (lambda phase, step=None: None)
    t_begin = time.perf_counter()
    from train.data import make_batch_sampler, prepare_data  # heavy (datasets)
    from train.tokenizer import BaichuanTokenizer, ensure_tokenizer

    cfg = job.train
    out_dir = Path(cfg.output_dir)
    ckpt_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else out_dir / "checkpoints"
    removed: list[Path] = []
    if env.is_rank0:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not (out_dir / "config.yaml").exists():  # `mlaunch run` writes it; a resume keeps the first
            publish_file(out_dir / "config.yaml", to_yaml(job))
        removed = ckpt.clean_incomplete(ckpt_dir)
    # Before any work, on every rank at once: a reporter's package missing on rank 0 is one line
    # now, not a traceback after the data and the model are ready.
    missing = D.broadcast_object(missing_reporter(cfg.report_to) if env.is_rank0 else None)
    if missing:
        raise ConfigError(missing)
    if under_mlaunch():
        quiet_libraries()
    D.barrier()
    ckpt.check_shared(ckpt_dir, env.is_rank0)

    # ---------------------------------------------------------------- tokenizer, data, model
    torch.manual_seed(cfg.seed)
    mesh = build_mesh(layout, device)
    model_dir = model_dir_of(cfg)
    barrier_kw = dict(local_rank=env.local_rank, barrier=D.barrier)
    tokenizer_file = ensure_tokenizer(cfg, model_dir, out_dir / "cache", **barrier_kw)
    tokenizer = BaichuanTokenizer(tokenizer_file)
    data = prepare_data(cfg, tokenizer, out_dir / "cache", **barrier_kw)
    model, mcfg, pending = build_model(cfg, tokenizer.vocab_size, model_dir, device, layout)
    # After activation checkpointing (build_model), before the strategy wraps the layers.
    compiled = compile_blocks(model.model.layers.values(), device) if cfg.compile == "blocks" else None
    par = parallelize(model, layout=layout, mesh=mesh, cfg=cfg, device=device, z_loss_weight=mcfg.z_loss_weight,
                      arch=BAICHUAN)
    # Known before the weights are filled: a resume overwrites every parameter from its checkpoint,
    # so a meta-built model skips reading the pretrained folder (tens of GB for 13B) altogether.
    resume_from = ckpt.find_resume(ckpt_dir, cfg.checkpoint.resume)
    # built on the meta device: the strategy allocated only this rank's part. A LoRA checkpoint
    # holds only the adapters: the frozen base is filled from its source on resume too.
    if pending is not None and (resume_from is None or cfg.lora is not None):
        fill_weights(par, pending, mcfg, layout)
    held = params_held_per_rank(par)  # proof of the above in the log: ~1/world each under fsdp
    optimizer = build_optimizer(par, cfg, device)

    # The sampler owns the data position (epoch, next global batch); a resume restores it.
    sampler = make_batch_sampler(cfg.data, data.train["length"], dp_rank=par.dp_rank, dp_size=par.dp_size, seed=cfg.seed)
    micro_per_epoch = len(sampler)
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.grad_accum)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    scheduler = build_scheduler(optimizer, cfg, total_steps)

    # ---------------------------------------------------------------- resume
    step, elapsed_before = 0, 0.0
    tokens, train_s = 0, 0.0  # real tokens trained on, and the time in steps: across resumes too
    if resume_from is not None:
        state = ckpt.load(resume_from, par, optimizer)
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        step, elapsed_before = state["step"], state["elapsed_s"]
        tokens, train_s = state.get("tokens", 0), state.get("train_s", 0.0)  # absent before they were kept
        par.settle_after_resume()

    log = MetricsLogger(out_dir, enabled=env.is_rank0, total_steps=total_steps, start_step=step,
                        report_to=cfg.report_to, run_name=job.name, config=job.model_dump(mode="json"))
    failed = D.broadcast_object(log.error)  # W&B refused to start on rank 0: every rank stops here
    if failed:
        log.close()
        raise ConfigError(failed)
    if env.is_rank0:
        for p in removed:
            log.message(f"removed half-written checkpoint {p}")
        if resume_from is None and ckpt.complete_checkpoints(ckpt_dir):
            log.message(f"warning: starting afresh (resume: {cfg.checkpoint.resume}) although {ckpt_dir} holds "
                        "checkpoints of an earlier run; they will be overwritten or pruned")
    n_eval = len(data.eval) if data.eval is not None else 0
    log.message(
        f"{layout.strategy} on {layout.world_size} rank(s) ({device.type}); model {mcfg.num_params / 1e6:.2f}M params; "
        f"{len(data.train)} train / {n_eval} eval examples, {data.skipped} bad rows skipped; "
        f"{micro_per_epoch} micro-batches/epoch x grad_accum {cfg.grad_accum} -> {total_steps} steps"
        + (f"; resumed from {resume_from} at step {step}" if resume_from else "")
    )
    weights = (f"from checkpoint {resume_from.name} (built on the meta device; nothing else read)"
               if pending is not None and resume_from is not None and cfg.lora is None
               else describe_weights(cfg, layout, pending))
    if cfg.lora is not None:
        from train.lora import trainable_summary

        log.message(trainable_summary(par.state_dict_module(), mcfg, cfg.lora))
    if compiled is not None:
        log.message(compiled)
    log.message(f"weights: {weights}; parameters held per rank right after building: "
                f"min {min(held)} max {max(held)} of {mcfg.num_params} ({max(held) / mcfg.num_params:.1%})")
    # The launcher's events (rank 0, under mlaunch): what the run is about to do, and how it ended.
    log.start(start_step=step, epochs=math.ceil(total_steps / max(steps_per_epoch, 1)),
              steps_per_epoch=steps_per_epoch, world_size=layout.world_size, strategy=layout.strategy,
              device=device.type, model=cfg.model.name_or_path or f"init ({cfg.model.variant})",
              params=mcfg.num_params, lora=cfg.lora is not None, train_examples=len(data.train),
              eval_examples=n_eval, tokens_per_epoch=data.stats.train_tokens,
              tokens_per_step=round(data.stats.train_tokens / max(steps_per_epoch, 1)),
              resumed_from=str(resume_from) if resume_from else None)
    export: Path | None = None  # set by the export at the end

    def end(outcome: str) -> None:
        if env.is_rank0:
            log.end(outcome=outcome, steps=step, tokens=tokens, wall_s=time.perf_counter() - t_begin,
                    train_s=train_s, export=export,
                    checkpoints=ckpt_dir if ckpt.complete_checkpoints(ckpt_dir) else None)

    # ---------------------------------------------------------------- the loop
    collate_kw = {"pad_to": cfg.data.max_length if cfg.data.batching == "pad_to_max" else None,
                  "max_length": cfg.data.max_length}
    peak = gpu_peak_flops(device, job.cluster.gpu.peak_tflops if job.cluster else None)
    replication = layout.world_size // par.dp_size  # ranks that see the same batch (pipeline stages)
    batches_iter = iter(sampler)
    window = _Window()
    t_start = time.perf_counter() - elapsed_before  # elapsed_s continues across resumes
    stopped = False
    saved_step = step  # a resume starts at a complete checkpoint

    def save_checkpoint(position: dict[str, int] | None = None) -> None:
        nonlocal saved_step
        at(hb.CHECKPOINT)
        trainer_state = {"step": step, "scheduler": scheduler.state_dict(), "sampler": position or sampler.state_dict(),
                         "elapsed_s": time.perf_counter() - t_start, "tokens": tokens, "train_s": train_s}
        path = ckpt.save(ckpt_dir, step, par, optimizer, trainer_state, cfg.checkpoint.keep)
        saved_step = step
        log.message(f"saved checkpoint {path}")

    par.train()
    while step < total_steps:
        at(hb.DATA, step)
        position = sampler.state_dict()  # before this step's batches are drawn: what a save at this boundary records
        chunk = list(itertools.islice(batches_iter, cfg.grad_accum))
        if not chunk:  # epoch done: the sampler has moved on to the next one
            batches_iter = iter(sampler)
            chunk = list(itertools.islice(batches_iter, cfg.grad_accum))
        batches = [_collate(data.train, idx, collate_kw) for idx in chunk]

        # One all-reduce per step: the token counts that normalise the loss, and the stop flag.
        n_target, n_real, n_padded, n_seqs, stop_votes, save_votes = D.all_reduce_counts(
            sum(target_tokens(b) for b in batches), sum(int(b["attention_mask"].sum()) for b in batches),
            sum(b["input_ids"].numel() for b in batches), sum(b["input_ids"].shape[0] for b in batches),
            int(stop.requested), int(stop.save_requested))
        if stop_votes > 0:  # any rank asked to stop: all stop at this same step
            stopped = True
            break
        if save_votes > 0:  # a checkpoint was asked for (Slurm's warning before preemption / time limit)
            if step > saved_step:
                save_checkpoint(position)  # the batches drawn for the step not taken are redone
            if D.is_rank0():
                stop.acknowledge_save(step)
            log.message(f"checkpointed at step {step} on request (scheduler warning); stopping: the job "
                        "requeues and resumes from here")
            end("requeued")
            log.close()
            return 0
        # Ranks of one replica (pipeline stages) counted the same batch: once per replica.
        n_target, n_real, n_padded, n_seqs = (c // replication for c in (n_target, n_real, n_padded, n_seqs))
        loss_scale = par.dp_size / max(n_target, 1)

        at(hb.STEP)
        loss_sum = torch.zeros((), device=device)
        for k, batch in enumerate(batches):
            micro_loss, _ = par.forward_backward(batch, loss_scale, sync=k == len(batches) - 1)
            loss_sum += micro_loss
        grad_norm = par.clip_grad_norm_(cfg.clip_grad_norm)
        if not math.isfinite(grad_norm):
            # The same global norm on every rank, so all stop here together, before the step:
            # the weights stay finite and no checkpoint of a diverged model is ever written.
            raise MlaunchError(
                f"step {step + 1}: the gradient norm is {grad_norm} (loss diverged); lower train.optim.lr, "
                "add warmup (train.schedule.warmup_steps) or set train.clip_grad_norm; "
                f"resume continues from the last complete checkpoint in {ckpt_dir}")
        lr = optimizer.param_groups[0]["lr"]
        at(hb.OPTIMIZER)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window.add(n_real, n_padded, n_seqs)
        tokens += n_real
        log.advance()

        last = step == total_steps
        if step % cfg.log_every == 0 or last:
            total_loss = D.all_reduce_sum(loss_sum.detach().double().cpu().reshape(1))
            elapsed, real, padded, seqs = window.take()
            train_s += elapsed
            record = {
                "step": step,
                "epoch": round(sampler.epoch + sampler.next_batch / micro_per_epoch, 4),
                "loss": float(total_loss) / max(n_target, 1),
                "lr": lr,
                "tokens_per_s": real / elapsed,
                "padded_tokens_per_s": padded / elapsed,
                "real_token_fraction": real / max(padded, 1),
                "grad_norm": grad_norm,
                "elapsed_s": round(time.perf_counter() - t_start, 3),
                "tokens": tokens,
            }
            if peak:
                per_token = mcfg.flops_per_token(max(1, round(padded / max(seqs, 1))))
                record["mfu"] = per_token * record["tokens_per_s"] / (peak * layout.world_size)
            log.log(record)
        t_aside = time.perf_counter()  # eval and checkpoint time is kept out of tokens/s
        if n_eval and ((cfg.eval_every and step % cfg.eval_every == 0) or last):
            at(hb.EVAL, step)
            log.log({"step": step, "eval_loss": evaluate(par, data.eval, cfg, replication, collate_kw)})
            par.train()
        if (cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0) or last:
            save_checkpoint()
        window.t0 += time.perf_counter() - t_aside

    if stopped:
        log.message(f"stopped by signal at step {step}; resume continues from the last complete checkpoint")
        end("stopped")
        log.close()
        return stop.exit_code
    if cfg.checkpoint.export and cfg.lora is not None:
        at(hb.EXPORT, step)
        state = par.full_state_dict_for_export()
        if env.is_rank0:
            from train.lora import export_lora

            path = export_lora(state, mcfg, cfg, out_dir / "export", dtype=getattr(torch, cfg.checkpoint.export_dtype),
                               tokenizer_file=tokenizer_file, model_dir=model_dir, train_config_yaml=to_yaml(job))
            log.message(f"exported the LoRA adapter to {path}")
            export = path
    elif cfg.checkpoint.export:
        at(hb.EXPORT, step)
        state = par.full_state_dict_for_export()
        if env.is_rank0:
            from train.models.baichuan.hub import save_state_dict

            dtype = getattr(torch, cfg.checkpoint.export_dtype)
            state = {k: v.to(dtype) for k, v in state.items()}
            path = save_state_dict(state, mcfg, out_dir / "export", tokenizer_file=tokenizer_file,
                                   export_format=cfg.checkpoint.export_format)
            log.message(f"exported {path}")
            export = path
    end("completed")
    log.close()
    return 0


def build_optimizer(par: Parallelized, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; no weight decay on norms and biases (1-D parameters)."""
    o = cfg.optim
    decay, no_decay = [], []
    for _, p in par.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [g for g in ({"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0})
              if g["params"]]
    impl = o.implementation
    if impl == "auto":
        impl = "fused" if device.type == "cuda" else "foreach"
    kernel = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}[impl]
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, **kernel)


def lr_factor(step: int, *, warmup: int, total: int, decay: str, min_ratio: float) -> float:
    """Multiplier of the peak lr for the update after `step` updates: linear warmup to 1 over
    `warmup` steps, then `decay` down to `min_ratio` at the last step (`total - 1`)."""
    if step < warmup:
        return (step + 1) / warmup
    if decay == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - 1 - warmup))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if decay == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    s = cfg.schedule
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, warmup=s.warmup_steps, total=total_steps, decay=s.decay, min_ratio=s.min_lr_ratio),
    )


# ------------------------------------------------------------------------------ data
def _collate(dataset, indices: list[int], kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
    from train.data import collate

    if not indices:
        # This rank's share of the last eval batch is empty: a one-token pad batch with no target
        # keeps it in step with the collectives of the others and adds nothing to the loss.
        return {"input_ids": torch.zeros(1, 1, dtype=torch.long), "attention_mask": torch.zeros(1, 1, dtype=torch.long),
                "labels": torch.full((1, 1), -100, dtype=torch.long)}
    return collate(dataset[indices], **kwargs)


@torch.no_grad()
def evaluate(par: Parallelized, eval_set, cfg: TrainConfig, replication: int, collate_kw: dict) -> float:
    """Token-weighted mean loss over the whole held-out split. Examples are sorted by length
    (little padding) and dealt out so that every rank runs the same number of micro-batches."""
    par.train(False)
    lengths = eval_set["length"]
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    per_rank = cfg.data.micro_batch_size
    global_batch = per_rank * par.dp_size
    loss_sum = torch.zeros((), device=par.device)
    n_tokens = 0
    for start in range(0, len(order), global_batch):
        mine = order[start + par.dp_rank * per_rank : start + (par.dp_rank + 1) * per_rank]
        micro_loss, n = par.eval_loss(_collate(eval_set, mine, collate_kw))
        loss_sum += micro_loss
        n_tokens += n
    totals = D.all_reduce_sum(torch.tensor([float(loss_sum), float(n_tokens)], dtype=torch.float64))
    return float(totals[0]) / max(1.0, float(totals[1]) / replication)


class _Window:
    """Tokens and wall time since the last logged step, for throughput."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.real = self.padded = self.seqs = 0

    def add(self, real: int, padded: int, seqs: int) -> None:
        self.real += real
        self.padded += padded
        self.seqs += seqs

    def take(self) -> tuple[float, int, int, int]:
        now = time.perf_counter()
        out = (max(now - self.t0, 1e-9), self.real, self.padded, self.seqs)
        self.t0, self.real, self.padded, self.seqs = now, 0, 0, 0
        return out
