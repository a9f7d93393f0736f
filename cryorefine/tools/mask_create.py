"""Make a soft solvent mask from a map (like relion_mask_create): threshold, extend, soft edge.

Example (the RELION tutorial's MaskCreate job):
  cryorefine mask-create --i Refine3D/job019/run_class001.mrc --o MaskCreate/job020/mask.mrc --lowpass 15
                         --ini_threshold 0.005 --extend_inimask 3 --width_soft_edge 6

As RELION's autoMask: the map (low-passed to --lowpass Å first, RELION's raised cosine) is 1 where it is at least
--ini_threshold, else 0; --and/--or/--and_not/--or_not combine the voxels strictly above it with another map's
voxels strictly above (--and, --or) or below it (--and_not, --or_not), as RELION compares; the binary
mask grows by --extend_inimask px (shrinks when negative: a voxel changes when one of the other kind lies closer
than that); then every voxel outside it within --width_soft_edge px of it gets 0.5 + 0.5·cos(π d / width), d the
distance to the nearest voxel inside. --invert gives 1 − mask. The pixel size is the map's (or --angpix).
--denovo makes a sphere or spherical shell from scratch instead (RELION's raisedCrownMask: --box_size,
--inner_radius, --outer_radius, --center_x/y/z in px from voxel N//2, edges of --width_soft_edge px; 1 Å/px
without --angpix).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from cryorefine.errors import InputError, require, require_finite
from cryorefine.io.mrc import read_volume, write_map
from cryorefine.validate import (check_fits_in_memory, check_not_inputs, check_output_file, check_output_folder,
                                 same_pixel_size)

COMBINE = {"and_map": "--and", "or_map": "--or", "and_not_map": "--and_not", "or_not_map": "--or_not"}
# options taken as numbers: nan would pass or skip their tests silently (nan > 0 and nan < 0 are both false)
NUMBER_OPTIONS = ("ini_threshold", "extend_inimask", "width_soft_edge", "lowpass", "angpix", "inner_radius",
                  "outer_radius", "center_x", "center_y", "center_z")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """relion_mask_create's options."""
    parser.add_argument("--i", dest="i", default=None, help="map to threshold (e.g. run_class001.mrc)")
    parser.add_argument("--o", dest="o", default="mask.mrc", help="output mask (default mask.mrc)")
    parser.add_argument("--ini_threshold", type=float, default=0.01, help="threshold for the binary mask")
    parser.add_argument("--extend_inimask", type=float, default=0.0,
                        help="grow the binary mask by this many pixels (negative: shrink)")
    parser.add_argument("--width_soft_edge", type=float, default=0.0, help="raised-cosine soft edge width (px)")
    parser.add_argument("--lowpass", type=float, default=-1.0, help="low-pass the map to this resolution (Å) first")
    parser.add_argument("--angpix", type=float, default=-1.0, help="pixel size (Å; default: the map's header)")
    parser.add_argument("--invert", action="store_true", help="1 − mask")
    for dest, flag in COMBINE.items():
        parser.add_argument(flag, dest=dest, default=None, help=f"RELION {flag}: combine with this map's threshold")
    parser.add_argument("--j", type=int, default=1, help="threads (accepted; scipy's distance transform is serial)")
    parser.add_argument("--helix", action="store_true", help="RELION: helical mask (not available)")
    # the GUI writes it with --helix: accepted so that the line says what is missing
    parser.add_argument("--z_percentage", type=float, default=None, help="RELION, with --helix (not available)")
    parser.add_argument("--denovo", action="store_true",
                        help="a spherical mask or shell from scratch (--box_size, --inner_radius, --outer_radius, "
                             "--center_x/y/z in px from the box centre, soft edge --width_soft_edge)")
    parser.add_argument("--box_size", type=int, default=-1, help="--denovo: box (px)")
    parser.add_argument("--inner_radius", type=float, default=0.0, help="--denovo: inner radius (px)")
    parser.add_argument("--outer_radius", type=float, default=99999.0, help="--denovo: outer radius (px)")
    for axis in "xyz":
        parser.add_argument(f"--center_{axis}", type=float, default=0.0, help=f"--denovo: {axis} of the centre (px)")


def binary_mask(volume: NDArray, threshold: float) -> NDArray[np.bool_]:
    """Voxels at or above the threshold (RELION autoMask step A)."""
    return np.asarray(volume) >= threshold


def combined(above: NDArray[np.bool_], other: NDArray, threshold: float, how: str) -> NDArray[np.bool_]:
    """RELION's --and / --or / --and_not / --or_not: `above` (input voxels strictly above the threshold) with the other
    map's voxels strictly above it (--and, --or) or strictly below it (--and_not, --or_not), as mask_create.cpp
    compares (a voxel equal to the threshold is in neither)."""
    other = np.asarray(other)
    return {"and_map": above & (other > threshold), "or_map": above | (other > threshold),
            "and_not_map": above & (other < threshold), "or_not_map": above | (other < threshold)}[how]


def extended(mask: NDArray[np.bool_], pixels: float) -> NDArray[np.bool_]:
    """Grow (pixels > 0) or shrink (< 0) a binary mask: a voxel changes when one of the other kind is closer than
    |pixels| (Euclidean voxel distance; RELION autoMask step B)."""
    if pixels > 0 and mask.any():
        return mask | (ndimage.distance_transform_edt(~mask) < pixels)
    if pixels < 0 and (~mask).any():
        return mask & ~(ndimage.distance_transform_edt(mask) < -pixels)
    return mask


def soft_edge(mask: NDArray[np.bool_], width: float) -> NDArray[np.float32]:
    """1 inside; 0.5 + 0.5 cos(π d/width) outside within `width` px of it (d: distance to the nearest voxel inside);
    0 beyond (RELION autoMask step C)."""
    out = mask.astype(np.float32)
    if width > 0 and mask.any():
        d = ndimage.distance_transform_edt(~mask)
        edge = ~mask & (d < width)
        out[edge] = 0.5 + 0.5 * np.cos(np.pi * d[edge] / width)
    return out


def crown_mask(box: int, inner: float, outer: float, width: float, centre: tuple[float, float, float]) -> NDArray:
    """RELION raisedCrownMask: 1 for inner <= d < outer (d from the centre, px, relative to voxel N//2; x, y, z
    order), raised-cosine edges of `width` px outside both radii, 0 beyond."""
    c = np.arange(box, dtype=np.float64) - box // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij", sparse=True)
    d = np.sqrt((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2)
    w = max(width, 1e-12)
    out = np.where((d >= inner) & (d < outer), 1.0, 0.0)
    out = np.where((d >= inner - width) & (d < inner), 0.5 - 0.5 * np.cos(np.pi * (d - inner + width) / w), out)
    out = np.where((d >= outer) & (d < outer + width), 0.5 - 0.5 * np.cos(np.pi * (outer + width - d) / w), out)
    return out.astype(np.float32)


def _check_options(args) -> None:
    """Option values that can never work, before any file is read."""
    require(not args.helix, "--helix: helical masks are not available in cryorefine mask-create")
    require_finite(args, NUMBER_OPTIONS)
    require(args.width_soft_edge >= 0, f"--width_soft_edge: must be >= 0 (got {args.width_soft_edge:g})")
    require(args.j >= 1, f"--j: the number of threads must be >= 1 (got {args.j})")
    # before any work: writing would fail at the very end, naming an internal temporary file
    check_output_file(args.o)


def _read_volume(path: str, option: str) -> tuple[NDArray, float]:
    """The cubic 3D map given to `option` (--i, --and, ...) and its header pixel size; InputError naming the file."""
    return read_volume(path, "map" if option == "--i" else f"{option} map")


def run(args: argparse.Namespace) -> int:
    """Read, low-pass, threshold, combine, extend, soften, write (or --denovo: a crown from scratch)."""
    _check_options(args)
    check_output_folder(Path(args.o).parent)
    if args.denovo:
        require(args.box_size > 0, "--denovo: give the box size with --box_size")
        require(args.i is None, f"--denovo makes a mask from scratch; --i {args.i} would not be used (give one of them)")
        # the distance grid and the mask, float64 while it is made
        check_fits_in_memory(3 * 8 * float(args.box_size) ** 3, f"--denovo --box_size {args.box_size}")
        require(args.outer_radius > args.inner_radius >= 0, f"--denovo: need 0 <= --inner_radius < --outer_radius "
                                                            f"(got {args.inner_radius:g}, {args.outer_radius:g})")
        result = crown_mask(args.box_size, args.inner_radius, args.outer_radius, args.width_soft_edge,
                            (args.center_x, args.center_y, args.center_z))
        # an empty mask is useless (refine refuses it): say so here rather than write zeros
        require(bool(np.any(result > 0)),
                f"--denovo: the mask would be empty: radii {args.inner_radius:g}-{args.outer_radius:g} px (edge "
                f"{args.width_soft_edge:g} px) around ({args.center_x:g}, {args.center_y:g}, {args.center_z:g}) px "
                f"from the box centre reach no voxel of the {args.box_size}-px box")
        require(not args.invert or bool(np.any(result < 1)),
                "--invert: the de novo mask fills the whole box, so the inverted mask would be empty")
        angpix = args.angpix if args.angpix > 0 else 1.0
        write_map(args.o, 1.0 - result if args.invert else result, angpix)
        print(f"cryorefine mask-create: {args.o}: de novo mask, box {args.box_size}, radii {args.inner_radius:g}-"
              f"{args.outer_radius:g} px, {angpix:.4g} Å/px{'' if args.angpix > 0 else ' (no --angpix: 1 Å/px)'}")
        return 0
    require(args.i is not None, "--i: the map to make the mask from is required (or --denovo)")
    others = {dest: getattr(args, dest) for dest in COMBINE if getattr(args, dest)}
    check_not_inputs([args.o], [args.i, *others.values()])
    volume, header_angpix = _read_volume(args.i, "--i")
    angpix = args.angpix if args.angpix > 0 else header_angpix
    require(angpix > 0, f"{args.i}: no pixel size in the header; give --angpix")
    # the grid of --i: its header, or --angpix when the header has none
    grid_angpix = header_angpix if header_angpix > 0 else angpix
    other_maps = {}
    for dest, path in others.items():     # all read and checked before any work, as --i is
        other, other_angpix = _read_volume(path, COMBINE[dest])
        require(other.shape == volume.shape, f"{path}: {COMBINE[dest]} map has shape {other.shape}, "
                                             f"{args.i} has {volume.shape}")
        # voxel-by-voxel combination needs the same grid (as relion_mask_create): the box alone is not enough
        require(same_pixel_size(other_angpix, grid_angpix),
                f"{path}: {COMBINE[dest]} map has pixel size {other_angpix:g} Å, {args.i} has {grid_angpix:g} Å: "
                f"the maps must be on the same grid (resample with cryorefine image-handler --rescale_angpix)")
        other_maps[dest] = (path, other)
    if args.lowpass > 0:
        from cryorefine.tools.image_handler import lowpass_map
        volume = lowpass_map(volume, args.lowpass, angpix, 3)
    mask = binary_mask(volume, args.ini_threshold)
    require(bool(mask.any()), f"{args.i}: no voxel is at or above --ini_threshold {args.ini_threshold:g} (the map's "
                              f"maximum{' after --lowpass' if args.lowpass > 0 else ''} is {float(volume.max()):.4g}); "
                              f"give a lower threshold")
    if other_maps:      # RELION combines with strict comparisons: the input's voxels above the threshold
        mask = np.asarray(volume) > args.ini_threshold
    # an empty mask is useless (refine refuses it): each step that can empty it says so rather than write zeros
    for dest, (path, other) in other_maps.items():
        mask = combined(mask, other, args.ini_threshold, dest)
        require(bool(mask.any()), f"{path}: the mask would be empty: no voxel is left after {COMBINE[dest]} with "
                                  f"this map at --ini_threshold {args.ini_threshold:g}")
    grown = extended(mask, args.extend_inimask)
    if not grown.any():     # only a shrink (negative value) can do this; the depth is computed for the message only
        depth = float(ndimage.distance_transform_edt(mask).max())
        raise InputError(f"--extend_inimask {args.extend_inimask:g}: shrinking removes every voxel of the binary mask "
                         f"of {args.i} (its deepest voxel is {depth:.3g} px inside): the mask would be empty")
    mask = grown
    result = soft_edge(mask, args.width_soft_edge)
    if args.invert:
        result = 1.0 - result
        require(bool(np.any(result > 0)),
                f"--invert: the mask of {args.i} fills the whole box, so the inverted mask would be empty")
    write_map(args.o, result, angpix)
    inside = float(mask.mean())
    print(f"cryorefine mask-create: {args.o}: {100 * inside:.1f} % of the box inside the binary mask, soft edge "
          f"{args.width_soft_edge:g} px, {angpix:.4g} Å/px{' (inverted)' if args.invert else ''}")
    if inside > 0.95:
        print(f"cryorefine mask-create: warning: the mask covers {100 * inside:.0f} % of the box: is --ini_threshold "
              f"{args.ini_threshold:g} below the solvent level?")
    return 0
