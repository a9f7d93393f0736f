"""The one writer of Counters: resolution, image sizes, accuracy and convergence bookkeeping (spec §3.8, §5.2, §6).

Every function returns a new Counters (`dataclasses.replace`); no other module assigns a counter field
(tests/test_refine_structure.py checks it), so the history of a counter is the list of functions below.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from numpy.typing import NDArray

from cryorefine.fourier.fsc import first_shell_below
from cryorefine.refine.state import Counters


def initial_resolution_A(ini_high: float) -> float:
    """The resolution (Å) the references start from: --ini_high, or RELION's 60 Å without one."""
    return ini_high if ini_high > 0 else 60.0


def initial_counters(incr_size: int, box: int, angpix: float, ini_high: float) -> Counters:
    """Iteration 0: the resolution of the initial low-pass (60 Å without --ini_high), no iteration without gain."""
    c = with_resolution(Counters(incr_size=incr_size), None, box, angpix, initial_resolution_A(ini_high), True)
    return replace(c, nr_iter_wo_resol_gain=0)


def resolution_shell(ssnr: NDArray[np.float64], run_length: int = 4) -> int:
    """r*: last shell before SSNR first drops below 1, or a later high shell if it rises again (§3.8); ≥ 5.

    RELION takes the highest shell with SSNR > 1 if it lies more than 3 shells beyond r*; here that shell must
    end a run of `run_length` shells with SSNR > 1, so a single noisy FSC value far out cannot be taken for
    resolution (with noise-only data it otherwise is, once the final iteration's sqrt(2f/(1+f)) lifts it).
    """
    below = np.nonzero(ssnr[1:] < 1)[0]
    r = int(below[0]) if below.size else len(ssnr) - 1      # index in ssnr[1:] = first bad shell − 1
    good = ssnr[: len(ssnr) - 1] > 1
    runs = np.convolve(good.astype(int), np.ones(run_length, int), mode="full")[: len(good)] == run_length
    high = np.nonzero(runs)[0]
    r2 = int(high[-1]) if high.size else 0
    if r2 > r + 3:
        r = r2
    return max(r, 5)


def with_resolution(c: Counters, ssnr: NDArray | None, box: int, angpix: float, ini_high: float,
                    keep_ini_high: bool) -> Counters:
    """updateCurrentResolution: from ini_high in iteration 0 (and after a CC iteration 1), else from the SSNR."""
    r = round(box * angpix / ini_high) if keep_ini_high and ini_high > 0 else resolution_shell(ssnr)
    new = r / (box * angpix)
    gain = new > c.current_resolution + 1e-4       # vs the previous iteration, as RELION (spec §3.8)
    return replace(c, current_resolution=new, best_resolution=max(c.best_resolution, new),
                   nr_iter_wo_resol_gain=0 if gain else c.nr_iter_wo_resol_gain + 1)


LEAK_SHELLS = 3
SIGNIFICANT_FSC = 0.9     # in shells of fewer than ~11 independent voxels 3σ exceeds this; real data still reach it


def information_threshold(sigma: NDArray[np.float64], null_sigma: NDArray[np.float64] | None = None,
                          k: float = 3.0) -> NDArray[np.float64]:
    """Per shell, the half-map FSC that shows information: 0.143, and significantly above chance (kσ, van Heel &
    Schatz 2005: 3σ) where shells hold few independent voxels (low resolution, high symmetry) or their voxels are
    not independent (`null_sigma`, the measured spread, fsc.fsc_null_sigma); kσ capped at 0.9."""
    return np.maximum(0.143, np.minimum(k * chance_sigma(sigma, null_sigma), SIGNIFICANT_FSC))


def chance_sigma(sigma: NDArray[np.float64], null_sigma: NDArray[np.float64] | None) -> NDArray[np.float64]:
    """Per shell, the larger of 1/√n (`sigma`, fsc.fsc_sigma) and the spread measured on the half maps."""
    if null_sigma is None:
        return np.asarray(sigma, np.float64)
    m = min(len(sigma), len(null_sigma))
    return np.concatenate([np.maximum(sigma[:m], null_sigma[:m]), sigma[m:]])


def first_chance_shell(fsc: NDArray, threshold: NDArray, start: int, stop: int) -> int | None:
    """First shell in [start, stop] whose FSC is below `threshold` (information_threshold), or None."""
    for s in range(max(start, 1), min(stop, len(fsc) - 1, len(threshold) - 1) + 1):
        if fsc[s] < threshold[s]:
            return s
    return None


def with_significant_resolution(c: Counters, threshold: NDArray, join: int, box: int,
                                angpix: float) -> tuple[Counters, int | None]:
    """The final resolution, cut to the shell before the first one beyond the join whose FSC is below `threshold`
    (first_chance_shell), and that shell (None: nothing cut)."""
    reported = int(round(c.current_resolution * box * angpix))
    s = first_chance_shell(c.fsc, threshold, join + 1, reported) if c.fsc is not None else None
    if s is None:
        return c, None
    return replace(c, current_resolution=max(s - 1, 1) / (box * angpix)), s


def reference_limit(previous: float, fsc: NDArray | None, threshold: NDArray, ini_edge: float) -> float:
    """Radius (px of the model box) to which the references are projected: the ini_high edge while they are the
    low-passed start (`fsc` None), else the first shell whose FSC is below `threshold` (information_threshold);
    the first step beyond the start's edge needs the FSC above it on the LEAK_SHELLS shells beyond that edge.

    Both halves start from the same low-passed map and are joined below 40 Å; aligning images to references cut at
    the edge correlates the halves by construction in the next shells (trilinear insertion and the FSC's
    down-sampling spread the aligned shells outwards), and at low resolution a shell holds few independent voxels,
    so chance correlations of 0.2-0.3 are common there. Letting either into the references makes both halves align
    to the same spurious features, which then grow (Einstein from noise); once data have shown information well
    beyond the start, the limit follows the FSC.
    """
    if fsc is None:
        return ini_edge
    n = min(len(fsc), len(threshold))
    bad = np.nonzero(fsc[1:n] < threshold[1:n])[0]
    s_bad = float(bad[0] + 1 if bad.size else n - 1)
    if previous <= ini_edge and previous < s_bad <= previous + LEAK_SHELLS:
        return previous
    return s_bad


def with_reference_limit(c: Counters, fsc: NDArray | None, threshold: NDArray, ini_edge: float) -> Counters:
    """The reference limit of this iteration (reference_limit) from the last one's."""
    return replace(c, reference_limit=reference_limit(c.reference_limit, fsc, threshold, ini_edge))


def with_iteration(c: Counters, iteration: int, current_size: int, coarse_size: int) -> Counters:
    """The iteration number and its image sizes (C, C_coarse)."""
    return replace(c, iteration=iteration, current_size=current_size, coarse_size=coarse_size)


def with_accuracy(c: Counters, acc_rot: float, acc_trans: float) -> Counters:
    """The estimated angular (deg) and translational (Å) accuracies of this iteration (§5.1)."""
    return replace(c, acc_rot=acc_rot, acc_trans=acc_trans)


def with_fsc(c: Counters, fsc: NDArray[np.float64], null_sigma: NDArray[np.float64] | None = None) -> Counters:
    """Store the half-map FSC and its spread without common signal; incr_size ← max(incr_size, s_0.143 − s_0.5 + 5);
    latch has_high_fsc_at_limit when FSC(C/2−1) > 0.2."""
    incr = max(c.incr_size, first_shell_below(fsc, 0.143) - first_shell_below(fsc, 0.5) + 5)
    edge = c.current_size // 2 - 1
    high = c.has_high_fsc_at_limit or bool(0 < edge < len(fsc) and fsc[edge] > 0.2)
    return replace(c, fsc=fsc, fsc_null_sigma=null_sigma, incr_size=incr, has_high_fsc_at_limit=high)


def with_sampling_decision(c: Counters, decision) -> Counters:
    """Apply an autosampling.SamplingDecision: the fine-enough flag, and the counter reset of a finer sampling."""
    if decision.fine_enough is not None:
        c = replace(c, has_fine_enough_angular_sampling=decision.fine_enough)
    if decision.refined:
        c = replace(c, nr_iter_wo_resol_gain=0, nr_iter_wo_large_changes=0, smallest_changes_orient=999.0,
                    smallest_changes_offset=999.0, smallest_changes_class=9999999.0)
    return replace(c, sampling_note=decision.note)


def with_changes(c: Counters, d_ang: float, d_off: float, fine_angle: float, fine_step: float) -> Counters:
    """updateOverallChangesInHiddenVariables: count iterations without large changes, track the minima."""
    d_cls = 0.0
    stable = (1.03 * d_cls >= c.smallest_changes_class) \
        and (d_off / fine_step < 0.40 or 1.03 * d_off >= c.smallest_changes_offset) \
        and (d_ang / fine_angle < 0.40 or 1.03 * d_ang >= c.smallest_changes_orient)
    return replace(c, nr_iter_wo_large_changes=c.nr_iter_wo_large_changes + 1 if stable else 0,
                   smallest_changes_class=min(c.smallest_changes_class, d_cls),
                   smallest_changes_offset=min(c.smallest_changes_offset, d_off),
                   smallest_changes_orient=min(c.smallest_changes_orient, d_ang),
                   changes_orient=d_ang, changes_offset=d_off)


def has_converged(c: Counters, auto_ignore_angles: bool) -> bool:
    """checkConvergence: fine-enough sampling, no resolution gain, and (unless ignored) stable hidden variables."""
    return c.has_fine_enough_angular_sampling and c.nr_iter_wo_resol_gain >= 1 \
        and (auto_ignore_angles or c.nr_iter_wo_large_changes >= 1)


def with_convergence(c: Counters, auto_ignore_angles: bool) -> Counters:
    """Latch has_converged at the start of an iteration (the next one is the final, joined iteration)."""
    return replace(c, has_converged=c.has_converged or has_converged(c, auto_ignore_angles))
