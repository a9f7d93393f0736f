"""`cryorefine` command line: one sub-command per job, RELION's option spellings accepted.

Every sub-command takes RELION's `--pipeline_control DIR`: the job then writes RELION's marker file
`DIR/RELION_JOB_EXIT_SUCCESS` or `DIR/RELION_JOB_EXIT_FAILURE` at its end, as RELION's pipeliner expects.
Options are never abbreviated (`--extract` is not `--extract_size`).

RELION's program names work as well, so RELION's command lines run with nothing changed: `cryorefine
relion_refine_mpi --o ... --auto_refine ...`, or `relion_refine_mpi ...` itself once `cryorefine relion-names DIR`
has written those programs into DIR and DIR is on PATH (also the way to point RELION's GUI at cryorefine).
"""

from __future__ import annotations

import argparse
import importlib
import re
import signal
import sys
import time
import traceback
from pathlib import Path

from cryorefine import __version__
from cryorefine.errors import InputError, JobAborted, Terminated, quiet_after_termination, request_termination

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
    "mask-create": ("cryorefine.tools.mask_create", "soft solvent mask from a map: threshold, extend, soft edge "
                    "(relion_mask_create)"),
    "relion-names": ("cryorefine.tools.relion_names", "write relion_refine, relion_refine_mpi, ... into a folder, "
                     "so RELION's command lines (and its GUI) run cryorefine unchanged"),
}

# RELION program -> the sub-command that runs its command lines (the _mpi ones under mpiexec, as RELION's)
RELION_PROGRAMS: dict[str, str] = {
    "relion_refine": "refine", "relion_refine_mpi": "refine",
    "relion_reconstruct": "reconstruct", "relion_reconstruct_mpi": "reconstruct",
    "relion_preprocess": "extract", "relion_preprocess_mpi": "extract",
    "relion_image_handler": "image-handler", "relion_postprocess": "postprocess",
    "relion_mask_create": "mask-create",
}

UNDERSCORE_SPELLINGS = {name.replace("-", "_"): name for name in COMMANDS if "-" in name}

EXIT_SUCCESS = "RELION_JOB_EXIT_SUCCESS"
EXIT_FAILURE = "RELION_JOB_EXIT_FAILURE"
EXIT_ABORTED = "RELION_JOB_EXIT_ABORTED"
ABORT_NOW = "RELION_JOB_ABORT_NOW"


def add_pipeline_control(p: argparse.ArgumentParser) -> None:
    """RELION's `--pipeline_control DIR` (every relion_ program the GUI runs gets it)."""
    p.add_argument("--pipeline_control", "--pipeline-control", dest="pipeline_control", default=None,
                   metavar="DIR", help="RELION pipeliner: write RELION_JOB_EXIT_SUCCESS / RELION_JOB_EXIT_FAILURE "
                                       "in DIR at the end of the job")


class Parser(argparse.ArgumentParser):
    """argparse with one error line (an unknown or missing option is a user mistake like any other), not the usage
    block; `--help` still prints everything. A negative number in exponent form (`--adhoc_bfac -1e2`, which RELION
    reads) is a value, not an option."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists the options)\n")


def build_parser(chosen: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; the options of `chosen` (or of every sub-command if None) are registered."""
    parser = Parser(prog="cryorefine", description=__doc__, allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"cryorefine {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
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
        # `relion_refine --version` and the like print the version, as RELION's programs do
        p.add_argument("--version", action="version", version=f"cryorefine {__version__}")
        if "verb" not in {a.dest for a in p._actions}:      # every RELION program takes it (1 normal, 0 silent)
            p.add_argument("--verb", type=int, default=None, metavar="N",
                           help="RELION's verbosity: accepted; the output does not change with it")
        p.set_defaults(_run=mod.run)
    return parser


def write_exit_marker(folder: str | None, success: bool, aborted: bool = False) -> None:
    """RELION's job-exit marker file in the --pipeline_control folder (nothing without one)."""
    if not folder:
        return
    try:
        d = Path(folder)
        d.mkdir(parents=True, exist_ok=True)
        mine = EXIT_ABORTED if aborted else EXIT_SUCCESS if success else EXIT_FAILURE
        # the marker first, then the others gone: MPI ranks ending at once never remove each other's marker
        (d / mine).touch()
        for name in {EXIT_SUCCESS, EXIT_FAILURE, EXIT_ABORTED} - {mine}:
            (d / name).unlink(missing_ok=True)
        if aborted:
            (d / ABORT_NOW).unlink(missing_ok=True)
    except OSError as exc:
        print(f"cryorefine: warning: cannot write the job-exit marker in {folder} ({exc})", file=sys.stderr)


def relion_program(invoked_as: str | None, argv: list[str]) -> tuple[str | None, list[str]]:
    """The RELION program a command line names (the executable's own name, or the first word after
    `cryorefine`), and the argv with it replaced by its sub-command; (None, argv) for cryorefine's own."""
    name = Path(invoked_as).name if invoked_as else ""
    if name in RELION_PROGRAMS:
        return name, [RELION_PROGRAMS[name], *argv]
    if argv and argv[0] in RELION_PROGRAMS:
        return argv[0], [RELION_PROGRAMS[argv[0]], *argv[1:]]
    return None, argv


def check_relion_job(program: str, args: argparse.Namespace) -> None:
    """RELION's programs do more than cryorefine: a command line asking for another job is an error, not a
    different job run silently (relion_refine without --auto_refine is a classification)."""
    if program.startswith("relion_refine"):
        if not (args.auto_refine or args.continue_from):
            raise InputError(f"{program}: only 3D auto-refine (--auto_refine) is available in cryorefine; this "
                             "command line has no --auto_refine (a 2D/3D classification in RELION)")
    elif program.startswith("relion_preprocess"):
        if not args.extract:
            raise InputError(f"{program}: only particle extraction (--extract) is available in cryorefine; this "
                             "command line has no --extract")


def relion_defaults(program: str, args: argparse.Namespace) -> None:
    """relion_refine's defaults for what its command line leaves out (a switch left out is off there, while
    `cryorefine refine` defaults to the GUI's choices); they join the recorded command line."""
    if program.startswith("relion_refine"):
        from cryorefine.refine.command import given_dests, relion_command_line_defaults
        args._relion_defaults = relion_command_line_defaults(args, given_dests(args._argv))
        args._argv = [*args._argv, *args._relion_defaults]


def _say(line: str) -> None:
    """One line on stderr in one write: MPI ranks writing at once then never run their lines together."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def all_ranks_done() -> None:
    """Under MPI, wait for every rank before a success marker: a rank still running (or killed) must not find the
    job marked successful. A rank that died takes the job down here instead. No-op without MPI."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized() and mpi.COMM_WORLD.Get_size() > 1:
        from cryorefine.parallel.mpi import get_reducer
        get_reducer().wait_for_all()      # sleeping, not MPICH's spinning barrier, while rank 0 writes the report


def end_other_ranks(control: str | None, rc: int, show_traceback: bool = False, aborted: bool = False) -> None:
    """Under MPI with several ranks, end the whole job: a failure only this rank sees (memory, disk, a bug) would
    leave the others waiting in a collective call forever. Input errors need not: every rank validates every
    input and stops at the same line. No-op without MPI."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is None or not mpi.Is_initialized() or mpi.Is_finalized() or mpi.COMM_WORLD.Get_size() < 2:
        return
    if show_traceback:
        traceback.print_exc()
    write_exit_marker(control, False, aborted)
    sys.stdout.flush()
    sys.stderr.flush()
    # mpiexec forwards each rank's output through a pipe that Abort tears down: give the error line time to get
    # through (on a loaded machine it was lost, leaving a failed job without its reason)
    time.sleep(0.5)
    mpi.COMM_WORLD.Abort(rc)


def pipeline_control_in(argv: list[str]) -> str | None:
    """The --pipeline_control folder of a command line that did not parse (None if it names none)."""
    for i, a in enumerate(argv):
        for flag in ("--pipeline_control", "--pipeline-control"):
            if a == flag and i + 1 < len(argv):
                return argv[i + 1]
            if a.startswith(flag + "="):
                return a.split("=", 1)[1]
    return None


def repeated_options(argv: list[str]) -> list[str]:
    """Options (--name or --name=value) that occur more than once in a command line, in order of first use."""
    names = [a.split("=", 1)[0] for a in argv if a.startswith("--") and len(a) > 2]
    return [n for i, n in enumerate(names) if names.count(n) > 1 and names.index(n) == i]


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, run, and turn user mistakes into one error line and exit code 2."""
    invoked_as = sys.argv[0] if argv is None else None
    argv = sys.argv[1:] if argv is None else list(argv)
    program, argv = relion_program(invoked_as, argv)
    if argv and argv[0] in UNDERSCORE_SPELLINGS:     # `cryorefine image_handler`, as RELION spells its programs
        argv = [UNDERSCORE_SPELLINGS[argv[0]], *argv[1:]]
    chosen = next((a for a in argv if a in COMMANDS), None)
    parser = build_parser(chosen if chosen is not None else "")
    try:
        args, unknown = parser.parse_known_args(argv)
    except SystemExit as exc:   # a parse error still tells RELION's pipeliner that the job failed
        if exc.code not in (0, None):
            write_exit_marker(pipeline_control_in(argv), False)
        raise
    if unknown:     # named by the sub-command whose options they are not
        prog = f"cryorefine {args.command}" if getattr(args, "command", None) else "cryorefine"
        print(f"{prog}: error: unrecognized arguments: {' '.join(unknown)} (`{prog} --help` lists the options)",
              file=sys.stderr)
        write_exit_marker(getattr(args, "pipeline_control", None), False)
        return 2
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    args._argv = argv[argv.index(args.command) + 1:]
    for option in repeated_options(args._argv):      # RELION's parser warns likewise and takes the last value
        print(f"cryorefine {args.command}: warning: {option} was given more than once; the last value is used",
              file=sys.stderr)
    control = getattr(args, "pipeline_control", None)
    if control and Path(control).exists() and not Path(control).is_dir():
        # the job's folder is where RELION's pipeliner looks for the exit marker: the job would end unseen
        print(f"cryorefine {args.command}: error: --pipeline_control {control}: is a file, not the job's folder",
              file=sys.stderr)
        return 2
    rc = 1
    aborted = False
    previous = signal.signal(signal.SIGTERM, request_termination)   # scancel / kill: as Ctrl-C, failure marker
    sys.unraisablehook = quiet_after_termination
    try:
        if program:
            check_relion_job(program, args)
            relion_defaults(program, args)
        rc = int(args._run(args) or 0)
        return rc
    except InputError as exc:
        _say(f"cryorefine {args.command}: error: {exc}")
        rc = 2
        return rc
    # a stop that may reach one MPI rank only (a signal to one process, the abort file seen between collectives):
    # the others would wait for it forever, so the whole job ends
    except JobAborted as exc:
        _say(f"cryorefine {args.command}: aborted: {exc}")
        aborted = True
        end_other_ranks(control, rc, aborted=True)
        return rc
    except KeyboardInterrupt:
        _say(f"cryorefine {args.command}: interrupted")
        rc = 130
        end_other_ranks(control, rc)
        return rc
    except Terminated:
        _say(f"cryorefine {args.command}: terminated (SIGTERM)")
        rc = 143
        end_other_ranks(control, rc)
        return rc
    except BrokenPipeError:          # e.g. `cryorefine image-handler --stats ... | head`
        sys.stderr.close()
        rc = 0
        return rc
    except MemoryError as exc:       # a machine too small for the job is not a bug: one line, not a traceback
        _say(f"cryorefine {args.command}: error: out of memory ({exc or 'an allocation failed'}); use a machine "
             f"with more memory or a smaller job")
        rc = 1
        end_other_ranks(control, rc)
        return rc
    except OSError as exc:           # a disk that fills or goes away during the run
        where = f"{exc.filename}: " if exc.filename else ""
        _say(f"cryorefine {args.command}: error: {where}{exc.strerror or exc}")
        rc = 1
        end_other_ranks(control, rc)
        return rc
    except Exception:                # a bug: its traceback, and under MPI the other ranks must not wait for this one
        rc = 1
        end_other_ranks(control, rc, show_traceback=True)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        if rc == 0:
            all_ranks_done()
        write_exit_marker(control, rc == 0, aborted)


if __name__ == "__main__":
    sys.exit(main())
