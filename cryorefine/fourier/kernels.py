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


def _project_impl(flat, d, axes, kx, ky, inside, out, tile_rot, tile_pix, one, off):
    """Trilinear samples into out (n, 2m): re, im pairs; `flat` is the half-cube's real view (re, im interleaved,
    float32 or float64) flattened; `one` and the centre index `off` are of its dtype (float32 arithmetic stays
    float32); kx, ky are 0 where `inside` is 0 (beyond r_max).

    Indices are unsigned and the pixel loop innermost, which lets LLVM vectorise it (gathers where the CPU has them:
    docs/benchmarks.md, "Kernels on flat views and block sums")."""
    n = axes.shape[0]
    m = kx.shape[0]
    u1 = np.uint64(1)
    u2 = np.uint64(2)
    u3 = np.uint64(3)
    sy = np.uint64(2 * ((d - 3) // 2 + 2))          # a y-row of the (D, D, H) half-cube, in reals
    sz = np.uint64(d) * sy
    nrt = (n + tile_rot - 1) // tile_rot
    npt = (m + tile_pix - 1) // tile_pix
    for b in prange(nrt * npt):
        ilo = (b // npt) * tile_rot
        ihi = min(ilo + tile_rot, n)
        jlo = np.uint64((b % npt) * tile_pix)
        jhi = np.uint64(min((b % npt) * tile_pix + tile_pix, m))
        for i in range(ilo, ihi):
            a0 = axes[i, 0]
            a1 = axes[i, 1]
            a2 = axes[i, 2]
            a3 = axes[i, 3]
            a4 = axes[i, 4]
            a5 = axes[i, 5]
            for j in range(jlo, jhi):
                u = kx[j]
                v = ky[j]
                x = u * a0 + v * a3
                # Friedel fold to x >= 0 (s = -1: the stored value's conjugate)
                s = one if x >= 0 else -one
                x = x * s
                y = (u * a1 + v * a4) * s + off
                z = (u * a2 + v * a5) * s + off
                xf = np.floor(x)
                yf = np.floor(y)
                zf = np.floor(z)
                fx = x - xf
                fy = y - yf
                fz = z - zf
                gx = one - fx
                w00 = (one - fy) * (one - fz)
                w01 = fy * (one - fz)
                w10 = (one - fy) * fz
                w11 = fy * fz
                p = np.uint64(zf) * sz + np.uint64(yf) * sy + u2 * np.uint64(xf)    # x, y, z >= 0 here
                re = (w00 * (gx * flat[p] + fx * flat[p + u2])
                      + w01 * (gx * flat[p + sy] + fx * flat[p + sy + u2])
                      + w10 * (gx * flat[p + sz] + fx * flat[p + sz + u2])
                      + w11 * (gx * flat[p + sz + sy] + fx * flat[p + sz + sy + u2]))
                im = (w00 * (gx * flat[p + u1] + fx * flat[p + u3])
                      + w01 * (gx * flat[p + sy + u1] + fx * flat[p + sy + u3])
                      + w10 * (gx * flat[p + sz + u1] + fx * flat[p + sz + u3])
                      + w11 * (gx * flat[p + sz + sy + u1] + fx * flat[p + sz + sy + u3]))
                out[i, u2 * j] = re * inside[j]
                out[i, u2 * j + u1] = im * s * inside[j]


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
        real = np.float32 if ft3d.dtype == np.complex64 else np.float64
        inside = (kx.astype(np.float64) ** 2 + ky.astype(np.float64) ** 2 <= r_max * r_max).astype(real)
        kx_in = np.where(inside > 0, kx, 0).astype(real)     # beyond r_max: sample the centre, times 0
        ky_in = np.where(inside > 0, ky, 0).astype(real)
        kernel = _project_serial if out.size < _SERIAL_POINTS else _project
        kernel(np.ascontiguousarray(ft3d).view(real).ravel(), ft3d.shape[0],
               _plane_axes(rotations, float(pad)).astype(real), kx_in, ky_in, inside,
               out.view(real).reshape(shape[0], 2 * shape[1]), *_tile_shape(rotations), real(1.0),
               real((ft3d.shape[0] - 1) // 2))
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
def _splat_plane(dflat, wflat, pw, hw, wy0, wy1, gx, fx, vr, vi, w):
    """Add (vr, vi) and w to the 2x2 (y, x) neighbours of one z-plane with trilinear weights (wy0, wy1) x (gx, fx);
    pw is the flat index of the (y0, x0) corner in the weights, hw a y-row's length (data: twice, re/im pairs)."""
    u1 = np.uint64(1)
    u2 = np.uint64(2)
    c00 = wy0 * gx
    c01 = wy0 * fx
    c10 = wy1 * gx
    c11 = wy1 * fx
    wflat[pw] += w * c00
    wflat[pw + u1] += w * c01
    wflat[pw + hw] += w * c10
    wflat[pw + hw + u1] += w * c11
    p = u2 * pw
    dflat[p] += vr * c00
    dflat[p + u1] += vi * c00
    dflat[p + u2] += vr * c01
    dflat[p + u2 + u1] += vi * c01
    p = u2 * (pw + hw)
    dflat[p] += vr * c10
    dflat[p + u1] += vi * c10
    dflat[p + u2] += vr * c11
    dflat[p + u2 + u1] += vi * c11


def _backproject_impl(dflat, wflat, d, axes, kx, ky, inside, values, weights, r2k, bounds, tile_rot, tile_pix, one,
                      off):
    """Trilinear splat; each slab [bounds[s], bounds[s+1]) of z-planes is written by one thread only (no atomics).
    Within a slab, tiles of rotations x pixels as in the projection kernel. dflat, wflat: the half-cubes flattened
    (data as re, im pairs), values (n, 2m) re, im pairs; only pixels with inside[j] go in (|ξ|² ≤ r2max, decided
    per pixel: |ξ| = pad |k| for every rotation), r2k = r2max / pad² their largest |k|² (the slab test); `one`,
    `off` (centre index) and r2k of their real dtype, so that float32 arithmetic stays float32; flat indices
    unsigned (no negative-index wrapping)."""
    n = axes.shape[0]
    m = kx.shape[0]
    nslab = bounds.shape[0] - 1
    nrt = (n + tile_rot - 1) // tile_rot
    npt = (m + tile_pix - 1) // tile_pix
    u1 = np.uint64(1)
    u2 = np.uint64(2)
    hw = np.uint64((d - 3) // 2 + 2)       # a y-row of the (D, D, H) half-cube
    wz = np.uint64(d) * hw                 # a z-plane
    for s in prange(nslab):
        zlo = bounds[s]
        zhi = bounds[s + 1]
        for ti in range(nrt):
            ilo = ti * tile_rot
            ihi = min(ilo + tile_rot, n)
            # the tile's slices lie within |z| <= zext of the centre plane: skip slabs they all miss
            zext = 0.0
            for i in range(ilo, ihi):
                zext = max(zext, np.sqrt(r2k * (axes[i, 2] * axes[i, 2] + axes[i, 5] * axes[i, 5])) + 1.0)
            if off + zext < zlo - 1 or off - zext >= zhi:
                continue
            for tj in range(npt):
                jlo = tj * tile_pix
                jhi = min(jlo + tile_pix, m)
                for j in range(jlo, jhi):
                    if not inside[j]:
                        continue
                    u = kx[j]
                    v = ky[j]
                    for i in range(ilo, ihi):
                        x = u * axes[i, 0] + v * axes[i, 3]
                        # Friedel fold to x >= 0 (sg = -1: the conjugate value goes in)
                        sg = one if x >= 0 else -one
                        x = x * sg
                        zc = (u * axes[i, 2] + v * axes[i, 5]) * sg
                        z = zc + off
                        zf = np.floor(z)
                        z0 = np.int64(zf)
                        if z0 + 1 < zlo or z0 >= zhi:
                            continue
                        y = (u * axes[i, 1] + v * axes[i, 4]) * sg + off
                        xf = np.floor(x)
                        yf = np.floor(y)
                        fx = x - xf
                        fy = y - yf
                        fz = z - zf
                        gx = one - fx
                        gy = one - fy
                        gz = one - fz
                        vr = values[i, u2 * np.uint64(j)]
                        vi = values[i, u2 * np.uint64(j) + u1] * sg
                        w = weights[i, j]
                        q = np.uint64(yf) * hw + np.uint64(xf)        # x, y >= 0 here
                        if z0 >= zlo:
                            _splat_plane(dflat, wflat, np.uint64(z0) * wz + q, hw, gz * gy, gz * fy, gx, fx, vr, vi,
                                         w)
                        if z0 + 1 < zhi:
                            _splat_plane(dflat, wflat, np.uint64(z0 + 1) * wz + q, hw, fz * gy, fz * fy, gx, fx, vr,
                                         vi, w)


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
    if not (data.flags.c_contiguous and weight.flags.c_contiguous):
        raise ValueError("data and weight must be C-contiguous (they are written through flat views)")
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
        kernel, bounds = _backproject_serial, np.array([0, data.shape[0]], dtype=np.int64)
    else:
        kernel = _backproject
        bounds = _slab_bounds(rotations, kx, ky, float(pad), r2max, off, data.shape[0], numba.get_num_threads())
    real = weight.dtype.type
    inside = pad * pad * (kx.astype(np.float64) ** 2 + ky.astype(np.float64) ** 2) <= r2max
    kernel(data.view(real).reshape(-1), weight.reshape(-1), data.shape[0], axes.astype(real), kx.astype(real),
           ky.astype(real), inside, values.view(real).reshape(shape[0], 2 * shape[1]), weights, real(r2max / pad ** 2), bounds,
           *tiles, real(1.0), real(off))


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
