"""`--continue`: read back the state written by an iteration (run_itNNN_*.star, half maps); refine.setup
builds the run from it.

The files of iteration N are found next to the given `run_itNNN_optimiser.star` (same root), or, when moved,
under the names the optimiser file records. Values come back with the precision of the STAR text (RELION's
"%.6f" / "%.6e"); resolutions, which are always r/(N·p) for an integer shell r, are restored exactly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from cryorefine.errors import InputError, require
from cryorefine.fourier.fsc import first_shell_below
from cryorefine.io.mrc import read_map
from cryorefine.io.star import parse_star_vector, read_particles, read_star
from cryorefine.geometry.sampling import n_directions
from cryorefine.refine.memory import EStepStats
from cryorefine.refine.mstep import fill_small
from cryorefine.refine.state import Counters, HalfModel, Poses, RefineOptions, SamplingState

OPTIMISER_SUFFIX = "_optimiser.star"
# cryorefine-only optimiser label (RELION recomputes this flag instead of storing it)
FINE_ENOUGH_LABEL = "cryorefineHasFineEnoughAngularSampling"
REFERENCE_LIMIT_LABEL = "cryorefineReferenceLimit"
FSC_NULL_SIGMA_LABEL = "cryorefineFscNullSigma"
# what the last E-step counted per particle (refine.memory.EStepStats), so a continued run plans its memory as the
# uninterrupted one would instead of for every sample significant
ESTEP_STATS_LABELS = {"blocks": "cryorefineEStepSignificantPerParticle",
                      "fine_rows": "cryorefineEStepFineRowsPerParticle",
                      "columns": "cryorefineEStepColumnsPerParticle"}


def iteration_rng(seed: int, iteration: int) -> np.random.Generator:
    """Random generator of one iteration, a function of (--random_seed, iteration) only."""
    return np.random.default_rng([int(seed) % 2 ** 63, int(iteration)])


def iteration_files(optimiser_star: str | Path) -> dict[str, Path]:
    """Paths of the iteration's files: data, sampling, model1/2 (half models), map1/2 (half maps)."""
    path = Path(optimiser_star)
    require(path.name.endswith(OPTIMISER_SUFFIX),
            f"{path}: --continue needs an _optimiser.star file (e.g. run_it005_optimiser.star)")
    root = str(path)[: -len(OPTIMISER_SUFFIX)]
    return {"data": Path(f"{root}_data.star"), "sampling": Path(f"{root}_sampling.star"),
            "model1": Path(f"{root}_half1_model.star"), "model2": Path(f"{root}_half2_model.star"),
            "map1": Path(f"{root}_half1_class001.mrc"), "map2": Path(f"{root}_half2_class001.mrc")}


# the files only the final, joined iteration writes (unnumbered), beside its run_itNNN_* ones
FINAL_SUFFIXES = ("_class001.mrc", "_half1_class001_unfil.mrc", "_half2_class001_unfil.mrc", "_data.star",
                  "_model.star", "_sampling.star", "_optimiser.star")


def continue_point(optimiser_star: str | Path, general: dict) -> tuple[Path, str | None]:
    """The optimiser file a --continue goes on from, and a log line when it is not the one given: a converged
    run's optimiser (its iteration was the final, joined one) can only be gone on from when that iteration's
    final files are incomplete (a run stopped while writing them), and then from the iteration before, which makes
    the final iteration again; InputError when there is nothing to continue."""
    path = Path(optimiser_star)
    if not _value(general, "rlnHasConverged", path, bool, default=False):
        return path, None
    it = _value(general, "rlnCurrentIteration", path, int)
    head = str(path)[: -len(OPTIMISER_SUFFIX)] if str(path).endswith(OPTIMISER_SUFFIX) else str(path)
    root = head[: -len(f"_it{it:03d}")] if head.endswith(f"_it{it:03d}") else head
    missing = [Path(root + suffix).name for suffix in FINAL_SUFFIXES if not Path(root + suffix).is_file()]
    if not missing:
        raise InputError(f"{path}: the refinement converged at iteration {it} and its final files ({root}_class001.mrc"
                         f", ...) were written; there is nothing to continue")
    previous = Path(f"{root}_it{it - 1:03d}{OPTIMISER_SUFFIX}")
    require(previous.is_file(), f"{path}: iteration {it} was the final, joined iteration and its final files are "
                                f"incomplete ({', '.join(missing)} missing), but {previous}, from which it would be "
                                f"made again, is not there")
    return previous, (f" {path.name}: iteration {it} was the final one, but its final files are incomplete "
                      f"({', '.join(missing)} missing): making it again from {previous.name}")


def _locate(sibling: Path, recorded: object, moved: bool = True) -> Path:
    """The file next to the optimiser, else (if the optimiser was moved alone) the one the optimiser names;
    InputError naming the expected file."""
    if sibling.is_file():
        return sibling
    if moved and isinstance(recorded, str) and recorded and Path(recorded).is_file():
        return Path(recorded)
    raise InputError(f"{sibling}: no such file (needed to continue)")


def _block(blocks: dict, name: str, path: Path, loop: bool):
    """Block `data_<name>` of a STAR file, checked to be a loop (DataFrame) or a list (dict)."""
    b = blocks.get(name)
    require(b is not None, f"{path}: no data_{name} block")
    require(isinstance(b, pd.DataFrame) if loop else isinstance(b, dict),
            f"{path}: data_{name} should be a {'loop' if loop else 'list of labels'}")
    return b


def _shell_vector(block: dict, label: str, path: Path) -> NDArray[np.float64]:
    """A per-shell vector value '[v0,v1,...]'; InputError naming the file and label unless it holds finite numbers."""
    out = np.array(parse_star_vector(block[label], f"{path}: _{label}"), dtype=np.float64)
    require(out.size > 0 and np.all(np.isfinite(out)), f"{path}: _{label} should hold finite numbers, got "
                                                       f"{block[label]!r}")
    return out


def _value(block: dict, label: str, path: Path, kind=float, default=None):
    """A list value converted to `kind` (int/bool from integers); InputError if absent or not a number."""
    if label not in block:
        if default is not None:
            return default
        raise InputError(f"{path}: no _{label}")
    v = block[label]
    try:
        if kind is bool:
            return bool(int(v))
        if kind is int:
            f = float(v)
            require(f == int(f), f"{path}: _{label} should be an integer, got {v!r}")
            return int(f)
        if kind is str:
            return str(v)
        out = float(v)
    except (TypeError, ValueError):
        raise InputError(f"{path}: _{label} should be a number, got {v!r}") from None
    require(np.isfinite(out), f"{path}: _{label} is not finite ({v!r})")
    return out


def _columns(df: pd.DataFrame, labels: list[str], path: Path, block: str) -> None:
    """InputError unless every label is a column of the loop."""
    missing = [lab for lab in labels if lab not in df.columns]
    require(not missing, f"{path}: data_{block} has no {', '.join(missing)} column")


def _numeric(df: pd.DataFrame, label: str, path: Path, dtype=np.float64) -> NDArray:
    """A loop column as numbers; InputError for text or non-finite values."""
    try:
        a = pd.to_numeric(df[label]).to_numpy(dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{path}: column {label} holds non-numbers") from None
    require(bool(np.all(np.isfinite(a))), f"{path}: column {label} holds non-finite values")
    return a.astype(dtype)


def _shell_grid(value: float, box: int, angpix: float) -> float:
    """A resolution (1/Å) snapped to r/(N·p) when it is one up to the STAR text precision."""
    r = round(value * box * angpix)
    return r / (box * angpix) if abs(value * box * angpix - r) < 1e-3 else value


def _image_key(name: str) -> str:
    """'000012@./Stacks/a.mrcs' -> '12@Stacks/a.mrcs' (image names compared without zero padding or './')."""
    idx, at, fname = str(name).partition("@")
    if not at:
        return os.path.normpath(idx)
    try:
        return f"{int(idx)}@{os.path.normpath(fname)}"
    except ValueError:
        return str(name)


def match_rows(reference_names: NDArray, names: NDArray, path: Path) -> NDArray[np.int64]:
    """For each particle of the run (reference_names), its row in `names`; InputError unless it is the same set."""
    require(len(names) == len(reference_names),
            f"{path}: {len(names)} particles, but --i has {len(reference_names)}: not the same particle set")
    ref = pd.Index([str(n) for n in reference_names])
    idx = pd.Index([str(n) for n in names])
    if not idx.is_unique:
        raise InputError(f"{path}: rlnImageName repeats {idx[idx.duplicated()][0]}")
    pos = idx.get_indexer(ref)
    if np.any(pos < 0):
        ref_k = pd.Index([_image_key(n) for n in reference_names])
        idx_k = pd.Index([_image_key(n) for n in names])
        require(idx_k.is_unique, f"{path}: rlnImageName repeats an image")
        pos = idx_k.get_indexer(ref_k)
        if np.any(pos < 0):
            missing = reference_names[int(np.nonzero(pos < 0)[0][0])]
            raise InputError(f"{path}: particle {missing} of --i is not in this file: not the same particle set")
    return pos.astype(np.int64)


def read_poses(path: Path, reference_names: NDArray) -> tuple[Poses, NDArray[np.int64]]:
    """(Poses, half-set 1/2) from a _data.star, in the row order of `reference_names` (matched by rlnImageName)."""
    table = read_particles(path)
    df = table.particles
    _columns(df, ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst",
                  "rlnRandomSubset"], path, "particles")
    rows = match_rows(np.asarray(reference_names), df["rlnImageName"].astype(str).to_numpy(), path)
    df = df.iloc[rows].reset_index(drop=True)

    def col(label: str, default: float, dtype=np.float64) -> NDArray:
        if label not in df.columns:
            return np.full(len(df), default, dtype=dtype)
        return _numeric(df, label, path, dtype)

    subset = col("rlnRandomSubset", 0, np.int64)
    require(bool(np.all((subset == 1) | (subset == 2))), f"{path}: rlnRandomSubset must be 1 or 2 for every particle")
    poses = Poses(rot=col("rlnAngleRot", 0.0), tilt=col("rlnAngleTilt", 0.0), psi=col("rlnAnglePsi", 0.0),
                  origin_x=col("rlnOriginXAngst", 0.0), origin_y=col("rlnOriginYAngst", 0.0),
                  norm_correction=col("rlnNormCorrection", 1.0), log_likelihood=col("rlnLogLikeliContribution", 0.0),
                  max_prob=col("rlnMaxValueProbDistribution", 0.0),
                  nr_significant=col("rlnNrOfSignificantSamples", 0, np.int64))
    return poses, subset


def _shells(df: pd.DataFrame, label: str, path: Path, nshells: int) -> NDArray[np.float64]:
    """A per-shell column of data_model_class_1 placed at rlnSpectralIndex 0..N/2 (absent shells 0)."""
    out = np.zeros(nshells)
    idx = _numeric(df, "rlnSpectralIndex", path, np.int64)
    ok = (idx >= 0) & (idx < nshells)
    out[idx[ok]] = _numeric(df, label, path)[ok]
    return out


def read_half_model(path: Path, map_path: Path, data, box: int, angpix: float,
                    iteration: int) -> tuple[HalfModel, dict, NDArray]:
    """(HalfModel, model_general, FSC) of one half: _model.star plus its half map; checked against the data."""
    blocks = read_star(path)
    gen = _block(blocks, "model_general", path, loop=False)
    size = _value(gen, "rlnOriginalImageSize", path, int)
    require(size == box, f"{path}: box {size} px, but the particles of --i have {box} px: a different run")
    pix = _value(gen, "rlnPixelSize", path)
    require(abs(pix - angpix) <= 1e-4 * angpix,
            f"{path}: pixel size {pix:g} A, but the particles of --i have {angpix:g} A: a different run")
    n_opt = _value(gen, "rlnNrOpticsGroups", path, int)
    require(n_opt == len(data.optics),
            f"{path}: {n_opt} optics group(s), but --i has {len(data.optics)}: a different particle set")

    nsh = box // 2 + 1
    cls = _block(blocks, "model_class_1", path, loop=True)
    _columns(cls, ["rlnSpectralIndex", "rlnSsnrMap", "rlnGoldStandardFsc", "rlnFourierCompleteness",
                   "rlnReferenceSigma2", "rlnReferenceTau2"], path, "model_class_1")

    sigma2 = {}
    for o, og in enumerate(data.optics):
        name = f"model_optics_group_{o + 1}"
        tab = _block(blocks, name, path, loop=True)
        _columns(tab, ["rlnSpectralIndex", "rlnSigma2Noise"], path, name)
        s = np.zeros(og.box // 2 + 1)
        idx = _numeric(tab, "rlnSpectralIndex", path, np.int64)
        ok = (idx >= 0) & (idx < len(s))
        s[idx[ok]] = _numeric(tab, "rlnSigma2Noise", path)[ok]
        sigma2[o] = fill_small(s)

    groups = _block(blocks, "model_groups", path, loop=True)
    _columns(groups, ["rlnGroupScaleCorrection"], path, "model_groups")
    require(len(groups) == len(data.group_names),
            f"{path}: {len(groups)} groups, but --i has {len(data.group_names)}: a different particle set")
    scales = _numeric(groups, "rlnGroupScaleCorrection", path)
    if "rlnGroupName" in groups.columns:
        names = groups["rlnGroupName"].astype(str).tolist()
        pos = pd.Index(names).get_indexer(data.group_names) if pd.Index(names).is_unique else np.array([-1])
        require(bool(np.all(pos >= 0)), f"{path}: the group names differ from those of --i: a different particle set")
        scales = scales[pos]

    pdf_tab = _block(blocks, "model_pdf_orient_class_1", path, loop=True)
    _columns(pdf_tab, ["rlnOrientationDistribution"], path, "model_pdf_orient_class_1")
    pdf = _numeric(pdf_tab, "rlnOrientationDistribution", path)
    require(bool(np.all(pdf >= 0)) and pdf.sum() > 0, f"{path}: rlnOrientationDistribution must be >= 0, not all 0")
    pdf = pdf / pdf.sum()

    volume, map_pix = read_map(map_path)
    require(volume.shape == (box, box, box),
            f"{map_path}: map of shape {volume.shape}, expected {box}^3 as the particles of --i: a different run")
    require(map_pix <= 0 or abs(map_pix - angpix) <= 1e-3 * angpix,
            f"{map_path}: pixel size {map_pix:g} A, but the particles of --i have {angpix:g} A: a different run")

    # iteration 0 has no reconstruction yet: no SSNR/tau2 (their absence switches off e.g. scale shells)
    stats = {lab: (_shells(cls, lab, path, nsh) if iteration > 0 else None)
             for lab in ("rlnSsnrMap", "rlnReferenceTau2", "rlnReferenceSigma2", "rlnFourierCompleteness")}
    model = HalfModel(volume=volume.astype(np.float32), sigma2=sigma2, pdf_direction=pdf,
                      sigma_offset=_value(gen, "rlnSigmaOffsetsAngst", path),
                      norm_average=_value(gen, "rlnNormCorrectionAverage", path), group_scales=scales,
                      tau2=stats["rlnReferenceTau2"], ssnr=stats["rlnSsnrMap"], sigma2_ref=stats["rlnReferenceSigma2"],
                      coverage=stats["rlnFourierCompleteness"], ave_pmax=_value(gen, "rlnAveragePmax", path),
                      log_likelihood=_value(gen, "rlnLogLikelihood", path))
    fsc = _shells(cls, "rlnGoldStandardFsc", path, nsh)
    return model, gen, fsc


def read_sampling(path: Path, model_general: dict, model_path: Path, oversampling: int, sym: str) -> SamplingState:
    """SamplingState from _sampling.star, with the local-search mode and prior width of the half-1 model."""
    gen = _block(read_star(path), "sampling_general", path, loop=False)
    file_sym = _value(gen, "rlnSymmetryGroup", path, str)
    require(file_sym.upper() == sym.upper(),
            f"{path}: symmetry {file_sym}, but --sym is {sym}: continue with the same --sym")
    order = _value(gen, "rlnHealpixOrder", path, int)
    require(0 <= order <= 13, f"{path}: _rlnHealpixOrder {order} out of range")
    return SamplingState(
        healpix_order=order, psi_step=_value(gen, "rlnPsiStep", path),
        offset_range=_value(gen, "rlnOffsetRange", path), offset_step=_value(gen, "rlnOffsetStep", path),
        oversampling=oversampling,
        local_searches=_value(model_general, "rlnOrientationalPriorMode", model_path, int) > 0,
        sigma_ang=_value(model_general, "rlnSigmaPriorRotAngle", model_path),
        perturb_factor=_value(gen, "rlnSamplingPerturbFactor", path),
        perturb=_value(gen, "rlnSamplingPerturbInstance", path),
        healpix_order_original=_value(gen, "rlnHealpixOrderOriginal", path, int),
        offset_range_original=_value(gen, "rlnOffsetRangeOriginal", path),
        offset_step_original=_value(gen, "rlnOffsetStepOriginal", path))


def read_counters(opt: dict, path: Path, model_general: dict, model_path: Path, fsc: NDArray | None,
                  box: int, angpix: float) -> Counters:
    """Counters from the optimiser list and the half-1 model (resolution, image size)."""
    v = lambda label, kind=float: _value(opt, label, path, kind)  # noqa: E731
    res_a = _value(model_general, "rlnCurrentResolution", model_path)
    require(res_a > 0, f"{model_path}: _rlnCurrentResolution must be > 0")
    return Counters(
        iteration=v("rlnCurrentIteration", int),
        current_resolution=_shell_grid(1.0 / res_a, box, angpix),
        current_size=_value(model_general, "rlnCurrentImageSize", model_path, int),
        coarse_size=0,      # recomputed at the start of every iteration
        incr_size=v("rlnIncrementImageSize", int),
        has_high_fsc_at_limit=v("rlnHasHighFscAtResolLimit", bool),
        acc_rot=v("rlnOverallAccuracyRotations"), acc_trans=v("rlnOverallAccuracyTranslationsAngst"),
        nr_iter_wo_resol_gain=v("rlnNumberOfIterWithoutResolutionGain", int),
        best_resolution=_shell_grid(v("rlnBestResolutionThusFar"), box, angpix),
        nr_iter_wo_large_changes=v("rlnNumberOfIterWithoutChangingAssignments", int),
        smallest_changes_orient=v("rlnSmallestChangesOrientations"),
        smallest_changes_offset=v("rlnSmallestChangesOffsets"),
        smallest_changes_class=v("rlnSmallestChangesClasses"),
        changes_orient=v("rlnChangesOptimalOrientations"), changes_offset=v("rlnChangesOptimalOffsets"),
        # RELION does not store this flag (it re-derives it in the next sampling update): absent = False
        has_fine_enough_angular_sampling=_value(opt, FINE_ENOUGH_LABEL, path, bool, default=False),
        has_converged=v("rlnHasConverged", bool),
        fsc=fsc,
        # absent (older files): the reference limit's threshold falls back to 1/sqrt(n) for one iteration
        fsc_null_sigma=(_shell_vector(opt, FSC_NULL_SIGMA_LABEL, path)
                        if FSC_NULL_SIGMA_LABEL in opt and fsc is not None else None),
        # absent (older files): the first shell below 0.143, what the references were then projected to
        reference_limit=_value(opt, REFERENCE_LIMIT_LABEL, path, float,
                               default=float(min(box // 2, first_shell_below(fsc, 0.143))) if fsc is not None else 0.0))


@dataclass
class Restored:
    """The state an iteration's files describe (what a run holds after that iteration)."""

    iteration: int
    seed: int
    subset: NDArray[np.int64]
    poses: Poses
    models: tuple[HalfModel, HalfModel]
    sampling: SamplingState
    counters: Counters
    estep_stats: EStepStats | None = None


def restore(optimiser_star: str, data, box: int, angpix: float, opts: RefineOptions, log) -> Restored:
    """Read iteration N's files (named by its run_itNNN_optimiser.star), checked against the particles of --i."""
    opt_path = Path(optimiser_star)
    require(opt_path.is_file(), f"{opt_path}: no such file")
    files = iteration_files(opt_path)
    opt = _block(read_star(opt_path), "optimiser_general", opt_path, loop=False)
    it = _value(opt, "rlnCurrentIteration", opt_path, int)
    require(it >= 0, f"{opt_path}: _rlnCurrentIteration must be >= 0")
    require(not _value(opt, "rlnHasConverged", opt_path, bool),
            f"{opt_path}: the refinement converged at iteration {it}: continue from the iteration before")
    recorded = {"data": opt.get("rlnExperimentalDataStarFile"), "sampling": opt.get("rlnOrientSamplingStarFile"),
                "model1": opt.get("rlnModelStarFile"), "model2": opt.get("rlnModelStarFile2")}
    moved = not any(p.is_file() for p in files.values())   # else one file missing beside the others: stop
    paths = {k: _locate(p, recorded.get(k), moved) for k, p in files.items()}

    poses, subset = read_poses(paths["data"], data.table.particles["rlnImageName"].astype(str).to_numpy())
    halves = [read_half_model(paths[f"model{h}"], paths[f"map{h}"], data, box, angpix, it) for h in (1, 2)]
    models = tuple(m for m, _, _ in halves)
    gen1, fsc = halves[0][1], halves[0][2]
    res1, res2 = (_value(g, "rlnCurrentResolution", paths[f"model{h}"]) for h, (_, g, _) in enumerate(halves, 1))
    require(abs(res1 - res2) <= 1e-5 * res1,
            f"{paths['model2']}: current resolution {res2:g} A differs from half 1's {res1:g} A: not the same run")

    oversampling = _value(opt, "rlnAdaptiveOversampleOrder", opt_path, int)
    require(oversampling == opts.oversampling,
            f"{opt_path}: oversampling {oversampling}, but this run uses --oversampling {opts.oversampling}")
    sampling = read_sampling(paths["sampling"], gen1, paths["model1"], oversampling, opts.sym)
    n_dir = n_directions(sampling.healpix_order, opts.sym)
    for h, m in enumerate(models, 1):
        require(len(m.pdf_direction) == n_dir,
                f"{paths[f'model{h}']}: {len(m.pdf_direction)} orientation-pdf entries, but HEALPix order "
                f"{sampling.healpix_order} with {opts.sym.upper()} has {n_dir} directions: a different run")
    counters = read_counters(opt, opt_path, gen1, paths["model1"], fsc if it > 0 else None, box, angpix)

    seed = _value(opt, "rlnRandomSeed", opt_path, int)
    diameter = _value(opt, "rlnParticleDiameter", opt_path)
    log.line(f" Continuing from {opt_path} (iteration {it}): resolution {1.0 / counters.current_resolution:g} A, "
             f"HEALPix order {sampling.healpix_order}, {'local' if sampling.local_searches else 'global'} searches")
    if seed != opts.random_seed:
        log.line(f" Using the random seed of {opt_path.name} ({seed}) instead of --random_seed {opts.random_seed}")
    if abs(diameter - opts.particle_diameter) > 1e-3:
        log.line(f" Note: {opt_path.name} used --particle_diameter {diameter:g} A; this run uses "
                 f"{opts.particle_diameter:g} A")
    if FINE_ENOUGH_LABEL not in opt:
        log.line(f" Note: {opt_path.name} does not record whether the angular sampling was fine enough; "
                 f"convergence is re-checked from the next sampling update")
    stats = (EStepStats(**{f: _value(opt, label, opt_path) for f, label in ESTEP_STATS_LABELS.items()})
             if all(label in opt for label in ESTEP_STATS_LABELS.values()) else None)
    return Restored(it, seed, subset, poses, models, sampling, counters, stats)
