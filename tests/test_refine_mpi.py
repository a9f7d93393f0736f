"""The same refinement on one process and on two MPI ranks (mpiexec, mpi4py) gives the same answer."""

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


@pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (pip install mpich)")
def test_two_ranks_match_one_process(subset: Path, small_set: Path):
    ref = small_set / "reference.mrc"
    one = subprocess.run(_cmd(subset, ref, "one/run"), capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([MPIEXEC, "-n", "2", *_cmd(subset, ref, "two/run")], capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-2000:]
    per_rank = max(1, len(os.sched_getaffinity(0)) // 2)     # the node's cores shared by its 2 ranks
    assert f"on 2 MPI processes, {per_rank} thread(s) each" in two.stdout
    assert two.stdout.count("Auto-refine: Iteration= 2") == 1           # only rank 0 logs
    a = starfile.read(subset / "one/run_it002_data.star", always_dict=True)["particles"]
    b = starfile.read(subset / "two/run_it002_data.star", always_dict=True)["particles"]
    for col in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"):
        same = np.isclose(a[col], b[col], atol=1e-2)
        assert same.mean() > 0.97, (col, same.mean())
    for h in (1, 2):
        m1, _ = read_map(subset / f"one/run_it002_half{h}_class001.mrc")
        m2, _ = read_map(subset / f"two/run_it002_half{h}_class001.mrc")
        assert np.corrcoef(m1.ravel(), m2.ravel())[0, 1] > 0.999


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
