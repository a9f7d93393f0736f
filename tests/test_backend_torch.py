"""The PyTorch backend (`--gpu`) on the CPU gives the CPU backend's answers: kernel by kernel, and refinements of
a 300-particle subset of the small set (poses and maps).

On the CPU the PyTorch kernels are several times slower than numba's (insertion by index_add, significance by
sorting), so the whole-refinement comparison runs on a subset for four iterations to stay within CI's budget."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cryorefine.fourier.backprojector import make_backprojector  # noqa: E402
from cryorefine.fourier.fsc import first_shell_below, fsc  # noqa: E402
from cryorefine.geometry.euler import euler_to_matrix  # noqa: E402
from cryorefine.geometry.symmetry import relion_angular_distance_deg, symmetry_matrices  # noqa: E402
from cryorefine.io.mrc import read_map  # noqa: E402
from cryorefine.io.star import read_particles, read_star  # noqa: E402
from cryorefine.refine import likelihood  # noqa: E402
from cryorefine.refine.backend import cpu_backend, make_backend  # noqa: E402
from cryorefine.refine.pixels import pixel_set  # noqa: E402
from conftest import write_subset  # noqa: E402


@pytest.fixture(scope="module")
def backends():
    return cpu_backend(), make_backend("cpu")[0]


def _rotations(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return euler_to_matrix(rng.uniform(-180, 180, n), np.degrees(np.arccos(rng.uniform(-1, 1, n))),
                           rng.uniform(-180, 180, n))


def test_projection_matches_the_numba_kernel(backends, small_set):
    cpu, tb = backends
    vol, _ = read_map(small_set / "truth.mrc")
    ps = pixel_set(64, 50)
    rot = _rotations(40, 1)
    a = cpu.project(cpu.make_projector(vol, 2, 25), rot, ps.kx_model, ps.ky_model)
    b = tb.project(tb.make_projector(vol, 2, 25), rot, ps.kx_model, ps.ky_model)
    assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()
    assert np.abs(a).max() > 0


def test_insertion_matches_the_numba_kernel(backends):
    cpu, tb = backends
    rng = np.random.default_rng(2)
    # |k| <= 13 < r_max = 14: a point exactly on the insertion sphere is kept or dropped by float rounding, which
    # differs between the compilers (numba's fastmath contracts products)
    ps = pixel_set(32, 26)
    rot = _rotations(30, 3)
    vals = (rng.normal(size=(30, ps.m)) + 1j * rng.normal(size=(30, ps.m))).astype(np.complex64)
    wts = rng.uniform(0, 1, size=(30, ps.m)).astype(np.float32)
    bps = []
    for be in backends:
        bp = make_backprojector(32, 2, 14)
        be.insert(bp, rot, ps.kx_model, ps.ky_model, vals, wts)
        be.finish(bp)
        bps.append(bp)
    assert np.abs(bps[0].data - bps[1].data).max() <= 1e-4 * np.abs(bps[0].data).max()
    assert np.abs(bps[0].weight - bps[1].weight).max() <= 1e-4 * bps[0].weight.max()
    assert bps[0].weight.sum() > 0


def test_coarse_significance_and_block_scores_match(backends):
    cpu, tb = backends
    rng = np.random.default_rng(4)
    nb, nt, nu, m = 6, 9, 200, 120
    a = rng.normal(size=(nb, nt, 2 * m)).astype(np.float32)
    p_pair = rng.normal(size=(nu, 2 * m)).astype(np.float32)
    p_pow = rng.uniform(0, 2, size=(nu, m)).astype(np.float32)
    norm_w = rng.uniform(0, 1, size=(nb, m)).astype(np.float32)
    lp_off = -rng.uniform(0, 2, size=(nb, nt))
    lp_dir = np.log(rng.uniform(0.2, 1, size=nu))
    for cc in (False, True):
        k1, c1 = cpu.coarse_significant(a, p_pair, norm_w, p_pow, lp_off, lp_dir, cc, 0.999, -1)
        k2, c2 = tb.coarse_significant(a, p_pair, norm_w, p_pow, lp_off, lp_dir, cc, 0.999, -1)
        assert np.array_equal(c1, c2) and np.array_equal(k1, k2)
    flat = (a * 0.01, p_pair, norm_w * 1e-4, p_pow, lp_off * 0, lp_dir * 0)     # broad posteriors: maxsig binds
    k1, c1 = cpu.coarse_significant(*flat, False, 0.999, 20)
    k2, c2 = tb.coarse_significant(*flat, False, 0.999, 20)
    assert np.all(c1 == 20) and np.all(c2 == 20) and np.array_equal(k1, k2)
    # blocks of n_a shifted images x n_b projections (fine pass: 4 x 8; local coarse pass: all translations x 1),
    # sorted by image; a brute-force product as the reference
    n_blocks, n_ph = 40, 12
    xw = rng.normal(size=(nb, 2 * m)).astype(np.float32)
    ph = rng.normal(size=(n_ph, 2 * m)).astype(np.float32)
    x_c, ph_c, p_c = (v.view(np.complex64) for v in (xw, ph, p_pair))     # interleaved real pairs
    for n_a, n_b in ((4, 8), (9, 1)):
        img = np.sort(rng.integers(0, nb, n_blocks))
        ph_row = rng.integers(0, n_ph - n_a + 1, n_blocks)
        p_row = rng.integers(0, nu - n_b + 1, n_blocks)
        layout = likelihood.BlockLayout(img, ph_row, p_row, n_a, n_b)
        for cc in (False, True):
            want = np.empty((n_blocks, n_a, n_b))
            for k in range(n_blocks):
                xs = x_c[img[k]] * ph_c[ph_row[k]:ph_row[k] + n_a]
                pk = p_c[p_row[k]:p_row[k] + n_b]
                norm = (norm_w[img[k]] * np.abs(pk) ** 2).sum(1)[None]
                cross = np.real(np.conj(xs) @ pk.T)
                want[k] = -cross / np.sqrt(norm) if cc else 0.5 * norm - cross
            for be in (cpu, tb):
                got = be.block_scores(xw, norm_w, ph, p_pair, layout, cc)
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def _refine(star: Path, small_set: Path, out: Path, *extra: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "cryorefine", "refine", "--i", str(star), "--ref",
                           "reference.mrc", "--o", str(out), "--ini_high", "50", "--sym", "D2",
                           "--particle_diameter", "150", "--random_seed", "1", "--auto_iter_max", "4", "--quiet",
                           *extra], cwd=small_set, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_refinement_with_the_torch_backend_matches_the_cpu_backend(small_set, tmp_path):
    star = write_subset(small_set, 200, tmp_path / "sub.star")
    _refine(star, small_set, tmp_path / "cpu" / "run")
    _refine(star, small_set, tmp_path / "torch" / "run", "--gpu", "cpu")
    log = (tmp_path / "torch" / "run.out").read_text()
    assert "PyTorch" in log
    a = read_particles(tmp_path / "cpu" / "run_it004_data.star").particles
    b = read_particles(tmp_path / "torch" / "run_it004_data.star").particles
    mats = [euler_to_matrix(*(t[c].to_numpy(float) for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")))
            for t in (a, b)]
    ang = relion_angular_distance_deg(mats[0], mats[1], symmetry_matrices("D2"))
    assert np.mean(ang <= 0.01) >= 0.97, f"only {np.mean(ang <= 0.01):.1%} of the poses agree within 0.01 deg"
    # maps compared to the iteration's resolution (gold-standard FSC 0.143); beyond it they hold little signal,
    # and the last shells of the data are where float32 differences in broad posteriors show most
    gold = read_star(tmp_path / "cpu" / "run_it004_half1_model.star")["model_class_1"]["rlnGoldStandardFsc"]
    limit = first_shell_below(gold.to_numpy(), 0.143)
    for h in (1, 2):
        va, _ = read_map(tmp_path / "cpu" / f"run_it004_half{h}_class001.mrc")
        vb, _ = read_map(tmp_path / "torch" / f"run_it004_half{h}_class001.mrc")
        assert fsc(va, vb)[1:limit].min() >= 0.999


def test_gpu_option_without_cuda_falls_back_to_the_cpu_with_a_warning(monkeypatch):
    import cryorefine.refine.backend_torch as bt
    monkeypatch.setattr(bt, "cuda_devices", lambda: 0)
    backend, note = make_backend("")
    assert backend.name.startswith("CPU") and "WARNING" in note and "no CUDA device" in note
    monkeypatch.setattr(bt, "cuda_devices", lambda: 2)
    monkeypatch.setattr(bt.torch.cuda, "device_count", lambda: 2)
    assert bt.pick_device("0,1:1", rank=1) == torch.device("cuda:1")
    assert bt.pick_device("1:0", rank=0) == torch.device("cuda:1")
    assert bt.pick_device("", rank=3) == torch.device("cuda:1")
    with pytest.raises(ValueError, match="does not exist"):
        bt.pick_device("5")
