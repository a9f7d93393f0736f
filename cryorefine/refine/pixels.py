"""Fourier pixel sets of a particle box: the unique half-plane pixels up to a radius, as flat lists.

Likelihoods, projections and back-projections all work on these lists, (n, m) arrays with m the
number of pixels, so that the coarse pass is matrix products (DESIGN.md §3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from numpy.typing import NDArray

from cryorefine.fourier.aberrations import IDENTITY, mag_frequencies
from cryorefine.fourier.transforms import rfft_freqs_2d, unique_halfplane_mask


@dataclass(frozen=True)
class PixelSet:
    """Unique half-plane pixels of an N_o box with round(|k|) <= size/2, in rfft layout order."""

    box: int                        # N_o, the optics group's box
    size: int                       # current window size C_o (even)
    flat: NDArray[np.int64]         # indices into the flattened (N_o, N_o//2+1) rfft array
    kx: NDArray[np.float64]         # Fourier pixels of the N_o box
    ky: NDArray[np.float64]
    shell: NDArray[np.int64]        # round(|k|) in the N_o box
    model_scale: float              # (N p)/(N_o p_o): multiply kx, ky to get model-box pixels
    mag: tuple[float, float, float, float] = IDENTITY   # rlnMagMat (M00, M01, M10, M11)

    @property
    def m(self) -> int:
        """Number of pixels."""
        return len(self.flat)

    @property
    def kx_model(self) -> NDArray[np.float64]:
        """kx in Fourier pixels of the model box: (s·M·k)_x (fourier.aberrations.model_frequencies)."""
        return self.model_scale * mag_frequencies(self.mag, self.kx, self.ky)[0]

    @property
    def ky_model(self) -> NDArray[np.float64]:
        """ky in Fourier pixels of the model box: (s·M·k)_y."""
        return self.model_scale * mag_frequencies(self.mag, self.kx, self.ky)[1]


@lru_cache(maxsize=32)
def pixel_set(box: int, size: int, model_scale: float = 1.0,
              mag: tuple[float, float, float, float] = IDENTITY) -> PixelSet:
    """Unique half-plane (kx > 0, or kx == 0 and ky >= 0) pixels with round(|k|) <= size/2, DC included;
    `mag` (rlnMagMat) only changes where they sample the model (kx_model, ky_model)."""
    ky, kx = rfft_freqs_2d(box)
    r = np.rint(np.sqrt(kx * kx + ky * ky)).astype(np.int64)
    keep = (r <= size // 2) & unique_halfplane_mask(box)
    flat = np.flatnonzero(keep)
    return PixelSet(box, size, flat, kx.ravel()[flat].astype(np.float64), ky.ravel()[flat].astype(np.float64),
                    r.ravel()[flat], float(model_scale), tuple(float(v) for v in mag))


def optics_size(size: int, box: int, model_scale: float) -> int:
    """C_o = min(N_o, 2·ceil(C/(2·model_scale))): the current size C of the model box in an optics group's box."""
    return min(box, 2 * math.ceil(0.5 * size / model_scale))


@lru_cache(maxsize=16)
def unique_pixels_per_shell(box: int) -> NDArray[np.float64]:
    """Npix(r): number of unique half-plane pixels of each shell 0..box//2 (and beyond, up to the corner)."""
    full = pixel_set(box, 2 * box)
    return np.bincount(full.shell).astype(np.float64)


def shift_phases(ps: PixelSet, shifts_px: NDArray[np.float64]) -> NDArray[np.complex64]:
    """exp(-2 pi i k.t / N_o) for shifts t (T, 2) in px of the box: (T, m); translating content by +t."""
    arg = (-2.0 * np.pi / ps.box) * (shifts_px[:, 0:1] * ps.kx[None, :] + shifts_px[:, 1:2] * ps.ky[None, :])
    return np.exp(1j * arg).astype(np.complex64)
