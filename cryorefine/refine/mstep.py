"""The M-step: the one writer of HalfModel. Noise spectra, offsets, norms, group scales, direction pdf
(spec §3.6), the regularised reconstructions (§3.3–§3.4), and the initial noise estimate (iteration 0)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from numpy.typing import NDArray

from cryorefine.fourier import backprojector as bpm
from cryorefine.fourier.filters import lowpass_raised_cosine
from cryorefine.fourier.transforms import shell_index_2d, unique_halfplane_mask
from cryorefine.refine.estep import HalfAccumulator
from cryorefine.refine.pixels import unique_pixels_per_shell
from cryorefine.refine.state import HalfModel


def shell_power(ft: NDArray[np.complex64], box: int) -> NDArray[np.float64]:
    """Σ|X|² per shell 0..box//2 over the unique half-plane, for a batch (B, N, N//2+1) -> (B, N//2+1)."""
    shells = shell_index_2d(box)
    sel = unique_halfplane_mask(box) & (shells <= box // 2)
    idx = shells[sel]
    pw = (ft.real ** 2 + ft.imag ** 2)[:, sel]
    nshell = box // 2 + 1
    flat = (np.arange(ft.shape[0])[:, None] * nshell + idx[None, :]).ravel()
    return np.bincount(flat, pw.ravel(), minlength=ft.shape[0] * nshell).reshape(ft.shape[0], nshell)


def initial_sigma2(masked_fts: NDArray[np.complex64], box: int) -> NDArray[np.float64]:
    """σ²(r) = ½ mean_i mean_shell |X_i|² − ½ mean_shell |X̄|² (calculateSumOfPowerSpectraAndAverageImage)."""
    npix = unique_pixels_per_shell(box)[: box // 2 + 1]
    mean_power = shell_power(masked_fts, box).mean(0) / npix
    avg = masked_fts.mean(0, keepdims=True)
    avg_power = shell_power(avg, box)[0] / npix
    sigma2 = 0.5 * mean_power - 0.5 * avg_power
    return fill_small(sigma2)


def fill_small(sigma2: NDArray[np.float64], floor: float = 1e-14) -> NDArray[np.float64]:
    """Replace values below `floor` by the previous shell's value (the first valid one for shell 0)."""
    out = sigma2.copy()
    good = np.nonzero(out >= floor)[0]
    if good.size == 0:
        return np.full_like(out, 1.0)
    out[: good[0]] = out[good[0]]
    for r in range(good[0] + 1, len(out)):
        if out[r] < floor:
            out[r] = out[r - 1]
    return out


def update_noise(acc: HalfAccumulator, boxes: dict[int, int], old: dict[int, NDArray]) -> dict[int, NDArray]:
    """σ²_o(r) = Σ w̄ Σ_shell |residual|² / (2 Σ w̄ Npix(r)) per optics group (spec §3.6)."""
    new = {}
    for o, box in boxes.items():
        wsum = float(acc.sigma2_wsum[o])
        if wsum <= 0:
            new[o] = old[o]
            continue
        npix = unique_pixels_per_shell(box)[: box // 2 + 1]
        new[o] = fill_small(acc.sigma2_num[o] / (2.0 * wsum * npix))
    return new


def update_offset_sigma(acc: HalfAccumulator, old: float, min_sigma2: float) -> float:
    """σ_off = sqrt(Σ w̄ |μ − τ|² / (2 Σ w̄)), floored at sqrt(min_sigma2) (Å)."""
    if acc.wsum <= 0:
        return old
    return float(np.sqrt(max(acc.offset_num / (2.0 * acc.wsum), min_sigma2)))


def update_group_scales(acc: HalfAccumulator, counts: NDArray[np.int64]) -> NDArray[np.float64]:
    """s_g = Σ Re(CTF P conj X) / Σ |CTF P|², clamped to [median/5, 5 median], count-weighted mean 1."""
    ok = acc.scale_den > 0
    s = np.ones(len(acc.scale_den))
    s[ok] = acc.scale_num[ok] / acc.scale_den[ok]
    s[~ok] = np.median(s[ok]) if ok.any() else 1.0
    med = float(np.median(s))
    s = np.clip(s, med / 5.0, 5.0 * med) if med > 0 else np.ones_like(s)
    mean = float((s * counts).sum() / max(counts.sum(), 1))
    return s / mean if mean > 0 else np.ones_like(s)


def update_model_statistics(model: HalfModel, acc: HalfAccumulator, boxes: dict[int, int], group_counts,
                            do_norm: bool, do_scale: bool, min_sigma2_offset: float, cc_iteration: bool) -> HalfModel:
    """All non-reconstruction M-step updates of one half; the CC iteration (RELION's maximizationOtherParameters)
    updates neither σ² nor the group scales, and its log-likelihood is the mean correlation."""
    model = replace(model, ave_pmax=acc.pmax_sum / max(acc.count, 1),
                    log_likelihood=acc.ll_sum / max(acc.count, 1) if cc_iteration else acc.ll_sum)
    if not cc_iteration:
        model = replace(model, sigma2=update_noise(acc, boxes, model.sigma2))
    model = replace(model, sigma_offset=update_offset_sigma(acc, model.sigma_offset, min_sigma2_offset))
    if do_norm and acc.wsum > 0:
        model = replace(model, norm_average=acc.norm_sum / acc.wsum)
    if do_scale and len(group_counts) > 1 and not cc_iteration:
        model = replace(model, group_scales=update_group_scales(acc, group_counts))
    if acc.pdf.size and acc.pdf.sum() > 0:
        model = replace(model, pdf_direction=acc.pdf / acc.pdf.sum())
    return model


def with_uniform_directions(model: HalfModel, n_directions: int) -> HalfModel:
    """The model with a uniform direction prior over a new grid of n_directions (after a finer sampling)."""
    return replace(model, pdf_direction=np.full(n_directions, 1.0 / n_directions))


def with_reference(model: HalfModel, volume: NDArray, stats: dict) -> HalfModel:
    """The model with a new reference and the per-shell statistics of its reconstruction (ssnr_from_fsc)."""
    return replace(model, volume=volume, tau2=stats["tau2"], ssnr=stats["ssnr"], sigma2_ref=stats["sigma2"],
                   coverage=stats["coverage"])


def reconstruct_half(bp: bpm.BackProjector, fsc: NDArray, tau2_fudge: float, angpix: float, lowpass_A: float,
                     solvent_mask: NDArray | None) -> tuple[NDArray[np.float32], dict]:
    """One half's regularised map (τ² from the half-map FSC), low-passed after a CC iteration (lowpass_A > 0)
    and solvent-flattened when a mask is given; returns (map, shell statistics)."""
    stats = bpm.ssnr_from_fsc(bp, fsc, tau2_fudge, final=False)
    vol = bpm.reconstruct(bp, tau2=stats["tau2"], tau2_fudge=tau2_fudge)
    if lowpass_A > 0:
        vol = lowpass_raised_cosine(vol, angpix, lowpass_A)
    if solvent_mask is not None:
        vol = vol * solvent_mask
    return vol.astype(np.float32), stats


def reconstruct_joined(bp1: bpm.BackProjector, bp2: bpm.BackProjector, fsc: NDArray,
                       tau2_fudge: float) -> tuple[NDArray, dict]:
    """The final map from both halves' sums, τ² from the full-data correlation sqrt(2f/(1+f)) (§6.2)."""
    joined = bpm.add(bp1, bp2)
    stats = bpm.ssnr_from_fsc(joined, fsc, tau2_fudge, final=True)
    return bpm.reconstruct(joined, tau2=stats["tau2"], tau2_fudge=tau2_fudge), stats
