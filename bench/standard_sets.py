"""The standard simulated data sets of ../shared/bench/README.md, made on demand and cached in data/."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("CRYOREFINE_SHARED", ROOT.parent / "shared"))
BENCH = SHARED / "bench"
DATA = Path(os.environ.get("CRYOREFINE_DATA", ROOT / "data"))

# name -> simulate.py arguments (exactly the commands of shared/bench/README.md "Standard sets")
STANDARD_SETS: dict[str, list[str]] = {
    "small": ["--map", "maps/d2tet_small_b64_a2.5.mrc", "--n", "1000", "--snr", "0.05", "--seed", "11"],
    "medium": ["--map", "maps/d2tet_medium_b128_a1.5.mrc", "--n", "5000", "--snr", "0.05", "--seed", "12"],
    "mics": ["--map", "maps/d2tet_medium_b128_a1.5.mrc", "--n", "0", "--micrographs", "20", "--seed", "13"],
    "noise": ["--map", "maps/d2tet_small_b64_a2.5.mrc", "--n", "1000", "--snr", "1e-6", "--seed", "14"],
    "tutorial": ["--map", "maps/d2tet_tutorial_b256_a1.244.mrc.gz", "--n", "4400", "--snr", "0.05", "--seed", "15"],
}


def ensure_set(name: str) -> Path:
    """Return data/<name>, simulating it first if it is not there yet (deterministic per seed)."""
    out = DATA / name
    if (out / "truth.json").exists():
        return out
    args = [a if not a.startswith("maps/") else str(BENCH / a) for a in STANDARD_SETS[name]]
    tmp = DATA / f".{name}.partial"
    if tmp.exists():
        import shutil
        shutil.rmtree(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, str(BENCH / "simulate.py"), *args, "--quiet", "--out", str(tmp)],
                   check=True, stdout=subprocess.DEVNULL)
    tmp.rename(out)
    return out


if __name__ == "__main__":
    for n in sys.argv[1:] or ["small"]:
        print(ensure_set(n))
