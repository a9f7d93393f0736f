"""Draw a refinement: `<root>_report.html` (one self-contained page, no network, no JavaScript) and its figures
as `<root>_report_*.png` beside it, from the files of a finished or running `cryorefine refine`.

Examples:
  cryorefine report Refine3D/run
  cryorefine report Refine3D/run --postprocess PostProcess/postprocess.star

The page is also written by `refine` after every iteration (so it can be opened while the run goes on) and at
the end, and by `postprocess` when its half maps come from a refine run.
"""

from __future__ import annotations

import argparse

from cryorefine.errors import InputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """RUN_ROOT and an optional postprocess STAR."""
    parser.add_argument("root", metavar="RUN_ROOT", help="output root of the refinement, e.g. Refine3D/run")
    parser.add_argument("--postprocess", default=None,
                        help="postprocess STAR file to include (default: the one a previous report recorded)")


def run(args: argparse.Namespace) -> int:
    """Write the report and print its path."""
    from pathlib import Path

    from cryorefine.report import write_report
    if args.postprocess and not Path(args.postprocess).exists():
        raise InputError(f"--postprocess {args.postprocess}: no such file")
    path = write_report(args.root, args.postprocess)
    print(f"cryorefine report: written {path}")
    return 0
