"""STAR reading/writing, particle tables, RELION 3.0 upgrade and optics groups."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cryorefine.errors import InputError
from cryorefine.io.star import (ParticleTable, merge_particles, particle_optics, read_particles, read_star,
                                write_particles, write_star)


def _assert_same_table(a: pd.DataFrame, b: pd.DataFrame) -> None:
    """Same columns in the same order and the same values (exactly: 6-decimal text round-trips)."""
    assert list(a.columns) == list(b.columns)
    assert len(a) == len(b)
    for col in a.columns:
        x, y = a[col].to_numpy(), b[col].to_numpy()
        if pd.api.types.is_numeric_dtype(a[col].dtype):
            assert pd.api.types.is_numeric_dtype(b[col].dtype), col
            np.testing.assert_array_equal(x.astype(np.float64), y.astype(np.float64), err_msg=col)
        else:
            assert [str(v) for v in x] == [str(v) for v in y], col


@pytest.mark.parametrize("name", ["particles.star", "truth.star"])
def test_round_trip_keeps_every_column_and_value(small_set, tmp_path, name):
    src = small_set / name
    blocks = read_star(src)
    assert list(blocks) == ["optics", "particles"]
    assert len(blocks["particles"]) == 1000
    write_star(tmp_path / name, blocks)
    again = read_star(tmp_path / name)
    for key in blocks:
        _assert_same_table(blocks[key], again[key])
    # and the values equal the text of the original file (first particle row, column by column)
    lines = [ln for ln in src.read_text().splitlines() if "@particles.mrcs" in ln]
    first = lines[0].split()
    row = again["particles"].iloc[0]
    for col, text in zip(again["particles"].columns, first):
        v = row[col]
        assert (str(v) == text) if isinstance(v, str) else float(v) == pytest.approx(float(text), abs=5e-7)


def test_particles_round_trip(small_set, tmp_path):
    table = read_particles(small_set / "truth.star")
    assert table.nr_particles == 1000
    assert table.version == "30001"
    write_particles(tmp_path / "p.star", table)
    text = (tmp_path / "p.star").read_text()
    assert "# version 50001" in text and "data_optics" in text and "data_particles" in text
    again = read_particles(tmp_path / "p.star")
    _assert_same_table(table.particles, again.particles)
    _assert_same_table(table.optics, again.optics)


def test_image_names_are_written_to_open_from_the_current_folder(small_set, tmp_path, monkeypatch):
    """A STAR file whose names open only from its own folder (read from elsewhere): the table names its images as
    RELION, cryoDRGN and cryoSPARC open them, from the current folder (relative below it, else absolute), so a
    refinement's _data.star written from it names images that exist; names that open as they are stay."""
    project = tmp_path / "project"
    (project / "Extract").mkdir(parents=True)
    for name in ("particles.star", "particles.mrcs"):
        (project / "Extract" / name).write_bytes((small_set / name).read_bytes())
    monkeypatch.chdir(project)
    below = read_particles(project / "Extract" / "particles.star")
    assert below.particles["rlnImageName"].iloc[3] == "000004@Extract/particles.mrcs"
    monkeypatch.chdir(tmp_path / "project" / "Extract")
    assert read_particles("particles.star").particles["rlnImageName"].iloc[3] == "000004@particles.mrcs"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    above = read_particles(project / "Extract" / "particles.star")
    name = above.particles["rlnImageName"].iloc[3]
    assert name == f"000004@{(project / 'Extract' / 'particles.mrcs').resolve()}"
    write_particles(elsewhere / "run_data.star", above)
    again = read_particles(elsewhere / "run_data.star")
    assert again.particles["rlnImageName"].iloc[3] == name and Path(name.split("@")[1]).is_file()


def test_list_blocks_quotes_and_number_format(tmp_path):
    blocks = {
        "general": {"rlnCurrentResolution": 4.24, "rlnCurrentIteration": 7, "rlnMaskName": "my mask.mrc",
                    "rlnEmpty": "", "rlnTiny": 2.5e-5},
        "table": pd.DataFrame({"rlnSpectralIndex": [0, 1], "rlnSsnrMap": [999.0, 1.5e7],
                               "rlnNote": ["a b", ""], "rlnNeg": [-0.0000004, -1.25]}),
    }
    path = tmp_path / "x.star"
    write_star(path, blocks)
    text = path.read_text()
    assert '"my mask.mrc"' in text and '""' in text
    assert "4.240000" in text and "2.500000e-05" in text and "1.500000e+07" in text
    assert "-4.000000e-07" in text and "-1.250000" in text
    back = read_star(path)
    assert back["general"] == {"rlnCurrentResolution": 4.24, "rlnCurrentIteration": 7,
                               "rlnMaskName": "my mask.mrc", "rlnEmpty": "", "rlnTiny": 2.5e-5}
    assert list(back["table"]["rlnNote"]) == ["a b", ""]
    np.testing.assert_array_equal(back["table"]["rlnSsnrMap"], [999.0, 1.5e7])
    assert back["table"]["rlnSpectralIndex"].dtype.kind == "i"


def test_write_is_atomic(tmp_path):
    with pytest.raises(Exception):
        write_star(tmp_path / "bad.star", {"x": object()})
    assert list(tmp_path.iterdir()) == []


def _legacy_file(small_set: Path, tmp_path: Path, det_um: np.ndarray, mag: float, rows: int = 200) -> Path:
    """A RELION 3.0 version of truth.star: no optics table, CTF optics per particle, origins in pixels."""
    table = read_particles(small_set / "truth.star")
    p = table.particles.iloc[:rows].copy()
    angpix = 1e4 * det_um / mag
    p["rlnOriginX"] = p.pop("rlnOriginXAngst") / angpix
    p["rlnOriginY"] = p.pop("rlnOriginYAngst") / angpix
    p = p.drop(columns=["rlnOpticsGroup"])
    p["rlnVoltage"] = 300.0
    p["rlnSphericalAberration"] = 2.7
    p["rlnAmplitudeContrast"] = 0.1
    p["rlnMagnification"] = mag
    p["rlnDetectorPixelSize"] = det_um
    # image names relative to the STAR file's folder
    os.symlink(small_set / "particles.mrcs", tmp_path / "particles.mrcs")
    path = tmp_path / "old.star"
    write_star(path, {"": p})
    return path


def test_relion30_file_is_upgraded(small_set, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path.parent)  # names resolve relative to the STAR file, not the cwd
    truth = read_particles(small_set / "truth.star").particles.iloc[:200]
    det = np.where(np.arange(200) < 120, 5.0, 5.5)  # two detector pixel sizes -> two optics groups
    path = _legacy_file(small_set, tmp_path, det, mag=20000.0)
    assert "data_optics" not in path.read_text() and "rlnOriginX " in path.read_text().replace("#", " ")
    table = read_particles(path)
    assert table.version == "3.0"
    assert len(table.optics) == 2
    pix = particle_optics(table, "rlnImagePixelSize")
    np.testing.assert_allclose(pix, 1e4 * det / 20000.0)
    np.testing.assert_array_equal(particle_optics(table, "rlnImageSize"), 64)
    np.testing.assert_allclose(particle_optics(table, "rlnVoltage"), 300.0)
    np.testing.assert_allclose(particle_optics(table, "rlnSphericalAberration"), 2.7)
    np.testing.assert_allclose(particle_optics(table, "rlnAmplitudeContrast"), 0.1)
    # pixel origins -> Å with each particle's own pixel size (written to 6 decimals in pixels)
    np.testing.assert_allclose(table.particles["rlnOriginXAngst"], truth["rlnOriginXAngst"], atol=5e-6)
    np.testing.assert_allclose(table.particles["rlnOriginYAngst"], truth["rlnOriginYAngst"], atol=5e-6)
    for gone in ("rlnOriginX", "rlnOriginY", "rlnMagnification", "rlnDetectorPixelSize", "rlnVoltage"):
        assert gone not in table.particles.columns
    np.testing.assert_array_equal(table.particles["rlnAngleRot"], truth["rlnAngleRot"])
    # and written back in 3.1 layout
    write_particles(tmp_path / "new.star", table)
    again = read_particles(tmp_path / "new.star")
    np.testing.assert_allclose(particle_optics(again, "rlnImagePixelSize"), pix)


def test_relion30_beam_tilt_and_a_table_named_particles(small_set, tmp_path):
    """RELION 3.0 beam tilt per particle becomes optics-group columns (groups split by tilt, star_converter.cpp), and
    a 3.0 table named data_particles without data_optics is converted too (ObservationModel::loadSafely)."""
    path = _legacy_file(small_set, tmp_path, np.full(200, 5.0), mag=20000.0)
    blocks = read_star(path)
    p = blocks[""]
    p["rlnBeamTiltX"] = np.where(np.arange(200) < 50, 0.3, 0.0)
    p["rlnBeamTiltY"] = -0.2
    write_star(tmp_path / "tilt.star", {"particles": p})
    table = read_particles(tmp_path / "tilt.star")
    assert table.version == "3.0" and len(table.optics) == 2
    np.testing.assert_allclose(particle_optics(table, "rlnBeamTiltX"), np.where(np.arange(200) < 50, 0.3, 0.0))
    np.testing.assert_allclose(particle_optics(table, "rlnBeamTiltY"), -0.2)
    assert "rlnBeamTiltX" not in table.particles.columns


def test_optics_as_a_key_value_list_and_a_repeated_block(tmp_path):
    """One optics group written as a list (RELION reads lists for any table); a second block of the same name is an
    error naming the line, not the last one silently taken."""
    particles = "data_particles\nloop_\n_rlnImageName\n_rlnOpticsGroup\n1@a.mrcs 1\n2@a.mrcs 1\n"
    listed = _write_text(tmp_path / "list.star", "data_optics\n_rlnOpticsGroup 1\n_rlnImagePixelSize 2.5\n"
                                                 "_rlnImageSize 64\n_rlnOpticsGroupName opticsGroup1\n" + particles)
    table = read_particles(listed)
    np.testing.assert_allclose(particle_optics(table, "rlnImagePixelSize"), 2.5)
    assert table.nr_particles == 2
    twice = _write_text(tmp_path / "twice.star", OPTICS.format(angpix=2.5) + particles + particles)
    with pytest.raises(InputError, match=r"twice.star: line 14: a second data_particles block"):
        read_particles(twice)
    # a second loop_ in one block: RELION reads the first, an earlier reader here the last; neither says so
    two_loops = _write_text(tmp_path / "loops.star", OPTICS.format(angpix=2.5) + particles
                            + "loop_\n_rlnImageName\n_rlnOpticsGroup\n3@a.mrcs 1\n")
    with pytest.raises(InputError, match=r"loops.star: line 14: a second loop_ in data_particles"):
        read_particles(two_loops)


def test_names_that_look_like_numbers_stay_text(tmp_path):
    """RELION's string labels keep their text ("01" is not the group 1, "1e3" not 1000), quoted or not, in loops
    and lists; other columns are still numbers."""
    text = ("data_optics\nloop_\n_rlnOpticsGroup\n_rlnOpticsGroupName\n_rlnImagePixelSize\n1 \"01\" 2.5\n"
            + "data_particles\nloop_\n_rlnImageName\n_rlnOpticsGroup\n_rlnGroupName\n_rlnMicrographName\n"
              "1@a.mrcs 1 1e3 00001\n2@a.mrcs 1 01 00002\n")
    for name, body in (("plain.star", text), ("tokens.star", text.replace("00002", "'00002'"))):
        blocks = read_star(_write_text(tmp_path / name, body))
        p = blocks["particles"]
        assert list(p["rlnGroupName"]) == ["1e3", "01"] and list(p["rlnMicrographName"]) == ["00001", "00002"]
        assert str(blocks["optics"]["rlnOpticsGroupName"].iloc[0]) == "01"
        assert p["rlnOpticsGroup"].dtype.kind == "i"
    listed = read_star(_write_text(tmp_path / "list.star", "data_general\n_rlnOutputRootName 007\n"
                                                            "_rlnCurrentIteration 007\n"))["general"]
    assert listed == {"rlnOutputRootName": "007", "rlnCurrentIteration": 7}


def test_relion30_with_angpix_option(small_set, tmp_path):
    path = _legacy_file(small_set, tmp_path, np.full(200, 5.0), mag=20000.0)
    table = read_particles(path, angpix=2.5)
    assert len(table.optics) == 1
    np.testing.assert_allclose(particle_optics(table, "rlnImagePixelSize"), 2.5)


def test_two_optics_groups_with_different_pixel_sizes(small_set, tmp_path):
    a = read_particles(small_set / "truth.star")
    b = read_particles(small_set / "truth.star")
    b.optics["rlnImagePixelSize"] = 1.25
    b.optics["rlnImageSize"] = 128
    b.particles = b.particles.iloc[:300].reset_index(drop=True)
    merged = merge_particles([a, b])
    assert list(merged.optics["rlnOpticsGroup"]) == [1, 2]
    assert merged.optics["rlnOpticsGroupName"].nunique() == 2
    assert merged.nr_particles == 1300
    pix = particle_optics(merged, "rlnImagePixelSize")
    np.testing.assert_array_equal(pix, np.r_[np.full(1000, 2.5), np.full(300, 1.25)])
    np.testing.assert_array_equal(particle_optics(merged, "rlnImageSize"), np.r_[np.full(1000, 64), np.full(300, 128)])
    # a file with the two groups interleaved and the groups listed in reverse order
    merged.particles = merged.particles.sample(frac=1.0, random_state=1).reset_index(drop=True)
    merged.optics = merged.optics.iloc[::-1].reset_index(drop=True)
    write_particles(tmp_path / "two.star", merged)
    back = read_particles(tmp_path / "two.star")
    expect = np.where(back.particles["rlnOpticsGroup"].to_numpy() == 1, 2.5, 1.25)
    np.testing.assert_array_equal(particle_optics(back, "rlnImagePixelSize"), expect)
    assert list(back.particles.columns) == list(merged.particles.columns)


def _write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


OPTICS = """
data_optics
loop_
_rlnOpticsGroup
_rlnImagePixelSize
_rlnImageSize
1 {angpix} 64
"""


@pytest.mark.parametrize("body, problem", [
    (OPTICS.format(angpix=2.5), "no data_particles"),
    (OPTICS.format(angpix=2.5) + "data_particles\nloop_\n_rlnOpticsGroup\n_rlnDefocusU\n1 10000\n", "rlnImageName"),
    (OPTICS.format(angpix=2.5) + "data_particles\nloop_\n_rlnImageName\n_rlnOpticsGroup\n", "empty"),
    (OPTICS.format(angpix=0.0) + "data_particles\nloop_\n_rlnImageName\n_rlnOpticsGroup\n1@a.mrcs 1\n",
     "rlnImagePixelSize must be > 0"),
    (OPTICS.format(angpix=2.5) + "data_particles\nloop_\n_rlnImageName\n_rlnOpticsGroup\n1@a.mrcs 2\n",
     "optics group 2"),
    (OPTICS.format(angpix=2.5) + "data_particles\nloop_\n_rlnImageName\n_rlnOpticsGroup\n1@a.mrcs\n", "fewer"),
    ("data_\nloop_\n_rlnImageName\n_rlnDefocusU\n1@a.mrcs 10000\n", "pixel size"),
    (OPTICS.format(angpix=2.5) + "data_particles\nloop_\n_rlnImageName\n_rlnOpticsGroup\n1@a.mrcs 1\n"
     "2@a.mrcs 1 7\n", "loop row 2 (line 13) does not have 2 values"),
    ("data_optics\nloop_\n_rlnOpticsGroup\n_rlnImagePixelSize\ndata_particles\nloop_\n_rlnImageName\n"
     "_rlnOpticsGroup\n1@a.mrcs 1\n", "data_optics is empty"),
])
def test_bad_particle_files(tmp_path, body, problem):
    path = _write_text(tmp_path / "bad.star", body)
    with pytest.raises(InputError) as err:
        read_particles(path)
    assert str(path) in str(err.value) and problem in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_star(tmp_path / "nothing.star")


def test_particle_table_fields(small_set):
    t = read_particles(small_set / "particles.star")
    assert isinstance(t, ParticleTable)
    assert t.path == small_set / "particles.star"
    assert list(t.particles.columns)[:3] == ["rlnImageName", "rlnMicrographName", "rlnOpticsGroup"]
    assert list(t.optics.columns)[0] == "rlnOpticsGroupName"
    assert t.directory == small_set.resolve()


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16"])
def test_byte_order_mark_and_utf16(tmp_path, encoding):
    """A file saved by a Windows editor (UTF-8 with a BOM, or UTF-16) was 'content before any data_ block'."""
    text = OPTICS.format(angpix=2.5) + "data_particles\nloop_\n_rlnImageName\n_rlnOpticsGroup\n1@a.mrcs 1\n"
    path = tmp_path / "bom.star"
    path.write_bytes(text.encode(encoding))
    table = read_particles(path)
    assert table.nr_particles == 1 and list(table.optics["rlnImagePixelSize"]) == [2.5]
