"""`cryorefine postprocess` (relion_postprocess, spec §12) on half maps with a known signal and noise.

Half maps are the small set's truth plus independent Gaussian noise of a designed power spectrum N(r), so the
expected FSC per shell is S/(S+N) (S = shell power of the truth); inside the mask the noise power is the shell power
of mask·noise, so the corrected masked FSC should follow S/(S+N_masked).
"""

from __future__ import annotations

import re
import time
from xml.etree import ElementTree

import numpy as np
import pandas as pd
import pytest
import scipy.fft as sfft
import starfile

from cryorefine import cli
from cryorefine.fourier.fsc import fsc
from cryorefine.io.mrc import read_map, write_map
from cryorefine.io.star import write_star
from cryorefine.tools import postprocess as pp


@pytest.fixture(scope="module")
def maps(small_set):
    """(truth, mask, angpix) of the small set (box 64, 2.5 Å/px), float64."""
    truth, angpix = read_map(small_set / "truth.mrc")
    mask, _ = read_map(small_set / "mask.mrc")
    return truth.astype(np.float64), mask.astype(np.float64), angpix


def _shells(n: int) -> np.ndarray:
    return np.rint(np.sqrt(pp.k_squared(n))).astype(np.int64)


def _shell_power(v: np.ndarray) -> np.ndarray:
    """Mean |F|² per shell 0..N/2 (unnormalised rfftn)."""
    n = v.shape[0]
    s = _shells(n)
    f2 = np.abs(sfft.rfftn(v)) ** 2
    keep = s < n // 2 + 1
    return np.bincount(s[keep], f2[keep], minlength=n // 2 + 1) / np.bincount(s[keep], minlength=n // 2 + 1)


def _coloured_noise(power: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Real Gaussian noise whose expected shell power (unnormalised rfftn) is `power` (shells beyond N/2: last)."""
    s = _shells(n)
    white = sfft.rfftn(np.random.default_rng(seed).normal(size=(n, n, n)))   # E|W|² = N³
    amp = np.sqrt(power / n**3)
    return sfft.irfftn(white * amp[np.minimum(s, power.size - 1)], s=(n, n, n))


def _blur(v: np.ndarray, bfactor: float, angpix: float) -> np.ndarray:
    """exp(−B s²/4) applied to every Fourier component."""
    n = v.shape[0]
    return sfft.irfftn(sfft.rfftn(v) * np.exp(-bfactor / 4 * pp.k_squared(n) / (n * angpix) ** 2), s=v.shape)


def _flat_spectrum(v: np.ndarray) -> np.ndarray:
    """The map with every shell's mean amplitude set to that of shell 1 (flat Guinier plot), corners removed."""
    n = v.shape[0]
    s = _shells(n)
    ft = sfft.rfftn(v)
    keep = s < n // 2 + 1
    amp = np.bincount(s[keep], np.abs(ft)[keep], minlength=n // 2 + 1) / np.bincount(s[keep], minlength=n // 2 + 1)
    scale = np.where(s == 0, 1.0, amp[1] / amp[np.minimum(s, n // 2)])
    return sfft.irfftn(np.where(keep, ft * scale, 0), s=v.shape)


@pytest.fixture(scope="module")
def noisy(maps):
    """Halves = truth + noise with the designed FSC 1/(1 + exp((r − 18)/2)) (crosses 0.143 at r ≈ 21.6)."""
    truth, mask, angpix = maps
    n = truth.shape[0]
    r = np.arange(n // 2 + 1)
    design = 1.0 / (1.0 + np.exp((r - 18.0) / 2.0))
    signal = _shell_power(truth)
    noise_power = signal * (1.0 - design) / design
    n1 = _coloured_noise(noise_power, n, 1)
    n2 = _coloured_noise(noise_power, n, 2)
    masked_noise = 0.5 * (_shell_power(mask * n1) + _shell_power(mask * n2))
    return {"h1": truth + n1, "h2": truth + n2, "design": design,
            "expected_masked": signal / (signal + masked_noise)}


def test_other_half_path():
    assert pp.other_half_path("Refine3D/job1/run_half1_class001_unfil.mrc") == \
        "Refine3D/job1/run_half2_class001_unfil.mrc"
    assert pp.other_half_path("a_half2.mrc") == "a_half1.mrc"
    assert pp.other_half_path("half1_dir/map.mrc") is None          # only the file name counts, as in RELION


def test_fsc_weights_guinier_fit_and_filters():
    f = np.array([1.0, 0.5, 0.2, 5e-5, 0.3])
    np.testing.assert_allclose(pp.fsc_weights(f), [1.0, np.sqrt(1 / 1.5), np.sqrt(0.4 / 1.2), 0.0, 0.0])
    assert pp.last_shell_above(np.array([1.0, 0.9, 0.2, 0.1, 0.5]), 0.143) == 2
    assert pp.last_shell_above(np.ones(5), 0.143) == 4
    # an exact Guinier line y = 3 − 20 x: B = 4·slope = −80, perfect correlation; only d in [5, 10] Å is fitted
    x = (np.arange(33) / 160.0) ** 2
    y = 3.0 - 20.0 * x
    y[5] = 50.0                                              # d = 32 Å: outside the fit range, must not matter
    fit = pp.fit_guinier(x, y, 10.0, 0.0)
    assert fit.bfactor == pytest.approx(-80.0) and fit.intercept == pytest.approx(3.0)
    assert fit.correlation == pytest.approx(1.0) and fit.n_points == 17       # shells 16..32
    # nothing to fit: RELION's zeros (no sharpening), marked for a warning line
    empty = pp.fit_guinier(x, np.full(33, pp.GUINIER_MISSING), 10.0, 0.0)
    assert empty.degenerate and (empty.slope, empty.intercept, empty.bfactor) == (0.0, 0.0, 0.0)
    # B-factor factor: exp(−B s²/4) up to Nyquist, zero in the corners
    k2 = pp.k_squared(16)
    fac = pp.bfactor_factors(k2, 16, 2.0, 100.0)
    assert fac[0, 0, 4] == pytest.approx(np.exp(-100 / 4 * (4 / 32) ** 2))
    assert fac[8, 8, 8] == 0.0
    # low-pass at 8 Å in a 16-box of 2 Å: shell 4, 1 below shell 3, 0 beyond 5
    lp = pp.lowpass_factors(k2, 16, 2.0, 8.0)
    assert lp[0, 0, 3] == 1.0 and lp[0, 0, 4] == pytest.approx(0.5) and lp[0, 0, 6] == 0.0


def test_corrected_fsc_follows_known_curves(maps, noisy):
    truth, mask, angpix = maps
    n = truth.shape[0]
    res = pp.postprocess(noisy["h1"], noisy["h2"], mask, pp.PostprocessOptions(angpix=angpix))
    r_rand = res.randomise_from
    shells = np.arange(n // 2 + 1)
    # the unmasked FSC is the designed S/(S+N)
    assert np.max(np.abs(res.fsc_unmasked[1:] - noisy["design"][1:])) < 0.04
    assert r_rand == pp.first_shell_below(res.fsc_unmasked, 0.8)
    # the corrected FSC follows S/(S + N_masked) beyond the randomisation shell, and equals the masked FSC below
    hi = shells >= r_rand + 2
    assert np.max(np.abs(res.fsc_true[hi] - noisy["expected_masked"][hi])) < 0.05
    np.testing.assert_array_equal(res.fsc_true[1: r_rand + 2], res.fsc_masked[1: r_rand + 2])
    # resolution: within one shell of the known crossing, and the mask gains resolution over the unmasked FSC
    expected_shell = pp.last_shell_above(noisy["expected_masked"], 0.143)
    assert abs(res.resolution_shell - expected_shell) <= 1
    assert res.resolution_A == pytest.approx(n * angpix / res.resolution_shell)
    assert res.resolution_shell > pp.last_shell_above(noisy["design"], 0.143)
    assert not res.unmasked_used
    # phase randomisation: no correlation left beyond the randomisation shell, untouched well below it
    assert np.max(np.abs(res.fsc_random[r_rand + 2:])) < 0.1
    assert abs(np.mean(res.fsc_random[r_rand + 2:])) < 0.02
    assert np.max(np.abs(res.fsc_random[1: r_rand - 1] - res.fsc_masked[1: r_rand - 1])) < 0.02
    # masking away solvent noise only raises the FSC where there is signal
    mid = (res.fsc_unmasked > 0.1) & (res.fsc_unmasked < 0.95)
    assert np.all(res.fsc_true[mid] >= res.fsc_unmasked[mid] - 0.02)


def test_unmasked_fsc_used_when_it_extends_further(maps, noisy):
    truth, _, angpix = maps
    n = truth.shape[0]
    # a small mask in a corner of the box holds only noise: its corrected FSC collapses at once
    c = np.arange(n) - 8
    r = np.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)
    corner = np.clip(6.0 - r, 0.0, 1.0)
    res = pp.postprocess(noisy["h1"], noisy["h2"], corner, pp.PostprocessOptions(angpix=angpix))
    assert res.unmasked_used and res.warnings
    np.testing.assert_array_equal(res.fsc_true, res.fsc_unmasked)
    assert res.resolution_shell == pp.last_shell_above(res.fsc_unmasked, 0.143)
    forced = pp.postprocess(noisy["h1"], noisy["h2"], corner,
                            pp.PostprocessOptions(angpix=angpix, force_mask=True))
    assert not forced.unmasked_used and forced.resolution_shell < res.resolution_shell


def test_auto_bfactor_cli_and_star(maps, tmp_path, capsys):
    """Flat-spectrum map blurred with B = +80: the Guinier fit gives a sharpening B of about −80."""
    truth, mask, angpix = maps
    flat = _flat_spectrum(truth)
    rng = np.random.default_rng(7)
    blurred = _blur(flat, 80.0, angpix)
    sigma = 0.1 * np.std(blurred)
    for k in (1, 2):
        write_map(tmp_path / f"run_half{k}_class001_unfil.mrc", blurred + sigma * rng.normal(size=flat.shape), angpix)
    write_map(tmp_path / "mask.mrc", mask, angpix)
    out = tmp_path / "PostProcess" / "postprocess"
    rc = cli.main(["postprocess", "--i", str(tmp_path / "run_half1_class001_unfil.mrc"), "--mask",
                   str(tmp_path / "mask.mrc"), "--o", str(out), "--auto_bfac", "--randomize_at_A", "10"])
    assert rc == 0
    text = capsys.readouterr().out
    star = starfile.read(f"{out}.star", always_dict=True)
    general = star["general"]
    bfac = float(np.ravel(general["rlnBfactorUsedForSharpening"])[0])
    assert bfac == pytest.approx(-80.0, abs=15.0)
    resolution = float(np.ravel(general["rlnFinalResolution"])[0])
    assert f"FINAL RESOLUTION: {resolution:.2f}" in text and f"{bfac:.2f}" in text
    assert float(np.ravel(general["rlnRandomiseFrom"])[0]) == pytest.approx(10.0)
    for label in ("rlnUnfilteredMapHalf2", "rlnMaskName", "rlnFittedSlopeGuinierPlot",
                  "rlnFittedInterceptGuinierPlot", "rlnCorrelationFitGuinierPlot"):
        assert label in general
    assert str(np.ravel(general["rlnUnfilteredMapHalf2"])[0]).endswith("run_half2_class001_unfil.mrc")
    # RELION's f = 0.476 / (fraction of the box inside the mask), which CTF refinement and polishing read too
    assert float(np.ravel(general["rlnParticleBoxFractionSolventMask"])[0]) == pytest.approx(
        0.476 / float(np.mean(mask > 0.5)), rel=1e-5)
    fsc_table = star["fsc"]
    assert len(fsc_table) == 33 and list(fsc_table["rlnSpectralIndex"]) == list(range(33))
    for label in ("rlnResolution", "rlnAngstromResolution", "rlnFourierShellCorrelationCorrected",
                  "rlnFourierShellCorrelationParticleMaskFraction", "rlnFourierShellCorrelationUnmaskedMaps",
                  "rlnFourierShellCorrelationMaskedMaps",
                  "rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps"):
        assert label in fsc_table.columns
    assert fsc_table["rlnAngstromResolution"].iloc[16] == pytest.approx(10.0)
    guinier = star["guinier"]
    for label in ("rlnResolutionSquared", "rlnLogAmplitudesOriginal", "rlnLogAmplitudesWeighted",
                  "rlnLogAmplitudesSharpened", "rlnLogAmplitudesIntercept"):
        assert label in guinier.columns
    # the sharpened Guinier plot is flat again from 10 Å to just below Nyquist (whose shell loses its corners)
    rows = slice(16, 32)
    slope = np.polyfit(guinier["rlnResolutionSquared"][rows], guinier["rlnLogAmplitudesSharpened"][rows], 1)[0]
    assert abs(4 * slope) < 5.0
    sharpened, p_out = read_map(f"{out}.mrc")
    masked, _ = read_map(f"{out}_masked.mrc")
    assert p_out == pytest.approx(angpix, rel=1e-5)
    np.testing.assert_allclose(masked, sharpened * mask, atol=1e-6)
    # EMDB's FSC XML and RELION's .dat: the corrected FSC against 1/Å, as the STAR's columns
    root = ElementTree.parse(f"{out}_fsc.xml").getroot()
    assert root.tag == "fsc" and root.get("xaxis") == "Resolution (A-1)"
    xy = np.array([[float(c.find("x").text), float(c.find("y").text)] for c in root.findall("coordinate")])
    np.testing.assert_allclose(xy[:, 0], fsc_table["rlnResolution"], rtol=1e-5)
    np.testing.assert_allclose(xy[:, 1], fsc_table["rlnFourierShellCorrelationCorrected"], atol=1e-5)
    np.testing.assert_allclose(np.loadtxt(f"{out}_fsc.dat"), xy, rtol=1e-5, atol=1e-6)
    # RELION's logfile.pdf (its GUI's Display): the FSC and Guinier pages
    pdf = (tmp_path / "PostProcess" / "logfile.pdf").read_bytes()
    assert pdf.startswith(b"%PDF") and len(re.findall(rb"/Type /Page[^s]", pdf)) == 2

    # the same map without the blur: no sharpening needed
    unblurred = pp.postprocess(flat + sigma * rng.normal(size=flat.shape), flat + sigma * rng.normal(size=flat.shape),
                               mask, pp.PostprocessOptions(angpix=angpix, auto_bfac=True, randomize_at_A=10.0))
    assert unblurred.bfactor == pytest.approx(0.0, abs=15.0)


def test_adhoc_bfactor_and_mtf(maps, tmp_path):
    truth, mask, angpix = maps
    n = truth.shape[0]
    flat = _flat_spectrum(truth)
    blurred = _blur(flat, 80.0, angpix)
    rng = np.random.default_rng(11)
    sigma = 0.03 * np.std(blurred)
    h1 = blurred + sigma * rng.normal(size=flat.shape)
    h2 = blurred + sigma * rng.normal(size=flat.shape)
    opts = pp.PostprocessOptions(angpix=angpix, adhoc_bfac=-80.0, randomize_at_A=10.0)
    res = pp.postprocess(h1, h2, mask, opts)
    assert res.bfactor == -80.0 and res.fit is None and res.lowpass_A == 0.0
    # un-blurring restores the flat-spectrum map (FSC weights are about 1 at this noise level)
    assert np.corrcoef(res.sharpened.ravel(), flat.ravel())[0, 1] > 0.98
    # an MTF of 0.5 at every frequency doubles the amplitudes below Nyquist
    table = pd.DataFrame({"rlnResolutionInversePixel": np.linspace(0.0, 0.5, 11), "rlnMtfValue": np.full(11, 0.5)})
    write_star(tmp_path / "mtf.star", {"": table})
    opts.mtf = pp.read_mtf(tmp_path / "mtf.star", angpix)
    g = pp.postprocess(h1, h2, mask, opts).guinier
    np.testing.assert_allclose(g["rlnLogAmplitudesMTFCorrected"][1:n // 2] - g["rlnLogAmplitudesOriginal"][1:n // 2],
                               np.log(2.0), atol=1e-9)


def test_low_pass(maps, noisy):
    truth, mask, angpix = maps
    h1, h2 = noisy["h1"], noisy["h2"]
    plain = pp.postprocess(h1, h2, mask, pp.PostprocessOptions(angpix=angpix))
    # negative: at the final resolution; the raised cosine ends one shell beyond it
    at_res = pp.postprocess(h1, h2, mask, pp.PostprocessOptions(angpix=angpix, low_pass=-1.0))
    assert at_res.lowpass_A == pytest.approx(at_res.resolution_A)
    power = _shell_power(at_res.sharpened)
    assert np.all(power[at_res.resolution_shell + 2:] < 1e-12 * power[1])
    # 20 Å = shell 8 of the 64-box: shells up to 6 untouched, nothing from shell 10 on
    lp20 = pp.postprocess(h1, h2, mask, pp.PostprocessOptions(angpix=angpix, low_pass=20.0))
    f = fsc(lp20.sharpened, plain.sharpened)
    assert np.all(f[1:7] > 0.999999)
    power = _shell_power(lp20.sharpened)
    assert np.all(power[10:] < 1e-12 * power[1])


@pytest.mark.parametrize("case", ["missing_half2", "mask_box", "mask_values", "half_angpix", "both_bfactors"])
def test_bad_input_exit_2_no_output(maps, tmp_path, capsys, case):
    truth, mask, angpix = maps
    h1 = tmp_path / "run_half1_class001_unfil.mrc"
    h2 = tmp_path / "run_half2_class001_unfil.mrc"
    m = tmp_path / "mask.mrc"
    write_map(h1, truth, angpix)
    if case != "missing_half2":
        write_map(h2, truth, angpix if case != "half_angpix" else 2.0)
    if case == "mask_box":
        write_map(m, mask[:48, :48, :48], angpix)
    elif case == "mask_values":
        write_map(m, 1.5 * mask, angpix)
    else:
        write_map(m, mask, angpix)
    out = tmp_path / "out" / "pp"
    argv = ["postprocess", "--i", str(h1), "--mask", str(m), "--o", str(out)]
    if case == "both_bfactors":
        argv += ["--auto_bfac", "--adhoc_bfac", "-100"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    named = {"missing_half2": h2.name, "mask_box": m.name, "mask_values": m.name, "half_angpix": h2.name,
             "both_bfactors": "--auto_bfac"}[case]
    assert named in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def _halves(maps, noisy, tmp_path):
    """run_half1/2 (the noisy halves) and mask.mrc in tmp_path; returns (half1, mask) paths."""
    _, mask, angpix = maps
    for k in (1, 2):
        write_map(tmp_path / f"run_half{k}_class001_unfil.mrc", noisy[f"h{k}"], angpix)
    write_map(tmp_path / "mask.mrc", mask, angpix)
    return tmp_path / "run_half1_class001_unfil.mrc", tmp_path / "mask.mrc"


@pytest.mark.parametrize("option, value", [("--adhoc_bfac", "nan"), ("--adhoc_bfac", "inf"), ("--low_pass", "nan"),
                                           ("--angpix", "nan"), ("--mtf_angpix", "inf"), ("--randomize_at_A", "nan"),
                                           ("--autob_highres", "nan")])
def test_non_finite_option_values_are_refused(maps, noisy, tmp_path, capsys, option, value):
    h1, m = _halves(maps, noisy, tmp_path)
    out = tmp_path / "out" / "pp"
    assert cli.main(["postprocess", "--i", str(h1), "--mask", str(m), "--o", str(out), option, value]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{option}: must be a finite number (got {value})" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.filterwarnings("error")        # numpy overflow warnings fail the test
def test_overflowing_bfactor_is_refused(maps, noisy, tmp_path, capsys):
    h1, m = _halves(maps, noisy, tmp_path)
    out = tmp_path / "out" / "pp"
    assert cli.main(["postprocess", "--i", str(h1), "--mask", str(m), "--o", str(out), "--adhoc_bfac", "-100000"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--adhoc_bfac: sharpening with B = -100000 Å²" in err
    assert "float32 range" in err and not (tmp_path / "out").exists()


def test_negative_random_seed_seeds_from_the_clock(maps, noisy, tmp_path, capsys):
    assert pp.effective_seed(7, 1e9) == 7 and pp.effective_seed(0, 1e9) == 0
    assert pp.effective_seed(-5, 1712345678.9) == 1712345678
    h1, m = _halves(maps, noisy, tmp_path)
    before = int(time.time())
    assert cli.main(["postprocess", "--i", str(h1), "--mask", str(m), "--o", str(tmp_path / "pp"),
                     "--random_seed", "-5"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "random seed from the clock" in ln]
    assert len(lines) == 1
    seed = int(lines[0].split("clock: ")[1].split()[0])
    assert before <= seed <= time.time()
    assert (tmp_path / "pp.mrc").exists()


def test_output_that_is_a_folder_is_refused(maps, noisy, tmp_path, capsys):
    h1, m = _halves(maps, noisy, tmp_path)
    (tmp_path / "pp.mrc").mkdir()
    assert cli.main(["postprocess", "--i", str(h1), "--mask", str(m), "--o", str(tmp_path / "pp")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{tmp_path / 'pp.mrc'}: is a folder, not a file" in err
    assert not (tmp_path / "pp.star").exists()


def test_auto_bfactor_with_nothing_to_fit_sharpens_with_zero_as_relion(maps, tmp_path, capsys):
    """Half maps with signal only to about 16 Å: no shell between --autob_lowres 10 Å and Nyquist keeps a weighted
    amplitude, so RELION's straight-line fit gives slope 0 and the map is not sharpened; a warning line says so
    (it was an error that stopped the job)."""
    truth, mask, angpix = maps
    n = truth.shape[0]
    r = np.arange(n // 2 + 1)
    design = np.where(r <= 9, 0.999, 1e-12)            # shell 10 = 16 Å on 160 Å
    signal = _shell_power(truth)
    noise_power = signal * (1.0 - design) / design
    halves = [truth + _coloured_noise(noise_power, n, seed) for seed in (3, 4)]
    for k, h in enumerate(halves, 1):
        write_map(tmp_path / f"run_half{k}_class001_unfil.mrc", h, angpix)
    out = tmp_path / "pp"
    capsys.readouterr()
    assert cli.main(["postprocess", "--i", str(tmp_path / "run_half1_class001_unfil.mrc"), "--o", str(out),
                     "--auto_bfac"]) == 0
    captured = capsys.readouterr()
    assert "WARNING: --auto_bfac: 0 shell(s) with signal between 10 and 5 Å" in captured.err
    general = starfile.read(f"{out}.star", always_dict=True)["general"]
    assert float(np.ravel(general["rlnBfactorUsedForSharpening"])[0]) == 0.0
    assert float(np.ravel(general["rlnFittedSlopeGuinierPlot"])[0]) == 0.0


def test_molweight_particle_fsc(maps, noisy, tmp_path):
    """--molweight M: f = 0.476 (N p)^3 0.81 / (1000 M) and the cisTEM-like FSC f F / (1 + (f - 1) F) of the
    unmasked F, written with RELION's labels, with and without a mask."""
    truth, mask, angpix = maps
    for k, h in ((1, noisy["h1"]), (2, noisy["h2"])):
        write_map(tmp_path / f"run_half{k}_class001_unfil.mrc", h, angpix)
    write_map(tmp_path / "mask.mrc", mask, angpix)
    f = 0.476 * (64 * 2.5) ** 3 * 0.81 / (150.0 * 1000)
    for extra in ([], ["--mask", str(tmp_path / "mask.mrc")]):
        out = tmp_path / f"pp{len(extra)}"
        assert cli.main(["postprocess", "--i", str(tmp_path / "run_half1_class001_unfil.mrc"), "--o", str(out),
                         "--molweight", "150", *extra]) == 0
        star = starfile.read(f"{out}.star", always_dict=True)
        general, table = star["general"], star["fsc"]
        assert float(np.ravel(general["rlnMolecularWeight"])[0]) == 150.0
        assert float(np.ravel(general["rlnParticleBoxFractionMolecularWeight"])[0]) == pytest.approx(f, rel=1e-5)
        unmasked = table["rlnFourierShellCorrelationUnmaskedMaps"].to_numpy()
        np.testing.assert_allclose(table["rlnFourierShellCorrelationParticleMolWeight"],
                                   f * unmasked / (1 + (f - 1) * unmasked), rtol=1e-4, atol=1e-5)
