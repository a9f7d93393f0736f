"""CTF against an independent transcription of RELION's formula (spec §1.3)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cryorefine.errors import InputError
from cryorefine.fourier.ctf import CtfParams, ctf_grid, ctf_params_from_table, ctf_values


def relion_ctf(kx, ky, box, angpix, du, dv, ang_deg, kv, cs_mm, q0, phase_deg=0.0, bfac=0.0, scale=1.0,
               intact_first_peak=False, only_flip=False, absolute=False):
    """One CTF value written straight from spec §1.3 (rotation form of the astigmatism), with CTF::getCTF's
    switches in its order (1 before the first peak, damping, |·| or sign, scale)."""
    lam = 12.2643247 / math.sqrt(kv * 1e3 * (1 + kv * 1e3 * 0.978466e-6))
    ux, uy = kx / (box * angpix), ky / (box * angpix)
    a = math.radians(ang_deg)
    dfu2 = du * (ux * math.cos(a) + uy * math.sin(a)) ** 2 + dv * (-ux * math.sin(a) + uy * math.cos(a)) ** 2
    u2 = ux * ux + uy * uy
    gamma = (-math.pi * lam * dfu2 + math.pi / 2 * cs_mm * 1e7 * lam ** 3 * u2 * u2
             - math.radians(phase_deg) - math.atan(q0 / math.sqrt(1 - q0 * q0)))
    v = (1.0 if intact_first_peak and abs(gamma) < math.pi / 2 else -math.sin(gamma)) * math.exp(-bfac * u2 / 4)
    if absolute:
        v = abs(v)
    elif only_flip:
        v = -1.0 if v < 0 else 1.0
    v *= scale
    if abs(v) < 1e-8:
        v = 1e-8 if v >= 0 else -1e-8
    return v


def _params(n=3):
    rng = np.random.default_rng(0)
    return CtfParams(defocus_u=rng.uniform(8000, 25000, n), defocus_v=rng.uniform(8000, 25000, n),
                     defocus_angle=rng.uniform(-180, 180, n), voltage=np.full(n, 300.0), cs=np.full(n, 2.7),
                     amplitude_contrast=np.full(n, 0.1), phase_shift=rng.uniform(0, 90, n),
                     bfactor=rng.uniform(0, 100, n), scale=rng.uniform(0.5, 1.5, n))


def test_ctf_matches_relion_formula():
    p = _params(3)
    rng = np.random.default_rng(1)
    kx = rng.uniform(0, 32, 50)
    ky = rng.uniform(-32, 32, 50)
    got = ctf_values(p, kx, ky, 64, 2.5)
    for i in range(3):
        want = [relion_ctf(x, y, 64, 2.5, p.defocus_u[i], p.defocus_v[i], p.defocus_angle[i], 300, 2.7, 0.1,
                           p.phase_shift[i], p.bfactor[i], p.scale[i]) for x, y in zip(kx, ky)]
        np.testing.assert_allclose(got[i], want, atol=1e-6)


@pytest.mark.parametrize("switch", ["intact_first_peak", "only_flip", "absolute"])
def test_ctf_switches_match_relion(switch):
    """--ctf_intact_first_peak, --only_flip_phases, phase-flipped data: CTF::getCTF's values, here on a line of
    pixels through the first zeros (where the switches change something)."""
    p = _params(3)
    kx = np.linspace(0, 32, 200)
    ky = np.zeros_like(kx)
    kwargs = {"intact_first_peak": switch == "intact_first_peak", "only_flip_phases": switch == "only_flip",
              "absolute": switch == "absolute"}
    got = ctf_values(p, kx, ky, 64, 2.5, **kwargs)
    plain = ctf_values(p, kx, ky, 64, 2.5)
    for i in range(3):
        want = [relion_ctf(x, y, 64, 2.5, p.defocus_u[i], p.defocus_v[i], p.defocus_angle[i], 300, 2.7, 0.1,
                           p.phase_shift[i], p.bfactor[i], p.scale[i], intact_first_peak=kwargs["intact_first_peak"],
                           only_flip=kwargs["only_flip_phases"], absolute=kwargs["absolute"]) for x, y in zip(kx, ky)]
        np.testing.assert_allclose(got[i], want, atol=1e-6)
    assert np.mean(np.abs(got - plain) > 1e-3) > 0.05        # the switch changes a part of the curve


def test_ctf_at_zero_is_scale_times_q0():
    p = _params(4)
    p.phase_shift[:] = 0.0
    got = ctf_values(p, [0.0], [0.0], 128, 1.5)[:, 0]
    np.testing.assert_allclose(got, p.scale * 0.1, rtol=1e-6)


def test_per_particle_box_and_pixel_size():
    """Frequency is k/(box·angpix): pixel 2k of a 2N box at the same angpix equals pixel k of an N box."""
    p = _params(2)
    a = ctf_values(p, [10.0, 3.0], [-7.0, 5.0], np.array([64, 128]), np.array([2.0, 2.0]))
    b = ctf_values(p, [[10.0, 3.0], [20.0, 6.0]], [[-7.0, 5.0], [-14.0, 10.0]], np.array([64, 128]), 2.0)
    ref = ctf_values(p, [10.0, 3.0], [-7.0, 5.0], 64, 2.0)
    np.testing.assert_allclose(b, ref, atol=1e-7)
    assert not np.allclose(a[1], ref[1])


def test_clamp_tiny_values():
    p = _params(1)
    p.amplitude_contrast[:] = 0.0
    p.phase_shift[:] = 0.0
    v = ctf_values(p, [0.0], [0.0], 64, 2.5)
    assert v[0, 0] == np.float32(1e-8)


def test_grid_layout_and_window():
    p = _params(2)
    g = ctf_grid(p, 64, 2.5)
    assert g.shape == (2, 64, 33)
    # element [i, j]: ky = i (i <= 32) else i - 64, kx = j
    assert g[0, 60, 5] == pytest.approx(relion_ctf(5, -4, 64, 2.5, p.defocus_u[0], p.defocus_v[0],
                                                   p.defocus_angle[0], 300, 2.7, 0.1, p.phase_shift[0],
                                                   p.bfactor[0], p.scale[0]), abs=1e-6)
    w = ctf_grid(p, 64, 2.5, size=32)
    assert w.shape == (2, 32, 17)
    np.testing.assert_allclose(w[:, 3, 4], g[:, 3, 4])
    np.testing.assert_allclose(w[:, 32 - 3, 4], g[:, 64 - 3, 4])


def test_speed_5000_particles_128():
    p = _params(5000)
    ctf_grid(p.subset([0]), 128, 1.5)  # compile / load the cached kernel
    t0 = time.perf_counter()
    g = ctf_grid(p, 128, 1.5)
    dt = time.perf_counter() - t0
    assert g.shape == (5000, 128, 65)
    assert dt < 3.0, dt   # ~0.4 s on a quiet 2-core machine; generous for shared CI


class _Table:
    def __init__(self, optics, particles, path):
        self.optics, self.particles, self.path = optics, particles, Path(path)


def _table(drop=()):
    optics = pd.DataFrame({"rlnOpticsGroup": [1, 2], "rlnVoltage": [300.0, 200.0],
                           "rlnSphericalAberration": [2.7, 1.4], "rlnAmplitudeContrast": [0.1, 0.07],
                           "rlnImagePixelSize": [1.5, 1.0], "rlnImageSize": [128, 192]})
    parts = pd.DataFrame({"rlnImageName": ["1@a.mrcs", "2@a.mrcs", "3@a.mrcs"], "rlnOpticsGroup": [2, 1, 2],
                          "rlnDefocusU": [10000.0, 12000.0, 15000.0], "rlnDefocusV": [9000.0, 11500.0, 14000.0],
                          "rlnDefocusAngle": [10.0, 20.0, 30.0], "rlnCtfBfactor": [5.0, 6.0, 7.0]})
    return _Table(optics, parts.drop(columns=list(drop)), "my.star")


def test_params_from_table_uses_optics_groups_and_defaults():
    p = ctf_params_from_table(_table())
    np.testing.assert_allclose(p.voltage, [200, 300, 200])
    np.testing.assert_allclose(p.cs, [1.4, 2.7, 1.4])
    np.testing.assert_allclose(p.amplitude_contrast, [0.07, 0.1, 0.07])
    np.testing.assert_allclose(p.phase_shift, 0)
    np.testing.assert_allclose(p.scale, 1)
    np.testing.assert_allclose(p.bfactor, [5, 6, 7])
    q = ctf_params_from_table(_table(), rows=[2, 0])
    np.testing.assert_allclose(q.defocus_u, [15000, 10000])


def test_params_from_table_missing_defocus():
    """Only rlnDefocusU is needed: RELION's CTF::readByGroup takes a missing rlnDefocusV as rlnDefocusU and a
    missing rlnDefocusAngle as 0 (isotropic defocus from other programs)."""
    with pytest.raises(InputError, match="my.star.*rlnDefocusU"):
        ctf_params_from_table(_table(drop=("rlnDefocusU",)))
    full = ctf_params_from_table(_table())
    p = ctf_params_from_table(_table(drop=("rlnDefocusV", "rlnDefocusAngle")))
    np.testing.assert_array_equal(p.defocus_v, full.defocus_u)
    np.testing.assert_array_equal(p.defocus_angle, 0.0)
