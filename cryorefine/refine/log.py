"""The run log: `run.out` plus stdout, RELION's ` Auto-refine:` lines, and E-step progress with ETA.

Progress: on a terminal a bar (rich); otherwise plain text lines on stdout, as RELION writes its
progress bar into stdout, so that `tail -f run.out` on a cluster shows each E-step advancing.
When stdout is itself redirected to the log file (RELION's pipeliner runs `... >> run.out`), every line
is written once.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, TextIO

from cryorefine.errors import InputError

# a plain progress line at least every this fraction of the work and at most every this many seconds apart
PROGRESS_FRACTION = 0.1
PROGRESS_MIN_INTERVAL_S = 0.5


def _same_file(stream: TextIO, path: Path) -> bool:
    """True if `stream` writes into the file at `path` (e.g. `cryorefine refine ... > run.out`)."""
    try:
        return path.exists() and os.path.samestat(os.fstat(stream.fileno()), os.stat(path))
    except (OSError, ValueError, AttributeError):     # io.UnsupportedOperation is an OSError
        return False


def format_duration(seconds: float) -> str:
    """'42 s', '3.5 min' or '2.1 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def progress_text(label: str, done: int, total: int, elapsed: float) -> str:
    """One plain progress line: counts, percentage, elapsed time and ETA."""
    frac = done / total if total else 1.0
    eta = elapsed * (1 - frac) / frac if frac > 0 else float("nan")
    eta_s = format_duration(eta) if frac > 0 else "?"
    return f" {label}: {done}/{total} particles ({100 * frac:.0f}%), {format_duration(elapsed)} elapsed, ETA {eta_s}"


def lock_exclusively(fh, path: Path, what: str) -> None:
    """Hold an exclusive advisory lock on the open file `fh` until it is closed (the kernel drops it when the process
    dies, even by SIGKILL); InputError when another process holds it. Where the file system has no locks (some NFS
    mounts), nothing is locked."""
    try:
        import fcntl
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):
        raise InputError(f"{path}: another {what} is writing this run now (its log is locked); give another --o, "
                         f"or wait for it to end") from None
    except (ImportError, OSError):
        pass


class RunLog:
    """Writes each line to stdout and to <root>.out (appending, flushed per line). `lock`: hold an exclusive lock on
    the log for the life of the run, so that two runs never write one output root at once."""

    def __init__(self, path: str | Path | None, quiet: bool = False, stream: TextIO | None = None,
                 abort_file: str | Path | None = None, lock: bool = False):
        self.path = Path(path) if path else None
        self.abort_file = Path(abort_file) if abort_file else None
        self.quiet = quiet
        self.stream = stream or sys.stdout
        self._fh = None
        self._lock_fh = None
        self._stream_is_log = False
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if _same_file(self.stream, self.path):
                self.quiet = False          # stdout is the log file: write through it only
                self._stream_is_log = True
            else:
                self._fh = open(self.path, "a", encoding="utf-8")
            if lock:
                # a descriptor of its own: stdout may be the log (RELION's pipeliner redirects it there)
                self._lock_fh = open(self.path, "a", encoding="utf-8")
                try:
                    lock_exclusively(self._lock_fh, self.path, "cryorefine refine")
                except InputError:
                    self.close()
                    raise

    def line(self, text: str) -> None:
        """One line of the log (with --quiet, a line starting with WARNING still reaches stderr)."""
        if not self.quiet:
            print(text, file=self.stream, flush=True)
        elif self.path is not None and text.lstrip().startswith("WARNING"):
            print(text.strip(), file=sys.stderr, flush=True)
        if self._fh:
            self._fh.write(text + "\n")
            self._fh.flush()

    def file_line(self, text: str) -> None:
        """A line for the log file only (e.g. the error line the terminal already shows on stderr)."""
        if self._fh:
            self._fh.write(text + "\n")
            self._fh.flush()
        elif self._stream_is_log:
            print(text, file=self.stream, flush=True)

    def auto(self, text: str) -> None:
        """A RELION ` Auto-refine: ...` line (what `grep Auto-refine` shows)."""
        self.line(f" Auto-refine: {text}")

    def check_abort(self) -> None:
        """Raise JobAborted if the RELION pipeliner asked the job to stop (its RELION_JOB_ABORT_NOW file exists), and
        Terminated if a SIGTERM's exception was lost on the way."""
        from cryorefine.errors import JobAborted, check_termination
        check_termination()
        if self.abort_file is not None and self.abort_file.exists():
            raise JobAborted(f"{self.abort_file} found")

    def _is_terminal(self) -> bool:
        """True if stdout is an interactive terminal."""
        try:
            return bool(self.stream.isatty())
        except (AttributeError, ValueError):
            return False

    @contextlib.contextmanager
    def progress(self, label: str, total: int) -> Iterator[Callable[[int], None]]:
        """Progress with ETA: a bar on a terminal, else plain lines on stdout; lines always go to the log file."""
        self.check_abort()
        tty = not self.quiet and self._is_terminal()
        to_stream = not self.quiet and not tty
        if not tty and not to_stream and not self._fh:
            yield lambda n: self.check_abort()
            return
        t0 = time.time()
        state = {"done": 0, "shown": -1, "t_shown": 0.0}

        def emit(force: bool = False) -> None:
            done = state["done"]
            step = max(1, int(total * PROGRESS_FRACTION))
            now = time.time()
            if not force and (done - state["shown"] < step or now - state["t_shown"] < PROGRESS_MIN_INTERVAL_S):
                return
            state["shown"], state["t_shown"] = done, now
            text = progress_text(label, done, total, now - t0)
            if to_stream:
                self.line(text)
            else:
                self.file_line(text)

        emit(force=True)
        if tty:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                          TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                          transient=True) as bar:
                task = bar.add_task(label, total=total)

                def advance(n: int) -> None:
                    bar.advance(task, n)
                    state["done"] += n
                    emit()
                    self.check_abort()
                yield advance
        else:
            def advance(n: int) -> None:
                state["done"] += n
                emit()
                self.check_abort()
            yield advance
        if state["shown"] != state["done"]:
            emit(force=True)

    def close(self) -> None:
        """Close the log file (and release its lock)."""
        for name in ("_fh", "_lock_fh"):
            fh = getattr(self, name)
            if fh:
                fh.close()
                setattr(self, name, None)


def timestamp() -> str:
    """Local time for log headers."""
    return time.strftime("%Y-%m-%d %H:%M:%S")
