"""Compiled kernels turning residuals into posterior weights and significant samples (spec §2.6).

Kept apart from the E-step driver so that numba's on-disk cache survives edits to the driver.
"""

from __future__ import annotations

import numba
import numpy as np

_NBINS = 4096


@numba.njit(cache=True)
def significance_threshold(logw: np.ndarray, fraction: float, maxsig: int = -1) -> tuple[float, int, float, float]:
    """Threshold on log-weights keeping the largest weights that sum to `fraction` of the total (spec §2.6),
    but no more than `maxsig` of them when maxsig > 0 (RELION --maxsig).

    Returns (log threshold, number of weights accumulated, Σ exp(logw − max), max); -inf = not evaluated.
    """
    mx = -np.inf
    for j in range(logw.size):
        if logw[j] > mx:
            mx = logw[j]
    thr, above, total = threshold_with_max(logw, mx, fraction, maxsig, np.empty(0))
    return thr, above, total, mx


@numba.njit(cache=True)
def threshold_with_max(logw: np.ndarray, mx: float, fraction: float, maxsig: int,
                       ew: np.ndarray) -> tuple[float, int, float]:
    """significance_threshold given mx = max(logw); also writes ew = exp(logw − mx) (0 below e^−88) when ew has
    logw's size (size 0: not written), so that a caller forming the weights needs no second exponential.
    Returns (log threshold, count, Σ exp(logw − mx)).

    Linear time: weights are binned on a log scale and only the bin where the running sum crosses is sorted.
    """
    n = logw.size
    write = ew.size == n
    hist_w = np.zeros(_NBINS)
    hist_n = np.zeros(_NBINS, np.int64)
    bins = np.empty(n, np.int16)           # each weight's bin (-1: below e^-88), for the crossing bin's pass
    total = 0.0
    for j in range(n):
        d = logw[j] - mx
        w = 0.0
        k = -1
        if d > -88.0:
            w = np.exp(d)
            k = min(int((d + 88.0) * (_NBINS / 88.0)), _NBINS - 1)
            hist_w[k] += w
            hist_n[k] += 1
            total += w
        bins[j] = k
        if write:
            ew[j] = w
    target = fraction * total
    acc = 0.0
    above = 0
    k = _NBINS - 1
    while k > 0 and acc + hist_w[k] <= target and not (maxsig > 0 and above + hist_n[k] >= maxsig):
        acc += hist_w[k]
        above += hist_n[k]
        k -= 1
    # the threshold is one of the log-weights itself (not recomputed from logw − max), so `logw >= thr` keeps
    # exactly the `above` samples counted
    thr = k * (88.0 / _NBINS) - 88.0 + mx
    vals = np.empty(hist_n[k])
    m = 0
    for j in range(n):
        if bins[j] == k:
            vals[m] = logw[j]
            m += 1
    vals = np.sort(vals[:m])[::-1]
    for j in range(m):
        acc += np.exp(vals[j] - mx)
        above += 1
        thr = vals[j]
        if acc > target or (maxsig > 0 and above >= maxsig):
            break
    return thr, above, total


@numba.njit(cache=True, parallel=True)
def coarse_significance(d: np.ndarray, lp_off: np.ndarray, lp_dir: np.ndarray, cc_mode: bool, fraction: float,
                        maxsig: int) -> tuple[np.ndarray, np.ndarray]:
    """Pass-1 weights of a batch sharing one orientation set: keep mask (B, T, U) and significant counts.

    d (B, T, U) are the residuals (fine_kernels.residual_value), lp_off (B, T) and lp_dir (U) log-priors.
    CC mode keeps only the best sample (hard assignment, no priors).
    """
    nb, nt, nu = d.shape
    keep = np.zeros((nb, nt, nu), np.bool_)
    counts = np.zeros(nb, np.int64)
    for b in numba.prange(nb):
        if cc_mode:
            best = np.argmin(d[b])
            keep[b, best // nu, best % nu] = True
            counts[b] = 1
            continue
        dmin = d[b].min()
        lw = np.empty(nt * nu)
        for t in range(nt):
            for u in range(nu):
                lw[t * nu + u] = -(d[b, t, u] - dmin) + lp_off[b, t] + lp_dir[u]
        thr, cnt, _, _ = significance_threshold(lw, fraction, maxsig)
        counts[b] = cnt
        for t in range(nt):
            for u in range(nu):
                if lw[t * nu + u] >= thr:
                    keep[b, t, u] = True
    return keep, counts
