"""`cryorefine refine --continue`: restore() gives back the state a run held when it wrote an iteration, and a
continued run writes the next iteration; bad optimiser files are one-line errors (exit 2)."""

from __future__ import annotations

import copy
import subprocess
import sys
from dataclasses import astuple, fields, replace
from pathlib import Path

import numpy as np
import pytest

from cryorefine.cli import build_parser, main
from cryorefine.io.star import read_particles, read_star, write_particles, write_star
from cryorefine.refine.command import options_from_args
from cryorefine.refine.log import RunLog
from cryorefine.refine.loop import run_refinement
from cryorefine.refine.restart import iteration_rng
from cryorefine.refine.setup import initialise

ROOT = Path(__file__).resolve().parent.parent
N_PARTICLES = 200
OPTIONS = ["--ini_high", "50", "--sym", "D2", "--particle_diameter", "150", "--quiet"]


def _subset(src: Path, dst: Path, start: int, n: int) -> Path:
    """Particles start..start+n of a STAR file, image names made absolute so the STAR can live anywhere."""
    t = read_particles(src)
    p = t.particles.iloc[start:start + n].copy()
    # read_particles gives names that open from the current folder
    p["rlnImageName"] = [f"{i}@{Path(f).resolve()}" for i, f in (s.split("@", 1) for s in p["rlnImageName"])]
    write_particles(dst, replace(t, particles=p.reset_index(drop=True)))
    return dst


def _argv(star: Path, ref: Path, out: Path, *extra: str) -> list[str]:
    return ["refine", "--i", str(star), "--ref", str(ref), "--o", str(out), *OPTIONS, *extra]


def _fresh_run(star: Path, ref: Path, out: Path, *extra: str):
    """A newly initialised run state with the command line's options (with --continue: the restored state)."""
    args = build_parser("refine").parse_args(_argv(star, ref, out, *extra))
    opts = options_from_args(args)
    return initialise(opts, RunLog(None, quiet=True))


def _snapshot(run) -> dict:
    """Deep copy of the state restore() must give back."""
    return {"models": copy.deepcopy(run.models), "sampling": copy.deepcopy(run.sampling),
            "counters": copy.deepcopy(run.counters), "poses": run.poses.copy(),
            "subset": run.data.subset.copy(), "seed": run.opts.random_seed, "estep_stats": run.estep_stats}


@pytest.fixture(scope="module")
def star(small_set, tmp_path_factory) -> Path:
    return _subset(small_set / "particles.star", tmp_path_factory.mktemp("stars") / "sub.star", 0, N_PARTICLES)


@pytest.fixture(scope="module")
def uninterrupted(star, small_set, tmp_path_factory):
    """In-process run: iteration 1, snapshot, iteration 2 (rng seeded per iteration as restore() does), snapshot."""
    out = tmp_path_factory.mktemp("a") / "run"
    run = _fresh_run(star, small_set / "reference.mrc", out)
    run = run_refinement(replace(run, opts=replace(run.opts, auto_iter_max=1)))
    after1 = _snapshot(run)
    run = run_refinement(replace(run, opts=replace(run.opts, auto_iter_max=2), start_iteration=2))
    return out, after1, _snapshot(run)


def _close(a, b, rtol=1e-6, atol=1e-6) -> bool:
    return np.allclose(np.asarray(a, float), np.asarray(b, float), rtol=rtol, atol=atol)


def _check_state(run, want: dict) -> None:
    """Restored run == snapshot, to the precision of the STAR text (%.6f / %.6e); maps and integers exactly."""
    s, w = run.sampling, want["sampling"]
    for f in fields(s):
        a, b = getattr(s, f.name), getattr(w, f.name)
        assert (a == b) if isinstance(b, (bool, int)) else _close(a, b), f"sampling.{f.name}: {a} != {b}"
    c, w = run.counters, want["counters"]
    for f in fields(c):
        if f.name in ("coarse_size", "sampling_note"):      # recomputed at the start of each iteration
            continue
        a, b = getattr(c, f.name), getattr(w, f.name)
        if f.name in ("current_resolution", "best_resolution"):
            assert a == b, f"counters.{f.name}: {a!r} != {b!r} (should be exact shell values)"
        elif b is None or isinstance(b, np.ndarray):
            assert (a is None) == (b is None) and (b is None or _close(a, b)), f"counters.{f.name}"
        else:
            assert (a == b) if isinstance(b, (bool, int)) else _close(a, b), f"counters.{f.name}: {a} != {b}"
    for h, (m, w) in enumerate(zip(run.models, want["models"]), 1):
        assert np.array_equal(m.volume, w.volume), f"half {h} map"
        assert m.sigma2.keys() == w.sigma2.keys()
        for o in w.sigma2:
            assert _close(m.sigma2[o], w.sigma2[o], rtol=1e-6, atol=0), f"half {h} sigma2 of optics group {o}"
        assert _close(m.pdf_direction, w.pdf_direction, rtol=1e-4), f"half {h} pdf_direction"
        for name in ("sigma_offset", "norm_average", "group_scales", "ave_pmax", "log_likelihood"):
            assert _close(getattr(m, name), getattr(w, name)), f"half {h} {name}"
        for name in ("tau2", "ssnr", "sigma2_ref", "coverage"):
            a, b = getattr(m, name), getattr(w, name)
            assert (a is None) == (b is None) and (b is None or _close(a, b)), f"half {h} {name}"
    p, w = run.poses, want["poses"]
    for name in ("rot", "tilt", "psi", "origin_x", "origin_y", "norm_correction", "log_likelihood", "max_prob"):
        assert _close(getattr(p, name), getattr(w, name)), f"poses.{name}"
    assert np.array_equal(p.nr_significant, w.nr_significant)
    assert np.array_equal(run.data.subset, want["subset"])
    a, b = run.estep_stats, want["estep_stats"]     # the memory plan's counts of the last E-step
    assert (a is None) == (b is None) and (b is None or _close(astuple(a), astuple(b))), "estep_stats"


@pytest.mark.parametrize("iteration", [1, 2])
def test_restore_gives_back_the_written_state(uninterrupted, star, small_set, tmp_path, iteration):
    out, after1, after2 = uninterrupted
    want = after1 if iteration == 1 else after2
    # another --random_seed draws other half-sets; the restored run must take the written ones and the seed
    run = _fresh_run(star, small_set / "reference.mrc", tmp_path / "run", "--random_seed", "7",
                     "--continue", str(out) + f"_it{iteration:03d}_optimiser.star")
    assert run.start_iteration == iteration + 1
    _check_state(run, want)
    assert run.counters.iteration == iteration
    assert np.array_equal(iteration_rng(run.opts.random_seed, iteration + 1).random(4),
                          iteration_rng(want["seed"], iteration + 1).random(4))


def test_continue_on_the_command_line_matches_the_uninterrupted_run(uninterrupted, star, small_set, tmp_path):
    out_a, _, _ = uninterrupted
    out_b = tmp_path / "b" / "run"
    argv = _argv(star, small_set / "reference.mrc", out_b, "--auto_iter_max", "2",
                 "--continue", str(out_a) + "_it001_optimiser.star")
    proc = subprocess.run([sys.executable, "-m", "cryorefine", *argv], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert not list(out_b.parent.glob("run_it00[01]_*")), "a continued run must not rewrite earlier iterations"
    opt = read_star(str(out_b) + "_it002_optimiser.star")["optimiser_general"]
    assert opt["rlnCurrentIteration"] == 2
    # --ref and --ini_high of the command line shape only a new run's start: said so, not silently dropped
    assert " --ref, --ini_high: not used when continuing" in Path(f"{out_b}.out").read_text()
    # same state to text precision + same per-iteration random numbers -> the same iteration 2
    a = read_particles(str(out_a) + "_it002_data.star").particles
    b = read_particles(str(out_b) + "_it002_data.star").particles
    assert np.array_equal(a["rlnRandomSubset"], b["rlnRandomSubset"])
    same = np.isclose(a["rlnAngleRot"], b["rlnAngleRot"], atol=1e-3) & \
        np.isclose(a["rlnAngleTilt"], b["rlnAngleTilt"], atol=1e-3) & \
        np.isclose(a["rlnAnglePsi"], b["rlnAnglePsi"], atol=1e-3)
    assert same.mean() >= 0.98, f"only {same.mean():.2%} of the poses agree"
    ga = read_star(str(out_a) + "_it002_half1_model.star")["model_general"]
    gb = read_star(str(out_b) + "_it002_half1_model.star")["model_general"]
    assert ga["rlnCurrentResolution"] == gb["rlnCurrentResolution"]
    assert gb["rlnLogLikelihood"] == pytest.approx(ga["rlnLogLikelihood"], rel=1e-5)
    # the FSC inside the current image size; its outermost shell is left out: Fourier samples right at r_max
    # go in or out with the 1e-6 rounding of the written perturbation
    fa, fb = (read_star(str(o) + "_it002_half1_model.star")["model_class_1"]["rlnGoldStandardFsc"].to_numpy()
              for o in (out_a, out_b))
    inner = ga["rlnCurrentImageSize"] // 2
    assert _close(fa[:inner], fb[:inner], atol=1e-3)


def _error_line(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_bad_optimiser_files_are_one_line_errors(uninterrupted, star, small_set, tmp_path, capsys):
    out_a, _, _ = uninterrupted
    ref = small_set / "reference.mrc"
    good = Path(str(out_a) + "_it001_optimiser.star")

    missing = tmp_path / "gone_it001_optimiser.star"
    line = _error_line(capsys, _argv(star, ref, tmp_path / "r1", "--continue", str(missing)))
    assert str(missing) in line

    garbage = tmp_path / "garbage_it001_optimiser.star"
    garbage.write_text("this is not a STAR file\n")
    assert str(garbage) in _error_line(capsys, _argv(star, ref, tmp_path / "r2", "--continue", str(garbage)))

    truncated = tmp_path / "cut_it001_optimiser.star"
    truncated.write_text("\n".join(good.read_text().splitlines()[:20]) + "\n")
    line = _error_line(capsys, _argv(star, ref, tmp_path / "r3", "--continue", str(truncated)))
    assert str(truncated) in line and "rlnHasConverged" in line

    # a complete optimiser file whose other files are gone
    alone = tmp_path / "alone" / "run_it001_optimiser.star"
    alone.parent.mkdir()
    alone.write_text(good.read_text().replace(str(out_a), str(tmp_path / "nowhere" / "run")))
    line = _error_line(capsys, _argv(star, ref, tmp_path / "r4", "--continue", str(alone)))
    assert "run_it001_" in line and "no such file" in line

    # another particle set with the same number of particles
    other = _subset(small_set / "particles.star", tmp_path / "other.star", N_PARTICLES, N_PARTICLES)
    line = _error_line(capsys, _argv(other, ref, tmp_path / "r5", "--continue", str(good)))
    assert "run_it001_data.star" in line and "particle set" in line

    # another symmetry
    argv = _argv(star, ref, tmp_path / "r6", "--continue", str(good))
    argv[argv.index("D2")] = "C2"
    assert "run_it001_sampling.star" in _error_line(capsys, argv)


def test_absent_noise_shells_are_filled_from_the_shell_below(uninterrupted, star, small_set, tmp_path):
    out_a, _, after2 = uninterrupted
    root = tmp_path / "run_it002"
    for f in Path(out_a).parent.glob("run_it002_*"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    model = Path(f"{root}_half1_model.star")
    blocks = read_star(model)
    tab = blocks["model_optics_group_1"]
    blocks["model_optics_group_1"] = tab[~tab["rlnSpectralIndex"].isin([0, 5, 6, 7])].reset_index(drop=True)
    write_star(model, blocks)
    run = _fresh_run(star, small_set / "reference.mrc", tmp_path / "c" / "run", "--continue",
                     f"{root}_optimiser.star")
    assert run.start_iteration == 3
    want, got = after2["models"][0].sigma2[0], run.models[0].sigma2[0]
    keep = np.setdiff1d(np.arange(len(want)), [0, 5, 6, 7])
    assert _close(got[keep], want[keep], rtol=1e-6, atol=0)
    assert got[0] == got[1] and np.all(got[5:8] == got[4])
    assert _close(run.models[1].sigma2[0], after2["models"][1].sigma2[0], rtol=1e-6, atol=0)


def test_null_sigma_vector_round_trip_and_errors(tmp_path):
    from cryorefine.errors import InputError
    from cryorefine.io.star import format_star_vector
    from cryorefine.refine.restart import FSC_NULL_SIGMA_LABEL, _shell_vector
    v = np.array([1.0, 0.6071071, 0.0, 1.5e-7])
    block = {FSC_NULL_SIGMA_LABEL: format_star_vector(v)}
    np.testing.assert_array_equal(_shell_vector(block, FSC_NULL_SIGMA_LABEL, tmp_path), v)
    for bad in ("0.1,0.2", "[0.1,abc]", "[]", "[nan,1]"):
        with pytest.raises(InputError, match="run_it001_optimiser.star: _cryorefineFscNullSigma"):
            _shell_vector({FSC_NULL_SIGMA_LABEL: bad}, FSC_NULL_SIGMA_LABEL, tmp_path / "run_it001_optimiser.star")


def test_converged_run_continues_only_to_redo_incomplete_final_files(uninterrupted, tmp_path):
    """A converged run's optimiser (its iteration was the final one): with every final file there, nothing to
    continue, also from the unnumbered run_optimiser.star; with one missing (a run stopped while writing them),
    the final iteration is made again from the iteration before."""
    from cryorefine.errors import InputError
    from cryorefine.refine.restart import FINAL_SUFFIXES, continue_point

    out_a, _, _ = uninterrupted
    for f in Path(out_a).parent.glob("run_it00[12]_*"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    last = tmp_path / "run_it002_optimiser.star"
    general = {**read_star(last)["optimiser_general"], "rlnHasConverged": 1}
    assert continue_point(last, {**general, "rlnHasConverged": 0}) == (last, None)
    for suffix in FINAL_SUFFIXES:
        (tmp_path / f"run{suffix}").write_bytes(b"x")
    for path in (last, tmp_path / "run_optimiser.star"):
        with pytest.raises(InputError, match="converged at iteration 2 and its final files .* were written"):
            continue_point(path, general)
    (tmp_path / "run_half2_class001_unfil.mrc").unlink()
    path, note = continue_point(last, general)
    assert path == tmp_path / "run_it001_optimiser.star"
    assert "run_half2_class001_unfil.mrc missing): making it again from run_it001_optimiser.star" in note
    (tmp_path / "run_it001_optimiser.star").unlink()
    with pytest.raises(InputError, match="run_it001_optimiser.star, from which it would be made again, is not there"):
        continue_point(last, general)


def test_continue_without_o_or_with_the_runs_root_writes_ct_files(uninterrupted, star, small_set, tmp_path):
    """RELION's parseContinue: no --o, or the run's own root, gives <root>_ct<iteration>, so a continued run never
    rewrites the iteration files it goes on from; another --o is used as given."""
    from cryorefine.refine.command import compatibility_notes, continue_arguments, given_dests

    out_a, _, _ = uninterrupted
    opt = str(out_a) + "_it001_optimiser.star"
    for extra in ([], ["--o", str(out_a)], ["--o", str(tmp_path / "new" / "run")]):
        argv = ["refine", "--continue", opt, *extra]
        args = build_parser("refine").parse_args(argv)
        continue_arguments(args, given_dests(argv[1:]))
        want = str(tmp_path / "new" / "run") if extra[-1:] == [str(tmp_path / "new" / "run")] else f"{out_a}_ct1"
        assert args.fn_out == want, extra
        noted = any("_ct1, as RELION's --continue names it" in n for n in compatibility_notes(args))
        assert noted == want.endswith("_ct1"), extra
