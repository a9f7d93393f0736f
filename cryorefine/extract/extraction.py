"""Boxing particles out of a micrograph as `relion_preprocess --extract` does (preprocessing.cpp).

Per particle: window an `extract_size` box with micrograph pixel (int)coordinate at box index
size//2 (pixels beyond the micrograph edge are filled by edge replication) -> optional Fourier
rescale to `scale` (RELION resizeMap) -> optional background normalisation (least-squares plane
removed, then mean 0 / population std 1 over pixels with i^2 + j^2 > bg_radius^2) -> optional
contrast inversion.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
from numpy.typing import ArrayLike, NDArray

from cryorefine.fourier.filters import normalise_background
from cryorefine.fourier.resize import resize_fourier


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
    white_dust: float = -1.0          # with norm: replace pixels this many background σ above the mean (<= 0: off)
    black_dust: float = -1.0          # ... below the mean
    seed: int = 0                     # of the dust replacement draws (one stream per micrograph)

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
    # clipped first: a coordinate such as 1e300 (wholly outside, reported as such) has no int64
    lim = float(2 ** 62)
    cx = np.clip(np.trunc(np.asarray(coord_x, dtype=np.float64)), -lim, lim).astype(np.int64)
    cy = np.clip(np.trunc(np.asarray(coord_y, dtype=np.float64)), -lim, lim).astype(np.int64)
    return cx - box // 2, cy - box // 2


def crosses_edge(coord_x: ArrayLike, coord_y: ArrayLike, box: int, shape: tuple[int, int]) -> NDArray[np.bool_]:
    """True where the box around (int)coord has pixels outside a micrograph of shape (ny, nx)."""
    x0, y0 = box_corners(coord_x, coord_y, box)
    ny, nx = shape
    return (x0 < 0) | (y0 < 0) | (x0 + box > nx) | (y0 + box > ny)


def wholly_outside(coord_x: ArrayLike, coord_y: ArrayLike, box: int, shape: tuple[int, int]) -> NDArray[np.bool_]:
    """True where the box around (int)coord holds no pixel of a micrograph of shape (ny, nx): RELION stops the job
    on such a box (preprocessing.cpp, "lies completely outside micrograph"); one that overlaps is edge-filled."""
    x0, y0 = box_corners(coord_x, coord_y, box)
    ny, nx = shape
    return (x0 + box - 1 < 0) | (y0 + box - 1 < 0) | (x0 >= nx) | (y0 >= ny)


def window_particles(micrograph: NDArray, coord_x: ArrayLike, coord_y: ArrayLike, box: int) -> NDArray[np.float32]:
    """(n, box, box) boxes with micrograph pixel (int)coord at index box//2; outside pixels = nearest edge pixel."""
    mic = np.asarray(micrograph)
    x0, y0 = box_corners(coord_x, coord_y, box)
    ar = np.arange(box)
    # Clipping the indices is exactly RELION's fill (x columns, then y rows, copied from the nearest inside one).
    cols = np.clip(x0[:, None] + ar[None, :], 0, mic.shape[1] - 1)
    rows = np.clip(y0[:, None] + ar[None, :], 0, mic.shape[0] - 1)
    return mic[rows[:, :, None], cols[:, None, :]].astype(np.float32, copy=False)


def process_boxes(boxes: NDArray, params: ExtractParams, rng: np.random.Generator | None = None) -> NDArray[np.float32]:
    """Rescale -> normalise (dust removal first) -> invert, in RELION's order, for (n, extract_size, extract_size)
    boxes."""
    out = np.asarray(boxes, dtype=np.float32)
    if len(out) == 0:
        return np.zeros((0, params.out_size, params.out_size), np.float32)
    if params.scale and params.scale != params.extract_size:
        out = resize_fourier(out, params.scale, stack=True)   # RELION resizeMap per image
    if params.norm:
        out = normalise_background(out, params.out_bg_radius, remove_ramp=params.ramp, white_dust=params.white_dust,
                                   black_dust=params.black_dust, rng=rng)
    if params.invert_contrast:
        out = -out
    return out.astype(np.float32, copy=False)


def crop_keep(coord_x: ArrayLike, coord_y: ArrayLike, params: ExtractParams, shape: tuple[int, int]) -> NDArray[np.bool_]:
    """Input rows that get a particle: all, or (with skip_outside) those whose box lies inside the micrograph."""
    if params.skip_outside:
        return ~crosses_edge(coord_x, coord_y, params.extract_size, shape)
    return np.ones(np.shape(coord_x), dtype=bool)


def iter_particles(micrograph: NDArray, coord_x: ArrayLike, coord_y: ArrayLike, params: ExtractParams,
                   chunk: int = 256, stream: int = 0) -> Iterator[NDArray[np.float32]]:
    """Processed particles of the given boxes, `chunk` at a time (bounded memory for big boxes); `stream` (the
    micrograph's index) keeps the dust draws of every micrograph the same whichever process extracts it."""
    cx = np.asarray(coord_x, dtype=np.float64)
    cy = np.asarray(coord_y, dtype=np.float64)
    rng = np.random.default_rng([params.seed, stream])
    for s in range(0, len(cx), chunk):
        yield process_boxes(window_particles(micrograph, cx[s:s + chunk], cy[s:s + chunk], params.extract_size), params,
                            rng)


def extract_from_micrograph(micrograph: NDArray, coord_x: ArrayLike, coord_y: ArrayLike,
                            params: ExtractParams) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
    """All particles of one micrograph in memory, and the mask of kept input rows (see crop_keep)."""
    keep = crop_keep(coord_x, coord_y, params, micrograph.shape)
    cx = np.asarray(coord_x, dtype=np.float64)[keep]
    cy = np.asarray(coord_y, dtype=np.float64)[keep]
    parts = list(iter_particles(micrograph, cx, cy, params))
    images = np.concatenate(parts) if parts else np.zeros((0, params.out_size, params.out_size), np.float32)
    return images, keep
