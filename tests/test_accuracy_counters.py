"""The accuracy estimate (spec §5.1) against explicit loops, and the convergence counters (spec §3.8, §5.2, §6.1)
on a scripted sequence of iterations."""

from __future__ import annotations

import numpy as np
import pytest

from cryorefine.fourier.projector import make_projector, project
from cryorefine.geometry.euler import euler_to_matrix
from cryorefine.refine import counters as cnt
from cryorefine.refine.accuracy import expected_accuracies
from cryorefine.refine.autosampling import ANGLE_LIMIT, SHIFT_LIMIT, angle_schedule, shift_schedule
from cryorefine.refine.state import Counters
from cryorefine.refine.autosampling import SamplingDecision
from cryorefine.refine.pixels import pixel_set


def _blob_map(n: int = 24) -> np.ndarray:
    c = np.arange(n) - n // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    return (np.exp(-((x - 3) ** 2 + y ** 2 + z ** 2) / 6.0) + 0.7 * np.exp(-(x ** 2 + (y + 4) ** 2 + (z - 2) ** 2)
                                                                             / 3.0)).astype(np.float32)


def test_accuracy_estimate_equals_explicit_loops():
    n, angpix = 24, 2.0
    proj = make_projector(_blob_map(n), 2, n / 2)
    ps = pixel_set(n, n)
    rng = np.random.default_rng(5)
    rot, tilt, psi = rng.uniform(-180, 180, 6), rng.uniform(20, 160, 6), rng.uniform(-180, 180, 6)
    ctf = rng.uniform(0.3, 1.0, size=(6, ps.m)).astype(np.float32)
    isig = 1.0 / np.linspace(2e-4, 5e-5, n // 2 + 1)
    acc_rot, acc_trans = expected_accuracies(proj, ps, ctf, isig, rot, tilt, psi, angpix, np.random.default_rng(9))

    draw = np.random.default_rng(9)
    which = draw.integers(0, 3, size=6)
    axis = draw.integers(0, 2, size=6)
    w = isig[ps.shell] * (ps.shell >= 1)
    rots, shifts = [], []
    for i in range(6):
        p0 = project(proj, euler_to_matrix(rot[i], tilt[i], psi[i])[None], ps.kx_model, ps.ky_model)[0]
        found = ANGLE_LIMIT
        for e in angle_schedule():
            ang = [rot[i], tilt[i], psi[i]]
            ang[which[i]] += e
            p = project(proj, euler_to_matrix(*ang)[None], ps.kx_model, ps.ky_model)[0]
            if 0.5 * np.sum(np.abs(ctf[i] * (p - p0)) ** 2 * w) > -np.log(0.01):
                found = e
                break
        rots.append(found)
        found = SHIFT_LIMIT
        for e in shift_schedule():
            t = np.array([e, 0.0]) if axis[i] == 0 else np.array([0.0, e])
            ph = np.exp(-2j * np.pi * (ps.kx * t[0] + ps.ky * t[1]) / n)
            if 0.5 * np.sum(np.abs(ctf[i] * p0 * (1 - ph)) ** 2 * w) > -np.log(0.01):
                found = e
                break
        shifts.append(found)
    assert acc_rot == pytest.approx(np.mean(rots), abs=1e-9)
    assert acc_trans == pytest.approx(np.mean(shifts) * angpix, abs=1e-9)
    assert 0 < acc_rot < ANGLE_LIMIT and 0 < acc_trans < SHIFT_LIMIT * angpix


def test_counters_follow_a_scripted_sequence():
    box, angpix = 64, 2.5                                 # shell r is at 160/r Å
    c = cnt.initial_counters(10, box, angpix, 50.0)
    assert c.current_resolution == pytest.approx(3 / 160) and c.nr_iter_wo_resol_gain == 0
    ssnr = lambda r: np.r_[np.full(r + 1, 5.0), np.full(box // 2 - r, 0.5)]   # SSNR > 1 up to shell r  # noqa: E731
    c = cnt.with_resolution(c, ssnr(10), box, angpix, 50.0, keep_ini_high=False)
    assert c.current_resolution == pytest.approx(10 / 160) and c.nr_iter_wo_resol_gain == 0
    c = cnt.with_resolution(c, ssnr(10), box, angpix, 50.0, keep_ini_high=False)
    assert c.nr_iter_wo_resol_gain == 1                   # same resolution: no gain
    c = cnt.with_resolution(c, ssnr(12), box, angpix, 50.0, keep_ini_high=False)
    assert c.nr_iter_wo_resol_gain == 0 and c.best_resolution == pytest.approx(12 / 160)
    # changes: large, then small (below 0.4 of the fine steps) -> counted
    c = cnt.with_changes(c, d_ang=10.0, d_off=3.0, fine_angle=3.75, fine_step=1.0)
    assert c.nr_iter_wo_large_changes == 0 and c.smallest_changes_orient == 10.0
    c = cnt.with_changes(c, d_ang=1.0, d_off=0.3, fine_angle=3.75, fine_step=1.0)
    assert c.nr_iter_wo_large_changes == 1 and c.changes_orient == 1.0 and c.smallest_changes_offset == 0.3
    # a finer sampling resets the counters; the fine-enough flag then allows convergence
    c = cnt.with_sampling_decision(c, SamplingDecision(True, False, "refined"))
    assert c.nr_iter_wo_large_changes == 0 and c.nr_iter_wo_resol_gain == 0 and c.smallest_changes_orient == 999.0
    assert not cnt.has_converged(c, False)
    c = cnt.with_sampling_decision(c, SamplingDecision(False, True, "fine enough"))
    c = cnt.with_resolution(c, ssnr(12), box, angpix, 50.0, keep_ini_high=False)
    assert not cnt.has_converged(c, False) and cnt.has_converged(c, True)     # hidden variables still changing
    # after a reset the smallest class change is 9999999, so (as in RELION) the first iteration never counts
    c = cnt.with_changes(c, d_ang=0.5, d_off=0.1, fine_angle=1.875, fine_step=0.5)
    assert c.nr_iter_wo_large_changes == 0 and not cnt.has_converged(c, False)
    c = cnt.with_changes(c, d_ang=0.5, d_off=0.1, fine_angle=1.875, fine_step=0.5)
    assert c.nr_iter_wo_large_changes == 1 and cnt.has_converged(c, False)
    c = cnt.with_convergence(c, False)
    assert c.has_converged and cnt.with_convergence(replace_fine(c), False).has_converged   # latched


def replace_fine(c: Counters) -> Counters:
    """The counters with the fine-enough flag cleared (convergence, once reached, stays)."""
    from dataclasses import replace
    return replace(c, has_fine_enough_angular_sampling=False)


def test_fsc_statistics_raise_incr_size_and_latch_high_fsc():
    c = Counters(current_size=40, incr_size=10)
    fsc = np.r_[1.0, np.linspace(0.99, 0.0, 32)]
    c = cnt.with_fsc(c, fsc)
    s05 = int(np.nonzero(fsc[1:] < 0.5)[0][0]) + 1
    s0143 = int(np.nonzero(fsc[1:] < 0.143)[0][0]) + 1
    assert c.incr_size == max(10, s0143 - s05 + 5)
    assert c.has_high_fsc_at_limit == (fsc[19] > 0.2)
    low = cnt.with_fsc(Counters(current_size=40, has_high_fsc_at_limit=True), np.zeros(33))
    assert low.has_high_fsc_at_limit                        # latched
