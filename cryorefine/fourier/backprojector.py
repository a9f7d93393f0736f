"""Fourier back-projector and RELION's regularised reconstruction (BackProjector, §3.1–§3.4, §4.2–§4.3).

Accumulators `data` (B, complex) and `weight` (W, real) are padded centred half-cubes in the layout of
`kernels` (shape (2R+3, 2R+3, R+2), R = round(pad·r_max), voxel [iz, iy, ix] = padded frequency
(ix, iy−R−1, iz−R−1)). Default dtypes are complex64 / float32: a box-256 pad-2 half keeps
515²·258·12 B ≈ 0.82 GB instead of 1.6 GB in double. float32 sums lose a contribution only once the
voxel total exceeds it by 2²⁴ (≈ 1.7e7 particles' worth at equal weight), so single precision is
enough for any realistic data set; pass dtype=np.float64 to `make_backprojector` for double.

Usage per half: insert(...) for every batch, then symmetrise (always: it also completes the ξx = 0
plane), join_low_resolution, fsc_halves, ssnr_from_fsc, reconstruct.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.fft as sfft
from numba import njit
from numpy.typing import NDArray

from cryorefine.errors import check
from cryorefine.fourier import kernels
from cryorefine.fourier.filters import soft_mask_outside_map
from cryorefine.fourier.fsc import fsc_null_sigma, shell_correlation
from cryorefine.fourier.projector import gridding_sinc2
from cryorefine.fourier.transforms import freq_radius


@dataclass
class BackProjector:
    """Padded half-cube accumulators B (data) and W (weight) of an ori_size³ map, inserted up to r_max."""

    data: NDArray[np.complex64]
    weight: NDArray[np.float32]
    pad: int
    ori_size: int
    r_max: float

    @property
    def radius(self) -> int:
        """R = round(pad·r_max): insertion radius in padded Fourier pixels."""
        return kernels.half_cube_radius(self.data.shape)


def _radius(ori_size: int, pad: int, r_max: float | None) -> tuple[float, int]:
    r_max = ori_size / 2 if r_max is None else float(r_max)
    check(ori_size >= 2 and ori_size % 2 == 0, f"box size: must be even, got {ori_size}")
    check(int(pad) == pad and pad >= 1, f"padding factor: must be a positive integer, got {pad}")
    check(0 < r_max <= ori_size / 2, f"r_max: must be in (0, {ori_size / 2}], got {r_max}")
    return r_max, int(round(pad * r_max))


def memory_bytes(ori_size: int, pad: int = 2, r_max: float | None = None, dtype=np.float32) -> int:
    """Bytes of one BackProjector (B + W); reconstruct needs about (pad·N)³·4·2 more, transiently."""
    _, radius = _radius(ori_size, pad, r_max)
    voxels = int(np.prod(kernels.half_cube_shape(radius)))
    real = np.dtype(dtype).itemsize
    return voxels * 3 * real


def make_backprojector(ori_size: int, pad: int = 2, r_max: float | None = None,
                       dtype=np.float32) -> BackProjector:
    """Zeroed accumulators for an ori_size³ map; r_max (N-box Fourier px) defaults to Nyquist."""
    r_max, radius = _radius(ori_size, pad, r_max)
    shape = kernels.half_cube_shape(radius)
    real = np.dtype(dtype)
    cplx = np.result_type(real, np.complex64)
    return BackProjector(data=np.zeros(shape, cplx), weight=np.zeros(shape, real), pad=int(pad),
                         ori_size=int(ori_size), r_max=r_max)


def insert(bp: BackProjector, rotations: NDArray, kx: NDArray, ky: NDArray, values: NDArray,
           weights: NDArray | float = 1.0) -> None:
    """Splat values (n, m) at pad·Aᵀ(kx, ky, 0) into bp.data and weights (broadcastable) into bp.weight."""
    kernels.backproject_points(bp.data, bp.weight, rotations, kx, ky, values, weights, bp.pad, bp.r_max)


def relion_round(x: NDArray) -> NDArray[np.int64]:
    """RELION's ROUND: halves away from zero."""
    x = np.asarray(x)
    return (np.sign(x) * np.floor(np.abs(x) + 0.5)).astype(np.int64)


def complete_hermitian(bp: BackProjector) -> None:
    """ξx = 0 plane: B(0,y,z) += conj B(0,−y,−z), W likewise (sum), mirror set to the conjugate (§3.2 step 1)."""
    plane = bp.data[:, :, 0]
    wplane = bp.weight[:, :, 0]
    mirror = plane[::-1, ::-1]
    new = plane + np.conj(mirror)
    neww = wplane + wplane[::-1, ::-1]
    plane[...] = new
    wplane[...] = neww


def symmetrise(bp: BackProjector, sym_mats: NDArray | None = None) -> None:
    """Hermitian completion of ξx = 0, then B ← Σ_g B(R_g ξ), W ← Σ_g W(R_g ξ) over |ξ| ≤ R (§3.2).

    sym_mats (G, 3, 3) includes the identity; None = C1 (completion only). Updates bp: the completion
    is in place, the group sum replaces bp.data / bp.weight with new arrays (a transient third copy).
    """
    complete_hermitian(bp)
    if sym_mats is None:
        return
    mats = np.asarray(sym_mats, dtype=np.float64).reshape(-1, 3, 3)
    if len(mats) == 1 and np.allclose(mats[0], np.eye(3)):
        return
    bp.data, bp.weight = kernels.symmetrise_grid(bp.data, bp.weight, mats, bp.radius)


def join_low_resolution(bp1: BackProjector, bp2: BackProjector, r_join: float) -> None:
    """Replace B, W of both halves by their average for |ξ|² ≤ round(pad·r_join)² (§4.2), in place."""
    _check_same(bp1, bp2)
    rj = int(round(bp1.pad * r_join))
    _join(bp1.data, bp1.weight, bp2.data, bp2.weight, rj * rj)


@njit(cache=True)
def _join(d1, w1, d2, w2, r2max):
    off = (d1.shape[0] - 1) // 2
    for iz in range(d1.shape[0]):
        z = iz - off
        for iy in range(d1.shape[1]):
            y = iy - off
            for ix in range(d1.shape[2]):
                if ix * ix + y * y + z * z <= r2max:
                    a = 0.5 * (d1[iz, iy, ix] + d2[iz, iy, ix])
                    b = 0.5 * (w1[iz, iy, ix] + w2[iz, iy, ix])
                    d1[iz, iy, ix] = a
                    d2[iz, iy, ix] = a
                    w1[iz, iy, ix] = b
                    w2[iz, iy, ix] = b


def _check_same(bp1: BackProjector, bp2: BackProjector) -> None:
    if bp1.data.shape != bp2.data.shape or bp1.pad != bp2.pad or bp1.ori_size != bp2.ori_size:
        raise ValueError("back-projectors differ in size, padding or radius")


def add(bp1: BackProjector, bp2: BackProjector) -> BackProjector:
    """New BackProjector holding B₁+B₂ and W₁+W₂ (e.g. both halves for the final map)."""
    _check_same(bp1, bp2)
    return BackProjector(data=bp1.data + bp2.data, weight=bp1.weight + bp2.weight, pad=bp1.pad,
                         ori_size=bp1.ori_size, r_max=max(bp1.r_max, bp2.r_max))


@njit(cache=True)
def _downsample(data, weight, pad, n, avg, wsum):
    d = data.shape[0]
    h = data.shape[2]
    off = (d - 1) // 2
    half = n // 2
    for iz in range(d):
        kz = iz - off
        kp = int(np.floor(abs(kz) / pad + 0.5)) * (1 if kz >= 0 else -1)
        if kp > half or kp < -half:
            continue
        for iy in range(d):
            ky = iy - off
            ip = int(np.floor(abs(ky) / pad + 0.5)) * (1 if ky >= 0 else -1)
            if ip > half or ip < -half:
                continue
            for ix in range(h):
                jp = int(np.floor(ix / pad + 0.5))
                if jp > half:
                    continue
                zi = kp % n
                yi = ip % n
                avg[zi, yi, jp] += data[iz, iy, ix]
                wsum[zi, yi, jp] += weight[iz, iy, ix]


def downsampled_average(bp: BackProjector) -> NDArray[np.complex128]:
    """A(κ) = Σ_{round(ξ/pad)=κ} B / Σ W on the N-grid, layout of transforms.rfftn_centered (§4.3)."""
    n = bp.ori_size
    avg = np.zeros((n, n, n // 2 + 1), np.complex128)
    wsum = np.zeros((n, n, n // 2 + 1), np.float64)
    _downsample(bp.data, bp.weight, float(bp.pad), n, avg, wsum)
    np.divide(avg, wsum, out=avg, where=wsum > 0)
    avg[wsum <= 0] = 0
    return avg


def fsc_halves(bp1: BackProjector, bp2: BackProjector) -> NDArray[np.float64]:
    """Unmasked FSC of the down-sampled averages per shell round|κ| = 0..N/2; FSC(0)=1, 0 beyond r_max (§4.3)."""
    return fsc_halves_and_null_sigma(bp1, bp2, null=False)[0]


def fsc_halves_and_null_sigma(bp1: BackProjector, bp2: BackProjector, null: bool = True, sym_mats: NDArray | None = None
                              ) -> tuple[NDArray[np.float64], NDArray[np.float64] | None]:
    """fsc_halves and, from the same down-sampled averages, the FSC's spread without common signal per shell
    (fsc.fsc_null_sigma of halves symmetrised with `sym_mats`; None when `null` is False)."""
    _check_same(bp1, bp2)
    n = bp1.ori_size
    a1 = downsampled_average(bp1)
    a2 = downsampled_average(bp2)
    rad = freq_radius((n, n, n))
    r_max = min(bp1.r_max, bp2.r_max)
    sel = rad <= r_max
    fsc = shell_correlation(a1[sel], a2[sel], relion_round(rad[sel]), n // 2 + 1)
    fsc[0] = 1.0
    return fsc, (fsc_null_sigma(a1, a2, r_max, sym_mats) if null else None)


@njit(cache=True)
def _round_shell(r, pad):
    """RELION ROUND(|ξ|/pad) for |ξ| ≥ 0."""
    return int(np.floor(r / pad + 0.5))


@njit(cache=True)
def _weight_shell_stats(weight, pad, radius, nb, inv_tau2):
    """Per shell round(|ξ|/pad) over |ξ|² < R²: (Σ W, voxel count, count of W ≥ inv_tau2[shell])."""
    off = (weight.shape[0] - 1) // 2
    r2max = radius * radius
    wsum = np.zeros(nb)
    count = np.zeros(nb)
    covered = np.zeros(nb)
    for iz in range(weight.shape[0]):
        z = iz - off
        for iy in range(weight.shape[1]):
            y = iy - off
            for ix in range(weight.shape[2]):
                q = ix * ix + y * y + z * z
                if q >= r2max:
                    continue
                s = _round_shell(np.sqrt(q), pad)
                if s >= nb:
                    continue
                w = weight[iz, iy, ix]
                wsum[s] += w
                count[s] += 1.0
                if w >= inv_tau2[s]:
                    covered[s] += 1.0
    return wsum, count, covered


def ssnr_from_fsc(bp: BackProjector, fsc: NDArray, tau2_fudge: float = 1.0, final: bool = False) -> dict:
    """σ²_ref, τ², SSNR (data_vs_prior) and Fourier coverage per shell 0..N/2 from the half-map FSC (§3.3).

    final=True converts the FSC to the full-data correlation sqrt(2f/(1+f)) (last joined iteration).
    """
    nb = bp.ori_size // 2 + 1
    fsc = np.asarray(fsc, dtype=np.float64)
    check(fsc.shape == (nb,), f"fsc: expected {nb} shells, got {fsc.shape}")
    pad3 = float(bp.pad) ** 3
    wsum, count, _ = _weight_shell_stats(bp.weight, float(bp.pad), bp.radius, nb, np.zeros(nb))
    mean_w = np.zeros(nb)
    np.divide(pad3 * wsum, count, out=mean_w, where=count > 0)
    sigma2 = np.zeros(nb)
    np.divide(1.0, mean_w, out=sigma2, where=mean_w > 0)

    f = np.maximum(0.001, fsc)
    if final:
        f = np.sqrt(2 * f / (1 + f))
    f = np.minimum(0.999, f)
    ssnr = tau2_fudge * f / (1 - f)
    tau2 = ssnr * sigma2

    inv_tau2 = np.zeros(nb)
    np.divide(1.0, pad3 * tau2_fudge * tau2, out=inv_tau2, where=tau2 > 0)
    _, count, covered = _weight_shell_stats(bp.weight, float(bp.pad), bp.radius, nb, inv_tau2)
    coverage = np.zeros(nb)
    np.divide(covered, count, out=coverage, where=count > 0)
    return {"sigma2": sigma2, "tau2": tau2, "ssnr": ssnr, "coverage": coverage}


@njit(cache=True)
def _regularised(w, shell, tau2, have_tau2, pad3, tau2_fudge, minres):
    """W + 1/(pad³ τ_f τ²(shell)) for shells ≥ minres (1/(0.001 W) where τ² = 0)."""
    if not have_tau2 or shell < minres:
        return w
    t = tau2[min(shell, tau2.shape[0] - 1)]
    if t > 0:
        return w + 1.0 / (pad3 * tau2_fudge * t)
    if w > 0:
        return w + 1.0 / (0.001 * w)
    return w


@njit(cache=True)
def _divide_into_grid(data, weight, tau2, have_tau2, tau2_fudge, minres, pad, radius, n_floor, grid):
    """F = B / max(W', floor) for |ξ|² ≤ R², written to the rfft layout of the (p, p, p//2+1) grid."""
    off = (data.shape[0] - 1) // 2
    r2max = radius * radius
    pad3 = pad * pad * pad
    p = grid.shape[0]
    # floor(ρ) = 0.001 · mean over |ξ|² < R² of W' in shell ρ = floor(|ξ|/pad). The half-cube traversal is the
    # same as _weight_shell_stats' on purpose: numba kernels cannot take the per-voxel body as an argument
    # without losing the fused loop, so each kernel spells the three loops out.
    fsum = np.zeros(n_floor + 1)
    fcnt = np.zeros(n_floor + 1)
    for iz in range(data.shape[0]):
        z = iz - off
        for iy in range(data.shape[1]):
            y = iy - off
            for ix in range(data.shape[2]):
                q = ix * ix + y * y + z * z
                if q >= r2max:
                    continue
                r = np.sqrt(q)
                rho = int(np.floor(r / pad))
                if rho > n_floor:
                    continue
                fsum[rho] += _regularised(weight[iz, iy, ix], _round_shell(r, pad), tau2, have_tau2,
                                          pad3, tau2_fudge, minres)
                fcnt[rho] += 1.0
    floors = np.zeros(n_floor + 1)
    for rho in range(n_floor + 1):
        if fcnt[rho] > 0:
            floors[rho] = 0.001 * fsum[rho] / fcnt[rho]
    floors[n_floor] = floors[n_floor - 1]
    for iz in range(data.shape[0]):
        z = iz - off
        gz = z % p
        for iy in range(data.shape[1]):
            y = iy - off
            gy = y % p
            for ix in range(data.shape[2]):
                q = ix * ix + y * y + z * z
                if q > r2max or ix > p // 2:
                    continue
                r = np.sqrt(q)
                w = _regularised(weight[iz, iy, ix], _round_shell(r, pad), tau2, have_tau2,
                                 pad3, tau2_fudge, minres)
                w = max(w, floors[min(int(np.floor(r / pad)), n_floor)])
                val = data[iz, iy, ix]
                grid[gz, gy, ix] = val / w if w > 0 else val


def reconstruct(bp: BackProjector, tau2: NDArray | None = None, tau2_fudge: float = 1.0,
                minres_map: int = 5, leak_free_shell: float = 0.0) -> NDArray[np.float32]:
    """B / max(W (+ 1/(pad³ τ_f τ²) for shells ≥ minres_map), 0.001·shell mean) -> real (N,N,N) map (§3.4).

    tau2=None: unregularised (the _unfil maps). Grey scale: noise-free projections of V inserted with
    weight 1 reconstruct V. Call symmetrise first (it completes the ξx = 0 plane).
    leak_free_shell > 0: what the crop to N³ and the corner mask make of the shells |k| <= leak_free_shell
    (Fourier pixels of the N box) beyond that radius is taken out again, so that a low-resolution part two half
    maps share by construction is not copied into every shell of both (docs/refine.md, deliberate difference 6).
    """
    vol = _real_map(bp, tau2, tau2_fudge, minres_map)
    if leak_free_shell > 0:
        low = _real_map(bp, tau2, tau2_fudge, minres_map, keep_radius=float(bp.pad) * leak_free_shell)
        vol -= _shells_beyond(low, leak_free_shell)
    return vol.astype(np.float32)


def _divided_grid(bp: BackProjector, tau2: NDArray | None, tau2_fudge: float,
                  minres_map: int) -> NDArray[np.complex64]:
    """The padded (p, p, p//2+1) rfft grid of B / W' (§3.4 steps 1-2), ξx = 0 plane made Hermitian."""
    n, pad = bp.ori_size, bp.pad
    p = pad * n
    p += p % 2
    have_tau2 = tau2 is not None
    tau2_arr = np.zeros(1) if tau2 is None else np.ascontiguousarray(tau2, dtype=np.float64)
    grid = np.zeros((p, p, p // 2 + 1), np.complex64)
    n_floor = max(int(np.ceil(bp.r_max)), 1)  # shells ρ < r_max have their own floor
    _divide_into_grid(bp.data, bp.weight, tau2_arr, have_tau2, float(tau2_fudge), int(minres_map),
                      float(pad), bp.radius, n_floor, grid)
    # the ξx = 0 plane must be Hermitian for a real inverse FFT (a no-op after symmetrise)
    plane = grid[:, :, 0]
    mirror = np.conj(plane[(-np.arange(p)) % p][:, (-np.arange(p)) % p])
    plane[...] = 0.5 * (plane + mirror)
    return grid


def _real_map(bp: BackProjector, tau2: NDArray | None, tau2_fudge: float, minres_map: int,
              keep_radius: float | None = None) -> NDArray[np.float64]:
    """§3.4 steps 1-4 (only |ξ| <= keep_radius of the padded grid if given): inverse FFT of the padded grid, the
    central N³ (origin at N//2), corner mask, gridding correction."""
    n, pad = bp.ori_size, bp.pad
    grid = _divided_grid(bp, tau2, tau2_fudge, minres_map)
    if keep_radius is not None:
        _zero_beyond(grid, keep_radius)
    p = grid.shape[0]
    vol = sfft.irfftn(grid, s=(p, p, p), norm="forward", workers=-1)
    del grid
    o = p // 2 - n // 2
    # fftshift puts the origin at p//2; crop the central N³ directly from the unshifted array
    idx = (np.arange(o, o + n) - p // 2) % p
    vol = vol[np.ix_(idx, idx, idx)].astype(np.float64) / (float(pad) ** 3 * n)
    vol = soft_mask_outside_map(vol)
    vol /= gridding_sinc2(n, pad)
    return vol


@njit(cache=True)
def _zero_beyond(grid, radius):  # pragma: no cover - compiled
    """Zero the elements of an rfft grid (p, p, p//2+1) at |ξ| > radius (padded Fourier pixels)."""
    p = grid.shape[0]
    r2 = radius * radius
    for iz in range(p):
        z = iz if iz <= p // 2 else iz - p
        for iy in range(p):
            y = iy if iy <= p // 2 else iy - p
            for ix in range(grid.shape[2]):
                if ix * ix + y * y + z * z > r2:
                    grid[iz, iy, ix] = 0


def _shells_beyond(vol: NDArray, radius: float) -> NDArray[np.float64]:
    """The part of a real map at |k| > radius (Fourier pixels): a sharp high-pass."""
    ft = sfft.rfftn(vol, workers=-1)
    ft[freq_radius(vol.shape) <= radius] = 0
    return sfft.irfftn(ft, s=vol.shape, workers=-1)
