"""Building the RunState of a refinement: read particles and reference, resolve the options, split halves,
low-pass the reference and estimate the initial noise (iteration 0), or read it all back for `--continue`."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from cryorefine.errors import InputError, option_error
from cryorefine.fourier.filters import lowpass_raised_cosine, soft_sphere_mask
from cryorefine.geometry.sampling import n_directions
from cryorefine.geometry.symmetry import symmetry_matrices
from cryorefine.parallel.mpi import get_reducer
from cryorefine.refine import memory
from cryorefine.refine.autosampling import initial_sampling
from cryorefine.refine.backend import make_backend
from cryorefine.refine.counters import initial_counters
from cryorefine.refine.data import ParticleData, column, load_particles, prepare_batch
from cryorefine.refine.expectation import particle_mask
from cryorefine.refine.mstep import initial_sigma2
from cryorefine.refine.reference import load_reference, load_solvent_mask
from cryorefine.refine.state import HalfModel, Poses, RefineOptions, RunState
from cryorefine.refine.timing import PhaseClock, timed_backend


def resolve_options(opts: RefineOptions, box: int, angpix: float, fn_in: str) -> RefineOptions:
    """The options with the defaults that depend on the data filled in (mask diameter: box minus mask edge)."""
    if opts.maskedge_px >= box / 2:
        raise InputError(f"--maskedge {opts.maskedge_px:g} px is not less than half the box ({box} px) of {fn_in}: "
                         f"the soft edge would cover the whole image")
    if opts.particle_diameter <= 0:
        opts = replace(opts, particle_diameter=(box - opts.maskedge_px) * angpix)
    if opts.particle_diameter > box * angpix:
        raise InputError(f"--particle_diameter {opts.particle_diameter:g} A is larger than the box "
                         f"({box} px x {angpix:g} A = {box * angpix:g} A) of {fn_in}")
    if opts.ini_high > 0 and round(box * angpix / opts.ini_high) < 1:      # not even Fourier shell 1 kept
        raise InputError(f"--ini_high {opts.ini_high:g} A is coarser than the box ({box} px x {angpix:g} A = "
                         f"{box * angpix:g} A) of {fn_in} can hold: the low-passed reference would be flat")
    if opts.offset_range_px > box / 2:
        raise InputError(f"--offset_range {opts.offset_range_px:g} px is more than half the box ({box} px) of {fn_in}: "
                         f"shifts that large move the particle out of its image")
    return opts


def initial_noise(opts: RefineOptions, data: ParticleData, angpix: float) -> dict[int, np.ndarray]:
    """σ² per optics group from up to nr_parts_sigma2noise of its particles (shared by both halves)."""
    sigma2 = {}
    for o, og in enumerate(data.optics):
        rows = np.nonzero(data.optics_index == o)[0][: opts.nr_parts_sigma2noise]
        fts = []
        for chunk in np.array_split(rows, max(1, len(rows) // 256)):
            b = prepare_batch(data, chunk, np.zeros(len(chunk)), np.zeros(len(chunk)), np.ones(len(chunk)),
                              *particle_mask(opts, run_angpix=angpix, angpix=og.angpix))
            fts.append(b.masked if opts.zero_mask else b.unmasked)
        sigma2[o] = initial_sigma2(np.concatenate(fts), og.box)
    return sigma2


def input_poses(data: ParticleData) -> Poses:
    """Poses of the input STAR file (zeros where absent), norm corrections 1 unless given."""
    n = data.n
    return Poses(rot=column(data.table, "rlnAngleRot", 0.0), tilt=column(data.table, "rlnAngleTilt", 0.0),
                 psi=column(data.table, "rlnAnglePsi", 0.0), origin_x=column(data.table, "rlnOriginXAngst", 0.0),
                 origin_y=column(data.table, "rlnOriginYAngst", 0.0),
                 norm_correction=column(data.table, "rlnNormCorrection", 1.0), log_likelihood=np.zeros(n),
                 max_prob=np.zeros(n), nr_significant=np.zeros(n, np.int64))


def initialise(opts: RefineOptions, log, reducer=None) -> RunState:
    """The state before iteration 1 (or, with opts.continue_from, after the iteration it names)."""
    reducer = reducer or get_reducer()
    data = load_particles(opts.fn_in, None, None, opts.random_seed, opts.ctf,
                          angpix=opts.angpix if opts.angpix > 0 else None,
                          ctf_switches={"intact_first_peak": opts.ctf_intact_first_peak,
                                        "only_flip_phases": opts.only_flip_phases,
                                        "phase_flipped": opts.ctf_phase_flipped})
    box, angpix = data.model_box, data.model_angpix
    if opts.angpix > 0 and data.table.version != "3.0":
        log.line(f" --angpix {opts.angpix:g}: not used; the optics groups of {opts.fn_in} give the pixel size "
                 f"({angpix:g} A for the model)")
    opts = resolve_options(opts, box, angpix, opts.fn_in)
    with option_error("--sym"):
        sym_mats = symmetry_matrices(opts.sym)
    with option_error("--healpix_order"):
        n_directions(opts.healpix_order, opts.sym)
    backend, note = make_backend(opts.gpu, reducer.rank)
    clock = PhaseClock()
    backend = timed_backend(backend, clock)
    if note:
        log.line(note)
    for line in (*data.table.notes, *data.images.header_pixel_mismatches()):
        log.line(f" WARNING: {line}")
    if opts.solvent_mask:
        solvent = load_solvent_mask(opts.solvent_mask, box, angpix)
    else:
        solvent = soft_sphere_mask(box, opts.particle_diameter / (2 * angpix), opts.maskedge_px).astype(np.float32)
    log.line(f" Particles: {data.n} ({int((data.subset == 1).sum())} in half 1, {int((data.subset == 2).sum())} in "
             f"half 2), box {box} px, {angpix:g} A/px, {len(data.optics)} optics group(s), {len(data.group_names)} "
             f"group(s); symmetry {opts.sym.upper()} ({len(sym_mats)} operators); {backend.describe()}")
    floor = memory.final_floor(box, opts.pad, *memory.particle_bytes(data, input_poses(data)))
    log.line(f" Memory: the final iteration will need at least {floor.peak / memory.GIB:.2f} GiB (data, accumulators "
             f"and reconstruction to Nyquist, before the projectors; each iteration's estimate is logged before it)")
    common = dict(opts=opts, data=data, box=box, angpix=angpix, sym_mats=sym_mats, solvent_mask=solvent,
                  log=log, reducer=reducer, backend=backend, clock=clock)
    if opts.continue_from:
        from cryorefine.refine.restart import restore
        r = restore(opts.continue_from, data, box, angpix, opts, log)
        return RunState(**common | dict(opts=replace(opts, random_seed=r.seed), data=replace(data, subset=r.subset),
                                        models=r.models,
                                        sampling=r.sampling, counters=r.counters, poses=r.poses,
                                        start_iteration=r.iteration + 1, estep_stats=r.estep_stats))

    reference = load_reference(opts.fn_ref, box, angpix, log, opts.ref_angpix)
    if opts.ini_high > 0:
        reference = lowpass_raised_cosine(reference, angpix, opts.ini_high)
    sigma2 = initial_noise(opts, data, angpix)
    sampling = initial_sampling(opts, angpix)
    n_dir = n_directions(sampling.healpix_order, opts.sym)
    models = tuple(HalfModel(volume=reference.astype(np.float32).copy(), sigma2=dict(sigma2),
                             pdf_direction=np.full(n_dir, 1.0 / n_dir), sigma_offset=opts.sigma_offset_A,
                             norm_average=1.0, group_scales=np.ones(len(data.group_names))) for _ in range(2))
    return RunState(**common, models=models, sampling=sampling,
                    counters=initial_counters(opts.incr_size, box, angpix, opts.ini_high), poses=input_poses(data))
