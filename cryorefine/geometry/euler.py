"""RELION ZYZ Euler angles (degrees) <-> 3x3 matrices A = Rz(psi) Ry(tilt) Rz(rot) (euler.cpp).

A maps map coordinates to image coordinates: a map point p lands at image position (A p)_xy,
and the central slice of the 3D transform at (kx, ky) is V^(A^T (kx, ky, 0)).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray


def euler_to_matrix(rot: ArrayLike, tilt: ArrayLike, psi: ArrayLike) -> NDArray[np.float64]:
    """RELION Euler_angles2matrix for arrays of angles in degrees -> (..., 3, 3)."""
    a, b, g = (np.deg2rad(np.asarray(x, dtype=np.float64)) for x in (rot, tilt, psi))
    a, b, g = np.broadcast_arrays(a, b, g)
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    m = np.empty(a.shape + (3, 3))
    m[..., 0, 0] = cg * cc - sg * sa
    m[..., 0, 1] = cg * cs + sg * ca
    m[..., 0, 2] = -cg * sb
    m[..., 1, 0] = -sg * cc - cg * sa
    m[..., 1, 1] = -sg * cs + cg * ca
    m[..., 1, 2] = sg * sb
    m[..., 2, 0] = sc
    m[..., 2, 1] = ss
    m[..., 2, 2] = cb
    return m


def matrix_to_euler(m: ArrayLike) -> tuple[NDArray, NDArray, NDArray]:
    """RELION Euler_matrix2angles for (..., 3, 3) -> (rot, tilt, psi) in degrees, tilt in [0, 180]."""
    m = np.asarray(m, dtype=np.float64)
    abs_sb = np.sqrt(m[..., 0, 2] ** 2 + m[..., 1, 2] ** 2)
    regular = abs_sb > 16 * np.finfo(np.float32).eps
    psi = np.arctan2(m[..., 1, 2], -m[..., 0, 2])
    rot = np.arctan2(m[..., 2, 1], m[..., 2, 0])
    sign_sb = np.where(np.sin(psi) == 0, np.sign(-m[..., 0, 2] * np.cos(psi)),
                       np.sign(m[..., 1, 2] * np.sin(psi)))
    sign_sb = np.where(sign_sb == 0, 1.0, sign_sb)
    tilt = np.arctan2(sign_sb * abs_sb, m[..., 2, 2])
    # Degenerate tilt (0 or 180): rot and psi are not separable; RELION puts it all in psi.
    up = m[..., 2, 2] > 0
    psi_deg = np.where(up, np.arctan2(-m[..., 1, 0], m[..., 0, 0]), np.arctan2(m[..., 1, 0], -m[..., 0, 0]))
    rot = np.where(regular, rot, 0.0)
    tilt = np.where(regular, tilt, np.where(up, 0.0, np.pi))
    psi = np.where(regular, psi, psi_deg)
    return np.rad2deg(rot), np.rad2deg(tilt), np.rad2deg(psi)


def projection_direction(rot: ArrayLike, tilt: ArrayLike) -> NDArray[np.float64]:
    """Unit viewing direction in map coordinates, third row of A: (sin t cos r, sin t sin r, cos t)."""
    r, t = np.deg2rad(np.asarray(rot, float)), np.deg2rad(np.asarray(tilt, float))
    return np.stack([np.sin(t) * np.cos(r), np.sin(t) * np.sin(r), np.cos(t)], axis=-1)
