"""A refinement people can look at: `<root>_report.html` (FSC, per-iteration statistics, angular distribution,
maps, histograms) with its figures as PNGs, and RELION's `_angdist.bild`. matplotlib is imported only when a
report is drawn, never by `import cryorefine.report`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def write_report(root: str, postprocess: str | None = None) -> Path:
    """Write `<root>_report.html` (+ PNGs, JSON) from the run's files; returns the page's path."""
    from cryorefine.report.build import write_report as _write
    return _write(root, postprocess)


def refresh_report(root: str, log: Callable[[str], None] | None = None, postprocess: str | None = None) -> None:
    """write_report that never raises: a failure becomes one warning line (a report must not kill a run)."""
    try:
        write_report(root, postprocess)
    except Exception as exc:  # noqa: BLE001
        msg = f" WARNING: could not write the report {root}_report.html: {type(exc).__name__}: {exc}"
        (log or print)(msg)


class ThrottledReport:
    """refresh_report during a run, drawn only when the time since the last drawing is at least `ratio` times what
    that drawing took, so the page costs at most ~1/ratio of the run's time (drawing takes seconds; a small
    refinement's iterations take seconds too). The final page is drawn unconditionally by `refresh_report`."""

    def __init__(self, ratio: float = 10.0):
        import time
        self._clock = time.monotonic
        self.ratio = ratio
        self.last_end: float | None = None
        self.last_cost = 0.0

    def maybe_refresh(self, root: str, log: Callable[[str], None] | None = None) -> bool:
        """Redraw the page if it is due; returns whether it was drawn."""
        now = self._clock()
        if self.last_end is not None and now - self.last_end < self.ratio * self.last_cost:
            return False
        refresh_report(root, log)
        self.last_end = self._clock()
        self.last_cost = self.last_end - now
        return True


def refresh_postprocess_report(half1_map: str, postprocess_star: str) -> None:
    """After `postprocess`: redraw the report of the refine run whose half map was --i, now with the
    postprocess curves; never raises."""
    try:
        from cryorefine.report.readers import run_root_of_half_map
        root = run_root_of_half_map(half1_map)
    except Exception:  # noqa: BLE001
        root = None
    if root is None:
        print(f"  + no refine run found for {half1_map}: no report (give `cryorefine report RUN_ROOT "
              f"--postprocess {postprocess_star}`)")
        return
    refresh_report(root, postprocess=postprocess_star)
    print(f"  + report: {root}_report.html")
