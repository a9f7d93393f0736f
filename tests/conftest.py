"""Shared fixtures: the standard simulated data sets (made once, cached in data/)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.standard_sets import BENCH, ensure_set  # noqa: E402


def write_subset(set_dir: Path, n: int, dest: Path, alternate_halves: bool = False) -> Path:
    """The first n particles of a standard set as a STAR file at `dest`, with absolute image paths."""
    import numpy as np
    import starfile
    blocks = starfile.read(set_dir / "particles.star", always_dict=True)
    parts = blocks["particles"].head(n).copy()
    parts["rlnImageName"] = [f"{name.split('@')[0]}@{set_dir / 'particles.mrcs'}" for name in parts["rlnImageName"]]
    if alternate_halves:
        parts["rlnRandomSubset"] = np.arange(n) % 2 + 1
    starfile.write({"optics": blocks["optics"], "particles": parts}, dest)
    return dest


@pytest.fixture(scope="session")
def bench_dir() -> Path:
    """shared/bench: maps, simulate.py, score.py."""
    return BENCH


@pytest.fixture(scope="session")
def small_set() -> Path:
    """Standard 'small' set: box 64, 2.5 A/px, 1,000 particles, D2."""
    return ensure_set("small")


@pytest.fixture(scope="session")
def mics_set() -> Path:
    """Standard 'mics' set: 20 micrographs of 1024^2 at 1.5 A/px."""
    return ensure_set("mics")


@pytest.fixture(scope="session")
def noise_set() -> Path:
    """Standard 'noise' set: the small set's geometry with no usable signal."""
    return ensure_set("noise")
