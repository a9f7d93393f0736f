"""Boxing particles out of a micrograph as `relion_preprocess --extract` does (preprocessing.cpp).

Per particle: window an `extract_size` box with micrograph pixel (int)coordinate at box index
size//2 (pixels beyond the micrograph edge are filled by edge replication) -> optional Fourier
rescale to `scale` (RELION resizeMap) -> optional background normalisation (least-squares plane
removed, then mean 0 / population std 1 over pixels with i^2 + j^2 > bg_radius^2) -> optional
contrast inversion.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

try:  # H1's RELION resizeMap; the private copy below is the same operation
    from cryorefine.fourier.resize import resize_fourier as _resize_fourier
except ImportError:  # pragma: no cover - only while fourier/resize.py is not in the tree
    _resize_fourier = None


@dataclass(frozen=True)
class ExtractParams:
    """What to do to every box: sizes in px (extract_size on the micrograph, scale = output box)."""

    extract_size: int
    scale: int | None = None          # output box after Fourier rescaling; None = extract_size
    norm: bool = False
    bg_radius: int | None = None      # px of the output box; None = floor(0.375 * output box)
    ramp: bool = True
    invert_contrast: bool = False
    skip_outside: bool = False

    @property
    def out_size(self) -> int:
        """Box of the written particles (px)."""
        return self.scale if self.scale else self.extract_size

    @property
    def out_bg_radius(self) -> int:
        """Background radius in output pixels (GUI default: 75 % of the box diameter)."""
        return int(self.bg_radius) if self.bg_radius is not None else default_bg_radius(self.out_size)


def default_bg_radius(box: int) -> int:
    """RELION GUI default background radius, floor(0.375 * box) px."""
    return int(np.floor(0.375 * box))


def output_angpix(mic_angpix: float, extract_size: int, scale: int | None) -> float:
    """Pixel size (A) of particles boxed at extract_size and Fourier-rescaled to scale."""
    return float(mic_angpix) * extract_size / scale if scale else float(mic_angpix)


def box_corners(coord_x: ArrayLike, coord_y: ArrayLike, box: int) -> tuple[NDArray, NDArray]:
    """0-based micrograph (x0, y0) of each box's first pixel: (int)coord - box//2 (C truncation)."""
    cx = np.trunc(np.asarray(coord_x, dtype=np.float64)).astype(np.int64)
    cy = np.trunc(np.asarray(coord_y, dtype=np.float64)).astype(np.int64)
    return cx - box // 2, cy - box // 2


def crosses_edge(coord_x: ArrayLike, coord_y: ArrayLike, box: int, shape: tuple[int, int]) -> NDArray[np.bool_]:
    """True where the box around (int)coord has pixels outside a micrograph of shape (ny, nx)."""
    x0, y0 = box_corners(coord_x, coord_y, box)
    ny, nx = shape
    return (x0 < 0) | (y0 < 0) | (x0 + box > nx) | (y0 + box > ny)


def window_particles(micrograph: NDArray, coord_x: ArrayLike, coord_y: ArrayLike, box: int) -> NDArray[np.float32]:
    """(n, box, box) boxes with micrograph pixel (int)coord at index box//2; outside pixels = nearest edge pixel."""
    mic = np.asarray(micrograph)
    x0, y0 = box_corners(coord_x, coord_y, box)
    ar = np.arange(box)
    # Clipping the indices is exactly RELION's fill (x columns, then y rows, copied from the nearest inside one).
    cols = np.clip(x0[:, None] + ar[None, :], 0, mic.shape[1] - 1)
    rows = np.clip(y0[:, None] + ar[None, :], 0, mic.shape[0] - 1)
    return mic[rows[:, :, None], cols[:, None, :]].astype(np.float32, copy=False)


def resize_fourier(images: NDArray, new_size: int) -> NDArray[np.float32]:
    """RELION resizeMap for (n, N, N) images: window the 1/N^2-scaled FFT to N', unscaled inverse (mean kept)."""
    if _resize_fourier is not None:
        return np.asarray(_resize_fourier(images, new_size), dtype=np.float32)
    return _resize_fourier_private(images, new_size)


def _resize_fourier_private(images: NDArray, new_size: int) -> NDArray[np.float32]:
    """Fourier crop/pad of a stack (origin at pixel 0 or N//2 give the same result for even sizes)."""
    images = np.asarray(images, dtype=np.float64)
    n = images.shape[-1]
    if new_size == n:
        return images.astype(np.float32)
    ft = np.fft.rfft2(images, norm="forward")
    m = min(n, new_size)
    out = np.zeros(images.shape[:-2] + (new_size, new_size // 2 + 1), dtype=ft.dtype)
    # rows ky = 0 .. m/2 (positive, incl. the new Nyquist taken from +m/2) and ky = -m/2+1 .. -1
    out[..., : m // 2 + 1, : m // 2 + 1] = ft[..., : m // 2 + 1, : m // 2 + 1]
    out[..., new_size - m // 2 + 1:, : m // 2 + 1] = ft[..., n - m // 2 + 1:, : m // 2 + 1]
    return np.fft.irfft2(out, s=(new_size, new_size), norm="forward").astype(np.float32)


def background_mask(box: int, bg_radius: int) -> NDArray[np.bool_]:
    """Background pixels: i^2 + j^2 > bg_radius^2 with (i, j) relative to pixel box//2 (RELION normalise)."""
    c = np.arange(box) - box // 2
    return (c[:, None] ** 2 + c[None, :] ** 2) > int(bg_radius) ** 2


def normalise_background(images: NDArray, bg_radius: int, ramp: bool = True) -> NDArray[np.float32]:
    """Subtract the background's least-squares plane (if ramp), then scale to background mean 0, population std 1.

    Background = pixels with i^2 + j^2 > bg_radius^2 about pixel N//2. A flat background (std < 1e-10)
    is left unscaled, as RELION does.
    """
    imgs = np.asarray(images, dtype=np.float64)
    n = imgs.shape[-1]
    mask = background_mask(n, bg_radius)
    c = np.arange(n, dtype=np.float64) - n // 2
    jj, ii = np.meshgrid(c, c)
    flat = imgs.reshape(imgs.shape[0], -1)
    bg = flat[:, mask.ravel()]
    if ramp:
        design = np.stack([jj[mask], ii[mask], np.ones(mask.sum())], axis=1)   # z = a x + b y + c
        coef, *_ = np.linalg.lstsq(design, bg.T, rcond=None)                   # (3, n_images)
        plane = coef[0][:, None, None] * jj + coef[1][:, None, None] * ii + coef[2][:, None, None]
        imgs = imgs - plane
        bg = imgs.reshape(imgs.shape[0], -1)[:, mask.ravel()]
    mean = bg.mean(axis=1)
    std = bg.std(axis=1)
    std = np.where(std < 1e-10, 1.0, std)
    return ((imgs - mean[:, None, None]) / std[:, None, None]).astype(np.float32)


def process_boxes(boxes: NDArray, params: ExtractParams) -> NDArray[np.float32]:
    """Rescale -> normalise -> invert, in RELION's order, for (n, extract_size, extract_size) boxes."""
    out = np.asarray(boxes, dtype=np.float32)
    if len(out) == 0:
        return np.zeros((0, params.out_size, params.out_size), np.float32)
    if params.scale and params.scale != params.extract_size:
        out = resize_fourier(out, params.scale)
    if params.norm:
        out = normalise_background(out, params.out_bg_radius, ramp=params.ramp)
    if params.invert_contrast:
        out = -out
    return out.astype(np.float32, copy=False)


def extract_from_micrograph(micrograph: NDArray, coord_x: ArrayLike, coord_y: ArrayLike,
                            params: ExtractParams, chunk: int = 256) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
    """Particles boxed from one micrograph and the mask of kept input rows (edge-crossers dropped if skip_outside)."""
    cx = np.asarray(coord_x, dtype=np.float64)
    cy = np.asarray(coord_y, dtype=np.float64)
    keep = np.ones(len(cx), dtype=bool)
    if params.skip_outside:
        keep = ~crosses_edge(cx, cy, params.extract_size, micrograph.shape)
    idx = np.flatnonzero(keep)
    out = np.empty((len(idx), params.out_size, params.out_size), np.float32)
    for s in range(0, len(idx), chunk):   # bounded temporary memory for large boxes
        sel = idx[s:s + chunk]
        out[s:s + len(sel)] = process_boxes(window_particles(micrograph, cx[sel], cy[sel], params.extract_size), params)
    return out, keep
