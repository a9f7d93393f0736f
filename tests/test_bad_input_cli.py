"""Bad input and faults through the command line (issue 15): one error line naming the file, row and label,
exit code 2, inputs unchanged (checksums), and no output left but the log."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest

from cryorefine.cli import main
from cryorefine.io.mrc import read_map, write_map
from cryorefine.io.star import read_particles, read_star, write_particles, write_star

ROOT = Path(__file__).resolve().parent.parent


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def error_of(capsys, argv: list[str]) -> tuple[int, str]:
    """Exit code and the single stderr line of a CLI run (asserting there is exactly one line, no traceback)."""
    capsys.readouterr()
    rc = main(argv)
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len([l for l in err if "error:" in l]) == 1 and "error:" in err[-1], err
    assert not any("Traceback" in l for l in err)
    return rc, err[-1]


@pytest.fixture()
def sub(small_set, tmp_path) -> Path:
    """A 40-particle copy of the small set's truth.star (poses, CTF, halves) with absolute image paths."""
    t = read_particles(small_set / "truth.star")
    p = t.particles.head(40).copy()
    p["rlnImageName"] = [f"{s.split('@')[0]}@{Path(s.split('@')[1]).resolve()}" for s in p["rlnImageName"]]
    dest = tmp_path / "in" / "parts.star"
    dest.parent.mkdir()
    write_particles(dest, replace(t, particles=p.reset_index(drop=True)))
    return dest


def edited(star: Path, block: str, label: str, row: int, value) -> Path:
    """A copy of `star` with one value changed (row -1: every row)."""
    t = read_particles(star)
    df = t.optics if block == "optics" else t.particles
    df[label] = df[label].astype(object)
    if row < 0:
        df[label] = value
    else:
        df.loc[row, label] = value
    out = star.with_name(f"{star.stem}_{label}_{row}.star")
    write_particles(out, t)
    return out


def refine_argv(star: Path, ref: Path, out: Path, *extra: str) -> list[str]:
    return ["refine", "--i", str(star), "--ref", str(ref), "--o", str(out), "--sym", "D2", "--ini_high", "50",
            "--particle_diameter", "150", "--auto_iter_max", "1", "--quiet", *extra]


def assert_only_log(folder: Path, log: str | None = "run.out") -> None:
    left = files_under(folder) if folder.exists() else set()
    assert left <= ({log} if log else set()), left


# ------------------------------------------------------------------------------------------------ overwriting inputs


def test_reconstruct_output_naming_its_input_star(sub, capsys):
    before = sha(sub)
    rc, err = error_of(capsys, ["reconstruct", "--i", str(sub), "--o", str(sub), "--ctf"])
    assert rc == 2 and "would overwrite the input" in err and str(sub) in err
    assert sha(sub) == before


def test_image_handler_output_stack_naming_an_input_stack(small_set, tmp_path, capsys):
    """STAR input naming x.mrcs, --o x.star: the output stack x.mrcs would be the input stack."""
    folder = tmp_path / "ih"
    folder.mkdir()
    shutil.copy(small_set / "particles.mrcs", folder / "x.mrcs")
    t = read_particles(small_set / "particles.star")
    p = t.particles.head(5).copy()
    p["rlnImageName"] = [f"{i + 1:06d}@x.mrcs" for i in range(5)]
    star = folder / "in.star"
    write_particles(star, replace(t, particles=p))
    sums = {f: sha(folder / f) for f in ("x.mrcs", "in.star")}
    rc, err = error_of(capsys, ["image-handler", "--i", str(star), "--o", str(folder / "x.star"),
                                "--rescale_angpix", "5"])
    assert rc == 2 and "x.mrcs" in err and "would overwrite the input" in err
    assert {f: sha(folder / f) for f in sums} == sums and files_under(folder) == set(sums)


def test_postprocess_output_root_equal_to_a_half_map(small_set, tmp_path, capsys):
    h1, h2 = tmp_path / "run_half1_class001_unfil.mrc", tmp_path / "run_half2_class001_unfil.mrc"
    shutil.copy(small_set / "reference.mrc", h1)
    shutil.copy(small_set / "reference.mrc", h2)
    before = sha(h1)
    rc, err = error_of(capsys, ["postprocess", "--i", str(h1), "--o", str(h1)[:-4]])
    assert rc == 2 and "would overwrite the input" in err and h1.name in err
    assert sha(h1) == before and files_under(tmp_path) == {h1.name, h2.name}


def test_postprocess_half_map_twice_or_a_folder_as_root(small_set, tmp_path, capsys):
    """--i2 naming --i's map gave FSC 1 and a Nyquist "resolution" with exit 0; --o a folder wrote hidden files
    (.mrc, .star) in it."""
    h1 = tmp_path / "run_half1_class001_unfil.mrc"
    shutil.copy(small_set / "reference.mrc", h1)
    (tmp_path / "link.mrc").symlink_to(h1)
    for other in (h1, tmp_path / "link.mrc"):
        rc, err = error_of(capsys, ["postprocess", "--i", str(h1), "--i2", str(other), "--o", str(tmp_path / "pp")])
        assert rc == 2 and "is the same map as --i" in err, err
    for root in (f"{tmp_path}/out/", str(tmp_path)):
        rc, err = error_of(capsys, ["postprocess", "--i", str(h1), "--o", root])
        assert rc == 2 and "is a folder; an output root" in err, err
    assert files_under(tmp_path) == {h1.name, "link.mrc"}


@pytest.mark.parametrize("command", ["image-handler", "mask-create"])
def test_output_name_ending_in_a_separator(small_set, tmp_path, capsys, command):
    """--o newdir/ wrote a map file called newdir."""
    extra = ["--lowpass", "20"] if command == "image-handler" else []
    rc, err = error_of(capsys, [command, "--i", str(small_set / "reference.mrc"), *extra, "--o", f"{tmp_path}/new/"])
    assert rc == 2 and "names a folder, not a file; give a file name" in err, err
    assert not (tmp_path / "new").exists()


def test_extract_into_the_folder_of_the_reextraction_star(mics_set, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = tmp_path / "Refine3D" / "job019"
    job.mkdir(parents=True)
    star = job / "particles.star"
    shutil.copy(mics_set / "particles_mic_refined.star", star)
    before = sha(star)
    rc, err = error_of(capsys, ["extract", "--i", str(mics_set / "micrographs_ctf.star"), "--reextract_data_star",
                                str(star), "--recenter", "--extract_size", "128", "--o", str(job), "--no_progress"])
    assert rc == 2 and "would overwrite the input" in err and "particles.star" in err
    assert sha(star) == before and files_under(job) == {"particles.star"}


def test_refine_output_root_that_would_overwrite_the_particles(sub, small_set, capsys):
    """--i <dir>/run_data.star with --o <dir>/run: the final run_data.star would replace the input."""
    star = sub.with_name("run_data.star")
    shutil.copy(sub, star)
    before = sha(star)
    rc, err = error_of(capsys, refine_argv(star, small_set / "reference.mrc", sub.parent / "run"))
    assert rc == 2 and "would overwrite the input" in err and "run_data.star" in err
    assert sha(star) == before
    assert files_under(sub.parent) == {"parts.star", "run_data.star", "run.out"}
    assert (sub.parent / "run.out").read_text().splitlines()[-1] == err


# ------------------------------------------------------------------------------------------------ no tracebacks


def _output_commands(sub: Path, small_set: Path, target: Path, mics_set: Path) -> dict[str, list[str]]:
    """One command per sub-command, each writing under `target`."""
    ref = str(small_set / "reference.mrc")
    return {
        "reconstruct": ["reconstruct", "--i", str(sub), "--o", str(target / "out.mrc")],
        "refine": refine_argv(sub, small_set / "reference.mrc", target / "run"),
        "image-handler": ["image-handler", "--i", ref, "--o", str(target / "x.mrc"), "--lowpass", "20"],
        "postprocess": ["postprocess", "--i", str(sub.parent / "run_half1_class001_unfil.mrc"),
                        "--o", str(target / "postprocess")],
        "extract": ["extract", "--i", str(mics_set / "micrographs_ctf.star"), "--coord_list",
                    str(mics_set / "coordinates.star"), "--extract_size", "64", "--o", str(target), "--no_progress"],
    }


@pytest.mark.parametrize("command", ["reconstruct", "refine", "image-handler", "postprocess", "extract"])
def test_output_parent_is_a_file(sub, small_set, mics_set, tmp_path, capsys, command):
    for h in (1, 2):
        shutil.copy(small_set / "reference.mrc", sub.parent / f"run_half{h}_class001_unfil.mrc")
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    rc, err = error_of(capsys, _output_commands(sub, small_set, blocker / "sub", mics_set)[command])
    assert rc == 2 and "is a file, not a folder" in err and blocker.read_text() == "x"


@pytest.mark.parametrize("command", ["reconstruct", "refine", "image-handler", "postprocess", "extract"])
def test_read_only_output_folder(sub, small_set, mics_set, tmp_path, capsys, monkeypatch, command):
    """A folder the user cannot write to (simulated: the tests may run as root, who can write anywhere)."""
    for h in (1, 2):
        shutil.copy(small_set / "reference.mrc", sub.parent / f"run_half{h}_class001_unfil.mrc")
    ro = tmp_path / "ro"
    ro.mkdir()
    import cryorefine.validate as validate
    real = os.access
    monkeypatch.setattr(validate.os, "access", lambda p, mode: False if Path(p) == ro else real(p, mode))
    rc, err = error_of(capsys, _output_commands(sub, small_set, ro / "job", mics_set)[command])
    assert rc == 2 and "not writable" in err and not any(ro.iterdir())


@pytest.mark.parametrize("block, label, value, command", [
    ("optics", "rlnVoltage", "abc", "reconstruct"),
    ("particles", "rlnDefocusU", "12x00", "reconstruct"),
    ("optics", "rlnSphericalAberration", "two", "refine"),
    ("particles", "rlnAnglePsi", "north", "refine"),
])
def test_text_in_a_numeric_star_column(sub, small_set, tmp_path, capsys, block, label, value, command):
    bad = edited(sub, block, label, 0 if block == "optics" else 7, value)
    before = sha(bad)
    out = tmp_path / "out"
    argv = (["reconstruct", "--i", str(bad), "--o", str(out / "rec.mrc"), "--ctf"] if command == "reconstruct"
            else refine_argv(bad, small_set / "reference.mrc", out / "run"))
    rc, err = error_of(capsys, argv)
    assert rc == 2 and label in err and repr(value) in err and "is not a number" in err and bad.name in err
    assert ("row 8" in err) if block == "particles" else ("data_optics" in err)
    assert sha(bad) == before
    assert_only_log(out, "run.out" if command == "refine" else None)


def test_random_seed_minus_one_is_relions_clock_seed(sub, small_set, tmp_path):
    """RELION's default --random_seed -1 (seed from the clock) was a traceback when the file had no half sets; now
    the seed is drawn, logged and written to the optimiser, so that --continue and a rerun repeat it."""
    t = read_particles(sub)
    star = tmp_path / "nohalves.star"
    write_particles(star, replace(t, particles=t.particles.drop(columns=["rlnRandomSubset"])))
    out = tmp_path / "R" / "run"
    assert main(refine_argv(star, small_set / "reference.mrc", out, "--random_seed", "-1", "--j", "1")) == 0
    line = next(ln for ln in Path(f"{out}.out").read_text().splitlines() if "from the clock" in ln)
    seed = int(line.split(": seed ")[1].split()[0])
    opt = read_star(f"{out}_it001_optimiser.star")["optimiser_general"]
    assert int(opt["rlnRandomSeed"]) == seed >= 0


def test_text_in_a_column_the_job_does_not_read(sub, tmp_path, capsys):
    """'None' (as converters write) in columns reconstruct never reads: RELION reads it as 0 and goes on, so does
    reconstruct; the same text in a column it reads stops it (test above)."""
    blocks = read_star(sub)
    blocks["particles"]["rlnCoordinateX"] = ["None"] + [100.0] * (len(blocks["particles"]) - 1)
    blocks["particles"]["rlnAutopickFigureOfMerit"] = "None"
    bad = tmp_path / "none.star"
    write_star(bad, blocks)
    assert main(["reconstruct", "--i", str(bad), "--o", str(tmp_path / "rec.mrc"), "--ctf"]) == 0
    assert (tmp_path / "rec.mrc").is_file()


def test_text_in_a_coordinate_file(mics_set, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    coords = read_star(mics_set / "Micrographs" / "mic_0001_pick.star")
    name = next(k for k, v in coords.items() if isinstance(v, pd.DataFrame))
    df = coords[name]
    df["rlnCoordinateX"] = df["rlnCoordinateX"].astype(object)
    df.loc[3, "rlnCoordinateX"] = "left"
    bad = tmp_path / "mic_0001_pick.star"
    write_star(bad, coords)
    lst = tmp_path / "coords.star"
    write_star(lst, {"coordinate_files": pd.DataFrame({"rlnMicrographName": ["Micrographs/mic_0001.mrc"],
                                                       "rlnMicrographCoordinates": [str(bad)]})})
    rc, err = error_of(capsys, ["extract", "--i", str(mics_set / "micrographs_ctf.star"), "--coord_list", str(lst),
                                "--extract_size", "64", "--o", "Extract/job001/", "--no_progress"])
    assert rc == 2 and "mic_0001_pick.star" in err and "row 4" in err and "rlnCoordinateX" in err
    assert not (tmp_path / "Extract").exists()


@pytest.mark.parametrize("option, value", [("--pool", "0"), ("--batch_size", "0"), ("--tau2_fudge", "0"),
                                           ("--adaptive_fraction", "1.5"), ("--auto_iter_max", "0"),
                                           ("--offset_step", "0"), ("--healpix_order", "9"), ("--pad", "0"),
                                           ("--particle_diameter", "nan"), ("--max_memory", "0"),
                                           ("--max_memory", "nan"), ("--fsc_sigma_criterion", "-1"),
                                           ("--fsc_sigma_criterion", "inf"), ("--gpu", "abc"), ("--gpu", "0;1"),
                                           ("--j", "0")])
def test_option_values_out_of_range(sub, small_set, tmp_path, capsys, option, value):
    rc, err = error_of(capsys, refine_argv(sub, small_set / "reference.mrc", tmp_path / "o" / "run", option, value))
    assert rc == 2 and option in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("where", ["out/", "out_dir", "."])
def test_refine_output_root_that_is_a_folder(sub, small_set, tmp_path, capsys, monkeypatch, where):
    """--o out/ (or an existing folder, or .) wrote hidden files `.out`, `_it001_...` into it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out_dir").mkdir()
    rc, err = error_of(capsys, refine_argv(sub, small_set / "reference.mrc", where))
    assert rc == 2 and "an output root such as Refine3D/job019/run is needed" in err
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith((".", "_"))]


def test_a_stack_file_as_reference(sub, small_set, tmp_path, capsys):
    """A .mrcs is a stack of 2D images to RELION (2D references); its 64 'images' were taken for a map."""
    ref = tmp_path / "ref.mrcs"
    shutil.copy(small_set / "reference.mrc", ref)
    rc, err = error_of(capsys, refine_argv(sub, ref, tmp_path / "o" / "run"))
    assert rc == 2 and "ref.mrcs: a cubic 3D map is needed for the reference, and a .mrcs file is a stack" in err
    # the same rule for every map input (the solvent mask and postprocess's half maps were read as maps)
    mask = tmp_path / "mask.mrcs"
    shutil.copy(small_set / "mask.mrc", mask)
    rc, err = error_of(capsys, [*refine_argv(sub, small_set / "reference.mrc", tmp_path / "p" / "run"),
                                "--solvent_mask", str(mask)])
    assert rc == 2 and "mask.mrcs: a cubic 3D map is needed for the solvent mask" in err, err
    half = tmp_path / "run_half1_class001_unfil.mrcs"
    shutil.copy(small_set / "reference.mrc", half)
    rc, err = error_of(capsys, ["postprocess", "--i", str(half), "--i2", str(ref), "--o", str(tmp_path / "pp")])
    assert rc == 2 and "a cubic 3D map is needed for the half map" in err, err


def test_a_folder_as_reference_or_mask(sub, small_set, tmp_path, capsys):
    (tmp_path / "m").mkdir()
    for option in ("--ref", "--solvent_mask"):
        argv = refine_argv(sub, small_set / "reference.mrc", tmp_path / "o" / "run")
        argv = argv[:argv.index("--ref")] + argv[argv.index("--ref") + 2:] + ["--ref", str(small_set / "reference.mrc")]
        argv += [option, str(tmp_path / "m")]
        rc, err = error_of(capsys, argv)
        assert rc == 2 and f"{tmp_path / 'm'}: is a folder, not a map ({option})" in err, err


# ------------------------------------------------------------------------------------------------ no silent success


@pytest.mark.parametrize("block, label, row, value, phrase", [
    ("optics", "rlnVoltage", 0, 0.0, "rlnVoltage = 0"),
    ("particles", "rlnDefocusU", 5, float("nan"), "rlnDefocusU = nan"),
    ("particles", "rlnAngleTilt", 9, float("nan"), "rlnAngleTilt = nan"),
    ("particles", "rlnOriginXAngst", 11, float("inf"), "rlnOriginXAngst = inf"),
    ("optics", "rlnAmplitudeContrast", 0, 1.5, "rlnAmplitudeContrast = 1.5"),
    # a zero CTF scale or an envelope that removes every frequency made maps of +-1e7 with exit 0
    ("particles", "rlnCtfScalefactor", 3, 0.0, "rlnCtfScalefactor = 0"),
    ("particles", "rlnCtfBfactor", 7, 1e6, "rlnCtfBfactor = 1000000.0"),
    # at 2.5 Å/px the floor is -2000 Å² (-320·p²): below it the envelope overflowed CTF² to a NaN map
    ("particles", "rlnCtfBfactor", 8, -2500.0, "rlnCtfBfactor = -2500 must be at least -2000"),
    # a shift is periodic: beyond the box (64 x 2.5 Å) the particle would be put elsewhere
    ("particles", "rlnOriginXAngst", 10, 1e9, "rlnOriginXAngst = 1e+09 must be within the image"),
])
def test_impossible_values_stop_reconstruct_and_refine(sub, small_set, tmp_path, capsys, block, label, row, value,
                                                       phrase):
    bad = edited(sub, block, label, row, value)
    before = sha(bad)
    rc, err = error_of(capsys, ["reconstruct", "--i", str(bad), "--o", str(tmp_path / "r" / "rec.mrc"), "--ctf"])
    assert rc == 2 and phrase in err and bad.name in err
    assert (f"row {row + 1} (" in err) if block == "particles" else ("optics group 1" in err)
    out = tmp_path / "f"
    rc, err2 = error_of(capsys, refine_argv(bad, small_set / "reference.mrc", out / "run"))
    assert rc == 2 and phrase in err2
    assert sha(bad) == before and not (tmp_path / "r").exists()
    assert_only_log(out)
    assert (out / "run.out").read_text().splitlines()[-1] == err2


def test_drop_bad_particles_is_opt_in_and_counted(sub, tmp_path, capsys):
    """reconstruct --drop_bad_particles leaves out the particles with impossible values and says how many."""
    bad = edited(edited(sub, "particles", "rlnAngleRot", 3, float("nan")), "particles", "rlnDefocusV", 8, -5.0)
    rc, err = error_of(capsys, ["reconstruct", "--i", str(bad), "--o", str(tmp_path / "x.mrc"), "--ctf"])
    assert rc == 2 and not (tmp_path / "x.mrc").exists()
    assert main(["reconstruct", "--i", str(bad), "--o", str(tmp_path / "x.mrc"), "--ctf", "--drop_bad_particles"]) == 0
    err = capsys.readouterr().err
    assert "left out 2 of 40 particles (rlnDefocusV: 1, rlnAngleRot: 1)" in err
    assert np.isfinite(read_map(tmp_path / "x.mrc")[0]).all()


def test_single_particle_and_empty_half_set(sub, small_set, tmp_path, capsys):
    t = read_particles(sub)
    one = sub.with_name("one.star")
    write_particles(one, replace(t, particles=t.particles.head(1)))
    rc, err = error_of(capsys, refine_argv(one, small_set / "reference.mrc", tmp_path / "a" / "run"))
    assert rc == 2 and "needs at least 2" in err
    half = edited(sub, "particles", "rlnRandomSubset", -1, 1)
    rc, err = error_of(capsys, refine_argv(half, small_set / "reference.mrc", tmp_path / "b" / "run"))
    assert rc == 2 and "half-set 2 has no particles" in err
    assert_only_log(tmp_path / "a") and assert_only_log(tmp_path / "b")


def test_two_runs_on_one_root_and_a_killed_runs_temporaries(sub, small_set, tmp_path, capsys):
    """A refine whose output root another process is writing (its log locked) stops with one line and touches
    nothing; a run that starts cleans the hidden temporaries a killed run left on its root (not another root's)."""
    import fcntl
    out = tmp_path / "o" / "run"
    out.parent.mkdir()
    with open(f"{out}.out", "a") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        rc, err = error_of(capsys, refine_argv(sub, small_set / "reference.mrc", out))
        assert rc == 2 and f"{out}.out: another cryorefine refine is writing this run now" in err
        assert Path(f"{out}.out").read_text() == "" and sorted(p.name for p in out.parent.iterdir()) == ["run.out"]
    stale = out.parent / ".run_it001_half1_class001.mrc.abcd1234.tmp.mrc"
    other = out.parent / ".run_ct3_it004_data.star.abcd1234.tmp.star"
    stale.write_bytes(b"x" * 100)
    other.write_bytes(b"x")
    assert main(refine_argv(sub, small_set / "reference.mrc", out)) == 0
    assert not stale.exists() and other.exists()
    assert "Removed 1 temporary file(s) a stopped run left (.run_it001_half1_class001.mrc" in \
        Path(f"{out}.out").read_text()


def test_reconstruct_odd_box_and_negative_maxres(sub, tmp_path, capsys):
    """An odd first image box is one error line (it was a traceback); any negative --maxres is Nyquist (RELION)."""
    t = read_particles(sub)
    imgs = np.stack([mrcfile.read(name.split("@")[1])[int(name.split("@")[0]) - 1, :63, :63]
                     for name in t.particles["rlnImageName"]])
    mrcfile.write(tmp_path / "odd.mrcs", imgs.astype(np.float32))
    t.optics["rlnImageSize"] = 63
    t.particles["rlnImageName"] = [f"{i + 1}@{tmp_path / 'odd.mrcs'}" for i in range(len(imgs))]
    write_particles(tmp_path / "odd.star", t)
    rc, err = error_of(capsys, ["reconstruct", "--i", str(tmp_path / "odd.star"), "--o", str(tmp_path / "o.mrc")])
    assert rc == 2 and "odd.star: the first image (1@" in err and "odd box size 63" in err
    for maxres in ("-5", "-1"):
        assert main(["reconstruct", "--i", str(sub), "--o", str(tmp_path / f"n{maxres}.mrc"), "--maxres", maxres]) == 0
    np.testing.assert_array_equal(read_map(tmp_path / "n-5.mrc")[0], read_map(tmp_path / "n-1.mrc")[0])
    rc, err = error_of(capsys, ["reconstruct", "--i", str(sub), "--o", str(tmp_path / "z.mrc"), "--maxres", "0"])
    assert rc == 2 and "--maxres" in err


def test_random_subset_semantics_as_relion(sub, small_set, tmp_path, capsys):
    """rlnRandomSubset as RELION's divideParticlesInRandomHalves: 0 everywhere = halves drawn at random; a mix of 0
    and 1/2, or another value, stops refine naming the particle; reconstruct reads it only for --subset 1/2."""
    zeros = edited(sub, "particles", "rlnRandomSubset", -1, 0)
    assert main(refine_argv(zeros, small_set / "reference.mrc", tmp_path / "z" / "run")) == 0
    halves = read_star(tmp_path / "z" / "run_it001_data.star")["particles"]["rlnRandomSubset"]
    assert set(halves) == {1, 2}
    mixed = edited(sub, "particles", "rlnRandomSubset", 4, 0)
    rc, err = error_of(capsys, refine_argv(mixed, small_set / "reference.mrc", tmp_path / "m" / "run"))
    assert rc == 2 and "rlnRandomSubset is 0 for 1 of 40 particles" in err
    three = edited(sub, "particles", "rlnRandomSubset", 6, 3)
    rc, err = error_of(capsys, refine_argv(three, small_set / "reference.mrc", tmp_path / "t" / "run"))
    assert rc == 2 and "rlnRandomSubset = 3 in particle 7" in err
    assert main(["reconstruct", "--i", str(three), "--o", str(tmp_path / "all.mrc"), "--ctf"]) == 0
    assert main(["reconstruct", "--i", str(sub), "--o", str(tmp_path / "ref_all.mrc"), "--ctf"]) == 0
    np.testing.assert_array_equal(read_map(tmp_path / "all.mrc")[0], read_map(tmp_path / "ref_all.mrc")[0])


def _map_file(path: Path, data: np.ndarray, angpix: float = 2.5) -> Path:
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(np.asarray(data, np.float32))
        m.voxel_size = angpix
    return path


def test_constant_reference_and_empty_solvent_mask(sub, small_set, tmp_path, capsys):
    """An all-zero reference (nothing to align to) and an all-zero solvent mask (it would flatten the whole map) are
    errors naming the file, not runs that finish with a meaningless map."""
    zero = _map_file(tmp_path / "zero.mrc", np.zeros((64, 64, 64)))
    rc, err = error_of(capsys, refine_argv(sub, zero, tmp_path / "a" / "run"))
    assert rc == 2 and "zero.mrc: the reference is constant" in err
    rc, err = error_of(capsys, refine_argv(sub, small_set / "reference.mrc", tmp_path / "b" / "run",
                                           "--solvent_mask", str(zero)))
    assert rc == 2 and "zero.mrc: the solvent mask is empty" in err
    assert_only_log(tmp_path / "a") and assert_only_log(tmp_path / "b")


def test_postprocess_of_constant_half_maps(small_set, tmp_path, capsys):
    """Constant half maps have no FSC: an error, not 'FINAL RESOLUTION: inf'."""
    h1 = _map_file(tmp_path / "run_half1_class001_unfil.mrc", np.zeros((64, 64, 64)))
    h2 = _map_file(tmp_path / "run_half2_class001_unfil.mrc", np.zeros((64, 64, 64)))
    rc, err = error_of(capsys, ["postprocess", "--i", str(h1), "--i2", str(h2), "--mask",
                                str(small_set / "mask.mrc"), "--o", str(tmp_path / "pp")])
    assert rc == 2 and "run_half1_class001_unfil.mrc: the map is constant" in err
    assert not (tmp_path / "pp.mrc").exists()


def test_relion30_file_without_pixel_size_needs_angpix(sub, small_set, tmp_path, capsys):
    """A RELION 3.0 particle file without rlnDetectorPixelSize/rlnMagnification: refine says to give --angpix and
    then accepts it, as RELION 3.0's relion_refine."""
    t = read_particles(sub)
    cols = ["rlnImageName", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnRandomSubset"]
    old = t.particles[cols].copy()
    old["rlnVoltage"], old["rlnSphericalAberration"], old["rlnAmplitudeContrast"] = 300.0, 2.7, 0.1
    star = tmp_path / "r30.star"
    write_star(star, {"": old})
    rc, err = error_of(capsys, refine_argv(star, small_set / "reference.mrc", tmp_path / "a" / "run"))
    assert rc == 2 and "r30.star" in err and "give --angpix" in err
    rc, err = error_of(capsys, refine_argv(star, small_set / "reference.mrc", tmp_path / "b" / "run",
                                           "--angpix", "0"))
    assert rc == 2 and "--angpix" in err
    assert main(refine_argv(star, small_set / "reference.mrc", tmp_path / "c" / "run", "--angpix", "2.5")) == 0
    data = read_particles(tmp_path / "c" / "run_it001_data.star")
    assert float(data.optics["rlnImagePixelSize"].iloc[0]) == 2.5 and data.nr_particles == 40
    assert "--angpix" not in (tmp_path / "c" / "run.out").read_text().split("\n", 2)[2]
    # a file with optics groups keeps its own pixel size: the option is named as unused, not silently dropped
    assert main(refine_argv(sub, small_set / "reference.mrc", tmp_path / "d" / "run", "--angpix", "3")) == 0
    assert " --angpix 3: not used; the optics groups of" in (tmp_path / "d" / "run.out").read_text()


@pytest.mark.parametrize("option", [["--rescale_angpix", "1e-9"], ["--new_box", "100000"]])
def test_image_handler_output_box_beyond_memory(small_set, tmp_path, capsys, option):
    """A box no machine can hold is one error line, not numpy's MemoryError or 'array is too big'."""
    rc, err = error_of(capsys, ["image-handler", "--i", str(small_set / "reference.mrc"), "--o",
                                str(tmp_path / "a.mrc"), *option])
    assert rc == 2 and "reference.mrc: the output box" in err and "GiB available" in err
    assert not (tmp_path / "a.mrc").exists()


def test_mask_create_denovo_box_beyond_memory(tmp_path, capsys):
    """It tried the 74.5 GiB allocation and ended as an out-of-memory error (exit 1)."""
    rc, err = error_of(capsys, ["mask-create", "--denovo", "--box_size", "100000", "--outer_radius", "20",
                                "--o", str(tmp_path / "m.mrc")])
    assert rc == 2 and "--denovo --box_size 100000 would need" in err and "GiB available" in err, err


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_output_folder_where_no_file_can_be_made(small_set, tmp_path, capsys):
    """/proc passes access(W_OK) for root but takes no files: the check tries to make one."""
    rc, err = error_of(capsys, ["image-handler", "--i", str(small_set / "reference.mrc"), "--o", "/proc/a.mrc",
                                "--new_box", "32"])
    assert rc == 2 and "/proc: output folder not writable" in err


def test_offset_range_ini_high_and_mask_edge_beyond_the_box(sub, small_set, tmp_path, capsys):
    """The first two were tracebacks (MemoryError; ZeroDivisionError for a low-pass coarser than the box)."""
    rc, err = error_of(capsys, refine_argv(sub, small_set / "reference.mrc", tmp_path / "a" / "run",
                                           "--offset_range", "1000"))
    assert rc == 2 and "--offset_range 1000 px is more than half the box (64 px)" in err
    rc, err = error_of(capsys, refine_argv(sub, small_set / "reference.mrc", tmp_path / "b" / "run",
                                           "--ini_high", "1000"))
    assert rc == 2 and "--ini_high 1000 A is coarser than the box (64 px x 2.5 A = 160 A)" in err
    # a soft edge wider than the image: the default diameter (box minus edge) came out negative, and the run went on
    rc, err = error_of(capsys, refine_argv(sub, small_set / "reference.mrc", tmp_path / "c" / "run", "--maskedge",
                                           "1000"))
    assert rc == 2 and "--maskedge 1000 px is not less than half the box (64 px)" in err
    assert_only_log(tmp_path / "a") and assert_only_log(tmp_path / "b") and assert_only_log(tmp_path / "c")


@pytest.mark.parametrize("exc, phrase", [(OSError(28, "No space left on device", "/data/out.mrc"),
                                          "error: /data/out.mrc: No space left on device"),
                                         (MemoryError("Unable to allocate 9.3 GiB"),
                                          "error: out of memory (Unable to allocate 9.3 GiB)")])
def test_disk_full_or_out_of_memory_is_one_line(small_set, tmp_path, capsys, monkeypatch, exc, phrase):
    """Resource failures during a job (disk full, memory exhausted) end with one error line and exit code 1."""
    from cryorefine.tools import image_handler

    def fail(*_a, **_k):
        raise exc
    monkeypatch.setattr(image_handler, "write_map", fail)
    capsys.readouterr()
    rc = main(["image-handler", "--i", str(small_set / "reference.mrc"), "--o", str(tmp_path / "a.mrc"),
               "--new_box", "32"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 1 and len(err) == 1 and phrase in err[0], err


def test_full_disk_names_the_output_file(small_set, tmp_path, capsys, monkeypatch):
    """A write that fails for lack of space names no file (errno 28 from write()); the error line names the output
    being written, not nothing (nor a hidden temporary), and no partial file is left."""
    from cryorefine.io import mrc

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

        def write(self, _data):
            raise OSError(28, "No space left on device")

    real_open = open
    def opened(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        return FullDisk(f) if "w" in mode else f
    monkeypatch.setattr(mrc, "open", opened, raising=False)
    rc, err = error_of(capsys, ["image-handler", "--i", str(small_set / "reference.mrc"), "--o",
                                str(tmp_path / "a.mrc"), "--new_box", "32"])
    assert rc == 1 and f"error: {tmp_path / 'a.mrc'}: No space left on device" in err, err
    assert not list(tmp_path.iterdir())


def test_reconstruct_subset_other_than_1_or_2_is_all_and_bad_angpix_or_folder_refused(sub, tmp_path, capsys):
    """RELION: "--subset 1: only half1; 2: only half2; other: reconstruct all"; --pad 2.0 is RELION's number."""
    assert main(["reconstruct", "--i", str(sub), "--o", str(tmp_path / "x.mrc"), "--subset", "3", "--pad", "2.0"]) == 0
    assert "reconstruct: 40 particles" in capsys.readouterr().out
    (tmp_path / "x.mrc").unlink()
    rc, err = error_of(capsys, ["reconstruct", "--i", str(sub), "--o", str(tmp_path / "x.mrc"), "--pad", "1.5"])
    assert rc == 2 and "--pad: must be a positive integer" in err
    (tmp_path / "dir").mkdir()
    rc, err = error_of(capsys, ["reconstruct", "--i", str(sub), "--o", str(tmp_path / "dir")])
    assert rc == 2 and "is a folder, not a map file" in err
    for value in ("nan", "0"):     # nan was silently "the first optics group's"
        rc, err = error_of(capsys, ["reconstruct", "--i", str(sub), "--o", str(tmp_path / "x.mrc"), "--angpix", value])
        assert rc == 2 and "--angpix: must be a pixel size" in err and not (tmp_path / "x.mrc").exists()


def _damaged_copy(sub: Path, small_set: Path, tmp_path: Path, name: str, damage) -> tuple[Path, Path]:
    """(STAR, stack) of the 40 particles of `sub` in their own stack `name`.mrcs, `damage(images)` applied first."""
    stack = tmp_path / f"{name}.mrcs"
    data = mrcfile.read(small_set / "particles.mrcs")[:40].copy()
    damage(data)
    with mrcfile.new(stack) as m, np.errstate(over="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")             # mrcfile's header statistics of a NaN or overflowing image
        m.set_data(data.astype(np.float32))
        m.voxel_size = 2.5
    t = read_particles(sub)
    t.particles["rlnImageName"] = [f"{i + 1:06d}@{stack}" for i in range(40)]
    star = tmp_path / f"{name}.star"
    write_particles(star, t)
    return star, stack


def test_nan_image_in_a_particle_stack(sub, small_set, tmp_path, capsys):
    star, stack = _damaged_copy(sub, small_set, tmp_path, "stack", lambda d: d.__setitem__((17, 30, 30), np.nan))
    before = sha(stack)
    capsys.readouterr()
    rc = main(["reconstruct", "--i", str(star), "--o", str(tmp_path / "r" / "x.mrc"), "--ctf"])
    # found while reading, after the progress line: that went to stdout, so the error is the one stderr line
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and "stack.mrcs: image 18 contains NaN" in err[0], err
    out = tmp_path / "f"
    rc, err = error_of(capsys, refine_argv(star, small_set / "reference.mrc", out / "run"))
    assert rc == 2 and "stack.mrcs: image 18 contains NaN" in err
    assert sha(stack) == before
    assert_only_log(out)
    assert (out / "run.out").read_text().splitlines()[-1] == err


def test_absurd_values_in_a_particle_image(sub, small_set, tmp_path, capsys):
    """Finite but absurd (1e30) pixel values overflowed the sums into inf half maps and -inf likelihoods, exit 0."""
    star, _ = _damaged_copy(sub, small_set, tmp_path, "big", lambda d: d.__setitem__(9, d[9] * 1e30))
    rc, err = error_of(capsys, ["reconstruct", "--i", str(star), "--o", str(tmp_path / "r" / "x.mrc"), "--ctf"])
    assert rc == 2 and "big.mrcs: image 10 has values up to" in err


@pytest.mark.parametrize("name, problem", [
    ("inf@{s}", "bad rlnImageName 'inf@"), ("99999999999999999999@{s}", "bad rlnImageName"),
    ("1.5@{s}", "bad rlnImageName '1.5@"), ("+3@{s}", "bad rlnImageName '+3@"),
    ("{s}", "has no image number (NNNNNN@), but"),
])
def test_image_numbers_are_plain_positive_integers(sub, small_set, tmp_path, capsys, name, problem):
    """'inf@', a number beyond int64 (tracebacks), '1.5@' (read as image 1) and a bare stack name (image 1 of a
    1,000-image stack) were accepted; RELION's names are NNNNNN@file, a bare name a one-image file."""
    t = read_particles(sub)
    t.particles.loc[4, "rlnImageName"] = name.format(s=small_set / "particles.mrcs")
    star = tmp_path / "names.star"
    write_particles(star, t)
    rc, err = error_of(capsys, ["reconstruct", "--i", str(star), "--o", str(tmp_path / "x.mrc"), "--ctf"])
    assert rc == 2 and problem in err and "names.star" in err, err


def _mics_copy(mics_set: Path, tmp_path: Path, n: int) -> Path:
    """A micrographs STAR with the first n micrographs, copied (so they can be damaged)."""
    blocks = read_star(mics_set / "micrographs_ctf.star")
    mics = blocks["micrographs"].head(n).copy()
    (tmp_path / "Micrographs").mkdir()
    for name in mics["rlnMicrographName"]:
        shutil.copy(mics_set / name, tmp_path / name)
        shutil.copy(mics_set / name.replace(".mrc", "_pick.star"), tmp_path / name.replace(".mrc", "_pick.star"))
    blocks["micrographs"] = mics
    star = tmp_path / "mics.star"
    write_star(star, blocks)
    return star


def test_nan_patch_under_a_particle(mics_set, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    star = _mics_copy(mics_set, tmp_path, 2)
    mic = tmp_path / "Micrographs" / "mic_0002.mrc"
    coords = read_star(tmp_path / "Micrographs" / "mic_0002_pick.star")
    df = next(v for v in coords.values() if isinstance(v, pd.DataFrame))
    x, y = int(df["rlnCoordinateX"].iloc[2]), int(df["rlnCoordinateY"].iloc[2])
    with mrcfile.open(mic, "r+") as m:
        m.data[y - 2:y + 2, x - 2:x + 2] = np.nan
    before = sha(mic)
    argv = ["extract", "--i", str(star), "--coord_suffix", "_pick.star", "--extract_size", "64", "--norm",
            "--o", "Extract/job001/", "--no_progress"]
    rc, err = error_of(capsys, argv)
    assert rc == 2 and "mic_0002.mrc" in err and "particle 3" in err and "NaN" in err
    assert not Path("Extract").exists() and sha(mic) == before
    assert main([*argv, "--skip_nonfinite"]) == 0
    out = capsys.readouterr().out
    assert "1 particles skipped: NaN or infinite pixels" in out
    n = len(df) + len(next(v for v in read_star(tmp_path / "Micrographs" / "mic_0001_pick.star").values()
                            if isinstance(v, pd.DataFrame)))
    assert read_particles("Extract/job001/particles.star").nr_particles == n - 1


def test_missing_micrograph_without_skip_missing(mics_set, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    star = _mics_copy(mics_set, tmp_path, 3)
    (tmp_path / "Micrographs" / "mic_0003.mrc").unlink()
    rc, err = error_of(capsys, ["extract", "--i", str(star), "--coord_suffix", "_pick.star", "--extract_size", "64",
                                "--o", "Extract/job001/", "--no_progress"])
    assert rc == 2 and "mic_0003.mrc" in err and "--skip_missing" in err
    assert not Path("Extract").exists()


def test_extract_box_larger_than_the_micrograph(mics_set, tmp_path, capsys, monkeypatch):
    """A box beyond the micrograph is a mistake (it was a MemoryError for 100000 px), named with the micrograph."""
    monkeypatch.chdir(tmp_path)
    star = _mics_copy(mics_set, tmp_path, 2)
    rc, err = error_of(capsys, ["extract", "--i", str(star), "--coord_suffix", "_pick.star", "--extract_size",
                                "100000", "--o", "Extract/job001/", "--no_progress"])
    assert rc == 2 and "mic_0001.mrc: --extract_size 100000 px is larger than the micrograph" in err
    assert not Path("Extract").exists()


@pytest.mark.filterwarnings("error")
def test_extract_coordinate_beyond_int64_and_part_star_folder(mics_set, tmp_path, capsys, monkeypatch):
    """A coordinate of 1e300 is a box wholly outside, reported without numpy's cast warnings first; a --part_star
    that is a folder is refused before any work (it ended as a disk error after extracting)."""
    monkeypatch.chdir(tmp_path)
    star = _mics_copy(mics_set, tmp_path, 1)
    pick = tmp_path / "Micrographs" / "mic_0001_pick.star"
    blocks = read_star(pick)
    table = next(k for k, v in blocks.items() if isinstance(v, pd.DataFrame))
    blocks[table].loc[0, ["rlnCoordinateX", "rlnCoordinateY"]] = 1e300
    write_star(pick, blocks)
    rc, err = error_of(capsys, ["extract", "--i", str(star), "--coord_suffix", "_pick.star", "--extract_size", "64",
                                "--o", "Extract/job001/", "--no_progress"])
    assert rc == 2 and "mic_0001" in err, err
    (tmp_path / "pdir").mkdir()
    rc, err = error_of(capsys, ["extract", "--i", str(star), "--coord_suffix", "_pick.star", "--extract_size", "64",
                                "--o", "Extract/job002/", "--part_star", "pdir", "--no_progress"])
    assert rc == 2 and "--part_star pdir: is a folder, not a file" in err, err
    assert not Path("Extract").exists()


# ------------------------------------------------------------------------------------------------ leftovers


def test_unreadable_later_micrograph_leaves_no_stacks(mics_set, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    star = _mics_copy(mics_set, tmp_path, 3)
    mic = tmp_path / "Micrographs" / "mic_0003.mrc"
    mic.write_bytes(mic.read_bytes()[:2000])        # truncated: the first two extract, the third cannot be read
    rc, err = error_of(capsys, ["extract", "--i", str(star), "--coord_suffix", "_pick.star", "--extract_size", "64",
                                "--o", "Extract/job001/", "--no_progress"])
    assert rc == 2 and "mic_0003.mrc" in err
    assert not Path("Extract").exists(), files_under(Path("Extract"))


# ------------------------------------------------------------------------------------------------ --continue


@pytest.fixture(scope="module")
def one_iteration(small_set, tmp_path_factory):
    """A 40-particle refinement stopped after iteration 1 (its files are the base of the --continue tests)."""
    work = tmp_path_factory.mktemp("cont")
    t = read_particles(small_set / "particles.star")
    p = t.particles.head(40).copy()
    p["rlnImageName"] = [f"{s.split('@')[0]}@{Path(s.split('@')[1]).resolve()}" for s in p["rlnImageName"]]
    star = work / "p.star"
    write_particles(star, replace(t, particles=p.reset_index(drop=True)))
    assert main(refine_argv(star, small_set / "reference.mrc", work / "A" / "run")) == 0
    return work


@pytest.mark.parametrize("missing", ["_sampling.star", "_data.star", "_half2_model.star", "_half1_class001.mrc"])
def test_continue_with_a_missing_iteration_file(one_iteration, tmp_path, capsys, missing):
    src = tmp_path / "A"
    shutil.copytree(one_iteration / "A", src)
    (src / f"run_it001{missing}").unlink()
    rc, err = error_of(capsys, ["refine", "--continue", str(src / "run_it001_optimiser.star"),
                                "--o", str(tmp_path / "B" / "run"), "--quiet"])
    assert rc == 2 and f"run_it001{missing}" in err and "no such file" in err
    assert_only_log(tmp_path / "B")


def test_continue_with_a_file_of_another_run(one_iteration, tmp_path, capsys):
    """The sampling file says C1 while the run was D2: named, not carried on from."""
    src = tmp_path / "A"
    shutil.copytree(one_iteration / "A", src)
    blocks = read_star(src / "run_it001_sampling.star")
    blocks["sampling_general"]["rlnSymmetryGroup"] = "C1"
    write_star(src / "run_it001_sampling.star", blocks)
    rc, err = error_of(capsys, ["refine", "--continue", str(src / "run_it001_optimiser.star"), "--sym", "D2",
                                "--o", str(tmp_path / "B" / "run"), "--quiet"])
    assert rc == 2 and "run_it001_sampling.star" in err and "symmetry C1" in err
    assert_only_log(tmp_path / "B")


def test_continue_from_a_classification_is_refused(one_iteration, tmp_path, capsys):
    """An _optimiser.star saying it is not an auto-refine (a Class3D job's) was continued as one, exit 0."""
    src = tmp_path / "A"
    shutil.copytree(one_iteration / "A", src)
    blocks = read_star(src / "run_it001_optimiser.star")
    blocks["optimiser_general"]["rlnDoAutoRefine"] = 0
    write_star(src / "run_it001_optimiser.star", blocks)
    rc, err = error_of(capsys, ["refine", "--continue", str(src / "run_it001_optimiser.star"),
                                "--o", str(tmp_path / "B" / "run"), "--quiet"])
    assert rc == 2 and "not a 3D auto-refine run" in err and "rlnDoAutoRefine 0" in err
    assert_only_log(tmp_path / "B", None)


# ------------------------------------------------------------------------------------------------ kill -9


def _masked_corr(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    w = mask > 0.5
    return float(np.corrcoef(a[w], b[w])[0, 1])


def _fsc(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    fa, fb = np.fft.rfftn(a), np.fft.rfftn(b)
    n = a.shape[0]
    k = [np.fft.fftfreq(n, 1 / n)] * 2 + [np.arange(n // 2 + 1)]
    r = np.round(np.sqrt(sum(g ** 2 for g in np.meshgrid(*k, indexing="ij")))).astype(int).ravel()
    num = np.bincount(r, (fa * fb.conj()).real.ravel())
    den = np.sqrt(np.bincount(r, (abs(fa) ** 2).ravel()) * np.bincount(r, (abs(fb) ** 2).ravel()))
    return (num / np.maximum(den, 1e-30))[: n // 2 + 1]


def test_kill_9_during_an_estep_then_continue_gives_the_same_map(small_set, tmp_path):
    """SIGKILL during iteration 2's E-step: only complete files of finished iterations are left, and
    --continue from the last one reaches the uninterrupted run's iteration-2 maps."""
    t = read_particles(small_set / "particles.star")
    p = t.particles.head(120).copy()
    p["rlnImageName"] = [f"{s.split('@')[0]}@{Path(s.split('@')[1]).resolve()}" for s in p["rlnImageName"]]
    star = tmp_path / "p.star"
    write_particles(star, replace(t, particles=p.reset_index(drop=True)))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    common = ["--sym", "D2", "--ini_high", "50", "--particle_diameter", "150", "--random_seed", "7", "--j", "1",
              "--batch_size", "8", "--auto_iter_max", "2"]

    def refine(out: Path, *extra: str) -> subprocess.Popen:
        out.parent.mkdir(parents=True, exist_ok=True)
        fh = open(out.parent / "stdout.txt", "w")
        return subprocess.Popen([sys.executable, "-m", "cryorefine", "refine", "--i", str(star), "--ref",
                                 str(small_set / "reference.mrc"), "--o", str(out), *common, *extra],
                                stdout=fh, stderr=subprocess.STDOUT, env=env)

    a = refine(tmp_path / "A" / "run")
    assert a.wait(timeout=600) == 0
    b_root = tmp_path / "B" / "run"
    b = refine(b_root)
    log = Path(f"{b_root}.out")
    killed_at = None
    while b.poll() is None:
        text = log.read_text() if log.exists() else ""
        tail = text.split("Expectation iteration 2")[1].splitlines() if "Expectation iteration 2" in text else []
        if any(line.startswith(" E-step half") and " 0/" not in line and "(100%)" not in line for line in tail):
            b.send_signal(signal.SIGKILL)
            killed_at = tail[-1]
            break
        time.sleep(0.05)
    b.wait(timeout=60)
    assert killed_at is not None and b.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    names = files_under(tmp_path / "B")
    assert not [n for n in names if "it002" in n], names
    assert not [n for n in names if ".tmp" in n], names
    for n in names:                                   # every file left is complete and readable
        path = tmp_path / "B" / n
        if n.endswith(".star"):
            read_star(path)
        elif n.endswith(".mrc"):
            read_map(path)
    c = subprocess.run([sys.executable, "-m", "cryorefine", "refine", "--continue",
                        f"{b_root}_it001_optimiser.star", "--o", str(b_root), "--quiet"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert c.returncode == 0, c.stderr
    mask, _ = read_map(small_set / "mask.mrc")
    res = float(read_star(tmp_path / "A" / "run_it002_half1_model.star")["model_general"]["rlnCurrentResolution"])
    for h in (1, 2):
        ma, _ = read_map(tmp_path / "A" / f"run_it002_half{h}_class001.mrc")
        # the run's own root on --continue: RELION's <root>_ct<iteration> names
        mb, _ = read_map(tmp_path / "B" / f"run_ct1_it002_half{h}_class001.mrc")
        n = ma.shape[0]
        shell = int(n * 2.5 / res)
        corr, fsc = _masked_corr(ma, mb, mask), _fsc(ma, mb)[1:shell + 1]
        print(f"half {h}: masked correlation {corr:.6f}, FSC >= {fsc.min():.5f} up to {res:.2f} A (shell {shell}); "
              f"killed at: {killed_at.strip()}")
        assert corr >= 0.999
        assert np.all(fsc >= 0.99), (h, shell, fsc)


def test_sigterm_is_one_line_and_a_failure_marker(sub, small_set, tmp_path):
    """SIGTERM (scancel, kill) ended the run with nothing on stderr, nothing in run.out and no RELION failure marker,
    so the pipeliner showed it running forever; now it ends as Ctrl-C does."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out, job = tmp_path / "R" / "run", tmp_path / "job"
    proc = subprocess.Popen([sys.executable, "-m", "cryorefine", "refine", "--i", str(sub), "--ref",
                             str(small_set / "reference.mrc"), "--o", str(out), "--sym", "D2", "--j", "1",
                             "--particle_diameter", "150", "--pipeline_control", str(job)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
    log = Path(f"{out}.out")
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if log.exists() and "Expectation iteration 1" in log.read_text():
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip().splitlines() == ["cryorefine refine: terminated (SIGTERM)"]
    assert (job / "RELION_JOB_EXIT_FAILURE").is_file() and not (job / "RELION_JOB_EXIT_SUCCESS").exists()
    assert "stopped: Terminated" in log.read_text()


def test_pixel_origins_in_a_relion31_file_are_used(sub, tmp_path, capsys):
    """A file with data_optics but origins only in pixels (rlnOriginX/Y): converted with rlnImagePixelSize and said
    so; RELION reads only rlnOriginXAngst there, and the shifts were silently dropped (a map of correlation 0.4)."""
    t = read_particles(sub)
    p = t.particles.copy()
    p["rlnOriginX"] = p.pop("rlnOriginXAngst") / 2.5
    p["rlnOriginY"] = p.pop("rlnOriginYAngst") / 2.5
    write_particles(tmp_path / "px.star", replace(t, particles=p))
    table = read_particles(tmp_path / "px.star")
    np.testing.assert_allclose(table.particles["rlnOriginXAngst"], t.particles["rlnOriginXAngst"], atol=1e-5)
    assert "rlnOriginX" not in table.particles and "origins given in pixels only" in table.notes[0]
    capsys.readouterr()
    for name, star in (("a.mrc", sub), ("b.mrc", tmp_path / "px.star")):
        assert main(["reconstruct", "--i", str(star), "--o", str(tmp_path / name), "--ctf"]) == 0
    assert "WARNING: " in capsys.readouterr().err
    a, b = read_map(tmp_path / "a.mrc")[0], read_map(tmp_path / "b.mrc")[0]
    np.testing.assert_allclose(b, a, atol=1e-4 * float(np.abs(a).max()))


def test_reconstruct_names_a_stack_header_pixel_size_that_differs(sub, tmp_path, capsys):
    """reconstruct uses the STAR file's pixel size (RELION) and says when the stack header disagrees, as refine and
    extract do."""
    bad = edited(sub, "optics", "rlnImagePixelSize", 0, 3.0)
    capsys.readouterr()
    assert main(["reconstruct", "--i", str(bad), "--o", str(tmp_path / "r.mrc"), "--ctf"]) == 0
    assert "WARNING: optics group 1: rlnImagePixelSize 3 A" in capsys.readouterr().err
    assert read_map(tmp_path / "r.mrc")[1] == pytest.approx(3.0)


def test_image_handler_operand_of_another_pixel_size_or_a_constant_fsc_map(small_set, tmp_path, capsys):
    """--add / --fsc with a map of 3 Å beside a 2.5 Å input, and --fsc against an all-zero map, went through with
    exit 0 (mask-create, postprocess and refine refuse a pixel-size mismatch)."""
    data, _ = read_map(small_set / "reference.mrc")
    write_map(tmp_path / "three.mrc", data, 3.0)
    write_map(tmp_path / "zero.mrc", np.zeros_like(data), 2.5)
    ref = str(small_set / "reference.mrc")
    rc, err = error_of(capsys, ["image-handler", "--i", ref, "--add", str(tmp_path / "three.mrc"),
                                "--o", str(tmp_path / "o.mrc")])
    assert rc == 2 and "three.mrc: --add: pixel size 3 Å differs" in err, err
    rc, err = error_of(capsys, ["image-handler", "--i", ref, "--fsc", str(tmp_path / "three.mrc")])
    assert rc == 2 and "three.mrc: --fsc: pixel size 3 Å differs" in err, err
    rc, err = error_of(capsys, ["image-handler", "--i", ref, "--fsc", str(tmp_path / "zero.mrc")])
    assert rc == 2 and "zero.mrc: the map is constant" in err, err
    assert not (tmp_path / "o.mrc").exists()


def test_image_handler_star_error_leaves_no_new_folder(sub, tmp_path, capsys):
    """An image number beyond the stack stops the job after the output folder was made: it is removed again."""
    bad = edited(sub, "particles", "rlnImageName", 3, "001001@" + read_particles(sub).particles["rlnImageName"]
                 .iloc[0].split("@")[1])
    rc, err = error_of(capsys, ["image-handler", "--i", str(bad), "--rescale_angpix", "5",
                                "--o", str(tmp_path / "out" / "deeper" / "y.star")])
    assert rc == 2 and "1001" in err, err
    assert not (tmp_path / "out").exists()


def test_reconstruct_zero_threads_is_refused_as_refine(sub, tmp_path, capsys):
    """--j 0 was taken for "not given" while --j -1 was refused."""
    rc, err = error_of(capsys, ["reconstruct", "--i", str(sub), "--o", str(tmp_path / "r.mrc"), "--j", "0"])
    assert rc == 2 and "--j: must be at least 1 (got 0)" in err
