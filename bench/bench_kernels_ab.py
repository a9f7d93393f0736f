"""Interleaved A/B timing of two versions of the slice kernels (`cryorefine/fourier/kernels.py`): extraction and
insertion at a local-search pixel set (medium map, current size 106: 4,404 half-plane pixels) for rotations in
local-window order and in random order.

    git worktree add /tmp/old_tree <commit>
    python bench/bench_kernels_ab.py /tmp/old_tree/cryorefine/fourier/kernels.py [--repeats 6] [--map M --size S]

Each repeat runs both versions one after the other, so that a machine whose speed drifts (shared hosts) affects
both alike; prints the best and the median rate of each (M samples/s) and writes
bench/results/kernels_ab_<map>_s<size>.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# numba's on-disk cache cannot reload functions of a module imported under another name, and entries written
# for one would land beside the package's own (ordinary runs then fail to load them): compile into a fresh dir
os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench_kernels_ab_")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_kernels import MAP, local_windows, random_rotations  # noqa: E402
from cryorefine.fourier import projector  # noqa: E402
from cryorefine.fourier.transforms import unique_halfplane_mask  # noqa: E402


def load_kernels(name: str, path: Path):
    """The kernels module at `path` under another name (it imports only numpy and numba)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    """Time both versions and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("other", type=Path, help="the other kernels.py (e.g. from a git worktree of an older commit)")
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--map", type=Path, default=MAP, help="a map (.mrc or .mrc.gz); default the medium set's")
    ap.add_argument("--size", type=int, default=106, help="current image size of the pixel set (even)")
    args = ap.parse_args(argv)
    from cryorefine.io.mrc import read_map
    volume = read_map(args.map)[0].astype(np.float32)
    size = args.size
    proj = projector.make_projector(volume, pad=2, r_max=min(size // 2 + 1, volume.shape[0] // 2))
    kx, ky = projector.grid_frequencies(size)
    keep = unique_halfplane_mask(size).ravel() & (kx.astype(np.float64) ** 2 + ky ** 2 <= (size // 2) ** 2)
    kx, ky = np.ascontiguousarray(kx[keep]), np.ascontiguousarray(ky[keep])
    versions = {"other": load_kernels("kernels_other", args.other),
                "this": load_kernels("kernels_this", ROOT / "cryorefine" / "fourier" / "kernels.py")}
    rng = np.random.default_rng(0)
    orders = {"local": (local_windows(rng, 20000), local_windows(rng, 10000)),
              "random": (random_rotations(rng, 10000), random_rotations(rng, 4000))}
    results = {}
    r_max = proj.r_max
    for order, (rot_p, rot_i) in orders.items():
        vals = (rng.standard_normal((len(rot_i), kx.size))
                + 1j * rng.standard_normal((len(rot_i), kx.size))).astype(np.complex64)
        wts = rng.random((len(rot_i), kx.size)).astype(np.float32)
        shape = proj.ft3d.shape
        times: dict[str, dict[str, list[float]]] = {v: {"extract": [], "insert": []} for v in versions}
        for _ in range(args.repeats + 1):           # the first round compiles
            for name, k in versions.items():
                t0 = time.perf_counter()
                k.project_points(proj.ft3d, rot_p, kx, ky, proj.pad, r_max)
                times[name]["extract"].append(time.perf_counter() - t0)
                data, weight = np.zeros(shape, np.complex64), np.zeros(shape, np.float32)
                t0 = time.perf_counter()
                k.backproject_points(data, weight, rot_i, kx, ky, vals, wts, proj.pad, size / 2)
                times[name]["insert"].append(time.perf_counter() - t0)
        for name in versions:
            for kind, n in (("extract", len(rot_p) * kx.size), ("insert", len(rot_i) * kx.size)):
                t = np.array(times[name][kind][1:])
                results[f"{order} {kind} {name}"] = {"best_Mps": round(n / t.min() / 1e6, 1),
                                                      "median_Mps": round(n / np.median(t) / 1e6, 1)}
    print("| order | kernel | other: best / median (M/s) | this: best / median (M/s) |")
    print("|---|---|---|---|")
    for order in orders:
        for kind in ("extract", "insert"):
            a, b = results[f"{order} {kind} other"], results[f"{order} {kind} this"]
            print(f"| {order} | {kind} | {a['best_Mps']} / {a['median_Mps']} | {b['best_Mps']} / {b['median_Mps']} |")
    stem = args.map.name.removesuffix(".gz").removesuffix(".mrc")
    out = ROOT / "bench" / "results" / f"kernels_ab_{stem}_s{size}.json"
    out.write_text(json.dumps({"other": str(args.other), "map": str(args.map), "size": size, "repeats": args.repeats,
                               "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
