"""The auto-refine iteration loop (spec §6.0): for each iteration check convergence, E-step per half,
FSC, M-step per half, update resolution and sampling, write outputs."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from cryorefine.errors import InputError
from cryorefine.fourier import backprojector as bpm
from cryorefine.fourier.aberrations import demodulate, model_ctf  # issue 14: optics aberrations
from cryorefine.fourier.filters import lowpass_raised_cosine, soft_sphere_mask
from cryorefine.fourier.projector import make_projector
from cryorefine.geometry.sampling import angular_step
from cryorefine.geometry.symmetry import symmetry_matrices
from cryorefine.parallel.local import LocalReducer
from cryorefine.parallel.mpi import MpiReducer, get_reducer
from cryorefine.refine import autosampling as autos
from cryorefine.refine import outputs
from cryorefine.refine.accuracy import expected_accuracies
from cryorefine.refine.convergence import has_converged, pose_changes, update_change_counters
from cryorefine.refine.data import ParticleData, column, iter_batches, load_particles, prepare_batch
from cryorefine.refine.estep import BatchInputs, HalfAccumulator, PassSettings, ProjectionCache, expectation_batch
from cryorefine.refine.log import RunLog
from cryorefine.refine.mstep import initial_sigma2, shell_power, update_model_statistics
from cryorefine.refine.orientations import local_window, make_grid, make_translations
from cryorefine.refine.pixels import pixel_set
from cryorefine.refine.reference import load_reference, load_solvent_mask
from cryorefine.refine.restart import iteration_rng
from cryorefine.refine.state import Counters, HalfModel, Poses, RefineOptions, SamplingState


@dataclass
class Run:
    """Everything a running refinement holds."""

    opts: RefineOptions
    data: ParticleData
    box: int
    angpix: float
    sym_mats: NDArray[np.float64]
    solvent_mask: NDArray[np.float32]
    models: list[HalfModel]
    sampling: SamplingState
    counters: Counters
    poses: Poses
    rng: np.random.Generator
    log: RunLog
    reducer: LocalReducer | MpiReducer
    unfiltered: list | None = None      # final iteration: unregularised half maps


def initialise(opts: RefineOptions, log: RunLog, reducer=None) -> Run:
    """Read data and reference, split halves, low-pass the reference, estimate the initial noise (iteration 0)."""
    reducer = reducer or get_reducer()
    data = load_particles(opts.fn_in, None, None, opts.random_seed, opts.ctf)
    box, angpix = data.optics[0].box, data.optics[0].angpix
    if opts.particle_diameter <= 0:
        opts.particle_diameter = (box - opts.maskedge_px) * angpix
    if opts.particle_diameter > box * angpix:
        raise InputError(f"--particle_diameter {opts.particle_diameter:g} A is larger than the box "
                         f"({box} px x {angpix:g} A = {box * angpix:g} A) of {opts.fn_in}")
    sym_mats = symmetry_matrices(opts.sym)
    reference = load_reference(opts.fn_ref, box, angpix, log)
    radius = opts.particle_diameter / (2 * angpix)
    if opts.solvent_mask:
        solvent = load_solvent_mask(opts.solvent_mask, box, angpix)
    else:
        solvent = soft_sphere_mask(box, radius, opts.maskedge_px).astype(np.float32)
    if opts.ini_high > 0:
        reference = lowpass_raised_cosine(reference, angpix, opts.ini_high)
    log.line(f" Particles: {data.n} ({int((data.subset == 1).sum())} in half 1, {int((data.subset == 2).sum())} in "
             f"half 2), box {box} px, {angpix:g} A/px, {len(data.optics)} optics group(s), {len(data.group_names)} "
             f"group(s); symmetry {opts.sym.upper()} ({len(sym_mats)} operators)")
    mem = 2 * bpm.memory_bytes(box, opts.pad) / 2 ** 30
    log.line(f" Memory: the final iteration needs about {mem:.2f} GiB for the two padded accumulators")

    # initial noise spectra from up to nr_parts_sigma2noise particles per optics group (shared by both halves)
    norm0 = column(data.table, "rlnNormCorrection", 1.0)
    sigma2 = {}
    for o, og in enumerate(data.optics):
        rows = np.nonzero(data.optics_index == o)[0][: opts.nr_parts_sigma2noise]
        fts = []
        for chunk in np.array_split(rows, max(1, len(rows) // 256)):
            b = prepare_batch(data, chunk, np.zeros(len(chunk)), np.zeros(len(chunk)), np.ones(len(chunk)),
                              *particle_mask(opts, run_angpix=angpix, angpix=og.angpix))
            fts.append(b.masked if opts.zero_mask else b.unmasked)
        sigma2[o] = initial_sigma2(np.concatenate(fts), og.box)

    order = opts.healpix_order
    local = order >= opts.auto_local_healpix_order
    sampling = SamplingState(order, angular_step(order), opts.offset_range_px * angpix, opts.offset_step_px * angpix,
                             opts.oversampling, local, 2 * angular_step(order + opts.oversampling) if local else 0.0,
                             opts.perturb, 0.0, order, opts.offset_range_px * angpix, opts.offset_step_px * angpix)
    n_dir = len(make_grid(order, opts.sym, sampling.psi_step, opts.oversampling, 0.0, False).dir_pix)
    models = [HalfModel(reference.astype(np.float32).copy(), dict(sigma2), np.full(n_dir, 1.0 / n_dir),
                        opts.sigma_offset_A, 1.0, np.ones(len(data.group_names))) for _ in range(2)]
    counters = Counters(incr_size=opts.incr_size)
    autos.update_current_resolution(counters, None, box, angpix, opts.ini_high if opts.ini_high > 0 else 60.0, True)
    counters.nr_iter_wo_resol_gain = 0
    poses = Poses(column(data.table, "rlnAngleRot", 0.0), column(data.table, "rlnAngleTilt", 0.0),
                  column(data.table, "rlnAnglePsi", 0.0), column(data.table, "rlnOriginXAngst", 0.0),
                  column(data.table, "rlnOriginYAngst", 0.0), norm0, np.zeros(data.n), np.zeros(data.n),
                  np.zeros(data.n, np.int64))
    rng = np.random.default_rng(opts.random_seed)
    return Run(opts, data, box, angpix, sym_mats, solvent, models, sampling, counters, poses, rng, log, reducer)


def run_refinement(run: Run, start_iteration: int = 1) -> None:
    """Iterate until convergence (then one joined iteration to Nyquist) or --auto_iter_max."""
    opts, c, log = run.opts, run.counters, run.log
    if start_iteration == 1 and run.reducer.is_leader:
        outputs.write_iteration(run, 0, final=False)
    it = start_iteration
    while True:
        run.rng = iteration_rng(opts.random_seed, it)
        if has_converged(c, opts.auto_ignore_angles) and not c.has_converged:
            c.has_converged = True
        log.auto(f"Iteration= {it}")
        res_a = 1.0 / c.current_resolution
        log.auto(f"Resolution= {res_a:g} (no gain for {c.nr_iter_wo_resol_gain} iter) ")
        log.auto(f"Changes in angles= {c.changes_orient:g} degrees; and in offsets= {c.changes_offset:g} Angstroms "
                 f"(no gain for {c.nr_iter_wo_large_changes} iter) ")
        if c.has_converged:
            log.auto("Refinement has converged, entering last iteration where two halves will be combined...")
            log.auto("The last iteration will use data to Nyquist frequency, which may take more CPU and RAM.")
        c.iteration = it
        t0 = time.time()
        iterate_once(run, it)
        log.line(f" Iteration {it} took {time.time() - t0:.1f} s")
        if c.has_converged:
            final_messages(run)
            return
        if it >= opts.auto_iter_max:
            log.line(f" Stopped after --auto_iter_max {opts.auto_iter_max} iterations without convergence; "
                     f"no final joined map was made.")
            return
        it += 1


def final_messages(run: Run) -> None:
    """RELION's closing Auto-refine lines."""
    root, log = run.opts.fn_out, run.log
    log.auto("Refinement has converged, stopping now... ")
    log.auto(f"+ Final reconstruction from all particles is saved as: {root}_class001.mrc")
    log.auto(f"+ Final model parameters are stored in: {root}_model.star")
    log.auto(f"+ Final data parameters are stored in: {root}_data.star")
    log.auto(f"+ Final resolution (without masking) is: {1.0 / run.counters.current_resolution:g}")
    log.auto("+ But you may want to run relion_postprocess to mask the unfil.mrc maps and calculate a higher "
             "resolution FSC")


def iterate_once(run: Run, it: int) -> None:
    """One E-step + M-step over both halves."""
    opts, c, s, log = run.opts, run.counters, run.sampling, run.log
    final = c.has_converged
    cc = it == 1 and opts.firstiter_cc
    box, angpix = run.box, run.angpix
    c.current_size, c.coarse_size = autos.image_sizes(c, box, angpix, run.models[0].ave_pmax, final,
                                                     s.healpix_order, opts.particle_diameter)
    rmax = c.current_size / 2
    # References are projected only up to the shell where their half-map FSC fell below 0.143 (or the
    # ini_high edge): beyond it they hold no information, only interpolation leakage and mask ringing of
    # the low resolutions, which noise can be aligned to identically in both halves (Einstein from noise).
    r_ref = reference_information_limit(c, box, angpix, opts.ini_high, it, opts.firstiter_cc)
    projectors = [make_projector(m.volume, pad=opts.pad, r_max=min(rmax, r_ref)) for m in run.models]
    if r_ref < rmax:
        log.line(f" References are used up to {box * angpix / r_ref:.2f} A (shell {r_ref}), where their FSC fell "
                 f"below 0.143; data are used up to {box * angpix / rmax:.2f} A")

    # accuracy estimate on half-1 particles against the half-1 reference (skipped in the CC iteration)
    if not cc:
        run.counters.acc_rot, run.counters.acc_trans = estimate_accuracy(run, projectors[0])
        log.auto(f"Estimated accuracy angles= {c.acc_rot:g} degrees; offsets= {c.acc_trans:g} Angstroms")
        if c.acc_rot > 10:
            log.auto(f"WARNING: Iter = {it} The angular accuracy is worse than 10 degrees, so basically you cannot "
                     f"align your particles (yet)!")
    if it > 1:
        run.sampling, note = autos.update_sampling(opts, s, c, c.acc_rot, c.acc_trans, c.changes_offset)
        if run.sampling.healpix_order != s.healpix_order:
            n_dir = len(make_grid(run.sampling.healpix_order, opts.sym, run.sampling.psi_step, s.oversampling,
                                  0.0, False).dir_pix)
            for m in run.models:
                m.pdf_direction = np.full(n_dir, 1.0 / n_dir)
        s = run.sampling
        c.sampling_note = note
        fine_ang = angular_step(s.healpix_order + s.oversampling)
        log.auto(f"Angular step= {fine_ang:g} degrees; local searches= {'true' if s.local_searches else 'false'}")
        log.auto(f"Offset search range= {s.offset_range:g} Angstroms; offset step= "
                 f"{s.offset_step / 2 ** s.oversampling:g} Angstroms")
        log.line(f" Sampling: {note}")
    else:
        log.line(f" Sampling: iteration 1 uses the initial sampling (HEALPix order {s.healpix_order}, "
                 f"{'local' if s.local_searches else 'global'} searches)")
    # random perturbation of the sampling, once per iteration
    f = s.perturb_factor
    rho = s.perturb + run.rng.uniform(f / 2, f)
    s.perturb = (rho + f) % (2 * f) - f if f > 0 else 0.0
    grid = make_grid(s.healpix_order, opts.sym, s.psi_step, s.oversampling, s.perturb, s.local_searches)
    n_orient = len(grid.dir_pix) * grid.n_psi * grid.n_children
    log.line(f" CurrentResolution= {1.0 / c.current_resolution:g} Angstroms, which requires orientationSampling of "
             f"at least {math.degrees(math.atan(1.0 / (c.current_resolution * opts.particle_diameter / 2))):g} "
             f"degrees for a particle of diameter {opts.particle_diameter:g} Angstroms")
    log.line(f" CurrentImageSize= {c.current_size} CoarseImageSize= {c.coarse_size} "
             f"OrientationalSampling= {angular_step(s.healpix_order + s.oversampling):g} "
             f"NrOrientations= {n_orient if not s.local_searches else 'local'}")
    log.line(f" Expectation iteration {it}{' (cross-correlation, hard assignment)' if cc else ''}")

    new_poses = run.poses.copy()
    accs = []
    t_e = time.time()
    gflop = 0.0
    for h in (1, 2):
        acc = expectation_half(run, h, projectors[h - 1], grid, cc, new_poses, rmax)
        gflop += acc.gflop
        accs.append(acc)
    t_e = time.time() - t_e
    log.line(f" E-step: {t_e:.1f} s, {gflop / max(t_e, 1e-9):.1f} GFLOP/s in the likelihood products"
             + (f" (rank 0 of {run.reducer.size})" if run.reducer.size > 1 else ""))

    # ---- between E and M: sums over processes, symmetry, low-resolution join, FSC ----
    for acc in accs:
        reduce_accumulator(run.reducer, acc)
        bpm.symmetrise(acc.bp, run.sym_mats)
    reduce_poses(run.reducer, new_poses, run.poses, np.concatenate(
        [run.reducer.share(np.nonzero(run.data.subset == h)[0]) for h in (1, 2)]))
    raw = [copy.deepcopy(a.bp) for a in accs] if final else None
    if opts.low_resol_join_halves > 0:
        res_j = max(opts.low_resol_join_halves, 1.0 / c.current_resolution)
        bpm.join_low_resolution(accs[0].bp, accs[1].bp, math.ceil(box * angpix / res_j))
    log.line(" Calculating gold-standard FSC ...")
    fsc = bpm.fsc_halves(accs[0].bp, accs[1].bp)
    c.fsc = fsc
    autos.update_fsc_statistics(c, fsc)

    # ---- M-step ----
    log.line(" Maximization...")
    boxes = {o: og.box for o, og in enumerate(run.data.optics)}
    for h, (m, acc) in enumerate(zip(run.models, accs), start=1):
        counts = np.bincount(run.data.group[run.data.subset == h], minlength=len(run.data.group_names))
        update_model_statistics(m, acc, boxes, counts, opts.norm, opts.scale, opts.min_sigma2_offset, cc)
    if final:
        joined = bpm.add(accs[0].bp, accs[1].bp)
        ss = bpm.ssnr_from_fsc(joined, fsc, opts.tau2_fudge, final=True)
        vol = bpm.reconstruct(joined, tau2=ss["tau2"], tau2_fudge=opts.tau2_fudge)
        for m in run.models:
            m.volume, m.tau2, m.ssnr, m.sigma2_ref, m.coverage = vol, ss["tau2"], ss["ssnr"], ss["sigma2"], ss["coverage"]
        run.unfiltered = [bpm.reconstruct(b, tau2=None) for b in raw]
        ssnr_res = ss["ssnr"]
    else:
        for m, acc in zip(run.models, accs):
            ss = bpm.ssnr_from_fsc(acc.bp, fsc, opts.tau2_fudge, final=False)
            vol = bpm.reconstruct(acc.bp, tau2=ss["tau2"], tau2_fudge=opts.tau2_fudge)
            if cc and opts.ini_high > 0:
                vol = lowpass_raised_cosine(vol, angpix, opts.ini_high)
            if opts.flatten_solvent:
                vol = vol * run.solvent_mask
            m.volume, m.tau2, m.ssnr, m.sigma2_ref, m.coverage = vol.astype(np.float32), ss["tau2"], ss["ssnr"], \
                ss["sigma2"], ss["coverage"]
        ssnr_res = run.models[0].ssnr
    autos.update_current_resolution(c, ssnr_res, box, angpix, opts.ini_high, keep_ini_high=cc)
    if final:
        limit = autos.accuracy_limited_resolution(c.acc_rot, c.acc_trans, opts.particle_diameter)
        if limit > 1.0 / c.current_resolution:
            log.line(f" WARNING: the half-map FSC suggests {1.0 / c.current_resolution:.2f} A, but the estimated "
                     f"alignment accuracy ({c.acc_rot:g} deg, {c.acc_trans:g} A) cannot resolve better than "
                     f"{limit:.2f} A; the FSC only reflects the shared starting reference. Reporting {limit:.2f} A.")
            c.current_resolution = 1.0 / limit

    # hidden-variable changes of this iteration
    d_ang, d_off = pose_changes(run.poses, new_poses, run.sym_mats)
    update_change_counters(c, d_ang, d_off, angular_step(s.healpix_order + s.oversampling),
                           s.offset_step / 2 ** s.oversampling)
    run.poses = new_poses
    if run.reducer.is_leader:
        outputs.write_iteration(run, it, final=final)


def particle_mask(opts: RefineOptions, run_angpix: float, angpix: float) -> tuple[float, float]:
    """(radius, soft edge) in px of an optics group of the particle mask applied before the likelihood.

    Its soft edge starts where the references' solvent mask ends (D/2 + maskedge), so reference projections
    lie where the mask is 1: otherwise the likelihood sees mask-edge products of the reference, whose high
    frequencies noise images can be aligned to in both halves alike.
    """
    return opts.particle_diameter / (2 * angpix) + opts.maskedge_px * run_angpix / angpix, opts.maskedge_px


def reference_information_limit(c: Counters, box: int, angpix: float, ini_high: float, it: int,
                                firstiter_cc: bool) -> int:
    """Last shell of the references with information: the ini_high edge while the references are the
    low-passed start (iteration 1, and 2 after a CC iteration), else the first shell with half-map FSC < 0.143."""
    if c.fsc is None or (firstiter_cc and it <= 2):
        return int(math.floor(box * angpix / ini_high + 1)) if ini_high > 0 else box // 2
    return min(box // 2, autos.first_below(c.fsc, 0.143))


def reduce_accumulator(reducer, acc: HalfAccumulator) -> None:
    """Sum one half's accumulators over processes (identity in a single process)."""
    if reducer.size == 1:
        return
    reducer.sum_array(acc.bp.data)
    reducer.sum_array(acc.bp.weight)
    for o in sorted(acc.sigma2_num):
        reducer.sum_array(acc.sigma2_num[o])
        acc.sigma2_wsum[o] = reducer.sum_scalar(acc.sigma2_wsum.get(o, 0.0))
    for a in (acc.scale_num, acc.scale_den, acc.pdf):
        reducer.sum_array(a)
    for name in ("offset_num", "wsum", "norm_sum", "ll_sum", "pmax_sum", "count", "gflop"):
        setattr(acc, name, reducer.sum_scalar(getattr(acc, name)))


def reduce_poses(reducer, new: Poses, old: Poses, own_rows: NDArray[np.int64]) -> None:
    """Give every process the poses that all processes found (each row belongs to exactly one process)."""
    if reducer.size == 1:
        return
    for name in ("rot", "tilt", "psi", "origin_x", "origin_y", "norm_correction", "log_likelihood", "max_prob",
                 "nr_significant"):
        a = getattr(new, name)
        mine = np.zeros_like(a)
        mine[own_rows] = a[own_rows]
        setattr(new, name, reducer.sum_array(mine))


def estimate_accuracy(run: Run, proj) -> tuple[float, float]:
    """Accuracy of rotations (deg) and translations (Å) on the first 100 half-1 particles (spec §5.1)."""
    rows = np.nonzero(run.data.subset == 1)[0]
    rows = rows[run.data.optics_index[rows] == 0][:100]
    og = run.data.optics[0]
    ps = pixel_set(og.box, run.counters.current_size, og.model_scale, og.mag)  # issue 14: + og.mag
    ctf = _ctf(run, rows, ps)
    isig = 1.0 / run.models[0].sigma2[0]
    return expected_accuracies(proj, ps, ctf, isig, run.poses.rot[rows], run.poses.tilt[rows], run.poses.psi[rows],
                               og.angpix, run.rng)


def _ctf(run: Run, rows: NDArray[np.int64], ps) -> NDArray[np.float32]:
    """CTF values (n, m) on a pixel set, or ones without --ctf (CTF(M k) with even Zernikes, |CTF| for
    phase-flipped data, CTF² for premultiplied data: fourier.aberrations.model_ctf)."""
    if not run.opts.ctf:
        return np.ones((len(rows), ps.m), np.float32)
    og = run.data.optics[int(run.data.optics_index[rows[0]])]
    # issue 14: optics aberrations (was ctf_values(..., ps.kx, ps.ky, og.box, og.angpix))
    return model_ctf(run.data.ctf.subset(rows), og.optics_model, ps.kx, ps.ky).astype(np.float32)


def expectation_half(run: Run, half: int, proj, grid, cc: bool, new_poses: Poses, rmax: float) -> HalfAccumulator:
    """E-step over this process's share of one half; returns the accumulated sums."""
    opts, c, data, model = run.opts, run.counters, run.data, run.models[half - 1]
    rows_half = run.reducer.share(np.nonzero(data.subset == half)[0])
    bp = bpm.make_backprojector(run.box, pad=opts.pad, r_max=rmax)
    acc = HalfAccumulator(bp, {o: np.zeros(og.box // 2 + 1) for o, og in enumerate(data.optics)}, {},
                          np.zeros(len(data.group_names)), np.zeros(len(data.group_names)),
                          pdf=np.zeros(len(grid.dir_pix)) if not grid.local else np.zeros(0))
    scale_shells = None
    if opts.scale and len(data.group_names) > 1 and model.ssnr is not None:
        scale_shells = model.ssnr > 3
    log_pdf = None
    if not grid.local:
        with np.errstate(divide="ignore"):
            log_pdf = np.log(model.pdf_direction)
    caches: dict[tuple, ProjectionCache] = {}   # issue 14: one per (box, angpix, mag matrix), not per group
    prior_x = column(data.table, "rlnOriginXPriorAngst", 0.0)
    prior_y = column(data.table, "rlnOriginYPriorAngst", 0.0)
    with run.log.progress(f"E-step half {half}", len(rows_half)) as advance:
        for rows in iter_batches(rows_half, data.optics_index, opts.batch_size):
            o = int(data.optics_index[rows[0]])
            og = data.optics[o]
            size_o = min(og.box, 2 * math.ceil(0.5 * c.current_size / og.model_scale))
            csize_o = min(size_o, 2 * math.ceil(0.5 * c.coarse_size / og.model_scale))
            ps_f = pixel_set(og.box, size_o, og.model_scale, og.mag)    # issue 14: + og.mag
            ps_c = pixel_set(og.box, csize_o, og.model_scale, og.mag)   # issue 14: + og.mag
            shells_o = len(model.sigma2[o])
            if scale_shells is not None:
                sc = np.zeros(shells_o, bool)
                n = min(shells_o, len(scale_shells))
                sc[:n] = scale_shells[:n]
            else:
                sc = None

            norm_factor = (model.norm_average / run.poses.norm_correction[rows]) if opts.norm else np.ones(len(rows))
            prep = prepare_batch(data, rows, run.poses.origin_x[rows], run.poses.origin_y[rows], norm_factor,
                                 *particle_mask(opts, run.angpix, og.angpix))
            # issue 14: odd aberrations (beam tilt, odd Zernikes) demodulated from the data, as RELION does
            flat_m = demodulate(prep.masked, og.optics_model).reshape(len(rows), -1)
            flat_u = demodulate(prep.unmasked, og.optics_model).reshape(len(rows), -1)
            power = shell_power(prep.masked, og.box)
            power[:, : size_o // 2 + 1] = 0.0
            scale = model.group_scales[data.group[rows]] if model.group_scales is not None else np.ones(len(rows))
            inp = BatchInputs(rows, o, og.angpix, flat_m[:, ps_c.flat], flat_m[:, ps_f.flat], flat_u[:, ps_f.flat],
                              power, _ctf(run, rows, ps_c), _ctf(run, rows, ps_f), scale, data.group[rows],
                              prep.preshift_px, np.stack([prior_x[rows], prior_y[rows]], -1),
                              run.poses.norm_correction[rows])
            local = None
            if grid.local:
                local = local_window(grid, run.poses.rot[rows], run.poses.tilt[rows], run.poses.psi[rows],
                                     run.sampling.sigma_ang)
            key = og.optics_model.projection_key    # issue 14: groups with equal key share projections
            if key not in caches:
                caches[key] = ProjectionCache(proj, grid, ps_c, ps_f)
            st = PassSettings(grid, make_translations(run.sampling.offset_range, run.sampling.offset_step, og.angpix,
                                                      run.sampling.oversampling, run.sampling.perturb),
                              ps_c, ps_f, 1.0 / model.sigma2[o], opts.adaptive_fraction, cc, model.sigma_offset,
                              log_pdf, local, sc, model.norm_average, opts.maxsig, caches[key])
            res = expectation_batch(inp, proj, st, acc)
            new_poses.rot[rows], new_poses.tilt[rows], new_poses.psi[rows] = res.rot, res.tilt, res.psi
            new_poses.origin_x[rows], new_poses.origin_y[rows] = res.origin_x, res.origin_y
            if opts.norm:
                new_poses.norm_correction[rows] = res.norm
            new_poses.log_likelihood[rows] = res.log_likelihood
            new_poses.max_prob[rows] = res.max_prob
            new_poses.nr_significant[rows] = res.nr_significant
            advance(len(rows))
    return acc
