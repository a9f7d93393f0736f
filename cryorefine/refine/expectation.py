"""The E-step over this process's share of one half: particles in batches of one optics group, each prepared
(read, norm-corrected, pre-shifted, masked, transformed, CTF) and passed to estep.expectation_batch."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from cryorefine.fourier.aberrations import demodulate
from cryorefine.fourier.projector import Projector
from cryorefine.refine.data import background_noise, ctf_on_pixels, column, iter_batches, prepare_batch
from cryorefine.refine.estep import (BatchInputs, HalfAccumulator, PassSettings, ProjectionCache, empty_accumulator,
                                     expectation_batch, global_coarse_pass, local_coarse_pass)
from cryorefine.refine.memory import EStepLimits, EStepStats
from cryorefine.refine.mstep import shell_power
from cryorefine.refine.orientations import OrientationGrid, in_orientation_order, local_window, make_translations
from cryorefine.refine.pixels import optics_size, pixel_set
from cryorefine.refine.state import HalfModel, Poses, RefineOptions, RunState


def particle_mask(opts: RefineOptions, run_angpix: float, angpix: float) -> tuple[float, float]:
    """(radius, soft edge) in px of an optics group of the particle mask applied before the likelihood.

    Its soft edge starts where the references' solvent mask ends (D/2 + maskedge), so reference projections
    lie where the mask is 1: otherwise the likelihood sees mask-edge products of the reference, whose high
    frequencies noise images can be aligned to in both halves alike.
    """
    return opts.particle_diameter / (2 * angpix) + opts.maskedge_px * run_angpix / angpix, opts.maskedge_px


def group_scale_shells(opts: RefineOptions, model: HalfModel, n_groups: int, n_shells: int) -> NDArray | None:
    """Shells (SSNR > 3) of an optics box used for the group-scale update; None when scales are not refined."""
    if not (opts.scale and n_groups > 1 and model.ssnr is not None):
        return None
    sc = np.zeros(n_shells, bool)
    n = min(n_shells, len(model.ssnr))
    sc[:n] = model.ssnr[:n] > 3
    return sc


def batch_inputs(state: RunState, rows: NDArray[np.int64], model: HalfModel, size: int, coarse_size: int,
                 prior: NDArray[np.float64]) -> BatchInputs:
    """Read and prepare a batch of one optics group on its coarse and fine pixel sets (spec §2.1); outside the
    particle mask the background mean (--zero_mask) or coloured noise of the half's σ² (--no_zero_mask)."""
    opts, data, poses = state.opts, state.data, state.poses
    o = int(data.optics_index[rows[0]])
    og = data.optics[o]
    ps_f = pixel_set(og.box, size, og.model_scale, og.mag)
    ps_c = pixel_set(og.box, coarse_size, og.model_scale, og.mag)
    norm_factor = (model.norm_average / poses.norm_correction[rows]) if opts.norm else np.ones(len(rows))
    noise = None if opts.zero_mask else background_noise(model.sigma2[o], og.box, rows, opts.random_seed,
                                                         state.counters.iteration)
    prep = prepare_batch(data, rows, poses.origin_x[rows], poses.origin_y[rows], norm_factor,
                         *particle_mask(opts, state.angpix, og.angpix), noise=noise)
    # odd aberrations (beam tilt, odd Zernikes) are demodulated from the data, as RELION does
    flat_m = demodulate(prep.masked, og.optics_model).reshape(len(rows), -1)
    flat_u = demodulate(prep.unmasked, og.optics_model).reshape(len(rows), -1)
    power = shell_power(prep.masked, og.box)
    power[:, : size // 2 + 1] = 0.0
    scale = model.group_scales[data.group[rows]] if model.group_scales is not None else np.ones(len(rows))
    return BatchInputs(
        rows=rows, optics=o, angpix=og.angpix, x_coarse=flat_m[:, ps_c.flat],
        x_fine=flat_m[:, ps_f.flat], xnm_fine=flat_u[:, ps_f.flat], power_beyond=power,
        ctf_coarse=ctf_on_pixels(data, rows, ps_c.kx, ps_c.ky, opts.ctf),
        ctf_fine=ctf_on_pixels(data, rows, ps_f.kx, ps_f.ky, opts.ctf), scale=scale, group=data.group[rows],
        preshift_px=prep.preshift_px, prior_mu=prior[rows], old_norm=poses.norm_correction[rows])


def half_rows(state: RunState, half: int) -> NDArray[np.int64]:
    """This process's share of one half's particle rows."""
    return state.reducer.share(np.nonzero(state.data.subset == half)[0])


def half_batches(state: RunState, half: int, rows_half: NDArray[np.int64], proj: Projector, grid: OrientationGrid,
                 cc: bool, rmax: float, limits: EStepLimits, note=None):
    """Yield (rows, BatchInputs, PassSettings) for the batches of rows_half (particles of one half), in order;
    `note(line)` is told when an optics group's fine projections are too large to cache."""
    opts, c, data, model = state.opts, state.counters, state.data, state.models[half - 1]
    log_pdf = None
    if not grid.local:
        with np.errstate(divide="ignore"):
            log_pdf = np.log(model.pdf_direction)
    caches: dict[tuple, ProjectionCache] = {}     # groups with equal box, pixel size and mag matrix share one
    prior = np.stack([column(data.table, "rlnOriginXPriorAngst", 0.0),
                      column(data.table, "rlnOriginYPriorAngst", 0.0)], -1)
    s = state.sampling
    for rows in iter_batches(rows_half, data.optics_index, limits.batch_size):
        o = int(data.optics_index[rows[0]])
        og = data.optics[o]
        size_o = optics_size(c.current_size, og.box, og.model_scale)
        csize_o = min(size_o, optics_size(c.coarse_size, og.box, og.model_scale))
        inp = batch_inputs(state, rows, model, size_o, csize_o, prior)
        ps_f = pixel_set(og.box, size_o, og.model_scale, og.mag)
        ps_c = pixel_set(og.box, csize_o, og.model_scale, og.mag)
        key = og.optics_model.projection_key
        if key not in caches:
            caches[key] = ProjectionCache(proj, grid, ps_c, ps_f, state.backend.project, limits.fine_cache_bytes)
            if not grid.local and caches[key].fine is None and note is not None:
                n_fine = len(grid.dir_pix) * grid.n_psi * grid.n_children
                note(f" Fine projections of optics group {og.number} are not cached (they would take "
                     f"{n_fine * ps_f.m * 8 / 2 ** 30:.1f} GiB, above the cap of "
                     f"{limits.fine_cache_bytes / 2 ** 30:.1f} GiB): they are computed per batch")
        local = None
        if grid.local:
            local = local_window(grid, state.poses.rot[rows], state.poses.tilt[rows], state.poses.psi[rows],
                                 s.sigma_ang)
        st = PassSettings(
            grid=grid, translations=make_translations(s.offset_range, s.offset_step, og.angpix, s.oversampling,
                                                      s.perturb),
            ps_coarse=ps_c, ps_fine=ps_f, inv_sigma2=1.0 / model.sigma2[o], adaptive_fraction=opts.adaptive_fraction,
            cc_mode=cc, sigma_offset=model.sigma_offset, log_pdf_direction=log_pdf, local=local,
            scale_shells=group_scale_shells(opts, model, len(data.group_names), len(model.sigma2[o])),
            norm_average=model.norm_average, maxsig=opts.maxsig, cache=caches[key], limits=limits)
        yield rows, inp, st


def expectation_half(state: RunState, half: int, proj: Projector, grid: OrientationGrid, cc: bool,
                     new_poses: Poses, rmax: float, limits: EStepLimits | None = None) -> HalfAccumulator:
    """E-step over this process's share of one half in batches and buffers bounded by `limits` (the iteration's
    memory plan; default: --batch_size and the default caps): writes the new poses of its rows, returns its sums."""
    opts, data = state.opts, state.data
    limits = limits or EStepLimits(opts.batch_size)
    acc = empty_accumulator(state.box, opts.pad, rmax, [og.box for og in data.optics], len(data.group_names),
                            0 if grid.local else len(grid.dir_pix))
    rows_half = half_rows(state, half)
    if grid.local:
        # batches of neighbouring orientations share window projections, fine orientations and insertions (global
        # searches share the coarse set anyway, and keep file order: each stack is then read once)
        rows_half = in_orientation_order(state.poses, rows_half, grid.order)
    with state.log.progress(f"E-step half {half}", len(rows_half)) as advance:
        for rows, inp, st in half_batches(state, half, rows_half, proj, grid, cc, rmax, limits, note=state.log.line):
            batch = expectation_batch(inp, st, acc, state.backend)
            if not opts.norm:
                batch.norm_correction[:] = state.poses.norm_correction[rows]
            new_poses.assign(rows, batch)
            advance(len(rows))
    state.backend.finish(acc.bp)
    return acc


def probe_stats(state: RunState, proj: Projector, grid: OrientationGrid, rmax: float, limits: EStepLimits,
                rng: np.random.Generator) -> EStepStats | None:
    """Pass 1 of one batch of this process's half-1 particles drawn at random, for the memory plan of an iteration
    no earlier E-step has counted (the one after the cross-correlation iteration): per particle, the significant
    coarse pairs, the fine orientations pass 2 would project and its (particle, fine translation) columns, as
    memory.observed_stats counts them. At random because a file's first particles share micrographs and defocus.
    None when the half is empty here."""
    share = half_rows(state, 1)
    if len(share) == 0:
        return None
    rows = np.sort(rng.choice(share, size=min(limits.batch_size, len(share)), replace=False))
    n = np.zeros(4)            # particles, significant pairs, fine rows, columns
    # a throw-away accumulator without a reconstruction grid: pass 1 only counts its GFLOP
    acc = empty_accumulator(state.box, state.opts.pad, 1, [og.box for og in state.data.optics],
                            len(state.data.group_names), 0)
    for batch, inp, st in half_batches(state, 1, rows, proj, grid, False, rmax, limits):
        coarse_pass = global_coarse_pass if st.local is None else local_coarse_pass
        sig = coarse_pass(inp, st, st.cache, state.backend, acc)
        n_t, n_tch = len(st.translations.coarse), 4 ** state.sampling.oversampling
        n += (len(batch), len(sig.img), np.unique(sig.cid).size * grid.n_children,
              np.unique(sig.img * n_t + sig.t).size * n_tch)
    return EStepStats(blocks=n[1] / n[0], fine_rows=n[2] / n[0], columns=n[3] / n[0])


def gather_poses(reducer, poses: Poses, own_rows: NDArray[np.int64]) -> None:
    """Give every process the poses that all processes found (each row belongs to exactly one process)."""
    if reducer.size == 1:
        return
    for name in poses.__dataclass_fields__:
        a = getattr(poses, name)
        mine = np.zeros_like(a)
        mine[own_rows] = a[own_rows]
        getattr(poses, name)[:] = reducer.sum_array(mine)
