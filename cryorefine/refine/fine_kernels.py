"""Compiled kernels of the E-step over a whole batch: block products, segment weights, weighted image sums.

The per-particle work of a batch (pass-2 blocks, local coarse windows, posterior weights, weighted sums) is flattened
into concatenated arrays with offsets (CSR): particle j owns elements off[j]:off[j+1]. Complex vectors enter as real
pairs [Re (m), Im (m)] along the last axis (likelihood.real_pair). Kept apart from the E-step driver so that numba's
on-disk cache survives edits to the driver; the formulas these kernels evaluate are documented in refine.likelihood.
"""

from __future__ import annotations

import numba
import numpy as np

from cryorefine.refine.weights import significance_threshold


@numba.njit(cache=True, inline="always", fastmath=True)
def _dots_4x2(sr, si, a0, p, q0, q1, m):
    """The 8 dots of shifted rows a0..a0+3 with projection rows q0, q1 (register tile: each load feeds 2-4 FMAs)."""
    s00 = s01 = s10 = s11 = s20 = s21 = s30 = s31 = np.float32(0.0)
    for i in range(m):
        p0r = p[q0, i]
        p0i = p[q0, m + i]
        p1r = p[q1, i]
        p1i = p[q1, m + i]
        x0r, x0i, x1r, x1i = sr[a0, i], si[a0, i], sr[a0 + 1, i], si[a0 + 1, i]
        x2r, x2i, x3r, x3i = sr[a0 + 2, i], si[a0 + 2, i], sr[a0 + 3, i], si[a0 + 3, i]
        s00 += x0r * p0r + x0i * p0i
        s01 += x0r * p1r + x0i * p1i
        s10 += x1r * p0r + x1i * p0i
        s11 += x1r * p1r + x1i * p1i
        s20 += x2r * p0r + x2i * p0i
        s21 += x2r * p1r + x2i * p1i
        s30 += x3r * p0r + x3i * p0i
        s31 += x3r * p1r + x3i * p1i
    return s00, s01, s10, s11, s20, s21, s30, s31


@numba.njit(cache=True, inline="always", fastmath=True)
def _dots_4x1(sr, si, a0, p, q, m):
    """The 4 dots of shifted rows a0..a0+3 with projection row q."""
    s0 = s1 = s2 = s3 = np.float32(0.0)
    for i in range(m):
        pr = p[q, i]
        pi = p[q, m + i]
        s0 += sr[a0, i] * pr + si[a0, i] * pi
        s1 += sr[a0 + 1, i] * pr + si[a0 + 1, i] * pi
        s2 += sr[a0 + 2, i] * pr + si[a0 + 2, i] * pi
        s3 += sr[a0 + 3, i] * pr + si[a0 + 3, i] * pi
    return s0, s1, s2, s3


@numba.njit(cache=True, inline="always", fastmath=True)
def _dot(sr, si, a, p, q, m):
    """One dot of shifted row a with projection row q."""
    s = np.float32(0.0)
    for i in range(m):
        s += sr[a, i] * p[q, i] + si[a, i] * p[q, m + i]
    return s


@numba.njit(cache=True, parallel=True, fastmath=True)
def block_cross(xw: np.ndarray, ph: np.ndarray, p: np.ndarray, img_off: np.ndarray, blk_ph: np.ndarray,
                blk_p: np.ndarray, n_a: int, n_b: int) -> np.ndarray:
    """cross[k, a, b] = pair(xw[j] · ph[blk_ph[k] + a]) · pair(p[blk_p[k] + b]) (K, n_a, n_b) float32, for the
    blocks k of every image j (img_off[j]:img_off[j+1]).

    xw (B, 2m), ph (R, 2m), p (F, 2m) float32 real pairs; float32 sums as the BLAS products. Each image forms its
    shifted images once; blocks sorted by projection rows within an image reuse them from cache.
    """
    m = xw.shape[1] // 2
    n_rows = ph.shape[0]
    out = np.empty((blk_p.shape[0], n_a, n_b), np.float32)
    for j in numba.prange(xw.shape[0]):
        lo, hi = img_off[j], img_off[j + 1]
        if lo == hi:
            continue
        sr = np.empty((n_rows, m), np.float32)
        si = np.empty((n_rows, m), np.float32)
        done = np.zeros(n_rows, np.bool_)
        for k in range(lo, hi):
            for r in range(blk_ph[k], blk_ph[k] + n_a):
                if not done[r]:
                    done[r] = True
                    for i in range(m):
                        xr, xi, cr, ci = xw[j, i], xw[j, m + i], ph[r, i], ph[r, m + i]
                        sr[r, i] = xr * cr - xi * ci
                        si[r, i] = xr * ci + xi * cr
        for k in range(lo, hi):
            r0 = blk_ph[k]
            a_end = n_a - n_a % 4
            b_end = n_b - n_b % 2
            for b in range(0, b_end, 2):
                q = blk_p[k] + b
                for a in range(0, a_end, 4):
                    s = _dots_4x2(sr, si, r0 + a, p, q, q + 1, m)
                    out[k, a, b], out[k, a, b + 1], out[k, a + 1, b], out[k, a + 1, b + 1] = s[0], s[1], s[2], s[3]
                    out[k, a + 2, b], out[k, a + 2, b + 1], out[k, a + 3, b], out[k, a + 3, b + 1] = s[4], s[5], s[6], s[7]
            for b in range(b_end, n_b):
                q = blk_p[k] + b
                for a in range(0, a_end, 4):
                    s4 = _dots_4x1(sr, si, r0 + a, p, q, m)
                    out[k, a, b], out[k, a + 1, b], out[k, a + 2, b], out[k, a + 3, b] = s4[0], s4[1], s4[2], s4[3]
            for b in range(n_b):
                for a in range(a_end, n_a):
                    out[k, a, b] = _dot(sr, si, r0 + a, p, blk_p[k] + b, m)
    return out


@numba.njit(cache=True, parallel=True, fastmath=True)
def pair_norms(wn: np.ndarray, p: np.ndarray, pair_img: np.ndarray, pair_p: np.ndarray, n_b: int) -> np.ndarray:
    """norm[i, b] = Σ_k wn[img_i, k] |p[p0_i + b, k]|² (P, n_b) float32: the norm term s²CTF²|P|²/σ² of each
    (image, projection) pair. wn (B, m) float32, p (F, 2m) real pairs."""
    m = wn.shape[1]
    out = np.empty((pair_img.shape[0], n_b), np.float32)
    for i in numba.prange(pair_img.shape[0]):
        j = pair_img[i]
        for b in range(n_b):
            q = pair_p[i] + b
            s = np.float32(0.0)
            for k in range(m):
                s += wn[j, k] * (p[q, k] * p[q, k] + p[q, m + k] * p[q, m + k])
            out[i, b] = s
    return out


@numba.njit(cache=True, parallel=True)
def segment_weights(d: np.ndarray, log_prior: np.ndarray, off: np.ndarray, cc_mode: bool, fraction: float,
                    maxsig: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Posterior weights of every segment (particle) of flat residuals d: (w, count, log W_sum, D_min).

    Per segment, log-weights −(d − min d) + log_prior and W_sum sums all its samples; w = exp(log-weight)/W_sum on
    the significant samples (the largest ones that sum to `fraction` of W_sum, at most maxsig when > 0; spec §2.6)
    and 0 elsewhere; count = number kept. CC mode keeps only the best sample with weight 1 (log W_sum = 0).
    """
    n_seg = off.shape[0] - 1
    w = np.zeros(d.shape[0])
    count = np.zeros(n_seg, np.int64)
    log_wsum = np.zeros(n_seg)
    dmin = np.zeros(n_seg)
    for s in numba.prange(n_seg):
        lo, hi = off[s], off[s + 1]
        best = lo
        for e in range(lo, hi):
            if d[e] < d[best]:
                best = e
        dmin[s] = d[best]
        if cc_mode:
            w[best] = 1.0
            count[s] = 1
            continue
        lw = np.empty(hi - lo)
        for e in range(lo, hi):
            lw[e - lo] = -(d[e] - dmin[s]) + log_prior[e]
        thr, cnt, wsum, mx = significance_threshold(lw, fraction, maxsig)
        count[s] = cnt
        log_wsum[s] = np.log(wsum) + mx
        for e in range(lo, hi):
            if lw[e - lo] >= thr:
                w[e] = np.exp(lw[e - lo] - mx) / wsum
    return w, count, log_wsum, dmin


@numba.njit(cache=True, parallel=True, fastmath=True)
def weighted_sums(w: np.ndarray, blk_ph: np.ndarray, pair_off: np.ndarray, pair_blk: np.ndarray,
                  row_off: np.ndarray, row_pair: np.ndarray, row_b: np.ndarray, row_p: np.ndarray,
                  colw: np.ndarray, ph: np.ndarray, x: np.ndarray, xnm: np.ndarray, p: np.ndarray,
                  bp_w: np.ndarray, bp_n: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Posterior-weighted sums of every image of a batch over its rows r (back-projected orientations; spec §3.1,
    §3.6): (values (R, m) complex64, weights (R, m) float32, cross (B, m), norm (B, m) float64).

    Row r of image j (rows row_off[j]:row_off[j+1]) is child b = row_b[r] of pair row_pair[r], whose blocks are
    pair_blk[pair_off[i]:pair_off[i+1]]; its projection is p[row_p[r]] and its weight Σ w̄ is colw[r]. With the
    weighted phase ramp Φ_r = Σ_{k,a} w[k, a, b] · ph[blk_ph[k] + a], the weighted shifted image sums are Φ_r·X:
    values = Φ_r·X^nm·bp_w, weights = colw·bp_n, cross = Σ_r Re(conj(Φ_r X) P_r), norm = Σ_r colw |P_r|².
    """
    n_a = w.shape[1]
    nb, m = x.shape
    n_rows = row_pair.shape[0]
    vals = np.empty((n_rows, m), np.complex64)
    wts = np.empty((n_rows, m), np.float32)
    cross = np.zeros((nb, m))
    norm = np.zeros((nb, m))
    for j in numba.prange(nb):
        phi = np.empty(2 * m, np.float32)
        for r in range(row_off[j], row_off[j + 1]):
            phi[:] = 0.0
            i = row_pair[r]
            b = row_b[r]
            for e in range(pair_off[i], pair_off[i + 1]):
                k = pair_blk[e]
                for a in range(n_a):
                    c = np.float32(w[k, a, b])
                    if c != 0.0:
                        t = blk_ph[k] + a
                        for q in range(2 * m):
                            phi[q] += c * ph[t, q]
            q = row_p[r]
            cw = colw[r]
            for k in range(m):
                f = complex(phi[k], phi[m + k])
                y = f * x[j, k]
                vals[r, k] = f * xnm[j, k] * bp_w[j, k]
                wts[r, k] = cw * bp_n[j, k]
                pr = p[q, k]
                pi = p[q, m + k]
                cross[j, k] += y.real * pr + y.imag * pi
                norm[j, k] += cw * (pr * pr + pi * pi)
    return vals, wts, cross, norm
