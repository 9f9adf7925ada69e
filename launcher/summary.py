"""The short block the launcher prints at the end of a run: how it went (steps, tokens, wall time,
mean tokens/s, final and best eval loss) and where its outputs are (export, checkpoints, logs,
loss curve).

    lines = summary_lines(end_event, load_records(output_dir), output_dir=output_dir)

Built from rank 0's `end` event (job/markers.py) when there is one; a run that failed or was
killed before it has none, and the block then says what its logged records tell. Torch-free.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from launcher.progress import clock


def summary_lines(end_event: dict[str, Any] | None, records: list[dict[str, Any]], *,
                  output_dir: Path | None = None) -> list[str]:
    """The end-of-run lines, without prefixes. `end_event`: rank 0's `end` event, or None when it
    never came. `records`: the run's metrics records (launcher.plot.load_records). `output_dir`:
    where the logs and loss.png are looked for when the event does not say (it says
    `output_dir`)."""
    end = end_event or {}
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if r.get("eval_loss") is not None]
    last = train[-1] if train else {}
    lines = [_progress_line(end, last)]

    losses = []
    loss = end.get("loss", last.get("loss"))
    if loss is not None:
        losses.append(f"final train loss {loss:.4f}")
    final_eval = end.get("eval_loss", evals[-1]["eval_loss"] if evals else None)
    if final_eval is not None:
        losses.append(f"final eval loss {final_eval:.4f}")
    best = min(evals, key=lambda r: r["eval_loss"]) if evals else None
    best_loss = end.get("best_eval_loss", best["eval_loss"] if best else None)
    if best_loss is not None:
        at = f" (step {best['step']})" if best is not None and best["eval_loss"] == best_loss else ""
        losses.append(f"best eval loss {best_loss:.4f}{at}")
    if losses:
        lines.append(" · ".join(losses))
    elif not train:
        lines.append("no step was logged")

    out = Path(end["output_dir"]) if end.get("output_dir") else (Path(output_dir) if output_dir else None)
    where = [("export", end.get("export")), ("checkpoints", end.get("checkpoints"))]
    if out is not None:
        where.append(("logs", out / "logs"))
        if (out / "loss.png").is_file():
            where.append(("loss curve", out / "loss.png"))
    if end.get("metrics"):
        where.append(("metrics", end["metrics"]))
    elif out is not None and (out / "metrics.jsonl").is_file():
        where.append(("metrics", out / "metrics.jsonl"))
    shown = [(label, place) for label, place in where if place]
    width = max((len(label) for label, _ in shown), default=0)
    lines += [f"{label:<{width}}  {place}" for label, place in shown]
    if end_event is not None and not end.get("export") and end.get("outcome") == "completed":
        lines.append(f"{'export':<{width}}  none (train.checkpoint.export is off)")
    return lines


def _progress_line(end: dict[str, Any], last: dict[str, Any]) -> str:
    steps = end.get("steps", last.get("step"))
    total = end.get("total_steps", last.get("total_steps"))
    outcome = end.get("outcome") or "ended early (no end of training reported)"
    parts = [f"{outcome}: step {steps if steps is not None else 0}" + (f"/{total}" if total else "")]
    tokens = end.get("tokens", last.get("tokens"))
    if tokens is not None:
        parts.append(f"{tokens:,} tokens")
    wall = end.get("wall_s")
    if wall is not None:
        parts.append(f"wall time {clock(wall)}")
    elif last.get("elapsed_s") is not None:
        parts.append(f"training time {clock(last['elapsed_s'])}")
    rate = end.get("tokens_per_s")
    if rate is None and last.get("tokens_per_s") is not None:
        rate = last["tokens_per_s"]
        parts.append(f"{rate:,.0f} tokens/s (last step)")
    elif rate is not None:
        parts.append(f"{rate:,.0f} tokens/s (mean)")
    return " · ".join(parts)
