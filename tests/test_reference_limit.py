"""The references' information limit (counters.reference_limit): grows only on evidence beyond the leak shells."""

import numpy as np

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
