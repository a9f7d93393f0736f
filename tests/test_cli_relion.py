"""RELION 5 GUI command lines run unchanged through `cryorefine` (issue 12).

The commands are built as RELION 5's pipeline_jobs.cpp builds them from its default job options
(getCommandsAutorefineJob, getCommandsExtractJob, getCommandsPostprocessJob; relion_reconstruct as the
tutorial types it), with the tutorial's paths replaced by the small / mics sets' and, where a default does
not fit the 64-px small set (mask diameter 200 A > 160 A box), the value a user would enter. Test-only
limits (--auto_iter_max 1) go where a user puts extra options: the GUI's "Additional arguments" field.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile

from cryorefine.cli import ABORT_NOW, EXIT_ABORTED, EXIT_FAILURE, EXIT_SUCCESS, RELION_PROGRAMS, build_parser, main
from cryorefine.io.mrc import read_map
from cryorefine.io.star import read_particles
from cryorefine.refine.command import compatibility_notes, options_from_args

ROOT = Path(__file__).resolve().parent.parent
def relion(command: str) -> list[str]:
    """A RELION command line as the GUI writes it (`which relion_x` included) -> argv, program name kept."""
    return shlex.split(command.replace("`which ", "").replace("`", ""))


def gui(command: str) -> list[str]:
    """A RELION command line -> the cryorefine sub-command's argv (for parsing it alone)."""
    tokens = relion(command)
    return [RELION_PROGRAMS[tokens[0]], *tokens[1:]]


def _subset_star(src: Path, n: int, dest: Path) -> Path:
    """The first n particles of a STAR file with absolute image paths (every column kept)."""
    blocks = starfile.read(src, always_dict=True)
    parts = blocks["particles"].head(n).copy()
    parts["rlnImageName"] = [f"{s.split('@')[0]}@{src.parent / s.split('@')[1]}" for s in parts["rlnImageName"]]
    starfile.write({"optics": blocks["optics"], "particles": parts}, dest)
    return dest


# ------------------------------------------------------------------------------------------------ parsing


def test_options_are_never_abbreviated(capsys):
    """`--ini 50` is not `--ini_high`, and relion_preprocess's `--extract` is a flag, not `--extract_size`."""
    with pytest.raises(SystemExit):
        build_parser("refine").parse_args(["refine", "--i", "a.star", "--ref", "r.mrc", "--o", "x", "--ini", "50"])
    args = build_parser("extract").parse_args(["extract", "--i", "m.star", "--coord_list", "c.star", "--part_dir",
                                               "E/", "--extract", "--extract_size", "64"])
    assert args.extract is True and args.extract_size == 64 and args.o == "E/"
    for name in ("refine", "extract", "postprocess", "reconstruct", "image-handler"):
        parser = build_parser(name)
        sub = parser._subparsers._group_actions[0].choices[name]
        assert parser.allow_abbrev is False and sub.allow_abbrev is False, name


REFINE_ALL_OPTIONS = (
    "`which relion_refine_mpi` --o Refine3D/job019/run --auto_refine --split_random_halves --i P.star --ref R.mrc "
    "--firstiter_cc --trust_ref_size --ini_high 50 --blush  --dont_combine_weights_via_disc --no_parallel_disc_io "
    "--preread_images  --pool 3 --pad 1  --auto_ignore_angles --auto_resol_angles --ctf --ctf_intact_first_peak "
    "--particle_diameter 150 --flatten_solvent --zero_mask --solvent_mask M.mrc --solvent_correct_fsc  "
    "--oversampling 1 --healpix_order 2 --auto_local_healpix_order 4 --offset_range 5 --offset_step 2 --sym D2 "
    "--low_resol_join_halves 40 --norm --scale  --relax_sym C2 --j 4 --gpu \"\"  --pipeline_control Refine3D/job019/")


def test_every_refine_gui_option_parses_with_relion_meaning():
    """All options of a Refine3D job with every GUI switch on: parsed; the ones without effect get a log line."""
    args = build_parser("refine").parse_args(gui(REFINE_ALL_OPTIONS))
    opts = options_from_args(args)
    assert opts.batch_size == 64, "--pool is RELION's read batch per thread, not the E-step batch"
    assert opts.gpu == "" and opts.pad == 1 and opts.threads == 4 and opts.sym == "D2"
    assert opts.auto_ignore_angles and opts.auto_resol_angles and opts.solvent_mask == "M.mrc"
    assert opts.solvent_correct_fsc and "--solvent_correct_fsc" not in "\n".join(compatibility_notes(args))
    notes = "\n".join(compatibility_notes(args))
    for opt in ("--pool 3", "--dont_combine_weights_via_disc", "--no_parallel_disc_io", "--preread_images",
                "--trust_ref_size", "--blush", "--relax_sym C2"):
        assert opt in notes, opt
    # "Ignore CTFs until first peak?" Yes: done, as RELION (no note); the optimiser file records it for --continue
    assert opts.ctf_intact_first_peak and "--ctf_intact_first_peak" not in notes
    assert args.pipeline_control == "Refine3D/job019/"


# RELION 3.1.0's getCommandsAutorefineJob with its GUI defaults ("Skip gridding?" and "Ref. map is CTF-corrected?"
# both Yes), plus extra options users put in "Additional arguments"
REFINE_31_GUI = (
    "`which relion_refine_mpi` --o Refine3D/job019/run --auto_refine --split_random_halves --i P.star --ref R.mrc "
    "--firstiter_cc --ini_high 50 --dont_combine_weights_via_disc --preread_images  --pool 3 --pad 2  "
    "--skip_gridding  --ctf --ctf_corrected_ref --particle_diameter 150 --flatten_solvent --zero_mask "
    "--oversampling 1 --healpix_order 2 --auto_local_healpix_order 4 --offset_range 5 --offset_step 2 --sym D2 "
    "--low_resol_join_halves 40 --norm --scale  --j 4 --gpu \"0\" --scratch_dir /ssd --keep_free_scratch 10 "
    "--reuse_scratch --free_gpu_memory 100 --dont_check_norm --iter 25 --pipeline_control Refine3D/job019/")


def test_relion_31_refine_gui_command_parses():
    """RELION 3.1's GUI writes --skip_gridding and --ctf_corrected_ref by default: accepted, each with a log line."""
    args = build_parser("refine").parse_args(gui(REFINE_31_GUI))
    opts = options_from_args(args)
    assert opts.gpu == "0" and opts.pad == 2 and opts.sym == "D2" and opts.ctf
    notes = "\n".join(compatibility_notes(args))
    for opt in ("--skip_gridding", "--ctf_corrected_ref", "--keep_free_scratch 10", "--reuse_scratch",
                "--free_gpu_memory 100", "--dont_check_norm", "--iter 25", "--scratch_dir /ssd"):
        assert opt in notes, opt
    assert "WARNING" not in notes, "these options change nothing here: notes, not warnings"


@pytest.mark.parametrize("spelling, expected", [(["--gpu"], ""), (["--gpu", ""], ""), (["--gpu", "0"], "0"),
                                                (["--gpu", "0:1"], "0:1"), (["--gpu", "0,1:2,3"], "0,1:2,3"),
                                                ([], None)])
def test_gpu_ids_parse_like_relion(spelling, expected):
    args = build_parser("refine").parse_args(["refine", "--i", "a.star", "--ref", "r.mrc", "--o", "x", *spelling,
                                              "--batch_size", "16"])
    opts = options_from_args(args)
    assert opts.gpu == expected and opts.batch_size == 16


def test_refine_without_inputs_is_a_one_line_error(tmp_path, capsys):
    rc = main(["refine", "--o", str(tmp_path / "run"), "--pipeline_control", str(tmp_path / "job")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--i: required" in err[0]
    assert (tmp_path / "job" / EXIT_FAILURE).is_file() and not (tmp_path / "job" / EXIT_SUCCESS).exists()


def test_parse_errors_are_one_line_and_fail_the_job(tmp_path, capsys):
    """A missing or unknown option: one line naming the sub-command, exit code 2, RELION's failure marker."""
    with pytest.raises(SystemExit) as exc:
        main(["extract", "--i", "m.star", "--pipeline_control", str(tmp_path / "job")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("cryorefine extract: error:")
    assert "--extract_size" in err[0] and (tmp_path / "job" / EXIT_FAILURE).is_file()
    assert main(["refine", "--bogus", "1", "--pipeline_control", str(tmp_path / "job2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cryorefine refine: error: unrecognized arguments: --bogus 1")
    assert (tmp_path / "job2" / EXIT_FAILURE).is_file()


def test_relion_programs_asking_for_other_jobs_are_errors(tmp_path, capsys):
    """relion_refine without --auto_refine is a classification in RELION: an error, not an auto-refine."""
    assert main(["relion_refine_mpi", "--o", str(tmp_path / "c"), "--i", "a.star", "--K", "4"]) == 2
    assert main(["relion_refine", "--o", str(tmp_path / "c"), "--i", "a.star", "--ref", "r.mrc"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--K" in err[0] and "only 3D auto-refine (--auto_refine)" in err[1]
    assert main(["relion_preprocess", "--i", "m.star", "--coord_list", "c.star", "--part_dir", "E/",
                 "--extract_size", "64"]) == 2
    assert "only particle extraction (--extract)" in capsys.readouterr().err


def test_relion_names_run_relion_command_lines_unchanged(small_set, tmp_path, capsys):
    """`cryorefine relion-names DIR` writes relion_* programs; with DIR on PATH a RELION command line runs as typed."""
    bindir = tmp_path / "bin"
    assert main(["relion-names", str(bindir)]) == 0
    assert sorted(f.name for f in bindir.iterdir()) == sorted(RELION_PROGRAMS)
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    ref = str(small_set / "reference.mrc")
    opts = ["--i", ref, "--rescale_angpix", "5", "--new_box", "40"]
    done = subprocess.run(["relion_image_handler", *opts, "--o", str(tmp_path / "r.mrc")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert main(["image-handler", *opts, "--o", str(tmp_path / "c.mrc")]) == 0
    (ours, apix), (theirs, _) = read_map(tmp_path / "r.mrc"), read_map(tmp_path / "c.mrc")
    assert ours.shape == (40, 40, 40) and apix == pytest.approx(5.0) and np.array_equal(ours, theirs)
    # RELION's spelling of the sub-command (`image_handler`) names the same program
    assert main(["image_handler", *opts, "--o", str(tmp_path / "u.mrc")]) == 0
    assert np.array_equal(read_map(tmp_path / "u.mrc")[0], theirs)
    failed = subprocess.run(["relion_refine", "--i", "a.star", "--o", str(tmp_path / "x")], env=env,
                            capture_output=True, text=True, timeout=120)
    assert failed.returncode == 2 and len(failed.stderr.strip().splitlines()) == 1
    assert main(["relion-names", str(bindir)]) == 0, "its own programs are replaced"
    other = tmp_path / "relion" / "bin"
    other.mkdir(parents=True)
    (other / "relion_refine").write_text("#!/bin/sh\n")
    capsys.readouterr()
    assert main(["relion-names", str(other)]) == 2
    assert "not written by cryorefine" in capsys.readouterr().err
    assert (other / "relion_refine").read_text() == "#!/bin/sh\n" and len(list(other.iterdir())) == 1


# ------------------------------------------------------------------------------------------------ refine


@pytest.fixture(scope="module")
def refine_jobs(small_set, tmp_path_factory):
    """Refine3D/job019 (new job, GUI defaults, 48 particles, 1 iteration) and job020 (its continue job)."""
    work = tmp_path_factory.mktemp("project")
    star = _subset_star(small_set / "particles.star", 48, work / "particles.star")
    new_job = (f"`which relion_refine` --o Refine3D/job019/run --auto_refine --split_random_halves --i {star} "
               f"--ref {small_set / 'reference.mrc'} --firstiter_cc --trust_ref_size --ini_high 50 "
               f"--dont_combine_weights_via_disc --pool 3 --pad 2  --ctf --particle_diameter 150 --flatten_solvent "
               f"--zero_mask --oversampling 1 --healpix_order 2 --auto_local_healpix_order 4 --offset_range 5 "
               f"--offset_step 2 --sym D2 --low_resol_join_halves 40 --norm --scale  --j 1 --auto_iter_max 1 "
               f"--quiet --pipeline_control Refine3D/job019/")
    continue_job = ("`which relion_refine` --continue Refine3D/job019/run_it001_optimiser.star "
                    "--o Refine3D/job020/run --dont_combine_weights_via_disc --pool 3 --pad 2  "
                    "--particle_diameter 150 --j 1 --quiet --pipeline_control Refine3D/job020/")
    mp = pytest.MonkeyPatch()
    mp.chdir(work)
    try:
        t0 = time.time()
        rc1 = main(relion(new_job))
        t1 = time.time()
        rc2 = main(relion(continue_job))
        print(f"refine GUI job {t1 - t0:.1f} s, continue job {time.time() - t1:.1f} s")
    finally:
        mp.undo()
    return work, rc1, rc2


def test_refine_gui_default_job_runs(refine_jobs):
    work, rc, _ = refine_jobs
    job = work / "Refine3D" / "job019"
    assert rc == 0
    assert (job / EXIT_SUCCESS).is_file() and not (job / EXIT_FAILURE).exists()
    for f in ("run_it001_data.star", "run_it001_half1_class001.mrc", "run_it001_half2_model.star",
              "run_it001_optimiser.star", "run_it001_sampling.star"):
        assert (job / f).is_file(), f
    log = (job / "run.out").read_text()
    assert "--pool 3: RELION's images-per-thread read batch" in log and "(--batch_size 64)" in log
    assert "--trust_ref_size" in log and "--dont_combine_weights_via_disc" in log
    assert "symmetry D2" in log
    assert " ===== Summary =====" in log and "Iterations: 1" in log and "peak memory" in log
    assert "relion_postprocess" not in log


def test_refine_gui_continue_job_needs_only_the_optimiser_file(refine_jobs):
    """`--continue run_it001_optimiser.star --o <new root>`: --i, --ref, --sym ... come from the first job."""
    work, _, rc = refine_jobs
    job = work / "Refine3D" / "job020"
    assert rc == 0 and (job / EXIT_SUCCESS).is_file()
    assert (job / "run_it002_optimiser.star").is_file() and not list(job.glob("run_it001_*"))
    log = (job / "run.out").read_text()
    assert "Continuing from Refine3D/job019/run_it001_optimiser.star (iteration 1)" in log
    assert "symmetry D2" in log and "Auto-refine: Iteration= 2" in log
    a = read_particles(job / "run_it002_data.star").particles
    assert len(a) == 48 and set(a["rlnRandomSubset"]) == {1, 2}


def test_refine_stops_when_the_pipeliner_aborts_it(small_set, tmp_path, monkeypatch):
    """RELION's Abort button writes RELION_JOB_ABORT_NOW: the job stops, says RELION_JOB_EXIT_ABORTED, keeps no
    unfinished iteration."""
    monkeypatch.chdir(tmp_path)
    star = _subset_star(small_set / "particles.star", 20, tmp_path / "p.star")
    job = tmp_path / "Refine3D" / "job021"
    job.mkdir(parents=True)
    (job / ABORT_NOW).touch()
    rc = main(["refine", "--i", str(star), "--ref", str(small_set / "reference.mrc"), "--o", "Refine3D/job021/run",
               "--sym", "D2", "--particle_diameter", "150", "--quiet", "--pipeline_control", "Refine3D/job021/"])
    assert rc != 0
    assert (job / EXIT_ABORTED).is_file() and not (job / ABORT_NOW).exists()
    assert {p.name for p in job.iterdir()} == {"run.out", EXIT_ABORTED}
    assert "stopped: JobAborted" in (job / "run.out").read_text().splitlines()[-1]


# ------------------------------------------------------------------------------------------------ extract


def _extract_gui(mics: Path, job: str, source: str, size: int, rescale: int | None, cont: bool = False) -> str:
    """relion_preprocess as getCommandsExtractJob writes it with the GUI defaults (norm, invert, float16)."""
    bg = 0.75 * size / 2
    cmd = f"`which relion_preprocess` --i {mics}/micrographs_ctf.star {source} --part_star {job}particles.star"
    if "--reextract_data_star" in source:
        cmd += f" --pick_star {job}extractpick.star"
    cmd += f" --part_dir {job} --extract --extract_size {size} --float16 "
    if rescale:
        cmd += f" --scale {rescale}"
        bg = bg * rescale / size
    cmd += f" --norm --bg_radius {int(bg)} --white_dust -1 --black_dust -1 --invert_contrast "
    if cont:
        cmd += " --only_do_unfinished "
    return cmd + f"  --pipeline_control {job}"


def test_extract_gui_jobs_run(mics_set, tmp_path, monkeypatch, capsys):
    """Extraction, rescaled extraction, re-extraction with re-centring, and a continue (only_do_unfinished)."""
    monkeypatch.chdir(tmp_path)
    jobs = {
        "Extract/job007/": _extract_gui(mics_set, "Extract/job007/", f"--coord_list {mics_set}/coordinates.star",
                                        128, None),
        "Extract/job008/": _extract_gui(mics_set, "Extract/job008/", f"--coord_list {mics_set}/coordinates.star",
                                        128, 64),
        "Extract/job020/": _extract_gui(mics_set, "Extract/job020/",
                                        f"--reextract_data_star {mics_set}/particles_mic_refined.star --recenter "
                                        f"--recenter_x 0 --recenter_y 0 --recenter_z 0", 128, 64),
    }
    for job, cmd in jobs.items():
        assert main([*relion(cmd), "--no_progress"]) == 0, cmd
        assert (Path(job) / EXIT_SUCCESS).is_file()
        t = read_particles(Path(job) / "particles.star")
        assert t.nr_particles > 0
        size = int(t.optics["rlnImageSize"].iloc[0])
        assert size == (128 if job.endswith("007/") else 64)
    # the re-extraction's coordinate list: one <stack root>_extract.star per micrograph, every particle once, and
    # usable as the coordinates of another Extract job (--coord_list), which cuts the same re-centred boxes
    pick = starfile.read("Extract/job020/extractpick.star")
    assert list(pick.columns) == ["rlnMicrographName", "rlnMicrographCoordinates"]
    parts = read_particles(Path("Extract/job020/particles.star")).particles
    per_mic = [starfile.read(f) for f in pick["rlnMicrographCoordinates"]]
    assert sum(len(t) for t in per_mic) == len(parts)
    assert all(f.endswith("_extract.star") and Path(f).is_file() for f in pick["rlnMicrographCoordinates"])
    again = _extract_gui(mics_set, "Extract/job021/", "--coord_list Extract/job020/extractpick.star", 128, 64)
    assert main([*relion(again), "--no_progress"]) == 0
    boxes = [mrcfile.read(s) for s in sorted(Path("Extract/job020").rglob("*.mrcs"))]
    boxes_again = [mrcfile.read(s) for s in sorted(Path("Extract/job021").rglob("*.mrcs"))]
    assert len(boxes) == len(boxes_again) and all(np.allclose(a, b, atol=1e-3) for a, b in zip(boxes, boxes_again))
    # the continue job keeps the complete stacks and writes the same particles
    first = (Path("Extract/job008/particles.star")).read_text()
    stacks = sorted(Path("Extract/job008").rglob("*.mrcs"))
    mtimes = [s.stat().st_mtime_ns for s in stacks]
    cont = _extract_gui(mics_set, "Extract/job008/", f"--coord_list {mics_set}/coordinates.star", 128, 64, cont=True)
    assert main([*relion(cont), "--no_progress"]) == 0
    assert [s.stat().st_mtime_ns for s in stacks] == mtimes, "--only_do_unfinished re-extracted finished stacks"
    assert Path("Extract/job008/particles.star").read_text() == first


# ------------------------------------------------------------------------------------------------ reconstruct, postprocess


@pytest.fixture(scope="module")
def half_maps(small_set, tmp_path_factory):
    """Unfiltered half maps made with the tutorial's relion_reconstruct command from 400 true poses."""
    work = tmp_path_factory.mktemp("post")
    truth = _subset_star(small_set / "truth.star", 400, work / "truth400.star")
    for h in (1, 2):
        cmd = (f"relion_reconstruct --i {truth} --o {work}/Refine3D/job019/run_half{h}_class001_unfil.mrc --ctf "
               f"--sym D2 --subset {h} --j 1 --pipeline_control {work}/Reconstruct/")
        assert main(relion(cmd)) == 0
    assert (work / "Reconstruct" / EXIT_SUCCESS).is_file()
    return work


@pytest.mark.parametrize("variant", ["auto_bfac", "adhoc", "skip_weighting"])
def test_postprocess_gui_job_runs(half_maps, small_set, variant, monkeypatch):
    monkeypatch.chdir(half_maps)
    sharpen = {"auto_bfac": " --auto_bfac  --autob_lowres 10 ", "adhoc": " --adhoc_bfac -1000 ",
               "skip_weighting": " --skip_fsc_weighting  --low_pass 5 "}[variant]
    job = f"PostProcess/{variant}/"
    cmd = (f"`which relion_postprocess` --mask {small_set / 'mask.mrc'} --i Refine3D/job019/run_half1_class001_unfil.mrc "
           f"--o {job}postprocess  --angpix -1{sharpen}  --pipeline_control {job}")
    assert main(relion(cmd)) == 0
    assert (Path(job) / EXIT_SUCCESS).is_file()
    for f in ("postprocess.mrc", "postprocess_masked.mrc", "postprocess.star"):
        assert (Path(job) / f).is_file()


def test_reconstruct_fom_weighting_and_3d_rot(half_maps, small_set, tmp_path, capsys):
    """--fom_weighting weights each particle by rlnParticleFigureOfMerit (all 0 but one half = that half only)."""
    blocks = starfile.read(half_maps / "truth400.star", always_dict=True)
    p = blocks["particles"]
    p["rlnParticleFigureOfMerit"] = (p["rlnRandomSubset"] == 1).astype(float)
    star = tmp_path / "fom.star"
    starfile.write(blocks, star)
    out = tmp_path / "fom.mrc"
    assert main(["reconstruct", "--i", str(star), "--o", str(out), "--ctf", "--sym", "D2", "--fom_weighting"]) == 0
    weighted, _ = read_map(out)
    half1, _ = read_map(half_maps / "Refine3D/job019/run_half1_class001_unfil.mrc")
    assert np.corrcoef(weighted.ravel(), half1.ravel())[0, 1] > 0.999
    capsys.readouterr()
    assert main(["reconstruct", "--i", str(star), "--o", str(tmp_path / "x.mrc"), "--3d_rot"]) == 2
    assert "--3d_rot: needs 3D images" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ image handler


def test_image_handler_relion_options(small_set, tmp_path, capsys):
    ref = str(small_set / "reference.mrc")
    data, apix = read_map(ref)
    assert main(["image-handler", "--i", ref, "--multiply_constant", "2", "--invert_contrast",
                 "--o", str(tmp_path / "m.mrc")]) == 0
    np.testing.assert_allclose(read_map(tmp_path / "m.mrc")[0], -2 * data, rtol=1e-5, atol=1e-7)
    assert main(["image-handler", "--i", ref, "--highpass", "20", "--o", str(tmp_path / "h.mrc")]) == 0
    assert main(["image-handler", "--i", ref, "--lowpass", "20", "--o", str(tmp_path / "l.mrc")]) == 0
    hp, lp = read_map(tmp_path / "h.mrc")[0], read_map(tmp_path / "l.mrc")[0]
    np.testing.assert_allclose(hp + lp, data, atol=1e-6 * np.abs(data).max() + 1e-9)
    assert abs(float(hp.mean())) < 1e-6 * np.abs(data).max(), "a high-pass removes the mean"
    capsys.readouterr()
    assert main(["image-handler", "--i", ref, "--stats"]) == 0
    line = capsys.readouterr().out.strip()
    assert f"(x,y,z,n)= 64 x 64 x 64 x 1 ; avg= {data.mean():g}" in line and f"angpix = {apix:g}" in line
    assert not list(tmp_path.glob("*stats*"))


# ------------------------------------------------------------------------------------------------ STAR reading


QUOTED_STAR = """# written by hand: RELION's and the STAR grammar's quoting
data_particles

loop_
_rlnImageName #1
_rlnMicrographName #2
_rlnGroupName #3
_rlnDefocusU #4
_rlnOddZernike #5
_rlnComment
000001@Stacks/a.mrcs 'Movies/mic 1.mrc' "" 10000.5 [0.1,0.2] 'it's one'
000002@Stacks/a.mrcs "Movies/mic 2.mrc" 'group two' 12000 [0.3, 0.4] ""   # a comment
# a comment line
000003@Stacks/a.mrcs Movies/mic3.mrc g3 13000 [] plain

data_optics

loop_
_rlnOpticsGroup
_rlnOpticsGroupName #2
_rlnImagePixelSize #3
_rlnVoltage #4
_rlnEvenZernike #5
1 "optics group 1" 2.5 300 [0.5,0.6]

data_general

_rlnFinalResolution   4.5   # a comment
_rlnMaskName 'my mask.mrc'
_rlnEmpty ""
"""


def test_star_quoted_values_land_in_their_columns(tmp_path):
    from cryorefine.io.star import read_star
    path = tmp_path / "quoted.star"
    path.write_text(QUOTED_STAR)
    b = read_star(path)
    p = b["particles"]
    assert list(p.columns) == ["rlnImageName", "rlnMicrographName", "rlnGroupName", "rlnDefocusU",
                               "rlnOddZernike", "rlnComment"]
    assert p["rlnMicrographName"].tolist() == ["Movies/mic 1.mrc", "Movies/mic 2.mrc", "Movies/mic3.mrc"]
    assert p["rlnGroupName"].tolist() == ["", "group two", "g3"]
    assert p["rlnDefocusU"].tolist() == [10000.5, 12000.0, 13000.0] and p["rlnDefocusU"].dtype == np.float64
    assert p["rlnOddZernike"].tolist() == ["[0.1,0.2]", "[0.3, 0.4]", "[]"]
    assert p["rlnComment"].tolist() == ["it's one", "", "plain"]
    o = b["optics"]
    assert o["rlnOpticsGroupName"].tolist() == ["optics group 1"] and o["rlnVoltage"].tolist() == [300]
    assert o["rlnEvenZernike"].tolist() == ["[0.5,0.6]"]
    assert b["general"] == {"rlnFinalResolution": 4.5, "rlnMaskName": "my mask.mrc", "rlnEmpty": ""}
    t = read_particles(path)        # blocks in any order; the particle table reads through
    assert t.nr_particles == 3 and t.optics["rlnImagePixelSize"].tolist() == [2.5]


def test_star_plain_loop_round_trip_is_unchanged(small_set, tmp_path):
    """The fast reader (no quotes) and the writer: values written and read back are the same."""
    from cryorefine.io.star import write_particles
    t = read_particles(small_set / "particles.star")
    t.particles["rlnMicrographName"] = [f"Movies/mic {i}.mrc" for i in range(t.nr_particles)]   # now quoted
    write_particles(tmp_path / "rt.star", t)
    u = read_particles(tmp_path / "rt.star")
    assert u.particles["rlnMicrographName"].tolist() == t.particles["rlnMicrographName"].tolist()
    np.testing.assert_allclose(u.particles["rlnDefocusU"], t.particles["rlnDefocusU"], rtol=1e-6)


def test_star_wrong_number_of_values_names_the_row(tmp_path):
    from cryorefine.errors import InputError
    from cryorefine.io.star import read_star
    path = tmp_path / "short.star"
    path.write_text("data_x\nloop_\n_a\n_b\n1 'x y'\n2\n")
    with pytest.raises(InputError, match=r"short.star: data_x loop row 2"):
        read_star(path)


def test_relion30_file_is_read_for_metadata_without_its_stacks(tmp_path):
    """A RELION 3.0 particle file whose stacks are elsewhere: metadata read, upgraded, box left to the images."""
    path = tmp_path / "relion30.star"
    path.write_text(
        "\ndata_\n\nloop_\n_rlnImageName #1\n_rlnMicrographName #2\n_rlnDefocusU #3\n_rlnDefocusV #4\n"
        "_rlnDefocusAngle #5\n_rlnVoltage #6\n_rlnSphericalAberration #7\n_rlnAmplitudeContrast #8\n"
        "_rlnMagnification #9\n_rlnDetectorPixelSize #10\n_rlnOriginX #11\n_rlnOriginY #12\n"
        "000001@Particles/Micrographs/mic1_particles.mrcs Micrographs/mic1.mrc 10000 9800 12 300 2.7 0.1 "
        "10000 14 1.5 -2\n"
        "000002@Particles/Micrographs/mic1_particles.mrcs Micrographs/mic1.mrc 10100 9900 12 300 2.7 0.1 "
        "10000 14 -1 0.5\n")
    t = read_particles(path)
    assert t.version == "3.0" and t.nr_particles == 2
    assert t.optics["rlnImagePixelSize"].tolist() == [14.0]
    np.testing.assert_allclose(t.particles["rlnOriginXAngst"], [21.0, -14.0])
    np.testing.assert_allclose(t.particles["rlnOriginYAngst"], [-28.0, 7.0])
    assert "rlnImageSize" not in t.optics.columns          # found from the stack when images are read


# ------------------------------------------------------------------------------------------------ progress in run.out


def test_progress_lines_reach_a_redirected_stdout_during_the_estep(small_set, tmp_path):
    """`cryorefine refine ... > run.out` (stdout not a terminal): progress with ETA appears while the E-step runs."""
    # iteration 2 (all orientations significant after the cross-correlation iteration: seconds per half) lasts well
    # beyond the 0.5 s between progress lines; iteration 1 alone took < 0.5 s per half on a fast idle machine
    star = _subset_star(small_set / "particles.star", 400, tmp_path / "p.star")
    out = tmp_path / "Refine3D" / "job001"
    out.mkdir(parents=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "cryorefine", "refine", "--i", str(star), "--ref", str(small_set / "reference.mrc"),
           "--o", str(out / "run"), "--sym", "D2", "--ini_high", "50", "--particle_diameter", "150",
           "--auto_iter_max", "2", "--batch_size", "4", "--j", "1"]
    run_out = out / "run.out"
    seen_during = None
    with open(run_out, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.PIPE, env=env, cwd=tmp_path)
        try:
            while proc.poll() is None:
                for line in run_out.read_text().splitlines():
                    if line.startswith(" E-step half") and " 0/" not in line and "(100%)" not in line:
                        seen_during = line
                if seen_during:
                    break
                time.sleep(0.2)
        finally:
            if proc.poll() is None:       # seen while it ran: the rest of the run is not this test's business
                proc.kill()
                proc.wait(timeout=60)
            elif proc.returncode != 0:
                pytest.fail(proc.stderr.read().decode())
    assert seen_during is not None, "no progress line in run.out while the E-step ran"
    assert "ETA" in seen_during and "elapsed" in seen_during
    text = run_out.read_text()
    assert text.count(" Auto-refine: Iteration= 1") == 1, "stdout and the log are one file: each line once"


def test_closing_lines_of_a_converged_run_name_cryorefine_postprocess():
    """The last lines of a converged run: RELION's Auto-refine block, then the summary naming cryorefine postprocess."""
    import io
    from types import SimpleNamespace

    from cryorefine.refine.command import summary_lines
    from cryorefine.refine.log import RunLog
    from cryorefine.refine.loop import final_messages
    from cryorefine.refine.state import Counters

    c = Counters(iteration=14, current_resolution=1 / 6.25, has_converged=True)
    run = SimpleNamespace(opts=SimpleNamespace(fn_out="Refine3D/job019/run", solvent_correct_fsc=False), counters=c)
    out = io.StringIO()
    log = RunLog(None, stream=out)
    run.log = log
    final_messages(run)
    for line in summary_lines(run, 3725.0, 1.5):
        log.line(line)
    text = out.getvalue()
    assert "relion_postprocess" not in text and "cryorefine postprocess to mask" in text
    lines = text.splitlines()
    assert lines[-1].startswith(" Next: cryorefine postprocess --i Refine3D/job019/run_half1_class001_unfil.mrc")
    assert " Iterations: 14 (converged)" in lines and " Reported resolution (gold-standard FSC, unmasked): 6.25 A" in lines
    assert any("Wall time: 62.1 min" in ln and "peak memory: 1.50 GiB" in ln for ln in lines)
    assert any("Refine3D/job019/run_class001.mrc" in ln for ln in lines)


def test_maskcreate_gui_job_runs(small_set, tmp_path, monkeypatch):
    """getCommandsMaskcreateJob with the GUI defaults (15 Å low-pass, threshold 0.02, extend 3, edge 3)."""
    monkeypatch.chdir(tmp_path)
    cmd = (f"`which relion_mask_create` --i {small_set / 'truth.mrc'} --o MaskCreate/job020/mask.mrc --lowpass 15 "
           f"--ini_threshold 0.02 --extend_inimask 3 --width_soft_edge 3 --j 1  --pipeline_control MaskCreate/job020/")
    assert main(relion(cmd)) == 0
    assert (tmp_path / "MaskCreate/job020" / EXIT_SUCCESS).is_file()
    mask, apix = read_map(tmp_path / "MaskCreate/job020/mask.mrc")
    truth, truth_apix = read_map(small_set / "truth.mrc")
    assert apix == pytest.approx(truth_apix) and mask.min() >= 0 and mask.max() == 1
    assert 0 < ((mask > 0) & (mask < 1)).mean() < 0.5          # a soft edge, not a box
    assert mask[truth > 0.5 * truth.max()].min() == 1          # the density is inside


def test_relion_refine_leaves_out_what_its_command_line_leaves_out():
    """relion_refine's switches are off unless given (the GUI's "Do CTF-correction? No" writes no --ctf); its
    --ini_high, --low_resol_join_halves and --offset_range defaults are -1, -1 and 6 (ml_optimiser.cpp parseInitial),
    not cryorefine refine's GUI defaults. Given options are kept."""
    from cryorefine.cli import relion_defaults
    bare = ("`which relion_refine` --o Refine3D/job033/run --auto_refine --split_random_halves --i P.star --ref R.mrc "
            "--pad 2 --particle_diameter 140 --flatten_solvent --oversampling 1 --healpix_order 2 --sym D2 --norm "
            "--offset_step 2 --j 1")
    args = build_parser("refine").parse_args(gui(bare))
    args._argv = gui(bare)[1:]
    relion_defaults("relion_refine", args)
    opts = options_from_args(args)
    assert not opts.ctf and not opts.zero_mask and not opts.scale and not opts.firstiter_cc
    assert opts.flatten_solvent and opts.norm, "given switches stay on"
    assert opts.ini_high == -1 and opts.low_resol_join_halves == -1 and opts.offset_range_px == 6
    assert "--no_ctf" in opts.command_line and "--ref_is_absolute_greyscale" in opts.command_line
    assert "--no_ctf" in "\n".join(compatibility_notes(args))
    # the same line through cryorefine's own name keeps the GUI defaults
    own = options_from_args(build_parser("refine").parse_args(gui(bare)))
    assert own.ctf and own.zero_mask and own.firstiter_cc and own.ini_high == 60
    # a full GUI line is unchanged by RELION's defaults
    args = build_parser("refine").parse_args(gui(REFINE_ALL_OPTIONS))
    args._argv = gui(REFINE_ALL_OPTIONS)[1:]
    relion_defaults("relion_refine_mpi", args)
    opts = options_from_args(args)
    assert opts.ctf and opts.zero_mask and opts.firstiter_cc and opts.ini_high == 50 and opts.offset_range_px == 5
    assert opts.low_resol_join_halves == 40 and not args._relion_defaults


def test_negative_numbers_in_exponent_form_are_values():
    """RELION reads `--adhoc_bfac -1e2`; argparse took -1e2 for an option ('expected one argument')."""
    args = build_parser("postprocess").parse_args(["postprocess", "--i", "h1.mrc", "--adhoc_bfac", "-1e2"])
    assert args.adhoc_bfac == -100.0
    args = build_parser("mask-create").parse_args(["mask-create", "--i", "m.mrc", "--o", "x.mrc",
                                                   "--ini_threshold", "-2.5E-3"])
    assert args.ini_threshold == pytest.approx(-2.5e-3)


def test_version_of_every_program(capsys, tmp_path):
    """`relion_refine --version` (and every other program name) prints the version, as RELION's programs do."""
    from cryorefine import __version__
    for argv in (["relion_refine", "--version"], ["relion_reconstruct", "--version"], ["postprocess", "--version"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"cryorefine {__version__}"
    assert main(["relion-names", ""]) == 2 and "give the folder" in capsys.readouterr().err


def test_verb_is_accepted_by_every_program():
    """Every RELION program takes --verb (1 normal, 0 silent); scripts that pass it run unchanged."""
    from cryorefine.cli import COMMANDS
    for name in COMMANDS:
        parser = build_parser(name)
        sub = parser._subparsers._group_actions[0].choices[name]
        assert "--verb" in sub._option_string_actions, name
    args = build_parser("refine").parse_args(["refine", "--i", "a.star", "--ref", "r.mrc", "--o", "x", "--verb", "0"])
    assert args.verb == 0


def test_an_option_given_twice_takes_the_last_value_with_a_warning(small_set, tmp_path, capsys):
    """RELION's IOParser: "was specified more than once. The value specified the last is used."."""
    src = small_set / "reference.mrc"
    assert main(["image-handler", "--i", str(src), "--lowpass", "10", "--o", str(tmp_path / "a.mrc"),
                 "--o", str(tmp_path / "b.mrc"), "--lowpass=20"]) == 0
    err = capsys.readouterr().err
    assert "--o was given more than once" in err and "--lowpass was given more than once" in err
    assert not (tmp_path / "a.mrc").exists() and (tmp_path / "b.mrc").exists()
    assert main(["image-handler", "--i", str(src), "--lowpass", "20", "--o", str(tmp_path / "c.mrc")]) == 0
    np.testing.assert_array_equal(read_map(tmp_path / "b.mrc")[0], read_map(tmp_path / "c.mrc")[0])


def test_pipeline_control_that_is_a_file_is_refused_before_any_work(small_set, tmp_path, capsys):
    """The pipeliner would never see the job end (the exit marker cannot be made inside a file)."""
    (tmp_path / "pc").write_text("")
    out = tmp_path / "lp.mrc"
    assert main(["image-handler", "--i", str(small_set / "reference.mrc"), "--lowpass", "20", "--o", str(out),
                 "--pipeline_control", str(tmp_path / "pc")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--pipeline_control" in err and "is a file" in err, err
    assert not out.exists()
