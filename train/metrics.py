"""What rank 0 shows and records: a progress bar (or plain lines), `<output_dir>/metrics.jsonl`,
the launcher's events (job/markers.py's `MLAUNCH_EVENT=` lines) and, with `train.report_to`,
TensorBoard and Weights & Biases.

metrics.jsonl holds one JSON object per logged step: step, epoch, loss, lr, tokens_per_s (real,
non-pad tokens per second over all ranks), padded_tokens_per_s, real_token_fraction, grad_norm,
elapsed_s, tokens (real tokens trained on so far, across resumes) (and mfu on GPU); eval lines
carry step and eval_loss. Other ranks get a logger that does nothing, so the loop calls it
unconditionally.

Under mlaunch (its run id in the environment) the launcher draws the one progress line from the
events: no bar here, and no library's own progress bars (`quiet_libraries`).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from job.files import publish_file
from job.markers import EVENT, RUN_ID_VAR

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
#: The W&B run id, kept in the output directory so that a resume continues the same W&B run.
WANDB_ID_FILE = "wandb-run-id"
#: W&B's x axis for every scalar: our optimizer step. W&B's own step must only grow, and a resume
#: logs the steps after its checkpoint again; with a step metric those are plain points.
WANDB_STEP = "train/step"

#: The package each `train.report_to` entry needs (the import name is the pip name).
REPORTER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}

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


def under_mlaunch() -> bool:
    """Whether this process is part of an mlaunch run (the launcher sets its run id)."""
    return bool(os.environ.get(RUN_ID_VAR))


def quiet_libraries() -> None:
    """No progress bars of datasets (tokenising, saving the cache) on the nodes: under mlaunch
    they would be nested inside the launcher's live view, and they are noise in the logs."""
    import datasets

    datasets.disable_progress_bars()


def missing_reporter(report_to: Sequence[str]) -> str | None:
    """The one line for a `train.report_to` entry whose package is not installed here, or None.
    Checked before any work, so that it is not a traceback after the data and the model."""
    for name in report_to:
        package = REPORTER_PACKAGES[name]
        if importlib.util.find_spec(package) is None:
            return (f"train.report_to: `{name}` needs the {package} package, which is not installed in "
                    f"{sys.executable}: pip install {package} (or pip install 'mlaunch[metrics]'), or remove "
                    f"`{name}` from train.report_to")
    return None


def finite(value: Any) -> Any:
    """`value` with every non-finite float (NaN, ±inf) replaced by None, for strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def emit_event(kind: str, **fields: Any) -> None:
    """One `MLAUNCH_EVENT=<json>` line on stdout (job/markers.py lists the kinds and keys)."""
    payload = finite({"event": kind, **fields})
    print(EVENT + json.dumps(payload, separators=(",", ":"), allow_nan=False, default=str), flush=True)


def truncate_after(path: Path, step: int) -> list[dict[str, Any]]:
    """Drop lines logged after `step`: a resumed run logs those steps again, and the file must
    read as one run. Returns the records kept."""
    if not path.is_file():
        return []
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut by the crash
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(record)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    tmp.replace(path)
    return kept


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A record's numbers under the names TensorBoard and W&B show: `train/<key>`, `eval/loss`."""
    out = {}
    for k, v in record.items():
        if k == "step" or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        out["eval/" + k.removeprefix("eval_") if k.startswith("eval") else "train/" + k] = v
    return out


class MetricsLogger:
    """Rank 0's outputs. `enabled=False` (other ranks) makes every method a no-op.

    `report_to`: `train.report_to`. `run_name` and `config` (the resolved job config as a plain
    dict) name the W&B run and go with it. `events`: print the launcher's event lines (default:
    under mlaunch only, so a plain `python -m train` stays readable). A reporter that cannot be
    opened (W&B refusing to start) leaves its one-line reason in `error` instead of raising: the
    loop shares it with every rank, so that all of them stop together."""

    def __init__(self, out_dir: Path, *, enabled: bool, total_steps: int, start_step: int,
                 report_to: Sequence[str] = (), run_name: str | None = None, config: dict[str, Any] | None = None,
                 events: bool | None = None) -> None:
        self.enabled = enabled
        self.total_steps = total_steps
        self.out_dir = Path(out_dir)
        self.events = under_mlaunch() if events is None else events
        self.error: str | None = None
        self.bar = None
        self.tb = None
        self.wandb = None
        self.file = None
        self.last_loss: float | None = None
        self.last_eval_loss: float | None = None
        self.best_eval_loss: float | None = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / METRICS_FILE
        for record in truncate_after(self.path, start_step):  # a resume's end reports the whole run
            self._remember(record)
        self.file = self.path.open("a", buffering=1)  # line-buffered: readable while running
        # A bar on a terminal; plain lines in log files, where \r updates would pile up. Under
        # mlaunch the launcher draws the progress line itself (from the events); jobs launched over
        # SSH run in a pty (for hangup delivery) but their output is streamed into prefixed lines
        # and log files: the launcher also marks them non-interactive.
        self.interactive = (sys.stderr.isatty() and os.environ.get("MLAUNCH_NONINTERACTIVE") != "1"
                            and not under_mlaunch())
        if self.interactive:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        self.error = missing_reporter(report_to)
        if self.error is not None:
            return
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resume drops what an earlier attempt logged after its checkpoint.
            self.tb = SummaryWriter(log_dir=str(self.out_dir / TENSORBOARD_DIR), purge_step=start_step + 1)
        if "wandb" in report_to:
            self._open_wandb(run_name or self.out_dir.name, config or {}, start_step)

    def _open_wandb(self, name: str, config: dict[str, Any], start_step: int) -> None:
        import wandb

        id_file = self.out_dir / WANDB_ID_FILE
        # A resume continues the W&B run of the first attempt; a fresh start in the same folder is
        # a new W&B run (its steps begin at 1 again).
        run_id = id_file.read_text().strip() if start_step > 0 and id_file.is_file() else None
        if not run_id:
            run_id = uuid.uuid4().hex[:12]  # W&B ids: lowercase letters and digits
            publish_file(id_file, run_id + "\n")
        # Under mlaunch W&B's banner and end-of-run table are noise in the node logs: one line instead.
        quiet = under_mlaunch()
        try:
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "mlaunch"), name=name, id=run_id,
                                    resume="allow", config=config, dir=str(self.out_dir),
                                    settings=wandb.Settings(silent=True) if quiet else None)
        except Exception as e:  # not logged in, no network, a bad project: W&B raises many kinds
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            self.error = (f"train.report_to: wandb could not start a run ({first}); log in with `wandb login`, "
                          "or set WANDB_MODE=offline on the nodes (`wandb sync` uploads it later)")
            return
        self.wandb.define_metric(WANDB_STEP)
        self.wandb.define_metric("*", step_metric=WANDB_STEP)
        if quiet:
            where = (f"offline in {Path(self.wandb.dir).parent} (`wandb sync` uploads it)" if self.wandb.offline
                     else self.wandb.url)
            self.message(f"W&B run {name} ({run_id}): {where}")

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

    def start(self, **fields: Any) -> None:
        """The `start` event: what the run is about to do (total_steps, epochs, start_step, …)."""
        if self.enabled and self.events:
            emit_event("start", total_steps=self.total_steps, **fields)

    def log(self, record: dict[str, Any]) -> None:
        """Write one metrics record (train or eval) to every sink."""
        if not self.enabled:
            return
        record = finite(record)
        self.file.write(json.dumps(record) + "\n")
        step = record["step"]
        numbers = scalars(record)
        if self.tb is not None:
            for tag, value in numbers.items():
                self.tb.add_scalar(tag, value, step)
        if self.wandb is not None:
            self.wandb.log({WANDB_STEP: step, **numbers})
        self._remember(record)
        if "eval_loss" in record:
            loss = record["eval_loss"]
            if self.events:
                emit_event("eval", step=step, eval_loss=loss)
            self.message(f"step {step}: eval_loss {_fmt(loss, '.4f')}")
            return
        if self.events:
            emit_event("train", **record, total_steps=self.total_steps)
        short = {"loss": _fmt(record.get("loss"), ".4f"), "lr": _fmt(record.get("lr"), ".2e"),
                 "tok/s": _fmt(record.get("tokens_per_s"), ".0f")}
        if record.get("mfu") is not None:
            short["mfu"] = f"{100 * record['mfu']:.1f}%"
        if self.bar is not None:
            self.bar.set_postfix(short, refresh=False)
        else:
            self.message(f"step {step}/{self.total_steps} " + " ".join(f"{k} {v}" for k, v in short.items()))

    def _remember(self, record: dict[str, Any]) -> None:
        """Keep what the `end` event reports: the last train and eval loss, the best eval loss."""
        if "eval_loss" in record:
            loss = self.last_eval_loss = record["eval_loss"]
            if loss is not None and (self.best_eval_loss is None or loss < self.best_eval_loss):
                self.best_eval_loss = loss
        elif "loss" in record:
            self.last_loss = record["loss"]

    def end(self, *, outcome: str, steps: int, tokens: int, wall_s: float, train_s: float,
            export: Path | None, checkpoints: Path | None) -> None:
        """The `end` event: how the run went and where its outputs are (job/markers.py)."""
        if not (self.enabled and self.events):
            return
        emit_event(
            "end", outcome=outcome, steps=steps, total_steps=self.total_steps, loss=self.last_loss,
            eval_loss=self.last_eval_loss, best_eval_loss=self.best_eval_loss, tokens=tokens,
            wall_s=round(wall_s, 3), tokens_per_s=tokens / train_s if train_s > 0 else None,
            output_dir=str(self.out_dir.resolve()), export=_abs(export), checkpoints=_abs(checkpoints),
            metrics=str(self.path.resolve()))

    def close(self) -> None:
        """Close every sink (idempotent)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
        if self.file is not None:
            self.file.close()
            self.file = None


def _fmt(value: float | None, spec: str) -> str:
    return "nan" if value is None else format(value, spec)


def _abs(path: Path | None) -> str | None:
    return None if path is None else str(Path(path).resolve())
