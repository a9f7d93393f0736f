"""Input and output checks made before any work starts: one place, one line per problem (InputError, exit 2).

Every message names the file, the table and row (or optics group) and the label, e.g.
``particles.star: data_particles row 12 (000012@Extract/mic1.mrcs): rlnDefocusU = nan, must be a finite
number > 0``. Outputs are checked too: the output folder must be creatable and writable, and no output
may be an input (the same file, or a stack an input STAR names).
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from cryorefine.errors import InputError, require


@dataclass(frozen=True)
class Rule:
    """A numeric label's allowed values: finite always; plus an optional test and its wording."""

    test: Callable[[NDArray], NDArray] | None = None
    wording: str = "a finite number"


def _finite() -> Rule:
    return Rule()


def _positive() -> Rule:
    return Rule(lambda v: v > 0, "a finite number > 0")


# optics-table labels (one value per optics group)
OPTICS_RULES: dict[str, Rule] = {
    "rlnVoltage": Rule(lambda v: (v > 0) & (v <= 3000), "a finite voltage in kV, > 0 and <= 3000"),
    "rlnSphericalAberration": Rule(lambda v: np.abs(v) <= 100, "a finite Cs in mm, between -100 and 100"),
    "rlnAmplitudeContrast": Rule(lambda v: (v >= 0) & (v < 1), "a finite fraction, >= 0 and < 1"),
    "rlnImagePixelSize": _positive(),
    "rlnMicrographPixelSize": _positive(),
    "rlnMicrographOriginalPixelSize": _positive(),
    "rlnImageSize": Rule(lambda v: (v > 0) & (v == np.round(v)), "a positive whole number of pixels"),
    "rlnOpticsGroup": Rule(lambda v: v == np.round(v), "a whole number"),
}

# particle-table labels (one value per particle)
CTF_RULES: dict[str, Rule] = {
    "rlnDefocusU": _positive(), "rlnDefocusV": _positive(), "rlnDefocusAngle": _finite(),
    "rlnPhaseShift": _finite(),
    # the CTF envelope exp(-B s²/4): above 1000 Å² it is 0 beyond 6 Å (a map of noise); negative values have a
    # floor that depends on the pixel size (ctf_bfactor_floor, checked with it)
    "rlnCtfBfactor": Rule(lambda v: v <= 1000, "a finite B-factor in Å², at most 1000"),
    # the CTF is multiplied by it: 0 or a negative scale leaves no signal or inverts it
    "rlnCtfScalefactor": _positive(),
}
POSE_RULES: dict[str, Rule] = {
    "rlnAngleRot": _finite(), "rlnAngleTilt": _finite(), "rlnAnglePsi": _finite(),
    "rlnOriginXAngst": _finite(), "rlnOriginYAngst": _finite(), "rlnOriginX": _finite(), "rlnOriginY": _finite(),
    "rlnNormCorrection": _finite(),
}
# only the columns a job reads are checked: text RELION would read as 0 in a column nothing here uses (a
# figure of merit, coordinates in refine) must not stop a job (--fom_weighting checks its own column)
PARTICLE_RULES: dict[str, Rule] = {
    **CTF_RULES, **POSE_RULES,
    # 0 everywhere = not assigned yet (refine splits at random, as RELION); what refine accepts is checked by
    # check_half_sets, and reconstruct reads the column only for --subset 1/2 (RELION)
    "rlnRandomSubset": Rule(lambda v: v == np.round(v), "a whole number"),
    "rlnClassNumber": Rule(lambda v: v == np.round(v), "a whole number"),
    "rlnOpticsGroup": Rule(lambda v: v == np.round(v), "a whole number"),
}
COORDINATE_RULES: dict[str, Rule] = {"rlnCoordinateX": _finite(), "rlnCoordinateY": _finite()}


def row_name(df: pd.DataFrame, row: int) -> str:
    """How a row is named in messages: its image (or micrograph) name when the table has one."""
    for label in ("rlnImageName", "rlnMicrographName", "rlnOpticsGroupName"):
        if label in df.columns:
            return f" ({df[label].iloc[row]})"
    return ""


def numeric_values(df: pd.DataFrame, label: str, where: str) -> NDArray[np.float64]:
    """A column as float64; InputError naming the first row that holds text instead of a number."""
    s = df[label]
    if pd.api.types.is_numeric_dtype(s.dtype) and not pd.api.types.is_bool_dtype(s.dtype):
        return s.to_numpy(dtype=np.float64)
    v = pd.to_numeric(s, errors="coerce").to_numpy(dtype=np.float64)
    text = np.isnan(v) & ~s.astype(str).str.strip().str.lower().isin(["nan", "+nan", "-nan"]).to_numpy()
    if text.any():
        r = int(np.argmax(text))
        raise InputError(f"{where} row {r + 1}{row_name(df, r)}: {label} = {s.iloc[r]!r} is not a number")
    return v


def bad_rows(df: pd.DataFrame, rules: dict[str, Rule], where: str) -> dict[str, NDArray[np.bool_]]:
    """Per checked label: which rows break its rule (numbers are required; text is an InputError at once)."""
    out = {}
    for label, rule in rules.items():
        if label not in df.columns or len(df) == 0:
            continue
        v = numeric_values(df, label, where)
        with np.errstate(invalid="ignore"):
            ok = np.isfinite(v) & (rule.test(v) if rule.test is not None else True)
        if not ok.all():
            out[label] = ~ok
    return out


def check_table(df: pd.DataFrame, rules: dict[str, Rule], where: str, unit: str = "row") -> None:
    """InputError naming the first row (or optics group) and label whose value breaks its rule."""
    for label, bad in bad_rows(df, rules, where).items():
        r = int(np.argmax(bad))
        rule = rules[label]
        who = (f"optics group {df['rlnOpticsGroup'].iloc[r]}" if unit == "optics group" and "rlnOpticsGroup" in df
               else f"row {r + 1}{row_name(df, r)}")
        raise InputError(f"{where} {who}: {label} = {df[label].iloc[r]} must be {rule.wording}"
                         + (f" ({int(bad.sum())} rows)" if bad.sum() > 1 else ""))


def particle_rules(need_ctf: bool) -> dict[str, Rule]:
    """The per-particle rules that apply (CTF values only checked when the CTF is used)."""
    rules = dict(PARTICLE_RULES)
    if not need_ctf:
        for label in CTF_RULES:
            rules.pop(label)
    return rules


def droppable_particles(table, need_ctf: bool) -> tuple[NDArray[np.bool_], str]:
    """Rows with impossible per-particle values (NaN defocus, infinite origin, ...) and a summary by label;
    text in a numeric column is still an InputError (a broken file, not a few bad particles)."""
    bad = bad_rows(table.particles, particle_rules(need_ctf), f"{table.path}: data_particles")
    drop = np.zeros(len(table.particles), bool)
    for mask in bad.values():
        drop |= mask
    return drop, ", ".join(f"{label}: {int(m.sum())}" for label, m in bad.items())


def check_particle_table(table, need_ctf: bool, need_poses: bool = False, even_box: bool = False,
                         allow_bad_particles: bool = False) -> None:
    """Optics and particle values of a ParticleTable: numbers, finite, physically possible.

    allow_bad_particles: per-particle values are only checked to be numbers (the caller drops bad rows)."""
    path = table.path
    check_table(table.optics, OPTICS_RULES, f"{path}: data_optics", unit="optics group")
    if allow_bad_particles:
        droppable_particles(table, need_ctf)
    else:
        check_table(table.particles, particle_rules(need_ctf), f"{path}: data_particles")
    if need_ctf:
        for label in ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"):
            require(label in table.optics.columns or label in table.particles.columns,
                    f"{path}: data_optics has no {label} column (needed for CTF correction)")
        from cryorefine.fourier.ctf import CTF_REQUIRED_COLUMNS
        missing = [c for c in CTF_REQUIRED_COLUMNS if c not in table.particles.columns]
        require(not missing, f"{path}: CTF correction needs column(s) {', '.join(missing)}")
        if "rlnCtfBfactor" in table.particles.columns and not allow_bad_particles:
            _check_ctf_bfactor_floor(table)
    if need_poses:
        missing = [c for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi") if c not in table.particles.columns]
        require(not missing, f"{path}: no {', '.join(missing)} column (the poses are needed)")
    if not allow_bad_particles:
        _check_origins_within_box(table)
    if even_box and "rlnImageSize" in table.optics.columns:
        sizes = numeric_values(table.optics, "rlnImageSize", f"{path}: data_optics")
        odd = np.nonzero(sizes % 2 != 0)[0]
        require(odd.size == 0, f"{path}: data_optics optics group "
                               f"{table.optics['rlnOpticsGroup'].iloc[odd[0]] if odd.size else ''}: rlnImageSize "
                               f"{sizes[odd[0]] if odd.size else 0:g} is odd; an even box is needed")


def ctf_bfactor_floor(angpix: NDArray) -> NDArray:
    """The most negative CTF B-factor (Å²) for pixel size `angpix` (Å): exp(-B s²/4) at Nyquist (s = 1/2p) stays
    below e^20, so CTF² stays finite in float32 (below it, the map is NaN or noise amplified 10^9-fold and more)."""
    return -320.0 * np.asarray(angpix, dtype=np.float64) ** 2


def _check_ctf_bfactor_floor(table) -> None:
    """InputError naming the first particle whose rlnCtfBfactor is below its pixel size's floor."""
    from cryorefine.io.star import particle_optics
    b = numeric_values(table.particles, "rlnCtfBfactor", f"{table.path}: data_particles")
    floor = ctf_bfactor_floor(particle_optics(table, "rlnImagePixelSize"))
    low = np.nonzero(b < floor)[0]
    if low.size:
        r = int(low[0])
        raise InputError(f"{table.path}: data_particles row {r + 1}{row_name(table.particles, r)}: rlnCtfBfactor = "
                         f"{b[r]:g} must be at least {floor[r]:g} Å² at {np.sqrt(floor[r] / -320.0):g} Å/px (-320·p²: "
                         f"the CTF envelope would amplify Nyquist more than e^20-fold)"
                         + (f" ({low.size} rows)" if low.size > 1 else ""))


def _check_origins_within_box(table) -> None:
    """InputError naming the first particle whose origin (Å) moves its centre more than a whole box: the shift of
    an image is periodic, so such an origin puts the particle somewhere else than it says (a value such as 1e9 from
    a broken converter)."""
    from cryorefine.io.star import particle_optics
    if "rlnImageSize" not in table.optics.columns and "rlnImageSize" not in table.particles.columns:
        return          # a RELION 3.0 file without sizes: the box is known only from the stacks
    width = particle_optics(table, "rlnImageSize").astype(np.float64) * \
        particle_optics(table, "rlnImagePixelSize").astype(np.float64)
    for label in ("rlnOriginXAngst", "rlnOriginYAngst"):
        if label not in table.particles.columns:
            continue
        v = numeric_values(table.particles, label, f"{table.path}: data_particles")
        far = np.nonzero(np.abs(v) > width)[0]
        if far.size:
            r = int(far[0])
            raise InputError(f"{table.path}: data_particles row {r + 1}{row_name(table.particles, r)}: {label} = "
                             f"{v[r]:g} must be within the image (|origin| <= box x pixel size = {width[r]:g} Å)"
                             + (f" ({far.size} rows)" if far.size > 1 else ""))


def check_half_sets(subset: NDArray, path: str | Path) -> None:
    """Gold-standard refinement from a file's rlnRandomSubset: all 0 (the halves are drawn at random), or all 1 or
    2 with both half-sets holding particles (RELION's divideParticlesInRandomHalves)."""
    subset = np.asarray(subset)
    require(subset.size >= 2, f"{path}: {subset.size} particle(s); a gold-standard refinement needs at least 2")
    if not np.any(subset != 0):
        return
    require(bool(np.all(subset != 0)), f"{path}: rlnRandomSubset is 0 for {int(np.sum(subset == 0))} of "
                                       f"{subset.size} particles and not for the others: all 0 (the halves drawn "
                                       f"at random) or all 1 or 2")
    wrong = np.nonzero((subset != 1) & (subset != 2))[0]
    require(wrong.size == 0, f"{path}: rlnRandomSubset = {subset[wrong[0]] if wrong.size else 0:g} in particle "
                             f"{wrong[0] + 1 if wrong.size else 0} ({wrong.size} particles): must be 1 or 2 (or 0 "
                             f"for all, to draw the halves at random)")
    for h in (1, 2):
        require(bool(np.any(subset == h)), f"{path}: half-set {h} has no particles (rlnRandomSubset); both "
                                           f"half-sets need particles (with very few particles give "
                                           f"rlnRandomSubset 1 and 2 in the file, or another --random_seed)")


def check_map_values(data: NDArray, path: str | Path) -> None:
    """A map or image must hold only finite values."""
    if not np.isfinite(data).all():
        flat = np.argmax(~np.isfinite(np.asarray(data)).ravel())
        raise InputError(f"{path}: NaN or infinite value at voxel {np.unravel_index(flat, np.shape(data))[::-1]} "
                         f"(x, y, z)")


# ---------------------------------------------------------------------------------------------------- outputs


def check_output_folder(folder: str | Path) -> None:
    """The output folder exists or can be made, and is writable; InputError otherwise (nothing is created)."""
    d = Path(folder) if str(folder) else Path(".")
    p = d
    while not p.exists():
        if p.parent == p:
            break
        p = p.parent
    require(p.is_dir(), f"{d}: cannot make the output folder: {p} is a file, not a folder")
    require(os.access(p, os.W_OK | os.X_OK), f"{d}: output folder not writable ({p} is read-only)")
    try:        # access() says yes to root everywhere, also where no file can be made (/proc, a full or read-only disk)
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as exc:
        raise InputError(f"{d}: output folder not writable (cannot make a file in {p}: {exc.strerror})") from None


def check_output_file(name: str, option: str = "--o", kind: str = "file") -> None:
    """InputError when an output file name is empty, ends in a path separator, '.' or '..' (a folder meant) or names
    a folder: `--o newdir/` would otherwise write a file called newdir, and a folder fails only at the very end."""
    require(bool(str(name).strip()), f"{option}: empty output file name")
    require(os.path.basename(str(name)) not in ("", ".", ".."),
            f"{option} {name}: names a folder, not a {kind}; give a file name such as {Path(name) / 'out.mrc'}")
    require(not Path(name).is_dir(), f"{option} {name}: is a folder, not a {kind}")


def _key(path: str | Path) -> str:
    """A path as compared for overwriting: resolved, without ./ and symlinks."""
    return os.path.realpath(os.path.abspath(str(path)))


def stacks_named_by(table) -> list[Path]:
    """The image files a particle table names (resolved as the readers resolve them)."""
    from cryorefine.io.star import resolve_image_path
    names = table.particles["rlnImageName"].astype(str)
    files = pd.unique(names.str.split("@", n=1).str[-1])
    return [resolve_image_path(f, table.directory) for f in files]


def check_fits_in_memory(nbytes: float, what: str) -> None:
    """InputError when `nbytes` (the arrays a job must hold at once) exceed the memory the machine has available
    (an absurd box would otherwise end as a MemoryError after minutes, or take the machine down)."""
    from cryorefine.refine.memory import available_bytes
    avail = available_bytes()
    if avail is not None and nbytes > avail:
        raise InputError(f"{what} would need {nbytes / 2 ** 30:.3g} GiB, more than the {avail / 2 ** 30:.3g} GiB "
                         f"available")


def same_pixel_size(a: float, b: float) -> bool:
    """Header pixel sizes agree within 0.1 % (0, not set in a header, counts as agreeing)."""
    return a <= 0 or b <= 0 or abs(a - b) <= 1e-3 * max(a, b)


def same_file(a: str | Path, b: str | Path) -> bool:
    """Two names of one file: the same resolved path, or the same file through a link."""
    if _key(a) == _key(b):
        return True
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


def check_not_inputs(outputs: Iterable[str | Path], inputs: Iterable[str | Path], what: str = "--o") -> None:
    """No output path may be an input file (same resolved path, or the same file through a link)."""
    ins = {}
    for p in inputs:
        if p is None or str(p) == "":
            continue
        ins[_key(p)] = str(p)
    for out in outputs:
        k = _key(out)
        if k in ins:
            raise InputError(f"{what}: the output {out} would overwrite the input {ins[k]}; choose another output name")
        for kin, name in ins.items():
            if same_file(out, kin):
                raise InputError(f"{what}: the output {out} would overwrite the input {name} (the same file)")


_REFINE_OUTPUT = re.compile(r"^(?:_it(\d{3}))?(?:_half[12])?(?:_class001(?:_unfil|_angdist)?)?"
                            r"(?:_data\.star|_model\.star|_optimiser\.star|_sampling\.star|\.mrc|\.bild)$")


def refine_output_clash(root: str, inputs: Iterable[str | Path], first_iteration: int) -> str | None:
    """The first input a refinement writing `root`* from `first_iteration` on would overwrite, or None."""
    root_dir, root_name = os.path.split(_key(root))
    for p in inputs:
        if p is None or str(p) == "":
            continue
        d, name = os.path.split(_key(p))
        if d != root_dir or not name.startswith(root_name):
            continue
        rest = name[len(root_name):]
        if rest == ".out":
            return str(p)
        m = _REFINE_OUTPUT.match(rest)
        if m and (m.group(1) is None or int(m.group(1)) >= first_iteration):
            return str(p)
    return None


def created_since(before: set[str], folder: Path, prefix: str) -> list[Path]:
    """Files in `folder` whose name starts with `prefix` that were not there before (a run's own outputs)."""
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if p.name.startswith(prefix) and str(p) not in before and p.is_file()]


def existing(folder: Path, prefix: str) -> set[str]:
    """Files in `folder` whose name starts with `prefix` now."""
    if not folder.is_dir():
        return set()
    return {str(p) for p in folder.iterdir() if p.name.startswith(prefix)}
