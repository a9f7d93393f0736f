"""3D auto-refine with gold-standard half-sets (relion_refine --auto_refine --split_random_halves).

Example (the RELION tutorial's job, same spellings):
  cryorefine refine --i particles.star --ref ref.mrc --o Refine3D/job019/run --ini_high 50 --sym D2
                    --particle_diameter 200
Defaults are RELION's GUI defaults: CTF correction, solvent flattening, zero mask, norm and scale
corrections, first iteration by cross-correlation (unless --ref_is_absolute_greyscale), join the
halves below 40 A.
"""

from __future__ import annotations

import argparse
import resource
import shlex
import sys
import time

from cryorefine.errors import InputError
from cryorefine.refine.state import RefineOptions


def add_arguments(p: argparse.ArgumentParser) -> None:
    """RELION's option spellings, with readable aliases."""
    io = p.add_argument_group("input / output")
    io.add_argument("--i", "--particles", dest="fn_in", required=True, help="particle STAR file")
    io.add_argument("--ref", "--reference", dest="fn_ref", required=True, help="initial reference map (MRC)")
    io.add_argument("--o", "--output", dest="fn_out", required=True, help="output root, e.g. Refine3D/job019/run")
    io.add_argument("--continue", dest="continue_from", default=None,
                    help="continue from this _optimiser.star (e.g. run_it005_optimiser.star)")
    io.add_argument("--solvent_mask", "--solvent-mask", dest="solvent_mask", default=None,
                    help="reference mask (values 0..1) used for solvent flattening")
    m = p.add_argument_group("model")
    m.add_argument("--sym", default="C1", help="point group: C<n>, D<n>, T, O, I (I1..I4)")
    m.add_argument("--ini_high", "--ini-high", dest="ini_high", type=float, default=60.0,
                   help="initial low-pass filter of the reference (A), default 60")
    m.add_argument("--particle_diameter", "--particle-diameter", dest="particle_diameter", type=float, default=-1.0,
                   help="mask diameter (A); default: the box minus the mask edge")
    m.add_argument("--maskedge", type=float, default=5.0, help="soft mask edge (px)")
    m.add_argument("--pad", type=int, default=2, help="padding factor of the projector")
    m.add_argument("--tau2_fudge", type=float, default=1.0, help="regularisation parameter T")
    m.add_argument("--low_resol_join_halves", type=float, default=40.0,
                   help="average the two halves below this resolution (A); 0 or negative: never")
    m.add_argument("--firstiter_cc", action="store_true", default=None,
                   help="first iteration by cross-correlation (default unless --ref_is_absolute_greyscale)")
    m.add_argument("--ref_is_absolute_greyscale", "--absolute-greyscale", dest="absolute_greyscale",
                   action="store_true", help="the reference is on the data's grey scale: no CC first iteration")
    m.add_argument("--ctf", action="store_true", default=True, help="CTF correction (default on)")
    m.add_argument("--no_ctf", "--no-ctf", dest="ctf", action="store_false", help="no CTF correction")
    m.add_argument("--flatten_solvent", action="store_true", default=True, help="solvent flattening (default on)")
    m.add_argument("--no_flatten_solvent", dest="flatten_solvent", action="store_false")
    m.add_argument("--zero_mask", action="store_true", default=True, help="fill outside the particle mask with "
                   "the background mean (default on)")
    m.add_argument("--no_zero_mask", dest="zero_mask", action="store_false")
    m.add_argument("--norm", action="store_true", default=True, help="per-particle norm correction (default on)")
    m.add_argument("--no_norm", dest="norm", action="store_false")
    m.add_argument("--scale", action="store_true", default=True, help="per-group intensity scale (default on)")
    m.add_argument("--no_scale", dest="scale", action="store_false")
    s = p.add_argument_group("sampling")
    s.add_argument("--healpix_order", type=int, default=2, help="initial HEALPix order (2 = 15 deg coarse)")
    s.add_argument("--auto_local_healpix_order", type=int, default=4, help="local searches from this order")
    s.add_argument("--offset_range", type=float, default=5.0, help="translational search range (px)")
    s.add_argument("--offset_step", type=float, default=2.0, help="coarse translational step (px)")
    s.add_argument("--oversampling", type=int, default=1, choices=[1], help="adaptive oversampling order")
    s.add_argument("--auto_ignore_angles", action="store_true")
    s.add_argument("--auto_resol_angles", action="store_true")
    s.add_argument("--finer_sampling_faster", "--auto_faster", dest="finer_faster", action="store_true",
                   help="RELION GUI 'Use finer angular sampling faster?': both --auto_ignore_angles and "
                        "--auto_resol_angles")
    s.add_argument("--adaptive_fraction", type=float, default=0.999)
    s.add_argument("--maxsig", type=int, default=500,
                   help="at most this many significant samples per particle in each pass (default 500, for CPU "
                        "speed while posteriors are broad; -1 = no cap, RELION's default)")
    s.add_argument("--perturb", type=float, default=0.5)
    s.add_argument("--offset", dest="sigma_offset", type=float, default=10.0, help="initial offset sigma (A)")
    s.add_argument("--auto_iter_max", type=int, default=999)
    r = p.add_argument_group("computation")
    r.add_argument("--random_seed", type=int, default=0)
    r.add_argument("--j", "--threads", dest="threads", type=int, default=0, help="threads (default: all cores)")
    r.add_argument("--pool", dest="batch_size", type=int, default=64, help="particles per batch")
    r.add_argument("--split_random_halves", action="store_true", help="accepted for RELION compatibility (always on)")
    r.add_argument("--auto_refine", action="store_true", help="accepted for RELION compatibility (always on)")
    r.add_argument("--dont_combine_weights_via_disc", action="store_true", help=argparse.SUPPRESS)
    r.add_argument("--gpu", nargs="?", const="", default=None, help=argparse.SUPPRESS)
    r.add_argument("--quiet", action="store_true", help="no log on stdout (run.out is still written)")


def options_from_args(args: argparse.Namespace) -> RefineOptions:
    """Check the options and turn them into RefineOptions."""
    firstiter_cc = not args.absolute_greyscale if args.firstiter_cc is None else True
    if args.absolute_greyscale and args.firstiter_cc:
        raise InputError("--firstiter_cc and --ref_is_absolute_greyscale contradict each other")
    if args.pad < 1:
        raise InputError("--pad must be at least 1")
    if args.healpix_order < 0 or args.healpix_order > 8:
        raise InputError("--healpix_order must be between 0 and 8")
    if args.offset_step <= 0 or args.offset_range < 0:
        raise InputError("--offset_step must be positive and --offset_range not negative")
    return RefineOptions(
        fn_in=args.fn_in, fn_ref=args.fn_ref, fn_out=args.fn_out, sym=args.sym, ini_high=args.ini_high,
        particle_diameter=args.particle_diameter, maskedge_px=args.maskedge, firstiter_cc=firstiter_cc,
        ctf=args.ctf, flatten_solvent=args.flatten_solvent, zero_mask=args.zero_mask,
        solvent_mask=args.solvent_mask, norm=args.norm, scale=args.scale, pad=args.pad,
        healpix_order=args.healpix_order, auto_local_healpix_order=args.auto_local_healpix_order,
        offset_range_px=args.offset_range, offset_step_px=args.offset_step, oversampling=args.oversampling,
        auto_ignore_angles=args.auto_ignore_angles or args.finer_faster,
        auto_resol_angles=args.auto_resol_angles or args.finer_faster,
        low_resol_join_halves=args.low_resol_join_halves, tau2_fudge=args.tau2_fudge,
        adaptive_fraction=args.adaptive_fraction, maxsig=args.maxsig, perturb=args.perturb, sigma_offset_A=args.sigma_offset,
        random_seed=args.random_seed, auto_iter_max=args.auto_iter_max, threads=args.threads,
        batch_size=args.batch_size, continue_from=args.continue_from,
        command_line="cryorefine refine " + " ".join(shlex.quote(a) for a in sys.argv[2:]))


def _log_end(log, t_start: float) -> None:
    """The closing log line with wall time and peak memory (max RSS of this process, rank 0 under MPI)."""
    from cryorefine.refine.log import timestamp
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20     # Linux: KiB
    log.line(f" Finished {timestamp()}: wall time {time.time() - t_start:.1f} s, peak memory {peak_gib:.2f} GiB "
             f"(maximum resident set size)")


def run(args: argparse.Namespace) -> int:
    """Run the refinement; user mistakes surface as InputError (one line, exit 2)."""
    from cryorefine.refine.log import RunLog, timestamp
    from cryorefine.refine.loop import initialise, run_refinement
    from cryorefine.report import refresh_report
    t_start = time.time()

    opts = options_from_args(args)
    if opts.threads > 0:
        import numba
        numba.set_num_threads(min(opts.threads, numba.config.NUMBA_NUM_THREADS))
    from cryorefine.parallel.mpi import get_reducer
    reducer = get_reducer()
    # only rank 0 writes the log (and every other file)
    log = RunLog(f"{opts.fn_out}.out" if reducer.is_leader else None, quiet=args.quiet or not reducer.is_leader)
    try:
        log.line(f" cryorefine refine, started {timestamp()}"
                 + (f" on {reducer.size} MPI processes" if reducer.size > 1 else ""))
        log.line(f" {opts.command_line}")
        run_ = initialise(opts, log, reducer)
        start = 1
        if opts.continue_from:
            from cryorefine.refine.restart import restore
            start = restore(run_, opts.continue_from)
        run_refinement(run_, start)
        if reducer.is_leader:
            _log_end(log, t_start)
            refresh_report(opts.fn_out, log.line)
    finally:
        log.close()
    return 0
