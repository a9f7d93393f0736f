"""Weighted sums of a batch whose posteriors cover many translations per orientation, through the translations'
lattice: one phase sum S per (orientation, particle) instead of one pass over the pixels per weight.

The fine translations of an iteration lie on a square lattice t = t₀ + h·(u, v) (coarse grid of step `step`, children
at h = step / 2^os). The weighted sums of orientation o and particle j,

    vals_o  += Σ_t w̄_ojt · Z_j e_t           (back-projected values)
    cross_j += Σ_t w̄_ojt · Re(conj(X_j e_t) P_o)   (σ², norm and scale statistics)

with e_t(k) = exp(−2πi k·t/N), both take S_oj(k) = Σ_t w̄_ojt e_t(k) = e_t₀(k) Σ_v α_y(k)^v Σ_u w̄_ojuv α_x(k)^u:
vals_o += Z_j e_t₀ S, cross_j += Re(conj(X_j e_t₀ S) P_o). The inner sum runs over the distinct kx values only
(a (L_u × L_v) weight tile times an (L_u × n_kx) table), the outer over the pixels (L_v per pixel), so a pair with
T significant translations costs about L_v + 2 passes over its pixels instead of the 2T of block_sums
(docs/benchmarks.md, "Weighted sums through the translation lattice").

Pixels are a PixelSet's unique half-plane list in rfft order: runs of one ky with consecutive kx (`pixel_rows`).
Projections and values are real pairs (likelihood.real_pair), as in fine_kernels; the phases follow
pixels.shift_phases' convention.
"""

from __future__ import annotations

import numba
import numpy as np
from numpy.typing import NDArray

from cryorefine.refine.pixels import PixelSet


def pixel_rows(ps: PixelSet) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
    """(start (n + 1,), first kx (n,), ky (n,)) of the runs of equal ky in a pixel set; kx rises by 1 within a run."""
    ky = np.rint(ps.ky).astype(np.int64)
    kx = np.rint(ps.kx).astype(np.int64)
    start = np.concatenate([[0], np.flatnonzero(np.diff(ky) != 0) + 1, [len(ky)]]).astype(np.int64)
    run = np.repeat(np.arange(len(start) - 1), np.diff(start))
    if np.any(kx - kx[start[run]] != np.arange(len(kx)) - start[run]):
        raise ValueError("pixel set rows are not runs of consecutive kx")
    return start, kx[start[:-1]], ky[start[:-1]]


def lattice_coordinates(t_fine: NDArray[np.float64], h: float) -> tuple[NDArray[np.int64], NDArray[np.int64],
                                                                          NDArray[np.float64]]:
    """(u, v, t₀): integer lattice coordinates of fine translations (px) with t = t₀ + h·(u, v), u, v ≥ 0."""
    t0 = t_fine.min(axis=0)
    uv = np.rint((t_fine - t0) / h)
    if np.abs(t_fine - t0 - h * uv).max() > 1e-6 * max(1.0, h):
        raise ValueError("fine translations are not on a lattice of step h")
    return uv[:, 0].astype(np.int64), uv[:, 1].astype(np.int64), t0


def phase_tables(ps: PixelSet, h: float, n_u: int, n_v: int) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """(α_x (n_u, 2 n_kx), α_y (n_v, 2 n_ky)) real pairs of exp(−2πi kx h u / N) for kx = 0..max kx and of
    exp(−2πi ky h v / N) for ky = min ky..max ky (column ky − min ky)."""
    kx = np.arange(int(np.rint(ps.kx.max())) + 1)
    ky = np.arange(int(np.rint(ps.ky.min())), int(np.rint(ps.ky.max())) + 1)
    ax = np.exp((-2j * np.pi * h / ps.box) * np.arange(n_u)[:, None] * kx[None, :]).astype(np.complex64)
    ay = np.exp((-2j * np.pi * h / ps.box) * np.arange(n_v)[:, None] * ky[None, :]).astype(np.complex64)
    return ax.view(np.float32), ay.view(np.float32)


@numba.njit(cache=True, inline="always", fastmath=True)
def _phase_sums(wg, n_v, n_b, lu, lv, u0, v0, ax, ay, row_start, row_kx, row_iy, gr, gi, sr, si, hr, hi):
    """sr + i·si (m·n_b, pixel-major) = Σ_v α_y^(v0+v) Σ_u wg[u, v, b] α_x^(u0+u) at every pixel for every child b,
    through gr + i·gi (lv, n_kx·n_b), the inner sums over u. Flat arrays with unsigned indices (numba's signed
    indexing keeps LLVM from vectorising); children innermost, so that a pixel row of every child is one contiguous
    run (the rows alone are too short to vectorise). wg (n_u·n_v·n_b, box-relative), ax (n_u, 2 n_kx),
    ay (n_v, 2 n_ky); hr, hi (n_kx·n_v·n_b) scratch."""
    n_kx = np.uint64(ax.shape[1] // 2)
    nb = np.uint64(n_b)
    nv = np.uint64(n_v)
    row_len = n_kx * nb
    u2 = np.uint64(2)
    u1 = np.uint64(1)
    # the inner sums as (n_kx x lu) @ (lu x lv·n_b), the long axis innermost, into hr, hi (n_kx, lv·n_b); then
    # transposed to gr, gi (lv, n_kx·n_b) for the pixel rows (stage 1 was 5x slower with children innermost)
    lvb = np.uint64(lv) * nb
    for ix in range(n_kx):
        h0 = ix * lvb
        for q in range(lvb):
            hr[h0 + q] = 0.0
            hi[h0 + q] = 0.0
        for u in range(np.uint64(lu)):
            a_r = ax[np.uint64(u0) + u, u2 * ix]
            a_i = ax[np.uint64(u0) + u, u2 * ix + u1]
            wu = u * nv * nb
            for q in range(lvb):
                c = wg[wu + q]
                hr[h0 + q] += c * a_r
                hi[h0 + q] += c * a_i
    for v in range(np.uint64(lv)):
        for ix in range(n_kx):
            for b in range(nb):
                gr[v * row_len + ix * nb + b] = hr[ix * lvb + v * nb + b]
                gi[v * row_len + ix * nb + b] = hi[ix * lvb + v * nb + b]
    for r in range(row_kx.shape[0]):
        lo = np.uint64(row_start[r]) * nb
        n = (np.uint64(row_start[r + 1]) - np.uint64(row_start[r])) * nb
        x0 = np.uint64(row_kx[r]) * nb
        iy = np.uint64(row_iy[r])
        a_r = ay[np.uint64(v0), u2 * iy]
        a_i = ay[np.uint64(v0), u2 * iy + u1]
        for q in range(n):
            sr[lo + q] = a_r * gr[x0 + q] - a_i * gi[x0 + q]
            si[lo + q] = a_r * gi[x0 + q] + a_i * gr[x0 + q]
        for v in range(u1, np.uint64(lv)):
            a_r = ay[np.uint64(v0) + v, u2 * iy]
            a_i = ay[np.uint64(v0) + v, u2 * iy + u1]
            gv = v * row_len + x0
            for q in range(n):
                sr[lo + q] += a_r * gr[gv + q] - a_i * gi[gv + q]
                si[lo + q] += a_r * gi[gv + q] + a_i * gr[gv + q]


@numba.njit(cache=True, parallel=True, fastmath=True)
def lattice_sums(w, blk_img, blk_ph, blk_p, row_of, r0, r1, by_p, grp, part, tu, tv, ax, ay, row_start, row_kx,
                 row_iy, zz, xx, p, p_rows, out, cross):
    """vals and cross terms of the samples whose orientation row row_of[blk_p[k] + b] is in r0..r1, in place:
    out[r − r0] += Σ w[k, a, b] Z_j e_t and cross[c, j, i·n_b + b] += Σ_a w[k, a, b] Re(conj(X_j e_t) P_o)(i)
    (the caller sums over parts c and children b).

    w (K, n_a, n_b): block weights; block k is image blk_img[k], translation rows blk_ph[k] + a (lattice coordinates
    tu, tv), orientation rows blk_p[k] + b. Parent groups by_p[grp[g]:grp[g + 1]] (blocks of one parent, by image)
    own their orientation rows; the groups of parts part[c]:part[c + 1] run in parallel, each part summing cross
    terms into its own cross[c] (B, m·n_b), so results do not depend on the number of threads. zz, xx (B, 2, m·n_b):
    Z_j e_t₀ and X_j e_t₀ with each pixel repeated for the n_b children (real, then imaginary parts); p (F, 2m)
    projection pairs.
    Every array of the per-sample loops is pixel-major, child-minor, so that they run over long contiguous ranges
    (flat arrays, unsigned indices: numba's signed indexing keeps LLVM from vectorising)."""
    _, n_a, n_b = w.shape
    m = np.uint64(p.shape[1] // 2)
    n_u = ax.shape[0]
    n_v = ay.shape[0]
    n_kx = ax.shape[1] // 2
    nb = np.uint64(n_b)
    u2 = np.uint64(2)
    u1 = np.uint64(1)
    mb = m * nb
    zz1 = zz.ravel()
    xx1 = xx.ravel()
    p1 = p.ravel()
    out1 = out.ravel()
    for c in numba.prange(part.shape[0] - 1):
        wg = np.zeros(n_u * n_v * n_b, np.float32)
        gr = np.empty(n_v * n_kx * n_b, np.float32)
        gi = np.empty(n_v * n_kx * n_b, np.float32)
        hr = np.empty(n_v * n_kx * n_b, np.float32)
        hi = np.empty(n_v * n_kx * n_b, np.float32)
        sr = np.empty(mb, np.float32)
        si = np.empty(mb, np.float32)
        pr = np.empty(mb, np.float32)           # the parent's children's projections, pixel-major
        pi = np.empty(mb, np.float32)
        vr = np.empty(mb, np.float32)           # the parent's children's values, pixel-major
        vi = np.empty(mb, np.float32)
        cr = cross[c].ravel()
        use = np.zeros(n_b, np.bool_)
        for g in range(part[c], part[c + 1]):
            e = grp[g]
            f0 = blk_p[by_p[e]]
            n_use = 0
            for b in range(n_b):
                use[b] = r0 <= row_of[f0 + b] < r1
                n_use += use[b]
            if n_use == 0:
                continue
            for b in range(nb):
                po = np.uint64(p_rows[f0 + b]) * u2 * m
                for i in range(m):
                    pr[i * nb + b] = p1[po + u2 * i]
                    pi[i * nb + b] = p1[po + u2 * i + u1]
            for q in range(mb):
                vr[q] = 0.0
                vi[q] = 0.0
            while e < grp[g + 1]:
                j = blk_img[by_p[e]]
                e1 = e
                u0, u1_, v0, v1 = n_u, -1, n_v, -1
                while e1 < grp[g + 1] and blk_img[by_p[e1]] == j:
                    k = by_p[e1]
                    for a in range(n_a):
                        t = blk_ph[k] + a
                        u0, u1_ = min(u0, tu[t]), max(u1_, tu[t])
                        v0, v1 = min(v0, tv[t]), max(v1, tv[t])
                    e1 += 1
                for x in range(e, e1):
                    k = by_p[x]
                    for a in range(n_a):
                        t = blk_ph[k] + a
                        cell = ((tu[t] - u0) * n_v + (tv[t] - v0)) * n_b
                        for b in range(n_b):
                            if use[b]:
                                wg[cell + b] += w[k, a, b]
                lu, lv = u1_ - u0 + 1, v1 - v0 + 1
                _phase_sums(wg, n_v, n_b, lu, lv, u0, v0, ax, ay, row_start, row_kx, row_iy, gr, gi, sr, si, hr, hi)
                for u in range(lu):
                    for q in range(u * n_v * n_b, (u * n_v + lv) * n_b):
                        wg[q] = 0.0
                zj = np.uint64(j) * u2 * mb
                cj = np.uint64(j) * mb
                # two loops: one with every array would need more runtime overlap checks than LLVM makes, and
                # would not be vectorised
                for q in range(mb):
                    zr = zz1[zj + q]
                    zi = zz1[zj + mb + q]
                    vr[q] += zr * sr[q] - zi * si[q]
                    vi[q] += zr * si[q] + zi * sr[q]
                for q in range(mb):
                    xr = xx1[zj + q]
                    xi = xx1[zj + mb + q]
                    cr[cj + q] += (xr * sr[q] - xi * si[q]) * pr[q] + (xr * si[q] + xi * sr[q]) * pi[q]
                e = e1
            for b in range(nb):
                if use[b]:
                    ro = np.uint64(row_of[f0 + b] - r0) * u2 * m
                    for i in range(m):
                        out1[ro + u2 * i] += vr[i * nb + b]
                        out1[ro + u2 * i + u1] += vi[i * nb + b]


def balanced_parts(grp: NDArray[np.int64], g0: int, g1: int, n_parts: int) -> NDArray[np.int64]:
    """Group boundaries (≤ n_parts + 1,) splitting groups g0..g1 into runs of about equal block counts."""
    cum = grp[g0:g1 + 1] - grp[g0]
    cuts = np.searchsorted(cum, np.linspace(0, cum[-1], n_parts + 1)[1:-1], side="left") + g0
    return np.unique(np.concatenate([[g0], cuts, [g1]])).astype(np.int64)
