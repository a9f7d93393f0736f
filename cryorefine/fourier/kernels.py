"""Hot Fourier kernels: central-slice extraction, slice insertion, point-group summation (numba CPU).

This is the one module a GPU implementation replaces; everything else calls only these functions.

Storage layout of a padded 3D transform (``ft3d`` of a Projector, ``data``/``weight`` of a BackProjector):
a centred half-cube of shape ``(D, D, H)`` indexed ``[z, y, x]`` with ``R = (D - 3) // 2``,
``D = 2 R + 3`` and ``H = R + 2``. Voxel ``[iz, iy, ix]`` holds padded frequency
``ξ = (ix, iy - (R + 1), iz - (R + 1))`` (units: Fourier pixels of the padded box ``pad·N``), so
``ξx ∈ [0, R+1]`` and ``ξy, ξz ∈ [-(R+1), R+1]``; ``R = round(pad·r_max)`` (RELION's
``pad_size = 2·(R+1)+1``). Values at ``ξx < 0`` are ``conj`` of those at ``-ξ``. The one-voxel rim
beyond ``R`` keeps trilinear neighbours inside the array without bounds checks.

Frequencies ``kx, ky`` are float Fourier pixels of the model box ``N`` (any pixel list may be used);
the sample point is ``ξ = pad · Aᵀ (kx, ky, 0)``, i.e. ``ξ_c = pad (kx A[0, c] + ky A[1, c])``.
Complex arrays are complex64, weights float32 (float64 / complex128 also compile).
"""

from __future__ import annotations

import types

import numba
import numpy as np
from numba import njit, prange
from numpy.typing import NDArray


def half_cube_radius(shape: tuple[int, ...]) -> int:
    """R = round(pad·r_max) of a (2R+3, 2R+3, R+2) half-cube."""
    d, d2, h = shape
    if d != d2 or d % 2 == 0 or h != (d - 3) // 2 + 2:
        raise ValueError(f"not a (2R+3, 2R+3, R+2) half-cube: {shape}")
    return (d - 3) // 2


def half_cube_shape(radius: int) -> tuple[int, int, int]:
    """(D, D, H) of the half-cube for R = radius padded Fourier pixels."""
    return (2 * radius + 3, 2 * radius + 3, radius + 2)


# Work is cut into tiles of _TILE_ROT consecutive rotations x _TILE_PIX consecutive pixels, looped pixel-major:
# callers list neighbouring orientations together (a local window, a parent's children, HEALPix order), and their
# samples of one pixel fall on nearby voxels, so a tile reuses cached voxels instead of streaming the whole slice of
# each rotation through the cache (extraction 1.6x, insertion 1.8x faster in a local iteration at medium size;
# docs/benchmarks.md, "Hot kernels").
_TILE_ROT = 128
_TILE_PIX = 32
# Rotations in no particular order (a reconstruction in file order) gain nothing from tiles and lose 10-25 % to
# them: they get one rotation x 1024 pixels per work item instead, when neighbours differ by more than this.
_NEIGHBOUR_DEG = 10.0
_SERIAL_POINTS = 65_536  # below this many points thread start-up costs more than it saves


@njit(inline="always", cache=True)
def _half_cube_point(x, y, z, off):
    """A frequency (x, y, z) as array coordinates of the half-cube: Friedel-folded to x ≥ 0 (neg = folded, the
    value is then the conjugate), y and z offset by the centre index `off`."""
    neg = x < 0.0
    if neg:
        x = -x
        y = -y
        z = -z
    return neg, x, y + off, z + off


def _tile_shape(rotations: NDArray) -> tuple[int, int]:
    """(rotations, pixels) per tile: _TILE_ROT x _TILE_PIX when consecutive rotations are neighbours (median angle
    between them at most _NEIGHBOUR_DEG), else 1 x 1024."""
    if rotations.shape[0] < 2:
        return 1, 1024
    cos = (np.einsum("nij,nij->n", rotations[1:], rotations[:-1]) - 1.0) / 2.0
    return (_TILE_ROT, _TILE_PIX) if np.median(cos) >= np.cos(np.radians(_NEIGHBOUR_DEG)) else (1, 1024)


@njit(cache=True)
def _plane_axes(rot, pad):
    """(n, 6) float64: the slice plane's axes (the first two rows of each A) scaled by pad, a00 a01 a02 a10 a11 a12."""
    n = rot.shape[0]
    axes = np.empty((n, 6), np.float64)
    for i in range(n):
        for c in range(3):
            axes[i, c] = pad * rot[i, 0, c]
            axes[i, 3 + c] = pad * rot[i, 1, c]
    return axes


def _project_impl(ft3d, axes, kx, ky, r_max, out, tile_rot, tile_pix):
    n = axes.shape[0]
    m = kx.shape[0]
    off = (ft3d.shape[0] - 1) // 2
    r2max = r_max * r_max
    nrt = (n + tile_rot - 1) // tile_rot
    npt = (m + tile_pix - 1) // tile_pix
    for b in prange(nrt * npt):
        ilo = (b // npt) * tile_rot
        ihi = min(ilo + tile_rot, n)
        jlo = (b % npt) * tile_pix
        jhi = min(jlo + tile_pix, m)
        for j in range(jlo, jhi):
            u = np.float64(kx[j])
            v = np.float64(ky[j])
            if u * u + v * v > r2max:
                for i in range(ilo, ihi):
                    out[i, j] = 0
                continue
            for i in range(ilo, ihi):
                neg, x, y, z = _half_cube_point(u * axes[i, 0] + v * axes[i, 3], u * axes[i, 1] + v * axes[i, 4],
                                                u * axes[i, 2] + v * axes[i, 5], off)
                x0 = int(x)
                y0 = int(np.floor(y))
                z0 = int(np.floor(z))
                fx = np.float32(x - x0)
                fy = np.float32(y - y0)
                fz = np.float32(z - z0)
                gx = np.float32(1.0) - fx
                c00 = ft3d[z0, y0, x0] * gx + ft3d[z0, y0, x0 + 1] * fx
                c01 = ft3d[z0, y0 + 1, x0] * gx + ft3d[z0, y0 + 1, x0 + 1] * fx
                c10 = ft3d[z0 + 1, y0, x0] * gx + ft3d[z0 + 1, y0, x0 + 1] * fx
                c11 = ft3d[z0 + 1, y0 + 1, x0] * gx + ft3d[z0 + 1, y0 + 1, x0 + 1] * fx
                gy = np.float32(1.0) - fy
                c0 = c00 * gy + c01 * fy
                c1 = c10 * gy + c11 * fy
                val = c0 * (np.float32(1.0) - fz) + c1 * fz
                out[i, j] = np.conj(val) if neg else val


def _renamed(func, name: str):
    """Copy of a Python function under another name, so numba's on-disk cache keeps the variants apart."""
    clone = types.FunctionType(func.__code__, func.__globals__, name, func.__defaults__, func.__closure__)
    clone.__qualname__ = name
    return clone


_project = njit(parallel=True, fastmath=True, cache=True)(_renamed(_project_impl, "_project"))
_project_serial = njit(fastmath=True, cache=True)(_renamed(_project_impl, "_project_serial"))


def project_points(ft3d: NDArray, rotations: NDArray, kx: NDArray, ky: NDArray, pad: int,
                   r_max: float, out: NDArray | None = None) -> NDArray[np.complex64]:
    """Trilinear samples of the padded half-cube at pad·Aᵀ(kx, ky, 0); 0 where kx²+ky² > r_max² -> (n, m), written
    into `out` when given (C-contiguous, of ft3d's dtype)."""
    rotations = np.ascontiguousarray(rotations, dtype=np.float64).reshape(-1, 3, 3)
    kx = np.ascontiguousarray(kx, dtype=np.float32).ravel()
    ky = np.ascontiguousarray(ky, dtype=np.float32).ravel()
    radius = half_cube_radius(ft3d.shape)
    # never sample beyond the stored sphere (its rim is only a trilinear neighbour)
    r_max = min(float(r_max), radius / pad)
    shape = (rotations.shape[0], kx.shape[0])
    if out is None:
        out = np.empty(shape, dtype=ft3d.dtype)
    elif out.shape != shape or out.dtype != ft3d.dtype or not out.flags.c_contiguous:
        raise ValueError(f"out: need a C-contiguous {ft3d.dtype} array of shape {shape}")
    if out.size:
        kernel = _project_serial if out.size < _SERIAL_POINTS else _project
        kernel(ft3d, _plane_axes(rotations, float(pad)), kx, ky, r_max, out, *_tile_shape(rotations))
    return out


@njit(cache=True)
def _slab_histogram(rot, kx, ky, pad, r2max, off, depth, stride):
    """Counts of insertion points per z-plane index (floor), over every stride-th rotation."""
    hist = np.zeros(depth, np.float64)
    for i in range(0, rot.shape[0], stride):
        a00 = pad * rot[i, 0, 0]
        a02 = pad * rot[i, 0, 2]
        a10 = pad * rot[i, 1, 0]
        a12 = pad * rot[i, 1, 2]
        for j in range(kx.shape[0]):
            u = np.float64(kx[j])
            v = np.float64(ky[j])
            x = u * a00 + v * a10
            z = u * a02 + v * a12
            if x < 0.0:
                z = -z
            zi = int(np.floor(z + off))
            if 0 <= zi < depth:
                hist[zi] += 1.0
    return hist


@njit(inline="always", fastmath=True, cache=True)
def _splat_plane(data, weight, z, y0, x0, wy0, wy1, gx, fx, val, w):
    """Add val, w to the 2x2 (y, x) neighbours of one z-plane with trilinear weights (wy0, wy1) x (gx, fx)."""
    data[z, y0, x0] += val * (wy0 * gx)
    data[z, y0, x0 + 1] += val * (wy0 * fx)
    data[z, y0 + 1, x0] += val * (wy1 * gx)
    data[z, y0 + 1, x0 + 1] += val * (wy1 * fx)
    weight[z, y0, x0] += w * (wy0 * gx)
    weight[z, y0, x0 + 1] += w * (wy0 * fx)
    weight[z, y0 + 1, x0] += w * (wy1 * gx)
    weight[z, y0 + 1, x0 + 1] += w * (wy1 * fx)


def _backproject_impl(data, weight, axes, kx, ky, values, weights, pad, r2max, bounds, tile_rot, tile_pix):
    """Trilinear splat; each slab [bounds[s], bounds[s+1]) of z-planes is written by one thread only (no atomics).
    Within a slab, tiles of rotations x pixels as in the projection kernel."""
    n = axes.shape[0]
    m = kx.shape[0]
    off = (data.shape[0] - 1) // 2
    nslab = bounds.shape[0] - 1
    nrt = (n + tile_rot - 1) // tile_rot
    npt = (m + tile_pix - 1) // tile_pix
    for s in prange(nslab):
        zlo = bounds[s]
        zhi = bounds[s + 1]
        for ti in range(nrt):
            ilo = ti * tile_rot
            ihi = min(ilo + tile_rot, n)
            # the tile's slices lie within |z| <= zext of the centre plane: skip slabs they all miss
            zext = 0.0
            for i in range(ilo, ihi):
                zext = max(zext, np.sqrt(r2max * (axes[i, 2] * axes[i, 2] + axes[i, 5] * axes[i, 5])) / pad + 1.0)
            if off + zext < zlo - 1 or off - zext >= zhi:
                continue
            for tj in range(npt):
                jlo = tj * tile_pix
                jhi = min(jlo + tile_pix, m)
                for j in range(jlo, jhi):
                    u = np.float64(kx[j])
                    v = np.float64(ky[j])
                    for i in range(ilo, ihi):
                        x = u * axes[i, 0] + v * axes[i, 3]
                        z = u * axes[i, 2] + v * axes[i, 5]
                        neg = x < 0.0
                        if neg:
                            x = -x
                            z = -z
                        z += off
                        z0 = int(np.floor(z))
                        if z0 + 1 < zlo or z0 >= zhi:
                            continue
                        y = u * axes[i, 1] + v * axes[i, 4]
                        if neg:
                            y = -y
                        if x * x + (y * y + (z - off) * (z - off)) > r2max:
                            continue
                        y += off
                        x0 = int(x)
                        y0 = int(np.floor(y))
                        fx = np.float32(x - x0)
                        fy = np.float32(y - y0)
                        fz = np.float32(z - z0)
                        gx = np.float32(1.0) - fx
                        gy = np.float32(1.0) - fy
                        gz = np.float32(1.0) - fz
                        val = values[i, j]
                        if neg:
                            val = np.conj(val)
                        w = weights[i, j]
                        if z0 >= zlo:
                            _splat_plane(data, weight, z0, y0, x0, gz * gy, gz * fy, gx, fx, val, w)
                        if z0 + 1 < zhi:
                            _splat_plane(data, weight, z0 + 1, y0, x0, fz * gy, fz * fy, gx, fx, val, w)


_backproject = njit(parallel=True, fastmath=True, cache=True)(_renamed(_backproject_impl, "_backproject"))
_backproject_serial = njit(fastmath=True, cache=True)(_renamed(_backproject_impl, "_backproject_serial"))


def _slab_bounds(rot, kx, ky, pad, r2max, off, depth, nslab) -> NDArray[np.int64]:
    """z-plane boundaries giving each slab about the same number of insertion points."""
    if nslab <= 1:
        return np.array([0, depth], dtype=np.int64)
    stride = max(1, rot.shape[0] * kx.shape[0] // 500_000)
    hist = _slab_histogram(rot, kx, ky, pad, r2max, off, depth, stride)
    # a point at plane z0 also writes z0+1: count it on both
    load = hist + np.concatenate(([0.0], hist[:-1])) + 1e-3
    cum = np.cumsum(load)
    targets = cum[-1] * np.arange(1, nslab) / nslab
    inner = np.searchsorted(cum, targets) + 1
    return np.concatenate(([0], np.clip(inner, 0, depth), [depth])).astype(np.int64)


def backproject_points(data: NDArray, weight: NDArray, rotations: NDArray, kx: NDArray, ky: NDArray,
                       values: NDArray, weights: NDArray, pad: int, r_max: float) -> None:
    """Trilinear splat of values (n, m) into data and weights into weight at pad·Aᵀ(kx, ky, 0), in place.

    Points with |ξ|² > round(pad·r_max)² are skipped; points with ξx < 0 go to -ξ with conj(value).
    Parallel over z-slabs of the half-cube (one writer per voxel), so any thread count is exact.
    """
    radius = half_cube_radius(data.shape)
    if weight.shape != data.shape:
        raise ValueError(f"weight {weight.shape} != data {data.shape}")
    rotations = np.ascontiguousarray(rotations, dtype=np.float64).reshape(-1, 3, 3)
    kx = np.ascontiguousarray(kx, dtype=np.float32).ravel()
    ky = np.ascontiguousarray(ky, dtype=np.float32).ravel()
    shape = (rotations.shape[0], kx.shape[0])
    values = np.ascontiguousarray(np.broadcast_to(values, shape), dtype=data.dtype)
    weights = np.ascontiguousarray(np.broadcast_to(weights, shape), dtype=weight.dtype)
    if values.size == 0:
        return
    r_ins = min(int(round(pad * r_max)), radius)
    r2max = float(r_ins * r_ins)
    off = radius + 1
    axes = _plane_axes(rotations, float(pad))
    tiles = _tile_shape(rotations)
    if values.size < _SERIAL_POINTS:
        bounds = np.array([0, data.shape[0]], dtype=np.int64)
        _backproject_serial(data, weight, axes, kx, ky, values, weights, float(pad), r2max, bounds, *tiles)
        return
    bounds = _slab_bounds(rotations, kx, ky, float(pad), r2max, off, data.shape[0], numba.get_num_threads())
    _backproject(data, weight, axes, kx, ky, values, weights, float(pad), r2max, bounds, *tiles)


@njit(cache=True)
def _snap(v):
    """v rounded to the nearest integer when within 1e-9 of it."""
    r = np.floor(v + 0.5)
    return r if abs(v - r) < 1e-9 else v


@njit(parallel=True, fastmath=True, cache=True)
def _symmetrise(data, weight, mats, r2max, out_data, out_weight):
    d = data.shape[0]
    h = data.shape[2]
    off = (d - 1) // 2
    for iz in prange(d):
        z = np.float64(iz - off)
        for iy in range(d):
            y = np.float64(iy - off)
            for ix in range(h):
                x = np.float64(ix)
                if x * x + y * y + z * z > r2max:
                    continue
                acc = out_data[iz, iy, ix] * 0
                wacc = out_weight[iz, iy, ix] * 0
                for g in range(mats.shape[0]):
                    neg, xp, yp, zp = _half_cube_point(mats[g, 0, 0] * x + mats[g, 0, 1] * y + mats[g, 0, 2] * z,
                                                       mats[g, 1, 0] * x + mats[g, 1, 1] * y + mats[g, 1, 2] * z,
                                                       mats[g, 2, 0] * x + mats[g, 2, 1] * y + mats[g, 2, 2] * z, off)
                    # 2-, 4-fold operators map voxels onto voxels: snap the float noise so they stay exact
                    xp = _snap(xp)
                    yp = _snap(yp)
                    zp = _snap(zp)
                    x0 = int(xp)
                    y0 = int(np.floor(yp))
                    z0 = int(np.floor(zp))
                    fx = xp - x0
                    fy = yp - y0
                    fz = zp - z0
                    # |R ξ| ≤ R keeps every neighbour inside the (2R+3)² (R+2) half-cube
                    x1 = x0 + 1
                    y1 = y0 + 1
                    z1 = z0 + 1
                    gx = 1.0 - fx
                    gy = 1.0 - fy
                    gz = 1.0 - fz
                    c = ((data[z0, y0, x0] * gx + data[z0, y0, x1] * fx) * gy
                         + (data[z0, y1, x0] * gx + data[z0, y1, x1] * fx) * fy) * gz \
                        + ((data[z1, y0, x0] * gx + data[z1, y0, x1] * fx) * gy
                           + (data[z1, y1, x0] * gx + data[z1, y1, x1] * fx) * fy) * fz
                    wv = ((weight[z0, y0, x0] * gx + weight[z0, y0, x1] * fx) * gy
                          + (weight[z0, y1, x0] * gx + weight[z0, y1, x1] * fx) * fy) * gz \
                        + ((weight[z1, y0, x0] * gx + weight[z1, y0, x1] * fx) * gy
                           + (weight[z1, y1, x0] * gx + weight[z1, y1, x1] * fx) * fy) * fz
                    acc += np.conj(c) if neg else c
                    wacc += wv
                out_data[iz, iy, ix] = acc
                out_weight[iz, iy, ix] = wacc


def symmetrise_grid(data: NDArray, weight: NDArray, sym_mats: NDArray, r_ins: int) -> tuple[NDArray, NDArray]:
    """Σ_g B(R_g ξ), Σ_g W(R_g ξ) (trilinear, conj for negative x) for |ξ| ≤ r_ins; other voxels copied."""
    mats = np.ascontiguousarray(sym_mats, dtype=np.float64).reshape(-1, 3, 3)
    out_data = data.copy()
    out_weight = weight.copy()
    _symmetrise(data, weight, mats, float(r_ins * r_ins), out_data, out_weight)
    return out_data, out_weight
