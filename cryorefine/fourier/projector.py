"""Central-slice projector (RELION Projector::computeFourierTransformMap + project).

`make_projector` turns a real map V (N³, origin at voxel N//2) into its padded, gridding-pre-corrected
3D transform, stored as the half-cube of `kernels` (R = round(pad·r_max)). `project` samples it at
pad·Aᵀ(kx, ky, 0) so that the result equals `transforms.rfft2_centered` of the real-space projection
p(x, y) = Σ_z V(Aᵀ(x, y, z)) (same 1/N² scale), up to interpolation error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.fft as sfft
from numpy.typing import NDArray

from cryorefine.errors import check
from cryorefine.fourier import kernels
from cryorefine.fourier.transforms import real_radius


@dataclass
class Projector:
    """Padded centred half-cube transform ft3d (kernels layout) of an ori_size³ map; samples |k| ≤ r_max."""

    ft3d: NDArray[np.complex64]
    pad: int
    ori_size: int
    r_max: float


def gridding_sinc2(n: int, pad: int) -> NDArray[np.float64]:
    """sinc²(d/(pad·n)) per voxel, d = distance from the centre: the trilinear interpolation envelope."""
    return np.sinc(real_radius(n, 3) / (pad * n)) ** 2


def make_projector(volume: NDArray, pad: int = 2, r_max: float | None = None) -> Projector:
    """V (N,N,N) real -> Projector; divides by sinc², zero-pads to pad·N, centred FFT scaled 1/N² (§3.5)."""
    volume = np.asarray(volume)
    check(volume.ndim == 3 and volume.shape[0] == volume.shape[1] == volume.shape[2],
            f"map: expected a cubic 3D map, got shape {volume.shape}")
    check(int(pad) == pad and pad >= 1, f"padding factor: must be a positive integer, got {pad}")
    n = volume.shape[0]
    pad = int(pad)
    r_max = n / 2 if r_max is None else float(r_max)
    check(0 < r_max <= n / 2, f"r_max: must be in (0, {n / 2}], got {r_max}")
    p = pad * n
    radius = int(round(pad * r_max))

    big = np.zeros((p, p, p), dtype=np.float32)
    o = p // 2 - n // 2
    big[o:o + n, o:o + n, o:o + n] = volume / gridding_sinc2(n, pad)
    # origin at voxel p//2, unnormalised FFT / N² = the 2D image-transform scale of a projection
    ft = sfft.rfftn(sfft.ifftshift(big), workers=-1)
    del big
    ft *= np.float32(1.0 / (n * n))

    # gather the half-cube: periodic in y, z; ξx beyond the rfft range (only the rim when R = p/2)
    # from Hermitian symmetry. Values just outside R stay: they are trilinear neighbours of |ξ| ≤ R.
    freqs = np.arange(-(radius + 1), radius + 2)
    idx = np.mod(freqs, p)
    shape = kernels.half_cube_shape(radius)
    ft3d = np.zeros(shape, dtype=np.complex64)
    nx_direct = min(shape[2], p // 2 + 1)
    ft3d[:, :, :nx_direct] = ft[np.ix_(idx, idx, np.arange(nx_direct))]
    if nx_direct < shape[2]:
        xs = np.arange(nx_direct, shape[2])
        neg = np.mod(-freqs, p)
        ft3d[:, :, nx_direct:] = np.conj(ft[np.ix_(neg, neg, np.mod(-xs, p))])
    return Projector(ft3d=ft3d, pad=pad, ori_size=n, r_max=r_max)


def project(projector: Projector, rotations: NDArray, kx: NDArray, ky: NDArray,
            out: NDArray | None = None) -> NDArray[np.complex64]:
    """Central-slice values V̂(Aᵀ(kx, ky, 0)) at float Fourier pixels of the N-box -> (n, m) (into `out` when given);
    0 beyond r_max."""
    return kernels.project_points(projector.ft3d, rotations, kx, ky, projector.pad, projector.r_max, out)


def grid_frequencies(size: int) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """(kx, ky) flattened over the (size, size//2+1) rfft layout of a size-box: ky = i if i <= size/2 else i - size."""
    ky = np.fft.fftfreq(size, 1.0 / size).round()
    ky[size // 2] = size // 2  # row size/2 is +Nyquist, as in transforms.rfft_freqs_2d
    kx = np.arange(size // 2 + 1)
    return (np.broadcast_to(kx[None, :], (size, kx.size)).ravel().astype(np.float32),
            np.broadcast_to(ky[:, None], (size, kx.size)).ravel().astype(np.float32))


def project_grid(projector: Projector, rotations: NDArray, size: int | None = None) -> NDArray[np.complex64]:
    """Slices on the rfft layout of a size-box (Fourier crop of the N-box slice) -> (n, size, size//2+1)."""
    size = projector.ori_size if size is None else int(size)
    check(2 <= size <= projector.ori_size and size % 2 == 0,
            f"size: must be even and at most {projector.ori_size}, got {size}")
    kx, ky = grid_frequencies(size)
    rotations = np.asarray(rotations, dtype=np.float64).reshape(-1, 3, 3)
    return project(projector, rotations, kx, ky).reshape(rotations.shape[0], size, size // 2 + 1)
