"""The loss curve of a run: `<output_dir>/loss.png` — train and eval loss against the step, the
learning rate on a second axis — from its `metrics.jsonl`, or from rank 0's events in its node
logs (all that the launching machine of an SSH run has).

    records = load_records(Path("runs/tiny"))
    plot_loss(records, Path("runs/tiny/loss.png"), title="tiny")

Torch-free; matplotlib is imported when a plot is drawn, so `mlaunch --help` stays fast.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from job.events import read_events
from job.files import publish_file

METRICS_FILE = "metrics.jsonl"  # train/metrics.py writes it (that module imports torch)


def load_records(source: Path) -> list[dict[str, Any]]:
    """The metrics records of the run in folder `source`, in step order: train records (step,
    loss, lr, …) and eval records (step, eval_loss), the shape of metrics.jsonl's lines.

    `<source>/metrics.jsonl` when it holds any; else the `train`/`eval` events in
    `<source>/logs/*.log`. A resumed run logged the steps after its checkpoint again: a later
    record of a step replaces the earlier one, and an attempt's `start` event drops what an
    earlier attempt logged after its start step. Lines cut short by a crash are skipped."""
    source = Path(source)
    records = _from_metrics(source / METRICS_FILE)
    if not records:
        records = _from_events(sorted((source / "logs").glob("*.log"), key=_mtime))
    return _latest_per_step(records)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _from_metrics(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # cut by a crash
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            out.append(record)
    return out


def _from_events(logs: list[Path]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for log in logs:
        for event in read_events(log):
            kind = event.get("event")
            if kind == "start":
                # A new attempt (a resume) redoes every step after its start.
                start = event.get("start_step") or 0
                out = [r for r in out if r["step"] <= start]
            elif kind in ("train", "eval") and isinstance(event.get("step"), int):
                out.append({k: v for k, v in event.items() if k != "event"})
    return out


def _latest_per_step(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    latest: dict[tuple[int, bool], dict[str, Any]] = {}
    for r in records:
        latest[(r["step"], "eval_loss" in r)] = r  # later wins; a train and an eval record per step
    return [latest[k] for k in sorted(latest)]


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """Steps and values of `key`; a null (a non-finite value) becomes NaN, a gap in the line."""
    points = [(r["step"], r[key]) for r in records if key in r]
    return [s for s, _ in points], [float("nan") if v is None else float(v) for _, v in points]


def plot_loss(records: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Draw train and eval loss against the step, the learning rate on a second y axis, into the
    PNG `path` (written atomically: a viewer never sees half of it); returns `path`."""
    # The object API with the Agg canvas: headless, and no global pyplot state in the launcher.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import ScalarFormatter

    fig = Figure(figsize=(8, 4.5), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    handles = []
    steps, loss = _series(records, "loss")
    if steps:
        handles += ax.plot(steps, loss, color="tab:blue", linewidth=1.5, label="train loss")
    steps, eval_loss = _series(records, "eval_loss")
    if steps:
        handles += ax.plot(steps, eval_loss, color="tab:orange", linewidth=1.5, marker="o", markersize=4,
                           label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    steps, lr = _series(records, "lr")
    if steps:
        lr_ax = ax.twinx()
        handles += lr_ax.plot(steps, lr, color="tab:gray", linestyle="--", linewidth=1, label="learning rate")
        lr_ax.set_ylabel("learning rate")
        fmt = ScalarFormatter(useMathText=True)
        fmt.set_powerlimits((-2, 3))
        lr_ax.yaxis.set_major_formatter(fmt)
        lr_ax.set_ylim(bottom=0)
    if handles:
        # Below the axes: inside, it would hide a curve of one of the two axes.
        fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)
    else:
        ax.text(0.5, 0.5, "no logged step yet", transform=ax.transAxes, ha="center", va="center", color="gray")
    if title:
        ax.set_title(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return publish_file(path, buf.getvalue())
