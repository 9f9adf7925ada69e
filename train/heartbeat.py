"""Every rank says, every few seconds, where it is: `MLAUNCH_BEAT=<rank> <step> <phase> <time>`
(job/markers.py). The launcher's supervisor reads these from every node: a step that completes
nowhere for `launch.hang_timeout_s` is a hang, and the ranks that stopped beating first — a
frozen process, a rank stuck in I/O — are the ones it names.

The beat comes from a daemon thread, so a rank whose main thread waits inside a collective
(which releases the GIL) keeps beating with an unchanging step: that is the hung-collective
picture. A rank that beats no more is stopped or dead.

`faulthandler` is registered on SIGUSR1: asked by the launcher, a rank writes the Python stack of
every thread to `<output_dir>/logs/stacks/rank-<R>.txt` from the signal handler itself, which
works even while the main thread is blocked in C++ (no Python code needs to run).
"""

from __future__ import annotations

import faulthandler
import signal
import sys
import threading
import time
from pathlib import Path
from typing import IO

from job.markers import BEAT

#: Phases a rank reports; the supervisor's progress clock pauses in the long, legitimate ones.
SETUP, DATA, STEP, OPTIMIZER, EVAL, CHECKPOINT, EXPORT, DONE = (
    "setup", "data", "forward_backward", "optimizer", "eval", "checkpoint", "export", "done")


class Heartbeat:
    def __init__(self, rank: int, interval_s: float, stream: IO[str] | None = None) -> None:
        self.rank, self.interval_s = rank, interval_s
        self.stream = stream or sys.stdout
        self.step, self.phase = 0, SETUP
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stacks: IO[str] | None = None

    def start(self) -> "Heartbeat":
        self._thread = threading.Thread(target=self._run, daemon=True, name="mlaunch-heartbeat")
        self._thread.start()
        return self

    def at(self, phase: str, step: int | None = None) -> None:
        """Where this rank is now (two attribute writes: cheap enough for every phase change)."""
        if step is not None:
            self.step = step
        self.phase = phase

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.beat()

    def beat(self) -> None:
        try:
            self.stream.write(f"{BEAT}{self.rank} {self.step} {self.phase} {time.time():.3f}\n")
            self.stream.flush()
        except (OSError, ValueError):  # the stream is gone (shutdown): nothing to tell
            self._stop.set()

    def stop(self) -> None:
        self.at(DONE)
        self._stop.set()

    def dump_stacks_on(self, log_dir: Path, signum: int = signal.SIGUSR1) -> None:
        """On `signum`, every thread's stack into `<log_dir>/stacks/rank-<R>.txt` (appended)."""
        folder = log_dir / "stacks"
        folder.mkdir(parents=True, exist_ok=True)
        self._stacks = open(folder / f"rank-{self.rank:05d}.txt", "a", encoding="utf-8")
        faulthandler.register(signum, file=self._stacks, all_threads=True, chain=False)
