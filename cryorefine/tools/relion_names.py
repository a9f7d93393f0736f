"""Write RELION's program names (relion_refine, relion_refine_mpi, relion_postprocess, ...) into a folder, each a
small script that runs the matching cryorefine command, so RELION's command lines run with nothing changed.

Example:
  cryorefine relion-names ~/cryorefine-bin
  export PATH=~/cryorefine-bin:$PATH
  mpiexec -n 3 relion_refine_mpi --o Refine3D/job019/run --auto_refine --split_random_halves --i particles.star ...

RELION's GUI runs whatever `relion_refine_mpi` is first on PATH: start it with this PATH to have its Refine3D,
Extract, PostProcess jobs run by cryorefine. Command lines asking for what cryorefine does not do (relion_refine
without --auto_refine, a classification) end with an error line. Only files this command wrote are replaced.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from pathlib import Path

from cryorefine.errors import require
from cryorefine.io.atomic import atomic_path
from cryorefine.validate import check_output_folder

MARK = "# written by `cryorefine relion-names`"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The folder to write into."""
    parser.add_argument("folder", help="folder for the relion_* programs (made if missing); put it first on PATH")


def script_text(program: str, python: str) -> str:
    """A POSIX sh script that runs `python -m cryorefine <program> <its arguments>`."""
    from cryorefine.cli import RELION_PROGRAMS
    return (f"#!/bin/sh\n{MARK}: RELION's {program} command lines run by `cryorefine "
            f"{RELION_PROGRAMS[program]}`\nexec {shlex.quote(python)} -m cryorefine {program} \"$@\"\n")


def run(args: argparse.Namespace) -> int:
    """Write one script per RELION program; refuse to replace a file that is not one of ours."""
    from cryorefine.cli import RELION_PROGRAMS
    require(bool(str(args.folder).strip()), "relion-names: give the folder to write the programs into (e.g. "
                                            "~/cryorefine-bin)")
    folder = Path(args.folder).expanduser()
    check_output_folder(folder)
    for program in RELION_PROGRAMS:
        path = folder / program
        if path.is_symlink() or path.exists():
            try:
                ours = MARK in path.read_text(errors="replace")[:400]
            except OSError:
                ours = False
            require(ours, f"{path}: exists and was not written by cryorefine relion-names (a RELION installation?); "
                          "choose another folder")
    python = os.path.abspath(sys.executable)
    for program in RELION_PROGRAMS:
        with atomic_path(folder / program, suffix="") as tmp:
            tmp.write_text(script_text(program, python))
        os.chmod(folder / program, 0o755)
    print(f"cryorefine relion-names: wrote {', '.join(RELION_PROGRAMS)} in {folder}")
    first = shutil.which("relion_refine")
    if first and Path(first).resolve().parent != folder.resolve():
        print(f"cryorefine relion-names: note: {first} comes first on PATH now; put {folder} before it")
    print(f"  export PATH={shlex.quote(str(folder.resolve()))}:$PATH")
    return 0
