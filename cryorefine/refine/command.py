"""3D auto-refine with gold-standard half-sets (relion_refine --auto_refine --split_random_halves).

Example (the RELION tutorial's job, same spellings):
  cryorefine refine --i particles.star --ref ref.mrc --o Refine3D/job019/run --ini_high 50 --sym D2
                    --particle_diameter 200
Defaults are RELION's GUI defaults: CTF correction, solvent flattening, zero mask, norm and scale
corrections, first iteration by cross-correlation (unless --ref_is_absolute_greyscale), join the
halves below 40 A.

Every option the GUIs of RELION 3.1 to 5 write for a Refine3D job (and its continue job) is accepted: those
with no meaning here (--pool, --scratch_dir, --preread_images, --no_parallel_disc_io,
--dont_combine_weights_via_disc, 3.1's --skip_gridding and --ctf_corrected_ref) are ignored with a line in
run.out saying why. `--continue run_itNNN_optimiser.star` alone restarts a run: --i, --ref, --sym and the other
options of the run come from the optimiser file (and the command line it records) unless given again; --o may
name a new root.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex
from dataclasses import replace
from pathlib import Path

from cryorefine.errors import InputError, require, require_finite
from cryorefine.refine.state import RefineOptions


def add_arguments(p: argparse.ArgumentParser) -> None:
    """RELION's option spellings, with readable aliases."""
    io = p.add_argument_group("input / output")
    io.add_argument("--i", "--particles", dest="fn_in", default=None, help="particle STAR file")
    io.add_argument("--ref", "--reference", dest="fn_ref", default=None, help="initial reference map (MRC)")
    io.add_argument("--ref_angpix", type=float, default=-1.0,
                    help="pixel size (A) of --ref instead of its header's, as RELION's (default -1: the header's)")
    io.add_argument("--o", "--output", dest="fn_out", default=None, help="output root, e.g. Refine3D/job019/run")
    io.add_argument("--continue", dest="continue_from", default=None,
                    help="continue from this _optimiser.star (e.g. run_it005_optimiser.star); --i, --ref and the "
                         "run's options are then read from it unless given")
    io.add_argument("--angpix", type=float, default=-1.0,
                    help="pixel size (A) of a RELION 3.0 particle file that gives none (no rlnDetectorPixelSize/"
                         "rlnMagnification), as RELION 3.0's relion_refine --angpix; files with optics groups keep theirs")
    io.add_argument("--solvent_mask", "--solvent-mask", dest="solvent_mask", default=None,
                    help="reference mask (values 0..1) used for solvent flattening")
    io.add_argument("--solvent_correct_fsc", action="store_true",
                    help="gold-standard FSC of the half maps masked with --solvent_mask, corrected by phase "
                         "randomisation (as relion_postprocess), every iteration")
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
    m.add_argument("--trust_ref_size", action="store_true",
                   help="RELION: rescale / re-box the reference to the particles if needed (always done here)")
    m.add_argument("--ctf", action="store_true", default=True, help="CTF correction (default on)")
    m.add_argument("--no_ctf", "--no-ctf", dest="ctf", action="store_false", help="no CTF correction")
    m.add_argument("--ctf_corrected_ref", action="store_true",
                   help="RELION 3.1: the reference is CTF-amplitude corrected (always assumed, as RELION 4+)")
    m.add_argument("--ctf_uncorrected_ref", action="store_true",
                   help="RELION: the reference is not CTF-corrected (not available: ignored with a log line)")
    m.add_argument("--skip_gridding", action="store_true",
                   help="RELION 3.1: no gridding correction in the M-step (always so here, as RELION 4+)")
    m.add_argument("--dont_skip_gridding", action="store_true",
                   help="RELION: iterative gridding in the M-step (not available: ignored with a log line)")
    m.add_argument("--ctf_intact_first_peak", action="store_true",
                   help="the CTF is 1 until its first peak (|gamma| < pi/2), as RELION's")
    m.add_argument("--ctf_phase_flipped", action="store_true",
                   help="the images have been phase-flipped (the CTF is |CTF|), as RELION's")
    m.add_argument("--only_flip_phases", action="store_true",
                   help="CTF correction by phase flipping only (the CTF's sign), as RELION's")
    m.add_argument("--flatten_solvent", action="store_true", default=True, help="solvent flattening (default on)")
    m.add_argument("--no_flatten_solvent", dest="flatten_solvent", action="store_false")
    m.add_argument("--zero_mask", action="store_true", default=True, help="fill outside the particle mask with "
                   "the background mean (default on)")
    m.add_argument("--no_zero_mask", dest="zero_mask", action="store_false")
    m.add_argument("--norm", action="store_true", default=True, help="per-particle norm correction (default on)")
    m.add_argument("--no_norm", dest="norm", action="store_false")
    m.add_argument("--scale", action="store_true", default=True, help="per-group intensity scale (default on)")
    m.add_argument("--no_scale", dest="scale", action="store_false")
    m.add_argument("--blush", action="store_true",
                   help="RELION: Blush regularisation (not available: standard regularisation, with a log line)")
    m.add_argument("--relax_sym", default=None, help="RELION: symmetry relaxation (not available: ignored, with a "
                                                      "log line)")
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
    s.add_argument("--maxsig", type=int, default=-1,
                   help="at most this many significant coarse samples per particle in pass 1 (RELION --maxsig; "
                        "default -1 = no cap)")
    s.add_argument("--fsc_sigma_criterion", type=float, default=3.0, metavar="K",
                   help="the final resolution is the last shell before the gold-standard FSC drops below 0.143 or "
                        "within K sigma of chance (sigma measured on the half maps; default 3; 0 = 0.143 only, "
                        "as RELION)")
    s.add_argument("--perturb", type=float, default=0.5)
    s.add_argument("--offset", dest="sigma_offset", type=float, default=10.0, help="initial offset sigma (A)")
    s.add_argument("--auto_iter_max", type=int, default=999)
    r = p.add_argument_group("computation")
    r.add_argument("--random_seed", type=int, default=0,
                   help="seed of the half split and the sampling perturbation (default 0; negative: from the clock, "
                        "as RELION's -1)")
    r.add_argument("--j", "--threads", dest="threads", type=int, default=None, help="threads (default: all cores)")
    r.add_argument("--batch_size", "--batch-size", dest="batch_size", type=int, default=64,
                   help="particles per E-step batch (default 64)")
    r.add_argument("--max_memory", dest="max_memory", type=float, default=None, metavar="GB",
                   help="memory budget of each process in GiB (default: the memory available); batch sizes, "
                        "chunk and cache sizes are lowered until each iteration's estimated peak fits, with a log line")
    r.add_argument("--pool", dest="pool", type=int, default=None,
                   help="RELION: images read together per thread (accepted; images are read per --batch_size batch)")
    r.add_argument("--split_random_halves", action="store_true", help="accepted for RELION compatibility (always on)")
    r.add_argument("--auto_refine", action="store_true", help="accepted for RELION compatibility (always on)")
    r.add_argument("--dont_combine_weights_via_disc", action="store_true",
                   help="RELION: accepted (sums are always combined in memory)")
    r.add_argument("--no_parallel_disc_io", action="store_true",
                   help="RELION: accepted (every process reads its own images)")
    r.add_argument("--preread_images", action="store_true",
                   help="RELION: accepted (images are read batch by batch; the OS file cache keeps them)")
    r.add_argument("--scratch_dir", default=None, help="RELION: accepted (particles are read in place)")
    r.add_argument("--keep_free_scratch", default=None, help="RELION: accepted (nothing is copied to scratch)")
    r.add_argument("--reuse_scratch", action="store_true", help="RELION: accepted (nothing is copied to scratch)")
    r.add_argument("--keep_scratch", action="store_true", help="RELION: accepted (nothing is copied to scratch)")
    r.add_argument("--free_gpu_memory", default=None, help="RELION: accepted (PyTorch allocates as needed)")
    r.add_argument("--dont_check_norm", action="store_true",
                   help="RELION: accepted (images are not checked for RELION's normalisation)")
    r.add_argument("--onthefly_shifts", action="store_true",
                   help="RELION: accepted (shifted images are always formed on the fly)")
    r.add_argument("--iter", dest="nr_iter", default=None,
                   help="RELION: accepted (auto-refine runs until convergence; --auto_iter_max stops it earlier)")
    r.add_argument("--gpu", nargs="?", const="", default=None, metavar="IDS",
                   help="RELION: run the E-step on CUDA GPUs with PyTorch ('' or no value = one per MPI rank, "
                        "'0', '0:1'; 'cpu' = the PyTorch kernels on the CPU); without PyTorch or a CUDA device "
                        "the run goes on on the CPU, with a log line")
    r.add_argument("--quiet", action="store_true", help="no log on stdout (run.out is still written)")


# options RELION's GUI writes that mean nothing here: dest -> why (one log line each when given)
IGNORED_OPTIONS: dict[str, str] = {
    "pool": "--pool {v}: RELION's images-per-thread read batch; cryorefine reads images per E-step batch "
            "(--batch_size {batch})",
    "dont_combine_weights_via_disc": "--dont_combine_weights_via_disc: sums are always combined in memory",
    "no_parallel_disc_io": "--no_parallel_disc_io: every process reads its own images",
    "preread_images": "--preread_images: images are read batch by batch (the OS file cache keeps them)",
    "scratch_dir": "--scratch_dir {v}: particles are read in place, nothing is copied",
    "keep_free_scratch": "--keep_free_scratch {v}: nothing is copied to a scratch disk",
    "reuse_scratch": "--reuse_scratch: nothing is copied to a scratch disk",
    "keep_scratch": "--keep_scratch: nothing is copied to a scratch disk",
    "free_gpu_memory": "--free_gpu_memory {v}: PyTorch allocates GPU memory as needed",
    "dont_check_norm": "--dont_check_norm: images are not checked for RELION's normalisation",
    "onthefly_shifts": "--onthefly_shifts: shifted images are always formed on the fly",
    "nr_iter": "--iter {v}: auto-refine runs until it converges (--auto_iter_max stops it earlier)",
    "skip_gridding": "--skip_gridding: the M-step never grids (RELION 4+ does the same)",
    "ctf_corrected_ref": "--ctf_corrected_ref: the reference is taken as CTF-corrected (RELION 4+ does the same)",
    "ctf_uncorrected_ref": "WARNING: --ctf_uncorrected_ref is not available; the reference is used as CTF-corrected",
    "dont_skip_gridding": "WARNING: --dont_skip_gridding is not available; the M-step does not grid (RELION 4+ "
                          "default)",
    "trust_ref_size": "--trust_ref_size: the reference is always rescaled / re-boxed to the particles if needed",
    "blush": "WARNING: --blush (neural-network regularisation) is not available; RELION's standard "
             "regularisation is used",
    "relax_sym": "WARNING: --relax_sym {v} is not available; poses are searched with --sym only",
}


# relion_refine's own defaults (ml_optimiser.cpp, parseInitial) where they differ from cryorefine refine's, which are
# the GUI's: on RELION's command line a switch left out is off. dest -> (value, the option that says it here)
RELION_COMMAND_LINE_DEFAULTS: dict[str, tuple[object, list[str]]] = {
    "ctf": (False, ["--no_ctf"]), "zero_mask": (False, ["--no_zero_mask"]),
    "flatten_solvent": (False, ["--no_flatten_solvent"]), "norm": (False, ["--no_norm"]),
    "scale": (False, ["--no_scale"]), "firstiter_cc": (False, ["--ref_is_absolute_greyscale"]),
    "ini_high": (-1.0, ["--ini_high", "-1"]), "low_resol_join_halves": (-1.0, ["--low_resol_join_halves", "-1"]),
    "offset_range": (6.0, ["--offset_range", "6"]),
}


def relion_command_line_defaults(args: argparse.Namespace, given: set[str]) -> list[str]:
    """Give the options a relion_refine command line leaves out relion_refine's values (no CTF correction without
    --ctf, no CC first iteration without --firstiter_cc, ...), not cryorefine refine's GUI defaults; returns them as
    options, which the run records (so that --continue and run.out say what ran). Nothing for --continue, whose
    options come from the run."""
    if args.continue_from:
        return []
    added: list[str] = []
    for dest, (value, spelled) in RELION_COMMAND_LINE_DEFAULTS.items():
        if dest in given or (dest == "firstiter_cc" and "absolute_greyscale" in given):
            continue
        setattr(args, dest, value)
        added += spelled
    return added


def compatibility_notes(args: argparse.Namespace) -> list[str]:
    """One log line per RELION option that was given but means nothing (or is not available) here, and what a
    --continue decided (where it goes on from, its output root)."""
    notes = list(getattr(args, "_continue_notes", []))
    if getattr(args, "_continue_unused", None):
        names = ", ".join(n.replace("fn_ref", "ref").replace("absolute_greyscale", "ref_is_absolute_greyscale")
                          for n in args._continue_unused)
        notes.append(f" {names}: not used when continuing (the run goes on from its iteration's maps and sampling)")
    if getattr(args, "_relion_defaults", None):
        notes.append(" relion_refine's defaults for the options its command line leaves out (a switch left out is "
                     "off): " + " ".join(args._relion_defaults))
    for dest, text in IGNORED_OPTIONS.items():
        v = getattr(args, dest, None)
        if v not in (None, False):
            notes.append(" " + text.format(v=v, batch=args.batch_size) + ("" if text.startswith("WARNING")
                                                                           else "; ignored"))
    return notes


def given_dests(argv: list[str]) -> set[str]:
    """The option destinations named on a refine command line (argv after 'refine')."""
    p = argparse.ArgumentParser(allow_abbrev=False, add_help=False)
    add_arguments(p)
    table = p._option_string_actions
    return {table[t.split("=", 1)[0]].dest for t in argv if t.startswith("--") and t.split("=", 1)[0] in table}


def recorded_command(optimiser_star: Path) -> list[str]:
    """The refine options recorded in an _optimiser.star's comment lines ('# <command line>'), or []."""
    try:
        with open(optimiser_star, encoding="utf-8", errors="replace") as f:
            head = [next(f, "") for _ in range(5)]
    except OSError:
        return []
    for line in head:
        text = line.strip().lstrip("#").strip()
        if "--" not in text or text.startswith("RELION optimiser"):
            continue
        try:
            tokens = shlex.split(text)
        except ValueError:
            tokens = text.split()
        k = next((i for i, t in enumerate(tokens) if t.startswith("--")), len(tokens))
        return tokens[k:]
    return []


# optimiser-list labels that give a run's options back (RELION writes them all) -> (dest, type)
_OPTIMISER_OPTIONS = {
    "rlnParticleDiameter": ("particle_diameter", float), "rlnJoinHalvesUntilThisResolution":
    ("low_resol_join_halves", float), "rlnAdaptiveOversampleFraction": ("adaptive_fraction", float),
    "rlnWidthMaskEdge": ("maskedge", float), "rlnDoZeroMask": ("zero_mask", bool),
    "rlnDoSolventFlattening": ("flatten_solvent", bool), "rlnAutoLocalSearchesHealpixOrder":
    ("auto_local_healpix_order", int), "rlnDoCorrectNorm": ("norm", bool), "rlnDoCorrectScale": ("scale", bool),
    "rlnDoCorrectCtf": ("ctf", bool), "rlnRandomSeed": ("random_seed", int),
    "rlnDoIgnoreCtfUntilFirstPeak": ("ctf_intact_first_peak", bool),
    "rlnCtfDataArePhaseFlipped": ("ctf_phase_flipped", bool), "rlnDoOnlyFlipCtfPhases": ("only_flip_phases", bool),
}


# options that only shape a run's start: a continued run goes on from its iteration's maps and sampling
CONTINUE_UNUSED = ("fn_ref", "ref_angpix", "healpix_order", "ini_high", "firstiter_cc", "absolute_greyscale")


def continue_arguments(args: argparse.Namespace, given: set[str]) -> None:
    """Fill the options of a `--continue` run that were not given from the optimiser file of the run.

    Precedence: the continue command line, then the optimiser's labels, then the command line it records.
    --i: the recorded particle file if it exists, else the iteration's _data.star; --ref: the iteration's half-1
    map (its maps replace the reference anyway); --o: the recorded output root plus _ct<iteration> when not given
    or the same (RELION). A converged optimiser is gone on from only to remake incomplete final files
    (restart.continue_point).
    """
    from cryorefine.io.star import read_star
    from cryorefine.refine.restart import continue_point, iteration_files

    opt_path = Path(args.continue_from)
    require(opt_path.is_file(), f"{opt_path}: no such file (--continue)")
    args._continue_unused = [f"--{d}" for d in CONTINUE_UNUSED if d in given]
    iteration_files(opt_path)          # the name is an _optimiser.star's
    gen = read_star(opt_path).get("optimiser_general")
    require(isinstance(gen, dict), f"{opt_path}: no data_optimiser_general block: not an _optimiser.star file")
    opt_path, note = continue_point(opt_path, gen)
    if note:
        args.continue_from = str(opt_path)
        args._continue_notes = [note]
        gen = read_star(opt_path).get("optimiser_general")
        require(isinstance(gen, dict), f"{opt_path}: no data_optimiser_general block: not an _optimiser.star file")
    files = iteration_files(opt_path)
    for label in ("rlnDoAutoRefine", "rlnDoSplitRandomHalves"):     # a classification's file: not ours to go on
        require(str(gen.get(label, 1)).strip() not in ("0", "0.0", "False", "false"),
                f"{opt_path}: not a 3D auto-refine run with gold-standard halves (_{label} {gen.get(label)})")
    p = argparse.ArgumentParser(allow_abbrev=False, add_help=False)
    add_arguments(p)
    p.add_argument("--pipeline_control", default=None)
    rec, _ = p.parse_known_args(recorded_command(opt_path))
    skip = given | {"continue_from", "quiet", "pipeline_control"}
    for dest, value in vars(rec).items():
        if dest not in skip and dest not in IGNORED_OPTIONS and dest != "gpu" and hasattr(args, dest):
            setattr(args, dest, value)
    for label, (dest, kind) in _OPTIMISER_OPTIONS.items():
        if dest in skip or label not in gen:
            continue
        try:
            v = float(gen[label])
        except (TypeError, ValueError):
            raise InputError(f"{opt_path}: _{label} should be a number, got {gen[label]!r}") from None
        setattr(args, dest, bool(int(v)) if kind is bool else kind(v))
    mask = gen.get("rlnSolventMaskName")
    if "solvent_mask" not in skip and isinstance(mask, str) and mask not in ("", "None"):
        args.solvent_mask = mask
    if "sym" not in skip and files["sampling"].is_file():
        sampling = read_star(files["sampling"]).get("sampling_general")
        if isinstance(sampling, dict) and "rlnSymmetryGroup" in sampling:
            args.sym = str(sampling["rlnSymmetryGroup"])
    if "fn_in" not in given:
        recorded = rec.fn_in if rec.fn_in and Path(rec.fn_in).is_file() else None
        data = files["data"] if files["data"].is_file() else Path(str(gen.get("rlnExperimentalDataStarFile", "")))
        args.fn_in = recorded or str(data if str(data) else files["data"])
    if "fn_ref" not in given:
        args.fn_ref = str(files["map1"])
    root = gen.get("rlnOutputRootName")
    if "fn_out" not in given or (isinstance(root, str) and os.path.normpath(args.fn_out) == os.path.normpath(root)):
        # RELION (MlOptimiser::parseContinue): without --o, or with the run's own root, the output root is the
        # run's plus _ct<iteration>, so that a continued run never rewrites the files it goes on from
        require(isinstance(root, str) and bool(root), f"{opt_path}: no _rlnOutputRootName: give --o with --continue")
        it = int(float(gen.get("rlnCurrentIteration", 0)))
        args.fn_out = f"{root}_ct{it}"
        args._continue_notes = [*getattr(args, "_continue_notes", []),
                                f" Output root {args.fn_out} (the run's root {root} with _ct{it}, as RELION's "
                                f"--continue names it)"]


def options_from_args(args: argparse.Namespace) -> RefineOptions:
    """Check the options and turn them into RefineOptions."""
    for name, dest in (("--i", "fn_in"), ("--ref", "fn_ref"), ("--o", "fn_out")):
        require(bool(getattr(args, dest, None)), f"{name}: required (or --continue run_itNNN_optimiser.star)")
    # a folder would give hidden files `.out`, `_it001_...` in it
    require(not args.fn_out.endswith(("/", "\\")) and Path(args.fn_out).name not in ("", ".", "..")
            and not Path(args.fn_out).is_dir(),
            f"--o {args.fn_out}: an output root such as Refine3D/job019/run is needed, not a folder")
    firstiter_cc = not args.absolute_greyscale if args.firstiter_cc is None else args.firstiter_cc
    if args.absolute_greyscale and args.firstiter_cc:
        raise InputError("--firstiter_cc and --ref_is_absolute_greyscale contradict each other")
    if args.pad < 1:
        raise InputError("--pad must be at least 1")
    if args.healpix_order < 0 or args.healpix_order > 8:
        raise InputError("--healpix_order must be between 0 and 8")
    if args.offset_step <= 0 or args.offset_range < 0:
        raise InputError("--offset_step must be positive and --offset_range not negative")
    require(args.batch_size >= 1, f"--batch_size: must be at least 1 (got {args.batch_size})")
    require(args.max_memory is None or args.max_memory > 0,
            f"--max_memory: must be a positive number of GiB (got {args.max_memory})")
    require(0 <= args.auto_local_healpix_order <= 8, f"--auto_local_healpix_order: must be between 0 and 8 "
                                                     f"(got {args.auto_local_healpix_order})")
    require(args.tau2_fudge > 0, f"--tau2_fudge: must be > 0 (got {args.tau2_fudge:g})")
    require(0 < args.adaptive_fraction <= 1, f"--adaptive_fraction: must be in (0, 1] (got {args.adaptive_fraction:g})")
    require(args.perturb >= 0, f"--perturb: must be >= 0 (got {args.perturb:g})")
    require(args.sigma_offset > 0, f"--offset: must be > 0 A (got {args.sigma_offset:g})")
    require(args.auto_iter_max >= 1, f"--auto_iter_max: must be at least 1 (got {args.auto_iter_max})")
    require(args.maskedge >= 0, f"--maskedge: must be >= 0 px (got {args.maskedge:g})")
    require(args.maxsig == -1 or args.maxsig >= 1, f"--maxsig: must be -1 (no cap) or at least 1 (got {args.maxsig})")
    require(math.isfinite(args.fsc_sigma_criterion) and args.fsc_sigma_criterion >= 0,
            f"--fsc_sigma_criterion: must be a number >= 0 (got {args.fsc_sigma_criterion:g})")
    require_finite(args, ("ini_high", "particle_diameter", "offset_range", "offset_step", "low_resol_join_halves",
                          "ref_angpix"))
    require(args.angpix == -1.0 or (math.isfinite(args.angpix) and args.angpix > 0),
            f"--angpix: must be a pixel size > 0 A (got {args.angpix:g})")
    require(not args.solvent_correct_fsc or args.solvent_mask not in (None, "", "None"),
            "--solvent_correct_fsc: needs the mask to correct with (--solvent_mask)")
    require(args.pool is None or args.pool >= 1, f"--pool: must be at least 1 (got {args.pool})")
    require(args.threads is None or args.threads >= 1,
            f"--j: must be at least 1 (got {args.threads}); without --j every core is used")
    require(args.gpu is None or gpu_syntax_ok(args.gpu),
            f"--gpu: {args.gpu!r} is not GPU numbers in RELION's syntax (nothing = all, 0, 0:1 one per MPI rank, "
            "0,1:2,3)")
    argv = getattr(args, "_argv", None)
    command_line = "cryorefine refine" + ("".join(" " + shlex.quote(a) for a in argv) if argv else "")
    return RefineOptions(
        fn_in=args.fn_in, fn_ref=args.fn_ref, fn_out=args.fn_out, sym=args.sym, ini_high=args.ini_high,
        particle_diameter=args.particle_diameter, maskedge_px=args.maskedge, firstiter_cc=firstiter_cc,
        ctf=args.ctf, ctf_intact_first_peak=args.ctf_intact_first_peak, ctf_phase_flipped=args.ctf_phase_flipped,
        only_flip_phases=args.only_flip_phases, flatten_solvent=args.flatten_solvent, zero_mask=args.zero_mask,
        solvent_mask=args.solvent_mask, solvent_correct_fsc=args.solvent_correct_fsc, norm=args.norm,
        scale=args.scale, pad=args.pad,
        healpix_order=args.healpix_order, auto_local_healpix_order=args.auto_local_healpix_order,
        offset_range_px=args.offset_range, offset_step_px=args.offset_step, oversampling=args.oversampling,
        auto_ignore_angles=args.auto_ignore_angles or args.finer_faster,
        auto_resol_angles=args.auto_resol_angles or args.finer_faster,
        low_resol_join_halves=args.low_resol_join_halves, tau2_fudge=args.tau2_fudge,
        adaptive_fraction=args.adaptive_fraction, maxsig=args.maxsig,
        fsc_sigma_criterion=args.fsc_sigma_criterion, perturb=args.perturb, sigma_offset_A=args.sigma_offset,
        random_seed=args.random_seed, auto_iter_max=args.auto_iter_max, threads=args.threads or 0,
        batch_size=args.batch_size, max_memory_gib=args.max_memory, continue_from=args.continue_from,
        command_line=command_line, gpu=args.gpu, angpix=args.angpix, ref_angpix=args.ref_angpix)


def gpu_syntax_ok(gpu: str) -> bool:
    """--gpu in RELION's syntax: "" (all), GPU numbers separated by ',' (one rank's) and ':' (ranks), or "cpu"."""
    return gpu.strip().lower() == "cpu" or re.fullmatch(r"[\d\s,:]*", gpu) is not None


def peak_memory_gib() -> float:
    """Peak resident memory of this process (GiB)."""
    from cryorefine.refine.memory import GIB, peak_bytes    # imported late: it loads numba, --help need not
    return peak_bytes() / GIB


def fsc_kind(opts: RefineOptions) -> str:
    """Which gold-standard FSC the resolution comes from, for the closing lines."""
    return "masked, phase-randomisation corrected" if opts.solvent_correct_fsc else "unmasked"


def summary_lines(run_, wall_s: float, peak_gib: float) -> list[str]:
    """The closing block of the log: iterations, time, memory, resolution, outputs, and what to run next."""
    c, root = run_.counters, run_.opts.fn_out
    done = c.has_converged
    res = 1.0 / c.current_resolution if c.current_resolution > 0 else float("nan")
    maps = (f"{root}_class001.mrc, {root}_half1_class001_unfil.mrc, {root}_half2_class001_unfil.mrc" if done
            else f"{root}_it{c.iteration:03d}_half1_class001.mrc, {root}_it{c.iteration:03d}_half2_class001.mrc")
    lines = [" ===== Summary =====",
             f" Iterations: {c.iteration} ({'converged' if done else 'not converged'})",
             f" Wall time: {wall_s / 60:.1f} min ({wall_s:.0f} s); peak memory: {peak_gib:.2f} GiB",
             f" Reported resolution (gold-standard FSC, {fsc_kind(run_.opts)}): {res:.2f} A",
             f" Maps: {maps}",
             f" Particles and poses: {root}{'' if done else f'_it{c.iteration:03d}'}_data.star; model: "
             f"{root}{'' if done else f'_it{c.iteration:03d}_half1'}_model.star; log: {root}.out"]
    if done:
        lines.append(f" Next: cryorefine postprocess --i {root}_half1_class001_unfil.mrc --mask MASK.mrc "
                     f"--o PostProcess/postprocess --auto_bfac")
    else:
        lines.append(f" Next: cryorefine refine --continue {root}_it{c.iteration:03d}_optimiser.star "
                     f"--o {root} (to go on), then cryorefine postprocess on the final half maps")
    return lines


def first_output_iteration(opts: RefineOptions) -> int:
    """The first iteration number this run writes: 0 for a new run, N + 1 when continuing from iteration N."""
    if not opts.continue_from:
        return 0
    m = re.search(r"_it(\d{3,})_optimiser\.star$", str(opts.continue_from))
    return int(m.group(1)) + 1 if m else 1


def check_inputs_and_outputs(opts: RefineOptions) -> None:
    """Everything checkable before any work: particle values, half-sets, maps exist, no output overwrites an input."""
    from cryorefine.io.star import read_particles
    from cryorefine.refine.restart import iteration_files
    from cryorefine.validate import check_half_sets, check_particle_table, refine_output_clash, stacks_named_by

    table = read_particles(opts.fn_in, angpix=opts.angpix if opts.angpix > 0 else None)
    check_particle_table(table, need_ctf=opts.ctf, even_box=True)
    if "rlnRandomSubset" in table.particles.columns:
        check_half_sets(table.particles["rlnRandomSubset"].to_numpy(), opts.fn_in)
    require(table.nr_particles >= 2, f"{opts.fn_in}: {table.nr_particles} particle(s); a gold-standard refinement "
                                     f"needs at least 2")
    for name, path in (("--ref", opts.fn_ref), ("--solvent_mask", opts.solvent_mask)):
        if path:
            require(not Path(path).is_dir(), f"{path}: is a folder, not a map ({name})")
            require(Path(path).is_file(), f"{path}: no such file ({name})")
    inputs = [opts.fn_in, opts.fn_ref, opts.solvent_mask, *stacks_named_by(table)]
    if opts.continue_from:
        inputs += [opts.continue_from, *iteration_files(opts.continue_from).values()]
    clash = refine_output_clash(opts.fn_out, inputs, first_output_iteration(opts))
    require(clash is None, f"--o {opts.fn_out}: the refinement would overwrite the input {clash}; choose another "
                           f"output root")


def remove_failed_outputs(root: str, before: set[str], log) -> None:
    """After a failure: remove this run's files of unfinished iterations (and iteration 0's if none finished)."""
    from cryorefine.validate import created_since
    folder, prefix = Path(root).parent, Path(root).name
    # the log and the report (which describes the iterations that are kept) stay
    new = [p for p in created_since(before, folder, prefix) if not p.name.endswith(".out") and "_report" not in p.name]
    done = [int(m.group(1)) for p in new if (m := re.search(r"_it(\d{3,})_optimiser\.star$", p.name))]
    done = [i for i in done if i > 0 and (Path(f"{root}_it{i:03d}_sampling.star")).is_file()]
    last = max(done, default=-1)
    removed = []
    for p in new:
        m = re.search(r"_it(\d{3,})_", p.name)
        it = int(m.group(1)) if m else None
        if it is None or it > last or (it == 0 and last < 0):
            p.unlink(missing_ok=True)
            removed.append(p.name)
    if removed:
        log.file_line(f" Removed {len(removed)} file(s) of unfinished iterations ({', '.join(sorted(removed)[:4])}"
                      f"{', ...' if len(removed) > 4 else ''})")


def remove_stale_temporaries(root: str, log) -> None:
    """Remove the temporary files a killed run left beside `<root>*` (hidden, never read, as large as the maps)."""
    from cryorefine.io.atomic import stale_temporaries
    stale = stale_temporaries(root, ("class", "half", "data", "model", "optimiser", "sampling", "report"))
    for p in stale:
        p.unlink(missing_ok=True)
    if stale:
        log.line(f" Removed {len(stale)} temporary file(s) a stopped run left ({', '.join(p.name for p in stale[:3])}"
                 f"{', ...' if len(stale) > 3 else ''})")


def run(args: argparse.Namespace) -> int:
    """Run the refinement; user mistakes surface as InputError (one line, exit 2) and end run.out too."""
    import time

    from cryorefine.refine.log import RunLog, timestamp
    from cryorefine.refine.loop import run_refinement
    from cryorefine.refine.setup import initialise
    from cryorefine.report import refresh_report
    from cryorefine.validate import check_half_sets, check_output_folder, existing

    t_start = time.time()
    if args.continue_from:
        continue_arguments(args, given_dests(getattr(args, "_argv", None) or []))
    opts = options_from_args(args)
    check_output_folder(Path(opts.fn_out).parent)
    from cryorefine.parallel.mpi import get_reducer
    from cryorefine.parallel.threads import default_threads, limit_threads
    reducer = get_reducer()
    clock = opts.random_seed < 0
    if clock:   # RELION's -1 (its default): a seed from the clock, rank 0's for every rank (the half split)
        opts = replace(opts, random_seed=reducer.allgather(int(time.time()) % 2**31)[0])
    threads = default_threads(opts.threads, reducer.local_size)
    limit_threads(threads)
    before = existing(Path(opts.fn_out).parent, Path(opts.fn_out).name)
    # only rank 0 writes the log (and every other file)
    control = getattr(args, "pipeline_control", None)
    log = RunLog(f"{opts.fn_out}.out" if reducer.is_leader else None, quiet=args.quiet or not reducer.is_leader,
                 abort_file=Path(control) / "RELION_JOB_ABORT_NOW" if control else None, lock=True)
    try:
        log.line(f" cryorefine refine, started {timestamp()}"
                 + (f" on {reducer.size} MPI processes, {threads} thread(s) each" if reducer.size > 1 else ""))
        log.line(f" {opts.command_line}")
        if reducer.is_leader:      # the log's lock says no other run writes this root: what is left was killed
            remove_stale_temporaries(opts.fn_out, log)
        for note in compatibility_notes(args):
            log.line(note)
        if clock:
            log.line(f" --random_seed {args.random_seed}: seed {opts.random_seed} from the clock (as RELION); "
                     f"--random_seed {opts.random_seed} repeats this run")
        check_inputs_and_outputs(opts)
        state = initialise(opts, log, reducer)
        check_half_sets(state.data.subset, opts.fn_in)
        run_ = run_refinement(state)
        for line in summary_lines(run_, time.time() - t_start, peak_memory_gib()):
            log.line(line)
        if reducer.is_leader:
            refresh_report(opts.fn_out, log.line)
    except InputError as exc:
        if reducer.is_leader:
            remove_failed_outputs(opts.fn_out, before, log)
        log.file_line(f"cryorefine refine: error: {exc}")
        raise
    except BaseException as exc:
        if reducer.is_leader:
            remove_failed_outputs(opts.fn_out, before, log)
        log.file_line(f"cryorefine refine: stopped: {type(exc).__name__}: {exc}")
        raise
    finally:
        log.close()
    return 0
