"""Optics aberrations (issue 14): beam tilt, odd and even Zernike terms, anisotropic magnification,
CTF-premultiplied and phase-flipped data, many optics groups.

Unit tests check the formulas against closed forms (RELION's conventions, shared/bench/README.md
"Aberrations and optics groups"); the reconstruction tests simulate small aberrated sets (box 64, 2.5 Å/px,
400 particles, SNR 0.1, aberrations large enough to matter at 5 Å) and check that `cryorefine reconstruct`
reaches the unaberrated set's FSC against the truth, and that removing the labels, or a wrong sign /
transposed matrix, is clearly worse. A short refinement checks that every label survives the round trip.
"""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest

from cryorefine.cli import main
from cryorefine.errors import InputError
from cryorefine.fourier.aberrations import (OpticsModel, demodulate, even_index_to_mn, gamma_offset,
                                            insert_beam_tilt, model_ctf, model_frequencies, odd_index_to_mn,
                                            odd_phase, odd_phase_grid, optics_ctf, with_ctf_switches,
                                            zernike_sum)
from cryorefine.fourier.ctf import CtfParams, ctf_values, electron_wavelength
from cryorefine.fourier.fsc import fsc
from cryorefine.io.star import optics_models, parse_star_vector, read_particles, read_star, write_star

N, APIX = 64, 2.5


def _params(n: int = 3, **kw) -> CtfParams:
    base = dict(defocus_u=np.linspace(9000, 21000, n), defocus_v=np.linspace(8800, 20500, n),
                defocus_angle=np.linspace(10, 130, n), voltage=300.0, cs=2.7, amplitude_contrast=0.1,
                phase_shift=0.0, bfactor=0.0, scale=1.0)
    base.update(kw)
    return CtfParams(**base)


def _grid(n: int = N):
    ky, kx = np.meshgrid(np.fft.fftfreq(n, 1.0 / n), np.arange(n // 2 + 1), indexing="ij")
    return kx.ravel().astype(float), ky.ravel().astype(float)


# ----------------------------------------------------------------------------------------------------------
# formulas


def test_zernike_ordering_matches_relion():
    """Odd and even index -> (m, n) as Zernike::oddIndexToMN / evenIndexToMN, and the unnormalised
    polynomials of the README's table (φ = atan2(ky, kx))."""
    assert [odd_index_to_mn(i) for i in range(6)] == [(-1, 1), (1, 1), (-3, 3), (-1, 3), (1, 3), (3, 3)]
    assert odd_index_to_mn(6)[1] == 5
    assert [even_index_to_mn(i) for i in range(9)] == [(0, 0), (-2, 2), (0, 2), (2, 2), (-4, 4), (-2, 4),
                                                       (0, 4), (2, 4), (4, 4)]
    rng = np.random.default_rng(0)
    x, y = rng.normal(0, 0.2, 50), rng.normal(0, 0.2, 50)
    r, p = np.hypot(x, y), np.arctan2(y, x)
    odd = [y, x, r ** 3 * np.sin(3 * p), (3 * r ** 3 - 2 * r) * np.sin(p), (3 * r ** 3 - 2 * r) * np.cos(p),
           r ** 3 * np.cos(3 * p)]
    even = [np.ones_like(r), r ** 2 * np.sin(2 * p), 2 * r ** 2 - 1, r ** 2 * np.cos(2 * p), r ** 4 * np.sin(4 * p),
            (4 * r ** 4 - 3 * r ** 2) * np.sin(2 * p), 6 * r ** 4 - 6 * r ** 2 + 1,
            (4 * r ** 4 - 3 * r ** 2) * np.cos(2 * p), r ** 4 * np.cos(4 * p)]
    for i, want in enumerate(odd):
        c = np.zeros(i + 1)
        c[i] = 1.0
        np.testing.assert_allclose(zernike_sum(c, x, y, odd=True), want, atol=1e-12)
    for i, want in enumerate(even):
        c = np.zeros(i + 1)
        c[i] = 1.0
        np.testing.assert_allclose(zernike_sum(c, x, y, odd=False), want, atol=1e-12)


def test_beam_tilt_phase_closed_form():
    """TiltHelper::insertTilt gives φ = −2π·10⁴·Cs·λ²·|k|²·(tx kx + ty ky); 1 mrad at 300 kV, Cs 2.7 mm is
    65.76·|k|³ rad along the tilt."""
    tx, ty = 1.3, -0.7
    om = OpticsModel(N, APIX, odd=insert_beam_tilt((0.0,) * 6, tx, ty, 2.7, 300.0))
    kx, ky = _grid()
    s = 1.0 / (N * APIX)
    fx, fy = kx * s, ky * s
    lam = float(electron_wavelength(300.0))
    want = -2 * 3.141592654 * 1e4 * 2.7 * lam ** 2 * (fx * fx + fy * fy) * (tx * fx + ty * fy)
    got = np.angle(odd_phase(om, kx, ky))
    np.testing.assert_allclose(np.angle(np.exp(1j * (got - want))), 0.0, atol=2e-4)
    one = OpticsModel(N, APIX, odd=insert_beam_tilt((), 1.0, 0.0, 2.7, 300.0))
    k = 0.1
    assert abs(zernike_sum(one.odd, np.array([k]), np.array([0.0]), True)[0]) == pytest.approx(65.76 * k ** 3,
                                                                                               rel=1e-3)


def test_demodulation_undoes_the_odd_phase():
    """demodulate multiplies by exp(−iφ) on the half-complex grid (what the model multiplied in)."""
    om = OpticsModel(N, APIX, odd=insert_beam_tilt((0, 0, 50.0, 0, 0, -40.0), 2.0, -1.0, 2.7, 300.0))
    kx, ky = _grid()
    x = (np.random.default_rng(1).normal(size=(2, N * (N // 2 + 1))) * (1 + 1j)).astype(np.complex64)
    modulated = (x * odd_phase(om, kx, ky)).reshape(2, N, N // 2 + 1)
    np.testing.assert_allclose(demodulate(modulated, om).reshape(2, -1), x, atol=1e-5)
    np.testing.assert_allclose(odd_phase_grid(om).ravel(), odd_phase(om, kx, ky), atol=1e-6)
    assert demodulate(modulated, om.without_aberrations()) is modulated


def test_even_zernike_is_a_change_of_cs():
    """A pure a·ρ⁴ term e = (a/3, 0, a/2, 0, 0, 0, a/6, 0, 0) with a = (π/2)·ΔCs·10⁷·λ³ is the CTF of Cs + ΔCs."""
    d_cs = 1.0
    lam = float(electron_wavelength(300.0))
    a = 0.5 * np.pi * d_cs * 1e7 * lam ** 3
    om = OpticsModel(N, APIX, even=(a / 3, 0, a / 2, 0, 0, 0, a / 6, 0, 0))
    kx, ky = _grid()
    got = optics_ctf(_params(), om, kx, ky)
    want = ctf_values(_params(cs=2.7 + d_cs), kx, ky, N, APIX)
    np.testing.assert_allclose(got, want, atol=2e-4)
    assert np.abs(got - ctf_values(_params(), kx, ky, N, APIX)).max() > 0.3


def test_mag_matrix_orientation():
    """The CTF and the model frequencies are evaluated at M·k with M = [[M00, M01], [M10, M11]]."""
    mag = (1.03, 0.02, -0.01, 0.97)
    om = OpticsModel(N, APIX, mag=mag)
    kx, ky = _grid()
    mx = mag[0] * kx + mag[1] * ky
    my = mag[2] * kx + mag[3] * ky
    np.testing.assert_allclose(optics_ctf(_params(), om, kx, ky), ctf_values(_params(), mx, my, N, APIX), atol=1e-6)
    gx, gy = model_frequencies(om, kx, ky, 0.5)
    np.testing.assert_allclose(gx, 0.5 * mx)
    np.testing.assert_allclose(gy, 0.5 * my)
    # even terms are evaluated at M·k as well (ObservationModel::getGammaOffset)
    om2 = replace(om, even=(0.0, 0.0, 0.0, 400.0))
    np.testing.assert_allclose(gamma_offset(om2, kx, ky), 400.0 * ((mx ** 2 - my ** 2) / (N * APIX) ** 2), atol=1e-9)


def test_premultiplied_and_phase_flipped_ctf():
    """Premultiplied data are modelled with CTF² (MlOptimiser), phase-flipped ones with |CTF| (do_abs)."""
    kx, ky = _grid()
    c = ctf_values(_params(), kx, ky, N, APIX)
    base = OpticsModel(N, APIX)
    np.testing.assert_allclose(model_ctf(_params(), base, kx, ky), c)
    np.testing.assert_allclose(model_ctf(_params(), replace(base, premultiplied=True), kx, ky), c * c, rtol=1e-6)
    np.testing.assert_allclose(model_ctf(_params(), replace(base, phase_flipped=True), kx, ky), np.abs(c))
    # RELION's run-wide switches reach the groups' CTFs (refine and reconstruct both go through with_ctf_switches)
    intact = with_ctf_switches(base, intact_first_peak=True)
    np.testing.assert_allclose(model_ctf(_params(), intact, kx, ky),
                               ctf_values(_params(), kx, ky, N, APIX, intact_first_peak=True))
    assert with_ctf_switches(replace(base, phase_flipped=True)).phase_flipped     # the table's flag is kept
    assert (c < -0.5).any()


def test_optics_table_parsing(tmp_path):
    """Every aberration label of data_optics is read per group; bad vectors are InputErrors."""
    assert parse_star_vector("[1.5,-2,3e-1]", "x") == (1.5, -2.0, 0.3)
    assert parse_star_vector("[ 1, 2 ]", "x") == (1.0, 2.0)
    with pytest.raises(InputError, match="rlnOddZernike"):
        parse_star_vector("1,2", "rlnOddZernike")
    optics = pd.DataFrame({
        "rlnOpticsGroupName": ["a", "b"], "rlnOpticsGroup": [1, 2], "rlnVoltage": [300.0, 300.0],
        "rlnSphericalAberration": [2.7, 2.7], "rlnAmplitudeContrast": [0.1, 0.1], "rlnImagePixelSize": [2.5, 2.5],
        "rlnImageSize": [64, 64], "rlnImageDimensionality": [2, 2], "rlnCtfDataAreCtfPremultiplied": [0, 1],
        "rlnBeamTiltX": [1.0, 0.0], "rlnBeamTiltY": [-0.5, 0.0], "rlnOddZernike": ["[0,0,50,0,0,-40]", "[0,0,0,0,0,0]"],
        "rlnEvenZernike": ["[0,0,0,0,0,0,0,0,120]", "[1,2,3]"], "rlnMagMat00": [1.01, 1.0], "rlnMagMat01": [0.02, 0.0],
        "rlnMagMat10": [0.003, 0.0], "rlnMagMat11": [0.99, 1.0], "rlnCtfDataArePhaseFlipped": [1, 0]})
    parts = pd.DataFrame({"rlnImageName": ["1@x.mrcs", "2@x.mrcs"], "rlnOpticsGroup": [1, 2]})
    path = tmp_path / "p.star"
    write_star(path, {"optics": optics, "particles": parts})
    models = optics_models(read_particles(path))
    a, b = models[1], models[2]
    assert a.mag == (1.01, 0.02, 0.003, 0.99) and b.mag == (1.0, 0.0, 0.0, 1.0)
    assert a.even[8] == 120.0 and b.even == (1.0, 2.0, 3.0)
    assert a.odd == insert_beam_tilt((0, 0, 50, 0, 0, -40), 1.0, -0.5, 2.7, 300.0)
    assert a.phase_flipped and not a.premultiplied and b.premultiplied and not b.phase_flipped
    assert a.projection_key != b.projection_key
    optics.loc[0, "rlnEvenZernike"] = "[1,x]"
    write_star(path, {"optics": optics, "particles": parts})
    with pytest.raises(InputError, match="group 1: rlnEvenZernike"):
        optics_models(read_particles(path))


# ----------------------------------------------------------------------------------------------------------
# reconstruction of simulated aberrated sets

BASE = ["--n", "400", "--snr", "0.1", "--seed", "21", "--bfactor", "20", "--quiet"]
SETS = {
    "plain": [],
    "tilt": ["--beamtilt=3,-2"],                                                   # 1.9 rad at 5 Å
    "odd": ["--beamtilt=1,-1", "--odd-zernike", "0,0,150,0,0,-120"],             # + trefoil, ~1.5 rad at 5 Å
    "even": ["--even-zernike", "200,0,300,0,0,0,100,0,300"],                      # Cs-like + tetrafoil, ~1 rad
    "mag": ["--aniso-mag", "1.012,0.022,0.004,0.988"],                            # the README's matrix
    "premult": ["--premultiply"],
    "groups": ["--optics-groups", "4", "--beamtilt=3,-2"],
}
LABELS = ("rlnBeamTiltX", "rlnBeamTiltY", "rlnOddZernike", "rlnEvenZernike",
          "rlnMagMat00", "rlnMagMat01", "rlnMagMat10", "rlnMagMat11")


@pytest.fixture(scope="module")
def sim(bench_dir, tmp_path_factory) -> Path:
    """The simulated sets (same poses, CTFs and noise; only the optics differ)."""
    root = tmp_path_factory.mktemp("aberr")
    for name, extra in SETS.items():
        subprocess.run([sys.executable, str(bench_dir / "simulate.py"), "--map",
                        str(bench_dir / "maps" / "d2tet_small_b64_a2.5.mrc"), *BASE, *extra,
                        "--out", str(root / name)], check=True, capture_output=True)
    return root


def _crossing(f: np.ndarray, thr: float = 0.5) -> float:
    """Resolution (Å) where the FSC first drops below thr, interpolated (score.py's rule)."""
    for i in range(1, len(f)):
        if f[i] < thr:
            x = i - 1 + (f[i - 1] - thr) / (f[i - 1] - f[i])
            return N * APIX / x
    return 2 * APIX


def _reconstruct_score(sim: Path, star: Path) -> tuple[float, float]:
    """(masked FSC 0.5 resolution in Å, mean masked FSC over shells 16-31 = 10-5 Å) against the truth."""
    out = star.with_name(star.stem + "_rec.mrc")
    assert main(["reconstruct", "--i", str(star), "--ctf", "--sym", "D2", "--o", str(out)]) == 0
    mask = mrcfile.read(sim / "plain" / "mask.mrc")
    f = fsc(mrcfile.read(out) * mask, mrcfile.read(sim / "plain" / "truth.mrc") * mask)
    return _crossing(f), float(np.mean(f[16:32]))


def _edited(sim: Path, name: str, tag: str, edit) -> Path:
    """truth.star of a set with its optics table edited by `edit(optics) -> optics`."""
    blocks = read_star(sim / name / "truth.star")
    blocks["optics"] = edit(blocks["optics"].copy())
    dest = sim / name / f"{tag}.star"
    write_star(dest, blocks)
    return dest


def _strip(o: pd.DataFrame) -> pd.DataFrame:
    o = o.drop(columns=[c for c in LABELS if c in o.columns])
    o["rlnCtfDataAreCtfPremultiplied"] = 0
    return o


def _negate_vec(text: str) -> str:
    return "[" + ",".join(repr(-float(t)) for t in text.strip("[]").split(",")) + "]"


def _wrong(o: pd.DataFrame) -> pd.DataFrame:
    """A wrong convention: tilt and Zernike coefficients negated, the mag matrix transposed."""
    for c in ("rlnBeamTiltX", "rlnBeamTiltY"):
        if c in o:
            o[c] = -o[c]
    for c in ("rlnOddZernike", "rlnEvenZernike"):
        if c in o:
            o[c] = [_negate_vec(v) for v in o[c]]
    if "rlnMagMat01" in o:
        o["rlnMagMat01"], o["rlnMagMat10"] = o["rlnMagMat10"].copy(), o["rlnMagMat01"].copy()
    return o


@pytest.fixture(scope="module")
def plain_score(sim) -> tuple[float, float]:
    return _reconstruct_score(sim, sim / "plain" / "truth.star")


@pytest.mark.parametrize("name", [n for n in SETS if n != "plain"])
def test_reconstruct_corrects_aberrations(sim, plain_score, name):
    """With the labels: the unaberrated set's masked FSC 0.5 within 1 %; without them (or with a wrong sign /
    transposed matrix) clearly worse, as relion_reconstruct (README table)."""
    res0, hi0 = plain_score
    res, hi = _reconstruct_score(sim, sim / name / "truth.star")
    assert res <= 1.01 * res0, (name, res, res0)
    assert hi >= hi0 - 0.01, (name, hi, hi0)
    res_s, hi_s = _reconstruct_score(sim, _edited(sim, name, "stripped", _strip))
    assert res_s > 1.03 * res and hi_s < hi - 0.02, (name, "stripped", res_s, hi_s, res, hi)
    if name != "premult":
        res_w, hi_w = _reconstruct_score(sim, _edited(sim, name, "wrong", _wrong))
        assert hi_w < hi - 0.015, (name, "wrong", res_w, hi_w, res, hi)
        if name != "mag":     # a transposed mag matrix is only mildly worse (README: 3.87 vs 3.77 Å)
            assert res_w > 1.05 * res, (name, "wrong", res_w, res)


def test_reconstruct_groups_need_their_own_tilt(sim):
    """Every group given the mean tilt is worse than each group with its own (README: 3.85 vs 3.81 Å)."""
    _, hi = _reconstruct_score(sim, sim / "groups" / "truth.star")

    def mean_tilt(o):
        o["rlnBeamTiltX"] = o["rlnBeamTiltX"].mean()
        o["rlnBeamTiltY"] = o["rlnBeamTiltY"].mean()
        return o
    _, hi_m = _reconstruct_score(sim, _edited(sim, "groups", "mean", mean_tilt))
    assert hi_m < hi - 0.01, (hi_m, hi)


def test_phase_flipped_data(sim, plain_score, tmp_path):
    """Phase-flipped images (rlnCtfDataArePhaseFlipped 1 in data_optics, or --ctf_phase_flipped) are
    reconstructed with |CTF|; reading them as unflipped is much worse."""
    from cryorefine.fourier.ctf import ctf_params_from_table
    from cryorefine.fourier.transforms import irfft2_centered, rfft2_centered, rfft_freqs_2d

    table = read_particles(sim / "plain" / "truth.star")
    imgs = mrcfile.read(sim / "plain" / "particles.mrcs")
    ky, kx = rfft_freqs_2d(N)
    c = ctf_values(ctf_params_from_table(table), kx.ravel(), ky.ravel(), N, APIX).reshape(-1, N, N // 2 + 1)
    flipped = irfft2_centered(rfft2_centered(imgs) * np.sign(c), N).astype(np.float32)
    mrcfile.write(tmp_path / "flipped.mrcs", flipped)
    blocks = read_star(sim / "plain" / "truth.star")
    blocks["particles"]["rlnImageName"] = [f"{i + 1}@{tmp_path / 'flipped.mrcs'}" for i in range(len(imgs))]
    blocks["optics"]["rlnCtfDataArePhaseFlipped"] = 1
    write_star(tmp_path / "flagged.star", blocks)
    blocks["optics"]["rlnCtfDataArePhaseFlipped"] = 0
    write_star(tmp_path / "unflagged.star", blocks)
    res0, _ = plain_score
    res, _ = _reconstruct_score(sim, tmp_path / "flagged.star")
    assert res <= 1.01 * res0, (res, res0)
    res_u, _ = _reconstruct_score(sim, tmp_path / "unflagged.star")
    assert res_u > 1.2 * res, (res_u, res)
    out = tmp_path / "option.mrc"
    assert main(["reconstruct", "--i", str(tmp_path / "unflagged.star"), "--ctf", "--ctf_phase_flipped",
                 "--sym", "D2", "--o", str(out)]) == 0
    np.testing.assert_allclose(mrcfile.read(out), mrcfile.read(tmp_path / "flagged_rec.mrc"), atol=1e-6)
    # --only_flip_phases: the data times the CTF's sign with unit weights, i.e. the flipped images without CTF
    only_flip, no_ctf = tmp_path / "only_flip.mrc", tmp_path / "no_ctf.mrc"
    assert main(["reconstruct", "--i", str(sim / "plain" / "truth.star"), "--ctf", "--only_flip_phases", "--sym", "D2",
                 "--o", str(only_flip)]) == 0
    assert main(["reconstruct", "--i", str(tmp_path / "unflagged.star"), "--sym", "D2", "--o", str(no_ctf)]) == 0
    a, b = mrcfile.read(only_flip), mrcfile.read(no_ctf)
    np.testing.assert_allclose(a, b, atol=1e-5 * float(np.abs(b).max()))


# ----------------------------------------------------------------------------------------------------------
# refine: runs with several optics groups, and every label survives


@pytest.fixture(scope="module")
def all_set(bench_dir, tmp_path_factory) -> Path:
    """Every aberration at once, 4 optics groups, 120 particles."""
    out = tmp_path_factory.mktemp("aberr_all") / "all"
    subprocess.run([sys.executable, str(bench_dir / "simulate.py"), "--map",
                    str(bench_dir / "maps" / "d2tet_small_b64_a2.5.mrc"), "--n", "120", "--snr", "0.5",
                    "--seed", "3", "--quiet", "--optics-groups", "4", "--beamtilt=1,-0.6", "--odd-zernike",
                    "0,0,50,0,0,-40", "--even-zernike", "80,0,120,0,0,0,40,0,120", "--aniso-mag",
                    "1.012,0.022,0.004,0.988", "--premultiply", "--out", str(out)], check=True, capture_output=True)
    return out


def test_refine_round_trip_keeps_every_label(all_set, tmp_path, monkeypatch):
    """One refine iteration on the aberrated 4-group set: the optics table comes back unchanged, every particle
    column is kept, and the text of the vector labels is byte-identical. The 4 groups (same box, pixel size and
    mag matrix) share one projection cache per half."""
    from cryorefine.refine import expectation

    made = []

    class CountingCache(expectation.ProjectionCache):
        def __init__(self, *a, **kw):
            made.append(1)
            super().__init__(*a, **kw)

    monkeypatch.setattr(expectation, "ProjectionCache", CountingCache)
    out = tmp_path / "run"
    assert main(["refine", "--i", str(all_set / "particles.star"), "--ref", str(all_set / "reference.mrc"),
                 "--o", str(out), "--ini_high", "50", "--sym", "D2", "--particle_diameter", "150",
                 "--auto_iter_max", "1", "--quiet"]) == 0
    assert len(made) == 2, len(made)       # one per half, not one per optics group
    src = read_star(all_set / "particles.star")
    for it in ("it000", "it001"):
        got = read_star(f"{out}_{it}_data.star")
        pd.testing.assert_frame_equal(got["optics"], src["optics"], check_dtype=False)
        missing = set(src["particles"].columns) - set(got["particles"].columns)
        assert not missing, missing
        for col in ("rlnMicrographName", "rlnOpticsGroup", "rlnDefocusU", "rlnDefocusV",
                    "rlnDefocusAngle", "rlnCtfBfactor", "rlnCtfScalefactor", "rlnPhaseShift"):
            pd.testing.assert_series_equal(got["particles"][col], src["particles"][col], check_dtype=False)
        # the input's names open from its own folder only: the run's name the same images from the current folder
        pd.testing.assert_series_equal(read_particles(f"{out}_{it}_data.star").particles["rlnImageName"],
                                       read_particles(all_set / "particles.star").particles["rlnImageName"])
        assert Path(got["particles"]["rlnImageName"].iloc[0].split("@")[1]).is_file()
    text = Path(f"{out}_it001_data.star").read_text()
    for vec in set(src["optics"]["rlnOddZernike"]) | set(src["optics"]["rlnEvenZernike"]):
        assert vec in text
    assert math.isfinite(float(mrcfile.read(f"{out}_it001_half1_class001.mrc").std()))


def test_refine_sees_each_groups_optics(all_set):
    """refine.data carries each group's OpticsModel; groups differing only in beam tilt share one projection key;
    pixel sets sample the model at s·M·k; the refine CTF is CTF(Mk)² for premultiplied data."""
    from cryorefine.refine.data import ctf_on_pixels, load_particles
    from cryorefine.refine.pixels import pixel_set

    data = load_particles(str(all_set / "particles.star"), None, None, 1, True)
    assert len(data.optics) == 4
    models = [og.optics_model for og in data.optics]
    assert len({m.projection_key for m in models}) == 1
    assert len({m.odd for m in models}) == 4          # each group its own tilt
    tilts = read_star(all_set / "particles.star")["optics"]
    for og, (_, row) in zip(data.optics, tilts.iterrows()):
        assert og.optics_model.odd == insert_beam_tilt((0, 0, 50, 0, 0, -40), row["rlnBeamTiltX"],
                                                       row["rlnBeamTiltY"], 2.7, 300.0)
        assert og.optics_model.premultiplied and og.mag == (1.012, 0.022, 0.004, 0.988)
    og = data.optics[0]
    ps = pixel_set(og.box, og.box, 0.5, og.mag)
    np.testing.assert_allclose(ps.kx_model, 0.5 * (1.012 * ps.kx + 0.022 * ps.ky))
    np.testing.assert_allclose(ps.ky_model, 0.5 * (0.004 * ps.kx + 0.988 * ps.ky))
    rows = np.nonzero(data.optics_index == 0)[0][:5]
    c = optics_ctf(data.ctf.subset(rows), og.optics_model, ps.kx, ps.ky)
    np.testing.assert_allclose(model_ctf(data.ctf.subset(rows), og.optics_model, ps.kx, ps.ky), c * c, rtol=1e-6)
    # --ctf_intact_first_peak (refine's setup passes RELION's switches): every group keeps its aberrations, and the
    # refinement's CTF is 1 until the first peak
    switched = load_particles(str(all_set / "particles.star"), None, None, 1, True,
                              ctf_switches={"intact_first_peak": True})
    for a, b in zip(data.optics, switched.optics):
        assert b.optics_model == replace(a.optics_model, intact_first_peak=True)
    got = ctf_on_pixels(switched, rows, ps.kx, ps.ky, True)
    assert not np.allclose(got, c * c, atol=1e-3)
    np.testing.assert_allclose(got, model_ctf(data.ctf.subset(rows), switched.optics[0].optics_model, ps.kx, ps.ky))


def _estep_log_likelihood(sim: Path, star: Path, tmp: Path) -> float:
    """Σ log-likelihood of one E-step half (local searches around the true poses, the true map as reference)."""
    from cryorefine.cli import build_parser
    from cryorefine.fourier.projector import make_projector
    from cryorefine.refine.command import options_from_args
    from cryorefine.refine.log import RunLog
    from dataclasses import replace

    from cryorefine.refine import counters as cnt
    from cryorefine.refine.expectation import expectation_half
    from cryorefine.refine.orientations import make_grid
    from cryorefine.refine.setup import initialise

    args = build_parser("refine").parse_args([
        "refine", "--i", str(star), "--ref", str(sim / "plain" / "truth.mrc"), "--o", str(tmp / "run"),
        "--ini_high", "5", "--sym", "D2", "--particle_diameter", "150", "--healpix_order", "4",
        "--auto_local_healpix_order", "4", "--offset_range", "2", "--offset_step", "1", "--quiet"])
    run = initialise(options_from_args(args), RunLog(None, quiet=True))
    run = replace(run, counters=cnt.with_iteration(run.counters, 1, N, N))
    proj = make_projector(run.models[0].volume, pad=2, r_max=N / 2)
    s = run.sampling
    grid = make_grid(s.healpix_order, "D2", s.psi_step, s.oversampling, 0.0, True)
    acc = expectation_half(run, 1, proj, grid, False, run.poses.copy(), N / 2)
    return acc.ll_sum


@pytest.mark.parametrize("name", ["tilt", "mag"])
def test_refine_estep_uses_the_aberrations(sim, tmp_path, name):
    """The refine E-step (local searches around the true poses, true map as reference, 120 particles) explains
    the aberrated data better with the labels than without them or with a wrong convention (data demodulated,
    CTF at M·k, projections at s·M·k)."""
    def head(o):
        return o

    def first(tag: str, edit) -> Path:
        blocks = read_star(sim / name / "truth.star")
        blocks["optics"] = edit(blocks["optics"].copy())
        blocks["particles"] = blocks["particles"].head(120).copy()
        blocks["particles"]["rlnImageName"] = [f"{i}@{sim / name / f}" for i, f in
                                               (v.split("@", 1) for v in blocks["particles"]["rlnImageName"])]
        write_star(tmp_path / f"{tag}.star", blocks)
        return tmp_path / f"{tag}.star"

    ll = _estep_log_likelihood(sim, first("with", head), tmp_path)
    ll_strip = _estep_log_likelihood(sim, first("strip", _strip), tmp_path)
    ll_wrong = _estep_log_likelihood(sim, first("wrong", _wrong), tmp_path)
    assert ll > ll_strip and ll > ll_wrong, (ll, ll_strip, ll_wrong)
    # the wrong convention must lose clearly: with the mag matrix applied to the CTF but not to the projection
    # frequencies, (ll - ll_wrong) / (ll - ll_strip) falls from 0.067 to 0.005 (tilt: 4.5)
    assert ll - ll_wrong > 0.03 * (ll - ll_strip), (ll, ll_strip, ll_wrong)
