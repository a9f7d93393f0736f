"""The same refinement on one process and on three MPI ranks (mpiexec, mpi4py) gives the same answer."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import starfile

from conftest import write_subset
from cryorefine.io.mrc import read_map
from cryorefine.io.star import read_star, write_star

pytest.importorskip("mpi4py")
MPIEXEC = shutil.which("mpiexec")


@pytest.fixture(scope="module")
def subset(small_set: Path, tmp_path_factory) -> Path:
    """200 particles of the small set with their half-sets fixed, so both runs split them the same way."""
    d = tmp_path_factory.mktemp("mpi_subset")
    write_subset(small_set, 200, d / "p.star", alternate_halves=True)
    return d


def _cmd(d: Path, ref: Path, out: str) -> list[str]:
    return [sys.executable, "-m", "cryorefine", "refine", "--i", str(d / "p.star"), "--ref", str(ref),
            "--o", str(d / out), "--ini_high", "50", "--sym", "D2", "--particle_diameter", "150",
            "--auto_iter_max", "2"]


def _same_map(a: Path, b: Path) -> float:
    m1, _ = read_map(a)
    m2, _ = read_map(b)
    return float(np.corrcoef(m1.ravel(), m2.ravel())[0, 1])


@pytest.fixture(scope="module")
def one_process(subset: Path, small_set: Path) -> Path:
    """Two iterations on one process."""
    one = subprocess.run(_cmd(subset, small_set / "reference.mrc", "one/run"), capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    return subset / "one"


@pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (pip install mpich)")
def test_three_ranks_match_one_process(subset: Path, small_set: Path, one_process: Path):
    """Ranks 0 and 1 reconstruct half 1 and half 2 and rank 2 none; every rank gets both maps."""
    ref = small_set / "reference.mrc"
    three = subprocess.run([MPIEXEC, "-n", "3", *_cmd(subset, ref, "three/run")], capture_output=True, text=True)
    assert three.returncode == 0, three.stderr[-2000:]
    per_rank = max(1, len(os.sched_getaffinity(0)) // 3)     # the node's cores shared by its 3 ranks
    assert f"on 3 MPI processes, {per_rank} thread(s) each" in three.stdout
    assert three.stdout.count("Auto-refine: Iteration= 2") == 1           # only rank 0 logs
    a = starfile.read(one_process / "run_it002_data.star", always_dict=True)["particles"]
    b = starfile.read(subset / "three/run_it002_data.star", always_dict=True)["particles"]
    for col in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"):
        same = np.isclose(a[col], b[col], atol=1e-2)
        assert same.mean() > 0.97, (col, same.mean())
    for it in (1, 2):           # iteration 2's search used iteration 1's maps, made on ranks 0 and 1
        for h in (1, 2):
            name = f"run_it{it:03d}_half{h}_class001.mrc"
            assert _same_map(one_process / name, subset / "three" / name) > 0.999, name


@pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (pip install mpich)")
def test_final_iteration_on_three_ranks_matches_one_process(subset: Path, one_process: Path, tmp_path: Path):
    """The final, joined iteration (made on rank 0 from both halves' sums) gives the same maps as on one process:
    iteration 2's optimiser file, marked as ready to converge, is continued by both."""
    shutil.copytree(one_process, tmp_path / "ready")
    ready = tmp_path / "ready" / "run_it002_optimiser.star"
    opt = read_star(ready)
    opt["optimiser_general"].update({"cryorefineHasFineEnoughAngularSampling": "1",
                                     "rlnNumberOfIterWithoutResolutionGain": "1",
                                     "rlnNumberOfIterWithoutChangingAssignments": "1"})
    write_star(ready, opt)
    common = [sys.executable, "-m", "cryorefine", "refine", "--continue", str(ready), "--auto_iter_max", "3"]
    for n, out in ((1, "one"), (3, "three")):
        launch = [MPIEXEC, "-n", str(n)] if n > 1 else []
        r = subprocess.run([*launch, *common, "--o", str(tmp_path / out / "run")], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "Refinement has converged, stopping now" in r.stdout, r.stdout[-3000:]
    for name in ("run_class001.mrc", "run_half1_class001_unfil.mrc", "run_half2_class001_unfil.mrc"):
        assert _same_map(tmp_path / "one" / name, tmp_path / "three" / name) > 0.999, name


def test_mpiexec_with_a_foreign_mpi_library_is_an_error(subset: Path, small_set: Path, tmp_path: Path):
    """A launcher that says 2 processes while mpi4py's library sees one (mpi4py loaded another MPI than mpiexec's,
    as on a machine with a system Open MPI and PyPI's MPICH): one error line, not two whole runs writing the same
    files."""
    env = {**os.environ, "PMI_SIZE": "2"}
    r = subprocess.run(_cmd(subset, small_set / "reference.mrc", "foreign/run"), capture_output=True, text=True,
                       env=env, cwd=tmp_path)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "started by mpiexec as 2 processes" in lines[0], r.stderr[-2000:]
    assert not (subset / "foreign").exists() or not any((subset / "foreign").iterdir())


def test_default_threads_share_the_node_between_its_ranks():
    from cryorefine.parallel.threads import default_threads
    cores = len(os.sched_getaffinity(0))
    assert default_threads(3, 4) == 3                        # --j wins
    assert default_threads(0, 1) == cores                    # one process: every core
    assert default_threads(0, 2) == max(1, cores // 2)
    assert default_threads(0, 4 * cores) == 1                # never 0


FAILING_RANK = '''
import os, signal, sys
from mpi4py import MPI
import cryorefine.refine.loop as loop
from cryorefine.cli import main
maximization = loop.maximization
def fail_on_rank_1(*args, **kwargs):
    if MPI.COMM_WORLD.Get_rank() == 1:
        FAILURE
    return maximization(*args, **kwargs)
loop.maximization = fail_on_rank_1
sys.exit(main(sys.argv[1:]))
'''


@pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (pip install mpich)")
@pytest.mark.parametrize("failure, line", [
    ('raise MemoryError("injected on rank 1")', "cryorefine refine: error: out of memory (injected on rank 1)"),
    ("os.kill(os.getpid(), signal.SIGTERM)", "cryorefine refine: terminated (SIGTERM)"),
], ids=["memory", "sigterm"])
def test_a_failure_on_one_rank_ends_the_job(subset: Path, small_set: Path, tmp_path: Path, failure, line):
    """Memory, disk, a bug or a signal on one rank only: the job ends with its line and RELION's failure marker,
    instead of the other ranks waiting for that one in a collective call forever."""
    script = tmp_path / "fail.py"
    script.write_text(FAILING_RANK.replace("FAILURE", failure))
    cmd = [MPIEXEC, "-n", "2", sys.executable, str(script), *_cmd(subset, small_set / "reference.mrc", "fail/run")[3:],
           "--j", "1", "--pipeline_control", str(tmp_path / "job")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert line in r.stderr, r.stderr[-2000:]
    assert (tmp_path / "job" / "RELION_JOB_EXIT_FAILURE").is_file()
    assert not (tmp_path / "job" / "RELION_JOB_EXIT_SUCCESS").exists()


FAILING_MICROGRAPH = '''
import sys
from mpi4py import MPI
import cryorefine.extract.command as ex
from cryorefine.cli import main
from cryorefine.errors import InputError
extract_one = ex._extract_one
def fail_on_rank_1(job, *args, **kwargs):
    if MPI.COMM_WORLD.Get_rank() == 1:
        raise InputError(f"{job.path}: injected bad micrograph")
    return extract_one(job, *args, **kwargs)
ex._extract_one = fail_on_rank_1
sys.exit(main(sys.argv[1:]))
'''


@pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (pip install mpich)")
def test_extract_shares_micrographs_over_ranks(mics_set: Path, tmp_path: Path):
    """relion_preprocess_mpi: each rank extracts every size-th micrograph and rank 0 writes particles.star; the
    stacks and the STAR file are those of one process. A bad micrograph on one rank stops every rank."""
    args = ["extract", "--i", str(mics_set / "micrographs_ctf.star"), "--coord_list",
            str(mics_set / "coordinates.star"), "--extract", "--extract_size", "64", "--norm", "--bg_radius", "24",
            "--invert_contrast", "--no_progress"]
    one = subprocess.run([sys.executable, "-m", "cryorefine", *args, "--part_dir", "one/"], cwd=tmp_path,
                         capture_output=True, text=True)
    three = subprocess.run([MPIEXEC, "-n", "3", sys.executable, "-m", "cryorefine", *args, "--part_dir", "three/"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0 and three.returncode == 0, three.stderr[-2000:]
    assert three.stdout.count("800 particles from 20 micrographs") == 1        # rank 0 reports
    a = read_star(tmp_path / "one" / "particles.star")["particles"]
    b = read_star(tmp_path / "three" / "particles.star")["particles"]
    assert list(b["rlnImageName"].str.replace("three/", "one/")) == list(a["rlnImageName"])
    stacks = sorted((tmp_path / "one").rglob("*.mrcs"))
    assert len(stacks) == 20
    for s in stacks:
        m1, _ = read_map(s)
        m3, _ = read_map(tmp_path / "three" / s.relative_to(tmp_path / "one"))
        assert np.array_equal(m1, m3), s.name
    script = tmp_path / "fail.py"
    script.write_text(FAILING_MICROGRAPH)
    bad = subprocess.run([MPIEXEC, "-n", "2", sys.executable, str(script), *args, "--part_dir", "bad/"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "injected bad micrograph" in bad.stderr, bad.stderr[-2000:]
    assert not (tmp_path / "bad" / "particles.star").exists()


@pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (pip install mpich)")
def test_reconstruct_shares_particles_over_ranks(small_set: Path, tmp_path: Path):
    """relion_reconstruct_mpi: each rank inserts every size-th particle, the sums are added, rank 0 writes the map:
    the map of one process (to float32 rounding)."""
    args = ["reconstruct", "--i", str(small_set / "truth.star"), "--ctf", "--sym", "D2", "--j", "1"]
    one = subprocess.run([sys.executable, "-m", "cryorefine", *args, "--o", "one.mrc"], cwd=tmp_path,
                         capture_output=True, text=True)
    three = subprocess.run([MPIEXEC, "-n", "3", sys.executable, "-m", "cryorefine", *args, "--o", "three.mrc"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0 and three.returncode == 0, three.stderr[-2000:]
    assert three.stdout.count("wrote three.mrc") + three.stderr.count("wrote three.mrc") == 1
    m1, _ = read_map(tmp_path / "one.mrc")
    m3, _ = read_map(tmp_path / "three.mrc")
    assert np.abs(m1 - m3).max() <= 1e-5 * np.abs(m1).max()
