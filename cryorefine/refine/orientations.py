"""Orientation and translation samples of one iteration: coarse ids, oversampled children, priors.

A coarse orientation id is `dir_index * n_psi + psi_index`, where dir_index indexes
`OrientationGrid.dir_pix` (HEALPix NESTED pixels at `order`: the asymmetric unit in global mode,
the whole sphere in local mode). With oversampling 1 each coarse orientation has 8 children
(4 NESTED child directions x 2 psi), child c = 2 * dir_child + psi_child; a fine id is
`coarse_id * 8 + c`. Rotation matrices are RELION's A (map -> image) with the iteration's random
perturbation applied as A <- A . A_euler(delta, delta, delta).
"""

from __future__ import annotations

from dataclasses import dataclass
import numpy as np
from numpy.typing import NDArray

from cryorefine.geometry import sampling
from cryorefine.geometry.euler import euler_to_matrix, projection_direction


@dataclass
class OrientationGrid:
    """The coarse orientation grid of one iteration and its perturbation."""

    order: int
    dir_pix: NDArray[np.int64]          # coarse HEALPix pixels (NESTED, at `order`)
    rot: NDArray[np.float64]            # deg, per coarse direction
    tilt: NDArray[np.float64]
    psi: NDArray[np.float64]            # deg, coarse psi values
    psi_step: float
    oversampling: int
    perturb_matrix: NDArray[np.float64]  # A_euler(delta, delta, delta)
    local: bool

    @property
    def n_psi(self) -> int:
        """Number of coarse psi values."""
        return len(self.psi)

    @property
    def n_children(self) -> int:
        """Fine orientations per coarse orientation: 4^os directions x 2^os psi."""
        return (4 ** self.oversampling) * (2 ** self.oversampling)


def make_grid(order: int, sym: str, psi_step: float, oversampling: int, perturb: float,
              local: bool) -> OrientationGrid:
    """Coarse grid at HEALPix `order`: asymmetric-unit directions (global) or the full sphere (local)."""
    if local:
        pix = np.arange(12 * 4 ** order, dtype=np.int64)
    else:
        pix = np.asarray(sampling.asymmetric_unit_directions(order, sym), dtype=np.int64)
    rot, tilt = sampling.healpix_rot_tilt(order, pix)
    psi = np.asarray(sampling.psi_angles(order, psi_step), dtype=np.float64)
    delta = perturb * sampling.angular_step(order)
    return OrientationGrid(order, pix, np.asarray(rot, float), np.asarray(tilt, float), psi,
                           float(360.0 / len(psi)), oversampling,
                           euler_to_matrix(delta, delta, delta), local)


def coarse_matrices(grid: OrientationGrid, ids: NDArray[np.int64]) -> NDArray[np.float64]:
    """Perturbed rotation matrices (k, 3, 3) of coarse orientation ids."""
    d, p = np.divmod(ids, grid.n_psi)
    return euler_to_matrix(grid.rot[d], grid.tilt[d], grid.psi[p]) @ grid.perturb_matrix


def fine_angles(grid: OrientationGrid, fine_ids: NDArray[np.int64]) -> tuple[NDArray, NDArray, NDArray]:
    """Unperturbed (rot, tilt, psi) in degrees of fine orientation ids."""
    n_dir_ch, n_psi_ch = 4 ** grid.oversampling, 2 ** grid.oversampling
    coarse, child = np.divmod(fine_ids, grid.n_children)
    d, p = np.divmod(coarse, grid.n_psi)
    dch, pch = np.divmod(child, n_psi_ch)
    child_pix = grid.dir_pix[d] * n_dir_ch + dch
    rot, tilt = sampling.healpix_rot_tilt(grid.order + grid.oversampling, child_pix)
    fine_step = grid.psi_step / n_psi_ch
    psi = grid.psi[p] - grid.psi_step / 2 + (pch + 0.5) * fine_step
    return np.asarray(rot, float), np.asarray(tilt, float), psi


def fine_matrices(grid: OrientationGrid, fine_ids: NDArray[np.int64]) -> NDArray[np.float64]:
    """Perturbed rotation matrices (k, 3, 3) of fine orientation ids."""
    rot, tilt, psi = fine_angles(grid, fine_ids)
    return euler_to_matrix(rot, tilt, psi) @ grid.perturb_matrix


def coarse_direction_of(grid: OrientationGrid, ids: NDArray[np.int64]) -> NDArray[np.int64]:
    """Index into grid.dir_pix of coarse orientation ids."""
    return ids // grid.n_psi


def orientation_order(rot: NDArray, tilt: NDArray, psi: NDArray, order: int) -> NDArray[np.int64]:
    """Permutation that lists poses (deg) along a space-filling curve of orientation space, so that consecutive
    particles have neighbouring orientations and a batch's windows and fine orientations overlap.

    The curve is the octree of the orientation grid itself: a cell at HEALPix `order` (12 base pixels x 6 psi
    sectors of 60 deg) splits into 4 NESTED child directions x 2 psi halves per level, and the key interleaves
    those 3 bits per level (Morton order); ties keep their input order."""
    pix = sampling.nearest_pixels(order, projection_direction(rot, tilt))
    n_psi = 6 * 2 ** order
    psi_bin = np.floor(np.mod(np.asarray(psi, np.float64), 360.0) * (n_psi / 360.0)).astype(np.int64) % n_psi
    sub = pix & ((1 << (2 * order)) - 1)
    key = (pix >> (2 * order)) * 6 + (psi_bin >> order)
    for level in range(order - 1, -1, -1):
        key = (key << 3) | (((sub >> (2 * level)) & 3) << 1) | ((psi_bin >> level) & 1)
    return np.argsort(key, kind="stable").astype(np.int64)



def in_orientation_order(poses, rows: NDArray[np.int64], order: int) -> NDArray[np.int64]:
    """rows (particle indices) sorted by orientation_order of their poses (deg): the order in which a local search
    batches its particles, so that a batch's windows, fine orientations and insertions overlap."""
    return rows[orientation_order(poses.rot[rows], poses.tilt[rows], poses.psi[rows], order)]

@dataclass
class TranslationGrid:
    """Coarse translations (px of the optics group) centred on the pre-shifted image, with perturbation."""

    coarse: NDArray[np.float64]   # (T, 2) px
    step: float                   # px, coarse step
    oversampling: int

    def children(self, t_idx: NDArray[np.int64]) -> NDArray[np.float64]:
        """(len(t_idx), 4^os, 2) fine translations (px) of coarse translation indices."""
        n = 2 ** self.oversampling
        off = -self.step / 2 + (np.arange(n) + 0.5) * self.step / n
        ox, oy = np.meshgrid(off, off, indexing="xy")
        child = np.stack([ox.ravel(), oy.ravel()], axis=-1)
        return self.coarse[t_idx][:, None, :] + child[None, :, :]


def make_translations(offset_range_A: float, offset_step_A: float, angpix: float, oversampling: int,
                      perturb: float) -> TranslationGrid:
    """Coarse translation grid in pixels of an optics group, shifted by the perturbation rho*step."""
    t = np.asarray(sampling.translation_grid(offset_range_A, offset_step_A), dtype=np.float64) / angpix
    step = offset_step_A / angpix
    return TranslationGrid(t + perturb * step, step, oversampling)


@dataclass
class LocalWindow:
    """Per-particle local-search candidates: coarse ids and log-prior (CSR layout over particles)."""

    ids: NDArray[np.int64]
    log_prior: NDArray[np.float64]
    offsets: NDArray[np.int64]     # particle j owns ids[offsets[j]:offsets[j+1]]


def local_window(grid: OrientationGrid, rot: NDArray, tilt: NDArray, psi: NDArray, sigma: float) -> LocalWindow:
    """Coarse orientations within 3 sigma (deg) of each particle's pose, Gaussian prior (spec §2.4).

    Directions are on the full sphere (grid.local), so the window never wraps through an
    asymmetric-unit border; the prior is exp(-d^2/2s^2) on the direction angle times the same on psi,
    each normalised to sum 1 per particle. Particle j's candidates are all (direction, psi) pairs, direction-major.
    """
    dirs = sampling.local_directions(grid.order, projection_direction(rot, tilt), 3 * sigma)
    psis = sampling.local_psi(grid.psi, psi, 3 * sigma)
    lp_d = _normalised_log_prior(dirs.angles, dirs.owner(), len(rot), sigma)
    lp_p = _normalised_log_prior(psis.angles, psis.owner(), len(rot), sigma)
    n_d, n_p = np.diff(dirs.offsets), np.diff(psis.offsets)
    counts = n_d * n_p
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    owner = np.repeat(np.arange(len(rot)), counts)
    k = np.arange(offsets[-1]) - offsets[owner]
    di = dirs.offsets[owner] + k // n_p[owner]
    pi = psis.offsets[owner] + k % n_p[owner]
    return LocalWindow(dirs.indices[di] * grid.n_psi + psis.indices[pi], lp_d[di] + lp_p[pi], offsets)


def _normalised_log_prior(angles: NDArray, owner: NDArray, n: int, sigma: float) -> NDArray[np.float64]:
    """log of exp(-a^2/2s^2), normalised to sum 1 over each particle's candidates."""
    lp = -angles ** 2 / (2 * sigma ** 2)
    return lp - np.log(np.bincount(owner, np.exp(lp), minlength=n))[owner]
