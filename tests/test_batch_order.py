"""Batches in orientation order (issue 9): the ordering, the local pass's chunks and its reuse of projections, and
a local search over every orientation giving what the global search gives (spec §2.4: same samples, flat prior)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from cryorefine.fourier.projector import project
from cryorefine.geometry.euler import matrix_to_euler, projection_direction
from cryorefine.geometry.sampling import angular_step, nearest_pixels
from cryorefine.refine.backend import cpu_backend
from cryorefine.refine.estep import ProjectionCache, empty_accumulator, expectation_batch, local_chunks
from cryorefine.refine.memory import EStepLimits
from cryorefine.refine.orientations import coarse_matrices, local_window, make_grid, orientation_order

from tests.test_estep_bruteforce import MODEL_BOX, _problem


def _random_poses(n: int, seed: int):
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(n, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    tilt = np.degrees(np.arccos(v[:, 2]))
    rot = np.degrees(np.arctan2(v[:, 1], v[:, 0]))
    return rot, tilt, rng.uniform(-180, 180, n)


def test_orientation_order_lists_each_cell_of_the_level_above_together():
    rot, tilt, psi = _random_poses(3000, 1)
    order = 3
    perm = orientation_order(rot, tilt, psi, order)
    assert np.array_equal(np.sort(perm), np.arange(3000))
    # Morton order of the octree: the particles of one cell at order 2 (parent direction, psi sector of 15 deg)
    # form one run of the sorted list, for every cell
    pix = nearest_pixels(order, projection_direction(rot, tilt))
    psi_bin = np.floor(np.mod(psi, 360.0) / angular_step(order)).astype(np.int64)
    cell = (pix >> 2) * 1000 + (psi_bin >> 1)
    runs = 1 + np.count_nonzero(np.diff(cell[perm]))
    assert runs == np.unique(cell).size
    # consecutive particles are neighbours: median angle between consecutive poses far below file order's
    def step_deg(p):
        d = projection_direction(rot[p], tilt[p])
        return np.degrees(np.arccos(np.clip((d[1:] * d[:-1]).sum(1), -1, 1)))
    assert np.median(step_deg(perm)) < 0.25 * np.median(step_deg(np.arange(3000)))


def test_local_chunks_cover_the_batch_within_the_byte_cap():
    rot, tilt, psi = _random_poses(60, 2)
    grid = make_grid(2, "C1", angular_step(2), 1, 0.0, True)
    win = local_window(grid, rot, tilt, psi, 2 * angular_step(3))
    per_id, per_cand, cap = 1000, 10, 40_000
    chunks = local_chunks(win, per_id, per_cand, cap)
    assert chunks[0][0] == 0 and chunks[-1][1] == 60
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
    for j0, j1 in chunks:
        lo, hi = win.offsets[j0], win.offsets[j1]
        used = np.unique(win.ids[lo:hi]).size * per_id + (hi - lo) * per_cand
        assert used <= cap or j1 == j0 + 1
    # the whole batch in one chunk when it fits, one particle per chunk when nothing more does
    assert local_chunks(win, per_id, per_cand, 10 ** 9) == [(0, 60)]
    assert len(local_chunks(win, per_id, per_cand, 1)) == 60


def test_local_projections_reuse_the_previous_chunk():
    proj, _, _, ps, _, _, _ = _problem(16, 2.0, seed=3)
    grid = make_grid(1, "C1", angular_step(1), 1, 0.1, True)
    made = []

    def counting(p, rot, kx, ky, out=None):
        made.append(len(rot))
        return project(p, rot, kx, ky, out)

    cache = ProjectionCache(proj, grid, ps, ps, counting)
    calls = [np.arange(10, 60), np.arange(40, 90, 2), np.arange(30, 50), np.arange(0, 80, 3)]
    for ids in calls:
        p, row = cache.local_projections(ids.astype(np.int64))
        np.testing.assert_array_equal(p[row], project(proj, coarse_matrices(grid, ids), ps.kx_model, ps.ky_model))
    # only what the call before did not have is projected
    assert made == [50] + [np.setdiff1d(b, a).size for a, b in zip(calls, calls[1:])]


def test_local_search_over_every_orientation_equals_the_global_search():
    """A window holding every orientation with a flat prior is the global search with a flat direction pdf: the same
    poses, probabilities and sums, also when each particle is its own chunk (the cache then reuses every
    projection of the chunk before)."""
    proj, grid, tg, ps, inp, st, _ = _problem(16, 2.0, seed=5)
    n_dir = len(grid.dir_pix)
    # a fraction below 1, so that pass 1's scores decide which samples pass 2 sees
    st = replace(st, log_pdf_direction=np.full(n_dir, -np.log(n_dir)), adaptive_fraction=0.99)
    acc_g = empty_accumulator(MODEL_BOX, 2, MODEL_BOX / 2, [16], 2, n_dir)
    res_g = expectation_batch(inp, st, acc_g, cpu_backend())
    lgrid = make_grid(grid.order, "C1", grid.psi_step, grid.oversampling, 0.0, True)
    lgrid = replace(lgrid, perturb_matrix=grid.perturb_matrix)
    assert np.array_equal(lgrid.dir_pix, grid.dir_pix)
    rot, tilt, psi = matrix_to_euler(np.eye(3)[None].repeat(len(inp.rows), 0))
    win = local_window(lgrid, rot, tilt, psi, 1e4)          # 3σ beyond 180 deg: every orientation, flat prior
    assert np.all(np.diff(win.offsets) == n_dir * lgrid.n_psi)
    runs = []
    for chunk_bytes in (256 * 2 ** 20, 1):
        acc_l = empty_accumulator(MODEL_BOX, 2, MODEL_BOX / 2, [16], 2, 0)
        st_l = replace(st, grid=lgrid, log_pdf_direction=None, local=win,
                       cache=ProjectionCache(proj, lgrid, ps, ps, project),
                       limits=EStepLimits(64, local_chunk_bytes=chunk_bytes))
        res_l = expectation_batch(inp, st_l, acc_l, cpu_backend())
        runs.append((res_l, acc_l))
        for f in ("rot", "tilt", "psi", "origin_x", "origin_y"):
            np.testing.assert_allclose(getattr(res_l, f), getattr(res_g, f), atol=1e-6)
        np.testing.assert_array_equal(res_l.nr_significant, res_g.nr_significant)
        # pass 1 forms its residuals in another float32 kernel than the global products: D agrees to ~1e-7 of
        # |X|², so weights to ~1e-4, and a sample at the significance threshold may change places with another
        np.testing.assert_allclose(res_l.max_prob, res_g.max_prob, rtol=5e-4)
        np.testing.assert_allclose(res_l.norm_correction, res_g.norm_correction, rtol=5e-4)
        # the windows' psi prior is normalised per particle (a constant log n_psi the global pdf does not have)
        np.testing.assert_allclose(res_l.log_likelihood, res_g.log_likelihood - np.log(lgrid.n_psi), atol=1e-3)
        np.testing.assert_allclose(acc_l.bp.data, acc_g.bp.data, rtol=2e-3, atol=1e-3 * np.abs(acc_g.bp.data).max())
        np.testing.assert_allclose(acc_l.sigma2_num[0], acc_g.sigma2_num[0], rtol=5e-4)
        assert acc_l.offset_num == pytest.approx(acc_g.offset_num, rel=5e-4)
    # one chunk, or a chunk per particle with every projection taken from the chunk before: the same kernels
    (one, acc_one), (per, acc_per) = runs
    np.testing.assert_array_equal(per.max_prob, one.max_prob)
    np.testing.assert_array_equal(acc_per.bp.data, acc_one.bp.data)
