"""`cryorefine` command line: one sub-command per job, RELION's option spellings accepted.

Every sub-command takes RELION's `--pipeline_control DIR`: the job then writes RELION's marker file
`DIR/RELION_JOB_EXIT_SUCCESS` or `DIR/RELION_JOB_EXIT_FAILURE` at its end, as RELION's pipeliner expects.
Options are never abbreviated (`--extract` is not `--extract_size`).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from cryorefine import __version__
from cryorefine.errors import InputError, JobAborted

# name -> (module, one-line help); each module defines `add_arguments(parser)` and `run(args) -> int`.
# Only the chosen sub-command's module is imported, so start-up stays fast.
COMMANDS: dict[str, tuple[str, str]] = {
    "refine": ("cryorefine.refine.command", "3D auto-refine with gold-standard half-sets (relion_refine --auto_refine)"),
    "reconstruct": ("cryorefine.fourier.reconstruct_command", "reconstruct a map from particles with known poses "
                    "(relion_reconstruct)"),
    "extract": ("cryorefine.extract.command", "(re-)extract particles from micrographs (relion_preprocess --extract)"),
    "image-handler": ("cryorefine.tools.image_handler", "rescale / re-box / filter maps and stacks "
                      "(relion_image_handler)"),
    "postprocess": ("cryorefine.tools.postprocess", "masked, phase-randomisation-corrected FSC and B-factor sharpening (relion_postprocess)"),
    "report": ("cryorefine.report.command", "HTML report with figures of a refinement (FSC, angular distribution, maps)"),
}

EXIT_SUCCESS = "RELION_JOB_EXIT_SUCCESS"
EXIT_FAILURE = "RELION_JOB_EXIT_FAILURE"
EXIT_ABORTED = "RELION_JOB_EXIT_ABORTED"
ABORT_NOW = "RELION_JOB_ABORT_NOW"


def add_pipeline_control(p: argparse.ArgumentParser) -> None:
    """RELION's `--pipeline_control DIR` (every relion_ program the GUI runs gets it)."""
    p.add_argument("--pipeline_control", "--pipeline-control", dest="pipeline_control", default=None,
                   metavar="DIR", help="RELION pipeliner: write RELION_JOB_EXIT_SUCCESS / RELION_JOB_EXIT_FAILURE "
                                       "in DIR at the end of the job")


def build_parser(chosen: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; the options of `chosen` (or of every sub-command if None) are registered."""
    parser = argparse.ArgumentParser(prog="cryorefine", description=__doc__, allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"cryorefine {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (modname, help_) in COMMANDS.items():
        if chosen is not None and name != chosen:
            sub.add_parser(name, help=help_, allow_abbrev=False)
            continue
        mod = importlib.import_module(modname)
        p = sub.add_parser(name, help=help_, description=(mod.__doc__ or None), allow_abbrev=False,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        if "pipeline_control" not in {a.dest for a in p._actions}:
            add_pipeline_control(p)
        p.set_defaults(_run=mod.run)
    return parser


def write_exit_marker(folder: str | None, success: bool, aborted: bool = False) -> None:
    """RELION's job-exit marker file in the --pipeline_control folder (nothing without one)."""
    if not folder:
        return
    try:
        d = Path(folder)
        d.mkdir(parents=True, exist_ok=True)
        for name in (EXIT_SUCCESS, EXIT_FAILURE, EXIT_ABORTED):
            (d / name).unlink(missing_ok=True)
        (d / (EXIT_ABORTED if aborted else EXIT_SUCCESS if success else EXIT_FAILURE)).touch()
        if aborted:
            (d / ABORT_NOW).unlink(missing_ok=True)
    except OSError as exc:
        print(f"cryorefine: warning: cannot write the job-exit marker in {folder} ({exc})", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, run, and turn user mistakes into one error line and exit code 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    chosen = next((a for a in argv if a in COMMANDS), None)
    parser = build_parser(chosen if chosen is not None else "")
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    args._argv = argv[argv.index(args.command) + 1:]
    control = getattr(args, "pipeline_control", None)
    rc = 1
    aborted = False
    try:
        rc = int(args._run(args) or 0)
        return rc
    except InputError as exc:
        print(f"cryorefine {args.command}: error: {exc}", file=sys.stderr)
        rc = 2
        return rc
    except JobAborted as exc:
        print(f"cryorefine {args.command}: aborted: {exc}", file=sys.stderr)
        aborted = True
        return rc
    except KeyboardInterrupt:
        print(f"cryorefine {args.command}: interrupted", file=sys.stderr)
        rc = 130
        return rc
    except BrokenPipeError:          # e.g. `cryorefine image-handler --stats ... | head`
        sys.stderr.close()
        rc = 0
        return rc
    except MemoryError as exc:       # a machine too small for the job is not a bug: one line, not a traceback
        print(f"cryorefine {args.command}: error: out of memory ({exc or 'an allocation failed'}); use a machine "
              f"with more memory or a smaller job", file=sys.stderr)
        rc = 1
        return rc
    except OSError as exc:           # a disk that fills or goes away during the run
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"cryorefine {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        rc = 1
        return rc
    finally:
        write_exit_marker(control, rc == 0, aborted)


if __name__ == "__main__":
    sys.exit(main())
