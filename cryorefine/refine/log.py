"""The run log: `run.out` plus stdout, RELION's ` Auto-refine:` lines, and a progress bar with ETA on stderr."""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, TextIO


class RunLog:
    """Writes each line to stdout and to <root>.out (appending, flushed per line)."""

    def __init__(self, path: str | Path | None, quiet: bool = False, stream: TextIO | None = None):
        self.path = Path(path) if path else None
        self.quiet = quiet
        self.stream = stream or sys.stdout
        self._fh = None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8")

    def line(self, text: str) -> None:
        """One line of the log."""
        if not self.quiet:
            print(text, file=self.stream, flush=True)
        if self._fh:
            self._fh.write(text + "\n")
            self._fh.flush()

    def auto(self, text: str) -> None:
        """A RELION ` Auto-refine: ...` line (what `grep Auto-refine` shows)."""
        self.line(f" Auto-refine: {text}")

    @contextlib.contextmanager
    def progress(self, label: str, total: int) -> Iterator[Callable[[int], None]]:
        """Progress bar with ETA on stderr (only when stderr is a terminal or CRYOREFINE_PROGRESS is set)."""
        import os
        show = not self.quiet and (sys.stderr.isatty() or os.environ.get("CRYOREFINE_PROGRESS"))
        if not show:
            yield lambda n: None
            return
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                      transient=True) as bar:
            task = bar.add_task(label, total=total)
            yield lambda n: bar.advance(task, n)

    def close(self) -> None:
        """Close the log file."""
        if self._fh:
            self._fh.close()
            self._fh = None


def timestamp() -> str:
    """Local time for log headers."""
    return time.strftime("%Y-%m-%d %H:%M:%S")
