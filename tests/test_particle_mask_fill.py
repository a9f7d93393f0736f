"""What fills the area outside the particle mask before the likelihood (spec §2.1 step 5): the weighted background
mean with --zero_mask; otherwise coloured Gaussian noise with per-component Fourier variance σ²_o(r) of the half's
optics group, a new instance per particle and iteration, reproducible from the random seed."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from cryorefine.fourier.filters import coloured_noise
from cryorefine.fourier.transforms import (
    irfft2_centered,
    real_radius,
    rfft2_centered,
    shell_index_2d,
    unique_halfplane_mask,
)
from cryorefine.refine.data import OpticsGroup, background_noise, prepare_batch
from cryorefine.refine.expectation import batch_inputs
from cryorefine.refine.pixels import pixel_set


def _sigma2(box: int, level: float) -> np.ndarray:
    """A non-white spectrum per shell 0..N/2."""
    return level * np.exp(-np.arange(box // 2 + 1) / 4.0) + 0.1 * level


def _per_shell_power(ft: np.ndarray, box: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean of Re² and of Im² per shell 1..N/2−1 over the unique half-plane without self-conjugate pixels, the
    number of complex samples per shell)."""
    shells = shell_index_2d(box)
    sel = unique_halfplane_mask(box) & (shells > 0)
    ky = np.fft.fftfreq(box, 1.0 / box).round()[:, None] + 0 * shells
    sel &= ~(np.arange(box // 2 + 1)[None, :] == box // 2) & ~(ky == -box // 2)     # Nyquist pixels are real
    re, im, n = [], [], []
    for r in range(1, box // 2):
        m = sel & (shells == r)
        re.append((ft.real[:, m] ** 2).mean())
        im.append((ft.imag[:, m] ** 2).mean())
        n.append(ft.shape[0] * m.sum())
    return np.array(re), np.array(im), np.array(n)


def test_coloured_noise_has_the_sigma2_spectrum():
    box = 24
    sigma2 = _sigma2(box, 2.0)
    white = np.random.default_rng(1).standard_normal((2000, box, box))
    ft = rfft2_centered(coloured_noise(white, sigma2))
    re, im, n = _per_shell_power(ft, box)
    tol = 5 * np.sqrt(2.0 / n)                        # 5 standard errors of a mean of squared normals
    np.testing.assert_array_less(np.abs(re / sigma2[1:box // 2] - 1), tol)
    np.testing.assert_array_less(np.abs(im / sigma2[1:box // 2] - 1), tol)
    corner = np.abs(ft[:, shell_index_2d(box) > box // 2]).max()
    assert corner < 1e-5 * np.sqrt(sigma2.min())          # nothing beyond N/2 (RELION: ires < N/2+1)


def test_background_noise_is_per_particle_per_iteration_and_reproducible():
    box, sigma2 = 16, _sigma2(16, 1.0)
    a = background_noise(sigma2, box, np.array([3, 5]), seed=7, iteration=2)
    np.testing.assert_array_equal(a, background_noise(sigma2, box, np.array([3, 5]), seed=7, iteration=2))
    np.testing.assert_array_equal(a[1], background_noise(sigma2, box, np.array([5]), seed=7, iteration=2)[0])
    assert not np.allclose(a[0], a[1])                                                  # per particle
    assert not np.allclose(a, background_noise(sigma2, box, np.array([3, 5]), seed=7, iteration=3))   # iteration
    assert not np.allclose(a, background_noise(sigma2, box, np.array([3, 5]), seed=8, iteration=2))   # seed


def _data(images: np.ndarray, groups: list[OpticsGroup], optics_index: np.ndarray):
    """What prepare_batch and batch_inputs read of ParticleData."""
    return SimpleNamespace(images=SimpleNamespace(read=lambda rows: images[rows]), optics=groups,
                           optics_index=optics_index, group=np.zeros(len(images), int))


def test_prepare_batch_fills_outside_the_mask_with_the_mean_or_the_given_noise():
    box, radius, edge = 24, 6.0, 3.0
    rng = np.random.default_rng(2)
    imgs = (rng.normal(size=(3, box, box)) + np.array([0.5, -1.0, 2.0])[:, None, None]).astype(np.float32)
    data = _data(imgs, [OpticsGroup(1, box, 2.0, 1.0)], np.zeros(3, int))
    rows, zeros = np.arange(3), np.zeros(3)
    r = real_radius(box, 2)
    c = np.clip(0.5 + 0.5 * np.cos(np.pi * (radius + edge - r) / edge), 0, 1) * (r >= radius)
    c[r > radius + edge] = 1.0
    inside, outside = r < radius, r > radius + edge
    # --zero_mask: outside = the c-weighted mean of each image beyond R
    got = irfft2_centered(prepare_batch(data, rows, zeros, zeros, np.ones(3), radius, edge).masked, box)
    mean = (imgs * c).sum((1, 2)) / c.sum()
    for j in range(3):
        np.testing.assert_allclose(got[j][outside], mean[j], atol=1e-5)
        np.testing.assert_allclose(got[j][inside], imgs[j][inside], atol=1e-5)
    # --no_zero_mask: outside = the noise images, the edge a blend, the inside untouched
    noise = rng.normal(size=(3, box, box)).astype(np.float32)
    got = irfft2_centered(prepare_batch(data, rows, zeros, zeros, np.ones(3), radius, edge, noise=noise).masked, box)
    np.testing.assert_allclose(got, (1 - c) * imgs + c * noise, atol=1e-5)


def _state(images, groups, optics_index, sigma2, zero_mask: bool, iteration: int = 4):
    """What batch_inputs reads of a RunState (no CTF, no norm correction, no pre-shift)."""
    n = len(images)
    opts = SimpleNamespace(norm=False, zero_mask=zero_mask, random_seed=5, ctf=False, particle_diameter=0.4,
                           maskedge_px=0.0)
    poses = SimpleNamespace(origin_x=np.zeros(n), origin_y=np.zeros(n), norm_correction=np.ones(n))
    model = SimpleNamespace(norm_average=1.0, sigma2=sigma2, group_scales=None)
    return SimpleNamespace(opts=opts, data=_data(images, groups, optics_index), poses=poses, angpix=2.0,
                           counters=SimpleNamespace(iteration=iteration)), model


def test_estep_images_carry_the_optics_groups_noise_without_zero_mask():
    """Blank images and a mask of one pixel: the E-step's images are the filler itself, whose power per shell
    is 2σ²_o(r) of their own optics group (two groups, different box, pixel size and σ²)."""
    groups = [OpticsGroup(1, 24, 2.0, 1.0), OpticsGroup(2, 20, 2.4, 1.0)]
    optics_index = np.r_[np.zeros(500, int), np.ones(500, int)]
    sigma2 = {0: _sigma2(24, 1.0), 1: _sigma2(20, 3.0)}
    for o, g in enumerate(groups):
        rows = np.nonzero(optics_index == o)[0]
        stack = np.zeros((len(optics_index), g.box, g.box), np.float32)     # blank particles
        state, model = _state(stack, groups, optics_index, sigma2, zero_mask=False)
        inp = batch_inputs(state, rows, model, g.box, g.box, np.zeros((len(optics_index), 2)))
        ft = np.zeros((len(rows), g.box * (g.box // 2 + 1)), np.complex64)
        ft[:, pixel_set(g.box, g.box).flat] = inp.x_fine
        re, im, n = _per_shell_power(ft.reshape(len(rows), g.box, g.box // 2 + 1), g.box)
        tol = 5 * np.sqrt(2.0 / n) + 0.02              # the one unmasked centre pixel changes the power by < 1 %
        np.testing.assert_array_less(np.abs(re / sigma2[o][1:g.box // 2] - 1), tol)
        np.testing.assert_array_less(np.abs(im / sigma2[o][1:g.box // 2] - 1), tol)
        # the same particles with --zero_mask: blank stays blank
        state, model = _state(stack, groups, optics_index, sigma2, zero_mask=True)
        assert np.abs(batch_inputs(state, rows, model, g.box, g.box, np.zeros((len(optics_index), 2))).x_fine
                      ).max() == pytest.approx(0.0, abs=1e-12)
