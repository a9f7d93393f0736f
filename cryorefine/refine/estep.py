"""The E-step for a batch of particles of one half: two-pass search, posterior weights and weighted sums
(spec §2, §3.1, §3.6). The likelihood formulas are in refine.likelihood; the kernels come from a Backend.

For a batch: coarse candidates (global: the shared asymmetric unit; local: each particle's window) -> pass 1
at the coarse size keeps the significant (translation, orientation) pairs -> pass 2 scores their oversampled
children at the current size -> posterior weights -> best pose, and the weighted sums of the M-step.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
from numpy.typing import NDArray

from cryorefine.fourier.backprojector import BackProjector, make_backprojector
from cryorefine.fourier.projector import Projector
from cryorefine.geometry.euler import matrix_to_euler
from cryorefine.refine.likelihood import (gflop_of_products, offset_log_prior, real_pair, residual_power,
                                          weighted_images)
from cryorefine.refine.orientations import (LocalWindow, OrientationGrid, TranslationGrid, coarse_direction_of,
                                            coarse_matrices, fine_matrices)
from cryorefine.refine.pixels import PixelSet, shift_phases
from cryorefine.refine.state import Poses
from cryorefine.refine.weights import significance_threshold


@dataclass
class HalfAccumulator:
    """Sums over the particles of one half; `reduce` sums every field over processes."""

    bp: BackProjector
    sigma2_num: dict[int, NDArray[np.float64]]     # optics index -> Σ w̄ |residual|² per shell of its box
    sigma2_wsum: NDArray[np.float64]               # per optics index: Σ w̄
    scale_num: NDArray[np.float64]                 # per group
    scale_den: NDArray[np.float64]
    pdf: NDArray[np.float64]                       # per coarse direction (global searches), else empty
    offset_num: float = 0.0                        # Σ w̄ |μ − τ|² (Å²)
    wsum: float = 0.0
    norm_sum: float = 0.0
    ll_sum: float = 0.0
    pmax_sum: float = 0.0
    count: int = 0
    gflop: float = 0.0

    def reduce(self, reducer) -> None:
        """Sum every field over processes (identity in one process); a new field is summed without edits here."""
        if reducer.size == 1:
            return
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, BackProjector):
                reducer.sum_array(v.data)
                reducer.sum_array(v.weight)
            elif isinstance(v, dict):
                for key in sorted(v):
                    reducer.sum_array(v[key])
            elif isinstance(v, np.ndarray):
                reducer.sum_array(v)
            else:
                setattr(self, f.name, type(v)(reducer.sum_scalar(v)))


def empty_accumulator(box: int, pad: int, r_max: float, optics_boxes: list[int], n_groups: int,
                      n_directions: int) -> HalfAccumulator:
    """Zeroed sums of one half: a back-projector of the model box to r_max, noise sums per optics group."""
    return HalfAccumulator(
        bp=make_backprojector(box, pad=pad, r_max=r_max),
        sigma2_num={o: np.zeros(b // 2 + 1) for o, b in enumerate(optics_boxes)},
        sigma2_wsum=np.zeros(len(optics_boxes)), scale_num=np.zeros(n_groups), scale_den=np.zeros(n_groups),
        pdf=np.zeros(n_directions))


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
                 project, max_bytes: float = 1.5e9):
        self.proj, self.grid, self.ps_coarse, self.ps_fine, self.project = proj, grid, ps_coarse, ps_fine, project
        self.coarse_ids: NDArray[np.int64] | None = None
        self.coarse: NDArray[np.complex64] | None = None
        self.pairs: tuple[NDArray[np.float32], NDArray[np.float32]] | None = None
        n_fine = len(grid.dir_pix) * grid.n_psi * grid.n_children
        self.fine = None
        if not grid.local and n_fine * ps_fine.m * 8 <= max_bytes:
            self.fine = np.empty((n_fine, ps_fine.m), np.complex64)
            self.have = np.zeros(n_fine, bool)

    def coarse_projections(self, ids: NDArray[np.int64]) -> NDArray[np.complex64]:
        """Projections of coarse ids at the coarse size (cached when the same id set comes back)."""
        if self.grid.local:
            return self.project(self.proj, coarse_matrices(self.grid, ids), self.ps_coarse.kx_model,
                                self.ps_coarse.ky_model)
        if self.coarse_ids is None or not np.array_equal(self.coarse_ids, ids):
            self.coarse_ids = ids
            self.coarse = self.project(self.proj, coarse_matrices(self.grid, ids), self.ps_coarse.kx_model,
                                       self.ps_coarse.ky_model)
            self.pairs = None
        return self.coarse

    def coarse_pairs(self, ids: NDArray[np.int64]) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        """(real pairs (U, 2mc), power |P|² (U, mc)) of the coarse projections (cached with them)."""
        p_c = self.coarse_projections(ids)
        if self.grid.local:
            return real_pair(p_c), (p_c.real ** 2 + p_c.imag ** 2).astype(np.float32)
        if self.pairs is None:
            self.pairs = (real_pair(p_c), (p_c.real ** 2 + p_c.imag ** 2).astype(np.float32))
        return self.pairs

    def fine_projections(self, fine_ids: NDArray[np.int64], rotations: NDArray) -> NDArray[np.complex64]:
        """Projections of fine ids (with their rotation matrices) at the current size."""
        if self.fine is None:
            return self.project(self.proj, rotations, self.ps_fine.kx_model, self.ps_fine.ky_model)
        todo = ~self.have[fine_ids]
        if todo.any():
            self.fine[fine_ids[todo]] = self.project(self.proj, rotations[todo], self.ps_fine.kx_model,
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
    maxsig: int = -1                         # cap on significant coarse samples per particle (-1: none)
    cache: ProjectionCache | None = None     # required by expectation_batch


@dataclass
class Candidates:
    """Coarse orientations of a batch: the union `ids`, and per particle its positions in `ids` and log-priors."""

    ids: NDArray[np.int64]
    index: list[NDArray[np.int64]]
    log_prior: list[NDArray[np.float64]]


@dataclass
class Significant:
    """Pass-1 result per particle: significant (translation index, candidate position) pairs and their log-priors."""

    pairs: list[tuple[NDArray[np.int64], NDArray[np.int64]]]
    log_prior: list[NDArray[np.float64]]
    count: NDArray[np.int64]


def inverse_sigma2(st: PassSettings, ps: PixelSet, keep_dc: bool) -> NDArray[np.float32]:
    """1/σ² on a pixel set (all ones in CC mode); the likelihood excludes the DC term, back-projection keeps it."""
    if st.cc_mode:
        return np.ones(ps.m, np.float32)
    isig = st.inv_sigma2[ps.shell].astype(np.float32)
    if not keep_dc:
        isig[ps.shell == 0] = 0.0
    return isig


def significant_weights(d: NDArray[np.float64], log_prior: NDArray, cc_mode: bool, fraction: float,
                        maxsig: int) -> tuple[NDArray[np.bool_], NDArray[np.float64], int, float]:
    """(keep, posterior weights w/W_sum on keep and 0 elsewhere, number kept, log W_sum) of one particle.

    Log-weights are −(d − min d) + log-prior and W_sum sums all evaluated samples, so the kept weights sum to about
    `fraction`, as RELION's (spec §2.6); CC mode keeps only the best sample (hard assignment, no priors).
    """
    if cc_mode:
        keep = np.zeros(d.shape, bool)
        keep.flat[int(np.argmin(d))] = True
        return keep, keep.astype(np.float64), 1, 0.0
    logw = -(d - float(d.min())) + log_prior
    mx = float(logw.max())
    thr, count, wsum, _ = significance_threshold(logw.ravel(), fraction, maxsig)
    keep = logw >= thr
    w = np.where(keep, np.exp(logw - mx) / wsum, 0.0)
    return keep, w, int(count), float(np.log(wsum) + mx)


def coarse_candidates(st: PassSettings, nb: int) -> Candidates:
    """The coarse orientations of each particle: the whole grid (global) or its local window (local)."""
    grid = st.grid
    if st.local is None:
        dirs = np.nonzero(np.isfinite(st.log_pdf_direction))[0]
        ids = (dirs[:, None] * grid.n_psi + np.arange(grid.n_psi)[None, :]).ravel()
        lp = st.log_pdf_direction[coarse_direction_of(grid, ids)]
        return Candidates(ids, [np.arange(len(ids))] * nb, [lp] * nb)
    chunks = [st.local.ids[st.local.offsets[j]:st.local.offsets[j + 1]] for j in range(nb)]
    ids, inv = np.unique(np.concatenate(chunks), return_inverse=True)
    bounds = np.cumsum([0] + [len(c) for c in chunks])
    return Candidates(ids, [inv[bounds[j]:bounds[j + 1]] for j in range(nb)],
                      [st.local.log_prior[st.local.offsets[j]:st.local.offsets[j + 1]] for j in range(nb)])


def coarse_pass(inp: BatchInputs, st: PassSettings, cand: Candidates, cache: ProjectionCache, backend,
                acc: HalfAccumulator) -> Significant:
    """Pass 1: coarse orientations x coarse translations at the coarse size; keeps the significant pairs."""
    nb = len(inp.rows)
    isig = inverse_sigma2(st, st.ps_coarse, keep_dc=False)
    p_pair, p_pow = cache.coarse_pairs(cand.ids)                                           # (U, 2mc), (U, mc)
    phases = shift_phases(st.ps_coarse, st.translations.coarse)                             # (T, mc)
    a = weighted_images(inp.x_coarse, phases, inp.ctf_coarse * inp.scale[:, None].astype(np.float32) * isig[None, :])
    norm_w = (inp.ctf_coarse ** 2) * (inp.scale[:, None] ** 2).astype(np.float32) * isig[None, :]
    tau = (inp.preshift_px[:, None, :] + st.translations.coarse[None, :, :]) * inp.angpix   # (B, T, 2) Å
    lp_off = offset_log_prior(tau, inp.prior_mu[:, None, :], st.sigma_offset)               # (B, T)
    if st.cc_mode:
        lp_off = np.zeros_like(lp_off)
    n_t, depth = a.shape[1], a.shape[2]
    pairs, lps, count = [], [], np.zeros(nb, np.int64)
    if st.local is None:
        lp_dir = cand.log_prior[0]
        keep, count = backend.coarse_significant(a, p_pair, norm_w, p_pow, lp_off, lp_dir, st.cc_mode,
                                                 st.adaptive_fraction, st.maxsig)
        acc.gflop += gflop_of_products(nb * n_t, len(cand.ids), depth) + gflop_of_products(nb, len(cand.ids),
                                                                                         depth // 2)
        for j in range(nb):
            pair = np.nonzero(keep[j])
            pairs.append(pair)
            lps.append(lp_off[j][pair[0]] + lp_dir[pair[1]])
        return Significant(pairs, lps, count)
    for j in range(nb):
        idx = cand.index[j]
        d = backend.local_scores(a[j], p_pair[idx], norm_w[j], p_pow[idx], st.cc_mode)
        acc.gflop += gflop_of_products(n_t, len(idx), depth) + gflop_of_products(1, len(idx), depth // 2)
        lp = lp_off[j][:, None] + cand.log_prior[j][None, :]
        keep, _, count[j], _ = significant_weights(d, lp, st.cc_mode, st.adaptive_fraction, st.maxsig)
        pair = np.nonzero(keep)
        pairs.append(pair)
        lps.append(lp[pair])
    return Significant(pairs, lps, count)


def fine_orientations(cand: Candidates, sig: Significant, n_children: int) -> list[NDArray[np.int64]]:
    """Per particle, the fine ids (children) of its significant coarse orientations, parent-major."""
    out = []
    for j, (_, o_loc) in enumerate(sig.pairs):
        parents = np.unique(cand.ids[cand.index[j][o_loc]])
        out.append((parents[:, None] * n_children + np.arange(n_children)[None, :]).ravel())
    return out


def expectation_batch(inp: BatchInputs, st: PassSettings, acc: HalfAccumulator, backend) -> Poses:
    """Two-pass search over orientations and translations for a batch; adds its weighted sums to `acc` and
    returns the batch's best poses and statistics."""
    nb = len(inp.rows)
    cache = st.cache
    cand = coarse_candidates(st, nb)
    sig = coarse_pass(inp, st, cand, cache, backend, acc)

    # pass 2: children of the significant coarse samples at the current size, projected once for the batch
    fine_lists = fine_orientations(cand, sig, st.grid.n_children)
    fine_uniq, fine_inv = np.unique(np.concatenate(fine_lists), return_inverse=True)
    fine_rot = fine_matrices(st.grid, fine_uniq)
    p_f = cache.fine_projections(fine_uniq, fine_rot)                                     # (F, mf)
    p_f_pow = (p_f.real ** 2 + p_f.imag ** 2).astype(np.float32)
    out = Poses(**{f: np.zeros(nb) for f in ("rot", "tilt", "psi", "origin_x", "origin_y", "norm_correction",
                                               "log_likelihood", "max_prob")},
                nr_significant=sig.count.astype(np.int64))
    isig_f = inverse_sigma2(st, st.ps_fine, keep_dc=False)
    isig_bp = inverse_sigma2(st, st.ps_fine, keep_dc=True)
    inserts = []
    pos = 0
    for j in range(nb):
        n_of = len(fine_lists[j])
        f_idx = fine_inv[pos:pos + n_of]
        pos += n_of
        post = fine_posterior(inp, st, j, sig, cand, p_f[f_idx], p_f_pow[f_idx], isig_f, backend, acc)
        best_pose(out, j, post, inp, st, fine_uniq[f_idx], isig_f)
        inserts.append(particle_sums(acc, out, j, post, inp, st, isig_bp, fine_rot[f_idx], fine_uniq[f_idx]))
    backend.insert(acc.bp, np.concatenate([r for r, _, _ in inserts]), st.ps_fine.kx_model, st.ps_fine.ky_model,
                   np.concatenate([v for _, v, _ in inserts]), np.concatenate([w for _, _, w in inserts]))
    return out


@dataclass
class FinePosterior:
    """One particle's pass-2 posterior: dense weights over (fine translation, fine orientation) and its inputs."""

    wbar: NDArray[np.float64]             # (Tf, Of) posterior weights, summing to 1
    t_fine: NDArray[np.float64]           # (Tf, 2) fine translations (px, relative to the pre-shift)
    phases: NDArray[np.complex64]         # (Tf, mf)
    shifted: NDArray[np.complex64]        # (Tf, mf) masked image shifted by each fine translation
    p_f: NDArray[np.complex64]            # (Of, mf) projections of the fine orientations
    p_f_pow: NDArray[np.float32]
    dmin: float
    log_wsum: float


def fine_posterior(inp: BatchInputs, st: PassSettings, j: int, sig: Significant, cand: Candidates,
                   p_f: NDArray[np.complex64], p_f_pow: NDArray[np.float32], isig_f: NDArray[np.float32],
                   backend, acc: HalfAccumulator) -> FinePosterior:
    """Pass 2 of particle j: score only the children of its significant coarse pairs and weight them."""
    n_ch = st.grid.n_children
    t_idx, o_loc = sig.pairs[j]
    _, o_pos = np.unique(cand.ids[cand.index[j][o_loc]], return_inverse=True)
    u_t, t_pos = np.unique(t_idx, return_inverse=True)
    t_fine = st.translations.children(u_t).reshape(-1, 2)                  # (Tf, 2) px
    n_tch = t_fine.shape[0] // len(u_t)
    ph = shift_phases(st.ps_fine, t_fine)
    xs_f = inp.x_fine[j][None, :] * ph                                     # (Tf, mf)
    s = float(inp.scale[j])
    ctf = inp.ctf_fine[j]
    norm_f = (ctf * ctf * s * s * isig_f) @ p_f_pow.T                      # (Of,)
    # (K, n_tch) x (K, n_ch) blocks: the children of each significant coarse (translation, orientation) pair
    rows_t = t_pos[:, None] * n_tch + np.arange(n_tch)[None, :]
    rows_o = o_pos[:, None] * n_ch + np.arange(n_ch)[None, :]
    d_f = backend.pair_scores(real_pair(xs_f * (ctf * s * isig_f)[None, :]), real_pair(p_f), norm_f, rows_t,
                              rows_o, st.cc_mode)                           # (K, n_tch, n_ch)
    acc.gflop += 2e-9 * d_f.size * 2 * st.ps_fine.m
    keep, wpair, _, log_wsum = significant_weights(d_f, sig.log_prior[j][:, None, None], st.cc_mode,
                                                   st.adaptive_fraction, -1)     # --maxsig caps pass 1 only
    wbar = np.zeros((t_fine.shape[0], p_f.shape[0]))
    kk = np.nonzero(wpair.reshape(len(wpair), -1).max(1) > 0)[0]
    np.add.at(wbar, (np.broadcast_to(rows_t[kk][:, :, None], wpair[kk].shape),
                     np.broadcast_to(rows_o[kk][:, None, :], wpair[kk].shape)), wpair[kk])
    return FinePosterior(wbar, t_fine, ph, xs_f, p_f, p_f_pow, float(d_f.min()), log_wsum)


def best_pose(out: Poses, j: int, post: FinePosterior, inp: BatchInputs, st: PassSettings,
              fine_ids: NDArray[np.int64], isig: NDArray[np.float32]) -> None:
    """Write particle j's maximum-posterior pose, its probability and log-likelihood into `out`."""
    best = np.unravel_index(int(np.argmax(post.wbar)), post.wbar.shape)
    out.max_prob[j] = float(post.wbar[best])
    r_, t_, p_ = matrix_to_euler(fine_matrices(st.grid, np.array([fine_ids[best[1]]]))[0])
    out.rot[j], out.tilt[j], out.psi[j] = float(r_), float(t_), float(p_)
    tau_best = (inp.preshift_px[j] + post.t_fine[best[0]]) * inp.angpix
    out.origin_x[j], out.origin_y[j] = float(tau_best[0]), float(tau_best[1])
    const = 0.5 * float(((inp.x_fine[j].real ** 2 + inp.x_fine[j].imag ** 2) * isig).sum())
    out.log_likelihood[j] = post.log_wsum - (post.dmin + const)


def particle_sums(acc: HalfAccumulator, out: Poses, j: int, post: FinePosterior, inp: BatchInputs,
                  st: PassSettings, isig_bp: NDArray[np.float32], fine_rot: NDArray,
                  fine_ids: NDArray[np.int64]) -> tuple[NDArray, NDArray, NDArray]:
    """Weighted sums of particle j (spec §3.1, §3.6) into `acc`, its norm correction into `out`; returns what it
    back-projects: (rotations, CTF-weighted image sums, CTF² weights)."""
    ps_f = st.ps_fine
    wbar = post.wbar
    colw = wbar.sum(axis=0)
    cols = np.nonzero(colw > 0)[0]
    rows_w = wbar[:, cols].astype(np.float32)                               # (Tf, Ok)
    sw = float(colw.sum())
    s = float(inp.scale[j])
    ctf = inp.ctf_fine[j]
    y_nm = rows_w.T.astype(np.complex64) @ (inp.xnm_fine[j][None, :] * post.phases)     # (Ok, mf)
    back = (fine_rot[cols], (y_nm * (ctf * s * isig_bp)[None, :]).astype(np.complex64),
            (colw[cols][:, None] * (ctf * ctf * s * s * isig_bp)[None, :]).astype(np.float32))
    acc.ll_sum += out.log_likelihood[j]
    acc.pmax_sum += out.max_prob[j]
    acc.count += 1
    if st.cc_mode:
        out.norm_correction[j] = inp.old_norm[j]
        return back
    y_m = rows_w.T.astype(np.complex64) @ post.shifted                      # (Ok, mf)
    pk = post.p_f[cols]
    cross_k = (y_m.real * pk.real + y_m.imag * pk.imag).sum(0) * ctf       # Σ_o Re(conj(Y) P) CTF
    norm_k = (colw[cols][:, None] * post.p_f_pow[cols]).sum(0) * ctf * ctf
    xpow = inp.x_fine[j].real ** 2 + inp.x_fine[j].imag ** 2
    resid = residual_power(xpow, cross_k, norm_k, sw, s)
    nshell = len(st.inv_sigma2)
    beyond = inp.power_beyond[j]
    acc.sigma2_num[inp.optics] += np.bincount(ps_f.shell, resid, minlength=nshell)[:nshell]
    acc.sigma2_num[inp.optics] += sw * beyond
    acc.sigma2_wsum[inp.optics] += sw
    energy = float(resid.sum() + beyond.sum())
    out.norm_correction[j] = (inp.old_norm[j] / st.norm_average) * np.sqrt(max(2.0 * energy, 1e-30))
    if st.scale_shells is not None:
        sel = st.scale_shells[ps_f.shell]
        acc.scale_num[inp.group[j]] += float(cross_k[sel].sum())
        acc.scale_den[inp.group[j]] += float(norm_k[sel].sum())
    tau_rows = (inp.preshift_px[j][None, :] + post.t_fine) * inp.angpix
    d2 = ((tau_rows - inp.prior_mu[j][None, :]) ** 2).sum(-1)
    acc.offset_num += float((wbar.sum(axis=1) * d2).sum())
    acc.wsum += sw
    acc.norm_sum += out.norm_correction[j]
    if st.local is None and acc.pdf.size:
        np.add.at(acc.pdf, coarse_direction_of(st.grid, fine_ids[cols] // st.grid.n_children), colw[cols])
    return back
