"""Masked, phase-randomisation-corrected FSC and B-factor sharpening (like relion_postprocess).

Examples:
  cryorefine postprocess --i Refine3D/run_half1_class001_unfil.mrc --mask mask.mrc --o PostProcess/postprocess \\
      --auto_bfac --autob_lowres 10
  cryorefine postprocess --i h1.mrc --i2 h2.mrc --mask mask.mrc --o pp --adhoc_bfac -100 --low_pass -1

Steps (spec §12, RELION postprocessing.cpp): FSC of the unmasked and of the masked half maps; phases randomised
beyond the first shell where the unmasked FSC < --randomize_at_fsc (or from --randomize_at_A); FSC_true =
(FSC_masked − FSC_rand)/(1 − FSC_rand) from that shell + 2 on; the unmasked curve is used instead if it crosses
0.143 later (unless --force_mask). Final resolution = last shell before FSC_true < 0.143. The average of the halves
is divided by the detector MTF (--mtf), weighted by sqrt(2·FSC/(1+FSC)) (zero from the first shell with
FSC < 1e-4), sharpened by exp(−B s²/4) with B = 4 × the slope of a straight-line fit to the Guinier plot
ln⟨|F|⟩ vs 1/d² of the weighted map over d in [--autob_highres, --autob_lowres] (--auto_bfac; RELION's default
high limit 0 means up to Nyquist, i.e. every shell with non-zero weighted amplitude), or --adhoc_bfac; optionally
low-passed (--low_pass A; negative = at the final resolution; 0 = off). Outputs: <o>.mrc, <o>_masked.mrc (with
--mask), <o>.star (data_general, data_fsc, data_guinier), <o>_fsc.xml (EMDB), <o>_fsc.dat and logfile.pdf.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.fft as sfft
from numpy.typing import NDArray

from cryorefine.validate import check_not_inputs, check_output_folder, same_file, same_pixel_size
from cryorefine.errors import InputError, require, require_finite
from cryorefine.fourier.filters import raised_cosine_lowpass_profile
from cryorefine.fourier.fsc import first_shell_below, fsc, masked_corrected_fsc, shell_columns
from cryorefine.io.atomic import write_text_atomic
from cryorefine.io.mrc import read_map, read_volume, write_map
from cryorefine.io.star import read_star, write_star

FSC_THRESHOLD = 0.143
WEIGHT_CUTOFF = 1e-4        # applyFscWeighting: zero from the first shell with FSC below this
GUINIER_MISSING = -99.0     # RELION's y value for a shell with no amplitude
RAND_FSC_WARNING = 0.1      # RELION warns when FSC_rand exceeds this at the resolution shell
# options taken as numbers: nan passes or skips their tests silently (nan > 0 and nan < 0 are both false)
NUMBER_OPTIONS = ("angpix", "mtf_angpix", "autob_lowres", "autob_highres", "adhoc_bfac", "low_pass",
                  "randomize_at_fsc", "randomize_at_A", "molweight")


# ----------------------------------------------------------------------------------------------------------
# small pure functions


def other_half_path(path: str) -> str | None:
    """RELION getTheOtherHalf: swap 'half1' <-> 'half2' in the file name (not the folders); None if neither."""
    head, sep, name = str(path).rpartition("/")
    if "half1" in name:
        name = name.replace("half1", "half2")
    elif "half2" in name:
        name = name.replace("half2", "half1")
    else:
        return None
    return head + sep + name


def k_squared(box: int, ndim: int = 3) -> NDArray[np.float64]:
    """|k|² (Fourier px of the N-box) for every element of the rfftn layout ((N, N, N//2+1) in 3D, (N, N//2+1) in
    2D)."""
    k2 = np.fft.fftfreq(box, 1.0 / box) ** 2
    axes = [k2] * (ndim - 1) + [np.arange(box // 2 + 1, dtype=np.float64) ** 2]
    return sum(g.reshape([-1 if a == i else 1 for a in range(ndim)]) for i, g in enumerate(axes))


def last_shell_above(curve: NDArray, threshold: float) -> int:
    """Last shell before the curve first drops below `threshold` (shell 0 not tested; N/2 if it never drops)."""
    return first_shell_below(curve, threshold) - 1


def shell_resolution(shell: int, box: int, angpix: float) -> float:
    """N·p/r in Å (inf for shell 0)."""
    return box * angpix / shell if shell > 0 else math.inf


def fsc_weights(fsc_curve: NDArray) -> NDArray[np.float64]:
    """RELION applyFscWeighting per shell: sqrt(2F/(1+F)) (0 where F ≤ 0) up to the last shell before the first
    F < 1e-4 (shell 0 included in the test), 0 beyond."""
    f = np.asarray(fsc_curve, dtype=np.float64)
    below = np.nonzero(f < WEIGHT_CUTOFF)[0]
    ires_max = max(int(below[0]) - 1, 0) if below.size else f.size - 1
    w = np.zeros_like(f)
    keep = f[: ires_max + 1]
    w[: ires_max + 1] = np.where(keep > 0, np.sqrt(2.0 * np.maximum(keep, 0.0) / (1.0 + np.maximum(keep, 0.0))), 0.0)
    return w


def solvent_mask_fraction(mask: NDArray) -> float:
    """RELION's rlnParticleBoxFractionSolventMask: f = 0.476 / (fraction of voxels with mask > 0.5)."""
    return 0.476 / float(np.mean(np.asarray(mask) > 0.5))


def molweight_fraction(box: int, angpix: float, molweight_kda: float) -> float:
    """RELION's f from --molweight: 0.476·(N·p)³·0.81 / (M·1000), the sphere-in-box fraction over the ordered
    protein's volume (M/0.81 Å³ per Da, density 1.35 g/cm³)."""
    return 0.476 * (box * angpix) ** 3 * 0.81 / (molweight_kda * 1000.0)


def particle_fsc_fraction(fsc_unmasked: NDArray, frac: float) -> NDArray[np.float64]:
    """RELION calculateFSCpart with a fraction f (solvent_mask_fraction or molweight_fraction): f·F/(1 + (f − 1)·F),
    F = unmasked FSC (cisTEM-like particle FSC)."""
    f = np.asarray(fsc_unmasked, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = frac * f / (1.0 + (frac - 1.0) * f)
    return np.where(np.isfinite(out), out, 0.0)


def guinier_plot(ft: NDArray, shell: NDArray, box: int, angpix: float) -> tuple[NDArray, NDArray]:
    """RELION makeGuinierPlot: x = 1/d² (1/Å²) and y = ln(mean |F| over shell round|k| = i) for i = 0..N/2 with
    d = N·p/i ≥ 2p; y = −99 where the shell has no amplitude. F is the 1/N³-scaled transform."""
    nb = box // 2 + 1
    s = shell.ravel()
    sel = s < nb
    amp = np.bincount(s[sel], np.abs(ft).ravel()[sel], minlength=nb)[:nb]
    count = np.bincount(s[sel], minlength=nb)[:nb]
    i = np.arange(nb, dtype=np.float64)
    x = (i / (box * angpix)) ** 2
    with np.errstate(divide="ignore"):
        y = np.where(amp > 0, np.log(np.where(amp > 0, amp, 1.0) / np.maximum(count, 1)), GUINIER_MISSING)
    return x, y


@dataclass
class GuinierFit:
    """Straight line y = slope·x + intercept through the Guinier plot; B = 4·slope (Å², negative sharpens)."""

    slope: float
    intercept: float
    correlation: float
    n_points: int
    degenerate: bool = False     # fewer than 2 shells (or one x): RELION's zeros, i.e. no sharpening

    @property
    def bfactor(self) -> float:
        return 4.0 * self.slope


def fit_guinier(x: NDArray, y: NDArray, lowres_A: float, highres_A: float) -> GuinierFit:
    """RELION fitStraightLine over shells with d in [highres_A, lowres_A] and y > −99 (d = 1/sqrt(x));
    correlation = ss_xy²/(ss_xx·ss_yy). Fewer than 2 distinct shells: slope, intercept and correlation 0, as
    RELION's (ss_xx not > 0), marked degenerate."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    with np.errstate(divide="ignore"):
        d = np.where(x > 0, 1.0 / np.sqrt(np.where(x > 0, x, 1.0)), np.inf)
    w = (y > GUINIER_MISSING) & (d <= lowres_A) & (d >= highres_A)
    n = int(w.sum())
    if n < 2:
        return GuinierFit(0.0, 0.0, 0.0, n, degenerate=True)
    xs, ys = x[w], y[w]
    ss_xx = float(((xs - xs.mean()) ** 2).sum())
    ss_yy = float(((ys - ys.mean()) ** 2).sum())
    ss_xy = float(((xs - xs.mean()) * (ys - ys.mean())).sum())
    if ss_xx <= 0:
        return GuinierFit(0.0, 0.0, 0.0, n, degenerate=True)
    slope = ss_xy / ss_xx
    corr = ss_xy * ss_xy / (ss_xx * ss_yy) if ss_yy > 0 else 1.0
    return GuinierFit(slope=slope, intercept=float(ys.mean() - slope * xs.mean()), correlation=corr, n_points=n)


def bfactor_factors(k2: NDArray, box: int, angpix: float, bfactor: float) -> NDArray[np.float64]:
    """RELION applyBFactorToMap: exp(−B s²/4) with s = |k|/(N·p) up to Nyquist (s ≤ 1/(2p)), 0 beyond."""
    s2 = k2 / (box * angpix) ** 2
    return np.where(s2 <= 1.0 / (2.0 * angpix) ** 2, np.exp(-(bfactor / 4.0) * s2), 0.0)


def lowpass_factors(k2: NDArray, box: int, angpix: float, resolution_A: float,
                    edge_width: int = 2) -> NDArray[np.float64]:
    """RELION lowPassFilterMap: raised cosine from shell round(N·p/R) − w/2 to + w/2 (w = edge_width shells)."""
    ires = int(math.floor(box * angpix / resolution_A + 0.5))
    width = 2 * (edge_width // 2)
    if width == 0:
        return (np.sqrt(k2) <= ires).astype(np.float64)
    return raised_cosine_lowpass_profile(np.sqrt(k2), float(ires), float(width))


def mtf_divisors(k2: NDArray, box: int, angpix: float, mtf_res: NDArray, mtf_val: NDArray) -> NDArray[np.float64]:
    """RELION divideByMtf: the MTF at s = |k|/(N·p) (1/Å) for s < 1/(2p), 1 elsewhere.

    mtf_res are 1/Å (rlnResolutionInversePixel / mtf_angpix). As in RELION the table index is floor(s/Δ) with
    Δ = (res[-1] − res[0]) / n_points, then linear interpolation between that row and the next (ends clamped).
    """
    mtf_res = np.asarray(mtf_res, dtype=np.float64)
    mtf_val = np.asarray(mtf_val, dtype=np.float64)
    n = mtf_res.size
    per_elem = (mtf_res[-1] - mtf_res[0]) / n
    s = np.sqrt(k2) / (box * angpix)
    i0 = np.floor(s / per_elem).astype(np.int64)
    inner = np.clip(i0, 0, n - 2)
    x0, x1 = mtf_res[inner], mtf_res[inner + 1]
    y0, y1 = mtf_val[inner], mtf_val[inner + 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        interp = y0 + (y1 - y0) * (s - x0) / (x1 - x0)
    mtf = np.where(i0 >= n - 1, mtf_val[-1], np.where(i0 <= 0, mtf_val[0], interp))
    return np.where(s < 1.0 / (2.0 * angpix), mtf, 1.0)


def effective_seed(seed: int, clock: float) -> int:
    """RELION's --random_seed: a negative value means "seed from the clock" (time(NULL), whole seconds)."""
    return seed if seed >= 0 else int(clock)


def read_mtf(path: str | Path, mtf_angpix: float) -> tuple[NDArray, NDArray]:
    """MTF STAR file (rlnResolutionInversePixel, rlnMtfValue) -> (resolution 1/Å, MTF), checked like RELION."""
    path = Path(path)
    require(path.exists(), f"{path}: no such file")
    blocks = read_star(path)
    table = next((b for b in blocks.values() if isinstance(b, pd.DataFrame)
                  and {"rlnResolutionInversePixel", "rlnMtfValue"} <= set(b.columns)), None)
    require(table is not None, f"{path}: no table with rlnResolutionInversePixel and rlnMtfValue")
    try:
        res = table["rlnResolutionInversePixel"].to_numpy(dtype=np.float64) / mtf_angpix
        val = table["rlnMtfValue"].to_numpy(dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{path}: non-numeric MTF values") from None
    require(res.size >= 2, f"{path}: the MTF table needs at least 2 rows")
    require(bool(np.all(val >= 1e-10)), f"{path}: zero or negative values in the MTF curve")
    require((res[-1] - res[0]) / res.size >= 1e-10, f"{path}: the resolution in the MTF table does not go up")
    return res, val


# ----------------------------------------------------------------------------------------------------------
# the whole calculation


@dataclass
class PostprocessOptions:
    """relion_postprocess options (Å, Å², shells); defaults as RELION."""

    angpix: float
    randomize_at_fsc: float = 0.8
    randomize_at_A: float = -1.0
    force_mask: bool = False
    auto_bfac: bool = False
    autob_lowres: float = 10.0
    autob_highres: float = 0.0
    adhoc_bfac: float = 0.0
    low_pass: float = 0.0
    skip_fsc_weighting: bool = False
    filter_edge_width: int = 2
    mtf: tuple[NDArray, NDArray] | None = None    # (resolution 1/Å, MTF value)
    seed: int = 0
    molweight: float = -1.0                       # kDa of ordered protein (RELION's --molweight); -1: none


@dataclass
class PostprocessResult:
    """FSC curves (shells 0..N/2), resolution, sharpening parameters, Guinier columns and the sharpened map."""

    box: int
    angpix: float
    fsc_unmasked: NDArray
    fsc_true: NDArray
    resolution_shell: int
    resolution_A: float
    bfactor: float
    sharpened: NDArray
    guinier: dict[str, NDArray]
    fsc_masked: NDArray | None = None
    fsc_random: NDArray | None = None
    fsc_part_fracmask: NDArray | None = None
    mask_fraction: float | None = None        # rlnParticleBoxFractionSolventMask
    fsc_part_molweight: NDArray | None = None  # with --molweight
    molweight_fraction: float | None = None    # rlnParticleBoxFractionMolecularWeight
    molweight: float | None = None             # rlnMolecularWeight (kDa)
    randomise_from: int | None = None
    unmasked_used: bool = False
    fit: GuinierFit | None = None
    lowpass_A: float = 0.0
    warnings: list[str] = field(default_factory=list)


def corrected_fsc(half1: NDArray, half2: NDArray, mask: NDArray | None, opts: PostprocessOptions) -> dict:
    """Steps 1–3: unmasked / masked / randomised / true FSC, randomisation shell, resolution, unmasked fallback."""
    box = half1.shape[0]
    out: dict = {"warnings": []}
    if mask is None:
        out["fsc_unmasked"] = fsc(half1, half2)
        out["fsc_true"] = out["fsc_unmasked"].copy()
        out["shell"] = last_shell_above(out["fsc_true"], FSC_THRESHOLD)
        return with_molweight_fsc(out, box, opts)
    if opts.randomize_at_A > 0:
        r_rand = int(opts.angpix * box / opts.randomize_at_A)
        require(r_rand > 0, f"--randomize_at_A: {opts.randomize_at_A:g} Å is coarser than the box "
                            f"({box * opts.angpix:g} Å)")
    else:
        unmasked = fsc(half1, half2)
        below = np.nonzero(unmasked[1:] < opts.randomize_at_fsc)[0]
        require(below.size > 0, f"--randomize_at_fsc: the unmasked FSC never drops below {opts.randomize_at_fsc:g}; "
                                "give --randomize_at_A")
        r_rand = int(below[0]) + 1
    curves = masked_corrected_fsc(half1, half2, mask, opts.angpix, seed=opts.seed, randomise_from=r_rand)
    unmasked = np.asarray(curves["fsc_unmasked"])
    masked = np.asarray(curves["fsc_masked"]).copy()
    rand = np.asarray(curves["fsc_random"]).copy()
    true = np.asarray(curves["fsc_true"]).copy()
    # RELION calculateFSCtrue: "sometimes FSC at origin becomes -1"
    if masked[0] <= 0:
        masked[0] = 1.0
    if rand[0] <= 0:
        rand[0] = 1.0
    true[0] = masked[0]
    shell = last_shell_above(true, FSC_THRESHOLD)
    unmasked_shell = last_shell_above(unmasked, FSC_THRESHOLD)
    used_unmasked = False
    if unmasked_shell > shell:
        if opts.force_mask:
            out["warnings"].append("the unmasked FSC extends beyond the solvent-corrected FSC (mask forced)")
        else:
            out["warnings"].append("the unmasked FSC extends beyond the solvent-corrected FSC: the unmasked FSC "
                                   "is used (adjust the mask, or give --force_mask)")
            true = unmasked.copy()
            shell = unmasked_shell
            used_unmasked = True
    elif rand[shell] > RAND_FSC_WARNING:
        out["warnings"].append(f"the phase-randomised FSC is {rand[shell]:.3f} (> 0.10) at the estimated "
                               "resolution; a softer mask with fewer features gives a more reliable estimate")
    frac = solvent_mask_fraction(mask)
    out.update(fsc_unmasked=unmasked, fsc_masked=masked, fsc_random=rand, fsc_true=true, shell=shell,
               randomise_from=r_rand, unmasked_used=used_unmasked,
               fsc_part_fracmask=particle_fsc_fraction(unmasked, frac), mask_fraction=frac)
    return with_molweight_fsc(out, box, opts)


def with_molweight_fsc(out: dict, box: int, opts: PostprocessOptions) -> dict:
    """With --molweight: its fraction and the cisTEM-like particle FSC from the unmasked FSC (RELION writes both
    with or without a mask)."""
    if opts.molweight > 0:
        frac = molweight_fraction(box, opts.angpix, opts.molweight)
        out.update(molweight=opts.molweight, molweight_fraction=frac,
                   fsc_part_molweight=particle_fsc_fraction(out["fsc_unmasked"], frac))
    return out


def sharpen(average: NDArray, fsc_true: NDArray, resolution_A: float,
            opts: PostprocessOptions) -> tuple[NDArray, float, GuinierFit | None, float, dict[str, NDArray]]:
    """Steps 4–5 on the average map: MTF division, FSC weighting, B-factor, low-pass (RELION sharpenMap).

    Returns (map float32, B used, Guinier fit or None, low-pass applied in Å or 0, Guinier columns)."""
    box = average.shape[0]
    p = opts.angpix
    k2 = k_squared(box)
    shell = np.rint(np.sqrt(k2)).astype(np.int64)
    ft = sfft.rfftn(np.asarray(average, dtype=np.float64), norm="forward", workers=-1)
    x, y_in = guinier_plot(ft, shell, box, p)
    columns = {"rlnResolutionSquared": x, "rlnLogAmplitudesOriginal": y_in}
    if opts.mtf is not None:
        ft /= mtf_divisors(k2, box, p, *opts.mtf)
        columns["rlnLogAmplitudesMTFCorrected"] = guinier_plot(ft, shell, box, p)[1]
    if not opts.skip_fsc_weighting:
        w = fsc_weights(fsc_true)
        ft *= np.where(shell < w.size, w[np.minimum(shell, w.size - 1)], 0.0)
    y_weighted = guinier_plot(ft, shell, box, p)[1]
    if not opts.skip_fsc_weighting:
        columns["rlnLogAmplitudesWeighted"] = y_weighted
    fit = None
    bfactor = 0.0
    if opts.auto_bfac:
        fit = fit_guinier(x, y_weighted, opts.autob_lowres, opts.autob_highres)
        bfactor = fit.bfactor
    elif opts.adhoc_bfac != 0:
        bfactor = opts.adhoc_bfac
    if bfactor != 0:
        # a huge negative B overflows exp(−B s²/4): allowed here without numpy warnings, because postprocess()
        # refuses a non-finite map with one error line
        with np.errstate(over="ignore", invalid="ignore"):
            ft *= bfactor_factors(k2, box, p, bfactor)
    if opts.auto_bfac or opts.adhoc_bfac != 0:
        columns["rlnLogAmplitudesSharpened"] = guinier_plot(ft, shell, box, p)[1]
    if fit is not None:
        columns["rlnLogAmplitudesIntercept"] = np.full(x.size, fit.intercept)
    lowpass = 0.0
    if opts.low_pass != 0:
        lowpass = opts.low_pass if opts.low_pass > 0 else resolution_A
        if math.isfinite(lowpass):
            with np.errstate(invalid="ignore"):     # inf·0 beyond the low-pass: see the B-factor above
                ft *= lowpass_factors(k2, box, p, lowpass, opts.filter_edge_width)
    out = sfft.irfftn(ft, s=average.shape, norm="forward", workers=-1)
    with np.errstate(over="ignore", invalid="ignore"):
        return out.astype(np.float32), float(bfactor), fit, float(lowpass), columns


def postprocess(half1: NDArray, half2: NDArray, mask: NDArray | None, opts: PostprocessOptions) -> PostprocessResult:
    """relion_postprocess on arrays: corrected FSC, resolution, sharpened average (spec §12)."""
    half1 = np.asarray(half1, dtype=np.float64)
    half2 = np.asarray(half2, dtype=np.float64)
    require(not (opts.auto_bfac and opts.adhoc_bfac != 0), "--auto_bfac: give either --auto_bfac or --adhoc_bfac")
    box = half1.shape[0]
    m = None if mask is None else np.asarray(mask, dtype=np.float64)
    c = corrected_fsc(half1, half2, m, opts)
    shell = int(c["shell"])
    resolution = shell_resolution(shell, box, opts.angpix)
    sharpened, bfactor, fit, lowpass, columns = sharpen(0.5 * (half1 + half2), c["fsc_true"], resolution, opts)
    # the halves are checked finite, so only the sharpening can have overflowed: never write an inf/NaN map
    require(bool(np.isfinite(sharpened).all()),
            f"{'--adhoc_bfac' if fit is None else '--auto_bfac'}: sharpening with B = {bfactor:g} Å² makes the map "
            f"exceed the float32 range (exp(−B s²/4) = exp({-bfactor / 4 / (2 * opts.angpix) ** 2:.4g}) at "
            f"Nyquist); give a B-factor of smaller magnitude")
    return PostprocessResult(
        box=box, angpix=opts.angpix, fsc_unmasked=c["fsc_unmasked"], fsc_true=c["fsc_true"], resolution_shell=shell,
        resolution_A=resolution, bfactor=bfactor, sharpened=sharpened, guinier=columns,
        fsc_masked=c.get("fsc_masked"), fsc_random=c.get("fsc_random"), fsc_part_fracmask=c.get("fsc_part_fracmask"),
        mask_fraction=c.get("mask_fraction"), fsc_part_molweight=c.get("fsc_part_molweight"),
        molweight_fraction=c.get("molweight_fraction"), molweight=c.get("molweight"),
        randomise_from=c.get("randomise_from"), unmasked_used=bool(c.get("unmasked_used", False)), fit=fit,
        lowpass_A=lowpass, warnings=c["warnings"] + guinier_warnings(fit, opts, resolution))


def guinier_warnings(fit: GuinierFit | None, opts: PostprocessOptions, resolution_A: float) -> list[str]:
    """A line when --auto_bfac had nothing to fit (RELION then sharpens with B = 0 without a word)."""
    if fit is None or not fit.degenerate:
        return []
    return [f"--auto_bfac: {fit.n_points} shell(s) with signal between {opts.autob_lowres:g} and "
            f"{max(opts.autob_highres, 2 * opts.angpix):g} Å (final resolution {resolution_A:.2f} Å): no B-factor "
            f"fit, so B = 0 (no sharpening), as RELION; give --adhoc_bfac, or --autob_lowres coarser than the "
            f"resolution"]


def star_blocks(res: PostprocessResult, half1_name: str, half2_name: str, mask_name: str | None,
                map_name: str, masked_map_name: str | None) -> dict[str, dict | pd.DataFrame]:
    """data_general, data_fsc, data_guinier as RELION's Postprocessing::writeOutput."""
    general: dict = {"rlnFinalResolution": float(res.resolution_A), "rlnBfactorUsedForSharpening": float(res.bfactor),
                     "rlnUnfilteredMapHalf1": half1_name, "rlnUnfilteredMapHalf2": half2_name}
    if mask_name is not None:
        general["rlnParticleBoxFractionSolventMask"] = float(res.mask_fraction)
        general["rlnMaskName"] = mask_name
        general["rlnRandomiseFrom"] = float(shell_resolution(int(res.randomise_from), res.box, res.angpix))
    if res.fit is not None:
        general["rlnFittedSlopeGuinierPlot"] = float(res.fit.slope)
        general["rlnFittedInterceptGuinierPlot"] = float(res.fit.intercept)
        general["rlnCorrelationFitGuinierPlot"] = float(res.fit.correlation)
    if res.molweight_fraction is not None:
        general["rlnMolecularWeight"] = float(res.molweight)
        general["rlnParticleBoxFractionMolecularWeight"] = float(res.molweight_fraction)
    general["rlnPostprocessedMap"] = map_name
    if masked_map_name is not None:
        general["rlnPostprocessedMapMasked"] = masked_map_name
    fsc_table = shell_columns(res.fsc_true.size, res.box, res.angpix)
    if mask_name is not None:
        fsc_table.update({
            "rlnFourierShellCorrelationCorrected": res.fsc_true,
            "rlnFourierShellCorrelationParticleMaskFraction": res.fsc_part_fracmask,
            "rlnFourierShellCorrelationUnmaskedMaps": res.fsc_unmasked,
            "rlnFourierShellCorrelationMaskedMaps": res.fsc_masked,
            "rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps": res.fsc_random})
    else:
        fsc_table["rlnFourierShellCorrelationUnmaskedMaps"] = res.fsc_true
    if res.fsc_part_molweight is not None:
        fsc_table["rlnFourierShellCorrelationParticleMolWeight"] = res.fsc_part_molweight
    return {"general": general, "fsc": pd.DataFrame(fsc_table), "guinier": pd.DataFrame(res.guinier)}


def fsc_xml(resolution_inv_A: NDArray, fsc: NDArray) -> str:
    """EMDB's FSC XML (x: resolution in 1/Å, y: FSC), as RELION's writeFscXml (for deposition)."""
    points = "".join(f"  <coordinate>\n    <x>{x:.6g}</x>\n    <y>{y:.6g}</y>\n  </coordinate>\n"
                     for x, y in zip(np.asarray(resolution_inv_A, float), np.asarray(fsc, float)))
    return ('<fsc title="RELION masked-corrected FSC" xaxis="Resolution (A-1)" yaxis="Correlation Coefficient">\n'
            + points + "</fsc>\n")


def fsc_dat(resolution_inv_A: NDArray, fsc: NDArray) -> str:
    """'resolution (1/Å) FSC' lines, as RELION's writeFscDat (for xmgrace and gnuplot)."""
    return "".join(f"{x:.6g} {y:.6g}\n" for x, y in zip(np.asarray(resolution_inv_A, float), np.asarray(fsc, float)))


# ----------------------------------------------------------------------------------------------------------
# command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """relion_postprocess options (RELION spellings; dashes accepted too)."""
    a = parser.add_argument
    a("--i", dest="i", required=True, help="unfiltered half map 1, e.g. run_half1_class001_unfil.mrc")
    a("--i2", dest="i2", default=None, help="half map 2 (default: --i with 'half1' replaced by 'half2')")
    a("--o", dest="o", default="postprocess", help="output root: <o>.mrc, <o>_masked.mrc, <o>.star")
    a("--angpix", type=float, default=-1.0, help="pixel size in Å (default: from the header of --i)")
    a("--mask", default=None, help="solvent mask (values in [0,1], same box as the half maps)")
    a("--force_mask", "--force-mask", dest="force_mask", action="store_true",
      help="use the masked FSC even when the unmasked FSC extends further")
    a("--mtf", default=None, help="STAR file with the detector MTF (rlnResolutionInversePixel, rlnMtfValue)")
    a("--mtf_angpix", "--mtf-angpix", dest="mtf_angpix", type=float, default=-1.0,
      help="pixel size of the original micrographs in Å (default: --angpix)")
    a("--auto_bfac", "--auto-bfac", dest="auto_bfac", action="store_true",
      help="B-factor from a straight-line fit to the Guinier plot (Rosenthal & Henderson 2003)")
    a("--autob_lowres", "--autob-lowres", dest="autob_lowres", type=float, default=10.0,
      help="lowest resolution (Å) in the B-factor fit (default 10)")
    a("--autob_highres", "--autob-highres", dest="autob_highres", type=float, default=0.0,
      help="highest resolution (Å) in the B-factor fit (default 0: up to Nyquist, as RELION)")
    a("--adhoc_bfac", "--adhoc-bfac", dest="adhoc_bfac", type=float, default=0.0,
      help="user B-factor in Å² (negative sharpens)")
    a("--skip_fsc_weighting", "--skip-fsc-weighting", dest="skip_fsc_weighting", action="store_true",
      help="no sqrt(2FSC/(1+FSC)) weighting (then give --low_pass)")
    a("--low_pass", "--low-pass", dest="low_pass", type=float, default=0.0,
      help="low-pass the final map at this resolution in Å (0: off, negative: at the final resolution)")
    a("--filter_edge_width", "--filter-edge-width", dest="filter_edge_width", type=int, default=2,
      help="raised-cosine edge of the low-pass filter, in shells (default 2)")
    a("--randomize_at_fsc", "--randomize-at-fsc", dest="randomize_at_fsc", type=float, default=0.8,
      help="randomise phases from the first shell where the unmasked FSC drops below this (default 0.8)")
    a("--randomize_at_A", "--randomize-at-A", dest="randomize_at_A", type=float, default=-1.0,
      help="randomise phases from this resolution in Å instead (if positive)")
    a("--molweight", type=float, default=-1.0,
      help="molecular weight (kDa) of the ordered protein: a cisTEM-like particle FSC from it in <o>.star (RELION)")
    a("--random_seed", "--random-seed", dest="random_seed", type=int, default=0,
      help="seed of the phase randomisation (default 0)")


def _read_half(path: str) -> tuple[NDArray, float]:
    """A 3D cubic map, or InputError naming the file."""
    data, angpix = read_volume(path, "half map")
    require(float(data.max()) > float(data.min()), f"{path}: the map is constant ({float(data.flat[0]):g} everywhere): "
                                                   f"no FSC can be computed")
    return data, angpix


def _validate_options(args) -> None:
    """Option values that make no sense, before any file is read."""
    require_finite(args, NUMBER_OPTIONS)
    require(not (args.auto_bfac and args.adhoc_bfac != 0), "--auto_bfac: give either --auto_bfac or --adhoc_bfac")
    require(0 < args.randomize_at_fsc < 1, f"--randomize_at_fsc: {args.randomize_at_fsc:g} is not in (0, 1)")
    require(args.autob_lowres > 0, f"--autob_lowres: {args.autob_lowres:g} must be positive")
    require(args.autob_highres < args.autob_lowres,
            f"--autob_highres: {args.autob_highres:g} Å must be finer than --autob_lowres {args.autob_lowres:g} Å")
    require(args.filter_edge_width >= 0, f"--filter_edge_width: {args.filter_edge_width} must be ≥ 0")
    require(bool(str(args.o).strip()), "--o: empty output root")
    # RELION's --o is a root (PostProcess/job001/postprocess): a folder would give hidden files named .mrc, .star
    require(not str(args.o).endswith(("/", os.sep)) and not Path(args.o).is_dir(),
            f"--o {args.o}: is a folder; an output root such as PostProcess/job001/postprocess is needed")
    # before any work: writing would fail at the very end, naming an internal temporary file
    for out in output_names(str(args.o)):
        require(not Path(out).is_dir(), f"{out}: is a folder, not a file (an output of --o {args.o})")


def output_names(root: str) -> list[str]:
    """Every file a postprocess job with output root `root` writes (the report page aside)."""
    return [f"{root}{end}" for end in (".mrc", "_masked.mrc", ".star", "_fsc.xml", "_fsc.dat")] + \
        [str(Path(root).parent / "logfile.pdf")]


def _write_logfile(root: str) -> Path | None:
    """RELION's `logfile.pdf` beside the outputs (its GUI's Display); a drawing failure is a warning line, never
    the end of a job whose maps are written."""
    path = Path(root).parent / "logfile.pdf"
    try:
        from cryorefine.report.build import write_postprocess_logfile
        return write_postprocess_logfile(root + ".star", path)
    except Exception as exc:  # noqa: BLE001
        print(f"WARNING: could not write {path}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None


def run(args: argparse.Namespace) -> int:
    """Read the halves (and mask), compute, then write <o>.mrc, <o>_masked.mrc, <o>.star and print the summary."""
    _validate_options(args)
    half1_name = args.i
    half2_name = args.i2 if args.i2 else other_half_path(args.i)
    require(half2_name is not None, f"--i {args.i}: the file name contains neither 'half1' nor 'half2'; give --i2")
    # the FSC of a map with itself is 1 everywhere: a "resolution" at Nyquist
    require(not same_file(half1_name, half2_name), f"--i2 {half2_name}: is the same map as --i {half1_name}; the "
                                                   f"two independent half maps are needed")
    root = str(args.o)
    check_output_folder(Path(root).parent)
    check_not_inputs(output_names(root), [half1_name, half2_name, args.mask, args.mtf])
    half1, p1 = _read_half(half1_name)
    half2, p2 = _read_half(half2_name)
    require(half2.shape == half1.shape, f"{half2_name}: box {half2.shape[0]} differs from {half1_name} "
                                        f"(box {half1.shape[0]})")
    require(same_pixel_size(p1, p2), f"{half2_name}: pixel size {p2:g} Å differs from {half1_name} ({p1:g} Å)")
    angpix = args.angpix if args.angpix and args.angpix > 0 else (p1 if p1 > 0 else p2)
    require(angpix > 0, f"--angpix: {half1_name} has no pixel size in its header; give --angpix")
    mask = None
    if args.mask:
        mask, pm = read_map(args.mask)
        require(mask.shape == half1.shape, f"{args.mask}: mask shape {mask.shape} differs from the half maps "
                                           f"{half1.shape}")
        require(same_pixel_size(pm, p1 if p1 > 0 else p2),
                f"{args.mask}: pixel size {pm:g} Å differs from the half maps ({(p1 if p1 > 0 else p2):g} Å)")
        lo, hi = float(np.min(mask)), float(np.max(mask))
        require(np.isfinite(lo) and np.isfinite(hi) and lo >= -1e-6 and hi <= 1 + 1e-6,
                f"{args.mask}: mask values not in [0,1] (min {lo:g}, max {hi:g})")
        require(bool(np.any(mask > 0.5)), f"{args.mask}: empty mask (no voxel above 0.5)")
    mtf = None
    if args.mtf:
        mtf = read_mtf(args.mtf, args.mtf_angpix if args.mtf_angpix > 0 else angpix)
    opts = PostprocessOptions(angpix=angpix, randomize_at_fsc=args.randomize_at_fsc,
                              randomize_at_A=args.randomize_at_A, force_mask=args.force_mask,
                              auto_bfac=args.auto_bfac, autob_lowres=args.autob_lowres,
                              autob_highres=args.autob_highres, adhoc_bfac=args.adhoc_bfac, low_pass=args.low_pass,
                              skip_fsc_weighting=args.skip_fsc_weighting, filter_edge_width=args.filter_edge_width,
                              mtf=mtf, seed=effective_seed(args.random_seed, time.time()), molweight=args.molweight)
    print(f"== postprocess: half1 {half1_name}, half2 {half2_name}, box {half1.shape[0]}, {angpix:g} Å/px"
          + (f", mask {args.mask}" if mask is not None else ", no mask"), flush=True)
    if args.random_seed < 0:    # printed, so that the run can be repeated with this seed
        print(f"  + random seed from the clock: {opts.seed} (--random_seed {args.random_seed})", flush=True)
    res = postprocess(half1, half2, mask, opts)
    for w in res.warnings:
        print(f"WARNING: {w}", file=sys.stderr)

    map_name = root + ".mrc"
    masked_name = root + "_masked.mrc" if mask is not None else None
    blocks = star_blocks(res, half1_name, half2_name, args.mask if mask is not None else None, map_name, masked_name)
    write_map(map_name, res.sharpened, angpix)
    if masked_name is not None:
        write_map(masked_name, (res.sharpened * mask).astype(np.float32), angpix)
    write_star(root + ".star", blocks, comment="# cryorefine postprocess\n")
    # the corrected FSC, or the unmasked one without a mask (RELION writes the same column then)
    inv_res = np.asarray(blocks["fsc"]["rlnResolution"], float)
    write_text_atomic(root + "_fsc.xml", fsc_xml(inv_res, res.fsc_true))
    write_text_atomic(root + "_fsc.dat", fsc_dat(inv_res, res.fsc_true))
    logfile = _write_logfile(root)

    if res.randomise_from is not None:
        print(f"  + randomise phases beyond: {shell_resolution(res.randomise_from, res.box, angpix):.2f} Å "
              f"(shell {res.randomise_from})")
    if res.fit is not None:
        print(f"  + Guinier fit {opts.autob_lowres:g}–{max(opts.autob_highres, 2 * angpix):g} Å: slope "
              f"{res.fit.slope:.4f}, intercept {res.fit.intercept:.4f}, correlation {res.fit.correlation:.4f} "
              f"({res.fit.n_points} shells)")
    if res.lowpass_A:
        print(f"  + low-pass filter at {res.lowpass_A:.2f} Å")
    print(f"  + written: {map_name}" + (f", {masked_name}" if masked_name else "") + f", {root}.star, "
          f"{root}_fsc.xml, {root}_fsc.dat" + (f", {logfile}" if logfile else ""))
    print(f"FINAL RESOLUTION: {res.resolution_A:.2f} Å; B-factor used for sharpening: {res.bfactor:.2f} Å^2"
          + (" (unmasked FSC)" if res.unmasked_used else ""))
    from cryorefine.report import refresh_postprocess_report
    refresh_postprocess_report(half1_name, root + ".star", root)
    return 0
