"""The job's progress as the launcher knows it: rank 0's events (`MLAUNCH_EVENT=` lines, job/events.py)
folded into one state, the ETA, and the one line that shows it — in the live view, in
`mlaunch status`, in the registry.

The ETA counts only this attempt's steps since its first logged step: set-up, a resume, a restart
do not make it optimistic; it says nothing until two steps are seen.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


def clock(seconds: float | None) -> str:
    """`1:02:03`, `4:05`; `-` for unknown."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "-"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _num(value: Any, fmt: str) -> str | None:
    return None if value is None else format(value, fmt)


@dataclass
class Progress:
    step: int = 0
    total_steps: int | None = None
    epoch: float | None = None
    epochs: int | None = None
    loss: float | None = None
    eval_loss: float | None = None
    best_eval_loss: float | None = None
    lr: float | None = None
    tokens_per_s: float | None = None
    mfu: float | None = None
    tokens: int | None = None
    started_at: float = field(default_factory=time.time)  # wall clock: what `elapsed` counts from
    end: dict[str, Any] | None = None  # the `end` event, once rank 0 has finished
    #: (first step seen, when) and (latest step, when) for the rate behind the ETA.
    _first: tuple[int, float] | None = None
    _last: tuple[int, float] | None = None

    def update(self, event: dict[str, Any], now: float | None = None) -> None:
        now = time.time() if now is None else now
        kind = event.get("event")
        if kind == "start":
            self.total_steps = event.get("total_steps", self.total_steps)
            self.epochs = event.get("epochs", self.epochs)
            self.step = event.get("start_step", self.step) or self.step
            self._first = None
        elif kind == "train":
            self.step = int(event.get("step", self.step))
            self.total_steps = event.get("total_steps", self.total_steps)
            for key in ("epoch", "loss", "lr", "tokens_per_s", "mfu", "tokens"):
                if key in event:
                    setattr(self, key, event[key])
            if self._first is None:
                self._first = (self.step, now)
            self._last = (self.step, now)
        elif kind == "eval":
            self.eval_loss = event.get("eval_loss")
            if self.eval_loss is not None and (self.best_eval_loss is None or self.eval_loss < self.best_eval_loss):
                self.best_eval_loss = self.eval_loss
        elif kind == "end":
            self.end = event
            self.step = event.get("steps", self.step) or self.step

    def eta_s(self, now: float | None = None) -> float | None:
        if self.end is not None:
            return 0.0
        if not self.total_steps or self._first is None or self._last is None:
            return None
        (s0, t0), (s1, t1) = self._first, self._last
        if s1 <= s0:
            return None
        per_step = (t1 - t0) / (s1 - s0)
        now = time.time() if now is None else now
        # Time already spent on the current step counts against what is left.
        return max(0.0, (self.total_steps - s1) * per_step - (now - t1))

    def elapsed_s(self, now: float | None = None) -> float:
        return (time.time() if now is None else now) - self.started_at

    def fields(self, now: float | None = None) -> list[str]:
        """The line's parts: step/total, epoch, loss, eval, tokens/s, MFU, elapsed, ETA."""
        total = self.total_steps
        parts = [f"step {self.step}/{total}" + (f" ({100 * self.step / total:.0f}%)" if total else "")
                 if total else f"step {self.step}"]
        if self.epoch is not None:
            parts.append(f"epoch {self.epoch:.2f}" + (f"/{self.epochs}" if self.epochs else ""))
        for label, value, fmt in (("loss", self.loss, ".4f"), ("eval", self.eval_loss, ".4f"),
                                  ("tok/s", self.tokens_per_s, ",.0f")):
            text = _num(value, fmt)
            if text is not None:
                parts.append(f"{label} {text}")
        if self.mfu is not None:
            parts.append(f"MFU {100 * self.mfu:.1f}%")
        parts.append(f"elapsed {clock(self.elapsed_s(now))}")
        parts.append(f"ETA {clock(self.eta_s(now))}")
        return parts

    def line(self, now: float | None = None) -> str:
        return " · ".join(self.fields(now))

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        """What the registry keeps (and `mlaunch status` shows without reading any log)."""
        now = time.time() if now is None else now
        eta = self.eta_s(now)
        return {"step": self.step, "total_steps": self.total_steps, "epoch": self.epoch, "loss": self.loss,
                "eval_loss": self.eval_loss, "best_eval_loss": self.best_eval_loss, "tokens_per_s": self.tokens_per_s,
                "mfu": self.mfu, "eta_at": None if eta is None else now + eta, "updated": now}
