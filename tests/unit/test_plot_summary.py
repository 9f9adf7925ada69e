"""The end of a run on the launcher's side: the loss curve (launcher/plot.py) from metrics.jsonl or
from rank 0's events in the node logs, and the summary block (launcher/summary.py)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from job.markers import EVENT
from launcher.plot import load_records, plot_loss
from launcher.summary import summary_lines


def train_record(step: int, loss: float | None = None) -> dict:
    return {"step": step, "epoch": step / 40, "loss": 6.0 - 0.1 * step if loss is None else loss,
            "lr": 1e-3 * min(1.0, step / 5), "tokens_per_s": 1000.0, "elapsed_s": step * 0.5, "tokens": 800 * step}


def records_of(steps: int, eval_every: int) -> list[dict]:
    out = []
    for s in range(1, steps + 1):
        out.append(train_record(s))
        if s % eval_every == 0:
            out.append({"step": s, "eval_loss": 6.2 - 0.08 * s})
    return out


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and data[-8:-4] == b"IEND"
    return struct.unpack(">II", data[16:24])


def test_plot_loss_writes_a_png_with_the_curves(tmp_path):
    records = records_of(40, 10)
    records[5]["loss"] = None  # a non-finite loss, logged as null: a gap, not a failure
    path = plot_loss(records, tmp_path / "out" / "loss.png", title="tiny")
    assert path == tmp_path / "out" / "loss.png"
    width, height = png_size(path)
    assert (width, height) == (960, 540)  # 8 x 4.5 in at 120 dpi
    assert path.stat().st_size > 20_000  # three curves, labels and a legend, not an empty canvas
    assert [p.name for p in path.parent.iterdir()] == ["loss.png"]  # no temporary left beside it
    empty = plot_loss([], tmp_path / "empty.png")
    assert png_size(empty) == (960, 540) and empty.stat().st_size < path.stat().st_size


def test_load_records_prefers_metrics_jsonl_and_keeps_the_latest_of_a_step(tmp_path):
    lines = [json.dumps(r) for r in records_of(4, 2)] + [json.dumps(train_record(4, loss=1.5)), '{"step": 5, "lo']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "n0.log").write_text(EVENT + json.dumps({"event": "train", **train_record(9)}) + "\n")
    records = load_records(tmp_path)
    assert [(r["step"], "eval_loss" in r) for r in records] == [(1, False), (2, False), (2, True), (3, False),
                                                                (4, False), (4, True)]
    assert records[4]["loss"] == 1.5  # the later record of step 4


def test_load_records_from_the_events_of_a_resumed_run(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()

    def event(kind: str, **fields) -> str:
        return EVENT + json.dumps({"event": kind, **fields}) + "\n"

    first = [event("start", total_steps=6, start_step=0)] + [event("train", total_steps=6, **train_record(s))
                                                             for s in (1, 2, 3, 4)]
    first.insert(3, "step 2/6 loss 5.8\n")  # an ordinary line between events
    first.append(event("eval", step=4, eval_loss=5.0))
    # Resumed from the checkpoint at step 2: steps 3 and 4 again (other losses), then on.
    second = [event("start", total_steps=6, start_step=2)] + [event("train", total_steps=6, **train_record(s, loss=2.0))
                                                              for s in (3, 4, 5, 6)]
    second.append(event("eval", step=6, eval_loss=1.8))
    (logs / "n0.log").write_text("".join(first + second) + EVENT + '{"event": "train", "st')  # cut last line
    (logs / "n1.log").write_text("a node without rank 0\n")
    records = load_records(tmp_path)
    assert [(r["step"], r.get("loss", r.get("eval_loss"))) for r in records] == [
        (1, 5.9), (2, 5.8), (3, 2.0), (4, 2.0), (5, 2.0), (6, 2.0), (6, 1.8)]
    assert "event" not in records[0] and records[0]["total_steps"] == 6
    assert load_records(tmp_path / "nothing-here") == []


END = {"event": "end", "outcome": "completed", "steps": 40, "total_steps": 40, "loss": 2.1234, "eval_loss": 3.0,
       "best_eval_loss": 3.0, "tokens": 32000, "wall_s": 125.0, "tokens_per_s": 1234.5}


def test_summary_with_eval(tmp_path):
    (tmp_path / "loss.png").write_bytes(b"x")
    end = {**END, "output_dir": str(tmp_path), "export": str(tmp_path / "export"),
           "checkpoints": str(tmp_path / "checkpoints"), "metrics": str(tmp_path / "metrics.jsonl")}
    lines = summary_lines(end, records_of(40, 10))
    text = "\n".join(lines)
    assert lines[0] == "completed: step 40/40 · 32,000 tokens · wall time 2:05 · 1,234 tokens/s (mean)"
    assert lines[1] == "final train loss 2.1234 · final eval loss 3.0000 · best eval loss 3.0000 (step 40)"
    for label, place in [("export", "export"), ("checkpoints", "checkpoints"), ("logs", "logs"),
                         ("loss curve", "loss.png"), ("metrics", "metrics.jsonl")]:
        assert any(line.startswith(label) and line.endswith(str(tmp_path / place)) for line in lines), text


def test_summary_without_eval_and_without_an_end_event(tmp_path):
    no_eval = {**END, "eval_loss": None, "best_eval_loss": None, "export": None, "checkpoints": None,
               "output_dir": str(tmp_path)}
    lines = summary_lines(no_eval, [train_record(s) for s in range(1, 41)])
    assert lines[1] == "final train loss 2.1234"
    assert not any(line.startswith(("checkpoints", "loss curve")) for line in lines)
    assert any(line.startswith("export") and "export is off" in line for line in lines)

    # Killed at step 12 before any end: what the records tell.
    crashed = summary_lines(None, [dict(train_record(s), total_steps=40) for s in range(1, 13)] +
                            [{"step": 10, "eval_loss": 5.5}], output_dir=tmp_path)
    assert crashed[0].startswith("ended early") and "step 12/40" in crashed[0] and "9,600 tokens" in crashed[0]
    assert crashed[1] == "final train loss 4.8000 · final eval loss 5.5000 · best eval loss 5.5000 (step 10)"
    assert any(line.startswith("logs") and line.endswith(str(tmp_path / "logs")) for line in crashed)

    # Failed before its first step: no records, no event, nothing known but where the logs are.
    early = summary_lines(None, [], output_dir=tmp_path)
    assert early[0].startswith("ended early") and "step 0" in early[0] and early[1] == "no step was logged"
    assert summary_lines(None, []) == [early[0], "no step was logged"]
