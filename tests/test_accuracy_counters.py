"""The accuracy estimate (spec §5.1) against explicit loops, on a known answer and on a random sample of several
optics groups; the convergence counters (spec §3.8, §5.2, §6.1) on scripted sequences of iterations."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from cryorefine.fourier.projector import make_projector, project
from cryorefine.geometry.euler import euler_to_matrix
from cryorefine.geometry.sampling import angular_step
from cryorefine.refine import counters as cnt
from cryorefine.refine import autosampling as autos
from cryorefine.refine.accuracy import accuracy_sample, estimate_accuracy, expected_accuracies
from cryorefine.refine.autosampling import ANGLE_LIMIT, SHIFT_LIMIT, SamplingDecision, angle_schedule, shift_schedule
from cryorefine.refine.backend import cpu_backend
from cryorefine.refine.data import OpticsGroup
from cryorefine.refine.pixels import pixel_set
from cryorefine.refine.state import Counters, RefineOptions


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


# --- the accuracy estimate on a known answer, over a random sample of two optics groups -------------------------

MODEL_BOX, MODEL_ANGPIX = 16, 2.0
GROUPS = [OpticsGroup(1, 16, 2.0, 1.0), OpticsGroup(2, 24, 1.0, 32.0 / 24.0)]    # different box and pixel size
CURRENT_SIZE = 12               # C of the model box: C_o = min(N_o, 2 ceil(C / (2 model_scale))) = 12 and 10 px
SIZES = [12, 10]
KNOWN_PX = [0.6, 0.8]           # the translational accuracy (px) each group is given by its noise level below


def _delta_projector():
    """A unit point at the centre of the model box: every projection is the constant 1/N² (projection-slice
    theorem with 1/N^d-normalised centred transforms), out to r_max = N/2 model pixels."""
    vol = np.zeros((MODEL_BOX,) * 3, np.float32)
    vol[(MODEL_BOX // 2,) * 3] = 1.0
    return make_projector(vol, 2, MODEL_BOX / 2)


def _shift_energy(box: int, size: int, e: float) -> float:
    """Σ_k |P(k)|² |1 − e^{−2πi kx e/N_o}|² / 2 for the point's projection P = 1/N² and 1/σ² = 1, over the unique
    half-plane pixels with 1 ≤ round|k| ≤ size/2 (a shift along y gives the same sum by symmetry)."""
    total = 0.0
    for ky in range(-box // 2, box // 2):
        for kx in range(box // 2 + 1):
            r = int(np.rint(np.hypot(kx, ky)))
            if (kx > 0 or ky >= 0) and 1 <= r <= size // 2:
                total += (1.0 / MODEL_BOX ** 2) ** 2 * (1.0 - np.cos(2 * np.pi * kx * e / box))
    return total


def _inv_sigma2(o: int) -> float:
    """White 1/σ² of group o that puts the point's energy 2 % above −ln 0.01 at KNOWN_PX[o] (rotations change
    nothing), so that the schedule's first crossing is KNOWN_PX[o]: the step before stays below."""
    g = GROUPS[o]
    isig = 1.02 * -np.log(0.01) / _shift_energy(g.box, SIZES[o], KNOWN_PX[o])
    sched = shift_schedule()
    before = sched[np.searchsorted(sched, KNOWN_PX[o] - 1e-9) - 1]
    assert isig * _shift_energy(g.box, SIZES[o], before) < -np.log(0.01)
    return isig


def _run_state(subset: np.ndarray, optics_index: np.ndarray, current_size: int = CURRENT_SIZE):
    """What estimate_accuracy reads of a RunState: half-sets, optics groups, σ², poses, C, the backend."""
    n = len(subset)
    rng = np.random.default_rng(0)
    data = SimpleNamespace(subset=subset, optics_index=optics_index, optics=GROUPS)
    model = SimpleNamespace(sigma2={o: np.full(g.box // 2 + 1, 1.0 / _inv_sigma2(o)) for o, g in enumerate(GROUPS)})
    poses = SimpleNamespace(rot=rng.uniform(-180, 180, n), tilt=rng.uniform(0, 180, n), psi=rng.uniform(-180, 180, n))
    return SimpleNamespace(data=data, opts=SimpleNamespace(ctf=False), counters=SimpleNamespace(
        current_size=current_size), models=(model, model), poses=poses, backend=cpu_backend())


def test_accuracy_of_a_point_is_known_per_optics_group():
    """Two groups in the sample: acc_trans is the mean over particles of each group's known shift x its pixel size."""
    subset = np.array([1, 2] * 150)
    optics_index = np.r_[np.zeros(200, int), np.ones(100, int)]
    state = _run_state(subset, optics_index)
    acc_rot, acc_trans = estimate_accuracy(state, _delta_projector(), np.random.default_rng(7))
    rows = accuracy_sample(subset, np.random.default_rng(7))      # the draw estimate_accuracy made first
    assert set(optics_index[rows]) == {0, 1}
    per_particle = np.array([KNOWN_PX[o] * GROUPS[o].angpix for o in optics_index[rows]])
    assert acc_trans == pytest.approx(per_particle.mean(), rel=1e-12)
    assert acc_rot == ANGLE_LIMIT                                 # a centred point looks the same from everywhere


def test_accuracy_sample_is_random_seeded_and_from_all_optics_groups():
    subset = np.array([1, 2] * 150)
    optics_index = np.r_[np.zeros(200, int), np.ones(100, int)]
    rows = accuracy_sample(subset, np.random.default_rng(11))
    assert len(rows) == 100 == len(np.unique(rows)) and np.all(subset[rows] == 1)
    assert set(optics_index[rows]) == {0, 1}                      # the first 100 in file order are all group 0
    np.testing.assert_array_equal(rows, accuracy_sample(subset, np.random.default_rng(11)))
    assert not np.array_equal(rows, accuracy_sample(subset, np.random.default_rng(12)))
    few = np.array([1, 2, 2, 1, 2])
    np.testing.assert_array_equal(accuracy_sample(few, np.random.default_rng(1)), [0, 3])   # min(100, n)


def test_accuracy_when_the_first_optics_group_has_no_half1_particle():
    subset = np.r_[np.full(40, 2), np.array([1, 2] * 30)]
    optics_index = np.r_[np.zeros(40, int), np.ones(60, int)]
    state = _run_state(subset, optics_index)
    acc_rot, acc_trans = estimate_accuracy(state, _delta_projector(), np.random.default_rng(3))
    assert acc_trans == pytest.approx(KNOWN_PX[1] * GROUPS[1].angpix, rel=1e-12)
    assert acc_rot == ANGLE_LIMIT


# --- the convergence counters on scripted iterations --------------------------------------------------------------

def _ssnr(r: int, box: int = 64) -> np.ndarray:
    """SSNR > 1 up to shell r, < 1 beyond."""
    return np.r_[np.full(r + 1, 5.0), np.full(box // 2 - r, 0.5)]


def test_no_gain_counter_compares_with_the_previous_iteration_not_the_best():
    box, angpix = 64, 2.5
    c = cnt.initial_counters(10, box, angpix, 50.0)
    seq = [(12, 0), (10, 1), (11, 0), (11, 1), (11, 2), (13, 0)]   # (resolution shell, expected no-gain count)
    for r, want in seq:
        c = cnt.with_resolution(c, _ssnr(r), box, angpix, 50.0, keep_ini_high=False)
        assert c.current_resolution == pytest.approx(r / (box * angpix))
        assert c.nr_iter_wo_resol_gain == want, (r, want)
    assert c.best_resolution == pytest.approx(13 / (box * angpix))


def test_changes_count_as_stable_when_small_or_not_shrinking():
    c = Counters(smallest_changes_class=0.0)            # as after a first evaluation (Δcls = 0 ≥ 1.03 · 0)
    c = cnt.with_changes(c, d_ang=5.0, d_off=2.0, fine_angle=3.75, fine_step=1.0)     # both below their minima
    assert c.nr_iter_wo_large_changes == 0
    c = cnt.with_changes(c, d_ang=5.0, d_off=2.0, fine_angle=3.75, fine_step=1.0)     # large, but not shrinking
    assert c.nr_iter_wo_large_changes == 1
    c = cnt.with_changes(c, d_ang=4.0, d_off=2.0, fine_angle=3.75, fine_step=1.0)     # angles shrank: not stable
    assert c.nr_iter_wo_large_changes == 0
    c = cnt.with_changes(c, d_ang=1.4, d_off=0.39, fine_angle=3.75, fine_step=1.0)    # < 0.4 of the steps
    assert c.nr_iter_wo_large_changes == 1 and c.smallest_changes_orient == 1.4


def test_a_scripted_refinement_converges_when_the_rule_of_section_6_holds():
    """The loop's order over scripted iterations (convergence check; accuracy; sampling update from iteration 2;
    then the M-step's resolution and hidden-variable counters): the sampling refines twice (each time resetting the
    counters), becomes fine enough, and the run converges at the first check where fine-enough sampling, no
    resolution gain and stable hidden variables hold together (spec §5.2, §5.3, §6.1)."""
    box, angpix = 64, 2.5
    opts = RefineOptions("in.star", "ref.mrc", "out", particle_diameter=100.0, healpix_order=2,
                         auto_local_healpix_order=4)
    s = autos.initial_sampling(opts, angpix)
    c = cnt.initial_counters(10, box, angpix, 50.0)
    # per iteration: (resolution shell, estimated acc_rot deg, Δang deg, Δoff Å)
    script = [(8, 20.0, 30.0, 3.0), (12, 20.0, 10.0, 2.0), (12, 20.0, 10.0, 2.0), (12, 1.0, 10.0, 2.0),
              (12, 1.0, 3.0, 0.5), (12, 1.0, 0.2, 0.1), (12, 1.0, 0.2, 0.1), (12, 1.0, 0.2, 0.1),
              (12, 3.0, 0.2, 0.1), (12, 3.0, 0.2, 0.1), (12, 3.0, 0.2, 0.1)]
    # after each iteration: (HEALPix order, no-gain count, stable count, fine enough), derived by hand from the rules
    want = [(2, 0, 0, False), (2, 0, 0, False), (2, 1, 1, False), (3, 1, 0, False), (3, 2, 0, False),
            (3, 3, 1, False), (4, 1, 0, False), (4, 2, 1, False), (4, 3, 2, True)]
    trace, converged_at = [], None
    for it, (r, acc_rot, d_ang, d_off) in enumerate(script, start=1):
        c = cnt.with_convergence(c, opts.auto_ignore_angles)
        if c.has_converged:
            converged_at = it
            break
        c = cnt.with_accuracy(c, acc_rot, 1.0)
        if it > 1:
            s, decision = autos.next_sampling(opts, s, c)
            c = cnt.with_sampling_decision(c, decision)
        c = cnt.with_resolution(c, _ssnr(r), box, angpix, 50.0, keep_ini_high=False)
        c = cnt.with_changes(c, d_ang, d_off, angular_step(s.healpix_order + s.oversampling),
                             s.offset_step / 2 ** s.oversampling)
        trace.append((s.healpix_order, c.nr_iter_wo_resol_gain, c.nr_iter_wo_large_changes,
                      c.has_fine_enough_angular_sampling))
    assert trace == want
    assert converged_at == 10 and s.local_searches
