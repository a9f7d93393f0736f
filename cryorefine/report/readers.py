"""Collect the numbers of a refinement from its files (spec §10): `_itNNN_` STAR files, final files, run.out.

Conventions: resolutions in Å unless named `_inv` (1/Å); angles in degrees; offsets in Å. Every number is read
from a file the run wrote; nothing is recomputed except pose changes between two `_data.star` files.
"""

from __future__ import annotations

import itertools
import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cryorefine.errors import InputError, require
from cryorefine.geometry.euler import euler_to_matrix
from cryorefine.geometry.sampling import angular_step
from cryorefine.geometry.symmetry import relion_angular_distance_deg, symmetry_matrices
from cryorefine.io.star import read_star
from cryorefine.refine.timing import parse_time_line

_IT_FILE = re.compile(r"_it(\d{3})_optimiser\.star$")

# table column -> (file kind, block, label); kinds: model (half-1 model), optimiser, sampling
ITERATION_COLUMNS: dict[str, tuple[str, str, str]] = {
    "resolution_A": ("model", "model_general", "rlnCurrentResolution"),
    "acc_rot_deg": ("optimiser", "optimiser_general", "rlnOverallAccuracyRotations"),
    "acc_trans_A": ("optimiser", "optimiser_general", "rlnOverallAccuracyTranslationsAngst"),
    "healpix_order": ("sampling", "sampling_general", "rlnHealpixOrder"),
    "offset_range_A": ("sampling", "sampling_general", "rlnOffsetRange"),
    "local_searches": ("model", "model_general", "rlnOrientationalPriorMode"),
    "changes_angles_deg": ("optimiser", "optimiser_general", "rlnChangesOptimalOrientations"),
    "changes_offsets_A": ("optimiser", "optimiser_general", "rlnChangesOptimalOffsets"),
    "image_size_px": ("model", "model_general", "rlnCurrentImageSize"),
    "ave_pmax": ("model", "model_general", "rlnAveragePmax"),
}


def iteration_root(root: str, it: int | None) -> str:
    """`run_it012` for an iteration, `run` for the final files (outputs.file_root's naming)."""
    return f"{root}_it{it:03d}" if it is not None else root


def iteration_files(root: str, it: int | None) -> dict[str, Path]:
    """Paths of the files of iteration `it` (None: the final files)."""
    r = iteration_root(root, it)
    final = it is None
    return {"model": Path(f"{r}_model.star" if final else f"{r}_half1_model.star"),
            "optimiser": Path(f"{r}_optimiser.star"), "sampling": Path(f"{r}_sampling.star"),
            "data": Path(f"{r}_data.star")}


def find_iterations(root: str) -> list[int]:
    """Iterations (ascending, 0 included) that have an `_itNNN_optimiser.star` (the last file written)."""
    d = Path(root).parent
    name = Path(root).name
    if not d.is_dir():
        return []
    its = [int(m.group(1)) for p in d.glob(f"{name}_it[0-9][0-9][0-9]_optimiser.star")
           if (m := _IT_FILE.search(p.name)) and p.name.startswith(name + "_it")]
    return sorted(its)


def star_block(path: Path, block: str, labels: Iterable[str] = (), blocks: dict | None = None) -> dict | pd.DataFrame:
    """Block `data_<block>` of a STAR file (`blocks`: the file as read_star read it, else it is read) holding `labels`;
    InputError naming the file and what it lacks, as a file cut short or still being written does (a KeyError)."""
    found = (read_star(path) if blocks is None else blocks).get(block)
    require(found is not None, f"{path}: no data_{block} block (cut short, or still being written?)")
    # `in`: a loop's columns or a list's keys
    missing = [label for label in labels if label not in found]
    require(not missing, f"{path}: data_{block} has no {', '.join(missing)} (cut short, or still being written?)")
    return found


def star_value(path: Path, block: str, label: str) -> float:
    """One key/value entry of a STAR list block as a float."""
    return float(star_block(path, block, [label])[label])


def iteration_row(root: str, it: int) -> dict[str, float]:
    """The numbers of one iteration (see ITERATION_COLUMNS), plus the fine angular and offset steps of the log."""
    files = iteration_files(root, it)
    blocks = {k: read_star(files[k]) for k in ("model", "optimiser", "sampling")}

    def value(kind: str, block: str, label: str) -> float:
        return float(star_block(files[kind], block, [label], blocks[kind])[label])
    row: dict[str, float] = {"iteration": it}
    for col, (kind, block, label) in ITERATION_COLUMNS.items():
        row[col] = value(kind, block, label)
    oversampling = int(value("optimiser", "optimiser_general", "rlnAdaptiveOversampleOrder"))
    row["angular_step_deg"] = angular_step(int(row["healpix_order"]) + oversampling)
    row["offset_step_A"] = value("sampling", "sampling_general", "rlnOffsetStep") / 2 ** oversampling
    return row


def iteration_table(root: str, iterations: list[int], times: dict[int, float]) -> pd.DataFrame:
    """One row per iteration ≥ 1: files' numbers and the wall time from run.out (NaN when not logged)."""
    rows = [iteration_row(root, it) for it in iterations if it >= 1]
    for r in rows:
        r["time_s"] = times.get(int(r["iteration"]), np.nan)
    cols = ["iteration", *ITERATION_COLUMNS, "angular_step_deg", "offset_step_A", "time_s"]
    return pd.DataFrame(rows, columns=cols)


def fsc_curve(model_star: Path) -> tuple[np.ndarray, np.ndarray]:
    """(resolution 1/Å, gold-standard FSC) of a `_model.star` file's `model_class_1` table."""
    t = star_block(model_star, "model_class_1", ["rlnResolution", "rlnGoldStandardFsc"])
    return np.asarray(t["rlnResolution"], float), np.asarray(t["rlnGoldStandardFsc"], float)


@dataclass
class LogInfo:
    """What only run.out knows: command line, start, per-iteration time, the closing summary's wall time and
    peak memory (` Wall time: 12.3 min (740 s); peak memory: 1.15 GiB`)."""

    command_line: str = ""
    started: str = ""
    particles_line: str = ""
    times: dict[int, float] = field(default_factory=dict)
    phase_times: dict[int, dict[str, float]] = field(default_factory=dict)   # iteration -> phase -> s (`Time:`)
    wall_time_s: float | None = None
    peak_memory_gib: float | None = None
    finished_line: str = ""
    stopped: bool = False
    converged: bool = False


def read_log(path: Path) -> LogInfo:
    """Parse `<root>.out` (missing file: empty LogInfo); the last run in an appended log wins."""
    info = LogInfo()
    if not path.exists():
        return info
    phases: dict[str, float] = {}
    for line in path.read_text(errors="replace").splitlines():
        s = line.strip()
        if s.startswith("Time: "):
            phases = parse_time_line(s)[0]                  # logged just before its "Iteration N took"
            continue
        if m := re.match(r"cryorefine refine, started (.+?)(?: on \d+ MPI processes.*)?$", s):
            info.started = m.group(1)
        elif s.startswith("cryorefine refine "):
            info.command_line = s
        elif s.startswith("Particles:"):
            info.particles_line = s
        elif m := re.match(r"Iteration (\d+) took ([\d.eE+-]+) s", s):
            info.times[int(m.group(1))] = float(m.group(2))
            if phases:
                info.phase_times[int(m.group(1))] = phases
            phases = {}
        elif m := re.match(r"Wall time: .*\(([\d.]+) s\); peak memory: ([\d.]+) GiB", s):
            info.wall_time_s, info.peak_memory_gib = float(m.group(1)), float(m.group(2))
            info.finished_line = s
        elif s.startswith("Stopped after --auto_iter_max"):
            info.stopped = True
        elif "Refinement has converged, stopping now" in s:
            info.converged = True
    return info


def input_files(command_line: str) -> dict[str, str]:
    """Input files named on a refine command line: particles (--i), reference (--ref), mask (--solvent_mask)."""
    try:
        words = shlex.split(command_line)
    except ValueError:
        words = command_line.split()
    names = {"--i": "particles", "--particles": "particles", "--ref": "reference", "--reference": "reference",
             "--solvent_mask": "solvent mask", "--solvent-mask": "solvent mask", "--continue": "continued from"}
    out = {}
    for a, b in itertools.pairwise(words):
        if a in names:
            out[names[a]] = b
    return out


def pose_arrays(data_star: Path) -> pd.DataFrame:
    """The particles table of a `_data.star` file (InputError when it has none: a file cut short or still written)."""
    table = read_star(data_star).get("particles")
    require(isinstance(table, pd.DataFrame), f"{data_star}: no data_particles table (cut short, or still being "
                                             f"written?)")
    return table


def pose_changes(old: pd.DataFrame, new: pd.DataFrame, sym: str) -> tuple[np.ndarray, np.ndarray]:
    """Per particle: symmetry-aware angular change (deg, RELION's distance) and offset change |Δo| (Å)."""
    a_old = euler_to_matrix(old["rlnAngleRot"], old["rlnAngleTilt"], old["rlnAnglePsi"])
    a_new = euler_to_matrix(new["rlnAngleRot"], new["rlnAngleTilt"], new["rlnAnglePsi"])
    d_ang = relion_angular_distance_deg(a_old, a_new, symmetry_matrices(sym))
    d_off = np.hypot(np.asarray(new["rlnOriginXAngst"]) - np.asarray(old["rlnOriginXAngst"]),
                     np.asarray(new["rlnOriginYAngst"]) - np.asarray(old["rlnOriginYAngst"]))
    return d_ang, d_off


@dataclass
class RunFiles:
    """Where a refinement stands: its iterations, whether the final files exist, and its log."""

    root: str
    iterations: list[int]
    finished: bool
    log: LogInfo

    @property
    def last(self) -> int:
        return self.iterations[-1]

    def files(self, it: int | None) -> dict[str, Path]:
        return iteration_files(self.root, it)

    @property
    def result_files(self) -> dict[str, Path]:
        """The final files if the run finished, else those of the last iteration."""
        return self.files(None if self.finished else self.last)

    def half_maps(self) -> list[Path]:
        """Final unfiltered half maps, or the last iteration's half maps."""
        if self.finished:
            return [Path(f"{self.root}_half{h}_class001_unfil.mrc") for h in (1, 2)]
        r = iteration_root(self.root, self.last)
        return [Path(f"{r}_half{h}_class001.mrc") for h in (1, 2)]

    def status(self) -> str:
        """'finished', 'stopped' (--auto_iter_max reached) or 'in progress'."""
        if self.finished:
            return "finished"
        return "stopped" if self.log.stopped else "in progress"


def open_run(root: str) -> RunFiles:
    """Locate a run by its output root (e.g. Refine3D/run); InputError if it has no iteration files."""
    root = str(root)
    if Path(root).is_dir():         # a job folder (Refine3D/job019/): the one run root inside it
        found = {}
        for p in Path(root).glob("*_it[0-9][0-9][0-9]_optimiser.star"):
            name = _IT_FILE.split(p.name)[0]
            found[name] = max(found.get(name, 0.0), p.stat().st_mtime)
        roots = sorted(found)
        base = roots[0] if roots else "run"
        if len(roots) > 1:
            # a run and its continuations (RELION's <root>_ct<iteration>): the newest; other runs: which is for the user
            require(all(r == base or r.startswith(base + "_ct") for r in roots),
                    f"{root}: several runs in this folder ({', '.join(roots)}); give the run root")
            base = max(roots, key=found.get)
        root = str(Path(root) / base)
    for suffix in ("_optimiser.star", "_model.star", "_data.star", ".out"):
        if root.endswith(suffix) and not Path(root).is_dir():
            root = root[: -len(suffix)]
            root = re.sub(r"_it\d{3}$", "", root)
    # an iteration (or the final set) counts once all its STAR files are there: `report` may run while
    # `refine` is still writing the newest iteration's files
    listed = find_iterations(root)
    its = [it for it in listed if all(p.exists() for p in iteration_files(root, it).values())]
    if not its:
        where = Path(root).parent
        if not where.is_dir():
            raise InputError(f"{root}: no such run (folder {where} does not exist)")
        if listed:      # optimiser files, but every iteration lacks another of its STAR files
            gone = [p for p in iteration_files(root, listed[-1]).values() if not p.exists()]
            raise InputError(f"{root}: no complete iteration: {gone[0].name} (and the like of every other "
                             f"iteration) is missing")
        raise InputError(f"{root}: no such run (no {Path(root).name}_itNNN_optimiser.star in {where})")
    finished = all(p.exists() for p in iteration_files(root, None).values())
    return RunFiles(root, its, finished, read_log(Path(f"{root}.out")))


def run_root_of_half_map(path: str) -> str | None:
    """The refine output root of `<root>_half1_class001_unfil.mrc` (as postprocess's --i), or None."""
    m = re.match(r"(.+)_half[12]_class001(?:_unfil)?\.mrc$", str(path))
    if not m:
        return None
    root = re.sub(r"_it\d{3}$", "", m.group(1))
    return root if find_iterations(root) else None


@dataclass
class PostprocessFiles:
    """A postprocess run's STAR file: general values, FSC curves, Guinier plot."""

    path: Path
    general: dict
    fsc: pd.DataFrame
    guinier: pd.DataFrame | None


def read_postprocess(path: str | Path) -> PostprocessFiles:
    """`<o>.star` of `cryorefine postprocess` (data_general, data_fsc, data_guinier)."""
    blocks = read_star(path)
    if "general" not in blocks or "fsc" not in blocks:
        raise InputError(f"{path}: not a postprocess STAR file (no data_general / data_fsc)")
    guinier = blocks.get("guinier")
    # the labels the page reads unguarded (the others are optional)
    return PostprocessFiles(Path(path), dict(star_block(path, "general", ["rlnFinalResolution"], blocks)),
                            star_block(path, "fsc", ["rlnResolution"], blocks),
                            guinier if isinstance(guinier, pd.DataFrame) else None)
