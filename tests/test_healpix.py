"""HEALPix NESTED pixel centres against healpy (GPL: used here as an oracle only, never by the package)."""

from __future__ import annotations

import healpy
import numpy as np
import pytest

from cryorefine.geometry.healpix import (healpix_vectors, max_pixrad, nest2xyf, nest_children, nest_parent,
                                         npix, pix2ang_nest, pix2zphi_nest)


@pytest.mark.parametrize("order", range(7))
def test_pix2ang_equals_healpy(order):
    nside = 2 ** order
    pix = np.arange(12 * nside * nside)
    theta, phi = pix2ang_nest(nside, pix)
    theta_ref, phi_ref = healpy.pix2ang(nside, pix, nest=True)
    np.testing.assert_allclose(theta, theta_ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(phi, phi_ref, rtol=0, atol=1e-12)
    z, phi2 = pix2zphi_nest(nside, pix)
    np.testing.assert_allclose(z, np.cos(theta_ref), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(phi2, phi)
    assert phi.min() >= 0 and phi.max() < 2 * np.pi


def test_pix2ang_known_values():
    # order 0: the 12 base pixels; face 0 is centred at z = 2/3, phi = 45 deg, face 4 at the equator, phi = 0
    theta, phi = pix2ang_nest(1, np.arange(12))
    np.testing.assert_allclose(np.cos(theta[[0, 4, 8]]), [2 / 3, 0, -2 / 3], atol=1e-15)
    np.testing.assert_allclose(np.rad2deg(phi[:4]), [45, 135, 225, 315], atol=1e-12)
    np.testing.assert_allclose(np.rad2deg(phi[4:8]), [0, 90, 180, 270], atol=1e-12)
    with pytest.raises(ValueError):
        pix2ang_nest(3, [0])
    with pytest.raises(ValueError):
        pix2ang_nest(2, [48])


def test_vectors_and_xyf_match_healpy():
    for order in (0, 3, 5):
        nside = 2 ** order
        v = healpix_vectors(order)
        assert v.shape == (npix(order), 3) and not v.flags.writeable
        ref = np.array(healpy.pix2vec(nside, np.arange(npix(order)), nest=True)).T
        np.testing.assert_allclose(v, ref, atol=1e-12)
        ix, iy, face = nest2xyf(order, np.arange(npix(order)))
        rx, ry, rf = healpy.pix2xyf(nside, np.arange(npix(order)), nest=True)
        np.testing.assert_array_equal(ix, rx)
        np.testing.assert_array_equal(iy, ry)
        np.testing.assert_array_equal(face, rf)


def test_max_pixrad_equals_healpy():
    for order in range(9):
        assert max_pixrad(order) == pytest.approx(healpy.max_pixrad(2 ** order), abs=1e-13)


@pytest.mark.parametrize("levels", [1, 2])
def test_children_are_centred_on_their_parent(levels):
    order = 3
    parents = np.arange(npix(order))
    kids = nest_children(parents, levels)
    assert kids.shape == (npix(order), 4 ** levels)
    np.testing.assert_array_equal(np.sort(kids.ravel()), np.arange(npix(order + levels)))
    np.testing.assert_array_equal(nest_parent(kids, levels), np.broadcast_to(parents[:, None], kids.shape))
    np.testing.assert_array_equal(nest_children([5], 1), [[20, 21, 22, 23]])
    vp = healpix_vectors(order)
    vk = healpix_vectors(order + levels)[kids]
    # every child lies inside its parent's pixel ...
    ang = np.arccos(np.clip(np.einsum("pi,pki->pk", vp, vk), -1, 1))
    assert ang.max() < max_pixrad(order)
    # ... and the parent centre is the centre of its children (to a small fraction of a pixel)
    mean = vk.mean(axis=1)
    mean /= np.linalg.norm(mean, axis=1, keepdims=True)
    off = np.rad2deg(np.arccos(np.clip(np.einsum("pi,pi->p", mean, vp), -1, 1)))
    assert off.max() < 0.1 * 360 / (6 * 2 ** order)
    # and healpy agrees on the parent of each child
    assert np.array_equal(healpy.ang2pix(2 ** order, *healpy.pix2ang(2 ** (order + levels), kids.ravel(), nest=True),
                                         nest=True), np.repeat(parents, 4 ** levels))
