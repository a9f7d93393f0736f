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
