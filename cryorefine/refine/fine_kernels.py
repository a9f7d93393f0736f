"""Compiled kernels of the E-step over a whole batch: block products, segment weights, weighted image sums.

The per-particle work of a batch (pass-2 blocks, local coarse windows, posterior weights, weighted sums) is flattened
into concatenated arrays with offsets (CSR): particle j owns elements off[j]:off[j+1]. Complex vectors enter as real
pairs, complex64 arrays viewed as interleaved float32 (Re, Im, Re, Im, ...; likelihood.real_pair), so that
Re(conj(a)·b) is the plain dot product of the pairs. Kept apart from the E-step driver so that numba's on-disk cache
survives edits to the driver; the formulas these kernels evaluate are documented in refine.likelihood.
"""

from __future__ import annotations

import numba
import numpy as np

from cryorefine.refine.weights import threshold_with_max


@numba.njit(cache=True, inline="always", fastmath=True)
def _dots_4x2(s, a0, p, q0, q1):
    """The 8 dots of shifted rows a0..a0+3 with projection rows q0, q1 (register tile: 6 loads feed 8 FMAs)."""
    s00 = s01 = s10 = s11 = s20 = s21 = s30 = s31 = np.float32(0.0)
    for i in range(p.shape[1]):
        p0 = p[q0, i]
        p1 = p[q1, i]
        x0, x1, x2, x3 = s[a0, i], s[a0 + 1, i], s[a0 + 2, i], s[a0 + 3, i]
        s00 += x0 * p0
        s01 += x0 * p1
        s10 += x1 * p0
        s11 += x1 * p1
        s20 += x2 * p0
        s21 += x2 * p1
        s30 += x3 * p0
        s31 += x3 * p1
    return s00, s01, s10, s11, s20, s21, s30, s31


@numba.njit(cache=True, inline="always", fastmath=True)
def _dots_4x1(s, a0, p, q):
    """The 4 dots of shifted rows a0..a0+3 with projection row q."""
    s0 = s1 = s2 = s3 = np.float32(0.0)
    for i in range(p.shape[1]):
        v = p[q, i]
        s0 += s[a0, i] * v
        s1 += s[a0 + 1, i] * v
        s2 += s[a0 + 2, i] * v
        s3 += s[a0 + 3, i] * v
    return s0, s1, s2, s3


@numba.njit(cache=True, inline="always", fastmath=True)
def _dot(s, a, p, q):
    """One dot of shifted row a with projection row q."""
    acc = np.float32(0.0)
    for i in range(p.shape[1]):
        acc += s[a, i] * p[q, i]
    return acc


@numba.njit(cache=True, inline="always")
def residual_value(cross, norm, cc_mode):
    """The residual of one sample up to a per-particle constant, in float64: ½·norm − cross, or −cross/‖CTF·P‖ in
    CC mode. cross = Re Σ conj(X e^{..}) s CTF P / σ², norm = Σ s² CTF² |P|² / σ²."""
    c, n = np.float64(cross), np.float64(norm)
    if cc_mode:
        return -c / np.sqrt(max(n, 1e-30))
    return 0.5 * n - c


@numba.njit(cache=True, parallel=True)
def coarse_residuals(cross: np.ndarray, norm: np.ndarray, cc_mode: bool) -> np.ndarray:
    """Residuals (B, T, U) float64 of float32 cross terms (B, T, U) and norms (B, U): residual_value per sample."""
    nb, nt, nu = cross.shape
    out = np.empty((nb, nt, nu), np.float64)
    for j in numba.prange(nb):
        for t in range(nt):
            for u in range(nu):
                out[j, t, u] = residual_value(cross[j, t, u], norm[j, u], cc_mode)
    return out


@numba.njit(cache=True, parallel=True, fastmath=True)
def block_residuals(xw: np.ndarray, ph: np.ndarray, p: np.ndarray, img_off: np.ndarray, blk_ph: np.ndarray,
                    blk_p: np.ndarray, n_a: int, n_b: int, norm: np.ndarray, cc_mode: bool) -> np.ndarray:
    """Residuals d[k, a, b] (K, n_a, n_b) float64 of the blocks k of every image j (img_off[j]:img_off[j+1]):
    residual_value of cross = pair(xw[j] · ph[blk_ph[k] + a]) · pair(p[blk_p[k] + b]) and norm[k, b].

    xw (B, 2m), ph (R, 2m), p (F, 2m) float32 interleaved pairs; the cross terms are float32 sums as the BLAS
    products. Each image forms its shifted images once; blocks sorted by projection rows within an image reuse
    them from cache. The residual is formed here so that the cross terms never make a separate array.
    """
    m = xw.shape[1] // 2
    n_rows = ph.shape[0]
    out = np.empty((blk_p.shape[0], n_a, n_b), np.float64)
    a_end = n_a - n_a % 4
    b_end = n_b - n_b % 2
    for j in numba.prange(xw.shape[0]):
        lo, hi = img_off[j], img_off[j + 1]
        if lo == hi:
            continue
        s = np.empty((n_rows, 2 * m), np.float32)
        done = np.zeros(n_rows, np.bool_)
        for k in range(lo, hi):
            for r in range(blk_ph[k], blk_ph[k] + n_a):
                if not done[r]:
                    done[r] = True
                    for i in range(m):
                        xr, xi, cr, ci = xw[j, 2 * i], xw[j, 2 * i + 1], ph[r, 2 * i], ph[r, 2 * i + 1]
                        s[r, 2 * i] = xr * cr - xi * ci
                        s[r, 2 * i + 1] = xr * ci + xi * cr
        k = lo
        while k < hi:
            r0 = blk_ph[k]
            if n_b == 1 and k + 1 < hi and blk_ph[k + 1] == r0:
                # blocks of one projection each (a local window's candidates): two blocks make the 4 x 2 tile
                q0, q1 = blk_p[k], blk_p[k + 1]
                n0, n1 = norm[k, 0], norm[k + 1, 0]
                for a in range(0, a_end, 4):
                    v = _dots_4x2(s, r0 + a, p, q0, q1)
                    for i in range(4):
                        out[k, a + i, 0] = residual_value(v[2 * i], n0, cc_mode)
                        out[k + 1, a + i, 0] = residual_value(v[2 * i + 1], n1, cc_mode)
                for a in range(a_end, n_a):
                    out[k, a, 0] = residual_value(_dot(s, r0 + a, p, q0), n0, cc_mode)
                    out[k + 1, a, 0] = residual_value(_dot(s, r0 + a, p, q1), n1, cc_mode)
                k += 2
                continue
            for b in range(0, b_end, 2):
                q = blk_p[k] + b
                n0, n1 = norm[k, b], norm[k, b + 1]
                for a in range(0, a_end, 4):
                    v = _dots_4x2(s, r0 + a, p, q, q + 1)
                    for i in range(4):
                        out[k, a + i, b] = residual_value(v[2 * i], n0, cc_mode)
                        out[k, a + i, b + 1] = residual_value(v[2 * i + 1], n1, cc_mode)
            for b in range(b_end, n_b):
                nb_ = norm[k, b]
                for a in range(0, a_end, 4):
                    v4 = _dots_4x1(s, r0 + a, p, blk_p[k] + b)
                    for i in range(4):
                        out[k, a + i, b] = residual_value(v4[i], nb_, cc_mode)
            for b in range(n_b):
                for a in range(a_end, n_a):
                    out[k, a, b] = residual_value(_dot(s, r0 + a, p, blk_p[k] + b), norm[k, b], cc_mode)
            k += 1
    return out


@numba.njit(cache=True, parallel=True, fastmath=True)
def pair_norms(wn: np.ndarray, p: np.ndarray, pair_img: np.ndarray, pair_p: np.ndarray, n_b: int) -> np.ndarray:
    """norm[i, b] = Σ_k wn[img_i, k] |p[p0_i + b, k]|² (P, n_b) float32: the norm term s²CTF²|P|²/σ² of each
    (image, projection) pair. wn (B, m) float32, p (F, 2m) interleaved pairs."""
    m = wn.shape[1]
    out = np.empty((pair_img.shape[0], n_b), np.float32)
    for i in numba.prange(pair_img.shape[0]):
        j = pair_img[i]
        for b in range(n_b):
            q = pair_p[i] + b
            acc = np.float32(0.0)
            for k in range(m):
                acc += wn[j, k] * (p[q, 2 * k] * p[q, 2 * k] + p[q, 2 * k + 1] * p[q, 2 * k + 1])
            out[i, b] = acc
    return out


@numba.njit(cache=True, parallel=True)
def segment_weights(d: np.ndarray, log_prior: np.ndarray, off: np.ndarray, cc_mode: bool, fraction: float,
                    maxsig: int, prior_every: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Posterior weights of every segment (particle) of flat residuals d: (w, count, log W_sum, D_min).

    Per segment, log-weights −(d − min d) + log_prior and W_sum sums all its samples; w = exp(log-weight)/W_sum on
    the significant samples (the largest ones that sum to `fraction` of W_sum, at most maxsig when > 0; spec §2.6)
    and 0 elsewhere; count = number kept. CC mode keeps only the best sample with weight 1 (log W_sum = 0).
    Sample e takes log_prior[e // prior_every] (the blocks of pass 2 share their parent's prior).
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
        mx = -np.inf
        if prior_every == 1:
            for e in range(lo, hi):
                lw[e - lo] = -(d[e] - dmin[s]) + log_prior[e]
                mx = max(mx, lw[e - lo])
        else:
            e = lo
            while e < hi:          # runs of samples sharing one prior: no integer division per sample
                q = e // prior_every
                stop = min(hi, (q + 1) * prior_every)
                lp = log_prior[q]
                for f in range(e, stop):
                    lw[f - lo] = -(d[f] - dmin[s]) + lp
                    mx = max(mx, lw[f - lo])
                e = stop
        # w[lo:hi] takes exp(lw − mx) from the threshold's pass, then only the kept ones are scaled
        thr, cnt, wsum = threshold_with_max(lw, mx, fraction, maxsig, w[lo:hi])
        count[s] = cnt
        log_wsum[s] = np.log(wsum) + mx
        inv = 1.0 / wsum
        for e in range(lo, hi):
            w[e] = w[e] * inv if lw[e - lo] >= thr else 0.0
    return w, count, log_wsum, dmin


@numba.njit(cache=True, parallel=True)
def weight_marginals(w: np.ndarray, img_off: np.ndarray, blk_jt: np.ndarray, blk_p: np.ndarray, n_fine: int,
                     n_cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sums of the weights w[k, a, b] of the blocks of every image j (img_off[j]:img_off[j+1]) in one pass:
    (rows: the projection rows with weight, ascending; row_of (n_fine,): each projection row's index among them or
    −1; colw (rows, B): Σ_a w per (orientation, image); w_jt (n_cols,): Σ_b w per image-translation column).

    Block k's sample (a, b) is column blk_jt[k, a] and projection row blk_p[k] + b. An image's blocks write only
    its own column of colw and its own columns of w_jt, so images run in parallel.
    """
    n_k, n_a, n_b = w.shape
    n_img = img_off.shape[0] - 1
    wb = np.zeros((n_k, n_b))
    for k in numba.prange(n_k):
        for a in range(n_a):
            for b in range(n_b):
                wb[k, b] += w[k, a, b]
    used = np.zeros(n_fine, np.bool_)
    for k in range(n_k):
        for b in range(n_b):
            if wb[k, b] > 0.0:
                used[blk_p[k] + b] = True
    row_of = np.full(n_fine, -1, np.int64)
    n_rows = 0
    for f in range(n_fine):
        if used[f]:
            row_of[f] = n_rows
            n_rows += 1
    rows = np.flatnonzero(used).astype(np.int64)
    colw = np.zeros((n_rows, n_img))
    w_jt = np.zeros(n_cols)
    for j in numba.prange(n_img):
        for k in range(img_off[j], img_off[j + 1]):
            for b in range(n_b):
                if wb[k, b] > 0.0:
                    colw[row_of[blk_p[k] + b], j] += wb[k, b]
            for a in range(n_a):
                t = 0.0
                for b in range(n_b):
                    t += w[k, a, b]
                w_jt[blk_jt[k, a]] += t
    return rows, row_of, colw, w_jt


@numba.njit(cache=True, parallel=True)
def dense_weight_rows(w: np.ndarray, blocks: np.ndarray, blk_jt: np.ndarray, blk_p: np.ndarray, row_of: np.ndarray,
                      r0: int, r1: int, n_cols: int) -> np.ndarray:
    """Rows r0..r1 of the weight matrix over (orientation row, image-translation column) as a dense float32 array,
    from the listed blocks (those that can reach these rows); the same placement as block_sums.

    A (row, column) pair names one fine orientation, particle and fine translation, hence one block element, so
    the blocks write disjoint cells and run in parallel.
    """
    _, n_a, n_b = w.shape
    out = np.zeros((r1 - r0, n_cols), np.float32)
    for i in numba.prange(blocks.shape[0]):
        k = blocks[i]
        for b in range(n_b):
            r = row_of[blk_p[k] + b]
            if r < r0 or r >= r1:
                continue
            for a in range(n_a):
                v = w[k, a, b]
                if v > 0.0:
                    out[r - r0, blk_jt[k, a]] = v
    return out


@numba.njit(cache=True, parallel=True, fastmath=True)
def block_sums(w: np.ndarray, blk_jt: np.ndarray, blk_p: np.ndarray, row_of: np.ndarray, r0: int, r1: int,
               by_p: np.ndarray, grp: np.ndarray, g0: int, g1: int, img_off: np.ndarray, z: np.ndarray,
               p: np.ndarray, p_rows: np.ndarray, out: np.ndarray, q: np.ndarray) -> None:
    """W @ Z and Wᵀ @ P of the block weights w[k, a, b] (K, n_a, n_b) over orientation rows r0..r1, in place:
    out[r − r0] += Σ w[k, a, b] z[blk_jt[k, a]] for the samples whose row row_of[blk_p[k] + b] is in the chunk,
    and q[blk_jt[k, a]] += w[k, a, b] p[p_rows[blk_p[k] + b]] for the same samples.

    The weights are not gathered into a sparse matrix: a block's samples form a dense n_a x n_b tile, so four
    translations (or four orientations) share each pass over a row, a quarter of the loads and stores of one axpy
    per weight (the CSR kernel this replaced: medium's iteration 2 E-step 133 -> 97 s). Rows: groups g0..g1 of the
    blocks in parent order (by_p[grp[g]:grp[g+1]], one parent each) own their rows and run in parallel; q: images
    own their columns and run in parallel."""
    n_k, n_a, n_b = w.shape
    n2 = z.shape[1]
    for g in numba.prange(g0, g1):
        for e in range(grp[g], grp[g + 1]):
            k = by_p[e]
            for b in range(n_b):
                r = row_of[blk_p[k] + b]
                if r < r0 or r >= r1:
                    continue
                o = r - r0
                a = 0
                while a < n_a:
                    if a + 4 <= n_a:
                        w0, w1 = np.float32(w[k, a, b]), np.float32(w[k, a + 1, b])
                        w2, w3 = np.float32(w[k, a + 2, b]), np.float32(w[k, a + 3, b])
                        if w0 != 0.0 or w1 != 0.0 or w2 != 0.0 or w3 != 0.0:
                            c0, c1, c2, c3 = blk_jt[k, a], blk_jt[k, a + 1], blk_jt[k, a + 2], blk_jt[k, a + 3]
                            for i in range(n2):
                                out[o, i] += w0 * z[c0, i] + w1 * z[c1, i] + w2 * z[c2, i] + w3 * z[c3, i]
                        a += 4
                    else:
                        w0 = np.float32(w[k, a, b])
                        if w0 != 0.0:
                            c0 = blk_jt[k, a]
                            for i in range(n2):
                                out[o, i] += w0 * z[c0, i]
                        a += 1
    for j in numba.prange(img_off.shape[0] - 1):
        for k in range(img_off[j], img_off[j + 1]):
            f0 = blk_p[k]
            for a in range(n_a):
                c = blk_jt[k, a]
                b = 0
                while b < n_b:
                    nb4 = 4 if b + 4 <= n_b else 1
                    w0 = w1 = w2 = w3 = np.float32(0.0)
                    o0 = o1 = o2 = o3 = p_rows[f0 + b]
                    r = row_of[f0 + b]
                    if r0 <= r < r1:
                        w0 = np.float32(w[k, a, b])
                    if nb4 == 4:
                        o1, o2, o3 = p_rows[f0 + b + 1], p_rows[f0 + b + 2], p_rows[f0 + b + 3]
                        r = row_of[f0 + b + 1]
                        if r0 <= r < r1:
                            w1 = np.float32(w[k, a, b + 1])
                        r = row_of[f0 + b + 2]
                        if r0 <= r < r1:
                            w2 = np.float32(w[k, a, b + 2])
                        r = row_of[f0 + b + 3]
                        if r0 <= r < r1:
                            w3 = np.float32(w[k, a, b + 3])
                    if w0 != 0.0 or w1 != 0.0 or w2 != 0.0 or w3 != 0.0:
                        for i in range(n2):
                            q[c, i] += w0 * p[o0, i] + w1 * p[o1, i] + w2 * p[o2, i] + w3 * p[o3, i]
                    b += nb4


@numba.njit(cache=True, parallel=True)
def segment_best(w: np.ndarray, blk_off: np.ndarray, ph_row: np.ndarray, p_row: np.ndarray) -> np.ndarray:
    """Flat index into w (K, n_a, n_b) of the largest weight of each image's blocks blk_off[j]:blk_off[j+1]; among
    equal maxima the smallest (phase row, projection row), as a dense (translation x orientation) argmax."""
    _, n_a, n_b = w.shape
    n_seg = blk_off.shape[0] - 1
    best = np.empty(n_seg, np.int64)
    for s in numba.prange(n_seg):
        bk, ba, bb = blk_off[s], 0, 0
        for k in range(blk_off[s], blk_off[s + 1]):
            for a in range(n_a):
                for b in range(n_b):
                    v, u = w[k, a, b], w[bk, ba, bb]
                    if v > u or (v == u and (ph_row[k] + a < ph_row[bk] + ba or (
                            ph_row[k] + a == ph_row[bk] + ba and p_row[k] + b < p_row[bk] + bb))):
                        bk, ba, bb = k, a, b
        best[s] = (bk * n_a + ba) * n_b + bb
    return best


@numba.njit(cache=True, parallel=True, fastmath=True)
def sparse_row_sums(colw: np.ndarray, r0: int, r1: int, bp_n: np.ndarray, p: np.ndarray, prow: np.ndarray,
                    norm: np.ndarray) -> np.ndarray:
    """(colw[r0:r1] @ bp_n, and norm += colw[r0:r1]ᵀ @ |p|²) over the non-zero colw[r, j] only: the insertion
    weights of a chunk of orientation rows and the norm statistics Σ_o w̄ |P_o|², for a colw with about one image per
    row (local searches), where the dense products would multiply B-fold zeros. Row r of the chunk is p[prow[r − r0]]
    (real pairs, 2m); bp_n (B, m); norm (B, m) in place."""
    n_img, m = bp_n.shape
    out = np.zeros((r1 - r0, m), np.float32)
    for r in numba.prange(r0, r1):
        for j in range(n_img):
            c = np.float32(colw[r, j])
            if c != 0.0:
                for i in range(m):
                    out[r - r0, i] += c * bp_n[j, i]
    for j in numba.prange(n_img):
        for r in range(r0, r1):
            c = np.float32(colw[r, j])
            if c != 0.0:
                o = prow[r - r0]
                for i in range(m):
                    norm[j, i] += c * (p[o, 2 * i] * p[o, 2 * i] + p[o, 2 * i + 1] * p[o, 2 * i + 1])
    return out


@numba.njit(cache=True, parallel=True, fastmath=True)
def shifted_pairs(x: np.ndarray, ph: np.ndarray, w: np.ndarray, img: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Real pairs (J, 2m) float32 of x[img[c]]·ph[t[c]]·w[img[c]] for each (particle, translation) column c: the
    weighted shifted images Z of the weighted sums. x (B, m) complex64, ph (R, m) phase ramps, w (B, m) float32."""
    m = x.shape[1]
    out = np.empty((img.shape[0], 2 * m), np.float32)
    for c in numba.prange(img.shape[0]):
        j, r = img[c], t[c]
        for i in range(m):
            v = x[j, i] * ph[r, i] * w[j, i]
            out[c, 2 * i] = v.real
            out[c, 2 * i + 1] = v.imag
    return out


@numba.njit(cache=True, parallel=True, fastmath=True)
def column_cross(x: np.ndarray, ph: np.ndarray, q: np.ndarray, col_off: np.ndarray, t: np.ndarray) -> np.ndarray:
    """(B, m) float32: Σ over particle j's columns c (col_off[j]:col_off[j+1]) of Re(conj(x[j]·ph[t[c]])·q[c]), the
    cross term Σ_θ,t w̄ Re(conj(X e^{..}) P) of the σ², norm and scale statistics; q (J, 2m): pairs of Wᵀ @ P."""
    nb, m = x.shape
    out = np.zeros((nb, m), np.float32)
    for j in numba.prange(nb):
        for c in range(col_off[j], col_off[j + 1]):
            r = t[c]
            for i in range(m):
                v = x[j, i] * ph[r, i]
                out[j, i] += v.real * q[c, 2 * i] + v.imag * q[c, 2 * i + 1]
    return out
