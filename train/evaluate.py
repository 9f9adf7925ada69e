"""`mlaunch eval`: loss and perplexity on the held-out split training used, for a run, an export or
the base model of a job YAML, so base and fine-tuned compare with one line each.

One process. The split, the tokenising and the batching are the trainer's (train/data, the same
seed and `eval_fraction`, examples sorted by length and cut into `micro_batch_size` batches), and
`loss` is the trainer's `eval_loss`: the token-weighted mean over every real target token,
Baichuan2's z-loss included when the model has one. `perplexity` is exp of the cross-entropy
alone (`ce_loss`), the number that compares across models whatever their z-loss.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from pathlib import Path
from typing import IO, Any

import torch

from job.errors import ConfigError
from train import exports


@torch.inference_mode()
def heldout_loss(model, eval_set, micro_batch_size: int, collate_kw: dict[str, Any], z_loss_weight: float,
                 device: torch.device) -> dict[str, float]:
    """{loss, ce_loss, tokens} over `eval_set` (the trainer's order and batching, one rank)."""
    from train.data import collate
    from train.loss import causal_lm_loss
    from train.parallel.base import target_tokens

    lengths = eval_set["length"]
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))  # as train.loop.evaluate
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    loss_sum = ce_sum = 0.0
    n_tokens = 0
    for start in range(0, len(order), micro_batch_size):
        batch = collate(eval_set[order[start:start + micro_batch_size]], **collate_kw)
        n_tokens += target_tokens(batch)
        with autocast:
            logits = model(batch["input_ids"].to(device), batch["attention_mask"].to(device))
            ce, _ = causal_lm_loss(logits, batch["labels"], 0.0)
            total = causal_lm_loss(logits, batch["labels"], z_loss_weight)[0] if z_loss_weight else ce
        loss_sum += float(total)
        ce_sum += float(ce)
    n = max(n_tokens, 1)
    return {"loss": loss_sum / n, "ce_loss": ce_sum / n, "tokens": n_tokens}


def run(target: Path, *, as_json: bool = False, device: str = "auto", out: IO[str] | None = None) -> dict[str, Any]:
    """Evaluate `target` (a run's output_dir, its export, or a job YAML's base model) and print one
    line (or one JSON object). Returns the record."""
    from train.data import prepare_data
    from train.tokenizer import BaichuanTokenizer

    out = out or sys.stdout
    t = exports.find_target(target, allow_job_yaml=True)
    job = exports.read_job(t)
    if job is None:
        raise ConfigError(f"{target}: no run config.yaml beside the export, so the held-out split is unknown; "
                          "pass the run's output_dir (or a job YAML for its base model)")
    cfg = job.train
    if cfg.data.eval_fraction <= 0:
        raise ConfigError(f"{t.config_file}: train.data.eval_fraction is 0, so there is no held-out split; "
                          "set it (--set is not needed for a run: its config says which split it trained on)")
    dev, dtype = exports.pick_device(device)
    if t.export_dir is None:  # a base model: its vocabulary may come from the tokenizer (model.init)
        tok_file = exports.tokenizer_file(t, job, None)
        model, mcfg, _ = exports.load_model(t, job, dev, dtype, vocab_size=BaichuanTokenizer(tok_file).vocab_size)
    else:
        model, mcfg, tok = exports.load_model(t, job, dev, dtype)
        tok_file = exports.tokenizer_file(t, job, tok)
    tokenizer = BaichuanTokenizer(tok_file)
    run_dir = t.config_file.parent if t.config_file.name == exports.RUN_CONFIG else Path(cfg.output_dir)
    data = prepare_data(cfg, tokenizer, run_dir / "cache", local_rank=0, barrier=lambda: None)
    if data.eval is None or len(data.eval) == 0:
        raise ConfigError(f"{t.config_file}: the held-out split is empty; raise train.data.eval_fraction")
    collate_kw = {"pad_to": cfg.data.max_length if cfg.data.batching == "pad_to_max" else None,
                  "max_length": cfg.data.max_length}
    result = heldout_loss(model, data.eval, cfg.data.micro_batch_size, collate_kw, mcfg.z_loss_weight, dev)
    record = {"target": str(target), "model": exports.describe(t), "examples": len(data.eval), **result,
              "perplexity": math.exp(min(result["ce_loss"], 700.0))}
    if as_json:
        out.write(json.dumps(record) + "\n")
    else:
        out.write(f"{target}: eval loss {record['loss']:.4f}, perplexity {record['perplexity']:.3f} "
                  f"({record['examples']} held-out examples, {record['tokens']} tokens; {record['model']})\n")
    return record


def main(argv: list[str] | None = None) -> int:
    """The process `mlaunch eval` starts (the launcher never imports train/)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m train.evaluate", description=run.__doc__.splitlines()[0])
    p.add_argument("target", type=Path)
    p.add_argument("--json", dest="as_json", action="store_true")
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    return exports.run_command(lambda: run(a.target, as_json=a.as_json, device=a.device))


if __name__ == "__main__":
    sys.exit(main())
