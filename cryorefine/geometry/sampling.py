"""Orientation and translation grids of RELION's HealpixSampling (autorefine-spec §2.3, §2.4, §5.5, §8.4).

Angles in degrees; directions are HEALPix NESTED pixels, rot = longitude wrapped to [−180, 180],
tilt = colatitude. Translations in Å (callers divide by the pixel size). Oversampled children follow
RELION: psi children psi − step/2 + (j+½)·step/2^os, translation children the same per axis, and
direction children the NESTED pixels of the parent at order+os.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.spatial import cKDTree

from cryorefine.geometry import healpix
from cryorefine.geometry.symmetry import canonical_name, symmetry_matrices

# RELION only runs the O(N²·|G|) seam pass when the geometric cut leaves fewer directions.
SEAM_PASS_MAX_DIRECTIONS = 4000


def angular_step(order: int) -> float:
    """Nominal HEALPix angular step in degrees: 360 / (6·2^order)."""
    return 360.0 / (6 * 2 ** int(order))


def psi_step_actual(order: int, psi_step: float | None = None) -> float:
    """The psi step RELION really uses: 360 / ceil(360 / psi_step), psi_step defaulting to angular_step(order)."""
    step = angular_step(order) if psi_step is None or psi_step <= 0 else float(psi_step)
    return 360.0 / math.ceil(360.0 / step)


def psi_angles(order: int, psi_step: float | None = None) -> NDArray[np.float64]:
    """In-plane angles j·360/n_psi (deg), n_psi = ceil(360/psi_step), psi_step defaulting to angular_step(order)."""
    step = psi_step_actual(order, psi_step)
    n_psi = int(round(360.0 / step))
    return np.arange(n_psi, dtype=np.float64) * step


def _wrap_rot(rot: NDArray[np.float64]) -> NDArray[np.float64]:
    """RELION checkDirection: bring rot into [−180, 180] by ±360 (180 itself stays)."""
    for _ in range(2):
        rot = np.where(rot > 180.0, rot - 360.0, np.where(rot < -180.0, rot + 360.0, rot))
    return rot


def healpix_rot_tilt(order: int, ipix: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """(rot, tilt) in degrees of NESTED pixels at `order`: rot = phi wrapped to [−180, 180], tilt = theta."""
    z, phi = healpix.pix2zphi_nest(1 << int(order), ipix)
    # Same operation order as RELION's RAD2DEG / ACOSD so that boundary tests (rot ≥ 0, tilt ≤ 90) agree.
    rot = _wrap_rot(phi * 180.0 / np.pi)
    tilt = np.arccos(np.clip(z, -1.0, 1.0)) * 180.0 / np.pi
    return rot, tilt


def direction_vectors(rot: ArrayLike, tilt: ArrayLike) -> NDArray[np.float64]:
    """Unit viewing directions (sin t cos r, sin t sin r, cos t) from degrees, RELION's Euler_angles2direction."""
    a = np.asarray(rot, dtype=np.float64) * np.pi / 180.0
    b = np.asarray(tilt, dtype=np.float64) * np.pi / 180.0
    sb = np.sin(b)
    return np.stack([sb * np.cos(a), sb * np.sin(a), np.cos(b)], axis=-1)


def _unit(v: ArrayLike) -> NDArray[np.float64]:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def _euler_y(tilt_deg: float) -> NDArray[np.float64]:
    """RELION Euler_angles2matrix(0, tilt, 0) = Ry(tilt) in RELION's (transposed) convention."""
    c, s = math.cos(math.radians(tilt_deg)), math.sin(math.radians(tilt_deg))
    return np.array([[c, 0.0, -s], [0.0, 1.0, 0.0], [s, 0.0, c]])


# Normals of the three great-circle planes that bound RELION's icosahedral asymmetric unit (I2 frame).
_I2_PLANES = (
    (0.0, 1.0, 0.0),
    (-0.4999999839058737, -0.8090170074556163, 0.3090169861701543),
    (0.4999999839058737, -0.8090170074556163, 0.3090169861701543),
)
_I4_PLANES = (
    (0.0, 0.0, 1.0),
    (0.187592467856686, -0.303530987314591, -0.491123477863004),
    (0.187592467856686, 0.303530987314591, -0.491123477863004),
)


def _geometric_keep(family: str, n: int, rot: NDArray, tilt: NDArray, vec: NDArray) -> NDArray[np.bool_]:
    """RELION removeSymmetryEquivalentPointsGeometric for proper groups: mask of directions kept."""
    def on_positive_side(normals, sign=1.0):
        keep = np.ones(len(vec), dtype=bool)
        for nrm in normals:
            d = vec @ _unit(nrm)
            keep &= (d >= 0) if sign > 0 else (d <= 0)
        return keep

    if family == "C":
        return (rot >= -180.0 / n) & (rot <= 180.0 / n)
    if family == "D":
        if n == 1:
            return tilt <= 90.0
        return (rot >= -180.0 / n + 90.0) & (rot <= 180.0 / n + 90.0) & (tilt <= 90.0)
    if family == "T":
        planes = ((-0.942809, 0.0, 0.0), (0.471405, 0.272165, 0.7698), (0.471404, 0.816497, 0.0))
        pre = ((rot >= 90.0) & (rot <= 150.0)) | (rot == 0.0)
        return pre & on_positive_side(planes)
    if family == "O":
        planes = ((0.0, -1.0, 1.0), (1.0, 1.0, 0.0), (-1.0, 1.0, 0.0))
        pre = ((rot >= 45.0) & (rot <= 135.0) & (tilt <= 90.0)) | (rot == 0.0)
        return pre & on_positive_side(planes)
    if family == "I2":
        return on_positive_side(_I2_PLANES)
    if family in ("I1", "I3"):
        a = _euler_y(90.0 if family == "I1" else 31.7174745559)
        return on_positive_side([a @ np.asarray(p) for p in _I2_PLANES])
    if family == "I4":
        a = _euler_y(-31.7174745559)
        return on_positive_side([a @ np.asarray(p) for p in _I4_PLANES], sign=-1.0)
    raise AssertionError(family)


def _seam_pass(vec: NDArray[np.float64], sym_mats: NDArray[np.float64], max_ang_deg: float) -> NDArray[np.bool_]:
    """Greedy in pixel order: drop a direction within max_ang of a symmetry copy Rᵀ·v of an earlier kept one."""
    n = len(vec)
    cos_max = math.cos(math.radians(max_ang_deg))
    copies = np.einsum("gji,nj->gni", sym_mats, vec).reshape(-1, 3)      # Rᵀ v for every R, every k
    owner = np.tile(np.arange(n), len(sym_mats))
    # Candidate pairs from a KD-tree on chord length (slightly widened), then the exact dot-product test.
    chord = math.sqrt(max(0.0, 2.0 - 2.0 * cos_max)) * (1 + 1e-9) + 1e-12
    tree = cKDTree(copies)
    hits = tree.query_ball_point(vec, chord)
    keep = np.zeros(n, dtype=bool)
    for i in range(n):
        cand = np.asarray(hits[i], dtype=np.int64)
        if cand.size:
            k = owner[cand]
            close = (k < i) & (copies[cand] @ vec[i] > cos_max)
            if np.any(keep[k[close]]):
                continue
        keep[i] = True
    return keep


@lru_cache(maxsize=32)
def _asymmetric_unit(order: int, family: str, n: int) -> NDArray[np.int64]:
    pix = np.arange(healpix.npix(order), dtype=np.int64)
    rot, tilt = healpix_rot_tilt(order, pix)
    vec = direction_vectors(rot, tilt)
    keep = _geometric_keep(family, n, rot, tilt, vec)
    pix, vec = pix[keep], vec[keep]
    if len(pix) < SEAM_PASS_MAX_DIRECTIONS:
        sym_name = family + (str(n) if family in ("C", "D") else "")
        max_ang = 0.5 * math.degrees(healpix.max_pixrad(order))
        pix = pix[_seam_pass(vec, symmetry_matrices(sym_name), max_ang)]
    pix.setflags(write=False)
    return pix


def asymmetric_unit_directions(order: int, sym: str) -> NDArray[np.int64]:
    """NESTED pixels (ascending) at `order` that RELION keeps for point group `sym` (§8.4, incl. the seam pass)."""
    if order < 0:
        raise ValueError(f"HEALPix order {order}: must be >= 0")
    pix = _asymmetric_unit(int(order), *canonical_name(sym)).copy()
    if pix.size == 0:
        raise ValueError(f"HEALPix order {order}: too coarse for point group {sym} (no direction in the "
                         f"asymmetric unit)")
    return pix


def n_directions(order: int, sym: str) -> int:
    """Number of coarse directions of a global search: the asymmetric-unit pixels at `order` (§8.4)."""
    return int(asymmetric_unit_directions(order, sym).size)


def directions(order: int, sym: str) -> tuple[NDArray[np.int64], NDArray[np.float64], NDArray[np.float64]]:
    """Asymmetric-unit directions as (ipix, rot, tilt) in degrees."""
    pix = asymmetric_unit_directions(order, sym)
    rot, tilt = healpix_rot_tilt(order, pix)
    return pix, rot, tilt


def translation_grid(range_A: float, step_A: float) -> NDArray[np.float64]:
    """2D offsets (T, 2) in Å: (ix, iy)·step, |ix|,|iy| ≤ ceil(range/step), kept if |t|² < range² + 0.001.

    Order as RELION's setTranslations: ix (x) in the outer loop, iy (y) inner.
    """
    if not step_A > 0:
        raise ValueError(f"offset step {step_A} A: must be > 0")
    if range_A < 0:
        raise ValueError(f"offset range {range_A} A: must be >= 0")
    maxp = math.ceil(range_A / step_A)
    idx = np.arange(-maxp, maxp + 1, dtype=np.float64)
    ix, iy = np.meshgrid(idx, idx, indexing="ij")
    t = np.stack([ix.ravel() * step_A, iy.ravel() * step_A], axis=-1)
    keep = t[:, 0] * t[:, 0] + t[:, 1] * t[:, 1] < range_A * range_A + 0.001
    return t[keep]


def direction_children(order: int, ipix: ArrayLike, oversampling: int = 1) -> tuple[NDArray, NDArray]:
    """(rot, tilt) in degrees, shape (len(ipix), 4^os), of the NESTED children at order+os."""
    child = healpix.nest_children(np.atleast_1d(np.asarray(ipix, dtype=np.int64)), oversampling)
    return healpix_rot_tilt(order + oversampling, child)


def psi_children(psi: ArrayLike, psi_step: float, oversampling: int = 1) -> NDArray[np.float64]:
    """Oversampled psi (len(psi), 2^os) in degrees: psi − step/2 + (j+½)·step/2^os."""
    n = 2 ** int(oversampling)
    p = np.atleast_1d(np.asarray(psi, dtype=np.float64))
    j = np.arange(n, dtype=np.float64)
    return p[:, None] - 0.5 * psi_step + (0.5 + j)[None, :] * psi_step / n


def translation_children(t: ArrayLike, step: float, oversampling: int = 1) -> NDArray[np.float64]:
    """Oversampled translations (T, 4^os, 2): t − step/2 + (j+½)·step/2^os per axis; x index outer, y inner."""
    n = 2 ** int(oversampling)
    t = np.asarray(t, dtype=np.float64).reshape(-1, 2)
    off = -0.5 * step + (0.5 + np.arange(n, dtype=np.float64)) * step / n
    ox, oy = np.meshgrid(off, off, indexing="ij")
    child = np.stack([ox.ravel(), oy.ravel()], axis=-1)
    return t[:, None, :] + child[None, :, :]


@dataclass
class LocalCandidates:
    """Per-particle candidate lists in CSR layout: particle i owns indices[offsets[i]:offsets[i+1]]."""

    indices: NDArray[np.int64]     # HEALPix pixels (local_directions) or psi-grid indices (local_psi)
    offsets: NDArray[np.int64]     # (n + 1,)
    angles: NDArray[np.float64]    # deg, distance of each candidate to the particle's prior

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def particle(self, i: int) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
        """(indices, angles) of particle i."""
        s = slice(self.offsets[i], self.offsets[i + 1])
        return self.indices[s], self.angles[s]

    def owner(self) -> NDArray[np.int64]:
        """Particle index of every candidate entry."""
        return np.repeat(np.arange(len(self), dtype=np.int64), np.diff(self.offsets))


@lru_cache(maxsize=4)
def _pixel_tree(order: int) -> cKDTree:
    return cKDTree(healpix.healpix_vectors(order))


def nearest_pixels(order: int, dirs: ArrayLike) -> NDArray[np.int64]:
    """NESTED pixel at `order` whose centre is nearest each unit direction (n, 3)."""
    _, near = _pixel_tree(int(order)).query(np.asarray(dirs, dtype=np.float64).reshape(-1, 3), k=1)
    return np.asarray(near, dtype=np.int64)


def local_directions(order: int, prior_dirs: ArrayLike, max_angle_deg: float,
                     chunk: int = 4096) -> LocalCandidates:
    """Full-sphere pixels at `order` strictly within max_angle of each prior direction (n, 3), ascending pixel order.

    As RELION's local search (§2.4) but over the whole sphere, so windows never cut at an
    asymmetric-unit border; when nothing is within range the nearest pixel is kept.
    """
    prior = np.asarray(prior_dirs, dtype=np.float64).reshape(-1, 3)
    prior = prior / np.linalg.norm(prior, axis=1, keepdims=True)
    vecs = healpix.healpix_vectors(order)
    tree = _pixel_tree(int(order))
    chord = 2.0 * math.sin(math.radians(min(max(max_angle_deg, 0.0), 180.0)) / 2.0) * (1 + 1e-9) + 1e-12
    idx_parts, ang_parts, counts = [], [], np.zeros(len(prior), dtype=np.int64)
    for start in range(0, len(prior), chunk):
        block = prior[start:start + chunk]
        hits = tree.query_ball_point(block, chord)
        lens = np.fromiter((len(h) for h in hits), dtype=np.int64, count=len(hits))
        flat = np.fromiter((p for h in hits for p in h), dtype=np.int64, count=int(lens.sum()))
        row = np.repeat(np.arange(len(block)), lens)
        ang = np.rad2deg(np.arccos(np.clip(np.einsum("ij,ij->i", vecs[flat], block[row]), -1.0, 1.0)))
        inside = ang < max_angle_deg
        row, flat, ang = row[inside], flat[inside], ang[inside]
        n_in = np.bincount(row, minlength=len(block))
        empty = np.nonzero(n_in == 0)[0]
        if empty.size:
            _, near = tree.query(block[empty], k=1)
            near = np.asarray(near, dtype=np.int64)
            near_ang = np.rad2deg(np.arccos(np.clip(np.einsum("ij,ij->i", vecs[near], block[empty]), -1.0, 1.0)))
            row = np.concatenate([row, empty])
            flat = np.concatenate([flat, near])
            ang = np.concatenate([ang, near_ang])
            n_in[empty] = 1
        order_ = np.lexsort((flat, row))
        idx_parts.append(flat[order_])
        ang_parts.append(ang[order_])
        counts[start:start + len(block)] = n_in
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    indices = np.concatenate(idx_parts) if idx_parts else np.zeros(0, np.int64)
    angles = np.concatenate(ang_parts) if ang_parts else np.zeros(0)
    return LocalCandidates(indices.astype(np.int64), offsets, angles)


def local_psi(psi_grid: ArrayLike, prior_psi: ArrayLike, max_angle_deg: float,
              chunk: int = 8192) -> LocalCandidates:
    """Psi-grid indices with wrapped |psi_j − prior| < max_angle per particle (nearest one if none), CSR layout."""
    grid = np.asarray(psi_grid, dtype=np.float64).ravel()
    prior = np.asarray(prior_psi, dtype=np.float64).ravel()
    idx_parts, ang_parts, counts = [], [], np.zeros(len(prior), dtype=np.int64)
    for start in range(0, len(prior), chunk):
        block = prior[start:start + chunk]
        d = np.abs((grid[None, :] - block[:, None] + 180.0) % 360.0 - 180.0)
        inside = d < max_angle_deg
        empty = ~inside.any(axis=1)
        inside[np.nonzero(empty)[0], np.argmin(d[empty], axis=1)] = True
        row, col = np.nonzero(inside)
        idx_parts.append(col.astype(np.int64))
        ang_parts.append(d[row, col])
        counts[start:start + len(block)] = inside.sum(axis=1)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    indices = np.concatenate(idx_parts) if idx_parts else np.zeros(0, np.int64)
    angles = np.concatenate(ang_parts) if ang_parts else np.zeros(0)
    return LocalCandidates(indices, offsets, angles)
