"""A refinement people can look at: `<root>_report.html` (FSC, per-iteration statistics, angular distribution,
maps, histograms) with its figures as PNGs, and RELION's `_angdist.bild`. matplotlib is imported only when a
report is drawn, never by `import cryorefine.report`."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_report(root: str, postprocess: str | None = None, out_root: str | None = None) -> Path:
    """Write `<root>_report.html` (+ PNGs, JSON; under `out_root` when given) from the run's files; returns the
    page's path."""
    from cryorefine.report.build import write_report as _write
    return _write(root, postprocess, out_root)


def refresh_report(root: str, log: Callable[[str], None] | None = None, postprocess: str | None = None,
                   out_root: str | None = None) -> bool:
    """write_report that never raises: a failure becomes one warning line (a report must not kill a run); returns
    whether the page was written."""
    try:
        write_report(root, postprocess, out_root)
        return True
    except Exception as exc:  # noqa: BLE001
        msg = f" WARNING: could not write the report {out_root or root}_report.html: {type(exc).__name__}: {exc}"
        (log or print)(msg)
        return False


# The child that redraws the page during a run: one thread, and on SIGTERM a SystemExit, so that an interrupted drawing
# removes its temporary files (io.atomic) instead of leaving them beside the run.
# Ctrl-C reaches the whole process group: the child leaves it to the refinement, which stops it with SIGTERM.
_CHILD_CODE = "import sys; from cryorefine.report import redraw_child; redraw_child(sys.argv[1])"


def redraw_child(root: str) -> None:
    """The background child's body: lowest priority, signals as above, then refresh_report(root)."""
    import signal
    os.nice(19)
    # only on a core nobody else wants: at nice 19 alone the child still took cores from the refinement's parallel
    # kernels (small set: 62.5 s instead of 53.1 s, mean of 4 interleaved pairs; docs/benchmarks.md)
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):     # not Linux, or not allowed: nice 19 only
        pass
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(1))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    refresh_report(root)


_ONE_THREAD = {k: "1" for k in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}


def _launch_child(root: str, out) -> subprocess.Popen:
    """Start the page's drawing in a child process (see _CHILD_CODE); its warnings go to `out`."""
    return subprocess.Popen([sys.executable, "-c", _CHILD_CODE, root], stdin=subprocess.DEVNULL, stdout=out,
                            stderr=subprocess.STDOUT, env={**os.environ, **_ONE_THREAD})


class BackgroundReport:
    """refresh_report during a run, drawn in a child process at the lowest CPU priority: drawing takes seconds
    (6 s at box 128), as long as a small refinement's iterations, and in the refining process it stopped the run
    that long every iteration; the child runs only on cycles the refinement leaves idle (redraw_child). A drawing
    still running when the next is due is left to finish and that redraw is skipped. The final page is drawn in the
    process by `refresh_report`, after `close` (which stops a redraw still running: the final page supersedes it)."""

    def __init__(self, launch: Callable[[str, object], subprocess.Popen] = _launch_child):
        self._launch = launch
        self._child: subprocess.Popen | None = None
        self._out = None
        self._root = ""

    def maybe_refresh(self, root: str, log: Callable[[str], None] | None = None) -> bool:
        """Start a redraw unless one is still running; returns whether one was started."""
        if self._child is not None:
            if self._child.poll() is None:
                return False
            self._collect(log)
        self._root = root
        self._out = tempfile.TemporaryFile()
        try:
            self._child = self._launch(root, self._out)
        except OSError as exc:         # no process could be started: draw here, as before
            self._out.close()
            self._out = None
            (log or print)(f" WARNING: could not start the report's drawing in the background ({exc}); drawing it "
                           f"in the refinement's process")
            refresh_report(root, log)
        return True

    def close(self, log: Callable[[str], None] | None = None, timeout: float = 60.0,
              superseded: bool = False) -> None:
        """Wait for a running redraw (stop it after `timeout` s) and log its warnings; `superseded`: the final page
        is drawn next, so a redraw still running is stopped at once, and silently."""
        if self._child is None:
            return
        if superseded and self._child.poll() is None:
            self._child.terminate()
            self._child.wait()
            self._out.close()
            self._child, self._out = None, None
            return
        try:
            self._child.wait(timeout)
        except subprocess.TimeoutExpired:
            self._child.terminate()
            self._child.wait()
        self._collect(log)

    def _collect(self, log: Callable[[str], None] | None) -> None:
        """Log what the finished child printed (refresh_report's warning line), or how it died."""
        child, out = self._child, self._out
        self._child, self._out = None, None
        if out is None:
            return
        out.seek(0)
        lines = [ln for ln in out.read().decode("utf-8", "replace").splitlines() if ln.strip()]
        out.close()
        if child.returncode == 0:
            for ln in lines:
                (log or print)(ln)
        else:
            why = lines[-1].strip() if lines else f"exit status {child.returncode}"
            (log or print)(f" WARNING: could not write the report {self._root}_report.html: {why}")


def refresh_postprocess_report(half1_map: str, postprocess_star: str, out_root: str) -> None:
    """After `postprocess`: the report of the refine run whose half map was --i, with the postprocess curves, as
    `<out_root>_report.html` in postprocess's own folder (the refine job's files stay as they are, as RELION's
    pipeliner expects); never raises."""
    try:
        from cryorefine.report.readers import run_root_of_half_map
        root = run_root_of_half_map(half1_map)
    except Exception:  # noqa: BLE001
        root = None
    if root is None:
        print(f"  + no refine run found for {half1_map}: no report (give `cryorefine report RUN_ROOT "
              f"--postprocess {postprocess_star}`)")
        return
    if refresh_report(root, postprocess=postprocess_star, out_root=out_root):
        print(f"  + report: {out_root}_report.html (of the refine run {root})")
