"""FSC curves, resolution read-outs, low-pass profile, soft masks, shifts, normalisation."""

from __future__ import annotations

import numpy as np
import pytest

from cryorefine.fourier import filters, fsc as fscmod
from cryorefine.fourier.transforms import irfft2_centered, rfft2_centered, rfft_freqs_2d


def _blob3d(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, n, n))


def test_fsc_self_is_one_and_independent_noise_is_small():
    v = _blob3d()
    f = fscmod.fsc(v, v)
    assert f.shape == (17,)
    np.testing.assert_allclose(f, 1.0, atol=1e-12)
    g = fscmod.fsc(v, _blob3d(seed=1))
    assert np.abs(g[3:]).max() < 0.2
    img = v[0]
    np.testing.assert_allclose(fscmod.fsc(img, img), 1.0, atol=1e-12)
    np.testing.assert_allclose(fscmod.fsc(v, -2.0 * v), -1.0, atol=1e-12)


def test_fsc_ft_matches_real_space_version():
    a, b = _blob3d(), _blob3d(seed=2) + _blob3d()
    ft = np.fft.rfftn
    np.testing.assert_allclose(fscmod.fsc_ft(ft(a), ft(b)), fscmod.fsc(a, b), atol=1e-12)


def test_resolution_readouts():
    curve = np.array([1.0, 0.99, 0.9, 0.7, 0.55, 0.4, 0.2, 0.1, 0.05])   # box 16
    # last shell before the first drop below 0.5 is shell 4 -> 16*2/4
    assert fscmod.resolution_at(curve, 0.5, 16, 2.0) == pytest.approx(8.0)
    assert fscmod.resolution_at(curve, 0.143, 16, 2.0) == pytest.approx(32 / 6)
    # linear crossing between shells 4 (0.55) and 5 (0.4): x = 4 + 0.05/0.15
    assert fscmod.crossing_resolution(curve, 0.5, 16, 2.0) == pytest.approx(32 / (4 + 1 / 3))
    assert fscmod.crossing_resolution(np.ones(9), 0.5, 16, 2.0) == pytest.approx(4.0)
    assert fscmod.resolution_at(np.ones(9), 0.5, 16, 2.0) == pytest.approx(4.0)
    res = fscmod.shell_resolutions(16, 2.0)
    assert res[0] == np.inf and res[4] == pytest.approx(8.0) and res[8] == pytest.approx(4.0)


def test_masked_corrected_fsc_removes_mask_correlation():
    """Halves sharing a signal up to shell 12 plus independent noise: the mask spreads signal correlation into
    the shells just beyond, which the phase-randomisation correction removes (spec §12)."""
    n = 48
    rng = np.random.default_rng(3)
    signal = filters.lowpass_raised_cosine(rng.normal(size=(n, n, n)), 1.0, 4.0)
    h1 = signal + 0.2 * rng.normal(size=(n, n, n))
    h2 = signal + 0.2 * rng.normal(size=(n, n, n))
    mask = filters.soft_sphere_mask(n, 14, 3, 3)
    out = fscmod.masked_corrected_fsc(h1, h2, mask, 1.0)
    r = out["randomise_from"]
    assert r == fscmod.first_shell_below(out["fsc_unmasked"], 0.8)
    np.testing.assert_allclose(out["fsc_true"][: r + 2], out["fsc_masked"][: r + 2])
    assert out["fsc_true"][r + 2: r + 4].mean() < out["fsc_masked"][r + 2: r + 4].mean() - 0.05
    assert abs(out["fsc_true"][r + 2:].mean()) < 0.05
    assert out["resolution_A"] == fscmod.resolution_at(out["fsc_true"], 0.143, n, 1.0)


def test_lowpass_profile_values():
    prof = filters.raised_cosine_lowpass_profile
    # r_h = 10, width 2: 1 below 9, 0 above 11, 0.5 at 10
    assert prof(8.99, 10.0) == 1.0
    assert prof(11.01, 10.0) == 0.0
    assert prof(10.0, 10.0) == pytest.approx(0.5)
    assert prof(9.5, 10.0) == pytest.approx(0.5 - 0.5 * np.cos(np.pi * 1.5 / 2))
    # on a map: N=32, p=2, res=8 -> r_h = 8; the transform is multiplied by the profile of |k|
    v = _blob3d()
    out = filters.lowpass_raised_cosine(v, 2.0, 8.0)
    ratio = np.fft.rfftn(np.fft.ifftshift(out)) / np.fft.rfftn(np.fft.ifftshift(v))
    assert ratio[0, 0, 3].real == pytest.approx(1.0)
    assert ratio[0, 0, 8].real == pytest.approx(0.5)
    assert abs(ratio[0, 12, 0]) < 1e-12
    assert ratio[3, 4, 6].real == pytest.approx(prof(np.sqrt(9 + 16 + 36), 8.0))
    ft_in = np.fft.rfftn(v)
    np.testing.assert_allclose(filters.lowpass_raised_cosine(ft_in, 2.0, 8.0)[0, 0, 8], 0.5 * ft_in[0, 0, 8])


def test_soft_sphere_mask_values():
    m = filters.soft_sphere_mask(32, 8.0, 4.0, 3)
    c = 16
    assert m[c, c, c] == 1.0 and m[c, c, c + 8] == pytest.approx(1.0)
    assert m[c, c, c + 10] == pytest.approx(0.5 + 0.5 * np.cos(np.pi * 2 / 4))
    assert m[c, c, c + 12] == pytest.approx(0.0, abs=1e-12) and m[0, 0, 0] == 0.0
    m2 = filters.soft_sphere_mask(32, 8.0, 4.0, 2)
    assert m2.shape == (32, 32) and m2[c, c + 9] == pytest.approx(0.5 + 0.5 * np.cos(np.pi / 4))


def test_mask_particles_mean_filler():
    rng = np.random.default_rng(4)
    imgs = rng.normal(size=(3, 32, 32)).astype(np.float32) + 5.0
    out = filters.mask_particles(imgs, 8.0, 4.0)
    np.testing.assert_allclose(out[:, 16, 16], imgs[:, 16, 16])
    # corners are the filler: the raised-cosine-weighted mean of the pixels beyond R
    yy, xx = np.mgrid[:32, :32] - 16
    r = np.hypot(xx, yy)
    c = np.where(r < 8, 0, np.where(r > 12, 1, 0.5 + 0.5 * np.cos(np.pi * (12 - r) / 4)))
    want = (imgs * c).sum(axis=(1, 2)) / c.sum()
    np.testing.assert_allclose(out[:, 0, 0], want, rtol=1e-5)
    noise = np.zeros_like(imgs)
    np.testing.assert_allclose(filters.mask_particles(imgs, 8.0, 4.0, fill=noise)[:, 0, 0], 0.0)


def test_soft_mask_outside_map_and_solvent_flatten():
    v = np.ones((32, 32, 32))
    v[0, 0, 0] = 100.0
    out = filters.soft_mask_outside_map(v)
    # voxels inside N/2 untouched; the far corner (beyond N/2+3) becomes the weighted mean m̄
    assert out[16, 16, 16] == 1.0 and out[16, 16, 30] == 1.0
    assert out[0, 0, 0] == pytest.approx(out[1, 0, 0])
    assert 1.0 < out[0, 0, 0] < 2.0
    s = filters.solvent_flatten(v, 8.0, 4.0)
    assert s[16, 16, 16] == 1.0 and s[0, 0, 0] == 0.0
    np.testing.assert_allclose(filters.solvent_flatten(v, 8, 4, mask=np.full_like(v, 0.5)), 0.5 * v)


def test_phase_shift_moves_content():
    n = 32
    img = np.zeros((2, n, n), np.float32)
    img[:, 16, 16] = 1.0
    ft = rfft2_centered(img)
    ky, kx = rfft_freqs_2d(n)
    out = irfft2_centered(filters.phase_shift_2d(ft, kx, ky, [3.0, -2.0], [1.0, 5.0], n), n)
    assert np.unravel_index(np.argmax(out[0]), (n, n)) == (17, 19)
    assert np.unravel_index(np.argmax(out[1]), (n, n)) == (21, 14)


def test_normalise_background_removes_ramp():
    n = 64
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[:n, :n] - n // 2
    imgs = rng.normal(3.0, 2.0, size=(2, n, n)) + 0.05 * xx - 0.02 * yy
    out = filters.normalise_background(imgs, 24)
    bg = (xx ** 2 + yy ** 2) > 24 ** 2
    np.testing.assert_allclose(out[:, bg].mean(axis=1), 0.0, atol=1e-5)
    np.testing.assert_allclose(out[:, bg].std(axis=1), 1.0, atol=1e-5)
    # the plane is gone: the background correlates with x no more
    assert abs(np.corrcoef(out[0][bg], xx[bg])[0, 1]) < 1e-4


def test_phase_randomisation_starts_at_the_radius_not_the_rounded_shell():
    """RELION's randomizePhasesBeyond keeps every component with |k|² < r² (half of shell r keeps its phases); the
    amplitudes are kept everywhere."""
    from cryorefine.fourier.fsc import randomise_phases_beyond
    from cryorefine.fourier.transforms import freq_radius
    rng = np.random.default_rng(3)
    vol = rng.normal(size=(16, 16, 16))
    out = randomise_phases_beyond(vol, 5, np.random.default_rng(4))
    # the kx = 0 and Nyquist planes hold Hermitian pairs randomised independently: the real map keeps their
    # symmetric part (as FFTW's c2r does for RELION), so compare the planes in between
    a, b = np.fft.rfftn(vol)[..., 1:-1], np.fft.rfftn(out)[..., 1:-1]
    k = freq_radius(vol.shape)[..., 1:-1]
    np.testing.assert_allclose(np.abs(b), np.abs(a), rtol=1e-9, atol=1e-9)
    kept = k < 5
    assert kept.sum() > 0 and ((k >= 4.5) & (k < 5)).any()
    np.testing.assert_allclose(b[kept], a[kept], rtol=1e-9, atol=1e-9)
    changed = np.abs(np.angle(b[~kept] / a[~kept]))
    assert np.mean(changed > 1e-6) > 0.95


def test_dust_removal_as_relion():
    """removeDust: exactly the pixels more than k background σ above (white) or below (black) the background mean
    are replaced, by draws from N(mean, σ²); the others are kept."""
    rng = np.random.default_rng(5)
    flat = rng.normal(0.0, 1.0, size=(3, 4000))
    flat[0, 10], flat[1, 20], flat[2, 30] = 40.0, -40.0, 6.0
    mean, std = flat.mean(axis=1, keepdims=True), flat.std(axis=1, keepdims=True)
    out = filters.remove_dust(flat, mean, std, 5.0, -1.0, np.random.default_rng(1))
    white = flat - mean > 5.0 * std
    assert white[0, 10] and white[2, 30] and not white[1, 20]
    np.testing.assert_array_equal(out[~white], flat[~white])
    assert np.all(np.abs(out[white] - mean[np.nonzero(white)[0], 0]) < 5.0 * std[np.nonzero(white)[0], 0])
    both = filters.remove_dust(flat, mean, std, 5.0, 5.0, np.random.default_rng(1))
    assert abs(both[1, 20]) < 5.0 and np.array_equal(both[0, :10], flat[0, :10])
    draws = filters.remove_dust(np.full((1, 20000), 9.0), np.zeros((1, 1)), np.full((1, 1), 2.0), 1.0, -1.0,
                                np.random.default_rng(2))
    assert abs(draws.mean()) < 0.05 and abs(draws.std() - 2.0) < 0.05
