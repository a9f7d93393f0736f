"""End-to-end auto-refine on the standard small set, scored against the simulator's truth (issue: CI must-show).

One refinement (~3-4 minutes on 2 cores) feeds every test in this module.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import starfile

from cryorefine.io.mrc import read_map


@pytest.fixture(scope="module")
def small_run(small_set: Path, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """Run the tutorial-style refinement of the small set once."""
    out = tmp_path_factory.mktemp("refine_small")
    proc = subprocess.run([sys.executable, "-m", "cryorefine", "refine", "--i", "particles.star",
                           "--ref", "reference.mrc", "--o", str(out / "run"), "--ini_high", "50", "--sym", "D2",
                           "--particle_diameter", "150"], cwd=small_set, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


@pytest.fixture(scope="module")
def score(small_run, small_set: Path, bench_dir: Path) -> dict:
    """score.py on the final map and poses."""
    out, _ = small_run
    proc = subprocess.run([sys.executable, str(bench_dir / "score.py"), "--map", str(out / "run_class001.mrc"),
                           "--truth", "truth.mrc", "--mask", "mask.mrc", "--data", str(out / "run_data.star"),
                           "--truth-star", "truth.star", "--sym", "D2"], cwd=small_set, capture_output=True,
                          text=True, check=True)
    return {"json": json.loads(proc.stdout.strip().splitlines()[-1]), "text": proc.stdout}


def _number(text: str, pattern: str) -> float:
    return float(re.search(pattern, text).group(1))


def test_converges_by_itself_with_relion_log_lines(small_run):
    out, proc = small_run
    log = (out / "run.out").read_text()
    auto = [ln for ln in log.splitlines() if "Auto-refine:" in ln]
    assert any("Refinement has converged, entering last iteration" in ln for ln in auto)
    assert any("Final resolution (without masking) is:" in ln for ln in auto)
    for key in ("Iteration=", "Resolution=", "Estimated accuracy angles=", "Angular step=", "Offset search range="):
        assert any(key in ln for ln in auto), key
    assert all(ln.startswith(" Auto-refine: ") for ln in auto)
    assert proc.stdout.count("Auto-refine:") == len(auto)       # the log is also on stdout
    # iteration 2's accuracy is worse than 10 deg here: RELION's four warning lines, in its order
    warn = [ln for ln in auto if "WARNING" in ln][:4]
    assert [w.split("WARNING: ")[1][:20] for w in warn] == ["Iter = 2 The angular", "You probably need no",
                                                            "However, if the prob", "Sometimes it is bett"], warn


def test_map_resolution_against_truth(score):
    text = score["text"]
    masked_05 = _number(text, r"FSC vs truth \(masked\):\s+0\.5 at ([\d.]+) A")
    # RELION 5: 6.20 A; true poses: 5.15 A. 6.24 A with the earlier --maxsig 500 default, 6.29 A with RELION's
    # significance semantics (issue 13; --maxsig 500 with them: 6.17 A): the bound leaves 1 % for that change
    assert masked_05 <= 6.32, text


def test_angular_and_offset_errors(score):
    text = score["text"]
    assert _number(text, r"median ([\d.]+), mean") <= 2.75, text      # RELION 5: 2.71 deg
    assert _number(text, r"offset error: median ([\d.]+) A") <= 1.0, text


def test_reported_resolution_is_honest(small_run, score):
    out, proc = small_run
    reported = _number(proc.stdout, r"Final resolution \(without masking\) is: ([\d.]+)")
    truth_unmasked_05 = _number(score["text"], r"FSC vs truth \(unmasked\): 0\.5 at ([\d.]+) A")
    assert abs(reported - truth_unmasked_05) <= 0.10 * truth_unmasked_05, (reported, truth_unmasked_05)


def test_output_files_exist_and_parse(small_run):
    out, _ = small_run
    for name in ("run_data.star", "run_model.star", "run_optimiser.star", "run_sampling.star",
                 "run_class001.mrc", "run_half1_class001_unfil.mrc", "run_half2_class001_unfil.mrc",
                 "run_it000_data.star", "run_it001_half1_model.star", "run_it001_half2_class001.mrc",
                 "run_it001_optimiser.star", "run_it001_sampling.star"):
        assert (out / name).exists(), name
    data = starfile.read(out / "run_data.star", always_dict=True)
    parts = data["particles"]
    assert len(parts) == 1000 and set(parts["rlnRandomSubset"]) == {1, 2}
    for col in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst",
                "rlnNormCorrection", "rlnLogLikeliContribution", "rlnMaxValueProbDistribution",
                "rlnNrOfSignificantSamples", "rlnGroupNumber", "rlnClassNumber", "rlnImageName", "rlnDefocusU"):
        assert col in parts.columns, col
    assert "optics" in data
    model = starfile.read(out / "run_model.star", always_dict=True)
    assert {"model_general", "model_classes", "model_class_1", "model_groups", "model_optics_group_1",
            "model_pdf_orient_class_1"} <= set(model)
    fsc = model["model_class_1"]["rlnGoldStandardFsc"].to_numpy()
    assert fsc[0] == pytest.approx(1.0) and len(fsc) == 33
    opt_text = (out / "run_optimiser.star").read_text()
    assert opt_text.startswith("# RELION optimiser")
    assert starfile.read(out / "run_optimiser.star")["rlnHasConverged"] == 1
    vol, angpix = read_map(out / "run_class001.mrc")
    assert vol.shape == (64, 64, 64) and angpix == pytest.approx(2.5, abs=1e-4)
    assert np.all(np.isfinite(vol))
