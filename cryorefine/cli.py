"""`cryorefine` command line: one sub-command per job, RELION's option spellings accepted."""

from __future__ import annotations

import argparse
import importlib
import sys

from cryorefine import __version__
from cryorefine.errors import InputError

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


def build_parser(chosen: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; the options of `chosen` (or of every sub-command if None) are registered."""
    parser = argparse.ArgumentParser(prog="cryorefine", description=__doc__)
    parser.add_argument("--version", action="version", version=f"cryorefine {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (modname, help_) in COMMANDS.items():
        if chosen is not None and name != chosen:
            sub.add_parser(name, help=help_)
            continue
        mod = importlib.import_module(modname)
        p = sub.add_parser(name, help=help_, description=(mod.__doc__ or None),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, run, and turn user mistakes into one error line and exit code 2."""
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if a in COMMANDS), None)
    parser = build_parser(chosen if chosen is not None else "")
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except InputError as exc:
        print(f"cryorefine {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cryorefine {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
