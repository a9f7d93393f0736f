"""The references' information limit (counters.reference_limit): grows only on evidence beyond the leak shells."""

import numpy as np
import pytest

from cryorefine.fourier.fsc import fsc_sigma
from cryorefine.refine.counters import LEAK_SHELLS, information_threshold, reference_limit

FLAT = np.full(33, 0.143)


def _fsc(good_to: int, n: int = 33) -> np.ndarray:
    """FSC 1 up to shell good_to, 0 beyond."""
    return np.where(np.arange(n) <= good_to, 1.0, 0.0)


def test_low_passed_start_uses_the_ini_high_edge():
    assert reference_limit(0.0, None, FLAT, 4.0) == 4.0


def test_fsc_next_to_the_limit_is_no_evidence():
    # noise aligned to references cut at shell 4 correlates the halves in the next shell(s) by construction
    for reach in range(4, 4 + LEAK_SHELLS):
        assert reference_limit(4.0, _fsc(reach), FLAT, 4.0) == 4.0, reach


def test_fsc_well_beyond_the_limit_extends_it():
    assert reference_limit(4.0, _fsc(4 + LEAK_SHELLS), FLAT, 4.0) == 4.0 + LEAK_SHELLS + 1
    assert reference_limit(4.0, _fsc(20), FLAT, 4.0) == 21.0


def test_beyond_the_start_the_limit_follows_the_fsc():
    # once data showed information past the start's edge (4), gradual gains of the FSC move the limit at once
    assert reference_limit(12.0, _fsc(12), FLAT, 4.0) == 13.0
    assert reference_limit(12.0, _fsc(13), FLAT, 4.0) == 14.0


def test_limit_follows_a_falling_fsc_and_stops_at_nyquist():
    assert reference_limit(15.0, _fsc(9), FLAT, 4.0) == 10.0
    assert reference_limit(4.0, np.ones(33), FLAT, 4.0) == 32.0


def test_fsc_sigma_matches_independent_noise_maps():
    """1/√n per shell against the spread of the FSC of independent random maps (C1, box 32)."""
    from cryorefine.fourier.fsc import fsc
    rng = np.random.default_rng(3)
    curves = np.array([fsc(rng.normal(size=(32, 32, 32)), rng.normal(size=(32, 32, 32))) for _ in range(40)])
    sigma = fsc_sigma(32)
    np.testing.assert_allclose(curves[:, 4:16].std(0), sigma[4:16], rtol=0.35)
    assert fsc_sigma(32, 4)[8] == np.sqrt(4) * sigma[8]


def test_chance_correlations_of_low_shells_are_not_information():
    """D2, box 64: FSC 0.26, 0.22, 0.15 in shells 5-7 (measured on pure noise) stays below the threshold."""
    thr = information_threshold(fsc_sigma(64, 4))
    noise = np.r_[1, 1, 1, 1, 1, 0.26, 0.22, 0.15, -0.17, np.zeros(24)]
    assert reference_limit(4.0, noise, thr, 4.0) == 4.0
    assert thr[20] == 0.143 and thr[1] == 0.9


def _smooth_noise_ft(rng: np.random.Generator, n: int) -> np.ndarray:
    """Half-complex transform of white noise times a Gaussian envelope of 3 px: voxels correlated over ~n/20 shells,
    as a back-projection of broad posteriors makes them."""
    from cryorefine.fourier.transforms import rfftn_centered
    z, y, x = np.mgrid[:n, :n, :n] - n // 2
    envelope = np.exp(-(x * x + y * y + z * z) / (2 * 3.0 ** 2))
    return rfftn_centered(rng.normal(size=(n, n, n)) * envelope)


def test_null_sigma_measures_the_spread_of_maps_with_correlated_voxels():
    """Independent maps whose neighbouring voxels are correlated: the FSC's spread over 60 pairs is 3-5 times
    1/√n, and fsc_null_sigma of single pairs finds it (within 35 %, the mean of 12)."""
    from cryorefine.fourier.fsc import fsc_ft, fsc_null_sigma
    rng = np.random.default_rng(5)
    n = 32
    pairs = [(_smooth_noise_ft(rng, n), _smooth_noise_ft(rng, n)) for _ in range(60)]
    spread = np.sqrt(np.mean([fsc_ft(a, b) ** 2 for a, b in pairs], axis=0))
    null = np.mean([fsc_null_sigma(a, b, n / 2) for a, b in pairs[:12]], axis=0)
    shells = slice(3, 14)
    assert np.all(spread[shells] > 2.5 * fsc_sigma(n)[shells])          # 1/√n would be far too optimistic
    np.testing.assert_allclose(null[shells], spread[shells], rtol=0.35)


def test_null_sigma_of_symmetrised_halves_and_common_signal():
    """Halves symmetrised with C4 (as the M-step symmetrises) sharing a strong map: the common map cancels in the
    half difference, and a 90° turn about z, which maps each symmetrised half onto itself, must not count as a
    draw; so the spread stays at the level of independent voxels of a C4 map."""
    from cryorefine.fourier.fsc import fsc_ft, fsc_null_sigma
    from cryorefine.fourier.transforms import rfftn_centered
    rng = np.random.default_rng(6)
    n = 32
    c4 = lambda v: sum(np.rot90(v, k, axes=(1, 2)) for k in range(4))    # noqa: E731  C4 about z, centre n//2
    common = 10 * rng.normal(size=(n, n, n))
    half1 = rfftn_centered(c4(common + rng.normal(size=(n, n, n))))
    half2 = rfftn_centered(c4(common + rng.normal(size=(n, n, n))))
    assert fsc_ft(half1, half2)[4:15].min() > 0.95
    null = fsc_null_sigma(half1, half2, n / 2)
    assert np.all(null[4:15] < 2.0 * fsc_sigma(n, 4)[4:15])
    assert np.all(null[n // 2 + 1:] == 0) and null.shape == (n // 2 + 1,)


def _symmetrised_noise(rng: np.random.Generator, n: int, mats: np.ndarray) -> np.ndarray:
    """Half-complex transform of white noise averaged over the rotations `mats` about the centre voxel (x, y, z)."""
    from scipy.ndimage import affine_transform
    from cryorefine.fourier.transforms import rfftn_centered
    v = rng.normal(size=(n, n, n))
    c = np.full(3, n // 2)
    out = sum(affine_transform(v, m[::-1, ::-1], offset=c - m[::-1, ::-1] @ c, order=1) for m in mats)
    return rfftn_centered(out / len(mats))


def test_self_match_planes_known_answer():
    """D2 and a 90° turn about z: gᵀR is a half turn about (1, −1, 0) for the x 2-fold and about (1, 1, 0) for the
    y 2-fold, so those two planes match (n and −n name one plane, not |n| component by component); a turn of the
    group itself (C4's) matches everywhere; C1 has no plane."""
    from cryorefine.fourier.fsc import _self_match_planes
    from cryorefine.geometry.symmetry import symmetry_matrices
    rz = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    got = _self_match_planes(rz, symmetry_matrices("D2"))
    want = np.array([[1.0, -1.0, 0.0], [1.0, 1.0, 0.0]]) / np.sqrt(2)
    np.testing.assert_allclose(got[np.lexsort(got.T[::-1])], want[np.lexsort(want.T[::-1])], atol=1e-9)
    assert _self_match_planes(rz, symmetry_matrices("C4")) is None
    assert _self_match_planes(rz, symmetry_matrices("C1")).shape == (0, 3)


@pytest.mark.parametrize("group", ["D2", "O", "I2"])
def test_null_sigma_of_higher_point_groups_is_not_inflated(group):
    """Halves symmetrised with T, O or I match their own copies under the cube's rotations (O contains all 14; I the
    eight 3-folds; the half turns of D2, T and I map planes of Fourier pixels onto copies). Left out, the measured
    spread of independent symmetrised maps is at most 1.5 times their FSC's actual spread, 1.15 times on average over
    the shells (it was 2.4-2.7 times for O and I, which then reported 11.4 A for 9.3 A maps); for O no draw is left:
    0, so 1/sqrt(n/|G|) is used, as in shells where every pixel is near a matching plane."""
    from cryorefine.fourier.fsc import fsc_ft, fsc_null_sigma
    from cryorefine.geometry.symmetry import symmetry_matrices
    rng = np.random.default_rng(11)
    n, mats = 32, symmetry_matrices(group)
    pairs = [(_symmetrised_noise(rng, n, mats), _symmetrised_noise(rng, n, mats)) for _ in range(12)]
    actual = np.sqrt(np.mean([fsc_ft(a, b) ** 2 for a, b in pairs], axis=0))
    null = np.mean([fsc_null_sigma(a, b, n / 2, mats) for a, b in pairs], axis=0)
    shells = slice(4, 14)
    if group == "O":
        assert np.all(null == 0)
    else:
        ratio = null[shells] / np.maximum(actual, fsc_sigma(n, len(mats)))[shells]
        assert ratio.max() < 1.5 and ratio.mean() < 1.15       # D2 with the matching planes kept: 1.49, 1.27
        # a shell whose every pixel lies near a matching plane (I2's lowest) has no draw: 0, then 1/sqrt(n/|G|)
        measured = null[shells] > 0
        assert measured.sum() >= 7 and np.all(null[shells][measured] > 0.4 * actual[shells][measured])


def test_threshold_takes_the_larger_spread():
    sigma = fsc_sigma(64, 4)
    null = np.zeros_like(sigma)
    null[6] = 0.2
    thr = information_threshold(sigma, null)
    assert thr[6] == 3 * 0.2 and thr[7] == information_threshold(sigma)[7]
    assert np.array_equal(information_threshold(sigma, None), information_threshold(sigma))


def test_noise_fsc_within_its_measured_spread_keeps_the_limit():
    """Pure noise (D2, box 64, broad posteriors; `noise` set, seed 2, iteration 2): FSC 0.72, 0.71, 0.45 at shells
    5-7 passes the 1/√n threshold but not the measured spread (0.51, 0.36, 0.26)."""
    sigma = fsc_sigma(64, 4)
    fsc = np.r_[1, 1, 1, 1, 0.99, 0.72, 0.71, 0.45, 0.36, -0.05, np.zeros(23)]
    null = np.r_[1, 0.61, 0.61, 0.54, 0.42, 0.51, 0.36, 0.26, 0.24, 0.13, np.zeros(23)]
    assert reference_limit(4.0, fsc, information_threshold(sigma), 4.0) > 4.0
    assert reference_limit(4.0, fsc, information_threshold(sigma, null), 4.0) == 4.0


def test_first_chance_shell_finds_fsc_within_three_sigma():
    from cryorefine.refine.counters import first_chance_shell
    fsc = np.r_[1, 1, 1, 1, 1, 0.8, 0.7, 0.6, 0.1, np.zeros(24)]
    thr = information_threshold(np.full(33, 0.05))
    assert first_chance_shell(fsc, thr, 5, 7) is None                    # 0.6 > max(0.143, 0.15)
    assert first_chance_shell(fsc, thr, 5, 12) == 8
    wide = information_threshold(np.full(33, 0.05), np.r_[np.zeros(6), 0.25, np.zeros(26)])   # 0.7 < 0.75
    assert first_chance_shell(fsc, wide, 5, 7) == 6
    assert first_chance_shell(fsc, thr, 40, 50) is None


def test_null_sigma_against_brute_force_on_a_tiny_grid():
    """Every draw by explicit loops over the stored voxels, with d(Mk) read from the full complex transform."""
    from cryorefine.fourier.fsc import NULL_ROTATIONS, fsc_null_sigma
    from cryorefine.fourier.transforms import rfftn_centered
    rng = np.random.default_rng(8)
    n, r_max = 8, 3.6
    v1, v2 = rng.normal(size=(2, n, n, n))
    full = np.fft.fftn(np.fft.ifftshift(v1 - v2), norm="forward")
    freq = lambda i: i - n if i >= n // 2 and i != n // 2 else i      # noqa: E731  fft order, +n/2 kept
    draws = []
    for rot in NULL_ROTATIONS:
        num, den = np.zeros(n // 2 + 1), np.zeros(n // 2 + 1)
        for iz in range(n):
            for iy in range(n):
                for ix in range(n // 2 + 1):
                    kvec = np.array([ix, freq(iy), freq(iz)])
                    r = np.sqrt((kvec ** 2).sum())
                    if r > r_max:
                        continue
                    mx, my, mz = -(rot @ kvec)
                    a, b = full[iz, iy, ix], full[mz % n, my % n, mx % n]
                    num[int(round(r))] += (a * np.conj(b)).real
                    den[int(round(r))] += abs(a) ** 2
        draws.append(np.divide(num, den, out=np.zeros_like(num), where=den > 0))
    want = np.sqrt(np.mean(np.square(draws), axis=0))
    got = fsc_null_sigma(rfftn_centered(v1), rfftn_centered(v2), r_max)
    np.testing.assert_allclose(got, want, atol=2e-6)


def test_final_resolution_is_cut_where_the_fsc_is_chance():
    """The `noise` set's seed-1 final FSC and measured spread: 0.143 alone gives shell 7 (22.9 Å); shell 5 is within
    3σ of chance, so the resolution is shell 4 (40 Å, the join). A curve far above its spread is not cut (K = 0,
    RELION's rule, is the loop's test below)."""
    from cryorefine.refine.counters import with_significant_resolution
    from cryorefine.refine.state import Counters
    box, apix = 64, 2.5
    thr = information_threshold(fsc_sigma(box, 4), np.r_[0, 0, 0, 0, 0.69, 0.65, 0.39, 0.31, 0.64, np.full(24, 0.3)])
    noise = Counters(current_resolution=7 / (box * apix), fsc=np.r_[1, 1, 1, 1, 1, 0.49, 0.28, 0.65, -0.3,
                                                                     np.zeros(24)])
    cut, s = with_significant_resolution(noise, thr, 4, box, apix)
    assert s == 5 and cut.current_resolution == 4 / (box * apix)
    data = Counters(current_resolution=24 / (box * apix), fsc=np.r_[np.ones(20), 0.6, 0.4, 0.3, 0.2, 0.16, 0.1,
                                                                    np.zeros(7)])
    assert with_significant_resolution(data, information_threshold(fsc_sigma(box, 4)), 4, box, apix) == (data, None)
    # a shell whose FSC is above 0.9 shows information however few voxels it holds
    strong = Counters(current_resolution=8 / (box * apix), fsc=np.r_[np.ones(5), 0.95, 0.93, 0.92, 0.91, np.zeros(24)])
    assert with_significant_resolution(strong, information_threshold(np.full(33, 0.6)), 4, box, apix) == (strong, None)


def test_final_resolution_log_lines_with_and_without_the_criterion():
    """The loop's final step: with K = 3 the number is cut and the log gives both; with K = 0 it stays RELION's and
    the log warns."""
    from types import SimpleNamespace
    from cryorefine.refine.loop import significant_final_resolution
    from cryorefine.refine.state import Counters
    box, apix = 64, 2.5
    c = Counters(current_resolution=7 / (box * apix), fsc=np.r_[1, 1, 1, 1, 1, 0.49, 0.28, 0.65, -0.3, np.zeros(24)],
                 fsc_null_sigma=np.r_[0, 0, 0, 0, 0.69, 0.65, 0.39, 0.31, 0.64, np.full(24, 0.3)])
    for k, want_res, want_line in [(3.0, 40.0, "Resolution: the gold-standard FSC at 32.00 A (shell 5)"),
                                   (0.0, 160 / 7, "WARNING: the gold-standard FSC at 32.00 A (shell 5)")]:
        lines = []
        state = SimpleNamespace(opts=SimpleNamespace(fsc_sigma_criterion=k, low_resol_join_halves=40.0), box=box,
                                angpix=apix, sym_mats=np.zeros((4, 3, 3)), counters=c,
                                log=SimpleNamespace(auto=lines.append))
        out = significant_final_resolution(state, c)
        assert abs(1 / out.current_resolution - want_res) < 1e-9
        assert len(lines) == 1 and lines[0].startswith(want_line) and "22.86 A" in lines[0], lines
