"""What rank 0 shows and records: a progress bar, `<output_dir>/metrics.jsonl`, TensorBoard.

metrics.jsonl holds one JSON object per logged step: step, epoch, loss, lr, tokens_per_s (real,
non-pad tokens per second over all ranks), padded_tokens_per_s, real_token_fraction, grad_norm,
elapsed_s (and mfu on GPU); eval lines carry step and eval_loss. Other ranks get a logger that
does nothing, so the loop calls it unconditionally.
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

METRICS_FILE = "metrics.jsonl"

# Dense bf16 peak per GPU (TFLOP/s), for MFU when `cluster.gpu.peak_tflops` is not set. Matched
# against torch.cuda.get_device_name(), most specific name first.
_PEAK_BF16_TFLOPS = [
    ("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0), ("A10", 125.0), ("L4", 121.0),
    ("4090", 165.0), ("V100", 125.0),
]


def gpu_peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of this rank's GPU (None on CPU or for an unknown GPU: no MFU then)."""
    if device.type != "cuda":
        return None
    if override_tflops:
        return override_tflops * 1e12
    name = torch.cuda.get_device_name(device)
    for key, tflops in _PEAK_BF16_TFLOPS:
        if key in name:
            return tflops * 1e12
    return None


def truncate_after(path: Path, step: int) -> None:
    """Drop lines logged after `step`: a resumed run logs those steps again, and the file must
    read as one run."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except ValueError:
            continue  # a line cut by the crash
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(k + "\n" for k in kept))
    tmp.replace(path)


class MetricsLogger:
    """Rank 0's outputs. `enabled=False` (other ranks) makes every method a no-op."""

    def __init__(self, out_dir: Path, *, enabled: bool, total_steps: int, start_step: int,
                 tensorboard: bool) -> None:
        self.enabled = enabled
        self.total_steps = total_steps
        self.bar = None
        self.tb = None
        self.file = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / METRICS_FILE
        truncate_after(self.path, start_step)
        self.file = self.path.open("a", buffering=1)  # line-buffered: readable while running
        # A bar on a terminal; plain lines in log files, where \r updates would pile up. Jobs
        # launched over SSH run in a pty (for hangup delivery) but their output is streamed into
        # prefixed lines and log files: the launcher marks them non-interactive.
        self.interactive = sys.stderr.isatty() and os.environ.get("MLAUNCH_NONINTERACTIVE") != "1"
        if self.interactive:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warnings.warn("train.tensorboard is on but the tensorboard package is not installed; "
                              "writing metrics.jsonl only (pip install tensorboard)", stacklevel=2)
            else:
                self.tb = SummaryWriter(log_dir=str(out_dir / "tensorboard"), purge_step=start_step + 1)

    def message(self, text: str) -> None:
        """One line for the user (rank 0), without breaking the bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def log(self, record: dict[str, Any]) -> None:
        """Write one metrics record (train or eval) to every sink."""
        if not self.enabled:
            return
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.file.write(json.dumps(record) + "\n")
        step = record["step"]
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(("eval/" if k.startswith("eval") else "train/") + k, v, step)
        if "eval_loss" in record:
            self.message(f"step {step}: eval_loss {record['eval_loss']:.4f}")
            return
        short = {"loss": f"{record['loss']:.4f}", "lr": f"{record['lr']:.2e}", "tok/s": f"{record['tokens_per_s']:.0f}"}
        if record.get("mfu") is not None:
            short["mfu"] = f"{100 * record['mfu']:.1f}%"
        if self.bar is not None:
            self.bar.set_postfix(short, refresh=False)
        else:
            self.message(f"step {step}/{self.total_steps} " + " ".join(f"{k} {v}" for k, v in short.items()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.file is not None:
            self.file.close()
