"""Centred Fourier transforms with RELION's conventions.

Real-space origin at index N//2 on every axis; forward transform normalised by 1/(number of
real samples), inverse unnormalised; half-complex (rfft) layout with kx in [0, N/2] last and
ky (kz) in FFT order, so element [i, j] has ky = i if i <= N/2 else i - N, kx = j.
"""

from __future__ import annotations

import numpy as np
import scipy.fft as sfft
from numpy.typing import NDArray

_WORKERS = -1  # all cores; scipy.fft threads over the batch


def rfft2_centered(images: NDArray) -> NDArray[np.complex64]:
    """(..., N, N) real images -> (..., N, N//2+1) transforms, origin at pixel N//2, scaled 1/N^2."""
    images = np.asarray(images)
    shifted = sfft.ifftshift(images, axes=(-2, -1))
    ft = sfft.rfft2(shifted, axes=(-2, -1), norm="forward", workers=_WORKERS)
    return ft.astype(np.complex64 if images.dtype != np.float64 else np.complex128, copy=False)


def irfft2_centered(ft: NDArray, n: int | None = None) -> NDArray:
    """Inverse of rfft2_centered: (..., N, N//2+1) -> (..., N, N) real, origin at N//2."""
    n = ft.shape[-2] if n is None else n
    img = sfft.irfft2(ft, s=(n, n), axes=(-2, -1), norm="forward", workers=_WORKERS)
    return sfft.fftshift(img, axes=(-2, -1))


def rfftn_centered(volume: NDArray) -> NDArray:
    """(N, N, N) real map -> (N, N, N//2+1) transform, origin at voxel N//2, scaled 1/N^3."""
    shifted = sfft.ifftshift(volume)
    return sfft.rfftn(shifted, norm="forward", workers=_WORKERS)


def irfftn_centered(ft: NDArray, n: int | None = None) -> NDArray:
    """Inverse of rfftn_centered: (N, N, N//2+1) -> (N, N, N) real, origin at N//2."""
    n = ft.shape[0] if n is None else n
    vol = sfft.irfftn(ft, s=(n, n, n), norm="forward", workers=_WORKERS)
    return sfft.fftshift(vol)


def rfft_freqs_2d(n: int) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Integer (ky, kx) grids of shape (N, N//2+1) for the half-complex layout of an N-box."""
    ky = np.fft.fftfreq(n, 1.0 / n).round().astype(np.int64)
    kx = np.arange(n // 2 + 1, dtype=np.int64)
    return np.broadcast_to(ky[:, None], (n, n // 2 + 1)).copy(), np.broadcast_to(kx[None, :], (n, n // 2 + 1)).copy()


def rfft_freqs_3d(n: int) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
    """Integer (kz, ky, kx) grids of shape (N, N, N//2+1) for the half-complex layout of an N-cube."""
    k = np.fft.fftfreq(n, 1.0 / n).round().astype(np.int64)
    kx = np.arange(n // 2 + 1, dtype=np.int64)
    return np.meshgrid(k, k, kx, indexing="ij")


def freq_radius(shape: tuple[int, ...]) -> NDArray[np.float64]:
    """|k| (Fourier pixels) of every element of the half-complex (rfftn) layout of a real array of `shape`."""
    axes = [np.fft.fftfreq(n, 1.0 / n) for n in shape[:-1]] + [np.arange(shape[-1] // 2 + 1, dtype=np.float64)]
    grids = np.meshgrid(*axes, indexing="ij", sparse=True)
    return np.sqrt(sum(g * g for g in grids))


def real_radius(box: int, ndim: int) -> NDArray[np.float64]:
    """Distance (px) of every pixel/voxel of an N^ndim box from the centre N//2."""
    c = np.arange(box, dtype=np.float64) - box // 2
    grids = np.meshgrid(*([c] * ndim), indexing="ij", sparse=True)
    return np.sqrt(sum(g * g for g in grids))


def shell_index(shape: tuple[int, ...]) -> NDArray[np.int64]:
    """round(|k|) (the shell) of every element of the half-complex layout of a real array of `shape`."""
    return np.rint(freq_radius(shape)).astype(np.int64)


def shell_index_2d(n: int) -> NDArray[np.int64]:
    """round(|k|) for every element of the (N, N//2+1) half-complex layout."""
    return shell_index((n, n))


def shell_index_3d(n: int) -> NDArray[np.int64]:
    """round(|k|) for every element of the (N, N, N//2+1) half-complex layout."""
    return shell_index((n, n, n))


def unique_halfplane_mask(n: int) -> NDArray[np.bool_]:
    """RELION's unique half-plane pixel set: all rfft pixels except kx == 0 with ky < 0."""
    ky, kx = rfft_freqs_2d(n)
    return ~((kx == 0) & (ky < 0))
