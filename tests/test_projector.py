"""Central-slice projector: known answers from real-space projections and analytic Gaussian maps."""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pytest
from scipy import ndimage

from cryorefine.fourier import kernels
from cryorefine.fourier.projector import grid_frequencies, make_projector, project, project_grid
from cryorefine.fourier.transforms import irfft2_centered, rfft2_centered
from cryorefine.geometry.euler import euler_to_matrix

SMALL_MAP = Path("/work/shared/bench/maps/d2tet_small_b64_a2.5.mrc")


def random_rotations(rng: np.random.Generator, n: int) -> np.ndarray:
    """Uniform random RELION rotation matrices."""
    tilt = np.degrees(np.arccos(rng.uniform(-1, 1, n)))
    return euler_to_matrix(rng.uniform(-180, 180, n), tilt, rng.uniform(-180, 180, n))


def gaussian_map(n: int, centres, sigmas, amps) -> np.ndarray:
    """Sum of isotropic Gaussians (centres in px from voxel n//2, xyz order)."""
    c = np.arange(n) - n // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    vol = np.zeros((n, n, n))
    for p, s, a in zip(centres, sigmas, amps):
        vol += a * np.exp(-((x - p[0]) ** 2 + (y - p[1]) ** 2 + (z - p[2]) ** 2) / (2 * s * s))
    return vol.astype(np.float32)


def gaussian_projections(n: int, rotations, centres, sigmas, amps) -> np.ndarray:
    """Exact Σ_z of the rotated Gaussian map: each Gaussian lands at (A p)_xy with mass √(2π)σ per line."""
    c = np.arange(n) - n // 2
    yy, xx = np.meshgrid(c, c, indexing="ij")
    out = np.zeros((len(rotations), n, n))
    for p, s, a in zip(centres, sigmas, amps):
        q = rotations @ np.asarray(p, float)
        out += a * np.sqrt(2 * np.pi) * s * np.exp(
            -((xx - q[:, 0, None, None]) ** 2 + (yy - q[:, 1, None, None]) ** 2) / (2 * s * s))
    return out


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised complex correlation Re<a, b> / |a||b|."""
    return float(np.real(np.vdot(a, b)) / np.sqrt(np.vdot(a, a).real * np.vdot(b, b).real))


def test_projection_equals_fft_of_real_space_sum():
    volume = mrcfile.read(SMALL_MAP).astype(np.float32)
    n = volume.shape[0]
    proj = make_projector(volume, pad=2)
    rotations = random_rotations(np.random.default_rng(3), 3)
    slices = project_grid(proj, rotations)
    assert slices.shape == (3, n, n // 2 + 1) and slices.dtype == np.complex64
    c = np.arange(n) - n // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    r = np.stack([x.ravel(), y.ravel(), z.ravel()])
    for a, got in zip(rotations, slices):
        src = a.T @ r  # V'(r) = V(Aᵀ r)
        rotated = ndimage.map_coordinates(volume, [src[2] + n // 2, src[1] + n // 2, src[0] + n // 2], order=3)
        expected = rfft2_centered(rotated.reshape(n, n, n).sum(axis=0))
        assert correlation(expected, got) >= 0.999
        assert np.abs(got).sum() / np.abs(expected).sum() == pytest.approx(1.0, abs=0.03)


def test_gaussian_map_projections_and_rotation_convention():
    n = 48
    centres, sigmas, amps = [[9.0, -5.0, 3.0], [-4.0, 6.0, -7.0]], [2.0, 2.5], [1.0, 0.6]
    proj = make_projector(gaussian_map(n, centres, sigmas, amps), pad=2)
    rotations = random_rotations(np.random.default_rng(5), 4)
    expected = rfft2_centered(gaussian_projections(n, rotations, centres, sigmas, amps))
    got = project_grid(proj, rotations)
    for e, g in zip(expected, got):
        # samples on grid planes (e.g. DC) keep the sinc² pre-correction (a few % for off-centre mass)
        assert correlation(e, g) >= 0.9995
        assert np.abs(g).sum() / np.abs(e).sum() == pytest.approx(1.0, abs=0.01)

    # a single off-centre blob lands at image position (A p)_xy
    p = np.array([10.0, -6.0, 4.0])
    blob = make_projector(gaussian_map(n, [p], [1.5], [1.0]), pad=2)
    images = irfft2_centered(project_grid(blob, rotations), n)
    yy, xx = np.meshgrid(np.arange(n) - n // 2, np.arange(n) - n // 2, indexing="ij")
    for a, img in zip(rotations, images):
        w = np.where(img > 0.1 * img.max(), img, 0.0)  # the blob only, not the interpolation ripple
        centroid = np.array([(w * xx).sum(), (w * yy).sum()]) / w.sum()
        np.testing.assert_allclose(centroid, (a @ p)[:2], atol=0.05)


def test_project_points_hermitian_and_r_max():
    volume = gaussian_map(32, [[3.0, -2.0, 5.0]], [2.0], [1.0])
    proj = make_projector(volume, pad=2, r_max=10)
    rotations = random_rotations(np.random.default_rng(1), 5)
    kx = np.array([3.3, -3.3, 0.0, 7.5, 10.5, 0.0], np.float32)
    ky = np.array([-2.1, 2.1, 0.0, 7.0, 0.0, -9.9], np.float32)
    vals = project(proj, rotations, kx, ky)
    np.testing.assert_allclose(vals[:, 1], np.conj(vals[:, 0]), rtol=1e-5, atol=1e-8)  # V̂(−k) = conj V̂(k)
    assert np.all(vals[:, 3:5] == 0)  # |k| > r_max
    assert np.all(vals[:, 5] != 0)
    # the DC term is the projector's centre voxel for every rotation
    np.testing.assert_allclose(vals[:, 2], vals[0, 2])


def test_project_grid_is_fourier_crop():
    volume = mrcfile.read(SMALL_MAP).astype(np.float32)
    proj = make_projector(volume, pad=2)
    rotations = random_rotations(np.random.default_rng(2), 2)
    full = project_grid(proj, rotations, 64)
    crop = project_grid(proj, rotations, 32)
    rows = np.r_[0:17, 64 - 15:64]  # ky = 0..16, -15..-1
    np.testing.assert_allclose(crop[:, :16], full[:, rows[:16], :17], rtol=1e-6)
    np.testing.assert_allclose(crop[:, 17:], full[:, rows[17:], :17], rtol=1e-6)
    kx, ky = grid_frequencies(32)
    assert ky.reshape(32, 17)[16, 0] == 16 and ky.reshape(32, 17)[17, 0] == -15


def test_half_cube_layout_and_errors():
    assert kernels.half_cube_shape(64) == (131, 131, 66)
    assert kernels.half_cube_radius((131, 131, 66)) == 64
    with pytest.raises(ValueError):
        kernels.half_cube_radius((130, 130, 66))
    with pytest.raises(ValueError):
        make_projector(np.zeros((8, 8, 4), np.float32))
    with pytest.raises(ValueError):
        make_projector(np.zeros((8, 8, 8), np.float32), r_max=9)
