"""The E-step for a batch of particles of one half: two-pass search, weights, and weighted sums (spec §2, §3.1, §3.6).

Residual D(θ,t) = Σ_k |X_k e^{-2πik·t/N} − s·CTF_k P_k(θ)|² / 2σ²_k, expanded as
const − Re Σ conj(X_k e^{..}) s CTF_k P_k / σ²_k + ½ Σ s² CTF_k² |P_k|² / σ²_k, so the coarse pass is two real
matrix products over (particles·translations × pixels) @ (pixels × orientations) (DESIGN.md §3).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numba
import numpy as np
from numpy.typing import NDArray

from cryorefine.fourier.backprojector import BackProjector, insert
from cryorefine.fourier.projector import Projector, project
from cryorefine.geometry.euler import matrix_to_euler
from cryorefine.refine.orientations import (LocalWindow, OrientationGrid, TranslationGrid, coarse_direction_of,
                                            coarse_matrices, fine_matrices)
from cryorefine.refine.pixels import PixelSet, shift_phases


@dataclass
class HalfAccumulator:
    """Sums over the particles of one half; every field is summed over MPI ranks (parallel.Reducer)."""

    bp: BackProjector
    sigma2_num: dict[int, NDArray[np.float64]]     # optics index -> per shell of its box
    sigma2_wsum: dict[int, float]                  # optics index -> Σ w̄
    scale_num: NDArray[np.float64]                 # per group
    scale_den: NDArray[np.float64]
    offset_num: float = 0.0                        # Σ w̄ |μ − τ|² (Å²)
    wsum: float = 0.0
    pdf: NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    norm_sum: float = 0.0
    ll_sum: float = 0.0
    pmax_sum: float = 0.0
    count: int = 0
    gflop: float = 0.0


@dataclass
class BatchInputs:
    """Everything the E-step needs for a batch of particles of one optics group."""

    rows: NDArray[np.int64]
    optics: int                         # optics index
    angpix: float
    x_coarse: NDArray[np.complex64]     # (B, mc) masked FT on the coarse pixel set
    x_fine: NDArray[np.complex64]       # (B, mf) masked FT on the fine pixel set
    xnm_fine: NDArray[np.complex64]     # (B, mf) unmasked FT on the fine pixel set
    power_beyond: NDArray[np.float64]   # (B, nshell) masked power per shell for shells > size/2
    ctf_coarse: NDArray[np.float32]     # (B, mc)
    ctf_fine: NDArray[np.float32]       # (B, mf)
    scale: NDArray[np.float64]          # (B,) group scale s_g
    group: NDArray[np.int64]            # (B,)
    preshift_px: NDArray[np.int64]      # (B, 2)
    prior_mu: NDArray[np.float64]       # (B, 2) offset prior centre, Å
    old_norm: NDArray[np.float64]       # (B,)


@dataclass
class PassSettings:
    """Per-iteration E-step settings of one half."""

    grid: OrientationGrid
    translations: TranslationGrid
    ps_coarse: PixelSet
    ps_fine: PixelSet
    inv_sigma2: NDArray[np.float64]          # per shell of the optics box (likelihood: DC excluded)
    adaptive_fraction: float
    cc_mode: bool
    sigma_offset: float                      # Å
    log_pdf_direction: NDArray[np.float64] | None   # global mode: per coarse direction
    local: LocalWindow | None = None         # local mode: per-particle candidates (rows aligned with batch)
    scale_shells: NDArray[np.bool_] | None = None   # shells used for the group-scale update (SSNR > 3)
    norm_average: float = 1.0


@dataclass
class BatchResult:
    """Best poses and per-particle statistics of a batch."""

    rot: NDArray[np.float64]
    tilt: NDArray[np.float64]
    psi: NDArray[np.float64]
    origin_x: NDArray[np.float64]
    origin_y: NDArray[np.float64]
    norm: NDArray[np.float64]
    log_likelihood: NDArray[np.float64]
    max_prob: NDArray[np.float64]
    nr_significant: NDArray[np.int64]


_NBINS = 4096


@numba.njit(cache=True)
def significance_threshold(logw: np.ndarray, fraction: float) -> tuple[float, int, float, float]:
    """Threshold on log-weights keeping the largest weights that sum to `fraction` of the total (spec §2.6).

    Returns (log threshold, number of weights accumulated, Σ exp(logw − max), max). Linear time: weights are
    binned on a log scale and only the bin where the running sum crosses is sorted; -inf = not evaluated.
    """
    n = logw.size
    mx = -np.inf
    for j in range(n):
        if logw[j] > mx:
            mx = logw[j]
    hist_w = np.zeros(_NBINS)
    hist_n = np.zeros(_NBINS, np.int64)
    total = 0.0
    for j in range(n):
        d = logw[j] - mx
        if d > -88.0:
            w = np.exp(d)
            k = min(int((d + 88.0) * (_NBINS / 88.0)), _NBINS - 1)
            hist_w[k] += w
            hist_n[k] += 1
            total += w
    target = fraction * total
    acc = 0.0
    above = 0
    k = _NBINS - 1
    while k > 0 and acc + hist_w[k] <= target:
        acc += hist_w[k]
        above += hist_n[k]
        k -= 1
    lo = k * (88.0 / _NBINS) - 88.0
    hi = lo + 88.0 / _NBINS if k < _NBINS - 1 else 1.0
    vals = np.empty(hist_n[k])
    m = 0
    for j in range(n):
        d = logw[j] - mx
        if d > -88.0 and min(int((d + 88.0) * (_NBINS / 88.0)), _NBINS - 1) == k:
            vals[m] = d
            m += 1
    vals = np.sort(vals[:m])[::-1]
    thr = lo
    for j in range(m):
        acc += np.exp(vals[j])
        above += 1
        thr = vals[j]
        if acc > target:
            break
    return thr + mx, above, total, mx


@numba.njit(cache=True, parallel=True)
def coarse_significance(cross: np.ndarray, norm: np.ndarray, lp_off: np.ndarray, lp_dir: np.ndarray,
                        cc_mode: bool, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Pass-1 weights of a batch sharing one orientation set: keep mask (B, T, U) and significant counts.

    cross (B, T, U) and norm (B, U) are the two matrix products; lp_off (B, T) and lp_dir (U) log-priors.
    CC mode keeps only the best sample (hard assignment, no priors).
    """
    nb, nt, nu = cross.shape
    keep = np.zeros((nb, nt, nu), np.bool_)
    counts = np.zeros(nb, np.int64)
    for b in numba.prange(nb):
        d = np.empty(nt * nu)
        for t in range(nt):
            for u in range(nu):
                if cc_mode:
                    d[t * nu + u] = -cross[b, t, u] / np.sqrt(max(norm[b, u], 1e-30))
                else:
                    d[t * nu + u] = 0.5 * norm[b, u] - cross[b, t, u]
        if cc_mode:
            best = np.argmin(d)
            keep[b, best // nu, best % nu] = True
            counts[b] = 1
            continue
        dmin = d.min()
        lw = np.empty(nt * nu)
        for t in range(nt):
            for u in range(nu):
                lw[t * nu + u] = -(d[t * nu + u] - dmin) + lp_off[b, t] + lp_dir[u]
        thr, cnt, _, _ = significance_threshold(lw, fraction)
        counts[b] = cnt
        for t in range(nt):
            for u in range(nu):
                if lw[t * nu + u] >= thr:
                    keep[b, t, u] = True
    return keep, counts


def _real_pair(z: NDArray[np.complex64]) -> NDArray[np.float32]:
    """[Re z, Im z] along the last axis, so that Re(conj(a)·b) = real_pair(a) · real_pair(b)."""
    return np.concatenate([z.real, z.imag], axis=-1).astype(np.float32, copy=False)


def _offset_logprior(tau_A: NDArray, mu_A: NDArray, sigma: float) -> NDArray[np.float64]:
    """log of the Gaussian offset prior exp(-|τ − μ|²/2σ²) (normalisation cancels per particle)."""
    d2 = ((tau_A - mu_A) ** 2).sum(-1)
    return -d2 / (2.0 * sigma * sigma)


def expectation_batch(inp: BatchInputs, proj: Projector, st: PassSettings, acc: HalfAccumulator) -> BatchResult:
    """Two-pass search over orientations and translations for a batch; adds its weighted sums to `acc`."""
    nb = len(inp.rows)
    grid, tg = st.grid, st.translations
    isig_c = st.inv_sigma2[st.ps_coarse.shell].astype(np.float32)
    isig_f = st.inv_sigma2[st.ps_fine.shell].astype(np.float32)
    if st.cc_mode:
        isig_c = np.ones_like(isig_c)
        isig_f = np.ones_like(isig_f)
    else:
        isig_c[st.ps_coarse.shell == 0] = 0.0
        isig_f[st.ps_fine.shell == 0] = 0.0
    n_t = len(tg.coarse)

    # ---- pass 1: coarse orientations x coarse translations at the coarse size ----
    if st.local is None:
        coarse_ids = np.nonzero(np.isfinite(st.log_pdf_direction))[0]
        coarse_ids = (coarse_ids[:, None] * grid.n_psi + np.arange(grid.n_psi)[None, :]).ravel()
        uniq = coarse_ids
        per_particle = [(np.arange(len(uniq)), st.log_pdf_direction[coarse_direction_of(grid, uniq)])] * nb
    else:
        per_particle = []
        chunks = [st.local.ids[st.local.offsets[j]:st.local.offsets[j + 1]] for j in range(nb)]
        uniq, inv = np.unique(np.concatenate(chunks), return_inverse=True)
        pos = 0
        for j in range(nb):
            n = len(chunks[j])
            per_particle.append((inv[pos:pos + n], st.local.log_prior[st.local.offsets[j]:st.local.offsets[j + 1]]))
            pos += n
    p_c = project(proj, coarse_matrices(grid, uniq), st.ps_coarse.kx_model, st.ps_coarse.ky_model)
    p_c_pair = _real_pair(p_c)                                     # (U, 2mc)
    p_c_pow = (p_c.real ** 2 + p_c.imag ** 2).astype(np.float32)   # (U, mc)
    ph_c = shift_phases(st.ps_coarse, tg.coarse)                   # (T, mc)
    w_c = (inp.ctf_coarse * inp.scale[:, None].astype(np.float32) * isig_c[None, :])      # (B, mc)
    xs = inp.x_coarse[:, None, :] * ph_c[None, :, :]                                        # (B, T, mc)
    a = np.concatenate([xs.real * w_c[:, None, :], xs.imag * w_c[:, None, :]], axis=-1)    # (B, T, 2mc)
    norm_w = (inp.ctf_coarse ** 2) * (inp.scale[:, None] ** 2).astype(np.float32) * isig_c[None, :]
    tau = (inp.preshift_px[:, None, :] + tg.coarse[None, :, :]) * inp.angpix                 # (B, T, 2) Å
    lp_off = _offset_logprior(tau, inp.prior_mu[:, None, :], st.sigma_offset)                # (B, T)
    if st.cc_mode:
        lp_off = np.zeros_like(lp_off)

    if st.local is None:
        cross_all = (a.reshape(nb * n_t, -1) @ p_c_pair.T).reshape(nb, n_t, -1)
        norm_all = norm_w @ p_c_pow.T                                                       # (B, U)
        acc.gflop += 2e-9 * (nb * n_t * a.shape[-1] * len(uniq) + nb * norm_w.shape[1] * len(uniq))

    # significance of coarse samples per particle; only the significant pairs are kept
    sig_pairs, nr_sig, lp_sig = [], np.zeros(nb, np.int64), []
    if st.local is None:
        keep_all, nr_sig = coarse_significance(cross_all, norm_all.astype(np.float32), lp_off,
                                               np.asarray(per_particle[0][1], np.float64), st.cc_mode,
                                               st.adaptive_fraction)
        lp_dir = per_particle[0][1]
        for j in range(nb):
            pairs = np.nonzero(keep_all[j])
            sig_pairs.append(pairs)
            lp_sig.append(lp_off[j][pairs[0]] + lp_dir[pairs[1]])
    else:
        for j in range(nb):
            idx = per_particle[j][0]
            d = _diff(a[j] @ p_c_pair[idx].T, norm_w[j] @ p_c_pow[idx].T, st.cc_mode)
            acc.gflop += 2e-9 * (n_t * a.shape[-1] * len(idx) + norm_w.shape[1] * len(idx))
            lp = lp_off[j][:, None] + per_particle[j][1][None, :]
            if st.cc_mode:
                keep = np.zeros(d.shape, bool)
                keep.flat[int(np.argmin(d))] = True
                nr_sig[j] = 1
            else:
                logw = -(d - d.min()) + lp
                thr, nr_sig[j], _, _ = significance_threshold(logw.ravel(), st.adaptive_fraction)
                keep = logw >= thr
            pairs = np.nonzero(keep)
            sig_pairs.append(pairs)
            lp_sig.append(lp[pairs])

    # ---- pass 2: children of significant coarse samples at the current size ----
    n_ch = grid.n_children
    fine_lists = []
    for j in range(nb):
        t_idx, o_loc = sig_pairs[j]
        o_ids = uniq[per_particle[j][0][o_loc]]
        u_o = np.unique(o_ids)
        fine_lists.append((u_o[:, None] * n_ch + np.arange(n_ch)[None, :]).ravel())
    fine_uniq, fine_inv = np.unique(np.concatenate(fine_lists), return_inverse=True)
    fine_rot = fine_matrices(grid, fine_uniq)
    p_f = project(proj, fine_rot, st.ps_fine.kx_model, st.ps_fine.ky_model)     # (F, mf)
    p_f_pow = (p_f.real ** 2 + p_f.imag ** 2).astype(np.float32)

    res = BatchResult(*(np.zeros(nb) for _ in range(8)), np.zeros(nb, np.int64))
    res.nr_significant[:] = nr_sig
    bp_rot, bp_val, bp_wgt = [], [], []
    ps_f = st.ps_fine
    nshell_box = len(st.inv_sigma2)
    isig_bp = st.inv_sigma2[ps_f.shell].astype(np.float32)       # back-projection keeps the DC term
    if st.cc_mode:
        isig_bp = np.ones_like(isig_bp)
    pos = 0
    for j in range(nb):
        t_idx, o_loc = sig_pairs[j]
        o_coarse = uniq[per_particle[j][0][o_loc]]
        u_o, o_pos = np.unique(o_coarse, return_inverse=True)
        u_t, t_pos = np.unique(t_idx, return_inverse=True)
        n_of = len(u_o) * n_ch
        f_idx = fine_inv[pos:pos + n_of]
        pos += n_of
        pf, pf_pow = p_f[f_idx], p_f_pow[f_idx]                       # (Of, mf)
        t_fine = tg.children(u_t).reshape(-1, 2)                       # (Tf, 2) px
        n_tch = t_fine.shape[0] // len(u_t)
        ph = shift_phases(ps_f, t_fine)
        xs_f = inp.x_fine[j][None, :] * ph                             # (Tf, mf)
        s = float(inp.scale[j])
        ctf = inp.ctf_fine[j]
        wf = ctf * s * isig_f
        cross_f = _real_pair(xs_f * wf[None, :]) @ _real_pair(pf).T   # (Tf, Of)
        norm_f = (ctf * ctf * s * s * isig_f) @ pf_pow.T               # (Of,)
        acc.gflop += 2e-9 * (cross_f.size * 2 * ps_f.m + norm_f.size * ps_f.m)
        d_f = _diff(cross_f, norm_f, st.cc_mode)
        # valid (fine t, fine o) pairs: children of a significant coarse pair; they inherit its prior
        valid = np.zeros((len(u_t), len(u_o)), bool)
        valid[t_pos, o_pos] = True
        lpc = np.full((len(u_t), len(u_o)), -np.inf)
        lpc[t_pos, o_pos] = lp_sig[j]
        lp_f = np.repeat(np.repeat(lpc, n_tch, axis=0), n_ch, axis=1)
        valid_f = np.repeat(np.repeat(valid, n_tch, axis=0), n_ch, axis=1)
        d_f = np.where(valid_f, d_f, np.inf)
        dmin = float(d_f.min())
        if st.cc_mode:
            wbar = np.zeros(d_f.shape)
            wbar.flat[int(np.argmin(d_f))] = 1.0
            log_wsum = 0.0
        else:
            logw = np.where(valid_f, -(d_f - dmin) + lp_f, -np.inf)
            mx = logw.max()
            thr, _, wsum, _ = significance_threshold(logw.ravel(), st.adaptive_fraction)
            w = np.exp(logw - mx)
            wbar = np.where(logw >= thr, w / wsum, 0.0)
            log_wsum = float(np.log(wsum) + mx)
        best = np.unravel_index(int(np.argmax(wbar)), wbar.shape)
        res.max_prob[j] = float(wbar[best])
        fid_best = fine_uniq[f_idx[best[1]]]
        r_, t_, p_ = matrix_to_euler(fine_matrices(grid, np.array([fid_best]))[0])
        res.rot[j], res.tilt[j], res.psi[j] = float(r_), float(t_), float(p_)
        tau_best = (inp.preshift_px[j] + t_fine[best[0]]) * inp.angpix
        res.origin_x[j], res.origin_y[j] = float(tau_best[0]), float(tau_best[1])
        const = 0.5 * float(((inp.x_fine[j].real ** 2 + inp.x_fine[j].imag ** 2) * isig_f).sum())
        res.log_likelihood[j] = log_wsum - (dmin + const)

        # ---- weighted sums (spec §3.1, §3.6) ----
        colw = wbar.sum(axis=0)
        cols = np.nonzero(colw > 0)[0]
        rows_w = wbar[:, cols].astype(np.float32)                       # (Tf, Ok)
        sw = float(colw.sum())
        xs_nm = inp.xnm_fine[j][None, :] * ph
        y_nm = rows_w.T.astype(np.complex64) @ xs_nm                     # (Ok, mf)
        bp_rot.append(fine_rot[f_idx[cols]])
        bp_val.append((y_nm * (ctf * s * isig_bp)[None, :]).astype(np.complex64))
        bp_wgt.append((colw[cols][:, None] * (ctf * ctf * s * s * isig_bp)[None, :]).astype(np.float32))
        if not st.cc_mode:
            y_m = rows_w.T.astype(np.complex64) @ xs_f                   # (Ok, mf)
            pk = pf[cols]
            cross_k = (y_m.real * pk.real + y_m.imag * pk.imag).sum(0) * ctf          # Σ_o Re(conj(Y) P) CTF
            norm_k = (colw[cols][:, None] * pf_pow[cols]).sum(0) * ctf * ctf
            xpow = inp.x_fine[j].real ** 2 + inp.x_fine[j].imag ** 2
            resid = sw * xpow - 2 * s * cross_k + s * s * norm_k
            acc.sigma2_num[inp.optics] += np.bincount(ps_f.shell, resid, minlength=nshell_box)[:nshell_box]
            beyond = inp.power_beyond[j]
            acc.sigma2_num[inp.optics] += sw * beyond
            acc.sigma2_wsum[inp.optics] = acc.sigma2_wsum.get(inp.optics, 0.0) + sw
            energy = float(resid.sum() + beyond.sum())
            res.norm[j] = (inp.old_norm[j] / st.norm_average) * np.sqrt(max(2.0 * energy, 1e-30))
            if st.scale_shells is not None:
                sel = st.scale_shells[ps_f.shell]
                acc.scale_num[inp.group[j]] += float(cross_k[sel].sum())
                acc.scale_den[inp.group[j]] += float(norm_k[sel].sum())
            tau_rows = (inp.preshift_px[j][None, :] + t_fine) * inp.angpix
            d2 = ((tau_rows - inp.prior_mu[j][None, :]) ** 2).sum(-1)
            acc.offset_num += float((wbar.sum(axis=1) * d2).sum())
            acc.wsum += sw
            acc.norm_sum += res.norm[j]
            if st.local is None and acc.pdf.size:
                parents = fine_uniq[f_idx[cols]] // n_ch
                np.add.at(acc.pdf, coarse_direction_of(grid, parents), colw[cols])
        else:
            res.norm[j] = inp.old_norm[j]
        acc.ll_sum += res.log_likelihood[j]
        acc.pmax_sum += res.max_prob[j]
        acc.count += 1
    insert(acc.bp, np.concatenate(bp_rot), ps_f.kx_model, ps_f.ky_model,
           np.concatenate(bp_val), np.concatenate(bp_wgt))
    return res


def _diff(cross: NDArray, norm: NDArray, cc_mode: bool) -> NDArray[np.float64]:
    """Residual up to a per-particle constant: ½·norm − cross, or −cross/‖CTF·P‖ in CC mode; (T, O)."""
    if cc_mode:
        return -(cross / np.sqrt(np.maximum(norm, 1e-30))[None, :]).astype(np.float64)
    return (0.5 * norm[None, :] - cross).astype(np.float64)
