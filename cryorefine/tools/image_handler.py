"""Rescale, re-box, low-pass or convert a map, image or stack (like relion_image_handler).

Examples:
  cryorefine image-handler --i run_it025_class004.mrc --angpix 3.54 --rescale_angpix 1.244 --new_box 256 --o out.mrc
  cryorefine image-handler --i particles.mrcs --rescale_angpix 2.0 --o particles_bin.mrcs

--rescale_angpix A: Fourier crop/pad to N' = round(N*p/A), made even (minus 1 if odd); the true pixel size N*p/N'
is written to the header. --new_box B: real-space centred crop/pad after rescaling. --lowpass R: raised-cosine
low-pass at R Å (edge 2 shells wide), applied before rescaling. RELION's order: one arithmetic operation (by a
constant, or pixel by pixel by another map/image), --bfactor, filters, mirror, shift, rescale, re-box, --sym,
thresholds (--remove_nan before all). --stats, --com and --fsc print and write nothing. The header keeps the
input's pixel size unless rescaled or --force_header_angpix (--angpix is the size the filters use). Input: 2D image
(.mrc), stack (.mrcs), 3D map, or a particle STAR file. With a STAR file, --o out.star writes the images to
out.mrcs (one stack per optics group, out_opticsgroupK.mrcs, when there are several); as RELION, --o out.mrcs
writes them all to that stack and the STAR to <in>_out.mrcs.star, and a bare word (--o bin2) is a suffix: each
input stack's images go to <stack>_bin2.mrcs beside it and the STAR to <in>_bin2.star. The optics table gets the
new rlnImageSize and the true rlnImagePixelSize. With a stack, a bare word --o is a suffix too: <stack>_<o>.mrcs.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
import scipy.fft as sfft

from cryorefine.errors import InputError, require
from cryorefine.fourier.resize import resize_fourier, window_real
from cryorefine.io.mrc import (FLOAT16_MAX, StackWriter, float16_overflow, is_stack_path, open_stack, read_header,
                               read_map, write_map)
from cryorefine.io.particles import ParticleImages
from cryorefine.io.star import read_particles, resolve_image_path, write_particles
from cryorefine.tools.postprocess import bfactor_factors, k_squared
from cryorefine.validate import (check_fits_in_memory, check_not_inputs, check_output_file, check_output_folder,
                                 check_particle_table, same_pixel_size, stacks_named_by)

_CHUNK_BYTES = 64 * 2**20  # stacks are processed in pieces of about this size
FLOAT32_MAX = float(np.finfo(np.float32).max)
NO_GAIN = 1e-6  # a filter whose largest gain is below this keeps nothing: the output would be 0 everywhere


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options, with RELION's spellings and readable aliases."""
    parser.add_argument("--i", "--input", dest="i", required=True, help="input map, image or stack (.mrc, .mrcs)")
    parser.add_argument("--o", "--output", dest="o", default=None, help="output file (not with --stats)")
    parser.add_argument("--angpix", type=float, default=None,
                        help="input pixel size in Å (default: from the header)")
    parser.add_argument("--rescale_angpix", "--rescale-angpix", dest="rescale_angpix", type=float, default=None,
                        help="rescale (Fourier crop/pad) to this pixel size in Å")
    parser.add_argument("--new_box", "--new-box", dest="new_box", type=int, default=None,
                        help="crop or pad (real space, centred) to this box after rescaling")
    parser.add_argument("--lowpass", "--low_pass", "--low-pass", dest="lowpass", type=float, default=None,
                        help="low-pass filter at this resolution in Å (raised-cosine edge, 2 shells)")
    parser.add_argument("--force_header_angpix", "--force-header-angpix", dest="force_header_angpix", type=float,
                        default=None, help="write this pixel size to the output header instead of the true one")
    parser.add_argument("--highpass", "--high_pass", dest="highpass", type=float, default=None,
                        help="high-pass filter at this resolution in Å (raised-cosine edge)")
    parser.add_argument("--filter_edge_width", type=int, default=2,
                        help="width of the low/high-pass raised-cosine edge in shells (default 2)")
    parser.add_argument("--multiply_constant", type=float, default=1.0, help="multiply the pixel values by this")
    parser.add_argument("--divide_constant", type=float, default=1.0, help="divide the pixel values by this")
    parser.add_argument("--add_constant", type=float, default=0.0, help="add this to the pixel values")
    parser.add_argument("--subtract_constant", type=float, default=0.0, help="subtract this from the pixel values")
    for name, verb in (("multiply", "multiply by"), ("divide", "divide by"), ("add", "add"), ("subtract", "subtract")):
        parser.add_argument(f"--{name}", dest=f"{name}_map", default=None, metavar="MRC",
                            help=f"{verb} the pixel values of this map or image (same size; each image of a stack)")
    parser.add_argument("--bfactor", type=float, default=0.0,
                        help="apply exp(-B s^2/4) up to Nyquist, 0 beyond (B in A^2; negative sharpens)")
    parser.add_argument("--threshold_above", type=float, default=None, help="values above this are set to it")
    for axis in "xyz":
        parser.add_argument(f"--shift_{axis}", type=float, default=0.0,
                            help=f"move the content this many pixels along {axis} (linear interpolation, zero fill)")
    parser.add_argument("--shift_com", action="store_true",
                        help="move each image's / the map's centre of mass (of its positive values) to voxel N//2")
    parser.add_argument("--com", action="store_true",
                        help="print the centre of mass (of the positive values) relative to voxel N//2; no --o")
    parser.add_argument("--sym", default=None, help="symmetrise a 3D map: the average over the point group's "
                        "rotations about the box centre N//2 (RELION's symmetriseMap)")
    parser.add_argument("--fsc", default=None, metavar="MRC",
                        help="print the FSC between --i and this map as a STAR table (data_fsc) on stdout; no --o")
    parser.add_argument("--remove_nan", action="store_true",
                        help="replace NaN and infinite values by --replace_nan before anything else")
    parser.add_argument("--replace_nan", type=float, default=0.0, help="the value for --remove_nan (default 0)")
    parser.add_argument("--threshold_below", type=float, default=None, help="values below this are set to it")
    parser.add_argument("--invert_contrast", action="store_true", help="multiply the pixel values by -1")
    for axis in "XYZ":
        parser.add_argument(f"--flip{axis}", dest=f"flip{axis.lower()}", action="store_true",
                            help=f"mirror in {axis} (index i -> N-1-i){' (3D maps only)' if axis == 'Z' else ''}")
    parser.add_argument("--invert_hand", action="store_true",
                        help="invert the hand by mirroring x about the box centre N/2 (index i -> (N-i) mod N), so "
                             "that the symmetry origin stays where it is")
    parser.add_argument("--stats", action="store_true",
                        help="print per-image statistics (avg, stddev, min, max, pixel size); nothing is written")
    parser.add_argument("--float16", action="store_true", help="write float16 (MRC mode 12)")


def rescaled_box(box: int, angpix: float, new_angpix: float) -> int:
    """RELION's new box for --rescale_angpix: round(N·p/A), minus 1 if odd."""
    n = int(np.floor(box * angpix / new_angpix + 0.5))
    return n - 1 if n % 2 else n


def lowpass_profile(r: np.ndarray, n: int, resolution: float, angpix: float, edge_width: int = 2) -> np.ndarray:
    """RELION lowPassFilterMap gain at radius r = |k|/N (1/px) of an N-box: 1 below shell round(N·p/R) − w/2,
    raised-cosine edge to shell + w/2 (w = edge_width), 0 beyond."""
    ires = int(np.floor(n * angpix / resolution + 0.5))
    half = edge_width // 2
    edge_low = max(0.0, (ires - half) / n)
    edge_high = min(n // 2 + 1, (ires + half) / n)
    width = edge_high - edge_low
    return np.where(r < edge_low, 1.0, np.where(r > edge_high, 0.0,
                    0.5 + 0.5 * np.cos(np.pi * (r - edge_low) / max(width, 1e-12))))


def lowpass_gain(n: int, ndim: int, resolution: float, angpix: float, edge_width: int = 2) -> np.ndarray:
    """RELION lowPassFilterMap gain on the rfft grid: 1 below shell round(N·p/R) − 1, cosine edge to shell + 1."""
    return lowpass_profile(np.sqrt(k_squared(n, ndim)) / n, n, resolution, angpix, edge_width)


def largest_filter_gain(n: int, ndim: int, angpix: float, lowpass: float | None, highpass: float | None,
                        edge_width: int = 2) -> float:
    """Largest gain of --lowpass followed by --highpass on an N-box (ndim 2 or 3).

    Evaluated at every radius sqrt(m)/N with m = 0 .. ndim·(N/2)², a superset of the radii the grid holds (|k|² is
    an integer up to that), so 0 means every Fourier component, hence the whole output, would be 0."""
    r = np.sqrt(np.arange(ndim * (n // 2) ** 2 + 1, dtype=np.float64)) / n
    gain = np.ones_like(r)
    if lowpass is not None:
        gain *= lowpass_profile(r, n, lowpass, angpix, edge_width)
    if highpass is not None:
        gain *= 1.0 - lowpass_profile(r, n, highpass, angpix, edge_width)
    return float(gain.max())


def output_range_error(data: np.ndarray, float16: bool) -> str | None:
    """Why `data` cannot be written as float32 (or float16 with `float16`), or None if it can.

    The input was checked finite and every step is linear, so a non-finite value can only be a float32 overflow
    (e.g. a huge --multiply_constant); float16 rounds values beyond 65504 (from 65520 on) to inf."""
    if not np.isfinite(data).all():
        return f"the output values exceed the float32 range (largest {FLOAT32_MAX:.4g}); nothing written"
    peak = float16_overflow(data) if float16 else None
    if peak is not None:
        return (f"values up to {peak:.4g} exceed the float16 range (largest {FLOAT16_MAX:g}); drop --float16 or "
                f"scale with --multiply_constant; nothing written")
    return None


def mirrored(data: np.ndarray, flip: str | None) -> np.ndarray:
    """RELION image_handler's mirrors of the last axes ([z,] y, x): flipX/Y/Z i -> N-1-i; invert_hand x -> (N-x) mod
    N, a mirror about the centre pixel N/2 that keeps a symmetry axis through it in place. None: unchanged."""
    if flip is None:
        return data
    if flip == "invert_hand":
        return np.roll(data[..., ::-1], 1, axis=-1)
    axis = {"x": -1, "y": -2, "z": -3}[flip]
    return np.flip(data, axis=axis)


def fourier_filter(data: np.ndarray, gain: np.ndarray, ndim: int) -> np.ndarray:
    """Multiply the last `ndim` axes' Fourier transform by `gain` (rfft layout)."""
    n = data.shape[-1]
    axes = tuple(range(-ndim, 0))
    ft = sfft.rfftn(np.asarray(data, dtype=np.float64), axes=axes, workers=-1)
    return sfft.irfftn(ft * gain, s=(n,) * ndim, axes=axes, workers=-1).astype(np.float32)


def lowpass_map(data: np.ndarray, resolution: float, angpix: float, ndim: int, edge_width: int = 2) -> np.ndarray:
    """RELION lowPassFilterMap: keep |k| below shell round(N·p/R) − 1, cosine edge to shell + 1 (in 1/px units)."""
    return fourier_filter(data, lowpass_gain(data.shape[-1], ndim, resolution, angpix, edge_width), ndim)


def highpass_map(data: np.ndarray, resolution: float, angpix: float, ndim: int, edge_width: int = 2) -> np.ndarray:
    """RELION highPassFilterMap: the complement of lowpass_map's gain (same raised-cosine edge)."""
    return fourier_filter(data, 1.0 - lowpass_gain(data.shape[-1], ndim, resolution, angpix, edge_width), ndim)


def image_stats(data: np.ndarray) -> tuple[float, float, float, float]:
    """(avg, stddev, minval, maxval) of one image or map, as relion_image_handler --stats prints them."""
    d = np.asarray(data, dtype=np.float64)
    return float(d.mean()), float(d.std()), float(d.min()), float(d.max())


ARITHMETIC = ("multiply_constant", "divide_constant", "add_constant", "subtract_constant", "multiply_map",
              "divide_map", "add_map", "subtract_map")
ZERO_DIVISOR = 1e-10     # RELION's --divide: where the divisor is smaller than this, the result is 0


def arithmetic_given(args) -> list[str]:
    """The arithmetic options given (RELION applies only the first of its else-if chain; one at a time here)."""
    defaults = {"multiply_constant": 1.0, "divide_constant": 1.0, "add_constant": 0.0, "subtract_constant": 0.0}
    return [name for name in ARITHMETIC if getattr(args, name, None) not in (defaults.get(name), None)]


def apply_arithmetic(data: np.ndarray, name: str, value: float | np.ndarray) -> np.ndarray:
    """RELION image_handler's pixel arithmetic, in float64: by a constant or pixel by pixel by an operand of the
    image's shape (broadcast over a stack); division by |operand| < 1e-10 gives 0, as RELION's --divide."""
    data = np.asarray(data, dtype=np.float64)
    op = value if np.isscalar(value) else np.asarray(value, dtype=np.float64)
    kind = name.split("_")[0]
    if kind == "multiply":
        return data * op
    if kind == "add":
        return data + op
    if kind == "subtract":
        return data - op
    if np.isscalar(op):
        return data / op
    small = np.abs(op) < ZERO_DIVISOR
    return np.where(small, 0.0, data / np.where(small, 1.0, op))


def bfactor_gain(n: int, ndim: int, angpix: float, bfactor: float) -> np.ndarray:
    """RELION applyBFactorToMap on the rfft grid of an N-box: exp(−B s²/4) with s = |k|/(N·p) up to Nyquist, 0
    beyond (the postprocess formula)."""
    return bfactor_factors(k_squared(n, ndim), n, angpix, bfactor)


def load_operand(args, shape: tuple[int, ...], what: str, angpix: float = 0.0) -> np.ndarray | None:
    """The map or image of --multiply/--divide/--add/--subtract (None without one), checked to have the shape of
    one input image or map, its pixel size (`angpix`, 0 = not known) and finite values."""
    name = next((n for n in arithmetic_given(args) if n.endswith("_map")), None)
    if name is None:
        return None
    path = getattr(args, name)
    require(not is_stack_path(path), f"{path}: --{name[:-4]} needs one map or image, not a stack")
    op, op_angpix = read_map(path)
    require(op.shape == tuple(shape), f"{path}: --{name[:-4]}: shape {'x'.join(map(str, op.shape[::-1]))} differs "
                                      f"from the {what}'s {'x'.join(map(str, tuple(shape)[::-1]))}")
    require(same_pixel_size(op_angpix, angpix), f"{path}: --{name[:-4]}: pixel size {op_angpix:g} Å differs from "
                                                f"the {what}'s {angpix:g} Å (resample with --rescale_angpix)")
    require(bool(np.isfinite(op).all()), f"{path}: contains NaN or inf (--{name[:-4]})")
    return op


def shifted(data: np.ndarray, shift_xyz: tuple[float, float, float], ndim: int) -> np.ndarray:
    """The content of each image / map moved by (x, y[, z]) px, i.e. out(r) = in(r − t): linear interpolation,
    zeros where nothing comes in (RELION's selfTranslate with DONT_WRAP)."""
    from scipy import ndimage
    t = (shift_xyz[2], shift_xyz[1], shift_xyz[0])[3 - ndim:]
    lead = data.ndim - ndim
    return ndimage.shift(np.asarray(data, np.float64), (0.0,) * lead + t, order=1, mode="constant", cval=0.0)


def center_of_mass(image: np.ndarray) -> tuple[float, ...]:
    """(x, y[, z]) in px of the centre of mass of the positive values of one image or map, relative to index N//2
    on each axis (RELION's centerOfMass about the Xmipp origin; (0, ...) when nothing is positive)."""
    v = np.where(image > 0, np.asarray(image, np.float64), 0.0)
    mass = v.sum()
    if mass == 0:
        return (0.0,) * image.ndim
    coords = [float((v.sum(axis=tuple(a for a in range(image.ndim) if a != ax)) * (np.arange(n) - n // 2)).sum()
                    / mass) for ax, n in enumerate(image.shape)]
    return tuple(coords[::-1])                  # array (z, y, x) -> (x, y, z)


def _com_shifted(data: np.ndarray, ndim: int) -> np.ndarray:
    """--shift_com: each image (or the map) moved so that its centre of mass lands on N//2."""
    if data.ndim == ndim:
        return shifted(data, tuple(-c for c in center_of_mass(data)) + (0.0,) * (3 - ndim), ndim)
    return np.stack([_com_shifted(d, ndim) for d in data])


def symmetrised(volume: np.ndarray, sym: str) -> np.ndarray:
    """The mean of the map over the rotations g of point group `sym` about voxel N//2: out(r) = mean_g in(g r), with
    linear interpolation and zeros from outside the box (RELION's symmetriseMap; the group holds each inverse, so
    which way g acts does not matter)."""
    from scipy import ndimage

    from cryorefine.geometry.symmetry import symmetry_matrices
    vol = np.asarray(volume, np.float64)
    centre = np.array([s // 2 for s in vol.shape], np.float64)
    flip = np.eye(3)[::-1]                      # (x, y, z) <-> array (z, y, x)
    group = symmetry_matrices(sym)
    out = np.zeros_like(vol)
    for g in group:
        m = flip @ g @ flip
        out += ndimage.affine_transform(vol, m, offset=centre - m @ centre, order=1, mode="constant", cval=0.0)
    return out / len(group)


def _process(data: np.ndarray, ndim: int, angpix: float, args, new_size: int | None) -> np.ndarray:
    """Arithmetic, B-factor, filters, mirror, shift, rescale, re-box, symmetry, thresholds of one map / image / batch
    of images (in RELION's order)."""
    stack = ndim == 2 and data.ndim == 3
    factor = -1.0 if args.invert_contrast else 1.0
    # overflow to inf is allowed here, silently: the caller refuses a non-finite result (output_range_error) with
    # one error line instead of numpy warnings
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        if factor != 1.0:       # in float64: a factor beyond float32 (e.g. 1e39) may still give float32 values
            data = np.asarray(data, dtype=np.float64) * factor
        for name in arithmetic_given(args):
            value = getattr(args, name)
            data = apply_arithmetic(data, name, args._operand if name.endswith("_map") else value)
        if args.bfactor != 0:
            data = fourier_filter(data, bfactor_gain(data.shape[-1], ndim, angpix, args.bfactor), ndim)
        if args.lowpass is not None:
            data = lowpass_map(data, args.lowpass, angpix, ndim, args.filter_edge_width)
        if args.highpass is not None:
            data = highpass_map(data, args.highpass, angpix, ndim, args.filter_edge_width)
        data = mirrored(data, _flip(args))       # after the filters, before rescaling: RELION's order
        shift = (args.shift_x, args.shift_y, args.shift_z)
        if args.shift_com:          # RELION: instead of --shift_x/y/z
            data = _com_shifted(data, ndim)
        elif any(shift):
            data = shifted(data, shift, ndim)
        if new_size is not None:
            data = resize_fourier(data, new_size, stack=stack)
        if args.new_box is not None and args.new_box != data.shape[-1]:
            data = window_real(data, args.new_box, stack=stack)
        if args.sym is not None:
            data = symmetrised(data, args.sym)
        if args.threshold_above is not None:
            data = np.minimum(data, args.threshold_above)
        if args.threshold_below is not None:
            data = np.maximum(data, args.threshold_below)
        return np.asarray(data, dtype=np.float32)


def _writable(out: np.ndarray, dst: Path, float16: bool) -> np.ndarray:
    """`out`, or InputError naming the output file when its values do not fit the output type."""
    problem = output_range_error(out, float16)
    require(problem is None, f"{dst}: {problem}")
    return out


def _check_filters(src: Path, n: int, ndim: int, angpix: float, args, what: str) -> None:
    """InputError when --lowpass / --highpass together keep no frequency of this N-box (the output would be 0)."""
    if args.highpass is None:
        return              # a low-pass alone always keeps the mean
    if largest_filter_gain(n, ndim, angpix, None, args.highpass, args.filter_edge_width) < NO_GAIN:
        raise InputError(f"{src}: --highpass {args.highpass:g} Å removes every frequency of this {what} (box {n}, "
                         f"{angpix:g} Å/px, Nyquist {2 * angpix:g} Å): the output would be 0 everywhere")
    if largest_filter_gain(n, ndim, angpix, args.lowpass, args.highpass, args.filter_edge_width) < NO_GAIN:
        raise InputError(f"{src}: --highpass {args.highpass:g} Å with --lowpass {args.lowpass:g} Å keeps no "
                         f"frequency (the output would be 0 everywhere); the high-pass resolution must be coarser "
                         f"(more Å) than the low-pass one")


def _check_options(args) -> None:
    """Option values that can never work."""
    prints = [f"--{n}" for n in ("stats", "fsc", "com") if getattr(args, n)]
    require(bool(prints) or bool(args.o), "--o: the output file is required (unless --stats, --fsc or --com)")
    # RELION's --stats, --fsc and --com only print; an --o beside them would be silently ignored
    require(not (prints and args.o), f"{prints[0] if prints else ''} prints its result; it writes no --o (got --o "
                                     f"{args.o})")
    require(len(prints) <= 1, f"{', '.join(prints)}: give one of them")
    # before any work: writing would fail at the very end, naming an internal temporary file
    if args.o:
        check_output_file(args.o)
    require(args.filter_edge_width >= 0, f"--filter_edge_width: must be >= 0 (got {args.filter_edge_width})")
    for name in ("multiply_constant", "divide_constant", "add_constant", "subtract_constant", "bfactor",
                 "threshold_above", "threshold_below", "shift_x", "shift_y", "shift_z", "replace_nan"):
        v = getattr(args, name)
        require(v is None or bool(np.isfinite(v)), f"--{name}: must be a finite number")
    require(args.divide_constant != 0, "--divide_constant: must not be 0")
    given = arithmetic_given(args)
    # RELION applies only the first of them (an else-if chain), silently: one at a time here
    require(len(given) <= 1, f"{', '.join('--' + g.replace('_map', '') for g in given)}: give one arithmetic "
                             f"operation at a time")
    for opt, val in (("--rescale_angpix", args.rescale_angpix), ("--lowpass", args.lowpass),
                     ("--highpass", args.highpass),
                     ("--force_header_angpix", args.force_header_angpix), ("--angpix", args.angpix)):
        if val is not None:
            require(bool(np.isfinite(val)) and val > 0, f"{opt}: must be a finite number > 0 (got {val:g})")
    if args.new_box is not None:
        # odd boxes too, as RELION's window (the centre stays at index N//2)
        require(args.new_box > 0, f"--new_box: must be a positive box size (got {args.new_box})")
    flips = [f"--{n}" for n, v in (("flipX", args.flipx), ("flipY", args.flipy), ("flipZ", args.flipz),
                                   ("invert_hand", args.invert_hand)) if v]
    # RELION applies only the first of them (an else-if chain), silently: one at a time here
    require(len(flips) <= 1, f"{', '.join(flips)}: give one mirror at a time")


def _flip(args) -> str | None:
    """The one mirror asked for (--flipX, --flipY, --flipZ or --invert_hand), or None."""
    names = {"flipx": "x", "flipy": "y", "flipz": "z", "invert_hand": "invert_hand"}
    return next((flip for dest, flip in names.items() if getattr(args, dest, False)), None)


def _new_size(box: int, angpix: float, args, what: str) -> tuple[int | None, float]:
    """Output box after --rescale_angpix (None if not rescaling) and the true output pixel size."""
    if args.rescale_angpix is None:
        return None, angpix
    new_size = rescaled_box(box, angpix, args.rescale_angpix)
    require(new_size >= 2, f"--rescale_angpix: {args.rescale_angpix:g} Å gives a box of {new_size} from {box}")
    out_angpix = box * angpix / new_size
    if abs(out_angpix - args.rescale_angpix) > 1e-3 * args.rescale_angpix:
        print(f"warning: the pixel size of the rescaled {what} is {out_angpix:.6f} Å, not {args.rescale_angpix:g} Å "
              f"(box {box} -> {new_size} must be even)", file=sys.stderr)
    return new_size, out_angpix


def _check_output_fits(src: Path, box: int, ndim: int) -> None:
    """InputError when one map (or image) of the largest box the job makes, with its Fourier transform, cannot fit in
    the memory the machine has available (e.g. --rescale_angpix 1e-9 or --new_box 100000)."""
    # the real map, and its complex half transform made by the resizing
    check_fits_in_memory(3 * 4 * box ** ndim, f"{src}: the output box {box} ({'map' if ndim == 3 else 'image'})")


def is_suffix_output(o: str) -> bool:
    """RELION's --o for a STAR or stack input is a suffix when it is a bare word (no extension, no folder)."""
    return "/" not in o and "." not in o


def with_suffix_inserted(name: str, suffix: str) -> str:
    """FileName::insertBeforeExtension("_" + suffix): Particles/a.mrcs -> Particles/a_<suffix>.mrcs."""
    path = PurePosixPath(name)
    return str(path.with_name(f"{path.stem}_{suffix}{path.suffix}"))


def _star_outputs(src: Path, o: str, table) -> tuple[Path, list[tuple[str, Path, np.ndarray]]]:
    """(output STAR, [(output stack as the STAR names it, where it is written, its particle rows)]) for --o as RELION
    reads it with a STAR input: out.star (ours: <out>.mrcs, or <out>_opticsgroupK.mrcs per group), out.mrcs (one
    stack, STAR <in>_out.mrcs.star) or a bare suffix (<stack>_<suffix>.mrcs beside each input stack, STAR
    <in>_<suffix>.star)."""
    parts = table.particles
    if is_suffix_output(o):
        stacks = parts["rlnImageName"].astype(str).str.split("@", n=1).str[-1].to_numpy(dtype=object)
        out = []
        for name in pd.unique(stacks):
            new = with_suffix_inserted(name, o)
            out.append((new, resolve_image_path(name, table.directory).parent / PurePosixPath(new).name,
                        np.nonzero(stacks == name)[0]))
        return src.with_name(f"{src.stem}_{o}{src.suffix}"), out
    dst = Path(o)
    if dst.suffix == ".mrcs":
        return src.with_name(f"{src.stem}_{dst.name}{src.suffix}"), [(o, dst, np.arange(len(parts)))]
    require(dst.suffix == ".star", f"--o: with a STAR file as input the output is a .star file, a .mrcs stack or a "
                                   f"suffix for each stack's name (got {o})")
    groups = table.optics["rlnOpticsGroup"].to_numpy()
    group_of = parts["rlnOpticsGroup"].to_numpy()
    out = []
    for g in groups:
        if (group_of == g).any():
            stack = dst.with_suffix(".mrcs") if len(groups) == 1 else dst.with_name(f"{dst.stem}_opticsgroup{g}.mrcs")
            out.append((str(stack), stack, np.nonzero(group_of == g)[0]))
    return dst, out


def _run_star(src: Path, o: str, args) -> int:
    """Particle STAR input: process every particle image, write new stacks and a STAR with updated optics."""
    table = read_particles(src, angpix=args.angpix)
    check_particle_table(table, need_ctf=False)
    # stacks named by --o are relative to the current (project) folder, where RELION looks for them
    dst, outputs_ = _star_outputs(src, o, table)
    for _, path, _ in outputs_:
        require(not path.is_dir(), f"{path}: is a folder, not a file (an image stack of --o {o})")
    check_not_inputs([dst, *(path for _, path, _ in outputs_)], [src, *stacks_named_by(table)])
    images = ParticleImages(table)
    optics = table.optics.copy()
    parts = table.particles.copy()
    group_of = parts["rlnOpticsGroup"].to_numpy()
    names = parts["rlnImageName"].astype(str).to_numpy(dtype=object)
    sizes: dict[int, tuple[int, float]] = {}
    with contextlib.ExitStack() as outputs:
        for name, path, rows in outputs_:
            in_groups = pd.unique(group_of[rows])
            require(len(in_groups) == 1, f"--o {o}: images of optics groups {', '.join(map(str, in_groups))} would "
                                         f"go into one stack ({name}); give --o as a .star file")
            g = int(in_groups[0])
            g_pos = int(np.nonzero(optics["rlnOpticsGroup"].to_numpy() == g)[0][0])
            angpix = float(optics["rlnImagePixelSize"].iloc[g_pos])
            box = int(images.box[rows[0]]) or int(images.read(rows[:1]).shape[-1])
            _check_filters(src, box, 2, angpix, args, f"optics group {g}")
            args._operand = load_operand(args, (box, box), f"optics group {g} images", angpix)
            require(not args.flipz, f"{src}: --flipZ: particle images are 2D; only a 3D map has a z to mirror")
            new_size, out_angpix = _new_size(box, angpix, args, f"optics group {g}")
            _check_output_fits(src, max(new_size or box, args.new_box or 0, box), 2)
            header_angpix = args.force_header_angpix or out_angpix
            writer = outputs.enter_context(StackWriter(path, header_angpix, float16=args.float16))
            per_chunk = max(1, _CHUNK_BYTES // (box * box * 4))
            for start in range(0, rows.size, per_chunk):
                out = _process(images.read(rows[start:start + per_chunk]), 2, angpix, args, new_size)
                writer.write(_writable(out, path, args.float16))
            names[rows] = [f"{j:06d}@{name}" for j in range(1, rows.size + 1)]
            # RELION's optics table gets the true pixel size (--force_header_angpix changes only the MRC headers)
            sizes[g_pos] = (int(writer.shape[-1]), float(out_angpix))
    for g_pos, (size, angpix) in sizes.items():
        optics.loc[optics.index[g_pos], "rlnImageSize"] = size
        optics.loc[optics.index[g_pos], "rlnImagePixelSize"] = angpix
    # the STAR is written once every stack is complete (an error above leaves no stack behind)
    parts["rlnImageName"] = names
    write_particles(dst, type(table)(optics=optics, particles=parts, path=dst, version=table.version))
    print(f"wrote {dst}: {len(parts)} particles in {len(sizes)} optics group(s), {len(outputs_)} stack(s)")
    return 0


def without_nan(data: np.ndarray, args) -> np.ndarray:
    """With --remove_nan, NaN and ±inf replaced by --replace_nan (RELION does it first); else unchanged."""
    if not args.remove_nan:
        return data
    return np.where(np.isfinite(data), data, np.float32(args.replace_nan)).astype(data.dtype, copy=False)


def fsc_table(fsc_curve: np.ndarray, box: int, angpix: float) -> pd.DataFrame:
    """RELION image_handler --fsc's data_fsc: spectral index, 1/Å, Å (999 for shell 0) and the FSC."""
    from cryorefine.fourier.fsc import shell_columns
    return pd.DataFrame({**shell_columns(fsc_curve.size, box, angpix), "rlnFourierShellCorrelation": fsc_curve})


def _print_fsc(src: Path, other: Path, angpix: float, args) -> int:
    """--fsc: the FSC of --i and the other map (same box) as a STAR table on stdout."""
    from cryorefine.fourier.fsc import fsc
    from cryorefine.io.star import star_text
    a = without_nan(read_map(src)[0], args)
    b, b_angpix = read_map(other)
    b = without_nan(b, args)
    require(b.shape == a.shape, f"{other}: --fsc: shape {'x'.join(map(str, b.shape[::-1]))} differs from {src}'s "
                                f"{'x'.join(map(str, a.shape[::-1]))}")
    require(a.ndim in (2, 3) and len(set(a.shape)) == 1, f"{src}: --fsc needs a square image or a cubic map")
    require(same_pixel_size(b_angpix, angpix), f"{other}: --fsc: pixel size {b_angpix:g} Å differs from {src}'s "
                                               f"{angpix:g} Å")
    for path, m in ((src, a), (other, b)):
        require(bool(np.isfinite(m).all()), f"{path}: contains NaN or inf (--remove_nan replaces them)")
        require(float(np.ptp(m)) > 0, f"{path}: the map is constant; its FSC is undefined")
    sys.stdout.write(star_text({"fsc": fsc_table(fsc(a, b), a.shape[0], angpix)}))
    return 0


def _print_com(src: Path, stack: bool) -> int:
    """--com: the centre of mass of each image (or the map), one line each as RELION prints it."""
    images = open_stack(src) if stack else read_map(src)[0][None]
    for i, image in enumerate(images, start=1):
        com = center_of_mass(np.asarray(image, np.float32))
        name = f"{i:06d}@{src}" if stack else str(src)
        print(f"{name} : center of mass (relative to XmippOrigin) "
              + " ".join(f"{a} {c:g}" for a, c in zip("xyz", com)))
    return 0


def _print_stats(src: Path, stack: bool, angpix: float) -> int:
    """relion_image_handler --stats: one line per image (stack) or for the map."""
    if stack:
        images = open_stack(src)
        n, ny, nx = images.shape
        for k in range(n):
            avg, sd, lo, hi = image_stats(images[k])
            print(f"{k + 1:06d}@{src} : (x,y,z,n)= {nx} x {ny} x 1 x 1 ; avg= {avg:g} stddev= {sd:g} minval= {lo:g} "
                  f"maxval= {hi:g}; angpix = {angpix:g}")
        return 0
    data, _ = read_map(src)
    shape = data.shape[::-1] + (1,) * (3 - data.ndim)
    avg, sd, lo, hi = image_stats(data)
    print(f"{src} : (x,y,z,n)= {shape[0]} x {shape[1]} x {shape[2]} x 1 ; avg= {avg:g} stddev= {sd:g} minval= {lo:g} "
          f"maxval= {hi:g}; angpix = {angpix:g}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Read, check, transform and write; prints one summary line (and warnings/notes to stderr)."""
    _check_options(args)
    src, dst = Path(args.i), Path(args.o) if args.o else Path()
    if args.o and is_stack_path(src) and is_suffix_output(args.o):   # RELION: --o bin2 -> <stack>_bin2.mrcs
        dst = src.with_name(f"{src.name[:-len(''.join(src.suffixes))]}_{args.o}.mrcs")
    if not args.stats:
        check_output_folder(dst.parent)
        if src.suffix != ".star":
            check_not_inputs([dst], [src])
    if src.suffix == ".star":
        for option, given in (("--stats", args.stats), ("--fsc", args.fsc), ("--com", args.com),
                              ("--sym", args.sym is not None)):
            # --sym would take a batch of particle images for a 3D map
            require(not given, f"{option}: give a map, image or stack, not a STAR file")
        return _run_star(src, args.o, args)
    header = read_header(src)
    stack = is_stack_path(src)
    shape = header.shape
    if stack:
        shape = shape if len(shape) == 3 else (1, *shape)
        ndim, what = 2, "stack"
        ny, nx = shape[1:]
    elif len(shape) == 3:
        ndim, what = 3, "map"
        nz, ny, nx = shape
    else:
        ndim, what = 2, "image"
        ny, nx = shape

    # pixel size
    if args.angpix is not None:
        if header.angpix > 0 and abs(header.angpix - args.angpix) > 1e-3 * args.angpix:
            print(f"note: {src}: using --angpix {args.angpix:g} Å instead of the header's {header.angpix:g} Å",
                  file=sys.stderr)
        angpix = float(args.angpix)
    else:
        require(header.angpix > 0 or args.stats, f"{src}: pixel size is 0 in the header; give --angpix")
        angpix = header.angpix

    if args.stats:
        return _print_stats(src, stack, angpix)
    if args.fsc:
        return _print_fsc(src, Path(args.fsc), angpix, args)
    if args.com:
        return _print_com(src, stack)
    if args.sym is not None:
        require(ndim == 3 and not stack, f"{src}: --sym symmetrises 3D maps; this is a {what}")
        from cryorefine.errors import option_error
        from cryorefine.geometry.symmetry import symmetry_matrices
        with option_error("--sym"):
            symmetry_matrices(args.sym)
    needs_square = (args.rescale_angpix is not None or args.new_box is not None or args.lowpass is not None
                    or args.highpass is not None)
    if needs_square:
        square = nx == ny and (ndim == 2 or nz == nx)
        dims = "x".join(str(s) for s in (shape if ndim == 3 else (nx, ny)))
        require(square, f"{src}: {what} is {dims}; a square {'map' if ndim == 3 else 'image'} is needed")

    _check_filters(src, nx, ndim, angpix, args, what)
    args._operand = load_operand(args, (ny, nx) if ndim == 2 else (nz, ny, nx), "stack image" if stack else what,
                                 angpix)
    require(not (args.flipz and ndim == 2), f"{src}: --flipZ: this {what} is 2D; only a 3D map has a z to mirror")
    new_size, out_angpix = _new_size(nx, angpix, args, what)
    _check_output_fits(src, max(new_size or nx, args.new_box or 0, nx), ndim)
    # RELION copies the input header: only rescaling (the true new size) or --force_header_angpix changes its pixel
    # size; --angpix is the size the filters use (and the header's when it has none)
    kept = header.angpix if new_size is None and header.angpix > 0 else out_angpix
    header_angpix = args.force_header_angpix if args.force_header_angpix is not None else kept

    if stack:
        images = open_stack(src)
        per_chunk = max(1, _CHUNK_BYTES // (nx * ny * 4))
        with StackWriter(dst, header_angpix, float16=args.float16) as w:
            for start in range(0, images.shape[0], per_chunk):
                chunk = without_nan(np.asarray(images[start:start + per_chunk], dtype=np.float32), args)
                require(bool(np.isfinite(chunk).all()), f"{src}: images {start + 1}.. contain NaN or inf "
                                                        f"(--remove_nan replaces them)")
                w.write(_writable(_process(chunk, 2, angpix, args, new_size), dst, args.float16))
        out_box, count = w.shape[-1], w.count
        desc = f"{count} images of {out_box}x{out_box}"
    else:
        data = without_nan(read_map(src)[0], args)
        require(bool(np.isfinite(data).all()), f"{src}: contains NaN or inf (--remove_nan replaces them)")
        out = _writable(_process(data, ndim, angpix, args, new_size), dst, args.float16)
        write_map(dst, out, header_angpix, float16=args.float16)
        desc = f"{what} of box {out.shape[-1]}"
    print(f"wrote {dst}: {desc}, {header_angpix:.6f} Å/px (input box {nx}, {angpix:g} Å/px)")
    return 0
