"""RELION's output files of an auto-refine iteration (spec §10): data, half models, maps, optimiser, sampling."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd

from cryorefine import __version__
from cryorefine.geometry.sampling import angular_step
from cryorefine.io.atomic import write_text_atomic
from cryorefine.io.mrc import write_map
from cryorefine.io.star import format_star_vector, write_particles, write_star
from cryorefine.refine.orientations import make_grid
from cryorefine.refine.restart import ESTEP_STATS_LABELS, FINE_ENOUGH_LABEL, FSC_NULL_SIGMA_LABEL, REFERENCE_LIMIT_LABEL
from cryorefine.report.bild import angdist_bild

RELION_VERSION_TAG = "50001"


def file_root(root: str, iteration: int | None) -> str:
    """`run_it012` for an iteration, `run` for the final files."""
    return f"{root}_it{iteration:03d}" if iteration is not None else root


def shell_table(box: int, angpix: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rlnSpectralIndex, rlnResolution 1/Å, rlnAngstromResolution) for shells 0..box/2."""
    r = np.arange(box // 2 + 1)
    res = r / (box * angpix)
    with np.errstate(divide="ignore"):
        ang = np.where(r > 0, box * angpix / np.maximum(r, 1), 999.0)
    return r, res, ang


def data_table(run) -> pd.DataFrame:
    """All input columns plus the refined pose and statistics columns (spec §10.2); columns the input lacks are
    added in the order RELION's writer adds them (ExpModel::read, then MlOptimiser's metadata)."""
    df = run.data.table.particles.copy()
    p = run.poses
    df["rlnGroupNumber"] = run.data.group + 1
    df["rlnAngleRot"], df["rlnAngleTilt"], df["rlnAnglePsi"] = p.rot, p.tilt, p.psi
    df["rlnOriginXAngst"], df["rlnOriginYAngst"] = p.origin_x, p.origin_y
    df["rlnClassNumber"] = 1
    df["rlnNormCorrection"] = p.norm_correction
    df["rlnRandomSubset"] = run.data.subset
    df["rlnLogLikeliContribution"] = p.log_likelihood
    df["rlnMaxValueProbDistribution"] = p.max_prob
    df["rlnNrOfSignificantSamples"] = p.nr_significant
    return df


def overall_fourier_completeness(coverage: np.ndarray, max_shell: int) -> float:
    """RELION's calculateTotalFourierCoverage: the mean of the per-shell completeness over the voxels of the cube of
    side 2·max_shell − 1 whose truncated radius int(|k|) is at most max_shell (0 when max_shell < 1)."""
    if max_shell < 1:
        return 0.0
    c = np.arange(-(max_shell - 1), max_shell, dtype=np.float64)
    plane = c[:, None] ** 2 + c[None, :] ** 2
    counts = np.zeros(max_shell + 1)
    for k in c:                  # plane by plane: the cube itself can be large at the final iteration
        r = np.sqrt(plane + k * k).astype(np.int64)
        counts += np.bincount(r[r <= max_shell], minlength=max_shell + 1)[:max_shell + 1]
    return float((counts * coverage[:max_shell + 1]).sum() / counts.sum())


def model_blocks(run, half: int | None, map_name: str) -> dict:
    """The tables of a `_model.star` file (spec §10.3); half None = the joined final model."""
    m = run.models[0 if half in (None, 1) else 1]
    c, s = run.counters, run.sampling
    box, angpix = run.box, run.angpix
    r, res, ang = shell_table(box, angpix)
    nsh = len(r)

    def shells(a, fill=0.0):
        out = np.full(nsh, fill, dtype=np.float64)
        if a is not None:
            n = min(nsh, len(a))
            out[:n] = np.asarray(a)[:n]
        return out

    log_likelihood, ave_pmax = m.log_likelihood, m.ave_pmax
    if half is None:    # the joined model's data statistics are over all particles, as RELION's final model
        n = [int((run.data.subset == h).sum()) for h in (1, 2)]
        log_likelihood = sum(hm.log_likelihood for hm in run.models)
        ave_pmax = sum(hm.ave_pmax * k for hm, k in zip(run.models, n)) / max(sum(n), 1)
    ssnr = shells(m.ssnr)
    est = np.nonzero(ssnr[1:] < 1)[0]
    r_e = int(est[0]) if est.size else nsh - 1
    general = {
        "rlnReferenceDimensionality": 3, "rlnDataDimensionality": 2, "rlnOriginalImageSize": box,
        "rlnCurrentResolution": 1.0 / c.current_resolution, "rlnCurrentImageSize": c.current_size,
        "rlnPaddingFactor": float(run.opts.pad), "rlnIsHelix": 0, "rlnFourierSpaceInterpolator": 1,
        "rlnMinRadiusNnInterpolation": 10, "rlnPixelSize": angpix, "rlnNrClasses": 1, "rlnNrBodies": 1,
        "rlnNrGroups": len(run.data.group_names), "rlnNrOpticsGroups": len(run.data.optics),
        "rlnTau2FudgeFactor": run.opts.tau2_fudge, "rlnNormCorrectionAverage": m.norm_average,
        "rlnSigmaOffsetsAngst": m.sigma_offset, "rlnOrientationalPriorMode": int(s.local_searches),
        "rlnSigmaPriorRotAngle": s.sigma_ang, "rlnSigmaPriorTiltAngle": s.sigma_ang,
        "rlnSigmaPriorPsiAngle": s.sigma_ang, "rlnLogLikelihood": log_likelihood, "rlnAveragePmax": ave_pmax,
    }
    classes = pd.DataFrame({
        "rlnReferenceImage": [map_name], "rlnClassDistribution": [1.0], "rlnAccuracyRotations": [c.acc_rot],
        "rlnAccuracyTranslationsAngst": [c.acc_trans],
        "rlnEstimatedResolution": [box * angpix / max(r_e, 1)],
        "rlnOverallFourierCompleteness": [overall_fourier_completeness(shells(m.coverage), r_e)],
    })
    class1 = pd.DataFrame({
        "rlnSpectralIndex": r, "rlnResolution": res, "rlnAngstromResolution": ang, "rlnSsnrMap": ssnr,
        "rlnGoldStandardFsc": shells(c.fsc, 0.0) if c.fsc is not None else np.r_[1.0, np.zeros(nsh - 1)],
        "rlnFourierCompleteness": shells(m.coverage), "rlnReferenceSigma2": shells(m.sigma2_ref),
        "rlnReferenceTau2": shells(m.tau2), "rlnSpectralOrientabilityContribution": np.zeros(nsh),
    })
    counts = np.bincount(run.data.group if half is None else run.data.group[run.data.subset == half],
                         minlength=len(run.data.group_names))
    groups = pd.DataFrame({
        "rlnGroupNumber": np.arange(1, len(run.data.group_names) + 1), "rlnGroupName": run.data.group_names,
        "rlnGroupNrParticles": counts,
        "rlnGroupScaleCorrection": m.group_scales if m.group_scales is not None else np.ones(len(counts)),
    })
    blocks = {"model_general": general, "model_classes": classes, "model_class_1": class1, "model_groups": groups}
    for o, og in enumerate(run.data.optics):
        sig = np.asarray(m.sigma2[o])
        ro = np.arange(len(sig))
        keep = sig > 0
        blocks[f"model_optics_group_{o + 1}"] = pd.DataFrame({
            "rlnSpectralIndex": ro[keep], "rlnResolution": ro[keep] / (og.box * og.angpix),
            "rlnSigma2Noise": sig[keep]})
    blocks["model_pdf_orient_class_1"] = pd.DataFrame({"rlnOrientationDistribution": np.asarray(m.pdf_direction)})
    return blocks


def optimiser_block(run, root: str, it: int, final: bool) -> dict:
    """`data_optimiser_general` (spec §10.4), with everything --continue needs."""
    o, c = run.opts, run.counters
    general = {
        "rlnOutputRootName": o.fn_out, "rlnModelStarFile": f"{root}_half1_model.star" if not final else f"{root}_model.star",
        "rlnModelStarFile2": f"{root}_half2_model.star" if not final else f"{root}_model.star",
        "rlnExperimentalDataStarFile": f"{root}_data.star", "rlnOrientSamplingStarFile": f"{root}_sampling.star",
        "rlnCurrentIteration": it, "rlnNumberOfIterations": o.auto_iter_max, "rlnDoSplitRandomHalves": 1,
        "rlnJoinHalvesUntilThisResolution": o.low_resol_join_halves, "rlnAdaptiveOversampleOrder": o.oversampling,
        "rlnAdaptiveOversampleFraction": o.adaptive_fraction, "rlnRandomSeed": o.random_seed,
        "rlnParticleDiameter": o.particle_diameter, "rlnWidthMaskEdge": int(o.maskedge_px),
        "rlnDoZeroMask": int(o.zero_mask), "rlnDoSolventFlattening": int(o.flatten_solvent),
        "rlnDoSolventFscCorrection": int(o.solvent_correct_fsc), "rlnSolventMaskName": o.solvent_mask or "None",
        "rlnIncrementImageSize": c.incr_size, "rlnDoMapEstimation": 1, "rlnDoAutoRefine": 1,
        "rlnDoAutoSampling": 1, "rlnAutoLocalSearchesHealpixOrder": o.auto_local_healpix_order,
        "rlnNumberOfIterWithoutResolutionGain": c.nr_iter_wo_resol_gain,
        "rlnBestResolutionThusFar": c.best_resolution,
        "rlnNumberOfIterWithoutChangingAssignments": c.nr_iter_wo_large_changes,
        "rlnOverallAccuracyRotations": c.acc_rot, "rlnOverallAccuracyTranslationsAngst": c.acc_trans,
        "rlnChangesOptimalOrientations": c.changes_orient, "rlnChangesOptimalOffsets": c.changes_offset,
        "rlnChangesOptimalClasses": 0.0, "rlnSmallestChangesOrientations": c.smallest_changes_orient,
        "rlnSmallestChangesOffsets": c.smallest_changes_offset, "rlnSmallestChangesClasses": int(c.smallest_changes_class),
        "rlnHasConverged": int(c.has_converged), "rlnHasHighFscAtResolLimit": int(c.has_high_fsc_at_limit),
        "rlnDoCorrectNorm": int(o.norm), "rlnDoCorrectScale": int(o.scale), "rlnDoCorrectCtf": int(o.ctf),
        "rlnDoIgnoreCtfUntilFirstPeak": int(o.ctf_intact_first_peak), "rlnCtfDataArePhaseFlipped":
        int(o.ctf_phase_flipped), "rlnDoOnlyFlipCtfPhases": int(o.only_flip_phases),
        "rlnRefsAreCtfCorrected": 1, "rlnMaxNumberOfPooledParticles": o.batch_size,
        # the rest of the labels relion_refine --continue requires (MlOptimiser::read stops without any of them),
        # at the values of an auto-refine run without those options
        "rlnSolventMask2Name": "None", "rlnTauSpectrumName": "None", "rlnMaximumCoarseImageSize": -1,
        "rlnHighresLimitExpectation": -1.0, "rlnDoSkipAlign": 0, "rlnHasLargeSizeIncreaseIterationsAgo": 0,
        "rlnFixSigmaNoiseEstimates": 0, "rlnFixSigmaOffsetEstimates": 0,
        # not a RELION label (RELION re-derives the flag): lets --continue check convergence exactly
        FINE_ENOUGH_LABEL: int(c.has_fine_enough_angular_sampling),
        # not a RELION label: the shell the references were projected to (counters.reference_limit)
        REFERENCE_LIMIT_LABEL: c.reference_limit,
    }
    # not RELION labels: the FSC's measured chance spread (the references' information limit) and the last E-step's
    # counts (the memory plan), which a continued run needs to go on as the uninterrupted one
    if c.fsc_null_sigma is not None:
        general[FSC_NULL_SIGMA_LABEL] = format_star_vector(c.fsc_null_sigma)
    if run.estep_stats is not None:
        general |= {label: getattr(run.estep_stats, f) for f, label in ESTEP_STATS_LABELS.items()}
    return general


def sampling_blocks(run) -> dict:
    """`_sampling.star`: general settings and the coarse directions of the current grid (spec §10.4)."""
    s, o = run.sampling, run.opts
    general = {
        "rlnIs3DSampling": 1, "rlnIs3DTranslationalSampling": 0, "rlnHealpixOrder": s.healpix_order,
        "rlnSymmetryGroup": o.sym.upper(), "rlnTiltAngleLimit": -91, "rlnPsiStep": s.psi_step,
        "rlnOffsetRange": s.offset_range, "rlnOffsetStep": s.offset_step, "rlnHelicalOffsetStep": -1,
        "rlnSamplingPerturbInstance": s.perturb, "rlnSamplingPerturbFactor": s.perturb_factor,
        "rlnHealpixOrderOriginal": s.healpix_order_original, "rlnPsiStepOriginal": angular_step(s.healpix_order_original),
        "rlnOffsetRangeOriginal": s.offset_range_original, "rlnOffsetStepOriginal": s.offset_step_original,
    }
    grid = make_grid(s.healpix_order, o.sym, s.psi_step, s.oversampling, 0.0, False)
    dirs = pd.DataFrame({"rlnAngleRot": grid.rot, "rlnAngleTilt": grid.tilt})
    return {"sampling_general": general, "sampling_directions": dirs}


def write_iteration(run, it: int, final: bool) -> None:
    """Every file of iteration `it` (`run_itNNN_*`), plus the unnumbered final files when `final`."""
    o = run.opts
    root = file_root(o.fn_out, it)
    table = replace(run.data.table, particles=data_table(run))
    write_particles(f"{root}_data.star", table)
    for h in (1, 2):
        name = f"{root}_half{h}_class001.mrc"
        write_map(name, run.models[h - 1].volume, run.angpix)
        write_star(f"{root}_half{h}_model.star", model_blocks(run, h, name))
    header = f"# RELION optimiser; version 5.0 (cryorefine {__version__})\n# {o.command_line}\n"
    write_star(f"{root}_sampling.star", sampling_blocks(run))
    if it > 0:
        p = run.poses
        for h in (1, 2):
            sel = run.data.subset == h
            write_text_atomic(f"{root}_half{h}_class001_angdist.bild",
                        angdist_bild(p.rot[sel], p.tilt[sel], run.box, run.angpix, o.sym, run.sampling.healpix_order))
    if run.fsc_maps is not None:       # --solvent_correct_fsc: the maps its FSC was computed from, as RELION
        for h in (1, 2):
            write_map(f"{root}_half{h}_class001_unfil.mrc", run.fsc_maps[h - 1], run.angpix)
    # the optimiser file is written last: its presence means the iteration's files are all complete
    write_star(f"{root}_optimiser.star", {"optimiser_general": optimiser_block(run, root, it, False)},
               comment=header)
    if final:
        fin = file_root(o.fn_out, None)
        write_particles(f"{fin}_data.star", table)
        write_map(f"{fin}_class001.mrc", run.models[0].volume, run.angpix)
        for h in (1, 2):
            write_map(f"{fin}_half{h}_class001_unfil.mrc", run.unfiltered[h - 1], run.angpix)
        write_star(f"{fin}_model.star", model_blocks(run, None, f"{fin}_class001.mrc"))
        write_star(f"{fin}_optimiser.star", {"optimiser_general": optimiser_block(run, fin, it, True)},
                   comment=header)
        write_star(f"{fin}_sampling.star", sampling_blocks(run))
        write_text_atomic(f"{fin}_class001_angdist.bild",
                    angdist_bild(run.poses.rot, run.poses.tilt, run.box, run.angpix, o.sym, run.sampling.healpix_order))
