"""The E-step for a batch of particles of one half: two-pass search, weights, and weighted sums (spec §2, §3.1, §3.6).

Residual D(θ,t) = Σ_k |X_k e^{-2πik·t/N} − s·CTF_k P_k(θ)|² / 2σ²_k, expanded as
const − Re Σ conj(X_k e^{..}) s CTF_k P_k / σ²_k + ½ Σ s² CTF_k² |P_k|² / σ²_k, so the coarse pass is two real
matrix products over (particles·translations × pixels) @ (pixels × orientations) (DESIGN.md §3).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from cryorefine.fourier.backprojector import BackProjector, insert
from cryorefine.fourier.projector import Projector, project
from cryorefine.geometry.euler import matrix_to_euler
from cryorefine.refine.orientations import (LocalWindow, OrientationGrid, TranslationGrid, coarse_direction_of,
                                            coarse_matrices, fine_matrices)
from cryorefine.refine.pixels import PixelSet, shift_phases
from cryorefine.refine.weights import coarse_significance, significance_threshold


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


class ProjectionCache:
    """Projections of one half's reference in one iteration, computed once and shared by all batches.

    Global searches reuse the same coarse set for every particle and draw fine children from a fixed grid,
    so both are cached (the fine cache only while it fits in `max_bytes`); local searches project per batch.
    """

    def __init__(self, proj: Projector, grid: OrientationGrid, ps_coarse: PixelSet, ps_fine: PixelSet,
                 max_bytes: float = 1.5e9):
        self.proj, self.grid, self.ps_coarse, self.ps_fine = proj, grid, ps_coarse, ps_fine
        self.coarse_ids: NDArray[np.int64] | None = None
        self.coarse: NDArray[np.complex64] | None = None
        n_fine = len(grid.dir_pix) * grid.n_psi * grid.n_children
        self.fine = None
        if not grid.local and n_fine * ps_fine.m * 8 <= max_bytes:
            self.fine = np.empty((n_fine, ps_fine.m), np.complex64)
            self.have = np.zeros(n_fine, bool)

    def coarse_projections(self, ids: NDArray[np.int64]) -> NDArray[np.complex64]:
        """Projections of coarse ids at the coarse size (cached when the same id set comes back)."""
        if self.grid.local:
            return project(self.proj, coarse_matrices(self.grid, ids), self.ps_coarse.kx_model,
                           self.ps_coarse.ky_model)
        if self.coarse_ids is None or not np.array_equal(self.coarse_ids, ids):
            self.coarse_ids = ids
            self.coarse = project(self.proj, coarse_matrices(self.grid, ids), self.ps_coarse.kx_model,
                                  self.ps_coarse.ky_model)
        return self.coarse

    def fine_projections(self, fine_ids: NDArray[np.int64], rotations: NDArray) -> NDArray[np.complex64]:
        """Projections of fine ids (with their rotation matrices) at the current size."""
        if self.fine is None:
            return project(self.proj, rotations, self.ps_fine.kx_model, self.ps_fine.ky_model)
        todo = ~self.have[fine_ids]
        if todo.any():
            self.fine[fine_ids[todo]] = project(self.proj, rotations[todo], self.ps_fine.kx_model,
                                                self.ps_fine.ky_model)
            self.have[fine_ids[todo]] = True
        return self.fine[fine_ids]


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
    maxsig: int = -1                         # cap on significant samples per particle and pass (-1: none)
    cache: ProjectionCache | None = None


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
    cache = st.cache or ProjectionCache(proj, grid, st.ps_coarse, st.ps_fine, 0)
    p_c = cache.coarse_projections(uniq)
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
                                               st.adaptive_fraction, st.maxsig)
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
                thr, nr_sig[j], _, _ = significance_threshold(logw.ravel(), st.adaptive_fraction, st.maxsig)
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
    p_f = cache.fine_projections(fine_uniq, fine_rot)                         # (F, mf)
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
        norm_f = (ctf * ctf * s * s * isig_f) @ pf_pow.T               # (Of,)
        # only the children of significant coarse pairs are evaluated: (K, n_tch) x (K, n_ch) blocks
        rows_t = t_pos[:, None] * n_tch + np.arange(n_tch)[None, :]
        rows_o = o_pos[:, None] * n_ch + np.arange(n_ch)[None, :]
        d_f = _pair_diffs(_real_pair(xs_f * (ctf * s * isig_f)[None, :]), _real_pair(pf), norm_f, rows_t, rows_o,
                          st.cc_mode)                                   # (K, n_tch, n_ch)
        acc.gflop += 2e-9 * d_f.size * 2 * ps_f.m
        dmin = float(d_f.min())
        if st.cc_mode:
            wpair = np.zeros(d_f.shape)
            wpair.flat[int(np.argmin(d_f))] = 1.0
            log_wsum = 0.0
        else:
            logw = -(d_f - dmin) + lp_sig[j][:, None, None]
            mx = float(logw.max())
            thr, _, wsum, _ = significance_threshold(logw.ravel(), st.adaptive_fraction, st.maxsig)
            wpair = np.where(logw >= thr, np.exp(logw - mx), 0.0)
            wpair /= wpair.sum()          # kept weights sum to 1, also when --maxsig cut the tail
            log_wsum = float(np.log(wsum) + mx)
        # dense (fine translation x fine orientation) weights of this particle
        wbar = np.zeros((t_fine.shape[0], pf.shape[0]))
        kk = np.nonzero(wpair.reshape(len(wpair), -1).max(1) > 0)[0]
        np.add.at(wbar, (np.broadcast_to(rows_t[kk][:, :, None], wpair[kk].shape),
                         np.broadcast_to(rows_o[kk][:, None, :], wpair[kk].shape)), wpair[kk])
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


def _pair_diffs(a_t: NDArray[np.float32], p_o: NDArray[np.float32], norm_o: NDArray, rows_t: NDArray,
                rows_o: NDArray, cc_mode: bool, chunk: int = 64) -> NDArray[np.float64]:
    """Residuals (K, n_t, n_o) of K blocks pairing translation rows rows_t[k] with orientation rows rows_o[k].

    a_t (Tf, 2m) holds the CTF/σ²-weighted shifted images and p_o (Of, 2m) the projections, both as real pairs.
    """
    k = len(rows_t)
    out = np.empty((k, rows_t.shape[1], rows_o.shape[1]))
    for s0 in range(0, k, chunk):
        sl = slice(s0, min(k, s0 + chunk))
        cross = np.matmul(a_t[rows_t[sl]], p_o[rows_o[sl]].transpose(0, 2, 1))
        nrm = norm_o[rows_o[sl]][:, None, :]
        out[sl] = -cross / np.sqrt(np.maximum(nrm, 1e-30)) if cc_mode else 0.5 * nrm - cross
    return out


def _diff(cross: NDArray, norm: NDArray, cc_mode: bool) -> NDArray[np.float64]:
    """Residual up to a per-particle constant: ½·norm − cross, or −cross/‖CTF·P‖ in CC mode; (T, O)."""
    if cc_mode:
        return -(cross / np.sqrt(np.maximum(norm, 1e-30))[None, :]).astype(np.float64)
    return (0.5 * norm[None, :] - cross).astype(np.float64)
