"""Unit checks of the refinement pieces against known answers (significance, sizes, schedules, sampling rules)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cryorefine.geometry.euler import euler_to_matrix, matrix_to_euler
from cryorefine.refine import autosampling as autos
from cryorefine.refine import counters as cnt
from cryorefine.refine.fine_kernels import coarse_residuals
from cryorefine.refine.weights import coarse_significance, significance_threshold
from cryorefine.refine.orientations import fine_angles, make_grid, make_translations
from cryorefine.refine.pixels import pixel_set, shift_phases, unique_pixels_per_shell
from cryorefine.refine.state import Counters, RefineOptions, SamplingState


@pytest.mark.parametrize("spread", [0.1, 1.0, 10.0, 300.0])
def test_significance_matches_sorted_cumulative_sum(spread):
    rng = np.random.default_rng(1)
    lw = rng.normal(size=5000) * spread
    lw[::11] = -np.inf
    thr, count, total, mx = significance_threshold(lw, 0.999)
    w = np.sort(np.exp(lw - lw.max()))[::-1]
    cs = np.cumsum(w)
    k = int(np.searchsorted(cs, 0.999 * cs[-1], side="right"))
    assert count == k + 1
    assert thr == pytest.approx(np.log(w[k]) + lw.max(), abs=1e-9)
    assert total == pytest.approx(cs[-1])


def test_coarse_significance_agrees_with_single_row_version():
    rng = np.random.default_rng(2)
    cross = rng.normal(size=(3, 5, 40)).astype(np.float32) * 20
    norm = rng.uniform(1, 50, size=(3, 40)).astype(np.float32)
    lp_off = rng.normal(size=(3, 5))
    lp_dir = np.log(rng.uniform(0.1, 1, size=40))
    keep, counts = coarse_significance(coarse_residuals(cross, norm, False), lp_off, lp_dir, False, 0.999, -1)
    for b in range(3):
        d = 0.5 * norm[b][None, :] - cross[b]
        lw = -(d - d.min()) + lp_off[b][:, None] + lp_dir[None, :]
        thr, cnt, _, _ = significance_threshold(lw.ravel().astype(np.float64), 0.999)
        assert counts[b] == cnt
        np.testing.assert_array_equal(keep[b], lw >= thr)
    d_cc = coarse_residuals(cross, norm, True)
    np.testing.assert_allclose(d_cc, -cross / np.sqrt(norm)[:, None, :], rtol=1e-6)
    keep_cc, counts_cc = coarse_significance(d_cc, lp_off, lp_dir, True, 0.999, -1)
    assert keep_cc.sum() == 3 and np.all(counts_cc == 1)


def test_pixel_set_counts_and_unique_half_plane():
    ps = pixel_set(64, 64)
    assert ps.m == int((ps.shell <= 32).sum())
    assert not np.any((ps.kx == 0) & (ps.ky < 0))
    npix = unique_pixels_per_shell(64)
    # a shell of radius r holds about pi*r unique pixels (half of the ring 2*pi*r), on average over shells
    r = np.arange(10, 31)
    assert npix[r].sum() == pytest.approx(np.pi * r.sum(), rel=0.03)


def test_shift_phase_moves_content():
    from cryorefine.fourier.transforms import irfft2_centered, rfft2_centered
    img = np.zeros((32, 32), np.float32)
    img[16, 16] = 1
    ps = pixel_set(32, 32)
    ft = rfft2_centered(img).ravel()
    shifted = np.zeros(32 * 17, np.complex64)
    shifted[ps.flat] = ft[ps.flat] * shift_phases(ps, np.array([[3.0, -2.0]]))[0]
    full = shifted.reshape(32, 17)
    full[1:, 0] = np.conj(full[1:, 0][::-1])  # complete the kx = 0 column from the unique half
    out = irfft2_centered(full, 32)
    assert np.unravel_index(np.argmax(out), out.shape) == (14, 19)


def test_image_sizes_follow_resolution_and_coarse_rule():
    c = Counters(current_resolution=1 / 20.0, incr_size=10)
    size, coarse = autos.image_sizes(c, 64, 2.5, 0.0, False, 2, 150.0)
    assert size == 2 * (round(64 * 2.5 / 20) + 10)
    # arc length of one 15 deg step at the particle edge: 15/360*pi*150/1.2 = 16.36 A -> 2*ceil(160/16.36)
    assert coarse == min(size, 2 * int(np.ceil(160 / (15 / 360 * np.pi * 150 / 1.2))))
    assert autos.image_sizes(c, 64, 2.5, 0.0, True, 2, 150.0)[0] == 64


def test_resolution_shell_and_ssnr_threshold():
    ssnr = np.array([999, 50, 20, 9, 5, 3, 2, 1.5, 0.8, 0.3, 0.1])
    assert cnt.resolution_shell(ssnr) == 7
    # a dip below 1 followed by a rise more than three shells later is taken (spec 3.8)
    ssnr2 = np.array([999, 50, 20, 9, 5, 0.5, 2, 2, 2, 2, 2, 0.1, 0.1])
    assert cnt.resolution_shell(ssnr2) == 10
    # ... but one noisy shell far out is not a rise (a run of four shells is needed)
    ssnr3 = np.array([999, 50, 20, 9, 5, 0.5, 0.2, 0.1, 0.1, 1.2, 0.1, 0.1, 0.1])
    assert cnt.resolution_shell(ssnr3) == 5


def test_accuracy_schedules_match_relion_steps():
    a = autos.angle_schedule()
    assert a[0] == pytest.approx(0.05) and a[-1] == 30
    assert np.all(np.diff(a) > 0)
    assert 1.0 in np.round(a, 6) and 5.0 in np.round(a, 6)
    t = autos.shift_schedule()
    assert t[0] == pytest.approx(0.1) and t[-1] == 10


def test_sampling_update_goes_finer_and_local():
    opts = RefineOptions("p", "r", "o", particle_diameter=150.0)
    s = SamplingState(3, 7.5, 12.5, 5.0, 1, False, 0.0, 0.5, 0.0, 2, 12.5, 5.0)
    c = Counters(current_resolution=1 / 8.0, nr_iter_wo_resol_gain=1, nr_iter_wo_large_changes=1, acc_rot=4.0,
                 acc_trans=2.0, changes_offset=1.0)
    new, decision = autos.next_sampling(opts, s, c)
    c = cnt.with_sampling_decision(c, decision)
    assert new.healpix_order == 4 and new.local_searches
    assert new.sigma_ang == pytest.approx(2 * 1.875)
    assert new.offset_step <= s.offset_step
    assert "refined" in decision.note and c.nr_iter_wo_resol_gain == 0
    # fine enough: step 1.875 < 0.75 * 4 -> unchanged, flag set
    c2 = Counters(current_resolution=1 / 8.0, nr_iter_wo_resol_gain=1, nr_iter_wo_large_changes=1, acc_rot=4.0,
                  acc_trans=2.0, changes_offset=1.0)
    same, decision2 = autos.next_sampling(opts, new, c2)
    c2 = cnt.with_sampling_decision(c2, decision2)
    assert same.healpix_order == 4 and c2.has_fine_enough_angular_sampling and "finer than" in decision2.note


def test_fine_children_surround_their_parent():
    grid = make_grid(2, "C1", 15.0, 1, 0.0, False)
    ids = np.arange(0, grid.n_psi * len(grid.dir_pix), 97)
    from cryorefine.refine.orientations import coarse_matrices, fine_matrices
    parent = coarse_matrices(grid, ids)
    fine_ids = (ids[:, None] * grid.n_children + np.arange(grid.n_children)).ravel()
    child = fine_matrices(grid, fine_ids).reshape(len(ids), grid.n_children, 3, 3)
    rel = np.einsum("nij,nckj->ncik", parent, child)
    ang = np.degrees(np.arccos(np.clip((np.trace(rel, axis1=2, axis2=3) - 1) / 2, -1, 1)))
    assert ang.max() < 15.0          # within one coarse step of the parent
    rot, tilt, psi = fine_angles(grid, fine_ids)
    assert np.allclose(np.sort(np.unique(np.round(psi % 7.5, 6))), [3.75])   # psi children at +-step/4


def test_translations_are_perturbed_and_centred():
    tg = make_translations(12.5, 5.0, 2.5, 1, 0.2)
    assert len(tg.coarse) == 21
    assert np.allclose(tg.coarse.mean(0), 0.2 * 2.0)
    ch = tg.children(np.arange(len(tg.coarse)))
    assert np.allclose(ch.mean(1), tg.coarse)


def test_euler_round_trip_of_perturbed_matrices():
    m = euler_to_matrix(10, 80, -30) @ euler_to_matrix(1.0, 1.0, 1.0)
    r, t, p = matrix_to_euler(m)
    assert np.allclose(euler_to_matrix(r, t, p), m, atol=1e-10)


def test_maxsig_caps_the_number_of_significant_samples():
    lw = np.random.default_rng(3).normal(size=10000) * 0.01   # an almost flat posterior
    thr, count, _, _ = significance_threshold(lw, 0.999, 500)
    assert count == 500 and int((lw >= thr).sum()) == 500
    thr_all, count_all, _, _ = significance_threshold(lw, 0.999, -1)
    assert count_all > 9900


@pytest.mark.parametrize("join, ini_high, current, expected", [
    (40.0, 50.0, 1 / 5.0, 4.0),        # the join: ceil(160 / max(40, 5)) = 4
    (-1.0, 50.0, 1 / 5.0, 3.2),        # no join: the initial low-pass, 160 / 50
    (-1.0, -1.0, 1 / 5.0, 160 / 60),   # neither: RELION's 60 Å start (was a ZeroDivisionError in the final iteration)
])
def test_shared_shell_of_the_unfiltered_maps(join, ini_high, current, expected):
    from types import SimpleNamespace

    from cryorefine.refine.loop import shared_shell
    state = SimpleNamespace(box=64, angpix=2.5, opts=SimpleNamespace(low_resol_join_halves=join, ini_high=ini_high),
                            counters=SimpleNamespace(current_resolution=current))
    assert shared_shell(state) == pytest.approx(expected)


def test_model_grid_is_the_first_optics_group_of_the_table(small_set, tmp_path):
    """Two optics groups listed [2, 1] with different pixel and box sizes: the model grid is the first row's (RELION's
    getOpticsPixelSize(0)), as in reconstruct, not the lowest group number's; each group's scale is relative to it."""
    from cryorefine.io.star import read_particles, write_particles
    from cryorefine.refine.data import load_particles

    table = read_particles(small_set / "particles.star")
    table.particles = table.particles.iloc[:20].reset_index(drop=True)
    table.particles["rlnImageName"] = [f"{s.split('@')[0]}@{Path(s.split('@')[1]).resolve()}"
                                       for s in table.particles["rlnImageName"]]
    two = table.optics.iloc[[0, 0]].reset_index(drop=True)
    two.loc[0, ["rlnOpticsGroup", "rlnOpticsGroupName", "rlnImagePixelSize"]] = [2, "opticsGroup2", 2.0]
    two["rlnImageSize"] = two["rlnImageSize"].astype(int)
    two.loc[0, "rlnImageSize"] = 80
    table.optics = two
    table.particles.loc[10:, "rlnOpticsGroup"] = 2
    write_particles(tmp_path / "two.star", table)
    data = load_particles(str(tmp_path / "two.star"), None, None, 1, True)
    assert (data.model_box, data.model_angpix) == (80, 2.0)
    scales = {og.number: og.model_scale for og in data.optics}
    assert scales[2] == pytest.approx(1.0) and scales[1] == pytest.approx(80 * 2.0 / (64 * 2.5))
    # a first row no particle uses (a selection keeps every group) is still the model grid, as RELION's
    unused = table.optics.iloc[[0]].copy()
    unused.loc[:, ["rlnOpticsGroup", "rlnOpticsGroupName", "rlnImagePixelSize", "rlnImageSize"]] = [3, "g3", 1.7, 96]
    table.optics = pd.concat([unused, two], ignore_index=True)
    write_particles(tmp_path / "three.star", table)
    data = load_particles(str(tmp_path / "three.star"), None, None, 1, True)
    assert (data.model_box, data.model_angpix) == (96, 1.7) and len(data.optics) == 2
    assert {og.number: og.model_scale for og in data.optics}[2] == pytest.approx(96 * 1.7 / (80 * 2.0))


def test_quiet_log_still_shows_warnings(tmp_path, capsys):
    """--quiet keeps the terminal clean, but a WARNING (an option that is not available, a pixel-size conflict)
    reaches stderr; a rank without a log file (MPI ranks other than 0) prints nothing."""
    from cryorefine.refine.log import RunLog
    log = RunLog(tmp_path / "run.out", quiet=True)
    log.line(" Iteration 1 took 2 s")
    log.line(" WARNING: --blush (neural-network regularisation) is not available")
    RunLog(None, quiet=True).line(" WARNING: from another rank")
    out = capsys.readouterr()
    assert out.out == "" and out.err == "WARNING: --blush (neural-network regularisation) is not available\n"
    assert (tmp_path / "run.out").read_text().count("\n") == 2


def test_resolution_angular_step_is_relions():
    """RELION's "requires orientationSampling of at least": 360/ceil(pi d / res) (ml_optimiser.cpp), also what the
    sampling update compares the fine step with."""
    from cryorefine.refine.autosampling import resolution_angular_step
    assert resolution_angular_step(160.0, 1 / 53.3333) == pytest.approx(36.0)     # ceil(9.42) = 10
    assert resolution_angular_step(150.0, 1 / 10.0) == pytest.approx(360.0 / 48)  # ceil(47.1) = 48
    assert resolution_angular_step(5.0, 1 / 53.3333) == 360.0 and resolution_angular_step(150.0, 0.0) == 360.0


def test_groups_are_numbered_as_relion_by_first_appearance_in_micrograph_order():
    """ExpModel::read: particles stably sorted by rlnMicrographName, groups numbered by first appearance (not
    alphabetically: RELION's --continue reads rlnGroupScaleCorrection by rlnGroupNumber)."""
    from cryorefine.refine.data import particle_groups
    df = pd.DataFrame({"rlnMicrographName": ["mic_3", "mic_1", "mic_2", "mic_1", "mic_3"],
                       "rlnGroupName": ["grp_a", "grp_y", "grp_b", "grp_c", "grp_a"]})
    names, group = particle_groups(df)
    # sorted by micrograph: mic_1 (grp_y, grp_c), mic_2 (grp_b), mic_3 (grp_a, grp_a)
    assert list(names) == ["grp_y", "grp_c", "grp_b", "grp_a"]
    assert group.tolist() == [3, 0, 2, 1, 3]
    names, group = particle_groups(df.drop(columns="rlnGroupName"))
    assert list(names) == ["mic_1", "mic_2", "mic_3"] and group.tolist() == [2, 0, 1, 0, 2]


def test_overall_fourier_completeness_is_relions_voxel_mean():
    """calculateTotalFourierCoverage written out: voxels of the (2m−1)³ cube with int(|k|) <= m, shell 0 included."""
    from cryorefine.refine.outputs import overall_fourier_completeness
    rng = np.random.default_rng(3)
    coverage = rng.uniform(0.5, 1.0, 12)
    for m in (1, 2, 5, 9):
        total = count = 0.0
        for k in range(-(m - 1), m):
            for i in range(-(m - 1), m):
                for j in range(-(m - 1), m):
                    r = int(np.sqrt(k * k + i * i + j * j))
                    if r <= m:
                        total += coverage[r]
                        count += 1
        assert overall_fourier_completeness(coverage, m) == pytest.approx(total / count, rel=1e-12)
    assert overall_fourier_completeness(coverage, 0) == 0.0
