"""Re-centring refined particles on the micrograph (preprocessing.cpp :: getCoordinateMetaDataTable).

Origins o (rlnOriginX/YAngst, A) are the shift applied to the image that centres the particle, so the
particle centre sits at coordinate - o/angpix_mic in the micrograph. Re-centring folds the integer part
of that offset into the coordinates and leaves the sub-pixel remainder in the origins.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from cryorefine.geometry.euler import euler_to_matrix


def relion_round(x: ArrayLike) -> NDArray[np.float64]:
    """RELION's ROUND: nearest integer, halves away from zero (not numpy's half-to-even)."""
    x = np.asarray(x, dtype=np.float64)
    return np.where(x < 0, np.ceil(x - 0.5), np.floor(x + 0.5))


@dataclass(frozen=True)
class Recentred:
    """New coordinates (micrograph px) and origins (A) after re-centring."""

    coord_x: NDArray[np.float64]
    coord_y: NDArray[np.float64]
    origin_x_A: NDArray[np.float64]
    origin_y_A: NDArray[np.float64]


def recenter(coord_x: ArrayLike, coord_y: ArrayLike, origin_x_A: ArrayLike, origin_y_A: ArrayLike,
             rot: ArrayLike, tilt: ArrayLike, psi: ArrayLike, angpix_part: ArrayLike, angpix_mic: float,
             center_xyz: tuple[float, float, float] = (0.0, 0.0, 0.0),
             ref_angpix: float | None = None) -> Recentred:
    """RELION --recenter: coord_new = coord - round(o), origin_new = (o - round(o)) * angpix_mic.

    o (micrograph px) = (origin/angpix_part - (A(rot,tilt,psi) c)_xy) * angpix_part/angpix_mic, where
    c = center_xyz (reference px relative to its centre; scaled by ref_angpix/angpix_part if given).
    """
    ox = np.asarray(origin_x_A, dtype=np.float64)
    oy = np.asarray(origin_y_A, dtype=np.float64)
    p_part = np.broadcast_to(np.asarray(angpix_part, dtype=np.float64), ox.shape)
    ox, oy = ox / p_part, oy / p_part
    c = np.asarray(center_xyz, dtype=np.float64)
    if np.any(c != 0):
        scale = ref_angpix / p_part if ref_angpix else np.ones_like(p_part)
        projected = np.einsum("...ij,...j->...i", euler_to_matrix(rot, tilt, psi), c * scale[..., None])
        ox = ox - projected[..., 0]
        oy = oy - projected[..., 1]
    ox = ox * p_part / angpix_mic
    oy = oy * p_part / angpix_mic
    rx, ry = relion_round(ox), relion_round(oy)
    return Recentred(coord_x=np.asarray(coord_x, dtype=np.float64) - rx,
                     coord_y=np.asarray(coord_y, dtype=np.float64) - ry,
                     origin_x_A=(ox - rx) * angpix_mic, origin_y_A=(oy - ry) * angpix_mic)

