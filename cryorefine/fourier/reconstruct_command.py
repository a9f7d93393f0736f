"""Reconstruct a map from particles with known angles and origins (counterpart of relion_reconstruct).

Like relion_reconstruct (RELION 4/5): each image is shifted by +origin, its transform (DC set to 0) is
multiplied by its CTF (with --ctf; weight CTF²) and inserted at its orientation into a ×pad oversampled
Fourier grid; the grid is symmetrised and divided by the weights, floored at 0.001 of the shell mean
(no regularisation). --dont_skip_gridding uses RELION's iterative (Pipe–Menon, Kaiser–Bessel blob)
density compensation instead. Optics groups with other boxes or pixel sizes are rescaled onto the
output grid.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.fft as sfft
import scipy.special as sps
from numpy.typing import NDArray

from cryorefine.errors import option_error, require
from cryorefine.fourier import backprojector as bpmod
from cryorefine.fourier.aberrations import (OpticsModel, demodulate, model_frequencies, optics_ctf,
                                            with_ctf_switches)
from cryorefine.fourier.ctf import CTF_REQUIRED_COLUMNS, ctf_params_from_table
from cryorefine.fourier.filters import phase_shift_2d
from cryorefine.fourier.transforms import rfft2_centered, rfft_freqs_2d

BATCH = 512          # images read and inserted at a time (memory ~ BATCH · N² · 16 B)
BLOB_RADIUS = 1.9    # RELION reconstruct defaults: --blob_r, --blob_m, --blob_a, --iter
BLOB_ORDER = 0
BLOB_ALPHA = 15.0
GRIDDING_ITER = 10
TABLE_SIZE = 10000  # entries of RELION's tabulated blob transform


def add_arguments(p: argparse.ArgumentParser) -> None:
    """relion_reconstruct's options (the common ones)."""
    p.add_argument("--i", required=True, metavar="STAR", help="particles STAR file with angles and origins")
    p.add_argument("--o", default="relion.mrc", metavar="MRC", help="output map (default relion.mrc)")
    p.add_argument("--sym", default="C1", help="point group (default C1)")
    p.add_argument("--ctf", action="store_true", help="apply CTF correction")
    p.add_argument("--ctf_phase_flipped", action="store_true",
                   help="images have been phase flipped (as rlnCtfDataArePhaseFlipped 1 in data_optics)")
    p.add_argument("--ctf_intact_first_peak", action="store_true",
                   help="the CTF is 1 until its first peak (|gamma| < pi/2), as RELION's")
    p.add_argument("--only_flip_phases", action="store_true",
                   help="correct only the CTF's phases (its sign), not its amplitudes, as RELION's")
    p.add_argument("--subset", type=int, default=-1,
                   help="1 or 2: only particles with this rlnRandomSubset; other values: all (as RELION)")
    p.add_argument("--class", dest="chosen_class", type=int, default=-1,
                   help="only particles with this rlnClassNumber")
    p.add_argument("--maxres", type=float, default=-1.0, help="highest resolution (Å) inserted (default Nyquist)")
    p.add_argument("--angpix", type=float, default=-1.0,
                   help="pixel size of the reconstruction (default: that of the first optics group)")
    p.add_argument("--pad", type=float, default=2, help="padding factor (default 2; RELION reads a number, "
                                                         "a whole one is needed here)")
    p.add_argument("--dont_skip_gridding", action="store_true",
                   help="iterative gridding density compensation instead of the floored division")
    p.add_argument("--iter", type=int, default=GRIDDING_ITER,
                   help="gridding-compensation iterations with --dont_skip_gridding (default 10)")
    p.add_argument("--j", dest="threads", type=int, default=None, help="threads (default: all cores)")
    p.add_argument("--drop_bad_particles", action="store_true",
                   help="leave out particles with impossible values (NaN or infinite angles, origins, defocus ...) "
                        "and say how many, instead of stopping")
    p.add_argument("--angular_error", type=float, default=0.0,
                   help="add Gaussian noise of this s.d. (deg) to each Euler angle (RELION's, to simulate errors)")
    p.add_argument("--shift_error", type=float, default=0.0,
                   help="add Gaussian noise of this s.d. (A) to each origin (RELION's, to simulate errors)")
    p.add_argument("--fom_weighting", action="store_true",
                   help="weight each particle by its rlnParticleFigureOfMerit (image and CTF² weight)")
    p.add_argument("--3d_rot", dest="rot3d", action="store_true",
                   help="RELION: 3D images (subtomograms) rotated instead of 2D back-projection (not available)")
    # RELION ≤ 3.1 spelling; skipping is the default since RELION 4
    p.add_argument("--skip_gridding", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=BATCH, help=argparse.SUPPRESS)


def _log(msg: str, warning: bool = False) -> None:
    """Progress on stdout (as relion_reconstruct), warnings and notes on stderr: an error that comes later is then
    the only line there."""
    print(f"reconstruct: {msg}", file=sys.stderr if warning else sys.stdout, flush=True)


def kaiser_bessel_ft(w: NDArray, radius: float, alpha: float = BLOB_ALPHA, order: int = BLOB_ORDER) -> NDArray:
    """3D Fourier transform (up to a constant) of RELION's Kaiser–Bessel blob of `radius` at frequency w
    (cycles per sample): J_{3/2+m}(σ)/σ^{3/2+m} or I_{3/2+m}(σ)/σ^{3/2+m}, σ = sqrt|α² − (2πaw)²|."""
    w = np.asarray(w, dtype=np.float64)
    x = 2.0 * np.pi * radius * w
    sigma = np.sqrt(np.abs(alpha * alpha - x * x))
    nu = 1.5 + order
    sigma_safe = np.maximum(sigma, 1e-12)
    osc = sps.jv(nu, sigma_safe) / sigma_safe ** nu
    grow = sps.iv(nu, sigma_safe) / sigma_safe ** nu
    return np.where(x > alpha, osc, grow)


def gridding_compensation(bp: bpmod.BackProjector, iterations: int = GRIDDING_ITER,
                          blob_radius: float = BLOB_RADIUS, blob_alpha: float = BLOB_ALPHA,
                          blob_order: int = BLOB_ORDER) -> NDArray[np.float64]:
    """RELION BackProjector::reconstruct without skip_gridding: iterative weights w (half-cube layout) with
    w ← w / max(1e-6, |blob ⊛ (w·W)|) inside |ξ|² < R² (Pipe & Menon 1999, Matej 2001); 0 outside."""
    radius = bp.radius
    d = bp.data.shape[0]                              # RELION's pad_size = 2R + 3
    off = radius + 1
    iz, iy, ix = np.ogrid[:d, :d, :bp.data.shape[2]]
    inside = (ix * ix + (iy - off) ** 2 + (iz - off) ** 2) < radius * radius
    fnew = inside.astype(np.float64)
    if iterations <= 0:
        return fnew
    # circular convolution on a fast FFT size L ≥ D; the data (|ξ| ≤ R+1) plus the blob (≤ 3.8) never wrap
    size = sfft.next_fast_len(d, real=True)
    x = np.fft.fftfreq(size, 1.0 / size)
    # RELION multiplies by FT_blob(|x| / (N·pad)) on its D-grid, where x/D is the frequency: same kernel here
    scale = d / (size * bp.ori_size * bp.pad)
    dist = np.sqrt(x[:, None, None] ** 2 + x[None, :, None] ** 2 + x[None, None, :] ** 2)
    rval = dist * scale
    del dist
    # RELION's TabFtBlob: 10,000 samples on [0, 0.5), looked up by truncation, 0 beyond the table
    sampling = 0.5 / TABLE_SIZE
    # blob radius 2·blob_r whatever the padding (RELION since 2017)
    table = kaiser_bessel_ft(np.arange(TABLE_SIZE) * sampling, blob_radius * 2.0, blob_alpha, blob_order)
    table = np.append(table / table[0], 0.0).astype(np.float32)
    ftblob = table[np.minimum((rval / sampling).astype(np.int64), TABLE_SIZE)]
    del rval
    # RELION's decenter keeps |ξ|² ≤ R² of the weights (the rim voxels beyond R are dropped)
    weight = np.where(ix * ix + (iy - off) ** 2 + (iz - off) ** 2 <= radius * radius, bp.weight, 0.0)
    grid = np.zeros((size, size, size // 2 + 1), np.float32)
    yz = (np.arange(d) - off) % size                  # centred half-cube rows -> FFT order on the L-grid
    for _ in range(iterations):
        grid[:] = 0.0
        grid[np.ix_(yz, yz, np.arange(d // 2 + 1))] = (fnew * weight).astype(np.float32)
        # the half-cube is the rfft layout (x ≥ 0) of a Hermitian-symmetric real kernel; real-space product
        real = sfft.irfftn(grid, s=(size, size, size), workers=-1)
        real *= ftblob
        conv = sfft.rfftn(real, workers=-1)
        del real
        vals = np.abs(conv[np.ix_(yz, yz, np.arange(d // 2 + 1))])
        del conv
        fnew = np.where(inside, fnew / np.maximum(vals, 1e-6), fnew)
    return fnew


def apply_gridding(bp: bpmod.BackProjector, fnew: NDArray) -> None:
    """Fold the compensation weights into the data and set the weights to 1 inside R (0 beyond), so that
    backprojector.reconstruct's division returns data·w (its 0.001·mean floor is then inactive)."""
    radius = bp.radius
    d = bp.data.shape[0]
    off = radius + 1
    iz, iy, ix = np.ogrid[:d, :d, :bp.data.shape[2]]
    inside = (ix * ix + (iy - off) ** 2 + (iz - off) ** 2) <= radius * radius
    bp.data = (bp.data * fnew).astype(bp.data.dtype)
    bp.weight = inside.astype(bp.weight.dtype)


def _require_columns(table, labels: list[str], why: str) -> None:
    missing = [c for c in labels if c not in table.particles.columns]
    require(not missing, f"{table.path}: no {', '.join(missing)} column ({why})")


def _select_rows(table, subset: int, chosen_class: int) -> NDArray[np.int64]:
    """Row positions used: all, or those of one random half / class; InputError naming the option that left none."""
    keep = np.ones(len(table.particles), bool)
    if subset in (1, 2):
        _require_columns(table, ["rlnRandomSubset"], "needed for --subset")
        keep &= table.particles["rlnRandomSubset"].to_numpy().astype(np.int64) == subset
        require(keep.any(), f"--subset {subset}: no particle of {table.path} has rlnRandomSubset {subset}")
    if chosen_class >= 0:
        _require_columns(table, ["rlnClassNumber"], "needed for --class")
        in_class = table.particles["rlnClassNumber"].to_numpy().astype(np.int64) == chosen_class
        require(in_class.any(),
                f"--class {chosen_class}: no particle of {table.path} has rlnClassNumber {chosen_class}")
        keep &= in_class
        require(keep.any(), f"--class {chosen_class}: no particle of {table.path} with rlnClassNumber {chosen_class} "
                            f"is in --subset {subset} (rlnRandomSubset)")
    rows = np.flatnonzero(keep)
    require(rows.size > 0, f"{table.path}: no particles")
    return rows


def _check_memory(box: int, pad: int, r_max: float, gridding: bool) -> None:
    """InputError naming --pad when the padded Fourier grids cannot fit in the memory the machine has available; the
    estimate is a lower bound, so that only a job that would surely run out is refused."""
    from cryorefine.fourier.kernels import half_cube_shape
    from cryorefine.refine.memory import available_bytes, fft_transient_bytes
    avail = available_bytes()
    if avail is None:
        return
    # sized with the padding clipped at 2^20 (the estimate stays a lower bound, more than any machine has), so that
    # --pad 1e308 overflows nothing; Python integers, as numpy's int64 overflows (its "array is too big" traceback)
    radius = int(round(min(pad, 2 ** 20) * r_max))
    accumulators = 12 * math.prod(half_cube_shape(radius))           # data complex64 + weight float32
    transient = fft_transient_bytes(box, min(pad, 2 ** 20))             # the final transform on the (pad·box)³ grid
    if gridding:        # the blob convolution's distances and their scaled copy, doubles on the full (2R+3)³ grid
        transient = max(transient, 16 * (2 * radius + 3) ** 3)
    need = accumulators + transient
    require(need <= avail, f"--pad {pad:.10g}: the padded Fourier grids of box {box} need at least "
                           f"{need / 2 ** 30:.3g} GiB, more than the {avail / 2 ** 30:.3g} GiB available "
                           f"(RELION's default padding is 2)")


def perturbed_poses(particles: pd.DataFrame, angular_error: float, shift_error: float,
                    rng: np.random.Generator) -> pd.DataFrame:
    """A copy with N(0, angular_error²) deg added to rlnAngleRot/Tilt/Psi and N(0, shift_error²) Å to
    rlnOriginX/YAngst, each value its own draw (RELION reconstruct's --angular_error, --shift_error)."""
    out = particles.copy()
    for labels, sd in ((("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"), angular_error),
                       (("rlnOriginXAngst", "rlnOriginYAngst"), shift_error)):
        if sd > 0:
            for label in labels:
                base = out[label].to_numpy(np.float64) if label in out else np.zeros(len(out))
                out[label] = base + rng.normal(0.0, sd, len(out))
    return out


def backproject_table(table, rows: NDArray, bp: bpmod.BackProjector, angpix: float, do_ctf: bool,
                      batch: int = BATCH, progress: bool = True, fom: NDArray | None = None,
                      ctf_switches: dict[str, bool] | None = None, what: str = "particles") -> int:
    """Insert the particles `rows` of a ParticleTable into bp (model box bp.ori_size, pixel `angpix`).

    Each optics group's aberrations are corrected as relion_reconstruct does: the data are demodulated by the
    odd phase (beam tilt, odd Zernikes), the CTF includes the even Zernikes and is evaluated at M·k, and pixel
    k is inserted at the model frequency s·M·k (fourier.aberrations). `fom` (per table row): RELION
    --fom_weighting, both the image and its CTF² weight are multiplied by it. `ctf_switches`: the keywords of
    fourier.aberrations.with_ctf_switches (RELION's --ctf_phase_flipped, --ctf_intact_first_peak, --only_flip_phases).
    """
    from cryorefine.geometry.euler import euler_to_matrix
    from cryorefine.io.particles import ParticleImages
    from cryorefine.io.star import optics_models, particle_optics

    parts = table.particles
    _require_columns(table, ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"], "reconstruction needs angles")
    images = ParticleImages(table)
    group = np.asarray(parts["rlnOpticsGroup"].to_numpy()) if "rlnOpticsGroup" in parts.columns \
        else np.ones(len(parts), np.int64)
    pix = np.asarray(particle_optics(table, "rlnImagePixelSize"), dtype=np.float64)
    ctf_all = ctf_params_from_table(table) if do_ctf else None

    def col(label: str) -> NDArray[np.float64]:
        return parts[label].to_numpy(dtype=np.float64) if label in parts.columns else np.zeros(len(parts))

    rot, tilt, psi = col("rlnAngleRot"), col("rlnAngleTilt"), col("rlnAnglePsi")
    ox, oy = col("rlnOriginXAngst"), col("rlnOriginYAngst")
    n_model = bp.ori_size
    first_rows = {int(g): int(rows[np.argmax(group[rows] == g)]) for g in np.unique(group[rows])}
    boxes = {g: int(images.read(np.array([r]))[0].shape[-1]) for g, r in first_rows.items()}
    models = optics_models(table, boxes)
    done, total, t0, last = 0, rows.size, time.perf_counter(), 0.0
    for g in np.unique(group[rows]):
        g_rows = rows[group[rows] == g]
        p_o = float(pix[g_rows[0]])
        first = images.read(g_rows[:1])
        n_o = first.shape[-1]
        optics: OpticsModel = replace(models[int(g)], box=n_o, angpix=p_o)
        if ctf_switches:
            optics = with_ctf_switches(optics, **ctf_switches)
        ky, kx = rfft_freqs_2d(n_o)
        # k_model = s·M·k_o, s = (N_o p_o)/(N p): the group's frequencies on the model grid
        scale = (n_model * angpix) / (n_o * p_o)
        kx_m, ky_m = model_frequencies(optics, kx, ky, scale)
        r2 = (kx * kx + ky * ky).astype(np.float64)
        use = (~((kx == 0) & (ky < 0))) & (kx_m * kx_m + ky_m * ky_m <= bp.r_max ** 2 + 1e-9) \
            & (r2 <= (n_o // 2) ** 2)
        sel = np.flatnonzero(use.ravel())
        kx_o = kx.ravel()[sel].astype(np.float64)
        ky_o = ky.ravel()[sel].astype(np.float64)
        kx_m, ky_m = kx_m.ravel()[sel], ky_m.ravel()[sel]
        dc = np.flatnonzero((kx_o == 0) & (ky_o == 0))
        for start in range(0, g_rows.size, batch):
            b = g_rows[start:start + batch]
            ft = demodulate(rfft2_centered(images.read(b)), optics).reshape(b.size, -1)[:, sel]
            ft = phase_shift_2d(ft, kx_o, ky_o, ox[b] / p_o, oy[b] / p_o, n_o)
            ft[:, dc] = 0.0   # relion_reconstruct zeroes the DC term of every image
            if do_ctf:
                c = optics_ctf(ctf_all.subset(b), optics, kx_o, ky_o)
                # premultiplied data (CTF·image) are inserted as they are, with weight CTF² (reconstructor.cpp)
                values = ft if optics.premultiplied else ft * c
                weights = c * c
            else:
                values, weights = ft, np.float32(1.0)
            if fom is not None:
                w = fom[b][:, None]
                values = values * w
                weights = (weights * w if np.ndim(weights) else np.repeat(w, values.shape[1], axis=1)).astype(np.float32)
            mats = euler_to_matrix(rot[b], tilt[b], psi[b])
            bpmod.insert(bp, mats, kx_m, ky_m, values.astype(np.complex64), weights)
            done += b.size
            now = time.perf_counter()
            if progress and (now - last > 5 or done == total):
                _log(f"back-projected {done}/{total} {what} ({now - t0:.1f} s)")
                last = now
    return done


def reconstruct_map(bp: bpmod.BackProjector, sym: str = "C1", gridding_iter: int = 0) -> NDArray[np.float32]:
    """Symmetrise bp in place and return RELION's unregularised reconstruction (floored division, or
    with gridding_iter > 0 the iterative gridding compensation of --dont_skip_gridding)."""
    from cryorefine.geometry.symmetry import symmetry_matrices

    bpmod.symmetrise(bp, symmetry_matrices(sym))
    if gridding_iter > 0:
        apply_gridding(bp, gridding_compensation(bp, gridding_iter))
    return bpmod.reconstruct(bp)


def run(args: argparse.Namespace) -> int:
    """cryorefine reconstruct."""
    from cryorefine.geometry.symmetry import symmetry_matrices
    from cryorefine.io.mrc import write_map
    from cryorefine.io.star import read_particles
    from cryorefine.validate import (check_not_inputs, check_output_file, check_output_folder, check_particle_table,
                                     droppable_particles, stacks_named_by)

    t0 = time.perf_counter()
    require(args.pad >= 1 and float(args.pad).is_integer(),
            f"--pad: must be a positive integer (RELION's padding factor, at least 1; default 2), got {args.pad:g}")
    args.pad = int(args.pad)
    check_output_file(args.o, kind="map file")
    require(args.batch >= 1, "--batch: must be positive")
    require(args.threads is None or args.threads >= 1,
            f"--j: must be at least 1 (got {args.threads}); without --j every core is used")
    # --iter 0 would silently skip the compensation --dont_skip_gridding asks for
    require(not args.dont_skip_gridding or args.iter >= 1,
            f"--iter: must be at least 1 with --dont_skip_gridding (got {args.iter})")
    from cryorefine.parallel.threads import limit_threads
    limit_threads(args.threads or 0)
    with option_error("--sym"):
        symmetry_matrices(args.sym)
    if args.subset not in (1, 2):      # RELION: "1: only half1; 2: only half2; other: reconstruct all"
        args.subset = -1
    for name in ("angular_error", "shift_error"):
        v = getattr(args, name)
        require(math.isfinite(v) and v >= 0, f"--{name}: must be a standard deviation >= 0 (got {v:g})")
    require(math.isfinite(args.maxres) and args.maxres != 0,
            f"--maxres: must be a resolution > 0 A, or negative for Nyquist (got {args.maxres:g})")
    # nan fails both "> 0" and "<= 0": it would silently mean "the first optics group's"
    require(math.isfinite(args.angpix) and args.angpix != 0,
            f"--angpix: must be a pixel size > 0 A, or negative for the first optics group's (got {args.angpix:g})")
    check_output_folder(Path(args.o).parent)
    table = read_particles(args.i, angpix=args.angpix if args.angpix > 0 else None)
    _require_columns(table, ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"], "reconstruction needs angles")
    if args.ctf:
        _require_columns(table, list(CTF_REQUIRED_COLUMNS), "needed with --ctf")
    # warnings and notes are printed once every check has passed: an error must be the job's only stderr line
    notes = [f"WARNING: {note}" for note in table.notes]
    check_particle_table(table, need_ctf=args.ctf, need_poses=True, allow_bad_particles=args.drop_bad_particles)
    check_not_inputs([args.o], [args.i, *stacks_named_by(table)])
    rows = _select_rows(table, args.subset, args.chosen_class)
    if args.drop_bad_particles:
        drop, summary = droppable_particles(table, args.ctf)
        if drop[rows].any():
            notes.append(f"--drop_bad_particles: left out {int(drop[rows].sum())} of {rows.size} particles "
                         f"({summary})")
            rows = rows[~drop[rows]]
            require(rows.size > 0, f"{args.i}: no particle left after --drop_bad_particles")
    fom = None
    if args.fom_weighting:
        _require_columns(table, ["rlnParticleFigureOfMerit"], "needed for --fom_weighting")
        fom = pd.to_numeric(table.particles["rlnParticleFigureOfMerit"], errors="coerce").to_numpy(np.float64)
        bad = np.flatnonzero(~np.isfinite(fom[rows]) | (fom[rows] < 0))
        require(bad.size == 0, f"{args.i}: particle {rows[bad[0]] + 1 if bad.size else 0}: rlnParticleFigureOfMerit "
                               f"must be a finite number >= 0")
    from cryorefine.io.particles import ParticleImages
    images = ParticleImages(table)
    notes += [f"WARNING: {line}" for line in images.header_pixel_mismatches()]
    first_image = images.read(np.arange(1))[0]
    require(not args.rot3d or first_image.ndim == 3,
            f"--3d_rot: needs 3D images (subtomograms), but {args.i} holds 2D images; leave out --3d_rot")
    require(not args.rot3d, "--3d_rot: reconstruction from 3D images (subtomograms) is not available")
    box = int(first_image.shape[-1])   # like RELION: the first image's size
    # RELION does not check, but its centring by sign (CenterFFTbySign) is wrong for odd sizes
    require(box % 2 == 0, f"{args.i}: the first image ({table.particles['rlnImageName'].iloc[0]}) has an odd box "
                          f"size {box}, which is the reconstruction's; an even box is needed (re-box the particles "
                          f"with `cryorefine image-handler --new_box`)")
    angpix = float(args.angpix) if args.angpix > 0 else float(table.optics["rlnImagePixelSize"].iloc[0])
    r_max = None
    if args.maxres > 0:
        r_max = min(float(np.ceil(box * angpix / args.maxres)), box / 2)
    _check_memory(box, args.pad, box / 2 if r_max is None else r_max, args.dont_skip_gridding)
    bp = bpmod.make_backprojector(box, pad=args.pad, r_max=r_max)
    from cryorefine.parallel.mpi import get_reducer
    reducer = get_reducer()      # relion_reconstruct_mpi: every rank inserts every size-th particle
    if reducer.is_leader:
        for note in notes:
            _log(note, warning=True)
        _log(f"{rows.size} particles, box {box}, {angpix:.4g} Å/px, sym {args.sym}, "
             f"{'CTF-corrected' if args.ctf else 'no CTF'}, r_max {bp.r_max:g} px"
             + (f", {reducer.size} MPI processes" if reducer.size > 1 else ""))
    if args.angular_error > 0 or args.shift_error > 0:
        # RELION draws from the clock as well; rank 0's seed on every rank, which perturbs the whole table alike,
        # so that the logged seed gives the same poses with any number of ranks
        seed = reducer.allgather(int(np.random.SeedSequence().entropy % 2**31))[0]
        table = replace(table, particles=perturbed_poses(table.particles, args.angular_error, args.shift_error,
                                                         np.random.default_rng(seed)))
        if reducer.is_leader:
            _log(f"poses perturbed: --angular_error {args.angular_error:g} deg, --shift_error {args.shift_error:g} "
                 f"A (random seed {seed})")
    backproject_table(table, reducer.share(rows), bp, angpix, args.ctf, batch=args.batch,
                      progress=reducer.is_leader, fom=fom,
                      what="particles of rank 0's share" if reducer.size > 1 else "particles",
                      ctf_switches={"phase_flipped": args.ctf_phase_flipped,
                                    "intact_first_peak": args.ctf_intact_first_peak,
                                    "only_flip_phases": args.only_flip_phases})
    reducer.sum_array(bp.data)
    reducer.sum_array(bp.weight)
    if not reducer.is_leader:
        return 0
    iterations = args.iter if args.dont_skip_gridding else 0
    _log(f"symmetrising and reconstructing ({f'{iterations} gridding iterations' if iterations else 'floored division'})")
    vol = reconstruct_map(bp, args.sym, iterations)
    write_map(args.o, vol, angpix)
    _log(f"wrote {args.o} ({time.perf_counter() - t0:.1f} s)")
    return 0

