"""Viewing directions on the sphere for the report: asymmetric-unit cell counts and an equal-area lon/lat grid.

Cells are HEALPix NESTED pixels; a particle counts in the asymmetric-unit cell nearest to any symmetry mate of
its viewing direction (bild.fold_directions). Longitude = rot, latitude = 90° − tilt, in degrees.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike, NDArray

from cryorefine.geometry.healpix import npix
from cryorefine.geometry.sampling import asymmetric_unit_directions, direction_vectors, nearest_pixels
from cryorefine.geometry.symmetry import symmetry_order
from cryorefine.report.bild import direction_counts

MIN_MEAN_PER_CELL = 5.0     # the map's order: the finest with at least this many particles per cell on average


def choose_order(n_particles: int, sym: str, max_order: int) -> int:
    """The finest HEALPix order ≤ max_order (≥ 1) with ≥ MIN_MEAN_PER_CELL particles per asymmetric-unit cell."""
    best = 1
    for order in range(1, max(max_order, 1) + 1):
        if n_particles / max(npix(order) / symmetry_order(sym), 1.0) >= MIN_MEAN_PER_CELL:
            best = order
    return best


def asu_counts(rot: ArrayLike, tilt: ArrayLike, sym: str, order: int) -> NDArray[np.int64]:
    """Particles per asymmetric-unit cell at `order` (cells in asymmetric_unit_directions order)."""
    return direction_counts(rot, tilt, sym, order)[1]


def lonlat_grid(counts: ArrayLike, sym: str, order: int, n_lon: int = 360,
                n_lat: int = 180) -> tuple[NDArray, NDArray, NDArray]:
    """(lon centres, lat centres, counts on the grid): each grid point shows the count of its HEALPix cell,
    NaN for cells outside the asymmetric unit."""
    lon = -180.0 + (np.arange(n_lon) + 0.5) * 360.0 / n_lon
    lat = -90.0 + (np.arange(n_lat) + 0.5) * 180.0 / n_lat
    lo, la = np.meshgrid(lon, lat)
    v = direction_vectors(lo.ravel(), 90.0 - la.ravel())
    cell = nearest_pixels(order, v)
    full = np.full(npix(order), np.nan)
    full[asymmetric_unit_directions(order, sym)] = np.asarray(counts, float)
    return lon, lat, full[cell].reshape(n_lat, n_lon)


def empty_fraction(counts: ArrayLike) -> float:
    """Fraction of cells with no particle."""
    c = np.asarray(counts)
    return float(np.mean(c == 0)) if c.size else math.nan
