"""Back-projection, symmetrisation, gold-standard helpers and reconstruction against known answers."""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numba
import numpy as np
import pytest

from cryorefine.fourier import backprojector as bpm
from cryorefine.fourier import kernels
from cryorefine.fourier.projector import grid_frequencies, make_projector, project
from cryorefine.fourier.transforms import (freq_radius, rfft2_centered, rfftn_centered, shell_index_3d,
                                          unique_halfplane_mask)
from tests.test_projector import gaussian_map, gaussian_projections, random_rotations

SMALL_MAP = Path("/work/shared/bench/maps/d2tet_small_b64_a2.5.mrc")


def halfplane_pixels(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(kx, ky, mask) of RELION's unique half-plane pixels of an n-box inside the Nyquist circle."""
    kx, ky = grid_frequencies(n)
    keep = unique_halfplane_mask(n).ravel() & (kx.astype(float) ** 2 + ky ** 2 <= (n / 2) ** 2)
    return kx[keep], ky[keep], keep


def map_fsc(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """FSC of two real maps per shell 0..N/2."""
    n = a.shape[0]
    fa, fb = rfftn_centered(a), rfftn_centered(b)
    s = shell_index_3d(n).ravel()
    num = np.bincount(s, np.real(fa * np.conj(fb)).ravel())
    den = np.sqrt(np.bincount(s, (np.abs(fa) ** 2).ravel()) * np.bincount(s, (np.abs(fb) ** 2).ravel()))
    return (num / den)[: n // 2 + 1]


@pytest.fixture(scope="module")
def small_map() -> np.ndarray:
    return mrcfile.read(SMALL_MAP).astype(np.float32)


def test_reconstruct_from_2000_projections(small_map):
    n = small_map.shape[0]
    rotations = random_rotations(np.random.default_rng(0), 2000)
    kx, ky, _ = halfplane_pixels(n)
    values = project(make_projector(small_map, pad=2), rotations, kx, ky)
    bp = bpm.make_backprojector(n, pad=2)
    bpm.insert(bp, rotations, kx, ky, values, 1.0)
    bpm.symmetrise(bp)
    rec = bpm.reconstruct(bp)
    assert rec.shape == (n, n, n) and rec.dtype == np.float32
    fsc = map_fsc(rec, small_map)
    assert fsc[: int(0.8 * n / 2) + 1].min() >= 0.99
    assert rec.std() == pytest.approx(small_map.std(), rel=0.03)


def test_reconstruct_keeps_grey_scale_of_exact_projections():
    # analytic projections of a Gaussian map (not from our projector): rec should return V
    n = 40
    centres, sigmas, amps = [[6.0, -4.0, 3.0], [-5.0, 7.0, -2.0], [0.0, 0.0, 0.0]], [2.0, 2.5, 3.0], [1.0, 0.7, 0.5]
    volume = gaussian_map(n, centres, sigmas, amps)
    rotations = random_rotations(np.random.default_rng(1), 1500)
    kx, ky, keep = halfplane_pixels(n)
    values = rfft2_centered(gaussian_projections(n, rotations, centres, sigmas, amps)).reshape(1500, -1)[:, keep]
    bp = bpm.make_backprojector(n, pad=2)
    bpm.insert(bp, rotations, kx, ky, values, np.ones(values.shape, np.float32))
    bpm.symmetrise(bp)
    rec = bpm.reconstruct(bp)
    # RELION's floored division (no gridding iterations) spreads a broad low-frequency lobe beyond the box,
    # so the mean drifts; the structure itself keeps its scale
    dv, dr = volume - volume.mean(), rec - rec.mean()
    assert np.corrcoef(dv.ravel(), dr.ravel())[0, 1] >= 0.9995
    assert dr.std() / dv.std() == pytest.approx(1.0, abs=0.02)
    assert rec.max() == pytest.approx(volume.max(), rel=0.03)


def reference_splat(shape, rotation, kx, ky, values, weights, pad, r_max):
    """Pure-Python trilinear splat of a few points, straight from the definition."""
    data = np.zeros(shape, np.complex128)
    weight = np.zeros(shape)
    off = (shape[0] - 1) // 2
    r_ins = round(pad * r_max)
    for u, v, val, w in zip(kx, ky, values, weights):
        xi = pad * rotation.T @ np.array([u, v, 0.0])
        if xi @ xi > r_ins ** 2:
            continue
        if xi[0] < 0:
            xi, val = -xi, np.conj(val)
        base = np.floor(xi).astype(int)
        frac = xi - base
        for dz in (0, 1):
            for dy in (0, 1):
                for dx in (0, 1):
                    f = ((frac[2] if dz else 1 - frac[2]) * (frac[1] if dy else 1 - frac[1])
                         * (frac[0] if dx else 1 - frac[0]))
                    idx = (base[2] + dz + off, base[1] + dy + off, base[0] + dx)
                    data[idx] += f * val
                    weight[idx] += f * w
    return data, weight


def test_insert_matches_definition_with_one_and_two_threads():
    rng = np.random.default_rng(7)
    n, pad, r_max = 16, 2, 7.0
    rotation = random_rotations(rng, 1)
    kx = rng.uniform(-8, 8, 40).astype(np.float32)
    ky = rng.uniform(-8, 8, 40).astype(np.float32)
    values = (rng.standard_normal(40) + 1j * rng.standard_normal(40)).astype(np.complex64)
    weights = rng.uniform(0.1, 2, 40).astype(np.float32)
    expected_d, expected_w = reference_splat(kernels.half_cube_shape(14), rotation[0], kx, ky, values, weights,
                                             pad, r_max)
    threads = numba.get_num_threads()
    try:
        for nt in sorted({1, threads}):
            numba.set_num_threads(nt)
            bp = bpm.make_backprojector(n, pad=pad, r_max=r_max)
            bpm.insert(bp, rotation, kx, ky, values[None], weights[None])
            np.testing.assert_allclose(bp.data, expected_d, atol=1e-5)
            np.testing.assert_allclose(bp.weight, expected_w, atol=1e-5)
    finally:
        numba.set_num_threads(threads)


def reference_sample(ft3d, rotations, kx, ky, pad, r_max):
    """Trilinear samples of a half-cube straight from the definition (numpy, float64): (n, m)."""
    off = (ft3d.shape[0] - 1) // 2
    inside = kx.astype(float) ** 2 + ky.astype(float) ** 2 <= r_max ** 2
    k = np.where(inside[:, None], np.stack([kx, ky, np.zeros_like(kx)], 1).astype(float), 0.0)
    xi = pad * np.einsum("nij,mi->nmj", rotations, k)
    neg = xi[..., 0] < 0
    xi = np.where(neg[..., None], -xi, xi)
    base = np.floor(xi).astype(int)
    frac = xi - base
    out = np.zeros(xi.shape[:2], np.complex128)
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                f = ((frac[..., 2] if dz else 1 - frac[..., 2]) * (frac[..., 1] if dy else 1 - frac[..., 1])
                     * (frac[..., 0] if dx else 1 - frac[..., 0]))
                out += f * ft3d[base[..., 2] + dz + off, base[..., 1] + dy + off, base[..., 0] + dx]
    out = np.where(neg, np.conj(out), out)
    return np.where(inside[None, :], out, 0)


def neighbouring_rotations(rng: np.random.Generator, n: int, step_deg: float = 1.0) -> np.ndarray:
    """n rotations in a chain, each a random step_deg-sized turn of the last (a local search's order)."""
    out = [random_rotations(rng, 1)[0]]
    for _ in range(n - 1):
        axis = rng.standard_normal(3)
        axis /= np.linalg.norm(axis)
        a = np.radians(step_deg)
        k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
        out.append((np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k) @ out[-1])
    return np.array(out)


@pytest.mark.parametrize("order", ["neighbours", "random"])
def test_kernels_match_definition_across_tiles(order):
    """Both kernels cut the work into tiles of rotations x pixels (kernels._TILE_ROT x _TILE_PIX for neighbouring
    rotations, 1 x 1024 otherwise): 300 rotations and 70 pixels span several tiles with ragged ends, on one and two
    threads (two z-slabs for the insertion)."""
    rng = np.random.default_rng(11)
    pad, r_max, n_rot, m = 2, 7.0, 2 * kernels._TILE_ROT + 44, 2 * kernels._TILE_PIX + 6
    rotations = neighbouring_rotations(rng, n_rot) if order == "neighbours" else random_rotations(rng, n_rot)
    assert kernels._tile_shape(rotations) == ((kernels._TILE_ROT, kernels._TILE_PIX) if order == "neighbours"
                                              else (1, 1024))
    kx = rng.uniform(-7, 7, m).astype(np.float32)
    ky = rng.uniform(-7, 7, m).astype(np.float32)
    shape = kernels.half_cube_shape(14)
    ft3d = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
    values = (rng.standard_normal((n_rot, m)) + 1j * rng.standard_normal((n_rot, m))).astype(np.complex64)
    weights = rng.uniform(0.1, 2, (n_rot, m)).astype(np.float32)
    expected_p = reference_sample(ft3d.astype(np.complex128), rotations, kx, ky, pad, r_max)
    expected_d = np.zeros(shape, np.complex128)
    expected_w = np.zeros(shape)
    for i in range(n_rot):
        d, w = reference_splat(shape, rotations[i], kx, ky, values[i], weights[i], pad, r_max)
        expected_d += d
        expected_w += w
    threads = numba.get_num_threads()
    try:
        for nt in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
            numba.set_num_threads(nt)
            np.testing.assert_allclose(kernels.project_points(ft3d, rotations, kx, ky, pad, r_max), expected_p,
                                       atol=2e-5)
            data = np.zeros(shape, np.complex64)
            weight = np.zeros(shape, np.float32)
            kernels.backproject_points(data, weight, rotations, kx, ky, values, weights, pad, r_max)
            np.testing.assert_allclose(data, expected_d, atol=2e-4)
            np.testing.assert_allclose(weight, expected_w, atol=2e-4)
    finally:
        numba.set_num_threads(threads)


def test_two_threads_equal_one_thread_on_many_slices(small_map):
    n = 32
    rotations = random_rotations(np.random.default_rng(4), 300)
    kx, ky, _ = halfplane_pixels(n)
    rng = np.random.default_rng(5)
    values = (rng.standard_normal((300, kx.size)) + 1j * rng.standard_normal((300, kx.size))).astype(np.complex64)
    results = []
    threads = numba.get_num_threads()
    try:
        for nt in (1, 2):
            numba.set_num_threads(min(nt, numba.config.NUMBA_NUM_THREADS))
            bp = bpm.make_backprojector(n, pad=2)
            bpm.insert(bp, rotations, kx, ky, values, 1.0)
            results.append(bp)
    finally:
        numba.set_num_threads(threads)
    # same additions in the same order per voxel: identical up to float rounding
    np.testing.assert_allclose(results[0].data, results[1].data, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(results[0].weight, results[1].weight, rtol=1e-5, atol=1e-4)
    # every point inside |k| < N/2 lands with total weight 1; points exactly on |k| = N/2 may round out
    inner = np.count_nonzero(kx.astype(float) ** 2 + ky ** 2 < (n / 2) ** 2)
    assert 300 * inner * (1 - 1e-6) <= results[0].weight.sum() <= 300 * kx.size * (1 + 1e-6)


def d2_matrices() -> np.ndarray:
    """D2: identity and the 2-folds about x, y and z."""
    return np.array([np.diag(d) for d in ([1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1])], float)


def test_symmetrise_d2_equals_inserting_all_copies(small_map):
    n = small_map.shape[0]
    rotations = random_rotations(np.random.default_rng(9), 50)
    kx, ky, _ = halfplane_pixels(n)
    proj = make_projector(small_map, pad=2)
    values = project(proj, rotations, kx, ky)
    rng = np.random.default_rng(10)
    weights = rng.uniform(0.2, 1.0, values.shape).astype(np.float32)
    sym = d2_matrices()

    one = bpm.make_backprojector(n, pad=2)
    bpm.insert(one, rotations, kx, ky, values, weights)
    bpm.symmetrise(one, sym)

    copies = np.concatenate([rotations @ r for r in sym])  # A and A·R give the same projection
    full = bpm.make_backprojector(n, pad=2)
    bpm.insert(full, copies, kx, ky, np.tile(values, (4, 1)), np.tile(weights, (4, 1)))
    bpm.symmetrise(full)

    c = np.arange(full.data.shape[0]) - full.radius - 1
    inside = (c[:, None, None] ** 2 + c[None, :, None] ** 2 + np.arange(full.data.shape[2]) ** 2) <= full.radius ** 2
    scale = np.abs(full.data[inside]).max()
    np.testing.assert_allclose(one.data[inside], full.data[inside], atol=1e-4 * scale)
    np.testing.assert_allclose(one.weight[inside], full.weight[inside], atol=1e-4 * full.weight.max())


def test_symmetrise_c4_rotates_by_90_degrees():
    # a single inserted point at ξ = (5, 2, 3) must appear at its 4 C4 images, conjugated where x < 0
    bp = bpm.make_backprojector(16, pad=2)
    off = bp.radius + 1
    bp.data[off + 3, off + 2, 5] = 1 + 2j
    bp.weight[off + 3, off + 2, 5] = 1
    rz = np.array([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]])
    sym = np.array([np.linalg.matrix_power(rz, k) for k in range(4)])
    bpm.symmetrise(bp, sym)
    # B_sym(ξ) = Σ_g B(R_g ξ): nonzero where R_g ξ = (5, 2, 3) → ξ = R_gᵀ (5, 2, 3)
    for g in sym:
        x, y, z = g.T @ np.array([5.0, 2.0, 3.0])
        val = 1 + 2j
        if x < 0:
            x, y, z, val = -x, -y, -z, np.conj(val)
        assert bp.data[int(z) + off, int(y) + off, int(x)] == pytest.approx(val)
    assert np.count_nonzero(bp.weight) == 4


def test_fsc_halves_identical_and_independent():
    n = 32
    rng = np.random.default_rng(11)
    shape = kernels.half_cube_shape(32)

    def noise_bp():
        bp = bpm.make_backprojector(n, pad=2)
        bp.data[...] = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
        bp.weight[...] = rng.uniform(0.5, 1.5, shape)
        return bp

    a, b = noise_bp(), noise_bp()
    np.testing.assert_allclose(bpm.fsc_halves(a, a), 1.0, atol=1e-6)
    fsc = bpm.fsc_halves(a, b)
    assert fsc.shape == (n // 2 + 1,) and fsc[0] == 1.0
    assert np.abs(fsc[3:]).max() < 0.2
    assert abs(fsc[3:].mean()) < 0.03

    avg = bpm.downsampled_average(a)
    assert avg.shape == (n, n, n // 2 + 1)
    off = a.radius + 1
    # RELION's ROUND takes halves away from zero: κ = 0 holds ξ = 0 only, κx = 1 holds ξx ∈ {1, 2}
    assert avg[0, 0, 0] == pytest.approx(a.data[off, off, 0] / a.weight[off, off, 0], rel=1e-5)
    block = (off, off, slice(1, 3))
    assert avg[0, 0, 1] == pytest.approx(a.data[block].sum() / a.weight[block].sum(), rel=1e-5)
    block = (slice(off - 2, off), off, 0)  # ξz ∈ {−2, −1} → κz = −1, stored at index n − 1
    assert avg[n - 1, 0, 0] == pytest.approx(a.data[block].sum() / a.weight[block].sum(), rel=1e-5)


def test_join_low_resolution_and_add():
    rng = np.random.default_rng(12)
    a, b = bpm.make_backprojector(16, pad=2), bpm.make_backprojector(16, pad=2)
    for bp in (a, b):
        bp.data[...] = rng.standard_normal(bp.data.shape)
        bp.weight[...] = rng.uniform(0, 1, bp.weight.shape)
    total = bpm.add(a, b)
    np.testing.assert_allclose(total.weight, a.weight + b.weight)
    a0, b0 = a.data.copy(), b.data.copy()
    bpm.join_low_resolution(a, b, r_join=3)
    off = a.radius + 1
    c = np.arange(a.data.shape[0]) - off
    r2 = c[:, None, None] ** 2 + c[None, :, None] ** 2 + np.arange(a.data.shape[2]) ** 2
    low = r2 <= 36
    np.testing.assert_allclose(a.data[low], 0.5 * (a0[low] + b0[low]), rtol=1e-6)
    np.testing.assert_array_equal(a.data[low], b.data[low])
    np.testing.assert_array_equal(a.data[~low], a0[~low])
    np.testing.assert_array_equal(b.data[~low], b0[~low])


def test_ssnr_from_fsc_known_values():
    bp = bpm.make_backprojector(16, pad=2)
    bp.weight[...] = 0.25
    fsc = np.full(9, 0.5)
    out = bpm.ssnr_from_fsc(bp, fsc)
    shells = slice(0, 8)  # round(|ξ|/2) < 8 is inside |ξ| < R = 16
    np.testing.assert_allclose(out["sigma2"][shells], 1 / (8 * 0.25))
    np.testing.assert_allclose(out["ssnr"], 1.0)
    np.testing.assert_allclose(out["tau2"][shells], out["sigma2"][shells])
    np.testing.assert_allclose(out["coverage"][shells], 1.0)  # W = 1/(pad³ τ²) exactly
    final = bpm.ssnr_from_fsc(bp, np.full(9, 1 / 7), final=True)
    np.testing.assert_allclose(final["ssnr"], 1.0, rtol=1e-9)  # FSC 0.143 ⇔ full-data SSNR 1
    clipped = bpm.ssnr_from_fsc(bp, np.r_[1.0, np.zeros(8)], tau2_fudge=2.0)
    assert clipped["ssnr"][0] == pytest.approx(2 * 0.999 / 0.001)
    assert clipped["ssnr"][1] == pytest.approx(2 * 0.001 / 0.999)


def test_regularisation_spares_low_shells(small_map):
    n = small_map.shape[0]
    rotations = random_rotations(np.random.default_rng(13), 400)
    kx, ky, _ = halfplane_pixels(n)
    bp = bpm.make_backprojector(n, pad=2)
    bpm.insert(bp, rotations, kx, ky, project(make_projector(small_map, pad=2), rotations, kx, ky), 1.0)
    bpm.symmetrise(bp)
    plain = bpm.reconstruct(bp)
    # huge τ² = no regularisation; tiny τ² kills shells ≥ minres_map only
    np.testing.assert_allclose(bpm.reconstruct(bp, tau2=np.full(n // 2 + 1, 1e12)), plain, atol=1e-6)
    smooth = bpm.reconstruct(bp, tau2=np.full(n // 2 + 1, 1e-12))
    s = shell_index_3d(n)
    f_plain, f_smooth = rfftn_centered(plain), rfftn_centered(smooth)
    low, high = (s >= 1) & (s <= 3), (s >= 8) & (s <= n // 2)
    # (the real-space corner clean-up and sinc² division leak a little low-resolution power upwards)
    assert np.abs(f_smooth[high]).sum() < 0.02 * np.abs(f_plain[high]).sum()
    assert np.abs(f_smooth[low]).sum() == pytest.approx(np.abs(f_plain[low]).sum(), rel=0.05)


def test_memory_bytes():
    assert bpm.memory_bytes(256, 2) == 515 * 515 * 258 * 12
    assert bpm.memory_bytes(256, 2, dtype=np.float64) == 515 * 515 * 258 * 24
    bp = bpm.make_backprojector(32, pad=2)
    assert bp.data.nbytes + bp.weight.nbytes == bpm.memory_bytes(32, 2)


def test_double_precision_accumulators_agree():
    n = 32
    rotations = random_rotations(np.random.default_rng(14), 100)
    kx, ky, _ = halfplane_pixels(n)
    rng = np.random.default_rng(15)
    values = (rng.standard_normal((100, kx.size)) + 1j * rng.standard_normal((100, kx.size))).astype(np.complex64)
    single = bpm.make_backprojector(n, pad=2)
    double = bpm.make_backprojector(n, pad=2, dtype=np.float64)
    assert double.data.dtype == np.complex128 and double.weight.dtype == np.float64
    for bp in (single, double):
        bpm.insert(bp, rotations, kx, ky, values, 0.5)
        bpm.symmetrise(bp)
    np.testing.assert_allclose(single.data, double.data, atol=1e-4)
    # single accumulators also place their points in float32 (to ~4e-6 voxel here; measured 0.85e-5 of the peak,
    # 4e-7 with float64 positions): 3e-5 of the map's peak
    rec_single, rec_double = bpm.reconstruct(single), bpm.reconstruct(double)
    np.testing.assert_allclose(rec_single, rec_double, atol=3e-5 * np.abs(rec_double).max())


def test_symmetrise_c3_interpolates_like_inserted_copies(small_map):
    # off-grid operators: trilinear resampling of the accumulators ≈ inserting the symmetry copies
    n = 32
    volume = small_map[16:48, 16:48, 16:48]
    rotations = random_rotations(np.random.default_rng(16), 300)
    kx, ky, _ = halfplane_pixels(n)
    values = project(make_projector(volume, pad=2), rotations, kx, ky)
    c, s = np.cos(2 * np.pi / 3), np.sin(2 * np.pi / 3)
    rz = np.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]])
    sym = np.array([np.eye(3), rz, rz @ rz])
    one = bpm.make_backprojector(n, pad=2)
    bpm.insert(one, rotations, kx, ky, values, 1.0)
    bpm.symmetrise(one, sym)
    full = bpm.make_backprojector(n, pad=2)
    bpm.insert(full, np.concatenate([rotations @ r for r in sym]), kx, ky, np.tile(values, (3, 1)), 1.0)
    bpm.symmetrise(full)
    assert one.weight.sum() == pytest.approx(full.weight.sum(), rel=0.01)
    fsc = map_fsc(bpm.reconstruct(one), bpm.reconstruct(full))
    assert fsc[: n // 2 - 2].min() >= 0.99


def test_unfiltered_maps_do_not_copy_a_shared_low_band_into_high_shells():
    """Two halves sharing a strong band |k| <= r (as refined halves share their low resolution by construction)
    and independent beyond: the crop and corner mask copy that band into every shell of both maps, so their FSC
    is high everywhere; with leak_free_shell=r it is at chance beyond r. Known answer: beyond r the map is the
    reconstruction of the data beyond r alone, and within r it is the plain reconstruction."""
    n, r = 32, 3
    rng = np.random.default_rng(5)
    template = bpm.make_backprojector(n, pad=2)
    off = template.radius + 1
    c = np.arange(template.data.shape[0]) - off
    r2 = c[:, None, None] ** 2 + c[None, :, None] ** 2 + np.arange(template.data.shape[2])[None, None, :] ** 2
    low = r2 <= (2 * r) ** 2                                  # padded Fourier pixels

    def cnoise(scale):
        return (scale * (rng.standard_normal(low.shape) + 1j * rng.standard_normal(low.shape))).astype(np.complex64)

    shared = cnoise(1e3)

    def half(keep_low=True):
        bp = bpm.make_backprojector(n, pad=2)
        bp.data[...] = cnoise(1.0)
        bp.data[low] = shared[low] if keep_low else 0
        bp.weight[...] = 1.0
        bpm.symmetrise(bp)
        return bp

    a, b = half(), half()
    plain = [bpm.reconstruct(a), bpm.reconstruct(b)]
    assert map_fsc(*plain)[r + 2: n // 2].mean() > 0.3, "the leak this guards against"
    fixed = [bpm.reconstruct(a, leak_free_shell=r), bpm.reconstruct(b, leak_free_shell=r)]
    f = map_fsc(*fixed)
    assert abs(f[r + 2: n // 2].mean()) < 0.05 and np.abs(f[r + 2: n // 2]).max() < 0.3

    high_only = bpm.make_backprojector(n, pad=2)
    high_only.data[...] = np.where(low, 0, a.data)
    high_only.weight[...] = a.weight
    ft_fixed, ft_plain, ft_high = (np.fft.rfftn(v.astype(np.float64)) for v in
                                   (fixed[0], plain[0], bpm.reconstruct(high_only)))
    inner = freq_radius((n, n, n)) <= r
    scale = np.abs(ft_high[~inner]).max()
    np.testing.assert_allclose(ft_fixed[~inner], ft_high[~inner], atol=1e-4 * scale)
    np.testing.assert_allclose(ft_fixed[inner], ft_plain[inner], atol=1e-4 * np.abs(ft_plain[inner]).max())
