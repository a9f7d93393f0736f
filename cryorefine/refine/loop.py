"""The auto-refine iteration loop (spec §6.0), the algorithm box of the method:

    for each iteration: check convergence -> image sizes and references -> accuracy and sampling ->
    E-step per half -> sums over processes, symmetry, join, gold-standard FSC -> M-step per half ->
    resolution and hidden-variable changes -> outputs

Each step is a function from the RunState to a new one; the loop is the only writer of RunState.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import replace

import numpy as np

from cryorefine.fourier import backprojector as bpm
from cryorefine.fourier.fsc import fsc_sigma, masked_corrected_fsc
from cryorefine.geometry.sampling import angular_step, n_directions
from cryorefine.refine import autosampling as autos
from cryorefine.refine import counters as cnt
from cryorefine.refine import memory, mstep, outputs
from cryorefine.refine.accuracy import estimate_accuracy
from cryorefine.refine.convergence import pose_changes
from cryorefine.refine.estep import HalfAccumulator
from cryorefine.refine.expectation import expectation_half, gather_poses, half_rows, probe_stats
from cryorefine.refine.orientations import make_grid
from cryorefine.refine.restart import iteration_rng
from cryorefine.refine.state import Counters, RunState
from cryorefine.refine.timing import time_line
from cryorefine.report import BackgroundReport


def run_refinement(state: RunState) -> RunState:
    """Iterate from state.start_iteration until convergence (then one joined iteration to Nyquist) or
    --auto_iter_max; returns the last state."""
    if state.start_iteration == 1 and state.reducer.is_leader:
        outputs.write_iteration(state, 0, final=False)
    it = state.start_iteration
    report = BackgroundReport()
    try:
        state = _iterate(state, it, report)
    except BaseException:
        report.close(state.log.line, timeout=0.0)     # stopped: the page is not wanted, nor a wait for it
        raise
    report.close(state.log.line, superseded=True)       # the caller draws the final page next
    return state


def _iterate(state: RunState, it: int, report: BackgroundReport) -> RunState:
    """The loop of run_refinement from iteration `it`; the page is redrawn in the background after each."""
    opts = state.opts
    while True:
        state = replace(state, counters=cnt.with_convergence(state.counters, opts.auto_ignore_angles))
        log_iteration_start(state, it)
        t0 = time.time()
        state = iterate_once(state, it)
        state.log.line(f" Iteration {it} took {time.time() - t0:.1f} s")
        state.log.line(f" Memory: measured peak {memory.peak_bytes() / memory.GIB:.2f} GiB so far")
        note = state.backend.memory_note()
        if note:
            state.log.line(f" {note}")
        if state.counters.has_converged:
            final_messages(state)
            return state
        if it >= opts.auto_iter_max:
            state.log.line(f" Stopped after --auto_iter_max {opts.auto_iter_max} iterations without convergence; "
                           f"no final joined map was made.")
            return state
        if state.reducer.is_leader:      # (the last iteration's page is drawn by the caller, in the process)
            report.maybe_refresh(opts.fn_out, state.log.line)
        it += 1


def iterate_once(state: RunState, it: int) -> RunState:
    """One E-step + M-step over both halves."""
    rng = iteration_rng(state.opts.random_seed, it)
    final = state.counters.has_converged
    cc = it == 1 and state.opts.firstiter_cc
    clock = state.clock
    state = with_image_sizes(state, it, final)
    with clock.phase("references"):
        state, projectors, rmax = references(state, it)
    if not cc:
        with clock.phase("accuracy"):
            state = with_accuracy(state, projectors[0], rng, it)
    if it > 1:
        state = with_next_sampling(state)
    else:
        s = state.sampling
        state.log.line(f" Sampling: iteration 1 uses the initial sampling (HEALPix order {s.healpix_order}, "
                       f"{'local' if s.local_searches else 'global'} searches)")
    state = replace(state, sampling=autos.perturbed(state.sampling, rng))
    grid = log_search(state, it, cc)
    probe = None
    if memory.after_cc_iteration(state):
        with clock.phase("E-step"):
            probe = probe_stats(state, projectors[0], grid, rmax, memory.EStepLimits(state.opts.batch_size), rng)
        if probe is not None:
            state.log.line(f" Memory: planned from pass 1 of a batch (up to {state.opts.batch_size}) of random "
                           f"half-1 particles (no earlier E-step counted them): per particle {probe.blocks:.0f} "
                           f"significant coarse samples, {probe.fine_rows:.0f} fine orientations, "
                           f"{probe.columns:.0f} fine translations")
    plan = memory_plan(state, grid, cc, rmax, probe)
    with clock.phase("E-step"):
        new_poses, accs = expectation(state, projectors, grid, cc, rmax, plan.limits)
    state = replace(state, estep_stats=None if cc else memory.observed_stats(accs))
    raw = [copy.deepcopy(a.bp) for a in accs] if final and state.reducer.is_leader else None
    with clock.phase("FSC"):
        fsc, null_sigma, fsc_maps = gold_standard_fsc(state, accs)
    state = replace(state, counters=cnt.with_fsc(state.counters, fsc, null_sigma), fsc_maps=fsc_maps)
    accs = [a if reconstructs(state.reducer, h, final) else replace(a, bp=None) for h, a in enumerate(accs, start=1)]
    with clock.phase("M-step"):
        state = maximization(state, accs, fsc, final, cc, raw)
    state = with_pose_changes(state, new_poses)
    if state.reducer.is_leader:
        with clock.phase("output"):
            outputs.write_iteration(state, it, final=final)
    state.log.line(time_line(*clock.take()))
    return state


def log_iteration_start(state: RunState, it: int) -> None:
    """RELION's Auto-refine lines at the start of an iteration."""
    c, log = state.counters, state.log
    log.auto(f"Iteration= {it}")
    log.auto(f"Resolution= {1.0 / c.current_resolution:g} (no gain for {c.nr_iter_wo_resol_gain} iter) ")
    log.auto(f"Changes in angles= {c.changes_orient:g} degrees; and in offsets= {c.changes_offset:g} Angstroms "
             f"(no gain for {c.nr_iter_wo_large_changes} iter) ")
    if c.has_converged:
        log.auto("Refinement has converged, entering last iteration where two halves will be combined...")
        log.auto("The last iteration will use data to Nyquist frequency, which may take more CPU and RAM.")


def with_image_sizes(state: RunState, it: int, final: bool) -> RunState:
    """The current and coarse image sizes of this iteration (§2.5, §3.8)."""
    c, s = state.counters, state.sampling
    size, coarse = autos.image_sizes(c, state.box, state.angpix, state.models[0].ave_pmax, final, s.healpix_order,
                                     state.opts.particle_diameter)
    return replace(state, counters=cnt.with_iteration(c, it, size, coarse))


def references(state: RunState, it: int) -> tuple[RunState, list, float]:
    """The state with this iteration's reference limit, projectors of the two half references and the data radius
    r_max (px) of this iteration.

    References are projected only up to where their half-map FSC shows information (counters.reference_limit):
    beyond it they hold only interpolation leakage and mask ringing of the low resolutions, which noise can be
    aligned to identically in both halves (Einstein from noise).
    """
    opts, c = state.opts, state.counters
    rmax = c.current_size / 2
    low_passed = c.fsc is None or (opts.firstiter_cc and it <= 2)
    ini_edge = float(math.floor(state.box * state.angpix / opts.ini_high + 1)) if opts.ini_high > 0 else state.box // 2
    threshold = chance_threshold(state, c.fsc_null_sigma)
    c = cnt.with_reference_limit(c, None if low_passed else c.fsc, threshold, ini_edge)
    r_ref = c.reference_limit
    projectors = [state.backend.make_projector(m.volume, pad=opts.pad, r_max=min(rmax, r_ref)) for m in state.models]
    if r_ref < rmax:
        state.log.line(f" References are used up to {state.box * state.angpix / r_ref:.2f} A (shell {r_ref:g}), where "
                       f"their FSC shows information; data are used up to {state.box * state.angpix / rmax:.2f} A")
    return replace(state, counters=c), projectors, rmax


def chance_threshold(state: RunState, null_sigma: np.ndarray | None, k: float = 3.0) -> np.ndarray:
    """Per shell, the FSC significantly above chance: max(0.143, min(kσ, 0.9)), σ the larger of 1/√n for this box
    and symmetry and the spread measured on the half maps (counters.information_threshold)."""
    return cnt.information_threshold(fsc_sigma(state.box, len(state.sym_mats)), null_sigma, k)


def with_accuracy(state: RunState, proj, rng: np.random.Generator, it: int) -> RunState:
    """Estimate the angular and translational accuracies on half-1 particles against the half-1 reference."""
    acc_rot, acc_trans = estimate_accuracy(state, proj, rng)
    state.log.auto(f"Estimated accuracy angles= {acc_rot:g} degrees; offsets= {acc_trans:g} Angstroms")
    if acc_rot > 10:
        state.log.auto(f"WARNING: Iter = {it} The angular accuracy is worse than 10 degrees, so basically you "
                       f"cannot align your particles (yet)!")
        # RELION's three lines that follow (ml_optimiser.cpp), word for word
        state.log.auto("WARNING: You probably need not worry if the accuracy improves during the next few "
                       "iterations.")
        state.log.auto("WARNING: However, if the problem persists it may lead to spurious FSC curves, so be wary of "
                       "inflated resolution estimates...")
        state.log.auto("WARNING: Sometimes it is better to tune resolution yourself by adjusting T in a "
                       "3D-classification with a single class.")
    return replace(state, counters=cnt.with_accuracy(state.counters, acc_rot, acc_trans))


def with_next_sampling(state: RunState) -> RunState:
    """The automatic sampling update (§5.3–§5.5): a finer grid resets the direction priors."""
    opts, old = state.opts, state.sampling
    s, decision = autos.next_sampling(opts, old, state.counters)
    models = state.models
    if s.healpix_order != old.healpix_order:
        n_dir = n_directions(s.healpix_order, opts.sym)
        models = tuple(mstep.with_uniform_directions(m, n_dir) for m in models)
    log = state.log
    log.auto(f"Angular step= {angular_step(s.healpix_order + s.oversampling):g} degrees; local searches= "
             f"{'true' if s.local_searches else 'false'}")
    log.auto(f"Offset search range= {s.offset_range:g} Angstroms; offset step= "
             f"{s.offset_step / 2 ** s.oversampling:g} Angstroms")
    log.line(f" Sampling: {decision.note}")
    return replace(state, sampling=s, models=models,
                   counters=cnt.with_sampling_decision(state.counters, decision))


def log_search(state: RunState, it: int, cc: bool):
    """The orientation grid of this iteration, with RELION's lines on resolution and sampling."""
    opts, c, s, log = state.opts, state.counters, state.sampling, state.log
    grid = make_grid(s.healpix_order, opts.sym, s.psi_step, s.oversampling, s.perturb, s.local_searches)
    n_orient = len(grid.dir_pix) * grid.n_psi * grid.n_children
    log.line(f" CurrentResolution= {1.0 / c.current_resolution:g} Angstroms, which requires orientationSampling of "
             f"at least {autos.resolution_angular_step(opts.particle_diameter, c.current_resolution):g} "
             f"degrees for a particle of diameter {opts.particle_diameter:g} Angstroms")
    log.line(f" CurrentImageSize= {c.current_size} CoarseImageSize= {c.coarse_size} "
             f"OrientationalSampling= {angular_step(s.healpix_order + s.oversampling):g} "
             f"NrOrientations= {n_orient if not s.local_searches else 'local'}")
    log.line(f" Expectation iteration {it}{' (cross-correlation, hard assignment)' if cc else ''}")
    return grid


def memory_plan(state: RunState, grid, cc: bool, rmax: float, probe=None) -> memory.MemoryPlan:
    """The iteration's estimated peak memory, and the E-step limits (from --batch_size) lowered until it fits
    --max_memory or the memory available; loudly before the final iteration, as RELION warns of its RAM. `probe`:
    pass 1 of a random batch, for the iteration after the cross-correlation one."""
    sizes = memory.iteration_sizes(state, grid, rmax, cc, probe)
    budget = memory.budget_bytes(state.opts.max_memory_gib, state.reducer.size)
    plan = memory.fit_budget(sizes, memory.EStepLimits(state.opts.batch_size), budget)
    state.log.line(memory.plan_line(plan))
    if sizes.final:
        state.log.auto(f"The last iteration is estimated to need {plan.estimate.peak / memory.GIB:.2f} GiB of memory "
                       f"per process (budget {budget / memory.GIB:.2f} GiB)"
                       + ("" if plan.fits else "; WARNING: that is more than the budget"))
    return plan


def expectation(state: RunState, projectors: list, grid, cc: bool, rmax: float, limits: memory.EStepLimits):
    """E-step of both halves in batches bounded by `limits`; returns every process's new poses and each half's sums
    over all processes (symmetrised)."""
    new_poses = state.poses.copy()
    t_e = time.time()
    accs = [expectation_half(state, h, projectors[h - 1], grid, cc, new_poses, rmax, limits) for h in (1, 2)]
    t_e = time.time() - t_e
    gflop = sum(a.gflop for a in accs)
    state.log.line(f" E-step: {t_e:.1f} s, {gflop / max(t_e, 1e-9):.1f} GFLOP/s in the likelihood products"
                   + (f" (rank 0 of {state.reducer.size})" if state.reducer.size > 1 else ""))
    for acc in accs:
        acc.reduce(state.reducer)
        bpm.symmetrise(acc.bp, state.sym_mats)
    gather_poses(state.reducer, new_poses, np.concatenate([half_rows(state, h) for h in (1, 2)]))
    if state.opts.maxsig > 0 and not cc:
        n_hit = int((new_poses.nr_significant >= state.opts.maxsig).sum())
        state.log.line(f" --maxsig {state.opts.maxsig}: {n_hit} of {len(new_poses.nr_significant)} particles reached "
                       "the cap on significant coarse samples")
    return new_poses, accs


def gold_standard_fsc(state: RunState, accs: list[HalfAccumulator]) -> tuple[np.ndarray, np.ndarray, tuple | None]:
    """Join the halves below --low_resol_join_halves (or the current resolution), then their FSC (§4.3) and its
    spread without common signal (for the references' information limit). With --solvent_correct_fsc the FSC is
    that of the unregularised half maps under the solvent mask, corrected by phase randomisation (§4.3, as
    postprocess), and those maps are returned too (on the leader; None elsewhere and without the option)."""
    if state.opts.low_resol_join_halves > 0:
        bpm.join_low_resolution(accs[0].bp, accs[1].bp, join_shell(state))
    state.log.line(" Calculating gold-standard FSC ...")
    red = state.reducer
    mine, maps = None, None
    if red.is_leader:
        fsc, sigma = bpm.fsc_halves_and_null_sigma(accs[0].bp, accs[1].bp, sym_mats=state.sym_mats)
        if state.opts.solvent_correct_fsc:
            maps = tuple(bpm.reconstruct(a.bp, tau2=None, leak_free_shell=shared_shell(state)) for a in accs)
            fsc = solvent_corrected_fsc(maps, state.solvent_mask, state.angpix, accs[0].bp.r_max)
        mine = (fsc, sigma)
    fsc, sigma = red.broadcast(mine, root=0)
    return fsc, sigma, maps


def solvent_corrected_fsc(maps: tuple, mask: np.ndarray, angpix: float, r_max: float) -> np.ndarray:
    """FSC_true of postprocessing (spec §12) of two half maps under `mask`; 1 at shell 0, 0 beyond r_max (§4.3)."""
    true = np.array(masked_corrected_fsc(maps[0], maps[1], mask, angpix)["fsc_true"], dtype=np.float64)
    true[0] = 1.0
    true[np.arange(true.size) > r_max] = 0.0
    return true


def reconstructs(reducer, half: int, final: bool) -> bool:
    """True when this process makes half `half`'s map: its owner, or in the final iteration the leader, which
    makes the joined map from both halves' sums. Other processes drop those sums before the M-step."""
    return reducer.is_leader if final else reducer.rank == reducer.half_owner(half)


def join_shell(state: RunState) -> int:
    """Shell up to which the halves are averaged (§4.2): N·p / max(--low_resol_join_halves, current resolution),
    rounded up; 0 without a join."""
    opts, c = state.opts, state.counters
    if opts.low_resol_join_halves <= 0:
        return 0
    return math.ceil(state.box * state.angpix / max(opts.low_resol_join_halves, 1.0 / c.current_resolution))


def shared_shell(state: RunState) -> float:
    """Radius (Fourier pixels) up to which the two halves share their maps by construction: the low-resolution
    join, or without one the initial low-pass both references started from."""
    return float(join_shell(state) or state.box * state.angpix / cnt.initial_resolution_A(state.opts.ini_high))


def maximization(state: RunState, accs: list[HalfAccumulator], fsc: np.ndarray, final: bool, cc: bool,
                 raw: list | None) -> RunState:
    """M-step of both halves (noise, offsets, norms, scales, pdf; regularised maps), then the new resolution."""
    opts, data, log = state.opts, state.data, state.log
    log.line(" Maximization...")
    boxes = {o: og.box for o, og in enumerate(data.optics)}
    models = []
    for h, (m, acc) in enumerate(zip(state.models, accs), start=1):
        counts = np.bincount(data.group[data.subset == h], minlength=len(data.group_names))
        models.append(mstep.update_model_statistics(m, acc, boxes, counts, opts.norm, opts.scale,
                                                    opts.min_sigma2_offset, cc))
    red = state.reducer
    unfiltered = None
    if final:
        joined = None
        if red.is_leader:
            joined = mstep.reconstruct_joined(accs[0].bp, accs[1].bp, fsc, opts.tau2_fudge)
            unfiltered = tuple(bpm.reconstruct(b, tau2=None, leak_free_shell=shared_shell(state)) for b in raw)
        vol, stats = red.broadcast(joined, root=0)
        models = [mstep.with_reference(m, vol, stats) for m in models]
    else:
        mask = state.solvent_mask if opts.flatten_solvent else None
        lowpass = opts.ini_high if cc else 0.0
        # each owner reconstructs its half before any broadcast, so two processes make the two maps at once
        mine = {h: mstep.reconstruct_half(accs[h - 1].bp, fsc, opts.tau2_fudge, state.angpix, lowpass, mask)
                for h in (1, 2) if reconstructs(red, h, final)}
        models = [mstep.with_reference(m, *red.broadcast(mine.get(h), root=red.half_owner(h)))
                  for h, m in enumerate(models, start=1)]
    counters = cnt.with_resolution(state.counters, models[0].ssnr, state.box, state.angpix, opts.ini_high,
                                   keep_ini_high=cc)
    if final:
        counters = significant_final_resolution(state, counters)
        warn_if_accuracy_limits(state, counters)
    return replace(state, models=tuple(models), counters=counters, unfiltered=unfiltered)


def warn_if_accuracy_limits(state: RunState, c) -> None:
    """A warning (never a replaced number) when the estimated alignment accuracy is coarser than the FSC's figure."""
    limit = autos.accuracy_limited_resolution(c.acc_rot, c.acc_trans, state.opts.particle_diameter)
    if limit > 1.0 / c.current_resolution:
        state.log.auto(f"WARNING: the estimated alignment accuracy ({c.acc_rot:g} degrees, {c.acc_trans:g} "
                       f"Angstroms) would resolve about {limit:.2f} A, worse than the gold-standard FSC's "
                       f"{1.0 / c.current_resolution:.2f} A; check the FSC curve and the half maps.")


def significant_final_resolution(state: RunState, c: Counters) -> Counters:
    """RELION's final resolution (the joined FSC's, i.e. half-map FSC 0.143), cut to the shell before the first one
    beyond the join whose FSC is within --fsc_sigma_criterion σ of chance, σ the larger of 1/√n and the spread
    measured on the half maps (fsc.fsc_null_sigma); the log says so and what the 0.143 rule alone gives. With the
    criterion 0 the number is RELION's and a 3σ finding is a WARNING only."""
    k = state.opts.fsc_sigma_criterion or 3.0        # with 0, the 3σ test only warns
    threshold = chance_threshold(state, c.fsc_null_sigma, k)
    cut, s = cnt.with_significant_resolution(c, threshold, join_shell(state), state.box, state.angpix)
    if s is None:
        return c
    size_a = state.box * state.angpix
    what = (f"the gold-standard FSC at {size_a / s:.2f} A (shell {s}) is {c.fsc[s]:.3f}, within {k:g} sigma of "
            f"chance (below {threshold[s]:.3f}; sigma: 1/sqrt(n) or the spread measured on the half maps)")
    relion_a = 1.0 / c.current_resolution
    if state.opts.fsc_sigma_criterion > 0:
        state.log.auto(f"Resolution: {what}, so the resolution is {1.0 / cut.current_resolution:.2f} A, the shell "
                       f"before it; the 0.143 threshold alone gives {relion_a:.2f} A (--fsc_sigma_criterion 0 reports "
                       f"that, as RELION)")
        return cut
    state.log.auto(f"WARNING: {what}, though the reported resolution is {relion_a:.2f} A: the FSC there may be "
                   f"noise; check the curve and the half maps.")
    return c


def with_pose_changes(state: RunState, new_poses) -> RunState:
    """Hidden-variable changes of this iteration (§5.2), then the new poses become the current ones."""
    s = state.sampling
    d_ang, d_off = pose_changes(state.poses, new_poses, state.sym_mats)
    counters = cnt.with_changes(state.counters, d_ang, d_off, angular_step(s.healpix_order + s.oversampling),
                                s.offset_step / 2 ** s.oversampling)
    return replace(state, poses=new_poses, counters=counters)


def final_messages(state: RunState) -> None:
    """RELION's closing Auto-refine lines."""
    root, log = state.opts.fn_out, state.log
    log.auto("Refinement has converged, stopping now... ")
    log.auto(f"+ Final reconstruction from all particles is saved as: {root}_class001.mrc")
    log.auto(f"+ Final model parameters are stored in: {root}_model.star")
    log.auto(f"+ Final data parameters are stored in: {root}_data.star")
    masking = "already with masking" if state.opts.solvent_correct_fsc else "without masking"
    log.auto(f"+ Final resolution ({masking}) is: {1.0 / state.counters.current_resolution:g}")
    log.auto("+ But you may want to run cryorefine postprocess to mask the unfil.mrc maps and calculate a higher "
             "resolution FSC")
