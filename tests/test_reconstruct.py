"""`cryorefine reconstruct` against the truth of the small set (RELION 5 relion_reconstruct: 5.15 Å masked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest

from cryorefine.cli import main
from cryorefine.fourier.fsc import fsc
from cryorefine.fourier.reconstruct_command import kaiser_bessel_ft


def _score(bench_dir: Path, rec: Path, data: Path) -> dict:
    out = subprocess.run([sys.executable, str(bench_dir / "score.py"), "--map", str(rec),
                          "--truth", str(data / "truth.mrc"), "--mask", str(data / "mask.mrc")],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _absolute_names(names, folder: Path) -> list[str]:
    """NNNNNN@stack names made absolute (the STAR file is written elsewhere)."""
    return [f"{n.split('@')[0]}@{(folder / n.split('@')[1]).resolve()}" for n in names]


def _run(args: list[str]) -> int:
    return main(["reconstruct", *map(str, args)])


@pytest.fixture(scope="module")
def small_rec(small_set, tmp_path_factory) -> Path:
    rec = tmp_path_factory.mktemp("rec") / "rec.mrc"
    assert _run(["--i", small_set / "truth.star", "--ctf", "--sym", "D2", "--o", rec]) == 0
    return rec


def test_small_set_matches_relion_reconstruct(small_rec, small_set, bench_dir):
    with mrcfile.open(small_rec) as m:
        assert m.data.shape == (64, 64, 64)
        assert float(m.voxel_size.x) == pytest.approx(2.5)
    res = _score(bench_dir, small_rec, small_set)
    assert res["fsc05_masked_A"] <= 5.2          # relion_reconstruct: 5.15 Å
    assert res["fsc05_A"] <= 6.1                 # relion_reconstruct: 5.99 Å
    assert np.linalg.norm(res["shift_A"]) < 0.1


def test_subset_and_gridding_option(small_rec, small_set, tmp_path):
    """Half 1 alone with RELION's optional gridding compensation still agrees with the full map at low
    resolution, and is worse than it at high resolution (half the data)."""
    half = tmp_path / "half1.mrc"
    assert _run(["--i", small_set / "truth.star", "--ctf", "--sym", "D2", "--subset", "1",
                 "--dont_skip_gridding", "--o", half]) == 0
    f = fsc(mrcfile.read(half), mrcfile.read(small_rec))
    assert f[1:12].min() > 0.95
    truth = mrcfile.read(small_set / "truth.mrc")
    assert fsc(mrcfile.read(half), truth)[20:30].mean() < fsc(mrcfile.read(small_rec), truth)[20:30].mean()


def test_optics_group_with_other_box_is_rescaled(small_rec, small_set, tmp_path):
    """Particles of half 2 re-boxed to 80 px (zero-padded, same pixel size) as optics group 2: frequencies of
    that group are scaled by 64/80 onto the model grid, so the map is the same as from the original images."""
    from cryorefine.io.particles import ParticleImages
    from cryorefine.io.star import read_particles, write_particles

    table = read_particles(small_set / "truth.star")
    parts = table.particles.copy()
    rows = np.flatnonzero(parts["rlnRandomSubset"].to_numpy() == 2)
    imgs = ParticleImages(table).read(rows)
    big = np.zeros((rows.size, 80, 80), np.float32)
    big[:, 8:72, 8:72] = imgs                      # centre 32 -> 40 (= 80 // 2)
    with mrcfile.new(tmp_path / "big.mrcs", overwrite=True) as m:
        m.set_data(big)
        m.voxel_size = 2.5
    parts.loc[rows, "rlnImageName"] = [f"{i + 1:06d}@big.mrcs" for i in range(rows.size)]
    parts.loc[rows, "rlnOpticsGroup"] = 2
    other = parts.index.difference(rows)
    parts.loc[other, "rlnImageName"] = _absolute_names(parts.loc[other, "rlnImageName"], small_set)
    optics = table.optics.copy()
    g2 = optics.iloc[[0]].copy()
    g2["rlnOpticsGroup"] = 2
    g2["rlnOpticsGroupName"] = "opticsGroup2"
    g2["rlnImageSize"] = 80
    table.optics = pd.concat([optics, g2], ignore_index=True)
    table.particles = parts
    star = tmp_path / "mixed.star"
    write_particles(star, table)
    rec = tmp_path / "mixed.mrc"
    assert _run(["--i", star, "--ctf", "--sym", "D2", "--o", rec]) == 0
    f = fsc(mrcfile.read(rec), mrcfile.read(small_rec))
    assert f[1:25].min() > 0.95


def test_input_errors(small_set, tmp_path, capsys):
    from cryorefine.io.star import read_particles, write_particles

    table = read_particles(small_set / "truth.star")
    table.particles["rlnImageName"] = _absolute_names(table.particles["rlnImageName"], small_set)
    no_angles = tmp_path / "noangles.star"
    table.particles = table.particles.drop(columns=["rlnAngleTilt", "rlnRandomSubset"])
    write_particles(no_angles, table)
    assert _run(["--i", no_angles, "--o", tmp_path / "x.mrc"]) == 2
    assert "rlnAngleTilt" in capsys.readouterr().err
    table = read_particles(small_set / "truth.star")
    table.particles["rlnImageName"] = _absolute_names(table.particles["rlnImageName"], small_set)
    no_ctf = tmp_path / "noctf.star"
    table.particles = table.particles.drop(columns=["rlnDefocusU", "rlnRandomSubset"])
    write_particles(no_ctf, table)
    assert _run(["--i", no_ctf, "--ctf", "--o", tmp_path / "x.mrc"]) == 2
    assert "rlnDefocusU" in capsys.readouterr().err
    assert _run(["--i", no_ctf, "--subset", "1", "--o", tmp_path / "x.mrc"]) == 2
    assert "rlnRandomSubset" in capsys.readouterr().err
    assert _run(["--i", small_set / "truth.star", "--sym", "Q7", "--o", tmp_path / "x.mrc"]) == 2
    assert not (tmp_path / "x.mrc").exists()


def test_blob_transform_shape():
    """Kaiser–Bessel (a = 3.8, α = 15, m = 0) transform: maximal at 0, smooth monotone decay to 0.5."""
    w = np.linspace(0, 0.5, 51)
    v = kaiser_bessel_ft(w, 3.8) / kaiser_bessel_ft(0.0, 3.8)
    assert v[0] == pytest.approx(1.0)
    assert np.all(np.diff(v) < 0)
    assert 0.001 < v[-1] < 0.05


def test_angular_and_shift_errors(small_rec, small_set, tmp_path, capsys):
    """RELION's --angular_error / --shift_error: each angle and origin gets its own N(0, sd²) draw (the sample s.d.
    of the added values is the option), and the map made from perturbed poses agrees less with the true-pose one."""
    from cryorefine.fourier.reconstruct_command import perturbed_poses
    from cryorefine.io.star import read_particles
    parts = read_particles(small_set / "truth.star").particles
    moved = perturbed_poses(parts, 4.0, 1.5, np.random.default_rng(3))
    for labels, sd in ((("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"), 4.0), (("rlnOriginXAngst", "rlnOriginYAngst"),
                                                                              1.5)):
        d = np.stack([moved[lab].to_numpy() - parts[lab].to_numpy() for lab in labels])
        assert abs(d.std() - sd) < 0.1 * sd and abs(d.mean()) < 0.1 * sd
        assert abs(np.corrcoef(d[0], d[1])[0, 1]) < 0.1              # independent draws
    assert perturbed_poses(parts, 0.0, 0.0, np.random.default_rng(3)).equals(parts)
    out = tmp_path / "err.mrc"
    assert _run(["--i", small_set / "truth.star", "--ctf", "--sym", "D2", "--o", out, "--angular_error", "6",
                 "--shift_error", "2"]) == 0
    assert "poses perturbed: --angular_error 6 deg, --shift_error 2 A (random seed" in capsys.readouterr().err
    ref, truth = mrcfile.read(small_rec), mrcfile.read(small_set / "truth.mrc")
    worse = mrcfile.read(out)
    assert fsc(worse, truth)[10:20].mean() < fsc(ref, truth)[10:20].mean() - 0.05
