"""Pure noise: beyond the shells the references are projected to, nothing in a refinement depends on the sign of the
images' Fourier components, so the halves' FSC there is chance with mean exactly 0 (issue 13).

Two refinements of the same 200 noise images, one with the components beyond |k| = 6 of every half-1 image negated.
For stationary Gaussian noise (independent Fourier components) both image sets are equally likely. If alignment,
weights, noise model, join, reconstruction and reference limit use only the low band (references at the 40 Å join,
shell 4) and the power of the rest, both runs take the same poses and half 1's sums beyond the band change sign, so
the FSC there changes sign: its distribution is symmetric about 0 and no part of it is shared by the halves. The two
operations of the data path that mix image frequencies by design, RELION's soft particle mask and its zero-filled
integer pre-shift (`refine.data`), are replaced in both runs by no mask and a circular shift, which mix nothing;
what they add on noise was measured separately (`docs/benchmarks.md`, "Pure noise").
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import starfile

from bench.bench_noise_flip import R_FLIP, flipped_copy
from conftest import write_subset

N_PARTICLES = 200
ITERATION = 3

# no particle mask, circular pre-shift; then cryorefine's command line
_RUN = ("import sys, numpy as np, cryorefine.refine.data as d; "
        "d.mask_particles = lambda images, radius, edge, fill='mean': np.asarray(images, np.float32); "
        "d.preshift = lambda images, shifts: np.stack([np.roll(im, (int(y), int(x)), (0, 1)) "
        "for im, (x, y) in zip(images, shifts)]) if len(images) else images; "
        "from cryorefine.cli import main; sys.exit(main(sys.argv[1:]))")


def _refine(star: Path, ref: Path, out: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", _RUN, "refine", "--i", str(star), "--ref", str(ref), "--o", str(out),
                           "--ini_high", "50", "--sym", "D2", "--particle_diameter", "150", "--no_flatten_solvent",
                           "--auto_iter_max", str(ITERATION), "--j", "2"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def _fsc(out: Path) -> np.ndarray:
    model = starfile.read(f"{out}_it{ITERATION:03d}_half1_model.star", always_dict=True)
    return model["model_class_1"]["rlnGoldStandardFsc"].to_numpy()


def test_noise_fsc_beyond_the_band_changes_sign_with_half1_images(noise_set: Path, tmp_path: Path):
    star = write_subset(noise_set, N_PARTICLES, tmp_path / "noise.star", alternate_halves=True)
    flipped = flipped_copy(star, noise_set / "particles.mrcs", tmp_path)    # |k| > R_FLIP negated in half 1
    _refine(star, noise_set / "reference.mrc", tmp_path / "a")
    _refine(flipped, noise_set / "reference.mrc", tmp_path / "b")
    pa = starfile.read(tmp_path / f"a_it{ITERATION:03d}_data.star", always_dict=True)["particles"]
    pb = starfile.read(tmp_path / f"b_it{ITERATION:03d}_data.star", always_dict=True)["particles"]
    same = np.ones(len(pa), bool)
    for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"):
        same &= np.abs(pa[c].to_numpy() - pb[c].to_numpy()) < 1e-3
    # float32 rounding of the flipped images can break a near-tie or two
    assert same.mean() >= 0.95, same.mean()
    fa, fb = _fsc(tmp_path / "a"), _fsc(tmp_path / "b")
    np.testing.assert_allclose(fa[1:5], fb[1:5], atol=1e-3)        # the join: shared, the same in both
    # shells fed only by components beyond R_FLIP (trilinear insertion and the FSC's down-sampling reach ±1 shell)
    far = np.arange(int(R_FLIP) + 2, len(fa))
    far = far[(fa[far] != 0) | (fb[far] != 0)]                      # shells with data at this iteration's size
    assert len(far) >= 5, far
    assert np.abs(fa[far]).max() > 0.2, fa[far]                     # chance values, not zeros
    np.testing.assert_allclose(fa[far], -fb[far], atol=0.1)
