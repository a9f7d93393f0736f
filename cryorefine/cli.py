"""`cryorefine` command line: one sub-command per job, RELION's option spellings accepted."""

from __future__ import annotations

import argparse
import importlib
import sys

from cryorefine import __version__
from cryorefine.errors import InputError

# name -> module; each module defines `add_arguments(parser)` and `run(args) -> int`,
# and a module docstring whose first line is the sub-command's help.
COMMANDS: dict[str, str] = {
    "refine": "cryorefine.refine.command",
    "reconstruct": "cryorefine.fourier.reconstruct_command",
    "extract": "cryorefine.extract.command",
    "image-handler": "cryorefine.tools.image_handler",
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every sub-command registered."""
    parser = argparse.ArgumentParser(prog="cryorefine", description=__doc__)
    parser.add_argument("--version", action="version", version=f"cryorefine {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, modname in COMMANDS.items():
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as exc:  # a sub-command not built yet
            if exc.name != modname:
                raise
            continue
        doc = (mod.__doc__ or "").strip().splitlines()
        p = sub.add_parser(name, help=doc[0] if doc else None, description=(mod.__doc__ or None),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, run, and turn user mistakes into one error line and exit code 2."""
    parser = build_parser()
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
