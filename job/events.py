"""Rank 0's machine-readable events (`MLAUNCH_EVENT=<json>` lines, job/markers.py), read back:
from a line as it streams, or from a node's log file afterwards. Torch-free."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from job.markers import EVENT


def parse_event(line: str) -> dict[str, Any] | None:
    """The event a line carries, or None (not an event, or cut short by a crash)."""
    if not line.startswith(EVENT):
        return None
    try:
        event = json.loads(line[len(EVENT):])
    except ValueError:
        return None
    return event if isinstance(event, dict) and "event" in event else None


def read_events(log_path: Path) -> list[dict[str, Any]]:
    """Every event in a node's log (which also holds ordinary lines), in order; [] for a missing
    file. A last line cut short (the run still writing, or killed) is skipped. Read line by
    line: an hours-long run's log is large, its events a small part of it."""
    events = []
    try:
        with open(log_path, encoding="utf-8", errors="replace", newline="") as f:
            for line in f:
                event = parse_event(line.rstrip("\r\n"))
                if event is not None:
                    events.append(event)
    except OSError:
        return events
    return events
