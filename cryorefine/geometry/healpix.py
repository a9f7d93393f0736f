"""HEALPix NESTED pixel centres (Gorski et al. 2005), re-expressed from the HEALPix definition.

Order n has Nside = 2^n and 12·4^n pixels. A pixel centre is (theta, phi): colatitude in [0, pi]
and longitude in [0, 2pi), radians, the same numbers as healpy.pix2ang(nside, ipix, nest=True)
and as RELION's Healpix_Base::pix2ang_z_phi (z = cos theta). No healpy (GPL) at run time.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from numpy.typing import ArrayLike, NDArray

# Per base face: ring index of its southern corner (in units of Nside) and longitude index.
_JRLL = np.array([2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4], dtype=np.int64)
_JPLL = np.array([1, 3, 5, 7, 0, 2, 4, 6, 1, 3, 5, 7], dtype=np.int64)


def nside_to_order(nside: int) -> int:
    """log2(nside) for a power-of-two Nside; ValueError otherwise."""
    nside = int(nside)
    order = nside.bit_length() - 1
    if nside < 1 or (1 << order) != nside:
        raise ValueError(f"nside must be a power of two, got {nside}")
    return order


def npix(order: int) -> int:
    """Number of pixels 12·4^order."""
    return 12 * 4 ** int(order)


def _compact_bits(v: NDArray[np.int64]) -> NDArray[np.int64]:
    """Collect the even-position bits of v into a contiguous integer (inverse of bit spreading)."""
    v = v & 0x5555555555555555
    v = (v | (v >> 1)) & 0x3333333333333333
    v = (v | (v >> 2)) & 0x0F0F0F0F0F0F0F0F
    v = (v | (v >> 4)) & 0x00FF00FF00FF00FF
    v = (v | (v >> 8)) & 0x0000FFFF0000FFFF
    v = (v | (v >> 16)) & 0x00000000FFFFFFFF
    return v


def nest2xyf(order: int, ipix: ArrayLike) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
    """NESTED index -> (ix, iy, face): position inside the base face (x from bit 0, y from bit 1)."""
    p = np.asarray(ipix, dtype=np.int64)
    face = p >> (2 * order)
    sub = p & ((1 << (2 * order)) - 1)
    return _compact_bits(sub), _compact_bits(sub >> 1), face


def pix2zphi_nest(nside: int, ipix: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """NESTED pixel centres as (z = cos theta, phi rad), RELION's pix2ang_z_phi arithmetic."""
    order = nside_to_order(nside)
    p = np.asarray(ipix, dtype=np.int64)
    if p.size and (p.min() < 0 or p.max() >= 12 * nside * nside):
        raise ValueError(f"pixel index out of range for nside {nside}")
    ix, iy, face = nest2xyf(order, p)
    npix_ = 12 * nside * nside
    fact2 = 4.0 / npix_
    fact1 = (nside << 1) * fact2
    jr = (_JRLL[face] << order) - ix - iy - 1            # ring number counted from the north pole
    north, south = jr < nside, jr > 3 * nside
    nr = np.where(north, jr, np.where(south, 4 * nside - jr, nside))
    z = np.where(north, 1 - (nr * nr) * fact2,
                 np.where(south, (nr * nr) * fact2 - 1, (2 * nside - jr) * fact1))
    kshift = np.where(north | south, 0, (jr - nside) & 1)
    # The numerator is always even (parity of ix - iy + 1 matches kshift), so // is exact.
    jp = (_JPLL[face] * nr + ix - iy + 1 + kshift) // 2
    nl4 = 4 * nside
    jp = np.where(jp > nl4, jp - nl4, jp)
    jp = np.where(jp < 1, jp + nl4, jp)
    phi = (jp - (kshift + 1) * 0.5) * ((0.5 * np.pi) / nr)
    return z, phi


def pix2ang_nest(nside: int, ipix: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """NESTED pixel centres (theta, phi) in radians, as healpy.pix2ang(nside, ipix, nest=True)."""
    z, phi = pix2zphi_nest(nside, ipix)
    # Near the poles acos(z) loses digits; healpy uses atan2(sin, cos) there, so do we.
    one_minus = np.where(z > 0, 1.0 - z, 1.0 + z)
    sth = np.sqrt(one_minus * (2.0 - one_minus))
    theta = np.where(np.abs(z) > 0.99, np.arctan2(sth, z), np.arccos(np.clip(z, -1.0, 1.0)))
    return theta, phi


def nest_children(ipix: ArrayLike, levels: int = 1) -> NDArray[np.int64]:
    """NESTED children at order+levels, shape (..., 4**levels): pixel p -> 4^L·p + 0 .. 4^L·p + 4^L−1.

    Sorted NESTED order (for levels = 1 this is also RELION's order; for levels > 1 RELION walks the
    children row by row, a permutation of the same set).
    """
    if levels < 0:
        raise ValueError("levels must be >= 0")
    p = np.asarray(ipix, dtype=np.int64)
    k = 4 ** int(levels)
    return p[..., None] * k + np.arange(k, dtype=np.int64)


def nest_parent(ipix: ArrayLike, levels: int = 1) -> NDArray[np.int64]:
    """NESTED parent at order−levels: p // 4^levels."""
    return np.asarray(ipix, dtype=np.int64) >> (2 * int(levels))


def max_pixrad(order: int) -> float:
    """Largest centre-to-corner angle of a pixel (rad), RELION's Healpix 2.15a max_pixrad()."""
    nside = 1 << int(order)
    za, pha = 2.0 / 3.0, np.pi / (4 * nside)
    t1 = (1.0 - 1.0 / nside) ** 2
    zb, phb = 1.0 - t1 / 3.0, 0.0
    va = np.array([np.sqrt(1 - za * za) * np.cos(pha), np.sqrt(1 - za * za) * np.sin(pha), za])
    vb = np.array([np.sqrt(1 - zb * zb) * np.cos(phb), np.sqrt(1 - zb * zb) * np.sin(phb), zb])
    return float(np.arctan2(np.linalg.norm(np.cross(va, vb)), np.dot(va, vb)))


@lru_cache(maxsize=16)
def _vectors(order: int) -> NDArray[np.float64]:
    theta, phi = pix2ang_nest(1 << order, np.arange(npix(order)))
    st = np.sin(theta)
    v = np.stack([st * np.cos(phi), st * np.sin(phi), np.cos(theta)], axis=-1)
    v.setflags(write=False)
    return v


def healpix_vectors(order: int) -> NDArray[np.float64]:
    """Unit vectors (12·4^order, 3) of NESTED pixel centres (sin t cos p, sin t sin p, cos t); cached, read-only."""
    if order < 0:
        raise ValueError("HEALPix order must be >= 0")
    return _vectors(int(order))
