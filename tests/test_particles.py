"""Lazy particle image access across stacks, with names resolved like RELION's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cryorefine.errors import InputError
from cryorefine.io.mrc import read_map, write_stack
from cryorefine.io.particles import ParticleImages
from cryorefine.io.star import read_particles, write_particles


@pytest.fixture()
def small_images(small_set):
    data, _ = read_map(small_set / "particles.mrcs")
    return data


def test_read_matches_stack(small_set, small_images):
    table = read_particles(small_set / "particles.star")
    images = ParticleImages(table)
    assert images.nr_particles == 1000
    np.testing.assert_array_equal(images.box, 64)
    rows = np.array([999, 0, 17, 17, 500])
    got = images.read(rows)
    assert got.dtype == np.float32 and got.shape == (5, 64, 64)
    np.testing.assert_array_equal(got, small_images[rows])


def _split_set(small_set, small_images, tmp_path, n=60):
    """Particles 0..n-1 split over Stacks/a.mrcs and Stacks/b.mrcs, names relative to the STAR's folder."""
    (tmp_path / "Stacks").mkdir()
    write_stack(tmp_path / "Stacks" / "a.mrcs", small_images[:25], 2.5)
    write_stack(tmp_path / "Stacks" / "b.mrcs", small_images[25:n], 2.5)
    table = read_particles(small_set / "particles.star")
    table.particles = table.particles.iloc[:n].reset_index(drop=True)
    table.particles["rlnImageName"] = [f"{i + 1:06d}@Stacks/a.mrcs" if i < 25 else f"{i - 24:06d}@Stacks/b.mrcs"
                                       for i in range(n)]
    write_particles(tmp_path / "split.star", table)
    return tmp_path / "split.star"


def test_two_stacks_relative_to_star_dir(small_set, small_images, tmp_path, monkeypatch):
    path = _split_set(small_set, small_images, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    images = ParticleImages(read_particles(path), max_open=1)
    rows = np.array([30, 2, 59, 24, 25, 3])
    np.testing.assert_array_equal(images.read(rows), small_images[rows])
    assert images.stack_path(30).name == "b.mrcs"
    # lazy: nothing was read before .read, each stack then mapped once (LRU of one keeps the last)
    assert len(images._maps) == 1
    np.testing.assert_array_equal(images.read(np.arange(60)), small_images[:60])


def test_index_beyond_stack(small_set, small_images, tmp_path):
    path = _split_set(small_set, small_images, tmp_path)
    table = read_particles(path)
    table.particles.loc[3, "rlnImageName"] = "000026@Stacks/a.mrcs"
    images = ParticleImages(table)
    images.read([0, 1])
    with pytest.raises(InputError, match=r"a.mrcs: image 26 requested but the stack has only 25"):
        images.read([2, 3])


def test_nan_image(small_images, small_set, tmp_path):
    bad = small_images[:4].copy()
    bad[2, 10, 10] = np.nan
    write_stack(tmp_path / "n.mrcs", bad, 2.5)
    table = read_particles(small_set / "particles.star")
    table.particles = table.particles.iloc[:4].reset_index(drop=True)
    table.particles["rlnImageName"] = [f"{i + 1:06d}@{tmp_path / 'n.mrcs'}" for i in range(4)]
    images = ParticleImages(table)
    np.testing.assert_array_equal(images.read([0, 1, 3]), small_images[[0, 1, 3]])
    with pytest.raises(InputError, match=r"n.mrcs: image 3 contains NaN"):
        images.read([1, 2])


def test_box_mismatch_and_missing_stack(small_images, small_set, tmp_path):
    write_stack(tmp_path / "big.mrcs", np.zeros((2, 66, 66), np.float32), 2.5)
    table = read_particles(small_set / "particles.star")
    table.particles = table.particles.iloc[:2].reset_index(drop=True)
    table.particles["rlnImageName"] = [f"{i + 1:06d}@{tmp_path / 'big.mrcs'}" for i in range(2)]
    with pytest.raises(InputError, match=r"big.mrcs: image size 66 does not match rlnImageSize \[64\]"):
        ParticleImages(table).read([0])
    table.particles["rlnImageName"] = ["000001@nowhere/x.mrcs", "000002@nowhere/x.mrcs"]
    with pytest.raises(InputError, match=r"nowhere/x.mrcs not found"):
        ParticleImages(table)


def test_project_relative_names_read_from_another_folder(small_set, small_images, tmp_path, monkeypatch):
    """RELION names stacks from the project folder (Extract/job018/Movies/x.mrcs in Extract/job018/particles.star):
    read from the project folder, or from anywhere else through the STAR file's parents; a missing stack names
    where it was looked for."""
    job = tmp_path / "proj" / "Extract" / "job018"
    (job / "Movies").mkdir(parents=True)
    write_stack(job / "Movies" / "x.mrcs", small_images[:3], 2.5)
    table = read_particles(small_set / "particles.star")
    table.particles = table.particles.iloc[:3].reset_index(drop=True)
    table.particles["rlnImageName"] = [f"{k:06d}@Extract/job018/Movies/x.mrcs" for k in (1, 2, 3)]
    write_particles(job / "particles.star", table)
    for cwd in (tmp_path / "proj", tmp_path):
        monkeypatch.chdir(cwd)
        images = ParticleImages(read_particles(job / "particles.star"))
        np.testing.assert_array_equal(images.read(np.array([2, 0])), small_images[[2, 0]])
    (job / "Movies" / "x.mrcs").unlink()
    with pytest.raises(InputError, match="Extract/job018/Movies/x.mrcs not found .* and its parents"):
        ParticleImages(read_particles(job / "particles.star"))


def test_header_pixel_size_that_differs_from_the_star_file(small_set, tmp_path):
    """The STAR file's pixel size is used (as RELION); a stack header that says otherwise is named, once a group."""
    table = read_particles(small_set / "particles.star")
    table.particles["rlnImageName"] = [f"{s.split('@')[0]}@{Path(s.split('@')[1]).resolve()}"
                                       for s in table.particles["rlnImageName"]]
    assert ParticleImages(table).header_pixel_mismatches() == []
    table.optics["rlnImagePixelSize"] = 3.0
    lines = ParticleImages(table).header_pixel_mismatches()
    assert len(lines) == 1 and "rlnImagePixelSize 3 A" in lines[0] and "2.5 A in the header of" in lines[0]
