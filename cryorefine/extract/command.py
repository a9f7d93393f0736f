"""Extract (or re-extract and re-centre) particles from micrographs, like relion_preprocess --extract.

Coordinates come from per-micrograph files (--coord_suffix, optionally under --coord_dir), from a
RELION-4 coordinate list (--coord_list), or from refined particles (--reextract_data_star, with
--recenter or --reset_offsets). One stack per micrograph is written to <o>/<micrograph path>.mrcs and
all particles to <o>/particles.star (RELION 3.1+ layout, image names relative to the current folder).
Relative micrograph and coordinate paths are looked up in the current folder first, then beside the
input STAR file.

relion_preprocess spellings are accepted as the RELION 5 GUI writes them: --part_dir (= --o), --part_star
(default <part_dir>/particles.star), --extract, --pick_star (each micrograph's particles as <stack root>_extract.star
and their list, RELION's coordinate_files table), --white_dust/--black_dust (with --norm; negative = off),
--minimum_pick_fom, --only_do_unfinished.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from cryorefine.errors import InputError, require
from cryorefine.extract.extraction import (ExtractParams, crop_keep, crosses_edge, iter_particles, wholly_outside,
                                           output_angpix)
from cryorefine.extract.recenter import recenter
from cryorefine.io.mrc import StackWriter, read_header, read_map
from cryorefine.io.star import ParticleTable, read_particles, read_star, write_particles, write_star
from cryorefine.validate import (COORDINATE_RULES, CTF_RULES, OPTICS_RULES, check_output_file, check_particle_table,
                                 check_table, stacks_named_by)

# micrograph-table columns that describe the particle too (what RELION copies into particles.star)
_MIC_TO_PARTICLE = ("rlnMicrographName", "rlnOpticsGroup", "rlnCtfMaxResolution", "rlnCtfFigureOfMerit",
                    "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnCtfBfactor", "rlnCtfScalefactor",
                    "rlnPhaseShift")
_CTF_DEFAULTS = {"rlnCtfBfactor": 0.0, "rlnCtfScalefactor": 1.0, "rlnPhaseShift": 0.0}
# optics-table columns of micrographs that do not describe extracted particles
_MIC_ONLY_OPTICS = ("rlnMicrographPixelSize",)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """RELION relion_preprocess option spellings for extraction."""
    p.add_argument("--i", required=True, help="micrographs STAR file (e.g. micrographs_ctf.star)")
    p.add_argument("--o", "--part_dir", dest="o", default=None, help="output folder, e.g. Extract/job018/ "
                   "(relion_preprocess: --part_dir)")
    p.add_argument("--part_star", default=None, help="output particle STAR file (default <part_dir>/particles.star)")
    p.add_argument("--extract", action="store_true", help="relion_preprocess: do the extraction (always done here)")
    p.add_argument("--pick_star", default=None,
                   help="relion_preprocess: write this list of per-micrograph <stack root>_extract.star coordinate files")
    src = p.add_argument_group("coordinates (one of)")
    src.add_argument("--coord_suffix", help="coordinate file = <coord_dir><micrograph without extension><suffix>")
    src.add_argument("--coord_dir", default="", help="folder prefix of the coordinate files (with --coord_suffix)")
    src.add_argument("--coord_list", help="STAR table of rlnMicrographName -> rlnMicrographCoordinates")
    src.add_argument("--reextract_data_star", help="refined particles to re-extract (e.g. run_data.star)")
    rc = p.add_argument_group("re-extraction")
    rc.add_argument("--recenter", action="store_true", help="fold the refined offsets into the coordinates")
    rc.add_argument("--recenter_x", type=float, default=0.0, help="reference point to centre on, x (ref px)")
    rc.add_argument("--recenter_y", type=float, default=0.0, help="reference point to centre on, y (ref px)")
    rc.add_argument("--recenter_z", type=float, default=0.0, help="reference point to centre on, z (ref px)")
    rc.add_argument("--ref_angpix", type=float, default=-1.0,
                    help="pixel size of the reference the recenter point refers to (default: particle pixel)")
    rc.add_argument("--reset_offsets", action="store_true", help="set the origins to 0, coordinates unchanged")
    ex = p.add_argument_group("extraction")
    ex.add_argument("--extract_size", type=int, required=True, help="box on the micrograph (px, even)")
    ex.add_argument("--scale", type=int, default=-1, help="rescale the boxes to this size (px, even)")
    ex.add_argument("--norm", action="store_true", help="background mean 0, std 1 (after ramp removal)")
    ex.add_argument("--bg_radius", type=int, default=-1,
                    help="background radius (px of the output box); default floor(0.375*box)")
    ex.add_argument("--no_ramp", action="store_true", help="do not subtract a background plane")
    ex.add_argument("--invert_contrast", action="store_true", help="multiply by -1 (dark protein -> white)")
    ex.add_argument("--float16", action="store_true", help="write stacks in MRC mode 12 (half precision)")
    ex.add_argument("--skip_outside", action="store_true", help="drop particles whose box crosses the edge")
    ex.add_argument("--skip_missing", action="store_true", help="warn and skip micrographs that are missing")
    ex.add_argument("--white_dust", type=float, default=-1.0,
                    help="with --norm: replace pixels more than this many background sigma above the background "
                         "mean by Gaussian noise (RELION's dust removal; negative = off, the GUI default)")
    ex.add_argument("--black_dust", type=float, default=-1.0,
                    help="with --norm: the same for pixels below the mean (negative = off)")
    ex.add_argument("--minimum_pick_fom", type=float, default=None,
                    help="only coordinates with rlnAutopickFigureOfMerit >= this value")
    ex.add_argument("--skip_nonfinite", action="store_true",
                    help="skip particles whose box holds NaN or infinite pixels (counted) instead of stopping")
    ex.add_argument("--only_do_unfinished", action="store_true",
                    help="keep the stacks of micrographs already extracted (complete) and extract the others")
    p.add_argument("--j", type=int, default=1, help="parallel worker processes (one micrograph each)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")


# ---------------------------------------------------------------------------------------------
# MRC access


def _read_micrograph(path: str) -> np.ndarray:
    """2D micrograph as float32 (a single-section 3D file is accepted)."""
    data, _ = read_map(path)
    if data.ndim == 3 and data.shape[0] == 1:
        data = data[0]
    require(data.ndim == 2, f"{path}: not a 2D micrograph (shape {data.shape})")
    return data


# ---------------------------------------------------------------------------------------------
# inputs


def _table(blocks: dict, names: tuple[str, ...], path: str) -> pd.DataFrame:
    """The first loop among `names` (or the only loop) of a STAR file."""
    for n in names:
        if n in blocks and isinstance(blocks[n], pd.DataFrame):
            return blocks[n]
    loops = [b for b in blocks.values() if isinstance(b, pd.DataFrame)]
    if len(loops) == 1:
        return loops[0]
    raise InputError(f"{path}: no data_{names[0]} table")


def _resolve(name: str, base: Path) -> str:
    """A relative path as RELION sees it (current folder), else beside the STAR file that names it."""
    p = Path(name)
    if p.is_absolute() or p.exists():
        return str(p)
    alt = base / p
    return str(alt) if alt.exists() else str(p)


def _pipeline_post(name: str) -> PurePosixPath:
    """RELION decomposePipelineFileName: the part after 'jobNNN/' (or the whole relative path)."""
    parts = [x for x in PurePosixPath(name.replace("\\", "/")).parts if x not in ("/", "..", ".")]
    for k, x in enumerate(parts):
        if re.fullmatch(r"job\d{3,}", x) and k + 1 < len(parts):
            parts = parts[k + 1:]
            break
    return PurePosixPath(*parts)


def _star_mic_angpix(optics: pd.DataFrame | None, group: int) -> tuple[str, float] | None:
    """(label, A/px) of a group's micrograph pixel size in the optics table (rlnMicrographPixelSize, as RELION); None
    when the table gives none (the MRC header's is used then)."""
    if optics is not None and "rlnOpticsGroup" in optics:
        row = optics[optics["rlnOpticsGroup"].astype(int) == group]
        # not rlnMicrographOriginalPixelSize: for micrographs binned in motion correction that is the movies'
        if len(row) and "rlnMicrographPixelSize" in row:
            return "rlnMicrographPixelSize", float(row["rlnMicrographPixelSize"].iloc[0])
    return None


def _pixel_sizes_differ(star_angpix: float, header_angpix: float, tolerance: float = 0.01) -> bool:
    """The STAR and MRC-header pixel sizes disagree by more than `tolerance` (relative); a header without a
    pixel size (0) disagrees with nothing."""
    return header_angpix > 0 and abs(star_angpix - header_angpix) > tolerance * star_angpix


def _mic_angpix(optics: pd.DataFrame | None, group: int, mic_path: str, header_angpix: float,
                star_path: str) -> tuple[float, str | None]:
    """Micrograph pixel size (A) and, when the STAR value used disagrees with the MRC header, what to warn.

    RELION trusts the STAR file, so we do too; the header only fills in when the optics table has no pixel size.
    """
    star = _star_mic_angpix(optics, group)
    if star is None:
        require(header_angpix > 0, f"{mic_path}: no micrograph pixel size (optics table or MRC header)")
        return header_angpix, None
    label, angpix = star
    if not _pixel_sizes_differ(angpix, header_angpix):
        return angpix, None
    return angpix, (f"{mic_path}: {label} {angpix:g} A/px in {star_path} but {header_angpix:g} A/px in the MRC "
                    f"header; using {angpix:g} (the STAR file, as RELION does)")


@dataclass
class MicJob:
    """One micrograph's work: where to read, where to write, which boxes."""

    index: int
    name: str
    path: str
    stack: str
    angpix: float
    coord_x: np.ndarray
    coord_y: np.ndarray
    rows: pd.DataFrame = field(repr=False)
    source: str = ""                                  # the file the coordinates came from (for messages)
    source_rows: np.ndarray | None = field(default=None, repr=False)   # their 1-based rows in that file
    shape: tuple[int, int] = (0, 0)                   # micrograph (ny, nx) from its header


@dataclass
class MicResult:
    """What a worker reports back (small: no images)."""

    index: int
    keep: np.ndarray
    n_edge: int
    n_nonfinite: int = 0


def _coordinates_file(path: str) -> pd.DataFrame:
    """rlnCoordinateX/Y table of a RELION coordinate file."""
    blocks = read_star(path)
    loops = [b for b in blocks.values() if isinstance(b, pd.DataFrame) and "rlnCoordinateX" in b]
    require(bool(loops), f"{path}: no rlnCoordinateX/rlnCoordinateY table")
    t = loops[0].reset_index(drop=True)
    require("rlnCoordinateY" in t, f"{path}: no rlnCoordinateY column")
    check_table(t, COORDINATE_RULES, f"{path}: coordinates")
    return t


def _particles_for_coordinates(coords: pd.DataFrame, mic_row: pd.Series) -> pd.DataFrame:
    """Coordinate rows plus the micrograph's name, optics group and CTF (RELION's particles.star columns)."""
    t = coords.copy()
    for label in _MIC_TO_PARTICLE:
        if label in mic_row.index:
            t[label] = mic_row[label]
    if "rlnOpticsGroup" not in t:
        t["rlnOpticsGroup"] = 1
    for label, value in _CTF_DEFAULTS.items():
        if label not in t and "rlnDefocusU" in t:
            t[label] = value
    return t


def _recenter_missing_columns(columns, need_angles: bool) -> list[str]:
    """Columns --recenter reads that a refined-particle table lacks: taken as zeros they would leave every box
    where it was picked while the job looks re-centred. The angles matter only for a --recenter_x/y/z point."""
    need = ["rlnOriginXAngst", "rlnOriginYAngst"]
    if need_angles:
        need += ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
    return [c for c in need if c not in columns]


def _after_job_folder(name: str) -> str:
    """The part of a pipeline file name after its `Job/jobNNN/` folder (the whole name when it has none)."""
    m = re.search(r"(?:^|/)job\d+/(.+)$", name)
    return m.group(1) if m else name


def _micrograph_names(particle_mics: pd.Series, names: list[str]) -> pd.Series:
    """Each particle's micrograph as the micrograph STAR names it. RELION matches a re-extraction's particles by the
    micrograph's name after its job folder (preprocessing.cpp), so particles refined from MotionCorr/job002 are
    re-extracted from the same movies' MotionCorr/job010 micrographs; exact names first."""
    known = set(names)
    by_tail: dict[str, str | None] = {}
    for name in names:
        tail = _after_job_folder(name)
        by_tail[tail] = name if tail not in by_tail else None       # ambiguous tails match nothing
    tails = particle_mics.map(_after_job_folder)
    mapped = tails.map(lambda t: by_tail.get(t) or "")
    return particle_mics.where(particle_mics.isin(known) | (mapped == ""), mapped)


def _check_boxes_overlap(jobs: list[MicJob], box: int) -> None:
    """InputError naming the first particle whose box holds no micrograph pixel, as RELION stops the job ("lies
    completely outside micrograph"); a box that overlaps the micrograph is extracted with edge replication."""
    for job in jobs:
        out = wholly_outside(job.coord_x, job.coord_y, box, job.shape)
        if out.any():
            k = int(np.argmax(out))
            row = f" row {job.source_rows[k]}" if job.source_rows is not None else ""
            raise InputError(f"{job.source}{row}: the {box}-px box at x {job.coord_x[k]:g}, y {job.coord_y[k]:g} "
                             f"lies completely outside {job.path} ({job.shape[1]} x {job.shape[0]} px)"
                             + (f" ({int(out.sum())} such particles on it)" if out.sum() > 1 else ""))


def _plan(args: argparse.Namespace) -> tuple[list[MicJob], pd.DataFrame, str, list[str]]:
    """Per-micrograph jobs, output optics table, mode name, warnings (nothing is read but STAR files and MRC
    headers)."""
    star = Path(args.i)
    require(star.exists(), f"{args.i}: no such file")
    blocks = read_star(star)
    mics = _table(blocks, ("micrographs",), args.i)
    require("rlnMicrographName" in mics, f"{args.i}: no rlnMicrographName column")
    names = mics["rlnMicrographName"].astype(str)
    dup = names[names.duplicated()]
    require(dup.empty, f"{args.i}: micrograph {dup.iloc[0] if len(dup) else ''} listed twice")
    mic_optics = blocks.get("optics") if isinstance(blocks.get("optics"), pd.DataFrame) else None
    if mic_optics is not None:
        check_table(mic_optics, OPTICS_RULES, f"{args.i}: data_optics", unit="optics group")
    check_table(mics, {**CTF_RULES, "rlnOpticsGroup": OPTICS_RULES["rlnOpticsGroup"]}, f"{args.i}: data_micrographs")
    args._input_files = []
    out = Path(args.o)
    warnings: list[str] = []
    stacks: dict[str, str] = {}

    # which boxes on which micrograph (table index = 0-based row in the file named in `sources`)
    per_mic: dict[str, pd.DataFrame] = {}
    sources: dict[str, str] = {}
    if args.reextract_data_star:
        mode = "re-extraction"
        pstar = Path(args.reextract_data_star)
        require(pstar.exists(), f"{args.reextract_data_star}: no such file")
        table = read_particles(pstar)          # RELION 3.0 files are upgraded (origins to A, optics groups)
        check_particle_table(table, need_ctf=False)
        args._input_files += stacks_named_by(table)
        parts, part_optics = table.particles, table.optics
        for label in ("rlnMicrographName", "rlnCoordinateX", "rlnCoordinateY"):
            require(label in parts, f"{args.reextract_data_star}: no {label} column")
        if args.recenter:
            point = any(getattr(args, f"recenter_{a}") != 0 for a in "xyz")
            missing = _recenter_missing_columns(parts.columns, need_angles=point)
            origin = " (nor rlnOriginX/rlnOriginY)" if any(c.startswith("rlnOrigin") for c in missing) else ""
            require(not missing, f"{args.reextract_data_star}: no {', '.join(missing)} column{origin} in "
                                 f"data_particles (--recenter{' --recenter_x/y/z' if point else ''} needs the "
                                 f"refined {'offsets and angles' if point else 'offsets'})")
        check_table(parts, COORDINATE_RULES, f"{args.reextract_data_star}: data_particles")
        parts = parts.assign(rlnMicrographName=_micrograph_names(parts["rlnMicrographName"].astype(str), names))
        known = set(names)
        orphan = ~parts["rlnMicrographName"].astype(str).isin(known)
        if orphan.any():
            warnings.append(f"{int(orphan.sum())} particles are on micrographs not in {args.i}: not extracted")
        parts = parts[~orphan]
        by_name = mics.set_index(names, drop=False)      # names are unique (checked above)
        for name, grp in parts.groupby(parts["rlnMicrographName"].astype(str), sort=False):
            if "rlnDefocusU" not in grp:     # RELION fills in a particle file without CTF from its micrographs
                ctf = [c for c in _MIC_TO_PARTICLE if c.startswith(("rlnDefocus", "rlnCtf", "rlnPhase"))]
                grp = grp.assign(**{c: by_name.loc[name, c] for c in ctf if c in by_name.columns})
            per_mic[name] = grp
            sources[name] = args.reextract_data_star
    else:
        part_optics = None
        if args.coord_list:
            mode = "extraction (coordinate list)"
            cl = Path(args.coord_list)
            require(cl.exists(), f"{args.coord_list}: no such file")
            ctab = _table(read_star(cl), ("coordinate_files",), args.coord_list)
            for label in ("rlnMicrographName", "rlnMicrographCoordinates"):
                require(label in ctab, f"{args.coord_list}: no {label} column")
            coord_files = dict(zip(ctab["rlnMicrographName"].astype(str), ctab["rlnMicrographCoordinates"].astype(str)))
            base = cl.parent
        else:
            mode = "extraction (coordinate files)"
            cdir = args.coord_dir + ("/" if args.coord_dir and not args.coord_dir.endswith("/") else "")
            coord_files = {n: f"{cdir}{_pipeline_post(n).with_suffix('')}{args.coord_suffix}" for n in names}
            base = star.parent
        mic_rows = mics.set_index(names, drop=False)
        missing = []        # what was looked for, to name it
        for name in names:
            if name not in coord_files:
                missing.append(f"{name} (not in {args.coord_list})")
                continue
            cpath = _resolve(coord_files[name], base)
            if not os.path.exists(cpath):
                missing.append(cpath)
                continue
            args._input_files.append(cpath)
            coords = _coordinates_file(cpath)
            per_mic[name] = _particles_for_coordinates(coords, mic_rows.loc[name])
            sources[name] = cpath
        require(len(missing) < len(names), f"no coordinate file for any of the {len(names)} micrographs of {args.i} "
                                           f"(looked for {missing[0] if missing else ''}"
                                           f"{', ...' if len(missing) > 1 else ''})")
        if missing:
            warnings.append(f"{len(missing)} micrographs have no coordinate file (first: {missing[0]}): skipped")

    if args.minimum_pick_fom is not None:
        n_low = 0
        for name, t in list(per_mic.items()):
            require("rlnAutopickFigureOfMerit" in t, f"--minimum_pick_fom: the coordinates of {name} have no "
                                                   f"rlnAutopickFigureOfMerit column")
            fom = pd.to_numeric(t["rlnAutopickFigureOfMerit"], errors="coerce").to_numpy(float)
            ok = fom > args.minimum_pick_fom        # RELION keeps fom > the minimum (preprocessing.cpp)
            n_low += int((~ok).sum())
            per_mic[name] = t[ok]
        warnings.append(f"{n_low} coordinates below --minimum_pick_fom {args.minimum_pick_fom:g}: not extracted")

    jobs: list[MicJob] = []
    apix_warning, n_apix_differ = None, 0
    for index, row in mics.reset_index(drop=True).iterrows():
        name = str(row["rlnMicrographName"])
        if name not in per_mic or len(per_mic[name]) == 0:
            continue
        path = _resolve(name, star.parent)
        if not os.path.exists(path):
            if args.skip_missing:
                warnings.append(f"micrograph {name} not found ({len(per_mic[name])} particles skipped)")
                continue
            raise InputError(f"{name}: micrograph file not found (listed in {args.i}; --skip_missing to skip it)")
        group = int(row["rlnOpticsGroup"]) if "rlnOpticsGroup" in row.index else 1
        header = read_header(path)       # a few hundred bytes: shape for the outside check, pixel size to compare
        angpix, differ = _mic_angpix(mic_optics, group, path, header.angpix, args.i)
        if differ:
            n_apix_differ += 1
            apix_warning = apix_warning or differ
        stack = (out / _pipeline_post(name)).with_suffix(".mrcs").as_posix()
        require(stack not in stacks, f"{args.i}: micrographs {stacks.get(stack)} and {name} map to one stack {stack}")
        stacks[stack] = name
        rows = per_mic[name].reset_index(drop=True)
        jobs.append(MicJob(index=int(index), name=name, path=path, stack=stack, angpix=angpix,
                           coord_x=rows["rlnCoordinateX"].to_numpy(float), coord_y=rows["rlnCoordinateY"].to_numpy(float),
                           rows=rows, source=sources.get(name, ""), shape=tuple(header.shape[-2:]),
                           source_rows=per_mic[name].index.to_numpy() + 1))
    if apix_warning:   # once per run: one cause (a wrong header or STAR value) usually affects every micrograph
        more = n_apix_differ - 1
        warnings.append(apix_warning + (f" ({more} more micrograph{'s' if more > 1 else ''} likewise)" if more else ""))
    if part_optics is not None:
        jobs = [_reextract_rows(job, part_optics, args) for job in jobs]
    _check_boxes_overlap(jobs, args.extract_size)     # after --recenter, which moves the boxes
    if part_optics is not None:
        optics = _output_optics(part_optics, jobs, args)
    else:
        optics = _output_optics(mic_optics, jobs, args)
    return jobs, optics, mode, warnings


def _part_angpix(optics: pd.DataFrame, groups: np.ndarray, path: str) -> np.ndarray:
    """Per-particle image pixel size (A) from the particles' optics table."""
    require("rlnImagePixelSize" in optics, f"{path}: optics table has no rlnImagePixelSize")
    lut = dict(zip(optics["rlnOpticsGroup"].astype(int), optics["rlnImagePixelSize"].astype(float)))
    missing = sorted(set(groups.tolist()) - set(lut))
    require(not missing, f"{path}: particles in optics group {missing[:1]} missing from data_optics")
    return np.array([lut[g] for g in groups], dtype=np.float64)


def _reextract_rows(job: MicJob, part_optics: pd.DataFrame, args: argparse.Namespace) -> MicJob:
    """Apply --recenter / --reset_offsets to one micrograph's refined particles."""
    rows = job.rows.copy()
    n = len(rows)
    if args.reset_offsets:
        rows["rlnOriginXAngst"] = 0.0
        rows["rlnOriginYAngst"] = 0.0
    elif args.recenter:
        # zeros only stand in for unused angles (no --recenter_x/y/z point): _plan requires the columns read
        get = lambda label: rows[label].to_numpy(float) if label in rows else np.zeros(n)  # noqa: E731
        p_part = _part_angpix(part_optics, rows["rlnOpticsGroup"].to_numpy(int), args.reextract_data_star)
        r = recenter(rows["rlnCoordinateX"].to_numpy(float), rows["rlnCoordinateY"].to_numpy(float),
                     get("rlnOriginXAngst"), get("rlnOriginYAngst"), get("rlnAngleRot"), get("rlnAngleTilt"),
                     get("rlnAnglePsi"), p_part, job.angpix,
                     center_xyz=(args.recenter_x, args.recenter_y, args.recenter_z),
                     ref_angpix=args.ref_angpix if args.ref_angpix > 0 else None)
        rows["rlnCoordinateX"], rows["rlnCoordinateY"] = r.coord_x, r.coord_y
        rows["rlnOriginXAngst"], rows["rlnOriginYAngst"] = r.origin_x_A, r.origin_y_A
    job.rows = rows
    job.coord_x = rows["rlnCoordinateX"].to_numpy(float)
    job.coord_y = rows["rlnCoordinateY"].to_numpy(float)
    return job


def _output_optics(base: pd.DataFrame | None, jobs: list[MicJob], args: argparse.Namespace) -> pd.DataFrame:
    """Optics of the extracted particles: image pixel size and box after rescaling, per group."""
    scale = args.scale if args.scale > 0 else None
    size = scale or args.extract_size
    angpix_of: dict[int, float] = {}
    mic_apix_of: dict[int, float] = {}
    for job in jobs:
        for g in np.unique(job.rows["rlnOpticsGroup"].to_numpy(int)):
            a = output_angpix(job.angpix, args.extract_size, scale)
            if g in angpix_of:
                require(abs(angpix_of[g] - a) < 1e-6 * a,
                        f"{args.i}: optics group {g} has micrographs of different pixel sizes")
            angpix_of[int(g)] = a
            mic_apix_of[int(g)] = job.angpix
    if base is None:
        base = pd.DataFrame({"rlnOpticsGroupName": [f"opticsGroup{g}" for g in sorted(angpix_of)],
                             "rlnOpticsGroup": sorted(angpix_of)})
    optics = base.copy()
    optics = optics.drop(columns=[c for c in _MIC_ONLY_OPTICS if c in optics])
    groups = optics["rlnOpticsGroup"].astype(int)
    undefined = sorted(set(angpix_of) - set(groups.tolist()))
    require(not undefined, f"{args.reextract_data_star or args.i}: optics group {undefined[:1]} is not in data_optics")
    optics = optics[groups.isin(angpix_of)].reset_index(drop=True)
    groups = optics["rlnOpticsGroup"].astype(int)
    if "rlnMicrographOriginalPixelSize" not in optics:
        optics["rlnMicrographOriginalPixelSize"] = [mic_apix_of[g] for g in groups]
    optics["rlnImagePixelSize"] = [angpix_of[g] for g in groups]
    optics["rlnImageSize"] = size
    optics["rlnImageDimensionality"] = 2
    optics["rlnCtfDataAreCtfPremultiplied"] = 0
    return optics


# ---------------------------------------------------------------------------------------------
# work


def _finished(job: MicJob, params: ExtractParams) -> MicResult | None:
    """--only_do_unfinished: the result of a micrograph whose stack is already complete, else None."""
    if not os.path.isfile(job.stack):
        return None
    try:
        shape = read_header(job.path).shape[-2:]
        have = read_header(job.stack).shape
    except InputError:
        return None
    keep = crop_keep(job.coord_x, job.coord_y, params, shape)
    n = have[0] if len(have) == 3 else 1
    if n != int(keep.sum()) or have[-1] != params.out_size:
        return None
    edge = crosses_edge(job.coord_x, job.coord_y, params.extract_size, shape)
    return MicResult(index=job.index, keep=keep, n_edge=int(edge.sum()))


class _NothingLeft(Exception):
    """Every particle of a micrograph was skipped: its (empty) stack is not written."""


def _extract_one(job: MicJob, params: ExtractParams, float16: bool, reuse: bool = False,
                 skip_nonfinite: bool = False) -> MicResult:
    """A micrograph's stack; a micrograph whose every particle is skipped writes none."""
    try:
        return _extract_boxes(job, params, float16, reuse, skip_nonfinite)
    except _NothingLeft:
        return MicResult(index=job.index, keep=np.zeros(len(job.coord_x), bool), n_edge=0,
                         n_nonfinite=len(job.coord_x))


def _extract_boxes(job: MicJob, params: ExtractParams, float16: bool, reuse: bool,
                   skip_nonfinite: bool) -> MicResult:
    """Worker: read one micrograph, box, process and stream its stack to disk; only that micrograph is held."""
    if reuse:
        done = _finished(job, params)
        if done is not None:
            return done
    mic = _read_micrograph(job.path)
    require(params.extract_size <= min(mic.shape), f"{job.path}: --extract_size {params.extract_size} px is larger "
                                                   f"than the micrograph ({mic.shape[-1]} x {mic.shape[-2]} px)")
    edge = crosses_edge(job.coord_x, job.coord_y, params.extract_size, mic.shape)
    keep = crop_keep(job.coord_x, job.coord_y, params, mic.shape)
    n_bad = 0
    if keep.any():
        angpix = output_angpix(job.angpix, params.extract_size, params.scale)
        rows = np.nonzero(keep)[0]
        chunk = 256
        with StackWriter(job.stack, angpix, float16=float16) as stack:
            for k, images in enumerate(iter_particles(mic, job.coord_x[keep], job.coord_y[keep], params, chunk,
                                                      stream=job.index)):
                ok = np.isfinite(images.reshape(len(images), -1)).all(axis=1)
                if not ok.all():
                    bad = rows[k * chunk:k * chunk + len(images)][~ok]
                    if not skip_nonfinite:
                        r = int(bad[0])
                        raise InputError(f"{job.path}: NaN or infinite pixels in the box of particle {r + 1} of this "
                                         f"micrograph (x {job.coord_x[r]:g}, y {job.coord_y[r]:g}); "
                                         f"--skip_nonfinite to skip such particles")
                    keep[bad] = False
                    n_bad += len(bad)
                    images = images[ok]
                if len(images):
                    stack.write(images)
            if not keep.any():
                raise _NothingLeft()
    return MicResult(index=job.index, keep=keep, n_edge=int(edge.sum()), n_nonfinite=n_bad)


def _light(job: MicJob) -> MicJob:
    """The job without its metadata rows (what a worker process needs)."""
    return MicJob(job.index, job.name, job.path, job.stack, job.angpix, job.coord_x, job.coord_y, pd.DataFrame())


def _progress(total: int, enabled: bool):
    """A rich progress bar on stderr (a no-op context when disabled)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    return Progress(TextColumn("extract"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), disable=not enabled, transient=False)


def compatibility_notes(args: argparse.Namespace) -> list[str]:
    """One line per relion_preprocess option that is accepted but has no effect here."""
    notes = []
    for opt in ("white_dust", "black_dust"):
        if getattr(args, opt) > 0 and not args.norm:    # RELION removes dust inside its normalisation only
            notes.append(f"--{opt} {getattr(args, opt):g}: dust is removed only with --norm; ignored")
    return notes


def _validate(args: argparse.Namespace) -> ExtractParams:
    """Option checks; every mistake is an InputError naming the option."""
    require(bool(args.o), "--o (or --part_dir): the output folder is required")
    if args.part_star:
        check_output_file(args.part_star, "--part_star")
    sources = [bool(args.coord_suffix), bool(args.coord_list), bool(args.reextract_data_star)]
    require(sum(sources) == 1, "--coord_suffix / --coord_list / --reextract_data_star: give exactly one")
    require(args.extract_size > 0 and args.extract_size % 2 == 0,
            f"--extract_size: must be a positive even number of pixels (got {args.extract_size})")
    if args.scale != -1:
        require(args.scale > 0, f"--scale: must be a positive number of pixels (got {args.scale})")
        if args.scale % 2:      # as relion_preprocess: rounded up, with a warning
            print(f"cryorefine extract: warning: only even-sized images are made; --scale {args.scale} -> "
                  f"{args.scale + 1}", file=sys.stderr)
            args.scale += 1
    require(not (args.recenter and args.reset_offsets), "--recenter / --reset_offsets: give at most one")
    for opt in ("white_dust", "black_dust"):
        require(bool(np.isfinite(getattr(args, opt))), f"--{opt}: must be a number (got {getattr(args, opt):g})")
    for axis in "xyz":   # RELION's GUI writes the point only with --recenter; alone it would be silently unused
        value = getattr(args, f"recenter_{axis}")
        require(np.isfinite(value), f"--recenter_{axis}: must be a finite number (got {value:g})")
        require(args.recenter or value == 0, f"--recenter_{axis} needs --recenter")
    require(not ((args.recenter or args.reset_offsets) and not args.reextract_data_star),
            "--recenter / --reset_offsets: only with --reextract_data_star")
    require(args.j >= 1, f"--j: must be at least 1 (got {args.j})")
    params = ExtractParams(extract_size=args.extract_size, scale=args.scale if args.scale > 0 else None,
                           norm=args.norm, bg_radius=args.bg_radius if args.bg_radius > 0 else None,
                           ramp=not args.no_ramp, invert_contrast=args.invert_contrast, skip_outside=args.skip_outside,
                           white_dust=args.white_dust, black_dust=args.black_dust)
    if args.norm:
        require(2 * params.out_bg_radius <= params.out_size and params.out_bg_radius > 0,
                f"--bg_radius: {params.out_bg_radius} px does not fit a {params.out_size} px box (2*radius > box)")
    return params


def _new_dirs(paths: list[Path]) -> list[Path]:
    """Folders (and their missing parents) that do not exist yet, deepest first."""
    todo: set[Path] = set()
    for p in paths:
        d = p
        while not d.exists() and d != d.parent:
            todo.add(d)
            d = d.parent
    return sorted(todo, key=lambda d: len(d.parts), reverse=True)


def _remove_outputs(stacks: list[str], dirs: list[Path]) -> None:
    """Undo a failed extraction: this run's stacks and the folders it made (if empty)."""
    for st in stacks:
        Path(st).unlink(missing_ok=True)
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            pass


def _check_outputs(args: argparse.Namespace, jobs: list[MicJob], star_out: Path) -> None:
    """Output folder writable; no stack or STAR written over an input (STARs, micrographs, earlier stacks)."""
    from cryorefine.validate import check_not_inputs, check_output_folder
    check_output_folder(Path(args.o))
    check_output_folder(star_out.parent)
    inputs = [args.i, args.reextract_data_star, args.coord_list, *getattr(args, "_input_files", []),
              *(job.path for job in jobs)]
    check_not_inputs([star_out, *(job.stack for job in jobs)], inputs, what="--o/--part_dir/--part_star")


def run(args: argparse.Namespace) -> int:
    """Plan from the STAR files, extract micrograph by micrograph (in --j processes), write particles.star."""
    params = _validate(args)
    jobs, optics, mode, warnings = _plan(args)
    out = Path(args.o)
    star_out = Path(args.part_star) if args.part_star else out / "particles.star"
    _check_outputs(args, jobs, star_out)
    from cryorefine.parallel.mpi import get_reducer
    reducer = get_reducer()     # relion_preprocess_mpi: the micrographs are shared out over the ranks
    if reducer.is_leader:
        for note in compatibility_notes(args):
            print(f"cryorefine extract: note: {note}")
        for w in warnings:
            print(f"cryorefine extract: warning: {w}", file=sys.stderr)
    require(bool(jobs), f"{args.i}: no particles to extract")
    new_dirs = _new_dirs([out, star_out.parent, *(Path(job.stack).parent for job in jobs)])
    new_stacks = [job.stack for job in jobs if not os.path.exists(job.stack)]
    try:
        return _extract_all(args, params, jobs, optics, mode, star_out, reducer)
    except BaseException:
        _remove_outputs(new_stacks, new_dirs)
        raise


def _extract_all(args: argparse.Namespace, params: ExtractParams, jobs: list[MicJob], optics: pd.DataFrame,
                 mode: str, star_out: Path, reducer) -> int:
    """The work: this process's share of the micrographs' stacks (every size-th), then particles.star (written
    last, by the leader, from every process's results)."""
    Path(args.o).mkdir(parents=True, exist_ok=True)
    mine = jobs[reducer.rank::reducer.size]
    try:
        results = _extract_jobs(args, params, mine, show=not args.no_progress and reducer.is_leader)
        error = None
    except InputError as exc:   # one rank's micrograph: every rank must learn it, or the others wait forever
        if reducer.size == 1:
            raise
        results, error = {}, str(exc)
    gathered = reducer.allgather((results, error))
    errors = [e for _, e in gathered if e]
    if errors:
        raise InputError(errors[0])
    results = {k: v for part, _ in gathered for k, v in part.items()}
    if not reducer.is_leader:
        return 0

    tables = []
    n_edge = n_skipped = n_nonfinite = 0
    for job in jobs:   # micrograph order of the input, particles in file order within each
        res = results[job.index]
        rows = job.rows[res.keep].reset_index(drop=True)
        n_edge += res.n_edge
        n_nonfinite += res.n_nonfinite
        n_skipped += int((~res.keep).sum()) - res.n_nonfinite
        if len(rows) == 0:
            continue
        rows = rows.drop(columns=["rlnImageName"], errors="ignore")
        rows.insert(0, "rlnImageName", [f"{k + 1:06d}@{job.stack}" for k in range(len(rows))])
        tables.append(rows)
    require(bool(tables), f"{args.i}: no particle was extracted (all skipped)")
    particles = pd.concat(tables, ignore_index=True)
    if args.pick_star:
        _write_pick_star(Path(args.pick_star), tables)
    write_particles(star_out, ParticleTable(optics=optics, particles=particles, path=star_out, version="30001"))
    size = params.out_size
    apix = ", ".join(f"{a:.4f}" for a in optics["rlnImagePixelSize"])
    print(f"cryorefine extract: {mode}: {len(particles)} particles from {len(jobs)} micrographs -> {star_out} "
          f"(box {size} px, {apix} A/px{', float16' if args.float16 else ''})")
    filled = 0 if args.skip_outside else n_edge
    print(f"cryorefine extract: boxes crossing the micrograph edge: {filled} filled by edge replication, "
          f"{n_skipped} skipped (--skip_outside)")
    if n_nonfinite:
        print(f"cryorefine extract: {n_nonfinite} particles skipped: NaN or infinite pixels in their box "
              f"(--skip_nonfinite)")
    return 0


def coordinate_file_of(stack: str) -> str:
    """relion_preprocess's per-micrograph STAR file beside its stack: <root>.mrcs -> <root>_extract.star."""
    return str(PurePosixPath(stack).with_suffix("")) + "_extract.star"


def _write_pick_star(pick_star: Path, tables: list[pd.DataFrame]) -> None:
    """--pick_star (the GUI's re-extraction output node): each micrograph's particles as RELION's <root>_extract.star
    (one data_images table, which later Extract jobs read as coordinates) and the list of them, data_coordinate_files
    (rlnMicrographName -> rlnMicrographCoordinates)."""
    mics, files = [], []
    for rows in tables:
        coords = coordinate_file_of(rows["rlnImageName"].iloc[0].split("@", 1)[1])
        write_star(coords, {"images": rows})
        mics.append(rows["rlnMicrographName"].iloc[0] if "rlnMicrographName" in rows else coords)
        files.append(coords)
    write_star(pick_star, {"coordinate_files": pd.DataFrame({"rlnMicrographName": mics,
                                                              "rlnMicrographCoordinates": files})})


def _extract_jobs(args: argparse.Namespace, params: ExtractParams, jobs: list[MicJob],
                  show: bool) -> dict[int, MicResult]:
    """Each micrograph's stack (in --j worker processes), with a progress bar if `show`; results by job index."""
    results: dict[int, MicResult] = {}
    with _progress(len(jobs), show) as bar:
        task = bar.add_task("extract", total=len(jobs))
        if args.j == 1:
            for job in jobs:
                results[job.index] = _extract_one(job, params, args.float16, args.only_do_unfinished,
                                                  args.skip_nonfinite)
                bar.advance(task)
        else:
            with ProcessPoolExecutor(max_workers=args.j) as pool:
                futures = [pool.submit(_extract_one, _light(job), params, args.float16, args.only_do_unfinished,
                                       args.skip_nonfinite) for job in jobs]
                try:
                    for fut in as_completed(futures):
                        res = fut.result()
                        results[res.index] = res
                        bar.advance(task)
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)   # one bad micrograph stops the job
                    raise
    return results
