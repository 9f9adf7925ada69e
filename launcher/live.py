"""What a terminal shows of a run: the nodes' lines scrolling above one progress line for the whole
job (rich), or, when output is not a terminal, the lines alone — no control characters, nothing
redrawn, so a log file or a pipe reads as plain text.

The supervisor and `mlaunch attach` write every line through `View.line` and feed rank 0's events
to `view.progress`; the progress line is redrawn from it a few times a second.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

from launcher.progress import Progress

#: Serialises every write to the terminal: node lines come from reader threads, the launcher's own
#: lines (launcher/console.py) from the main thread.
LOCK = threading.RLock()


def interactive() -> bool:
    """A terminal a progress line can be drawn on (`MLAUNCH_PLAIN=1` asks for plain lines anyway)."""
    return sys.stdout.isatty() and os.environ.get("MLAUNCH_PLAIN") != "1" and os.environ.get("TERM") != "dumb"


class View:
    def __init__(self, progress: Progress | None = None, *, live: bool | None = None) -> None:
        self.progress = progress or Progress()
        self.live_mode = interactive() if live is None else live
        self._live: Any = None
        self.shown = False  # a train event has arrived: there is a line worth drawing

    def __enter__(self) -> "View":
        if self.live_mode:
            from rich.console import Console
            from rich.live import Live

            # Both streams are redirected: rich prints what is written to them above the line.
            self._live = Live(console=Console(), get_renderable=self._render, refresh_per_second=4,
                              transient=True, redirect_stdout=True, redirect_stderr=True)
            self._live.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        with LOCK:
            if self._live is not None:
                self._live.stop()
                self._live = None

    def line(self, text: str) -> None:
        """One node line (already prefixed; the prefix may carry ANSI colour)."""
        with LOCK:
            if self._live is not None:
                from rich.text import Text

                self._live.console.print(Text.from_ansi(text), soft_wrap=True, highlight=False)
            else:
                sys.stdout.write(text + "\n")
                sys.stdout.flush()

    def event(self, event: dict[str, Any]) -> None:
        with LOCK:
            self.progress.update(event)
            self.shown = self.shown or event.get("event") in ("start", "train")

    def _render(self) -> Any:
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        if not self.shown:
            return Text("")
        p = self.progress
        grid = Table.grid(padding=(0, 1))
        grid.add_column(no_wrap=True)
        grid.add_column(no_wrap=True, overflow="ellipsis")
        bar = ProgressBar(total=float(p.total_steps or 1), completed=float(p.step), width=24)
        grid.add_row(bar, Text(p.line(), style="bold"))
        return grid
