"""RELION's `_angdist.bild` (Chimera/ChimeraX BILD) of the viewing-direction distribution (spec §10.1).

Layout as RELION's HealpixSampling::writeBildFileOrientationalDistribution, called with R = offset =
box·angpix/2 (Å): for every asymmetric-unit direction v of the HEALPix grid with n > 0 particles, one line
`.color c 0 1-c` and one line `.cylinder x1 y1 z1 x2 y2 z2 width` from R·v + (R, R, R) to
(R + 0.3·R·n/n_max)·v + (R, R, R). The offset puts the spikes around the map, whose origin ChimeraX places at
the box corner. c = (clip((n − mean)/sd, −1, 5) + 1)/6 (blue: at or below the mean, red: 5 sd above), mean and sd
over all asymmetric-unit directions; width = 0.5·π·R·step/360 with step the grid's angular step (deg).
Numbers are written like C++ streams (6 significant digits).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.spatial import cKDTree

from cryorefine.geometry.euler import projection_direction
from cryorefine.geometry.sampling import angular_step, direction_vectors, directions
from cryorefine.geometry.symmetry import symmetry_matrices

RMAX_FRAC = 0.3     # RELION's Rmax_frac: the longest cylinder is 30 % of R
WIDTH_FRAC = 0.5    # RELION's width_frac: cylinders half as wide as the grid spacing
MIN_LENGTH = 0.01   # Å per coordinate: RELION skips shorter cylinders (Chimera complains about them)


def fold_directions(rot: ArrayLike, tilt: ArrayLike, sym: str, order: int) -> tuple[NDArray, NDArray]:
    """Index into the asymmetric-unit directions at `order` of each particle's viewing direction (the nearest
    of its symmetry mates R·d), and those directions' unit vectors (n_asu, 3)."""
    _, r, t = directions(order, sym)
    asu = direction_vectors(r, t)
    d = projection_direction(rot, tilt).reshape(-1, 3)
    if d.shape[0] == 0:
        return np.zeros(0, dtype=np.int64), asu
    mates = np.einsum("gij,nj->ngi", symmetry_matrices(sym), d)            # (n, |G|, 3)
    dist, idx = cKDTree(asu).query(mates.reshape(-1, 3))
    dist, idx = dist.reshape(mates.shape[:2]), idx.reshape(mates.shape[:2])
    best = np.argmin(dist, axis=1)
    return idx[np.arange(len(d)), best].astype(np.int64), asu


def direction_counts(rot: ArrayLike, tilt: ArrayLike, sym: str, order: int) -> tuple[NDArray, NDArray]:
    """(unit vectors (n_asu, 3), particle count per asymmetric-unit direction) at HEALPix `order`."""
    idx, asu = fold_directions(rot, tilt, sym, order)
    return asu, np.bincount(idx, minlength=len(asu))


def bild_text(vectors: ArrayLike, counts: ArrayLike, box: int, angpix: float, step_deg: float) -> str:
    """BILD text of cylinders for per-direction counts (RELION's layout, see the module docstring)."""
    v = np.asarray(vectors, dtype=np.float64).reshape(-1, 3)
    n = np.asarray(counts, dtype=np.float64).ravel()
    if n.size == 0 or n.max() <= 0:
        return ""
    r = box * angpix / 2.0
    mean, sd = float(n.mean()), float(n.std(ddof=1)) if n.size > 1 else 0.0
    col = (np.clip((n - mean) / sd if sd > 0 else np.zeros_like(n), -1.0, 5.0) + 1.0) / 6.0
    rp = r + RMAX_FRAC * r * n / n.max()
    width = WIDTH_FRAC * np.pi * r * step_deg / 360.0
    lines = []
    for vi, ni, ci, rpi in zip(v, n, col, rp):
        if ni <= 0 or not np.any(np.abs((r - rpi) * vi) > MIN_LENGTH):
            continue
        a, b = r * vi + r, rpi * vi + r
        lines.append(f".color {ci:g} 0 {1.0 - ci:g}")
        lines.append(".cylinder " + " ".join(f"{x:g}" for x in (*a, *b)) + f" {width:g}")
    return "\n".join(lines) + ("\n" if lines else "")


def angdist_bild(rot: ArrayLike, tilt: ArrayLike, box: int, angpix: float, sym: str = "C1", order: int = 3) -> str:
    """RELION's `_angdist.bild` for particles with these viewing angles (deg), on the asymmetric-unit
    HEALPix grid of `order` (the run's current sampling order) for point group `sym`."""
    vectors, counts = direction_counts(rot, tilt, sym, order)
    return bild_text(vectors, counts, box, angpix, angular_step(order))
