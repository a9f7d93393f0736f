"""The E-step for a batch of particles of one half: two-pass search, posterior weights and weighted sums
(spec §2, §3.1, §3.6). The likelihood formulas are in refine.likelihood; the kernels come from a Backend.

For a batch: coarse candidates (global: the shared asymmetric unit; local: each particle's window) -> pass 1
at the coarse size keeps the significant (translation, orientation) pairs -> pass 2 scores their oversampled
children at the current size -> posterior weights -> best pose, and the weighted sums of the M-step.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass, fields, replace

import numpy as np
from numpy.typing import NDArray

from cryorefine.fourier.backprojector import BackProjector, make_backprojector
from cryorefine.fourier.projector import Projector
from cryorefine.geometry.euler import matrix_to_euler
from cryorefine.refine.fine_kernels import (block_sums, column_cross, dense_weight_rows, segment_best,
                                            segment_weights, shifted_pairs, sparse_row_sums, weight_marginals)
from cryorefine.refine.likelihood import (BlockLayout, gflop_of_products, offset_log_prior, real_pair,
                                          residual_power, weighted_images)
from cryorefine.refine.lattice_sums import (balanced_parts, lattice_coordinates, lattice_sums, phase_tables,
                                            pixel_rows)
from cryorefine.refine.memory import (DENSE_FRACTION, FINE_CACHE_BYTES, EStepLimits, lattice_parts,
                                      sums_row_bytes)
from cryorefine.refine.orientations import (LocalWindow, OrientationGrid, TranslationGrid, coarse_direction_of,
                                            coarse_matrices, fine_matrices)
from cryorefine.refine.pixels import PixelSet, shift_phases
from cryorefine.refine.state import Poses


@dataclass
class HalfAccumulator:
    """Sums over the particles of one half; `reduce` sums every field over processes."""

    bp: BackProjector | None                       # None where this process does not reconstruct the half (loop)
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
    # sizes of the batches' pass-2 buffers summed over batches, for the next iteration's memory plan
    n_blocks: int = 0                              # significant coarse pairs
    n_fine_rows: int = 0                           # fine orientations projected
    n_columns: int = 0                             # (particle, fine translation) columns of the weighted sums

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


def lazy_zeros(shape: tuple[int, ...], dtype) -> NDArray:
    """Zeros whose memory pages become resident only when written (an anonymous map of 4 KiB pages).

    For the fine-projection cache, whose rows the batches fill sparsely and in no order: numpy asks the kernel for
    2 MiB pages for large arrays, and a row written anywhere in one makes the whole page resident and zeroed (small
    set, iteration 7: 0.94 GB zeroed in 1.1 s for 0.30 GB of projections; written this way in 0.3 s, with a peak
    0.32 GB lower; docs/benchmarks.md)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if nbytes == 0:
        return np.zeros(shape, dtype)
    return np.frombuffer(mmap.mmap(-1, nbytes), dtype).reshape(shape)


class ProjectionCache:
    """Projections of one half's reference in one iteration, computed once and shared by all batches.

    Global searches reuse the same coarse set for every particle and draw fine children from a fixed grid,
    so both are cached (the fine cache only while it fits in `max_bytes`); local searches project per batch.
    """

    def __init__(self, proj: Projector, grid: OrientationGrid, ps_coarse: PixelSet, ps_fine: PixelSet,
                 project, max_bytes: float = FINE_CACHE_BYTES):
        self.proj, self.grid, self.ps_coarse, self.ps_fine, self.project = proj, grid, ps_coarse, ps_fine, project
        self.coarse_ids: NDArray[np.int64] | None = None
        self.coarse: NDArray[np.complex64] | None = None
        self.pairs: tuple[NDArray[np.float32], NDArray[np.float32]] | None = None
        self._coarse_rows: NDArray[np.int64] | None = None    # local searches: row of each of coarse_ids
        self._spare: NDArray[np.complex64] | None = None      # local searches: the buffer the next call writes
        self._held: NDArray[np.complex64] | None = None       # local searches: the buffer `coarse` lies in
        n_fine = len(grid.dir_pix) * grid.n_psi * grid.n_children
        self.fine = None
        if not grid.local and n_fine * ps_fine.m * 8 <= max_bytes:
            self.fine = lazy_zeros((n_fine, ps_fine.m), np.complex64)
            self.have = np.zeros(n_fine, bool)

    def coarse_projections(self, ids: NDArray[np.int64]) -> NDArray[np.complex64]:
        """Projections of coarse ids at the coarse size, global searches (cached when the same id set comes back)."""
        if self.coarse_ids is None or not np.array_equal(self.coarse_ids, ids):
            self.coarse_ids = ids
            self.coarse = self.project(self.proj, coarse_matrices(self.grid, ids), self.ps_coarse.kx_model,
                                       self.ps_coarse.ky_model)
            self.pairs = None
        return self.coarse

    def local_projections(self, ids: NDArray[np.int64]) -> tuple[NDArray[np.complex64], NDArray[np.int64]]:
        """(projections, row of each id in them) of sorted distinct coarse ids of a local-search chunk at the coarse
        size. Batches in orientation order share window orientations, so those the previous call also had are
        copied, not projected again. Two buffers, each the size of a chunk, are used in turn (the previous call's
        rows are read while the new ones are written) and kept, which spares the page faults of fresh arrays."""
        ps, n = self.ps_coarse, len(ids)
        old_ids = self.coarse_ids if self.coarse_ids is not None else np.zeros(0, np.int64)
        pos = np.minimum(np.searchsorted(old_ids, ids), max(len(old_ids) - 1, 0))
        hit = (old_ids[pos] == ids) if len(old_ids) else np.zeros(n, bool)
        n_hit = int(np.count_nonzero(hit))
        if self._spare is None or self._spare.shape[0] < n:
            self._spare = np.empty((n, ps.m), np.complex64)
        out = self._spare[:n]
        row = np.empty(n, np.int64)
        row[hit] = np.arange(n_hit)
        row[~hit] = np.arange(n_hit, n)
        if n_hit:
            np.take(self.coarse, self._coarse_rows[pos[hit]], axis=0, out=out[:n_hit], mode="clip")  # unbuffered
        if n_hit < n:
            self.project(self.proj, coarse_matrices(self.grid, ids[~hit]), ps.kx_model, ps.ky_model,
                         out=out[n_hit:])
        self._spare, self._held = self._held, self._spare
        self.coarse_ids, self._coarse_rows, self.coarse = ids, row, out
        return out, row

    def coarse_pairs(self, ids: NDArray[np.int64]) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        """(real pairs (U, 2mc), power |P|² (U, mc)) of the coarse projections of a global search (cached with
        them)."""
        p_c = self.coarse_projections(ids)
        if self.pairs is None:
            self.pairs = (real_pair(p_c), (p_c.real ** 2 + p_c.imag ** 2).astype(np.float32))
        return self.pairs

    def fine_projections(self, fine_ids: NDArray[np.int64],
                         rotations: NDArray) -> tuple[NDArray[np.complex64], NDArray[np.int64]]:
        """Projections of fine ids (with their rotation matrices) at the current size, as (array, row of each id in
        it): the cache itself when it holds the grid (no copy of a batch's rows), else this batch's projections."""
        if self.fine is None:
            p = self.project(self.proj, rotations, self.ps_fine.kx_model, self.ps_fine.ky_model)
            return p, np.arange(len(fine_ids), dtype=np.int64)
        todo = ~self.have[fine_ids]
        if todo.any():
            self.fine[fine_ids[todo]] = self.project(self.proj, rotations[todo], self.ps_fine.kx_model,
                                                self.ps_fine.ky_model)
            self.have[fine_ids[todo]] = True
        return self.fine, np.asarray(fine_ids, np.int64)


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
    limits: EStepLimits = EStepLimits(64)    # chunk caps of the batch's buffers (refine.memory plans them)


@dataclass
class Significant:
    """Pass-1 result of a batch, flattened: the significant coarse (translation, orientation) pairs of every particle,
    sorted by (particle, coarse id, translation index) so that pass 2 reuses each projection from cache, their
    log-priors, and the pass-1 counts per particle."""

    img: NDArray[np.int64]           # particle (row of the batch)
    t: NDArray[np.int64]             # coarse translation index
    cid: NDArray[np.int64]           # coarse orientation id
    log_prior: NDArray[np.float64]   # log π_off(t) + log π_ang(cid)
    count: NDArray[np.int64]         # (B,) rlnNrOfSignificantSamples


def dense_index(keys: NDArray[np.int64], n: int) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """(sorted distinct keys, position of each key among them) for keys in [0, n): np.unique by a table."""
    used = np.zeros(n, bool)
    used[keys] = True
    pos = np.cumsum(used) - 1
    return np.flatnonzero(used), pos[keys]


def inverse_sigma2(st: PassSettings, ps: PixelSet, keep_dc: bool) -> NDArray[np.float32]:
    """1/σ² on a pixel set (all ones in CC mode); the likelihood excludes the DC term, back-projection keeps it."""
    if st.cc_mode:
        return np.ones(ps.m, np.float32)
    isig = st.inv_sigma2[ps.shell].astype(np.float32)
    if not keep_dc:
        isig[ps.shell == 0] = 0.0
    return isig


def offsets_of(img: NDArray[np.int64], n: int, per_item: int = 1) -> NDArray[np.int64]:
    """CSR offsets (n + 1,) of items sorted by owner `img`, each item `per_item` elements long."""
    return np.concatenate([[0], np.cumsum(np.bincount(img, minlength=n))]).astype(np.int64) * per_item


def image_weights(x: NDArray[np.complex64], ctf: NDArray[np.float32], scale: NDArray[np.float64],
                  isig: NDArray[np.float32]) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """(real pairs of X·s·CTF/σ² (B, 2m), s²CTF²/σ² (B, m)): the image factors of `cross` and `norm`."""
    s = scale[:, None].astype(np.float32)
    return real_pair(x * (ctf * s * isig[None, :])), (ctf * ctf) * (s * s) * isig[None, :]


def offset_priors(inp: BatchInputs, st: PassSettings) -> NDArray[np.float64]:
    """log π_off of every particle and coarse translation (B, T); 0 in CC mode (no priors)."""
    tau = (inp.preshift_px[:, None, :] + st.translations.coarse[None, :, :]) * inp.angpix   # (B, T, 2) Å
    lp_off = offset_log_prior(tau, inp.prior_mu[:, None, :], st.sigma_offset)
    return np.zeros_like(lp_off) if st.cc_mode else lp_off


def global_coarse_pass(inp: BatchInputs, st: PassSettings, cache: ProjectionCache, backend,
                       acc: HalfAccumulator) -> Significant:
    """Pass 1 of a global search: the batch against the shared coarse orientations (directions with pdf > 0)."""
    nb, grid = len(inp.rows), st.grid
    dirs = np.nonzero(np.isfinite(st.log_pdf_direction))[0]
    ids = (dirs[:, None] * grid.n_psi + np.arange(grid.n_psi)[None, :]).ravel()
    lp_dir = st.log_pdf_direction[coarse_direction_of(grid, ids)]
    isig = inverse_sigma2(st, st.ps_coarse, keep_dc=False)
    p_pair, p_pow = cache.coarse_pairs(ids)                                                 # (U, 2mc), (U, mc)
    phases = shift_phases(st.ps_coarse, st.translations.coarse)                             # (T, mc)
    a = weighted_images(inp.x_coarse, phases, inp.ctf_coarse * inp.scale[:, None].astype(np.float32) * isig[None, :])
    norm_w = (inp.ctf_coarse ** 2) * (inp.scale[:, None] ** 2).astype(np.float32) * isig[None, :]
    lp_off = offset_priors(inp, st)
    keep, count = backend.coarse_significant(a, p_pair, norm_w, p_pow, lp_off, lp_dir, st.cc_mode,
                                             st.adaptive_fraction, st.maxsig)
    n_t, depth = a.shape[1], a.shape[2]
    acc.gflop += gflop_of_products(nb * n_t, len(ids), depth) + gflop_of_products(nb, len(ids), depth // 2)
    j, t, u = np.nonzero(keep)
    order = np.lexsort((t, u, j))                # ids are increasing in u
    j, t, u = j[order], t[order], u[order]
    return Significant(j, t, ids[u], lp_off[j, t] + lp_dir[u], np.asarray(count, np.int64))


def local_chunks(win: LocalWindow, per_id: int, per_candidate: int, max_bytes: int) -> list[tuple[int, int]]:
    """Particle ranges [j0, j1) whose windows take at most max_bytes together (at least one particle): per_id bytes
    for each distinct orientation of the range, per_candidate for each (particle, orientation) candidate."""
    offsets, nb = win.offsets, len(win.offsets) - 1
    # distinct orientations of particles [0, j): a cheap first guess of a range's, refined below
    _, first = np.unique(win.ids, return_index=True)
    new_before = np.concatenate([[0], np.cumsum(np.bincount(np.searchsorted(offsets, first, side="right") - 1,
                                                            minlength=nb))])
    cost = new_before * per_id + offsets * per_candidate
    out, j0 = [], 0
    while j0 < nb:
        j1 = min(nb, max(j0 + 1, int(np.searchsorted(cost, cost[j0] + max_bytes, side="right")) - 1))
        # a range that starts later repeats orientations the guess counted before it
        while j1 > j0 + 1 and (np.unique(win.ids[offsets[j0]:offsets[j1]]).size * per_id
                               + (offsets[j1] - offsets[j0]) * per_candidate) > max_bytes:
            j1 = j0 + (j1 - j0) // 2
        out.append((j0, j1))
        j0 = j1
    return out


def local_coarse_pass(inp: BatchInputs, st: PassSettings, cache: ProjectionCache, backend,
                      acc: HalfAccumulator) -> Significant:
    """Pass 1 of a local search: each particle against its own window, in chunks of particles whose windows'
    projections fit st.limits.local_chunk_bytes (one product kernel per chunk)."""
    nb, win = len(inp.rows), st.local
    isig = inverse_sigma2(st, st.ps_coarse, keep_dc=False)
    xw, wn = image_weights(inp.x_coarse, inp.ctf_coarse, inp.scale, isig)
    ph = real_pair(shift_phases(st.ps_coarse, st.translations.coarse))                     # (T, 2mc)
    n_t, mc = len(ph), st.ps_coarse.m
    lp_off = offset_priors(inp, st)
    owner = np.repeat(np.arange(nb), np.diff(win.offsets))
    parts = []
    count = np.zeros(nb, np.int64)
    # per distinct orientation its projection and the previous chunk's kept by the cache; per candidate its
    # scores, log-priors and weights over the translations
    for j0, j1 in local_chunks(win, 2 * 8 * mc, 3 * 8 * n_t, st.limits.local_chunk_bytes):
        lo, hi = win.offsets[j0], win.offsets[j1]
        ids, inv = np.unique(win.ids[lo:hi], return_inverse=True)
        p_c, row = cache.local_projections(ids)
        img = owner[lo:hi]
        # one block per candidate: all coarse translations (rows 0..T of ph) against its projection
        layout = BlockLayout(img, np.zeros(hi - lo, np.int64), row[inv.ravel()], n_t, 1)
        d = backend.block_scores(xw, wn, ph, real_pair(p_c), layout, st.cc_mode)[:, :, 0]    # (K, T)
        acc.gflop += gflop_of_products(n_t, hi - lo, 2 * mc) + gflop_of_products(1, hi - lo, mc)
        lp = win.log_prior[lo:hi, None] + lp_off[img]                                        # (K, T)
        w, count[j0:j1], _, _ = segment_weights(d.ravel(), lp.ravel(), (win.offsets[j0:j1 + 1] - lo) * n_t,
                                                st.cc_mode, st.adaptive_fraction, st.maxsig)
        k, t = np.divmod(np.flatnonzero(w > 0), n_t)
        parts.append((img[k], t, win.ids[lo:hi][k], lp[k, t]))
    j, t, cid, lp = (np.concatenate(v) for v in zip(*parts))
    order = np.lexsort((t, cid, j))
    return Significant(j[order], t[order], cid[order], lp[order], count)


@dataclass
class FineSamples:
    """Pass 2 of a batch, flattened: the children of the significant coarse pairs as blocks of n_a fine translations
    x n_b fine orientations (layout), the batch's fine orientations (projected once) and fine translations."""

    layout: BlockLayout                       # image, phase rows, projection rows of each block (K)
    fine_ids: NDArray[np.int64]               # (F,) fine orientation ids of the projection rows (parent-major)
    rot: NDArray[np.float64]                  # (F, 3, 3)
    p: NDArray[np.complex64]                  # fine projections at the current size: rows p_rows of this array
    p_rows: NDArray[np.int64]                 # (F,) the row of p of each fine orientation (children consecutive)
    t_fine: NDArray[np.float64]               # (R, 2) fine translations (px, relative to the pre-shift)
    phases: NDArray[np.complex64]             # (R, mf) their phase ramps


def fine_samples(sig: Significant, st: PassSettings, cache: ProjectionCache) -> FineSamples:
    """The fine samples of a batch: each significant pair's n_ch orientation children (projected once for the
    batch) x its translation children."""
    grid, n_ch = st.grid, st.grid.n_children
    parents, q = np.unique(sig.cid, return_inverse=True)
    fine_ids = (parents[:, None] * n_ch + np.arange(n_ch)[None, :]).ravel()
    rot = fine_matrices(grid, fine_ids)
    p_f, p_rows = cache.fine_projections(fine_ids, rot)
    u_t, t_pos = np.unique(sig.t, return_inverse=True)
    t_fine = st.translations.children(u_t).reshape(-1, 2)                                  # (R, 2) px
    n_tch = t_fine.shape[0] // len(u_t)
    layout = BlockLayout(sig.img, t_pos.ravel() * n_tch, q.ravel() * n_ch, n_tch, n_ch)
    return FineSamples(layout, fine_ids, rot, p_f, p_rows, t_fine, shift_phases(st.ps_fine, t_fine))


@dataclass
class FineWeights:
    """Pass-2 posterior of a batch: weights w̄ per block element (K, n_a, n_b), per particle log W_sum and D_min."""

    w: NDArray[np.float64]
    log_wsum: NDArray[np.float64]
    dmin: NDArray[np.float64]
    elem_off: NDArray[np.int64]               # (B + 1,) particle j owns w.ravel()[elem_off[j]:elem_off[j+1]]


def fine_weights(inp: BatchInputs, st: PassSettings, sig: Significant, fs: FineSamples, isig_f: NDArray[np.float32],
                 backend, acc: HalfAccumulator) -> FineWeights:
    """Pass 2: score the children of the significant pairs at the current size and weight them (RELION's rule
    again with no --maxsig cap, weights over the pass-2 W_sum; children inherit their parent's log-prior)."""
    xw, wn = image_weights(inp.x_fine, inp.ctf_fine, inp.scale, isig_f)
    if backend.reads_rows_in_place:       # the projection rows of the blocks, read where they are (e.g. the cache)
        p, layout = fs.p, replace(fs.layout, p_row=fs.p_rows[fs.layout.p_row])
    else:
        p, layout = fs.p[fs.p_rows], fs.layout
    d = backend.block_scores(xw, wn, real_pair(fs.phases), real_pair(p), layout, st.cc_mode)       # (K, n_a, n_b)
    acc.gflop += 2e-9 * d.size * 2 * st.ps_fine.m
    per_block = fs.layout.n_a * fs.layout.n_b
    off = offsets_of(sig.img, len(inp.rows), per_block)
    w, _, log_wsum, dmin = segment_weights(d.ravel(), sig.log_prior, off, st.cc_mode, st.adaptive_fraction,
                                           -1, per_block)               # --maxsig caps pass 1 only
    return FineWeights(w.reshape(d.shape), log_wsum, dmin, off)


def expectation_batch(inp: BatchInputs, st: PassSettings, acc: HalfAccumulator, backend) -> Poses:
    """Two-pass search over orientations and translations for a batch; adds its weighted sums to `acc` and
    returns the batch's best poses and statistics."""
    nb = len(inp.rows)
    cache = st.cache
    if st.local is None:
        sig = global_coarse_pass(inp, st, cache, backend, acc)
    else:
        sig = local_coarse_pass(inp, st, cache, backend, acc)
    fs = fine_samples(sig, st, cache)
    acc.n_blocks += len(sig.img)
    acc.n_fine_rows += len(fs.fine_ids)
    isig_f = inverse_sigma2(st, st.ps_fine, keep_dc=False)
    fw = fine_weights(inp, st, sig, fs, isig_f, backend, acc)
    out = Poses(**{f: np.zeros(nb) for f in ("rot", "tilt", "psi", "origin_x", "origin_y", "norm_correction",
                                               "log_likelihood", "max_prob")},
                nr_significant=sig.count.astype(np.int64))
    best_poses(out, inp, fs, fw, isig_f, st.cc_mode)
    batch_sums(acc, out, inp, st, fs, fw, backend)
    return out


def best_poses(out: Poses, inp: BatchInputs, fs: FineSamples, fw: FineWeights, isig: NDArray[np.float32],
               cc_mode: bool) -> None:
    """Write each particle's maximum-posterior pose, its probability and log-likelihood into `out`; ties go to the
    first fine (translation, orientation) in index order.

    The log-likelihood is RELION's dLL: log W_sum − D_min − Σ_k log(2π σ²(k)) over the likelihood's pixels (the
    Gaussian's normalisation, which differs between optics groups), or the best correlation in a CC iteration."""
    _, n_a, n_b = fw.w.shape
    best = segment_best(fw.w, fw.elem_off // (n_a * n_b), fs.layout.ph_row, fs.layout.p_row)
    k, a, b = np.unravel_index(best, fw.w.shape)
    o_best = fs.layout.p_row[k] + b
    out.max_prob[:] = fw.w.ravel()[best]
    out.rot[:], out.tilt[:], out.psi[:] = matrix_to_euler(fs.rot[o_best])
    tau = (inp.preshift_px + fs.t_fine[fs.layout.ph_row[k] + a]) * inp.angpix
    out.origin_x[:], out.origin_y[:] = tau[:, 0], tau[:, 1]
    if cc_mode:         # D = −CC (spec §2.8): RELION's dLL = −D_min
        out.log_likelihood[:] = -fw.dmin
        return
    const = 0.5 * ((inp.x_fine.real ** 2 + inp.x_fine.imag ** 2) * isig[None, :]).sum(1)
    log_sigma2 = float(np.log(2.0 * np.pi / isig[isig > 0].astype(np.float64)).sum())
    out.log_likelihood[:] = fw.log_wsum - (fw.dmin + const) - log_sigma2


# weight-matrix density above which the sums are dense BLAS products (memory.DENSE_FRACTION, which the plan uses too)
_DENSE_FRACTION = DENSE_FRACTION
# significant translations per child orientation of each (particle, parent orientation) run of blocks, from which
# the sums go through the translation lattice (lattice_sums: all children of a run at once, about L_v + 2 passes
# over the pixels per child) instead of block_sums (2 passes per weight). Small set, both kernels on every batch of a
# whole run: equal at 6-8, lattice 1.8x faster from 12, block_sums 1.4-2.2x faster below 3 (docs/benchmarks.md,
# "Weighted sums through the translation lattice")
_LATTICE_TRANSLATIONS = 8.0


def _planes(z: NDArray[np.complex64]) -> NDArray[np.float32]:
    """(B, 2, n) float32: the real and the imaginary parts of (B, n) z as separate planes."""
    return np.ascontiguousarray(np.stack([z.real, z.imag], axis=1), np.float32)


def _lattice_inputs(inp: BatchInputs, st: PassSettings, fs: FineSamples, bp_factor: NDArray[np.float32]) -> tuple:
    """lattice_sums' arguments from the translation lattice to the images: (tu, tv, α_x, α_y, pixel row starts,
    first kx, ky index, Z e_t₀, X e_t₀), the last two with each pixel repeated for the children of an orientation;
    bp_factor = s·CTF/σ² of the back-projection (B, m)."""
    ps = st.ps_fine
    h = st.translations.step / 2 ** st.translations.oversampling
    tu, tv, t0 = lattice_coordinates(fs.t_fine, h)
    ax, ay = phase_tables(ps, h, int(tu.max()) + 1, int(tv.max()) + 1)
    start, kx0, ky = pixel_rows(ps)
    e0 = shift_phases(ps, t0[None, :])
    n_ch = st.grid.n_children
    zz = _planes(np.repeat(inp.xnm_fine * e0 * bp_factor, n_ch, axis=1))
    xx = _planes(np.repeat(inp.x_fine * e0, n_ch, axis=1))
    return tu, tv, ax, ay, start, kx0, ky - int(np.rint(ps.ky.min())), zz, xx


def batch_sums(acc: HalfAccumulator, out: Poses, inp: BatchInputs, st: PassSettings, fs: FineSamples,
               fw: FineWeights, backend) -> None:
    """Weighted sums of the batch (spec §3.1, §3.6) into `acc` (back-projection included), norm corrections into
    `out`.

    The posterior weights form a sparse matrix W̄ over (orientation o, particle-translation (j, t)). The values
    back-projected at o sum over the batch's particles, Σ_(j,t) W̄ X^nm_j e^{-2πik·t/N} s CTF_j/σ² = (W̄ @ Z)_o, so
    each orientation is inserted once per batch; Q = W̄ᵀ @ P gives the residual statistics, Σ_o w̄ Re(conj(X e) P)
    = Re(conj(X e) Q). Dense BLAS products when W̄ is dense enough; else, when each (orientation, particle) pair
    has many significant translations, their phase sums on the translation lattice (lattice_sums), or the block
    kernel (block_sums); in chunks of rows.
    """
    nb, ps_f, m = len(inp.rows), st.ps_fine, st.ps_fine.m
    _, n_a, n_b = fw.w.shape
    lay = fs.layout
    # columns: the (particle, fine translation) pairs of the batch, sorted by particle
    n_t = len(fs.t_fine)
    jt_key, blk_jt = dense_index(lay.img[:, None] * n_t + lay.ph_row[:, None] + np.arange(n_a), nb * n_t)
    jt_img, jt_t = jt_key // n_t, jt_key % n_t
    acc.n_columns += len(jt_key)
    # rows: the orientations with weight; Σ_t w̄ of each (orientation, particle); Σ_o w̄ of each column
    rows, row_of, colw, w_jt = weight_marginals(fw.w, offsets_of(lay.img, nb), blk_jt, lay.p_row,
                                                len(fs.fine_ids), len(jt_key))
    s = inp.scale[:, None].astype(np.float32)
    isig_bp = inverse_sigma2(st, ps_f, keep_dc=True)[None, :]
    ctf = inp.ctf_fine
    bp_n = ctf * ctf * s * s * isig_bp                                                     # (B, mf)
    p_pair = real_pair(fs.p)
    n_rows, n_cols = len(rows), len(jt_key)
    nnz = np.count_nonzero(fw.w)
    dense = nnz >= _DENSE_FRACTION * n_rows * n_cols
    # (particle, parent orientation) runs of blocks: lattice_sums' unit of work, all children of the parent at once
    n_runs = 1 + np.count_nonzero((lay.img[1:] != lay.img[:-1]) | (lay.p_row[1:] != lay.p_row[:-1]))
    lattice = not dense and nnz >= _LATTICE_TRANSLATIONS * n_runs * n_b
    # blocks by projection row, so that a chunk of rows visits only the blocks that reach it
    by_p = np.argsort(lay.p_row, kind="stable")
    p_sorted = lay.p_row[by_p]
    if not dense:       # runs of one parent orientation among the sorted blocks
        grp = np.concatenate([[0], np.flatnonzero(p_sorted[1:] != p_sorted[:-1]) + 1, [len(p_sorted)]])
    if lattice:
        lat = _lattice_inputs(inp, st, fs, ctf * s * isig_bp)
        cross_parts = np.zeros((lattice_parts(nb, m, n_b), nb, m * n_b), np.float32)
    else:
        z = shifted_pairs(inp.xnm_fine, fs.phases, ctf * s * isig_bp, jt_img, jt_t)        # (J, 2mf)
        q = np.zeros((n_cols, 2 * m), np.float32)
        img_off = offsets_of(lay.img, nb)          # each image's blocks, for block_sums
    norm = np.zeros((nb, m), np.float32)
    # orientation rows of the weighted sums (and of an insertion) at a time
    step = max(1, st.limits.sums_chunk_bytes // sums_row_bytes(m, n_cols, dense))
    for r0 in range(0, n_rows, step):
        r1 = min(n_rows, r0 + step)
        prow = fs.p_rows[rows[r0:r1]]
        lo, hi = np.searchsorted(p_sorted, [rows[r0] - n_b + 1, rows[r1 - 1] + 1])
        if dense:
            p_c = p_pair[prow]
            wc = dense_weight_rows(fw.w, by_p[lo:hi], blk_jt, lay.p_row, row_of, r0, r1, n_cols)
            vals = wc @ z
            q += wc.T @ p_c
        else:
            vals = np.zeros((r1 - r0, 2 * m), np.float32)
            g0, g1 = np.searchsorted(grp, [lo, hi])
            if lattice:
                lattice_sums(fw.w, lay.img, lay.ph_row, lay.p_row, row_of, r0, r1, by_p, grp,
                             balanced_parts(grp, g0, g1, cross_parts.shape[0]), *lat, p_pair, fs.p_rows, vals,
                             cross_parts)
            else:
                block_sums(fw.w, blk_jt, lay.p_row, row_of, r0, r1, by_p, grp, g0, g1, img_off, z, p_pair,
                           fs.p_rows, vals, q)
        if dense:
            cw = colw[r0:r1].astype(np.float32)
            bp_w = cw @ bp_n
            norm += cw.T @ (p_c[:, 0::2] ** 2 + p_c[:, 1::2] ** 2)
        else:
            bp_w = sparse_row_sums(colw, r0, r1, bp_n, p_pair, prow, norm)
        backend.insert(acc.bp, fs.rot[rows[r0:r1]], ps_f.kx_model, ps_f.ky_model, vals.view(np.complex64), bp_w)
    if lattice:
        cross_k = cross_parts.reshape(-1, nb, m, n_b).sum(axis=(0, 3)) * ctf
    else:
        cross_k = column_cross(inp.x_fine, fs.phases, q, offsets_of(jt_img, nb), jt_t) * ctf    # Re(conj(X e) Q)
    acc.ll_sum += float(out.log_likelihood.sum())
    acc.pmax_sum += float(out.max_prob.sum())
    acc.count += nb
    # also in a CC iteration, as RELION's storeWeightedSums: its norm corrections, offsets and directions (hard
    # assignments) update the model; σ² and the group scales it leaves alone (mstep)
    norm_k = norm * ctf * ctf                                   # Σ_o w̄ |P|² CTF² per particle
    sw = colw.sum(axis=0)
    xpow = inp.x_fine.real ** 2 + inp.x_fine.imag ** 2
    resid = residual_power(xpow, cross_k, norm_k, sw[:, None], inp.scale[:, None])       # (B, mf)
    nshell = len(st.inv_sigma2)
    beyond = inp.power_beyond
    acc.sigma2_num[inp.optics] += np.bincount(ps_f.shell, resid.sum(0), minlength=nshell)[:nshell]
    acc.sigma2_num[inp.optics] += (sw[:, None] * beyond).sum(0)
    acc.sigma2_wsum[inp.optics] += sw.sum()
    energy = resid.sum(1) + beyond.sum(1)
    out.norm_correction[:] = (inp.old_norm / st.norm_average) * np.sqrt(np.maximum(2.0 * energy, 1e-30))
    if st.scale_shells is not None:
        sel = st.scale_shells[ps_f.shell]
        np.add.at(acc.scale_num, inp.group, cross_k[:, sel].sum(1))
        np.add.at(acc.scale_den, inp.group, norm_k[:, sel].sum(1))
    tau = (inp.preshift_px[jt_img] + fs.t_fine[jt_t]) * inp.angpix                         # (J, 2) Å
    acc.offset_num += float((w_jt * ((tau - inp.prior_mu[jt_img]) ** 2).sum(-1)).sum())
    acc.wsum += float(sw.sum())
    acc.norm_sum += float(out.norm_correction.sum())
    if st.local is None and acc.pdf.size:
        parents = fs.fine_ids[rows] // st.grid.n_children
        acc.pdf += np.bincount(coarse_direction_of(st.grid, parents), colw.sum(1), minlength=acc.pdf.size)
