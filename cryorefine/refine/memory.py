"""The memory plan of an iteration: the estimated peak resident memory of the process, term by term, and the
E-step limits (batch size, chunk and cache caps) lowered until that estimate fits the budget.

Every term is the byte count of arrays the code allocates, read off the allocating function (named per term);
only the interpreter baseline is a measured constant. Sizes are bytes; a "pixel set" count is the number of
unique half-plane Fourier pixels (refine.pixels.PixelSet.m).
"""

from __future__ import annotations

import math
import re
import resource
import sys
from dataclasses import dataclass, fields, replace

import numpy as np
from numpy.typing import NDArray

from cryorefine.fourier.backprojector import memory_bytes as accumulator_bytes
from cryorefine.fourier.kernels import half_cube_shape
from cryorefine.refine.orientations import OrientationGrid, in_orientation_order, local_window, make_translations
from cryorefine.refine.pixels import optics_size, pixel_set

GIB = 2 ** 30
MIB = 2 ** 20
C64, F32, F64, I64 = 8, 4, 8, 8       # itemsizes of complex64, float32, float64, int64

# RSS of `python -m cryorefine refine` with every module imported and every numba kernel of an iteration loaded
# from its on-disk cache, but (almost) no data: measured 0.38 GiB at the peak of iteration 2 of a 12-particle box-64
# run (2 cores, numpy's OpenBLAS and numba's thread pools started), whose other terms are 0.02 GiB. The interpreter
# and imports alone are 0.19 GiB; each loaded kernel adds its LLVM code. A first run after a code change compiles the
# kernels instead and peaks 0.1-0.2 GiB higher while it does.
BASELINE_BYTES = int(0.36 * GIB)

# The E-step's default caps (see refine.estep): local coarse-pass chunks, weighted-sum chunks, fine-projection cache.
LOCAL_CHUNK_BYTES = 256 * MIB
# (64 MiB: the rows a sparse chunk held before its rows were sized at their own 3m floats instead of the dense
# path's 6m + columns, so that the tutorial's final iteration, peaking at 7.3 of its 8 GB, holds no more)
SUMS_CHUNK_BYTES = 64 * MIB
FINE_CACHE_BYTES = int(1.5e9)
MIN_CHUNK_BYTES = 4 * MIB              # below this the chunks are so small that Python overhead dominates
# weight-matrix density (nonzero weights / (orientation rows x (particle, translation) columns)) above which
# estep.batch_sums makes dense BLAS products (medium's iteration 2: E-step 85.9 and 91.1 s at 0.35, 96.6 s at 0.15,
# 93.4 s with block_sums only; docs/benchmarks.md)
DENSE_FRACTION = 0.35
LATTICE_PARTS = 16                     # parallel parts of refine.lattice_sums, each with its cross-term buffer,
LATTICE_PART_BYTES = 64 * MIB          # fewer when those buffers would take more than this together


@dataclass(frozen=True)
class EStepLimits:
    """What bounds the E-step's buffers: particles per batch, bytes per local-pass chunk and per weighted-sum chunk,
    and the largest fine-projection cache kept (a larger fine grid is projected per batch instead)."""

    batch_size: int
    local_chunk_bytes: int = LOCAL_CHUNK_BYTES
    sums_chunk_bytes: int = SUMS_CHUNK_BYTES
    fine_cache_bytes: int = FINE_CACHE_BYTES


@dataclass(frozen=True)
class IterationSizes:
    """The sizes of one iteration that memory depends on (pixel counts of the largest optics group's sets)."""

    box: int                      # model box N (px)
    pad: int
    n_half: int                   # most particles of one half this process runs the E-step on
    stack_bytes: int              # particle stacks (memory-mapped: resident once an iteration has read them)
    table_bytes: int              # particle metadata: STAR table, CTF parameters, poses
    projector_radius: float       # model px the references are projected to
    data_radius: float            # model px of the data (accumulators)
    optics_box: int               # N_o of the largest optics group
    n_shells: int                 # shells of that box's noise spectrum
    mc: int                       # coarse pixel set
    mf: int                       # fine pixel set
    n_translations: int           # coarse translations T
    n_translation_children: int   # fine translations per coarse one
    n_orientation_children: int   # fine orientations per coarse one
    n_coarse: int                 # global: coarse orientations searched; local: the largest per-particle window
    n_fine_grid: int              # global: fine orientations of the grid (the fine cache's rows); local: 0
    n_grid: int                   # coarse orientations of the whole grid (bounds distinct parents)
    local: bool
    significant: int              # significant coarse (translation, orientation) pairs per particle (planned)
    n_caches: int = 1             # projection caches (distinct box, pixel size, mag matrix of optics groups)
    final: bool = False
    fine_rows: float | None = None    # fine orientations projected per particle in the last E-step (None: unknown)
    columns: float | None = None      # (particle, fine translation) columns per particle in the last E-step
    window_rows: int = 0              # local: most distinct window orientations of a batch (0: unknown)


@dataclass(frozen=True)
class EStepStats:
    """Per particle of the last E-step: significant coarse pairs, fine orientations projected (shared within a
    batch, so this is per particle at that E-step's batch size) and (particle, fine translation) columns."""

    blocks: float
    fine_rows: float
    columns: float


def observed_stats(accs) -> EStepStats | None:
    """The pass-2 buffer sizes per particle that the half accumulators of an E-step counted (None if empty)."""
    n = sum(a.count for a in accs)
    if n == 0:
        return None
    return EStepStats(sum(a.n_blocks for a in accs) / n, sum(a.n_fine_rows for a in accs) / n,
                      sum(a.n_columns for a in accs) / n)


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated bytes of the process's peak in one iteration, by term. Every iteration holds baseline, data and
    models; on top of them the peak is the largest of three phases: building a projector, the E-step (projectors,
    accumulators, caches, one batch) and the M-step (projectors, accumulators, reconstruction)."""

    baseline: int
    data: int
    models: int
    projectors: int
    accumulators: int
    caches: int
    estep_batch: int
    reconstruction: int
    projector_build: int

    @property
    def estep_phase(self) -> int:
        """Bytes on top of baseline, data and models while a batch runs."""
        return self.projectors + self.accumulators + self.caches + self.estep_batch

    @property
    def peak(self) -> int:
        """Estimated peak resident bytes of the iteration."""
        phases = (self.projectors // 2 + self.projector_build, self.estep_phase,
                  self.projectors + self.accumulators + self.reconstruction)
        return self.baseline + self.data + self.models + max(phases)

    def summary(self) -> str:
        """'1.23 GiB (baseline 0.28, data 0.40, ...)': the peak and every term in GiB."""
        terms = ", ".join(f"{f.name.replace('_', ' ')} {getattr(self, f.name) / GIB:.2f}" for f in fields(self))
        return f"{self.peak / GIB:.2f} GiB ({terms})"


def projector_bytes(box: int, pad: int, radius: float) -> int:
    """Bytes of one Projector's padded half-cube (fourier.projector.make_projector: complex64 to round(pad·r))."""
    return math.prod(half_cube_shape(int(round(pad * radius)))) * C64


def fft_transient_bytes(box: int, pad: int) -> int:
    """Peak bytes of make_projector and reconstruct on the (pad·N)³ grid: the real grid, its half transform and
    pocketfft's complex work copy, 4 B per voxel each (measured 12.1-12.3 B per voxel at box 128)."""
    p = pad * box + (pad * box) % 2
    return 3 * F32 * p ** 3


def batch_stages(s: IterationSizes, lim: EStepLimits) -> dict[str, int]:
    """Bytes of one E-step batch by stage (refine.expectation.batch_inputs, refine.estep.expectation_batch):
    'inputs' and 'significant' live through the batch; 'prepare', 'coarse', 'fine' and 'sums' one after another."""
    b, no, mc, mf, t = min(lim.batch_size, s.n_half), s.optics_box, s.mc, s.mf, s.n_translations
    # BatchInputs: x_coarse, ctf_coarse; x_fine, xnm_fine, ctf_fine; power_beyond
    inputs = b * (mc * (C64 + F32) + mf * (2 * C64 + F32) + s.n_shells * F64)
    # data.prepare_batch: the read images and their masked copy, both transforms (demodulate may copy both)
    prepare = b * (2 * no * no * F32 + 4 * no * (no // 2 + 1) * C64)
    if s.local:
        # local_coarse_pass, in chunks of at most local_chunk_bytes (estep.local_chunks; their projections are in
        # cache_bytes): per candidate (T,) float64 scores, log-priors and weights; window ids/priors of the batch;
        # the shifted images of block_residuals
        chunk = min(lim.local_chunk_bytes, b * s.n_coarse * t * 3 * F64)
        coarse = chunk + b * s.n_coarse * 3 * I64 + b * t * mc * C64
    else:
        # global_coarse_pass: weighted images (B, T, 2mc) float32 with one complex temporary; coarse_scores: cross
        # float32 and the float64 residual (B, T, U), then the keep mask
        coarse = 2 * b * t * mc * C64 + b * t * s.n_coarse * (F32 + F64 + 1)
    # pass 2: one block per significant pair of n_a x n_b elements; distinct parents, translations and
    # (particle, fine translation) columns as the code forms them, each bounded by what the batch can hold
    n_sig = b * s.significant
    n_ab = s.n_translation_children * s.n_orientation_children
    n_fine = min(n_sig, s.n_grid) * s.n_orientation_children
    n_ph = min(n_sig, t) * s.n_translation_children
    n_jt = min(b * t, n_sig) * s.n_translation_children
    # what the last E-step formed per particle is the better guess when it is known
    if s.fine_rows is not None:
        n_fine = min(n_fine, math.ceil(b * s.fine_rows))
    if s.columns is not None:
        n_jt = min(n_jt, math.ceil(b * s.columns))
    # fine_samples: projections (F, mf) unless the fine cache holds them (the kernels then read it in place) and
    # rotations, phase ramps (R, mf); fine_weights: xw, wn; the weights w
    own_rows = 0 if fine_cached(s, lim) else mf * C64
    fine_kept = n_fine * (own_rows + 9 * F64) + n_ph * mf * C64 + b * mf * (C64 + F32) + n_sig * n_ab * F64
    # block_scores' float64 residual (the cross terms are formed inside its kernel) and the per-block norms
    fine = fine_kept + n_sig * n_ab * F64 + n_sig * s.n_orientation_children * F32
    # batch_sums: the blocks in parent order (order, sorted rows, runs), Σ_t w̄ per (orientation, particle) and its
    # float32 copy; z and q (J, 2mf) float32 (compiled kernels form z and the cross term without temporaries), and
    # a chunk of rows as the code sizes it
    # (the lattice kernel has instead Z and X repeated for the children and its parts' cross terms: the larger of
    # the two is counted)
    # dense products only where the weights can be dense: nonzero weights planned against rows x columns, with a
    # margin of 4 for the bounds n_fine and n_jt are
    dense = n_sig * n_ab >= DENSE_FRACTION / 4 * n_fine * n_jt
    chunk = min(lim.sums_chunk_bytes, n_fine * sums_row_bytes(mf, n_jt, dense))
    per_child = b * mf * s.n_orientation_children
    lattice = 2 * per_child * C64 + lattice_parts(b, mf, s.n_orientation_children) * per_child * F32
    sums = fine_kept + n_sig * 3 * I64 + n_fine * b * (F64 + F32) + max(2 * n_jt * mf * C64, lattice) + chunk
    # Significant: particle, translation, coarse id, log-prior per pair
    return dict(inputs=inputs, significant=n_sig * 4 * I64, prepare=prepare, coarse=coarse, fine=fine, sums=sums)


def sums_row_bytes(m: int, n_cols: int, dense: bool) -> int:
    """Bytes per orientation row of a weighted-sum chunk (estep.batch_sums): dense, the row's projections (2m),
    values (2m), insertion weights and |P|² (m each) float32 and its weights over the columns; sparse, the values
    (2m) and insertion weights (m)."""
    return F32 * (6 * m + n_cols) if dense else F32 * 3 * m


def lattice_parts(nb: int, m: int, n_children: int) -> int:
    """Number of parallel parts of refine.lattice_sums, each with a (B, m·children) float32 cross-term buffer: a
    fixed number (so that sums do not depend on the thread count), fewer when the buffers would exceed
    LATTICE_PART_BYTES together."""
    return int(max(1, min(LATTICE_PARTS, LATTICE_PART_BYTES // max(1, nb * m * n_children * F32))))


def batch_bytes(s: IterationSizes, lim: EStepLimits) -> int:
    """Peak bytes of one E-step batch: what lives through it plus its largest stage."""
    st = batch_stages(s, lim)
    return st["inputs"] + st["significant"] + max(st["prepare"], st["coarse"], st["fine"], st["sums"])


def fine_cached(s: IterationSizes, lim: EStepLimits) -> bool:
    """Whether a global iteration keeps the whole fine grid's projections (refine.estep.ProjectionCache)."""
    return not s.local and s.n_fine_grid * s.mf * C64 <= lim.fine_cache_bytes


def fine_cache_rows(s: IterationSizes, lim: EStepLimits) -> float:
    """Expected rows of the fine cache that a half's batches make resident: k = ceil(n_half / b) batches, each
    projecting r distinct fine orientations (the last E-step's count when known, else as many as its significant
    pairs can reach) out of the grid's G, drawn as independent random subsets: G (1 - (1 - r/G)^k).

    The cache is allocated lazily (refine.estep.lazy_zeros), so rows never projected take no memory; on the small
    set's global iterations this was within 1 % of the union the batches projected (docs/benchmarks.md)."""
    g = s.n_fine_grid
    if g == 0:
        return 0.0
    b = max(1, min(lim.batch_size, s.n_half))
    r = min(b * s.significant, s.n_grid) * s.n_orientation_children
    if s.fine_rows is not None:
        r = min(r, math.ceil(b * s.fine_rows))
    k = math.ceil(s.n_half / b)
    return g * (1.0 - (1.0 - min(r, g) / g) ** k)


def cache_bytes(s: IterationSizes, lim: EStepLimits) -> int:
    """Bytes of one half's projection caches (refine.estep.ProjectionCache): global searches keep the coarse
    projections (complex64 and |P|² float32) and the fine grid's projections (complex64) unless the grid is above
    the cap, of which only the rows the batches project become resident (fine_cache_rows).

    Local searches keep two buffers of window projections (ProjectionCache.local_projections), each as large as the
    largest chunk's distinct orientations: at most half of local_chunk_bytes (estep.local_chunks counts two
    projections per orientation), at most a batch's distinct window orientations (local_batch_windows, when known;
    else its candidates)."""
    if s.local:
        rows = min(lim.batch_size, s.n_half) * s.n_coarse
        if s.window_rows:
            rows = min(rows, s.window_rows)
        return s.n_caches * 2 * min(lim.local_chunk_bytes // 2, rows * s.mc * C64)
    coarse = s.n_coarse * s.mc * (C64 + F32)
    fine = round(fine_cache_rows(s, lim)) * s.mf * C64 if fine_cached(s, lim) else 0
    return s.n_caches * (coarse + fine)


def estimate_peak(s: IterationSizes, lim: EStepLimits) -> MemoryEstimate:
    """The iteration's estimated peak resident memory, by term (bytes)."""
    acc_one = accumulator_bytes(s.box, s.pad, s.data_radius)
    fft = fft_transient_bytes(s.box, s.pad)
    # the final iteration keeps unregularised copies of both halves and reconstructs from their sum
    reconstruction = fft + (3 * acc_one if s.final else 0)
    return MemoryEstimate(
        baseline=BASELINE_BYTES,
        data=s.stack_bytes + s.table_bytes,
        models=3 * s.box ** 3 * F32,               # two half references and the solvent mask
        projectors=2 * projector_bytes(s.box, s.pad, s.projector_radius),
        accumulators=2 * acc_one,
        caches=cache_bytes(s, lim),
        estep_batch=batch_bytes(s, lim),
        reconstruction=reconstruction,
        projector_build=fft)


@dataclass(frozen=True)
class MemoryPlan:
    """The E-step limits of an iteration, the estimate they give and what was lowered to fit the budget."""

    limits: EStepLimits
    estimate: MemoryEstimate
    budget: int
    lowered: str                  # "" when nothing had to change
    fits: bool


def _lower_steps(s: IterationSizes, lim: EStepLimits) -> list[EStepLimits]:
    """Each way of lowering the limits one step: halve the batch, halve both chunk caps, drop the fine cache."""
    out = []
    batch = min(lim.batch_size, max(1, s.n_half))     # a larger batch size than a half holds changes nothing
    if batch > 1:
        out.append(replace(lim, batch_size=batch // 2))
    if max(lim.local_chunk_bytes, lim.sums_chunk_bytes) > MIN_CHUNK_BYTES:
        out.append(replace(lim, local_chunk_bytes=max(MIN_CHUNK_BYTES, lim.local_chunk_bytes // 2),
                           sums_chunk_bytes=max(MIN_CHUNK_BYTES, lim.sums_chunk_bytes // 2)))
    if lim.fine_cache_bytes > 0 and fine_cached(s, lim):
        out.append(replace(lim, fine_cache_bytes=0))
    return out


def describe_lowering(old: EStepLimits, new: EStepLimits) -> str:
    """'--batch_size 64 -> 16, weighted-sum chunks 128 -> 32 MiB, ...' for the limits that changed."""
    parts = []
    if new.batch_size != old.batch_size:
        parts.append(f"--batch_size {old.batch_size} -> {new.batch_size}")
    if new.local_chunk_bytes != old.local_chunk_bytes:
        parts.append(f"local-search chunks {old.local_chunk_bytes // MIB} -> {new.local_chunk_bytes // MIB} MiB")
    if new.sums_chunk_bytes != old.sums_chunk_bytes:
        parts.append(f"weighted-sum chunks {old.sums_chunk_bytes // MIB} -> {new.sums_chunk_bytes // MIB} MiB")
    if new.fine_cache_bytes != old.fine_cache_bytes:
        parts.append("fine-projection cache off (fine projections computed per batch)")
    return ", ".join(parts)


def fit_budget(s: IterationSizes, lim: EStepLimits, budget: int) -> MemoryPlan:
    """Lower the limits one step at a time, each time the step that saves the most, until the estimate fits
    `budget` bytes or no step saves anything; the plan says what changed and whether it fits."""
    start, est = lim, estimate_peak(s, lim)
    while est.peak > budget:
        options = [(estimate_peak(s, cand), cand) for cand in _lower_steps(s, lim)]
        options = [(e, c) for e, c in options if e.peak < est.peak]
        if not options:
            break
        est, lim = min(options, key=lambda ec: ec[0].peak)
    return MemoryPlan(lim, est, budget, describe_lowering(start, lim), est.peak <= budget)


def plan_line(plan: MemoryPlan) -> str:
    """The log line of a plan: the estimate and, when the budget forced it, what was lowered."""
    text = f" Memory: estimated peak {plan.estimate.summary()} this iteration"
    if plan.lowered:
        text += f"; lowered {plan.lowered} to fit the budget of {plan.budget / GIB:.2f} GiB"
    if not plan.fits:
        text += (f"; WARNING: above the budget of {plan.budget / GIB:.2f} GiB even so (nothing left to lower); "
                 f"going on")
    return text


def _array_bytes(obj) -> int:
    """Bytes of the numpy arrays among an object's attributes."""
    return sum(v.nbytes for v in vars(obj).values() if isinstance(v, np.ndarray))


def particle_bytes(data, poses) -> tuple[int, int]:
    """(stack bytes as float32 images, metadata bytes: the table, CTF parameters and the poses of this and the next
    iteration) of a refine.data.ParticleData."""
    boxes = np.array([o.box for o in data.optics], np.int64)[data.optics_index]
    table = int(data.table.particles.memory_usage(deep=True).sum()) + _array_bytes(data.ctf) + 2 * _array_bytes(poses)
    return int((boxes ** 2).sum()) * F32, table


def final_floor(box: int, pad: int, stack_bytes: int, table_bytes: int) -> MemoryEstimate:
    """The part of the final iteration's estimate known before the run, a lower bound: everything but the E-step's
    batch and caches and the projectors (references are projected only to their information limit, which the run
    finds), with the data used to Nyquist."""
    s = IterationSizes(box=box, pad=pad, n_half=0, stack_bytes=stack_bytes, table_bytes=table_bytes,
                       projector_radius=0.0, data_radius=box / 2, optics_box=box, n_shells=box // 2 + 1, mc=0,
                       mf=0, n_translations=0, n_translation_children=0, n_orientation_children=0, n_coarse=0,
                       n_fine_grid=0, n_grid=0, local=True, significant=0, final=True)
    return estimate_peak(s, EStepLimits(1))


def expected_significant(nr_significant: np.ndarray, batch: int, cap: int, cc: bool, after_cc: bool,
                         seen: EStepStats | None = None) -> int:
    """Significant coarse pairs per particle to plan for: 1 in a cross-correlation iteration (hard assignment); the
    mean the last E-step counted when known; else from the previous iteration's counts, the mean plus three standard
    deviations of a batch's mean (a batch of `batch` particles drawn from them: the fullest batch of a half); `cap`
    (--maxsig, or every sample) when no counts exist yet or they come from a cross-correlation iteration."""
    if cc:
        return 1
    if seen is not None:
        return int(min(cap, max(1, math.ceil(seen.blocks))))
    counts = np.asarray(nr_significant, np.float64)
    if after_cc or counts.size == 0 or counts.max() <= 0:
        return cap
    return int(min(cap, math.ceil(counts.mean() + 3 * counts.std() / math.sqrt(max(1, batch)))))


def after_cc_iteration(state) -> bool:
    """True in the iteration after the cross-correlation one: no E-step with posteriors has counted buffers yet."""
    return state.opts.firstiter_cc and state.counters.iteration == 2


def iteration_sizes(state, grid: OrientationGrid, rmax: float, cc: bool,
                    probe: EStepStats | None = None) -> IterationSizes:
    """The sizes of this iteration of a RunState (after its image sizes, reference limit and sampling are set);
    `probe` (expectation.probe_stats) stands in for the last E-step's counts after the cross-correlation iteration."""
    opts, c, data, s = state.opts, state.counters, state.data, state.sampling
    groups = [(og, optics_size(c.current_size, og.box, og.model_scale)) for og in data.optics]
    og, size_o = max(groups, key=lambda g: pixel_set(g[0].box, g[1], g[0].model_scale, g[0].mag).m)
    csize_o = min(size_o, optics_size(c.coarse_size, og.box, og.model_scale))
    mf = pixel_set(og.box, size_o, og.model_scale, og.mag).m
    mc = pixel_set(og.box, csize_o, og.model_scale, og.mag).m
    n_t = len(make_translations(s.offset_range, s.offset_step, og.angpix, s.oversampling, s.perturb).coarse)
    n_grid = len(grid.dir_pix) * grid.n_psi
    window_rows = 0
    if grid.local:
        # this process's share of half 1, as its E-step batches it
        share = state.reducer.share(np.nonzero(data.subset == 1)[0])
        n_coarse, window_rows = local_batch_windows(state.poses, share, grid, s.sigma_ang, opts.batch_size)
    else:
        n_coarse = max(int((m.pdf_direction > 0).sum()) for m in state.models) * grid.n_psi
    cap = n_t * n_coarse if opts.maxsig <= 0 else min(opts.maxsig, n_t * n_coarse)
    after_cc = after_cc_iteration(state)
    seen = None if cc else (probe if after_cc else state.estep_stats)
    halves = [len(state.reducer.share(np.nonzero(data.subset == h)[0])) for h in (1, 2)]
    stack, table = particle_bytes(data, state.poses)
    return IterationSizes(
        box=state.box, pad=opts.pad, n_half=max(halves), stack_bytes=stack, table_bytes=table,
        projector_radius=min(rmax, c.reference_limit) if c.reference_limit > 0 else rmax, data_radius=rmax,
        optics_box=og.box, n_shells=og.box // 2 + 1, mc=mc, mf=mf, n_translations=n_t,
        n_translation_children=4 ** s.oversampling, n_orientation_children=grid.n_children, n_coarse=n_coarse,
        n_fine_grid=0 if grid.local else n_grid * grid.n_children, n_grid=n_grid, local=grid.local,
        significant=expected_significant(state.poses.nr_significant, opts.batch_size, cap, cc, after_cc, seen),
        n_caches=len({o.optics_model.projection_key for o in data.optics}), final=c.has_converged,
        fine_rows=seen.fine_rows if seen else None, columns=seen.columns if seen else None, window_rows=window_rows)


def local_batch_windows(poses, rows: NDArray, grid: OrientationGrid, sigma: float, batch: int,
                        n_sample: int = 8) -> tuple[int, int]:
    """(largest per-particle window, most distinct window orientations of one batch) of a local search, from
    n_sample batches spread over `rows` in the E-step's orientation order (refine.expectation.expectation_half):
    neighbours' windows overlap, so a batch projects far fewer orientations than its particles' windows add up to."""
    if len(rows) == 0:
        return 1, 0
    rows = in_orientation_order(poses, rows, grid.order)
    b = max(1, min(batch, len(rows)))
    largest, distinct = 1, 0
    for start in np.unique(np.linspace(0, len(rows) - b, n_sample).astype(np.int64)):
        sel = rows[start:start + b]
        win = local_window(grid, poses.rot[sel], poses.tilt[sel], poses.psi[sel], sigma)
        largest = max(largest, int(np.diff(win.offsets).max()))
        distinct = max(distinct, int(np.unique(win.ids).size))
    return largest, distinct


def budget_bytes(max_memory_gib: float | None, n_processes: int = 1) -> int:
    """Bytes this process may use: --max_memory, else what it holds plus its share of the machine's MemAvailable
    (shared equally by the processes of a run, as if they were all on this node)."""
    if max_memory_gib is not None:
        return int(max_memory_gib * GIB)
    free = available_bytes()
    if free is None:
        return 2 ** 62
    return (resident_bytes() or 0) + free // max(1, n_processes)


def available_bytes(meminfo: str = "/proc/meminfo") -> int | None:
    """MemAvailable of the machine (bytes), or None where /proc/meminfo does not say."""
    try:
        with open(meminfo) as fh:
            m = re.search(r"^MemAvailable:\s+(\d+)\s*kB", fh.read(), re.M)
    except OSError:
        return None
    return int(m.group(1)) * 1024 if m else None


def resident_bytes(key: str = "VmRSS") -> int | None:
    """This process's resident memory (VmRSS) or its peak so far (VmHWM) in bytes, or None off Linux."""
    try:
        with open("/proc/self/status") as fh:
            m = re.search(rf"^{key}:\s+(\d+)\s*kB", fh.read(), re.M)
    except OSError:
        return None
    return int(m.group(1)) * 1024 if m else None


def peak_bytes() -> int:
    """Peak resident memory of this process so far (bytes): VmHWM, else getrusage's maximum RSS (which can lag
    VmHWM by a few hundred kB on Linux)."""
    peak = resident_bytes("VmHWM")
    if peak is not None:
        return peak
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024      # kB on Linux, bytes on macOS
