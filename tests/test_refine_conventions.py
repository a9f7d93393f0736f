"""Refinement conventions and honesty: local searches from the true poses stay on them; pure noise does not
produce a high-resolution map; bad input gives one clear line and exit code 2."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile

from bench.standard_sets import BENCH, DATA
from conftest import write_subset
from cryorefine.fourier.fsc import fsc
from cryorefine.geometry.euler import euler_to_matrix
from cryorefine.geometry.symmetry import angular_error_deg, symmetry_matrices


def _refine(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cryorefine", "refine", *args], cwd=cwd, capture_output=True,
                          text=True)


@pytest.fixture(scope="module")
def clean_set() -> Path:
    """300 particles of the small map at SNR 1: poses are well determined, so convention errors show."""
    out = DATA / "conventions_snr1"
    if not (out / "truth.json").exists():
        subprocess.run([sys.executable, str(BENCH / "simulate.py"), "--map", str(BENCH / "maps/d2tet_small_b64_a2.5.mrc"),
                        "--n", "300", "--snr", "1.0", "--seed", "21", "--quiet", "--out", str(out)],
                       check=True, stdout=subprocess.DEVNULL)
    return out


def test_local_search_from_true_poses_keeps_them(clean_set: Path, tmp_path: Path):
    proc = _refine(["--i", "truth.star", "--ref", "truth.mrc", "--o", str(tmp_path / "run"), "--ini_high", "7",
                    "--sym", "D2", "--particle_diameter", "150", "--healpix_order", "4",
                    "--auto_local_healpix_order", "4", "--auto_iter_max", "3", "--offset_range", "3",
                    "--offset_step", "1"], clean_set)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "local searches= true" in proc.stdout or "NrOrientations= local" in proc.stdout
    # iterations 1-2 sample 1.875 deg / 1.25 A (grid-limited, ~1.1 deg); the third goes one order finer
    est = starfile.read(tmp_path / "run_it003_data.star", always_dict=True)["particles"]
    true = starfile.read(clean_set / "truth.star", always_dict=True)["particles"]
    est = est.set_index("rlnImageName").loc[true["rlnImageName"]]
    a_est = euler_to_matrix(est["rlnAngleRot"], est["rlnAngleTilt"], est["rlnAnglePsi"])
    a_true = euler_to_matrix(true["rlnAngleRot"], true["rlnAngleTilt"], true["rlnAnglePsi"])
    err = angular_error_deg(a_est, a_true, symmetry_matrices("D2"))
    assert np.median(err) < 1.0, np.median(err)
    d_off = np.hypot(est["rlnOriginXAngst"].to_numpy() - true["rlnOriginXAngst"].to_numpy(),
                     est["rlnOriginYAngst"].to_numpy() - true["rlnOriginYAngst"].to_numpy())
    assert np.median(d_off) < 0.5, np.median(d_off)


def test_pure_noise_does_not_give_high_resolution(noise_set: Path, tmp_path: Path):
    # 300 of the noise set's 1,000 particles keep CI fast; the full set is run in the benchmarks
    write_subset(noise_set, 300, tmp_path / "noise300.star")
    proc = _refine(["--i", str(tmp_path / "noise300.star"), "--ref", str(noise_set / "reference.mrc"),
                    "--o", str(tmp_path / "run"), "--ini_high", "50", "--sym", "D2", "--particle_diameter", "150"],
                   tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    final = re.search(r"Final resolution \(without masking\) is: ([\d.]+)", proc.stdout)
    assert final, proc.stdout[-2000:]
    # issue 13 asks > 25 Å; beyond the 40 Å join the FSC of noise is within 3σ of chance, so the join it is
    assert float(final.group(1)) >= 40.0 - 1e-3, final.group(1)
    assert "Refinement has converged, stopping now" in proc.stdout
    assert "Reporting" not in proc.stdout        # no resolution override line of any kind
    # the _unfil maps as any reader sees them: no correlation beyond the join that run_model.star does not show,
    # and postprocess (the README's next step) no better than 25 Å
    halves = [mrcfile.read(tmp_path / f"run_half{h}_class001_unfil.mrc").astype(np.float64) for h in (1, 2)]
    maps = fsc(*halves)[7:]
    model = starfile.read(tmp_path / "run_model.star")["model_class_1"]["rlnGoldStandardFsc"].to_numpy()[7:33]
    assert maps.mean() < model.mean() + 0.05, (maps.mean(), model.mean())
    post = subprocess.run([sys.executable, "-m", "cryorefine", "postprocess", "--i",
                           str(tmp_path / "run_half1_class001_unfil.mrc"), "--mask", str(noise_set / "mask.mrc"),
                           "--o", str(tmp_path / "post")], capture_output=True, text=True)
    assert post.returncode == 0, post.stderr[-2000:]
    assert float(re.search(r"FINAL RESOLUTION: ([\d.]+)", post.stdout).group(1)) > 25.0, post.stdout[-2000:]


@pytest.fixture(scope="module")
def tiny(small_set: Path, tmp_path_factory) -> Path:
    """A 40-particle copy of the small set's STAR file for fast failure cases."""
    d = tmp_path_factory.mktemp("tiny")
    write_subset(small_set, 40, d / "p.star")
    return d


@pytest.mark.parametrize("case, extra, message", [
    ("unknown symmetry", ["--sym", "X7"], "X7"),
    ("diameter too large", ["--particle_diameter", "400"], "larger than the box"),
    ("missing reference", ["--ref", "nothere.mrc"], "nothere.mrc"),
])
def test_bad_options_give_one_line(tiny: Path, small_set: Path, tmp_path: Path, case, extra, message):
    args = ["--i", str(tiny / "p.star"), "--ref", str(small_set / "reference.mrc"), "--o", str(tmp_path / "run"),
            "--sym", "D2", "--particle_diameter", "150", "--auto_iter_max", "1"]
    for i in range(0, len(extra), 2):
        args[args.index(extra[i]) + 1] = extra[i + 1]
    proc = _refine(args, tmp_path)
    assert proc.returncode == 2, (case, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert not list(tmp_path.glob("run_it001*"))


def test_missing_ctf_column_and_empty_star(tiny: Path, small_set: Path, tmp_path: Path):
    blocks = starfile.read(tiny / "p.star", always_dict=True)
    no_ctf = blocks["particles"].drop(columns=["rlnDefocusU"])
    starfile.write({"optics": blocks["optics"], "particles": no_ctf}, tmp_path / "noctf.star")
    proc = _refine(["--i", str(tmp_path / "noctf.star"), "--ref", str(small_set / "reference.mrc"),
                    "--o", str(tmp_path / "a"), "--sym", "D2"], tmp_path)
    assert proc.returncode == 2 and "rlnDefocusU" in proc.stderr and "noctf.star" in proc.stderr, proc.stderr
    starfile.write({"optics": blocks["optics"], "particles": blocks["particles"].head(0)}, tmp_path / "empty.star")
    proc = _refine(["--i", str(tmp_path / "empty.star"), "--ref", str(small_set / "reference.mrc"),
                    "--o", str(tmp_path / "b"), "--sym", "D2"], tmp_path)
    assert proc.returncode == 2 and "empty.star" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_reference_without_header_pixel_size_takes_ref_angpix(tiny: Path, small_set: Path, tmp_path: Path):
    """A reference whose header has no pixel size: one line naming --ref_angpix; with it (RELION's option), the
    run uses that pixel size (here 2 A, so the map is rescaled to the particles' 2.5 A)."""
    ref = mrcfile.read(small_set / "reference.mrc")
    with mrcfile.new(tmp_path / "nopix.mrc") as m:
        m.set_data(ref)
        m.voxel_size = 0.0
    args = ["--i", str(tiny / "p.star"), "--ref", str(tmp_path / "nopix.mrc"), "--sym", "D2",
            "--particle_diameter", "150", "--auto_iter_max", "1"]
    proc = _refine([*args, "--o", str(tmp_path / "a")], tmp_path)
    assert proc.returncode == 2 and "no pixel size in its header; give it with --ref_angpix" in proc.stderr
    proc = _refine([*args, "--o", str(tmp_path / "b"), "--ref_angpix", "2"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "nopix.mrc: pixel size 2 A differs from the particles' 2.5 A; rescaled from box 64 to 50" in \
        (tmp_path / "b.out").read_text()


def test_reference_with_other_pixel_size_is_rescaled(tiny: Path, small_set: Path, tmp_path: Path):
    from cryorefine.fourier.resize import resize_fourier
    from cryorefine.io.mrc import read_map, write_map
    ref, angpix = read_map(small_set / "reference.mrc")
    write_map(tmp_path / "ref_2A.mrc", resize_fourier(ref, 80), angpix * 64 / 80)      # 2.0 A/px, box 80
    proc = _refine(["--i", str(tiny / "p.star"), "--ref", str(tmp_path / "ref_2A.mrc"), "--o", str(tmp_path / "r"),
                    "--sym", "D2", "--particle_diameter", "150", "--auto_iter_max", "1"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"ref_2A\.mrc: pixel size 2 A differs .* rescaled from box 80 to 64", proc.stdout), proc.stdout[:3000]
    _, a1 = read_map(tmp_path / "r_it001_half1_class001.mrc")
    assert a1 == pytest.approx(2.5, abs=1e-4)
    # a 2-D image cannot be a reference
    write_map(tmp_path / "flat.mrc", ref[32], angpix)
    proc = _refine(["--i", str(tiny / "p.star"), "--ref", str(tmp_path / "flat.mrc"), "--o", str(tmp_path / "s"),
                    "--sym", "D2"], tmp_path)
    assert proc.returncode == 2 and "flat.mrc" in proc.stderr, proc.stderr


def test_solvent_corrected_fsc_is_postprocess_fsc_of_the_written_half_maps(tiny: Path, small_set: Path,
                                                                           tmp_path: Path):
    """--solvent_correct_fsc: each iteration's rlnGoldStandardFsc is postprocess's corrected FSC (§12) of that
    iteration's written _unfil half maps under the solvent mask, up to the current size's r_max and 0 beyond."""
    from cryorefine.fourier.fsc import masked_corrected_fsc
    proc = _refine(["--i", str(tiny / "p.star"), "--ref", str(small_set / "reference.mrc"), "--o",
                    str(tmp_path / "run"), "--ini_high", "50", "--sym", "D2", "--particle_diameter", "150",
                    "--solvent_mask", str(small_set / "mask.mrc"), "--solvent_correct_fsc", "--auto_iter_max", "2"],
                   tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    halves = [mrcfile.read(tmp_path / f"run_it002_half{h}_class001_unfil.mrc") for h in (1, 2)]
    expected = masked_corrected_fsc(*halves, mrcfile.read(small_set / "mask.mrc"), 2.5)["fsc_true"]
    model = starfile.read(tmp_path / "run_it002_half1_model.star")["model_class_1"]
    written = model["rlnGoldStandardFsc"].to_numpy()
    inside = written != 0
    assert inside.sum() > 5 and not inside[inside.argmin():].any()       # zeros only beyond r_max
    np.testing.assert_allclose(written[1:][inside[1:]], expected[1:][inside[1:]], atol=2e-6)
    plain = fsc(*halves)
    assert np.abs(written[inside] - plain[inside]).max() > 0.01, "the unmasked FSC would not tell them apart"
    optimiser = starfile.read(tmp_path / "run_it002_optimiser.star")
    assert int(optimiser["rlnDoSolventFscCorrection"]) == 1
    no_mask = _refine(["--i", str(tiny / "p.star"), "--ref", str(small_set / "reference.mrc"), "--o",
                       str(tmp_path / "x"), "--solvent_correct_fsc"], tmp_path)
    assert no_mask.returncode == 2 and "--solvent_correct_fsc: needs" in no_mask.stderr


def test_relion_ctf_switches_reach_the_refinement(tiny: Path, small_set: Path, tmp_path: Path):
    """--ctf_intact_first_peak / --only_flip_phases / --ctf_phase_flipped (RELION's relion_refine options): the
    state's optics groups carry them (so every CTF of the run does), and _optimiser.star records them under
    RELION's labels."""
    from cryorefine.cli import build_parser, main
    from cryorefine.refine.command import options_from_args
    from cryorefine.refine.log import RunLog
    from cryorefine.refine.setup import initialise

    base = ["refine", "--i", str(tiny / "p.star"), "--ref", str(small_set / "reference.mrc"), "--sym", "D2",
            "--particle_diameter", "150"]
    switches = {"--ctf_intact_first_peak": "intact_first_peak", "--only_flip_phases": "only_flip_phases",
                "--ctf_phase_flipped": "phase_flipped"}
    for option, field in switches.items():
        opts = options_from_args(build_parser("refine").parse_args([*base, "--o", str(tmp_path / "s"), option]))
        state = initialise(opts, RunLog(str(tmp_path / f"init{field}"), quiet=True))
        model = state.data.optics[0].optics_model
        assert {f: getattr(model, f) for f in switches.values()} == {f: f == field for f in switches.values()}
    assert main([*base, "--o", str(tmp_path / "run"), "--auto_iter_max", "1", "--quiet",
                 "--ctf_intact_first_peak"]) == 0
    general = starfile.read(tmp_path / "run_it001_optimiser.star", always_dict=True)["optimiser_general"]
    assert int(general["rlnDoIgnoreCtfUntilFirstPeak"]) == 1
    assert int(general["rlnDoOnlyFlipCtfPhases"]) == 0 and int(general["rlnCtfDataArePhaseFlipped"]) == 0
    # every label relion_refine --continue requires (MlOptimiser::read, RELION 3.1-5: it stops with "incorrect
    # optimiser_general table" without one), integer labels written as integers (RELION parses them as long)
    required = ["rlnOutputRootName", "rlnModelStarFile", "rlnExperimentalDataStarFile", "rlnOrientSamplingStarFile",
                "rlnCurrentIteration", "rlnNumberOfIterations", "rlnDoSplitRandomHalves",
                "rlnJoinHalvesUntilThisResolution", "rlnAdaptiveOversampleOrder", "rlnAdaptiveOversampleFraction",
                "rlnRandomSeed", "rlnParticleDiameter", "rlnWidthMaskEdge", "rlnDoZeroMask", "rlnDoSolventFlattening",
                "rlnSolventMaskName", "rlnSolventMask2Name", "rlnTauSpectrumName", "rlnMaximumCoarseImageSize",
                "rlnHighresLimitExpectation", "rlnIncrementImageSize", "rlnDoMapEstimation", "rlnDoAutoRefine",
                "rlnAutoLocalSearchesHealpixOrder", "rlnNumberOfIterWithoutResolutionGain",
                "rlnBestResolutionThusFar", "rlnNumberOfIterWithoutChangingAssignments", "rlnDoSkipAlign",
                "rlnOverallAccuracyRotations", "rlnChangesOptimalOrientations", "rlnChangesOptimalOffsets",
                "rlnChangesOptimalClasses", "rlnSmallestChangesOrientations", "rlnSmallestChangesOffsets",
                "rlnSmallestChangesClasses", "rlnHasConverged", "rlnHasHighFscAtResolLimit",
                "rlnHasLargeSizeIncreaseIterationsAgo", "rlnDoCorrectNorm", "rlnDoCorrectScale", "rlnDoCorrectCtf",
                "rlnDoIgnoreCtfUntilFirstPeak", "rlnCtfDataArePhaseFlipped", "rlnDoOnlyFlipCtfPhases",
                "rlnRefsAreCtfCorrected", "rlnFixSigmaNoiseEstimates", "rlnFixSigmaOffsetEstimates",
                "rlnMaxNumberOfPooledParticles"]
    assert [label for label in required if label not in general] == []
    for it in (0, 1):
        text = (tmp_path / f"run_it00{it}_optimiser.star").read_text()
        value = re.search(r"_rlnSmallestChangesClasses\s+(\S+)", text).group(1)
        assert re.fullmatch(r"-?\d+", value), value


def test_cc_iteration_updates_offsets_norms_and_directions_as_relion(tiny, small_set, tmp_path):
    """maximizationOtherParameters after the cross-correlation iteration: σ_offset² = Σ|τ − prior|² / 2N of the hard
    assignments, the norm average the mean norm correction, the direction pdf the histogram of the assigned
    directions (at most N non-zero), the log-likelihood the mean correlation; σ² is not updated. The _data.star
    columns the input lacked come in the order RELION's writer adds them."""
    from cryorefine.cli import main
    out = tmp_path / "run"
    assert main(["refine", "--i", str(tiny / "p.star"), "--ref", str(small_set / "reference.mrc"), "--o", str(out),
                 "--sym", "D2", "--particle_diameter", "150", "--ini_high", "50", "--auto_iter_max", "1",
                 "--quiet"]) == 0
    data = starfile.read(f"{out}_it001_data.star")["particles"]
    for half in (1, 2):
        blocks = starfile.read(f"{out}_it001_half{half}_model.star", always_dict=True)
        general = blocks["model_general"]
        mine = data[data["rlnRandomSubset"] == half]
        tau2 = (mine["rlnOriginXAngst"] ** 2 + mine["rlnOriginYAngst"] ** 2).to_numpy()
        assert float(general["rlnSigmaOffsetsAngst"]) == pytest.approx(np.sqrt(tau2.sum() / (2 * len(mine))),
                                                                         rel=1e-5)
        assert float(general["rlnNormCorrectionAverage"]) == pytest.approx(mine["rlnNormCorrection"].mean(), rel=1e-5)
        assert float(general["rlnLogLikelihood"]) == pytest.approx(mine["rlnLogLikeliContribution"].mean(), abs=1e-5)
        assert 0 < mine["rlnLogLikeliContribution"].max() <= 1          # correlations
        pdf = blocks["model_pdf_orient_class_1"]["rlnOrientationDistribution"].to_numpy()
        assert pdf.sum() == pytest.approx(1.0, abs=1e-4) and 0 < np.count_nonzero(pdf) <= len(mine)
        start = starfile.read(f"{out}_it000_half{half}_model.star", always_dict=True)
        np.testing.assert_array_equal(blocks["model_optics_group_1"]["rlnSigma2Noise"],
                                      start["model_optics_group_1"]["rlnSigma2Noise"])
    # the columns the input lacked, in the order RELION's writer adds them
    added = [c for c in data.columns if c not in starfile.read(tiny / "p.star")["particles"].columns]
    assert added == ["rlnGroupNumber", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst",
                     "rlnOriginYAngst", "rlnClassNumber", "rlnNormCorrection", "rlnRandomSubset",
                     "rlnLogLikeliContribution", "rlnMaxValueProbDistribution", "rlnNrOfSignificantSamples"], added
