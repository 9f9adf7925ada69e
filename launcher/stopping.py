"""Ctrl-C and SIGTERM as a request to stop, which a runner's loop answers in its own order
(torchrun first, then everything carrying the run id) instead of dying mid-teardown."""

from __future__ import annotations

import signal
import threading
from typing import Any

#: What a shell reports for a job ended by SIGINT / SIGTERM (128 + the signal).
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class Stop:
    """Turns SIGINT/SIGTERM into a recorded request to stop, answered by the run loop.

    `with Stop() as stop:` installs the handlers and restores the previous ones on exit;
    `stop.event` is set by the first signal, `stop.signum` keeps which one it was."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.event = threading.Event()
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "Stop":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
        self.event.set()

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    @property
    def exit_code(self) -> int:
        return EXIT_SIGINT if self.signum == signal.SIGINT else EXIT_SIGTERM
