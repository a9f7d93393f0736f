"""Fourier filters, soft masks, shifts and image normalisation (RELION conventions, spec §2.1, §3.4, §7, §9).

Real-space centre at index N//2 on every axis; radii in pixels; Fourier pixels k of the N-box.
"""

from __future__ import annotations

import numba
import numpy as np
from numpy.typing import ArrayLike, NDArray

from cryorefine.fourier.transforms import (freq_radius, irfft2_centered, irfftn_centered, real_radius, rfft2_centered,
                                          rfftn_centered, shell_index_2d)


def raised_cosine_lowpass_profile(r: ArrayLike, shell: float, width_shells: float = 2.0) -> NDArray[np.float64]:
    """RELION's low-pass factor at frequency radius r (Fourier px): 1 below shell − w/2, 0 above shell + w/2,
    ½ − ½cos(π(shell + w/2 − r)/w) in between (initialLowPassFilterReferences, WIDTH_FMASK_EDGE = w)."""
    r = np.asarray(r, dtype=np.float64)
    lo, hi = shell - width_shells / 2.0, shell + width_shells / 2.0
    edge = 0.5 - 0.5 * np.cos(np.pi * (hi - r) / width_shells)
    return np.where(r < lo, 1.0, np.where(r > hi, 0.0, edge))


def lowpass_raised_cosine(volume_or_ft: NDArray, angpix: float, resolution_A: float,
                          width_shells: float = 2.0, box: int | None = None) -> NDArray:
    """Low-pass a real map/image (returned real) or its half-complex transform (returned complex) at
    resolution_A with a raised-cosine edge `width_shells` wide centred on shell r_h = N·p/res (spec §7)."""
    data = np.asarray(volume_or_ft)
    is_ft = np.iscomplexobj(data)
    n = (box or data.shape[0]) if is_ft else data.shape[0]
    ft = data if is_ft else (rfftn_centered(data) if data.ndim == 3 else np.fft.rfft2(np.fft.ifftshift(data)))
    shape = tuple([n] * ft.ndim)
    prof = raised_cosine_lowpass_profile(freq_radius(shape), n * angpix / resolution_A, width_shells)
    out = ft * prof
    if is_ft:
        return out.astype(data.dtype, copy=False)
    if data.ndim == 3:
        res = irfftn_centered(out, n)
    else:
        res = np.fft.fftshift(np.fft.irfft2(out, s=(n, n)))
    return res.astype(data.dtype if data.dtype.kind == "f" else np.float64, copy=False)


def soft_sphere_mask(box: int, radius_px: float, edge_px: float, ndim: int = 3) -> NDArray[np.float64]:
    """1 for r < R, ½ + ½cos(π(r − R)/w) for R ≤ r ≤ R + w, 0 beyond; centre N//2."""
    r = real_radius(box, ndim)
    if edge_px <= 0:
        return (r < radius_px).astype(np.float64) + 0.0 * r
    edge = 0.5 + 0.5 * np.cos(np.pi * (r - radius_px) / edge_px)
    return np.where(r < radius_px, 1.0, np.where(r > radius_px + edge_px, 0.0, edge))


def _filler_weight(r: NDArray, radius: float, width: float) -> NDArray[np.float64]:
    """RELION softMaskOutsideMap blend weight c of the filler: 0 inside R, ½+½cos(π(R+w−r)/w) on the edge, 1 beyond."""
    if width <= 0:
        return (r >= radius).astype(np.float64)
    c = 0.5 + 0.5 * np.cos(np.pi * (radius + width - r) / width)
    return np.where(r < radius, 0.0, np.where(r > radius + width, 1.0, c))


def mask_particles(images: NDArray, radius_px: float, edge_px: float,
                   fill: str | NDArray = "mean") -> NDArray[np.float32]:
    """Soft circular mask of a (n, N, N) stack (spec §2.1 step 5): v ← (1 − c)v + c·filler.

    fill="mean" (--zero_mask): filler = the c-weighted mean of each image's pixels beyond R; otherwise an array of
    noise images (n, N, N) used pixel by pixel (RELION's coloured-noise filler).
    """
    images = np.asarray(images, dtype=np.float32)
    single = images.ndim == 2
    stack = images[None] if single else images
    c = _filler_weight(real_radius(stack.shape[-1], 2), radius_px, edge_px).astype(np.float32)
    if isinstance(fill, str):
        if fill != "mean":
            raise ValueError(f"mask_particles: fill must be 'mean' or an array of noise images, not {fill!r}")
        filler = (np.tensordot(stack, c, axes=([1, 2], [0, 1])) / c.sum()).astype(np.float32)[:, None, None]
    else:
        filler = np.asarray(fill, dtype=np.float32).reshape(stack.shape)
    out = (1.0 - c) * stack + c * filler
    return out[0] if single else out


def coloured_noise(white: NDArray, sigma2: NDArray) -> NDArray[np.float32]:
    """Real images (n, N, N) whose centred transform has Re and Im of variance σ²(r) (E|X(k)|² = 2σ²(r), the
    likelihood's convention) for shells r < len(sigma2), 0 beyond; `white` are standard normal images (n, N, N)."""
    white = np.asarray(white, dtype=np.float64)
    n = white.shape[-1]
    shells = shell_index_2d(n)
    sigma2 = np.asarray(sigma2, dtype=np.float64)
    # a unit-variance white image has E|W(k)|² = 1/N² with the 1/N² forward normalisation
    amp = np.where(shells < len(sigma2), np.sqrt(2.0 * sigma2[np.minimum(shells, len(sigma2) - 1)]) * n, 0.0)
    return irfft2_centered(rfft2_centered(white) * amp, n).astype(np.float32)


def soft_mask_outside_map(volume: NDArray, radius_px: float | None = None, width_px: float = 3.0) -> NDArray:
    """RELION softMaskOutsideMap with the mean filler (spec §3.4 step 4): beyond radius (default N/2) blend
    towards m̄, the raised-cosine-weighted mean of the voxels at r ≥ radius; set to m̄ beyond radius + width."""
    volume = np.asarray(volume)
    radius = volume.shape[0] / 2.0 if radius_px is None else radius_px
    c = _filler_weight(real_radius(volume.shape[0], volume.ndim), radius, width_px)
    csum = c.sum()
    mean_bg = float((c * volume).sum() / csum) if csum > 0 else 0.0
    return ((1.0 - c) * volume + c * mean_bg).astype(volume.dtype if volume.dtype.kind == "f" else np.float64)


def solvent_flatten(volume: NDArray, radius_px: float, edge_px: float, mask: NDArray | None = None) -> NDArray:
    """Reference solvent flattening (spec §9): V·mask, or V·(soft sphere R, edge w) without a user mask (solvent → 0)."""
    volume = np.asarray(volume)
    m = soft_sphere_mask(volume.shape[0], radius_px, edge_px, volume.ndim) if mask is None else np.asarray(mask)
    return (volume * m).astype(volume.dtype if volume.dtype.kind == "f" else np.float64)


@numba.njit(parallel=True, fastmath=True, cache=True)
def _shift_rows(ft, kx, ky, tx, ty, scale, out):  # pragma: no cover - compiled
    n, m = ft.shape
    for i in numba.prange(n):
        a = scale * tx[i]
        b = scale * ty[i]
        for j in range(m):
            ph = a * kx[j] + b * ky[j]
            out[i, j] = ft[i, j] * complex(np.cos(ph), np.sin(ph))


def phase_shift_2d(ft: NDArray, kx: ArrayLike, ky: ArrayLike, shift_x: ArrayLike, shift_y: ArrayLike,
                   box: int) -> NDArray:
    """Translate images by +(shift_x, shift_y) px (content to x + t): ft · exp(−2πi (kx·tx + ky·ty)/box).

    ft: (n, ...) transforms sampled at Fourier pixels (kx, ky) (broadcastable to ft.shape[1:]); shifts: (n,).
    """
    ft = np.asarray(ft)
    n = ft.shape[0]
    tx = np.broadcast_to(np.asarray(shift_x, dtype=np.float64).reshape(-1), (n,))
    ty = np.broadcast_to(np.asarray(shift_y, dtype=np.float64).reshape(-1), (n,))
    kxf = np.broadcast_to(np.asarray(kx, dtype=np.float64), ft.shape[1:]).ravel()
    kyf = np.broadcast_to(np.asarray(ky, dtype=np.float64), ft.shape[1:]).ravel()
    dtype = ft.dtype if np.iscomplexobj(ft) else np.complex128
    flat = np.ascontiguousarray(ft.reshape(n, -1), dtype=dtype)
    out = np.empty_like(flat)
    if flat.size:
        _shift_rows(flat, np.ascontiguousarray(kxf), np.ascontiguousarray(kyf), np.ascontiguousarray(tx),
                    np.ascontiguousarray(ty), -2.0 * np.pi / box, out)
    return out.reshape(ft.shape)


def normalise_background(images: NDArray, bg_radius: float, remove_ramp: bool = True, white_dust: float = -1.0,
                         black_dust: float = -1.0, rng: np.random.Generator | None = None) -> NDArray[np.float32]:
    """RELION image.cpp normalise: remove a least-squares plane fitted to the background (pixels with
    i² + j² > bg_radius², relative to the centre), then make that background mean 0 and (population) std 1.
    With white_dust (black_dust) > 0, first every pixel more than that many background σ above (below) the
    background mean is replaced by a draw from N(mean, σ²) (removeDust), from `rng`."""
    images = np.asarray(images, dtype=np.float64)
    single = images.ndim == 2
    stack = images[None] if single else images
    n = stack.shape[-1]
    if 2 * bg_radius > n:
        raise ValueError(f"normalise_background: 2·bg_radius = {2 * bg_radius} larger than the box {n}")
    c = np.arange(n, dtype=np.float64) - n // 2
    yy, xx = np.meshgrid(c, c, indexing="ij")
    bg = (xx * xx + yy * yy) > bg_radius * bg_radius
    flat = stack.reshape(stack.shape[0], -1)
    vals = flat[:, bg.ravel()]
    if white_dust > 0 or black_dust > 0:
        flat = remove_dust(flat, vals.mean(axis=1, keepdims=True), vals.std(axis=1, keepdims=True), white_dust,
                           black_dust, rng if rng is not None else np.random.default_rng(0))
        vals = flat[:, bg.ravel()]
    if remove_ramp:
        design = np.stack([xx[bg], yy[bg], np.ones(int(bg.sum()))], axis=1)
        coef, *_ = np.linalg.lstsq(design, vals.T, rcond=None)     # (3, n)
        plane = coef[0][:, None] * xx.ravel()[None] + coef[1][:, None] * yy.ravel()[None] + coef[2][:, None]
        flat = flat - plane
        vals = flat[:, bg.ravel()]
    mean = vals.mean(axis=1, keepdims=True)
    std = vals.std(axis=1, keepdims=True)
    std = np.where(std > 0, std, 1.0)
    out = ((flat - mean) / std).reshape(stack.shape).astype(np.float32)
    return out[0] if single else out


def remove_dust(flat: NDArray, mean: NDArray, std: NDArray, white: float, black: float,
                rng: np.random.Generator) -> NDArray[np.float64]:
    """RELION removeDust on (n, pixels) rows: v − mean > white·σ (white > 0) or v − mean < −black·σ (black > 0)
    replaced by N(mean, σ²) draws; mean, std (n, 1) of each row's background."""
    out = np.array(flat, dtype=np.float64)
    dust = np.zeros(out.shape, bool)
    if white > 0:
        dust |= out - mean > white * std
    if black > 0:
        dust |= out - mean < -black * std
    rows = np.nonzero(dust)[0]
    out[dust] = rng.normal(mean[rows, 0], std[rows, 0])
    return out


fourier_shift_2d = phase_shift_2d  # name used in docs/architecture.md
