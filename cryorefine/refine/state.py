"""Refinement state as plain dataclasses: options, per-half model, sampling, counters, particle poses, the run.

Everything `--continue` needs is here and is written to / read from the iteration's STAR files. Each piece has
one writer: options are resolved once (`refine.setup`), HalfModel is written by `refine.mstep`, SamplingState by
`refine.autosampling`, Counters by `refine.counters`, Poses by the E-step (`refine.estep`), RunState by
`refine.loop`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray


@dataclass(frozen=True)
class RefineOptions:
    """User options with RELION's GUI defaults (autorefine-spec §13); lengths in Å unless named _px."""

    fn_in: str
    fn_ref: str
    fn_out: str
    sym: str = "C1"
    ini_high: float = 60.0
    particle_diameter: float = -1.0
    maskedge_px: float = 5.0
    firstiter_cc: bool = True
    ctf: bool = True
    ctf_intact_first_peak: bool = False            # RELION's CTF switches (fourier.ctf.ctf_values)
    ctf_phase_flipped: bool = False
    only_flip_phases: bool = False
    flatten_solvent: bool = True
    zero_mask: bool = True
    solvent_mask: str | None = None
    solvent_correct_fsc: bool = False              # FSC of the masked half maps, phase-randomisation corrected
    norm: bool = True
    scale: bool = True
    pad: int = 2
    healpix_order: int = 2
    auto_local_healpix_order: int = 4
    offset_range_px: float = 5.0
    offset_step_px: float = 2.0
    oversampling: int = 1
    auto_ignore_angles: bool = False
    auto_resol_angles: bool = False
    low_resol_join_halves: float = 40.0
    tau2_fudge: float = 1.0
    adaptive_fraction: float = 0.999
    maxsig: int = -1
    fsc_sigma_criterion: float = 3.0    # the final resolution also needs FSC > this many σ of chance (0: 0.143 only)
    perturb: float = 0.5
    incr_size: int = 10
    sigma_offset_A: float = 10.0
    min_sigma2_offset: float = 2.0
    nr_parts_sigma2noise: int = 1000
    random_seed: int = 0
    auto_iter_max: int = 999
    threads: int = 1
    batch_size: int = 64
    max_memory_gib: float | None = None    # memory budget per process; None: what the machine has available
    continue_from: str | None = None
    command_line: str = ""
    angpix: float = -1.0            # Å/px of a RELION 3.0 particle file without one (--angpix); -1: from the file
    ref_angpix: float = -1.0        # Å/px of --ref instead of its header's (RELION's --ref_angpix); -1: the header's
    gpu: str | None = None          # RELION --gpu [IDS]: None = CPU; "" = all devices; "0", "0:1", "0,1" ...


@dataclass
class HalfModel:
    """What each gold-standard half refines independently (spec §4.1)."""

    volume: NDArray[np.float32]                       # reference map (N, N, N), image grey scale
    sigma2: dict[int, NDArray[np.float64]]            # optics group -> noise spectrum per shell of its own box
    pdf_direction: NDArray[np.float64]                # per coarse direction of the current sampling
    sigma_offset: float                               # Å
    norm_average: float = 1.0
    group_scales: NDArray[np.float64] | None = None   # per group, mean 1
    tau2: NDArray[np.float64] | None = None
    ssnr: NDArray[np.float64] | None = None
    sigma2_ref: NDArray[np.float64] | None = None
    coverage: NDArray[np.float64] | None = None
    ave_pmax: float = 0.0
    log_likelihood: float = 0.0


@dataclass
class SamplingState:
    """Angular and translational sampling (spec §2.3, §5.3–§5.5)."""

    healpix_order: int
    psi_step: float
    offset_range: float       # Å
    offset_step: float        # Å, coarse
    oversampling: int = 1
    local_searches: bool = False
    sigma_ang: float = 0.0    # deg, local-search prior sigma (rot = tilt = psi)
    perturb_factor: float = 0.5
    perturb: float = 0.0      # the random instance rho in [-f, f]
    healpix_order_original: int = 2
    offset_range_original: float = 0.0
    offset_step_original: float = 0.0


@dataclass
class Counters:
    """Resolution, accuracy and convergence bookkeeping shared by both halves (spec §3.8, §5.2, §6)."""

    iteration: int = 0
    current_resolution: float = 0.0     # 1/Å
    current_size: int = 0
    coarse_size: int = 0
    incr_size: int = 10
    has_high_fsc_at_limit: bool = False
    acc_rot: float = 999.0
    acc_trans: float = 999.0
    nr_iter_wo_resol_gain: int = 0
    best_resolution: float = 0.0
    nr_iter_wo_large_changes: int = 0
    smallest_changes_orient: float = 999.0
    smallest_changes_offset: float = 999.0
    smallest_changes_class: float = 9999999.0
    changes_orient: float = 999.0
    changes_offset: float = 999.0
    has_fine_enough_angular_sampling: bool = False
    has_converged: bool = False
    fsc: NDArray[np.float64] | None = None
    fsc_null_sigma: NDArray[np.float64] | None = None   # the FSC's spread without common signal (fsc.fsc_null_sigma)
    reference_limit: float = 0.0        # shells (px of the model box) the references are projected to
    sampling_note: str = ""


@dataclass
class Poses:
    """Per-particle best poses and statistics; angles in degrees, origins in Å (RELION's sign)."""

    rot: NDArray[np.float64]
    tilt: NDArray[np.float64]
    psi: NDArray[np.float64]
    origin_x: NDArray[np.float64]
    origin_y: NDArray[np.float64]
    norm_correction: NDArray[np.float64]
    log_likelihood: NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    max_prob: NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    nr_significant: NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))

    def copy(self) -> "Poses":
        """Deep copy (the previous iteration's poses feed the change statistics)."""
        return Poses(**{f: np.array(getattr(self, f)) for f in self.__dataclass_fields__})

    def assign(self, rows: NDArray[np.int64], batch: "Poses") -> None:
        """Write a batch's poses (from `take` order) into rows of this set."""
        for f in self.__dataclass_fields__:
            getattr(self, f)[rows] = getattr(batch, f)


@dataclass
class RunState:
    """Everything a running refinement holds; the loop (`refine.loop`) is its only writer."""

    opts: RefineOptions
    data: object                                    # refine.data.ParticleData
    box: int                                        # model box N (px)
    angpix: float                                   # model pixel size (Å)
    sym_mats: NDArray[np.float64]
    solvent_mask: NDArray[np.float32]
    models: tuple[HalfModel, HalfModel]
    sampling: SamplingState
    counters: Counters
    poses: Poses
    log: object                                     # refine.log.RunLog
    reducer: object                                 # parallel.local.LocalReducer | parallel.mpi.MpiReducer
    backend: object                                 # refine.backend.Backend (its kernels timed by `clock`)
    clock: object                                   # refine.timing.PhaseClock: this iteration's phase times
    start_iteration: int = 1
    unfiltered: tuple | None = None                 # final iteration: unregularised half maps
    fsc_maps: tuple | None = None                   # --solvent_correct_fsc: the iteration's unregularised half maps
    estep_stats: object | None = None               # refine.memory.EStepStats of the last E-step (memory plan)
