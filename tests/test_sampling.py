"""Orientation and translation grids: RELION's counts, asymmetric units, children, local windows."""

from __future__ import annotations

import healpy
import numpy as np
import pytest
from scipy.spatial import cKDTree

from cryorefine.geometry import sampling
from cryorefine.geometry.healpix import healpix_vectors, max_pixrad, npix
from cryorefine.geometry.symmetry import canonical_name, symmetry_matrices, symmetry_order
from cryorefine.geometry.sampling import (angular_step, asymmetric_unit_directions, direction_children,
                                          direction_vectors, healpix_rot_tilt, local_directions, local_psi,
                                          psi_angles, psi_children, psi_step_actual, translation_children,
                                          translation_grid)


def test_angular_step_and_psi_grid():
    assert [angular_step(n) for n in range(9)] == [60, 30, 15, 7.5, 3.75, 1.875, 0.9375, 0.46875, 0.234375]
    assert len(psi_angles(2)) == 24 and len(psi_angles(3)) == 48
    np.testing.assert_array_equal(psi_angles(2), np.arange(24) * 15.0)
    # --psi_step 7: n_psi = ceil(360/7) = 52, real step 360/52
    assert len(psi_angles(3, 7.0)) == 52
    assert psi_step_actual(3, 7.0) == pytest.approx(360 / 52)
    assert psi_angles(3, 7.0)[-1] == pytest.approx(51 * 360 / 52)


def test_rot_tilt_from_healpix():
    order = 4
    pix = np.arange(npix(order))
    rot, tilt = healpix_rot_tilt(order, pix)
    theta, phi = healpy.pix2ang(2 ** order, pix, nest=True)
    np.testing.assert_allclose(tilt, np.rad2deg(theta), atol=1e-10)
    np.testing.assert_allclose(np.mod(rot, 360), np.rad2deg(phi), atol=1e-10)
    assert rot.min() >= -180 and rot.max() <= 180 and (rot < 0).any()
    np.testing.assert_allclose(direction_vectors(rot, tilt), healpix_vectors(order), atol=1e-12)


@pytest.mark.parametrize("sym, order, n_dirs, n_orient", [
    ("C1", 2, 192, 4608), ("C1", 3, 768, 36864), ("D2", 3, 192, 9216), ("d2", 2, 48, 1152)])
def test_orientation_counts_match_relion(sym, order, n_dirs, n_orient):
    pix = asymmetric_unit_directions(order, sym)
    assert len(pix) == n_dirs
    assert len(pix) * len(psi_angles(order)) == n_orient
    assert np.all(np.diff(pix) > 0)


@pytest.mark.parametrize("sym", ["C2", "C4", "D2", "D4"])
def test_cyclic_and_dihedral_units_are_exact_fractions(sym):
    # these grids are mapped onto themselves by the group, so the unit is exactly N/|G|
    for order in (2, 3, 4):
        assert len(asymmetric_unit_directions(order, sym)) == npix(order) // symmetry_order(sym)


def test_cn_and_dn_geometric_rules():
    rot, tilt = healpix_rot_tilt(3, asymmetric_unit_directions(3, "C3"))
    assert rot.min() >= -60 and rot.max() <= 60
    rot, tilt = healpix_rot_tilt(3, asymmetric_unit_directions(3, "D2"))
    assert rot.min() >= 0 and rot.max() <= 180 and tilt.max() <= 90


@pytest.mark.parametrize("sym", ["T", "O", "I", "I1", "I3", "I4"])
def test_plane_rules_are_a_fundamental_domain(sym):
    # Each random direction has exactly one symmetry copy inside RELION's great-circle region.
    family, n = canonical_name(sym)
    rng = np.random.default_rng(0)
    u = rng.normal(size=(5000, 3))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    inside = np.zeros(len(u), dtype=int)
    for r in symmetry_matrices(sym):
        w = u @ r                                              # rows are Rᵀ u
        rot = np.rad2deg(np.arctan2(w[:, 1], w[:, 0]))
        tilt = np.rad2deg(np.arccos(np.clip(w[:, 2], -1, 1)))
        inside += sampling._geometric_keep(family, n, rot, tilt, w)
    assert np.all(inside == 1)


@pytest.mark.parametrize("sym, max_gap_steps", [("C3", 1.1), ("D3", 1.1), ("T", 1.1), ("O", 1.1),
                                                ("I", 1.8), ("I1", 1.8), ("I3", 1.8), ("I4", 1.8)])
def test_asymmetric_units_cover_the_sphere_once(sym, max_gap_steps):
    g = symmetry_matrices(sym)
    for order in (3, 4, 5):
        pix = asymmetric_unit_directions(order, sym)
        v = healpix_vectors(order)
        # about N/|G| directions
        assert abs(len(pix) - npix(order) / len(g)) <= 0.1 * npix(order) / len(g) + 1
        # every pixel of the full sphere is close to a symmetry copy R^T v of a kept direction
        copies = np.einsum("gji,nj->gni", g, v[pix]).reshape(-1, 3)
        d, _ = cKDTree(copies).query(v)
        gap = np.rad2deg(2 * np.arcsin(d / 2)).max()
        assert gap <= max_gap_steps * angular_step(order), (order, gap)
        # the seam pass: no two kept directions are symmetry mates closer than half max_pixrad
        if len(pix) < sampling.SEAM_PASS_MAX_DIRECTIONS:
            cos_max = np.cos(0.5 * max_pixrad(order))
            dots = np.einsum("gni,mi->gnm", copies.reshape(len(g), len(pix), 3), v[pix])
            ii = np.arange(len(pix))
            dots[:, ii, ii] = -1.0           # a direction near a symmetry axis is close to its own copies
            assert dots.max() <= cos_max


def test_bad_symmetry_and_too_coarse_order():
    with pytest.raises(ValueError, match="C2v"):
        asymmetric_unit_directions(2, "C2v")
    with pytest.raises(ValueError, match="HEALPix order 1"):
        asymmetric_unit_directions(1, "O")


def test_translation_grid_counts_and_rule():
    # range 5 px, step 2 px: ix, iy in -3..3 and (2ix)^2 + (2iy)^2 < 25.001 -> ix^2 + iy^2 <= 6: 1 + 4 + 4 + 4 + 8
    t = translation_grid(5.0, 2.0)
    assert t.shape == (21, 2)
    assert len(translation_grid(5 * 2.5, 2 * 2.5)) == 21               # the same grid in A at 2.5 A/px
    np.testing.assert_array_equal(t[0], [-4.0, -2.0])                  # ix outer (x first), iy inner
    assert np.all(np.sum(t ** 2, axis=1) < 25.001)
    # Gauss circle: integer points with x^2 + y^2 <= 100 -> 317
    assert len(translation_grid(10.0, 1.0)) == 317
    np.testing.assert_array_equal(translation_grid(0.0, 1.5), [[0.0, 0.0]])
    # the +0.001 tolerance keeps points exactly on the circle
    assert len(translation_grid(2.0, 1.0)) == 13
    with pytest.raises(ValueError, match="offset step"):
        translation_grid(5.0, 0.0)


def test_children_are_centred_on_their_parent():
    order, pix = 2, asymmetric_unit_directions(2, "C1")
    for os_ in (1, 2):
        rot, tilt = direction_children(order, pix, os_)
        assert rot.shape == (len(pix), 4 ** os_)
        mean = direction_vectors(rot, tilt).mean(axis=1)
        mean /= np.linalg.norm(mean, axis=1, keepdims=True)
        off = np.rad2deg(np.arccos(np.clip(np.einsum("pi,pi->p", mean, healpix_vectors(order)[pix]), -1, 1)))
        assert off.max() < 0.1 * angular_step(order)
    psi = psi_angles(2)
    kids = psi_children(psi, 15.0, 1)
    np.testing.assert_allclose(kids[:2], [[-3.75, 3.75], [11.25, 18.75]])
    np.testing.assert_allclose(kids.mean(axis=1), psi)
    np.testing.assert_allclose(np.diff(psi_children(psi, 15.0, 2).ravel()), 3.75)   # a uniform fine grid
    t = translation_grid(5.0, 2.0)
    tk = translation_children(t, 2.0, 1)
    assert tk.shape == (21, 4, 2)
    np.testing.assert_allclose(tk.mean(axis=1), t)
    np.testing.assert_allclose(tk[0] - t[0], [[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]])
    tk2 = translation_children(t, 2.0, 2)
    assert tk2.shape == (21, 16, 2) and np.abs(tk2 - t[:, None]).max() == pytest.approx(0.75)


def test_local_directions_match_brute_force():
    rng = np.random.default_rng(3)
    prior = rng.normal(size=(300, 3))
    prior /= np.linalg.norm(prior, axis=1, keepdims=True)
    for order, max_ang in [(3, 22.5), (4, 11.25)]:
        win = local_directions(order, prior, max_ang, chunk=128)
        assert len(win) == 300 and win.offsets[0] == 0 and win.offsets[-1] == len(win.indices)
        v = healpix_vectors(order)
        ang = np.rad2deg(np.arccos(np.clip(prior @ v.T, -1, 1)))
        for i in range(0, 300, 7):
            idx, a = win.particle(i)
            np.testing.assert_array_equal(idx, np.nonzero(ang[i] < max_ang)[0])
            np.testing.assert_allclose(a, ang[i, idx], atol=1e-9)
        np.testing.assert_array_equal(win.owner()[win.offsets[5]:win.offsets[6]], 5)
    # nothing within 0.01 deg: the nearest pixel is kept
    win = local_directions(3, prior[:20], 0.01)
    np.testing.assert_array_equal(np.diff(win.offsets), 1)
    ang = np.rad2deg(np.arccos(np.clip(prior[:20] @ healpix_vectors(3).T, -1, 1)))
    np.testing.assert_array_equal(win.indices, ang.argmin(axis=1))
    np.testing.assert_allclose(win.angles, ang.min(axis=1), atol=1e-9)


def test_local_psi_wraps_and_falls_back():
    grid = psi_angles(3)                                   # 0, 7.5, ..., 352.5
    win = local_psi(grid, [359.0, -170.0, 45.0], 10.0)
    idx, ang = win.particle(0)
    np.testing.assert_array_equal(grid[idx], [0.0, 7.5, 352.5])
    np.testing.assert_allclose(ang, [1.0, 8.5, 6.5])
    np.testing.assert_array_equal(grid[win.particle(1)[0]], [187.5, 195.0])   # -170 = 190; 180 is not < 10 away
    np.testing.assert_array_equal(grid[win.particle(2)[0]], [37.5, 45.0, 52.5])
    win = local_psi(grid, [3.0, 200.0], 0.5)
    np.testing.assert_array_equal(grid[win.indices], [0.0, 202.5])
    np.testing.assert_allclose(win.angles, [3.0, 2.5])


@pytest.mark.parametrize("sym, order", [("D2", 3), ("C3", 3), ("T", 4), ("I4", 4)])
def test_seam_pass_equals_the_plain_double_loop(sym, order):
    family, n = canonical_name(sym)
    pix = np.arange(npix(order))
    rot, tilt = healpix_rot_tilt(order, pix)
    vec = direction_vectors(rot, tilt)
    keep = sampling._geometric_keep(family, n, rot, tilt, vec)
    pix, vec = pix[keep], vec[keep]
    g = symmetry_matrices(sym)
    cos_max = np.cos(0.5 * max_pixrad(order))
    copies = np.einsum("gji,nj->gni", g, vec)             # R^T v for every operator and direction
    kept: list[int] = []
    for i in range(len(pix)):                  # RELION's loop: each point against all kept points, all R
        if not kept or (copies[:, kept] @ vec[i]).max() <= cos_max:
            kept.append(i)
    np.testing.assert_array_equal(asymmetric_unit_directions(order, sym), pix[kept])
