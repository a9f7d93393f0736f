"""Time the hot Fourier kernels: extract and insert 5,000 central slices of a padded 128³ map.

    python bench/bench_kernels.py [--n 5000] [--box 128] [--pad 2] [--batch 500] [--order random|local]

Extraction: `project_grid` of full box-size slices (rfft layout, |k| ≤ N/2). Insertion: CTF-weighted
slices (values CTF·P, weights CTF²) over RELION's unique half-plane pixels inside the Nyquist circle,
in batches, as the M-step does. `--order local` lists the rotations as a local search does (refine.estep): per
particle a window of 7 x 7 x 7 (rot, tilt, psi) steps of 0.94 deg (HEALPix order 6) around a random orientation,
windows one after another. Prints wall times and a markdown table row.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cryorefine.fourier import backprojector, projector  # noqa: E402
from cryorefine.fourier.transforms import unique_halfplane_mask  # noqa: E402
from cryorefine.geometry.euler import euler_to_matrix  # noqa: E402

MAP = Path("/work/shared/bench/maps/d2tet_medium_b128_a1.5.mrc")


def random_rotations(rng: np.random.Generator, n: int) -> np.ndarray:
    """Uniform random RELION rotation matrices (n, 3, 3)."""
    tilt = np.degrees(np.arccos(rng.uniform(-1, 1, n)))
    return euler_to_matrix(rng.uniform(-180, 180, n), tilt, rng.uniform(-180, 180, n))


def local_windows(rng: np.random.Generator, n: int, step: float = 0.9375, half: int = 3) -> np.ndarray:
    """n rotation matrices in local-search order: windows of (2 half + 1)³ Euler steps around random orientations."""
    d = step * np.arange(-half, half + 1)
    rot, tilt, psi = (a.ravel() for a in np.meshgrid(d, d, d, indexing="ij"))
    per = rot.size
    centres = rng.uniform([-180, 20, -180], [180, 160, 180], ((n + per - 1) // per, 3))
    r = (centres[:, None, 0] + rot).ravel()[:n]
    t = (centres[:, None, 1] + tilt).ravel()[:n]
    p = (centres[:, None, 2] + psi).ravel()[:n]
    return euler_to_matrix(r, t, p)


def toy_ctf(rng: np.random.Generator, n: int, kx: np.ndarray, ky: np.ndarray, box: int, angpix: float) -> np.ndarray:
    """-sin(χ) with 300 kV, Cs 2.7, 10 % amplitude contrast, random defocus 1-2.5 µm -> (n, m) float32."""
    lam = 0.019687  # Å at 300 kV
    s2 = (kx.astype(np.float64) ** 2 + ky ** 2) / (box * angpix) ** 2
    defocus = rng.uniform(10000, 25000, n)[:, None]
    chi = np.pi * lam * defocus * s2 - 0.5 * np.pi * 2.7e7 * lam ** 3 * s2 ** 2
    return (-(np.sqrt(1 - 0.01) * np.sin(chi) + 0.1 * np.cos(chi))).astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    """Run the two timings and print them."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--box", type=int, default=128)
    ap.add_argument("--pad", type=int, default=2)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--order", choices=("random", "local"), default="random")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    if args.box == 128 and MAP.exists():
        import mrcfile
        volume = mrcfile.read(MAP).astype(np.float32)
    else:
        volume = rng.standard_normal((args.box,) * 3).astype(np.float32)
    n = volume.shape[0]
    rotations = random_rotations(rng, args.n) if args.order == "random" else local_windows(rng, args.n)

    t0 = time.perf_counter()
    proj = projector.make_projector(volume, pad=args.pad)
    t_make = time.perf_counter() - t0
    projector.project_grid(proj, rotations[:2])  # compile outside the timing
    t0 = time.perf_counter()
    slices = np.empty((args.n, n, n // 2 + 1), np.complex64)
    for s in range(0, args.n, args.batch):
        slices[s:s + args.batch] = projector.project_grid(proj, rotations[s:s + args.batch])
    t_extract = time.perf_counter() - t0

    kx, ky = projector.grid_frequencies(n)
    keep = unique_halfplane_mask(n).ravel() & (kx.astype(np.float64) ** 2 + ky ** 2 <= (n / 2) ** 2)
    kx, ky = kx[keep], ky[keep]
    values = slices.reshape(args.n, -1)[:, keep]
    del slices
    ctf = toy_ctf(rng, args.n, kx, ky, n, 1.5)
    values *= ctf
    weights = ctf * ctf
    bp = backprojector.make_backprojector(n, pad=args.pad)
    backprojector.insert(bp, rotations[:2], kx, ky, values[:2], weights[:2])  # compile
    bp = backprojector.make_backprojector(n, pad=args.pad)
    t0 = time.perf_counter()
    for s in range(0, args.n, args.batch):
        backprojector.insert(bp, rotations[s:s + args.batch], kx, ky, values[s:s + args.batch],
                             weights[s:s + args.batch])
    t_insert = time.perf_counter() - t0

    t0 = time.perf_counter()
    backprojector.symmetrise(bp)
    backprojector.reconstruct(bp)
    t_rec = time.perf_counter() - t0

    import numba
    threads = numba.get_num_threads()
    print(f"make_projector {t_make:.2f} s; extract {args.n} slices {t_extract:.2f} s; "
          f"insert {args.n} slices ({kx.size} px each) {t_insert:.2f} s; symmetrise+reconstruct {t_rec:.2f} s; "
          f"{threads} threads; accumulators {backprojector.memory_bytes(n, args.pad) / 1e6:.0f} MB")
    print("| box | pad | slices | order | extract (s) | insert (s) | make_projector (s) | reconstruct (s) | threads |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {n} | {args.pad} | {args.n} | {args.order} | {t_extract:.2f} | {t_insert:.2f} | {t_make:.2f} "
          f"| {t_rec:.2f} | {threads} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
