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
    """NNNNNN@stack names made absolute (the STAR file is written elsewhere); read_particles names a stack as it opens
    from the current folder, a name in a STAR file opens from that file's `folder`."""
    def absolute(stack: str) -> Path:
        return (Path(stack) if Path(stack).exists() else folder / stack).resolve()
    return [f"{n.split('@')[0]}@{absolute(n.split('@')[1])}" for n in names]


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
    assert "poses perturbed: --angular_error 6 deg, --shift_error 2 A (random seed" in capsys.readouterr().out
    ref, truth = mrcfile.read(small_rec), mrcfile.read(small_set / "truth.mrc")
    worse = mrcfile.read(out)
    assert fsc(worse, truth)[10:20].mean() < fsc(ref, truth)[10:20].mean() - 0.05


# bad input: one error line on stderr naming the option or file, exit code 2, no map written


@pytest.fixture()
def sub40(small_set, tmp_path) -> Path:
    """The first 40 particles of truth.star with a stack of their own (sub40.mrcs: 40 images) beside the STAR."""
    from dataclasses import replace

    from cryorefine.io.particles import ParticleImages
    from cryorefine.io.star import read_particles, write_particles
    table = read_particles(small_set / "truth.star")
    with mrcfile.new(tmp_path / "sub40.mrcs") as m:
        m.set_data(ParticleImages(table).read(np.arange(40)))
        m.voxel_size = 2.5
    parts = table.particles.head(40).copy()
    parts["rlnImageName"] = [f"{i + 1:06d}@sub40.mrcs" for i in range(40)]
    write_particles(tmp_path / "sub40.star", replace(table, particles=parts))
    return tmp_path / "sub40.star"


def _edited_star(star: Path, name: str, **columns) -> Path:
    """A copy of `star` (beside it) with the given particle columns set (a list per row or one value for all)."""
    from cryorefine.io.star import read_particles, write_particles
    table = read_particles(star)
    for label, value in columns.items():
        table.particles[label] = value
    write_particles(star.with_name(name), table)
    return star.with_name(name)


def _one_error(capsys, args: list) -> str:
    """The stderr line of a reconstruct run that must fail with exit code 2 and print only that line."""
    capsys.readouterr()
    assert _run(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "error: " in err[0], err
    return err[0]


def test_pad_beyond_the_memory_is_one_line_naming_pad(sub40, tmp_path, capsys, monkeypatch):
    """--pad 100000 was a traceback (numpy: array is too big); a padded grid larger than the available memory is
    refused up front."""
    out = tmp_path / "out" / "rec.mrc"
    for pad in ("100000", "1e308"):
        err = _one_error(capsys, ["--i", sub40, "--o", out, "--pad", pad])
        assert f"--pad {float(pad):.10g}: the padded Fourier grids of box 64 need at least" in err
        assert "GiB available" in err, err
    monkeypatch.setattr("cryorefine.refine.memory.available_bytes", lambda: 2 ** 20)
    assert "--pad 2: " in _one_error(capsys, ["--i", sub40, "--o", out, "--pad", "2"])
    assert "--pad: must be a positive integer" in _one_error(capsys, ["--i", sub40, "--o", out, "--pad", "0"])
    assert not (tmp_path / "out").exists()


def test_image_number_beyond_its_stack_is_the_only_stderr_line(sub40, capsys):
    """The progress line `reconstruct: 40 particles, box 64 ...` came before the error, two stderr lines (progress
    is on stdout now, as relion_reconstruct's)."""
    names = [f"{i + 1:06d}@sub40.mrcs" for i in range(40)]
    names[5] = "000041@sub40.mrcs"
    bad = _edited_star(sub40, "bad41.star", rlnImageName=names)
    err = _one_error(capsys, ["--i", bad, "--o", sub40.parent / "rec.mrc"])
    assert "sub40.mrcs: image 41 requested but the stack has only 40 images" in err
    assert not (sub40.parent / "rec.mrc").exists()


def test_gridding_with_fewer_than_one_iteration_is_refused(sub40, capsys):
    """--dont_skip_gridding --iter 0 (or negative) silently did no gridding."""
    for n in ("0", "-3"):
        err = _one_error(capsys, ["--i", sub40, "--o", sub40.parent / "rec.mrc", "--dont_skip_gridding", "--iter", n])
        assert f"--iter: must be at least 1 with --dont_skip_gridding (got {n})" in err
    assert not (sub40.parent / "rec.mrc").exists()


def test_an_empty_selection_names_the_option_that_emptied_it(sub40, capsys):
    """--class / --subset selecting nothing said only 'no particles selected'; a warning about the file (origins in
    pixels) waits until the checks have passed, so the error is still the only line."""
    from cryorefine.io.star import read_particles, write_particles
    out = ["--o", sub40.parent / "rec.mrc"]
    err = _one_error(capsys, ["--i", sub40, "--class", "5", *out])
    assert "--class 5: no particle of" in err and "sub40.star has rlnClassNumber 5" in err
    half2 = _edited_star(sub40, "half2.star", rlnRandomSubset=2)
    assert "--subset 1: no particle of" in _one_error(capsys, ["--i", half2, "--subset", "1", *out])
    classes = _edited_star(sub40, "classes.star", rlnClassNumber=[1 + i % 2 for i in range(40)],
                           rlnRandomSubset=[1 + (i >= 20) for i in range(40)])
    table = read_particles(classes)
    table.particles = table.particles.loc[~((table.particles["rlnClassNumber"] == 2)
                                            & (table.particles["rlnRandomSubset"] == 1))]
    write_particles(classes, table)
    err = _one_error(capsys, ["--i", classes, "--subset", "1", "--class", "2", *out])
    assert "--class 2: no particle of" in err and "with rlnClassNumber 2 is in --subset 1" in err
    table = read_particles(sub40)
    assert not table.notes
    parts = table.particles
    parts["rlnOriginX"] = parts.pop("rlnOriginXAngst") / 2.5       # a WARNING about pixel origins
    parts["rlnOriginY"] = parts.pop("rlnOriginYAngst") / 2.5
    write_particles(sub40.with_name("px.star"), table)
    assert "--class 5: " in _one_error(capsys, ["--i", sub40.with_name("px.star"), "--class", "5", *out])
    assert not (sub40.parent / "rec.mrc").exists()


def test_output_naming_a_folder_is_refused(sub40, capsys):
    """--o newdir/ (no such folder) wrote a map FILE called newdir."""
    for o in ("newdir/", "newdir/.", "."):
        err = _one_error(capsys, ["--i", sub40, "--o", f"{sub40.parent}/{o}" if o != "." else o])
        assert "names a folder, not a map file; give a file name such as" in err, err
    assert not (sub40.parent / "newdir").exists()
