"""Resolution, image sizes, accuracy estimates and the automatic sampling schedule (spec §3.8, §5)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
from numpy.typing import NDArray

from cryorefine.geometry.euler import euler_to_matrix
from cryorefine.geometry.sampling import angular_step
from cryorefine.refine.state import Counters, RefineOptions, SamplingState

ANGLE_LIMIT = 30.0   # deg, where the accuracy search stops
SHIFT_LIMIT = 10.0   # px


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


def update_current_resolution(c: Counters, ssnr: NDArray | None, box: int, angpix: float,
                              ini_high: float, keep_ini_high: bool) -> None:
    """updateCurrentResolution: from ini_high in iteration 0 (and after a CC iteration 1), else from the SSNR."""
    if keep_ini_high and ini_high > 0:
        r = round(box * angpix / ini_high)
    else:
        r = resolution_shell(ssnr)
    new = r / (box * angpix)
    if new <= c.best_resolution + 1e-4:
        c.nr_iter_wo_resol_gain += 1
    else:
        c.nr_iter_wo_resol_gain = 0
    c.best_resolution = max(c.best_resolution, new)
    c.current_resolution = new


def accuracy_limited_resolution(acc_rot: float, acc_trans: float, diameter: float) -> float:
    """Best resolution (Å) that alignments this accurate can support: the arc the angular error sweeps at the
    particle edge, π·D·acc_rot/360, or twice the translational error, whichever is worse."""
    return max(math.pi * diameter * acc_rot / 360.0, 2.0 * acc_trans)


def first_below(fsc: NDArray[np.float64], threshold: float) -> int:
    """First shell ≥ 1 with FSC < threshold (len(fsc) if none)."""
    idx = np.nonzero(fsc[1:] < threshold)[0]
    return int(idx[0]) + 1 if idx.size else len(fsc)


def update_fsc_statistics(c: Counters, fsc: NDArray[np.float64]) -> None:
    """incr_size ← max(incr_size, s_0.143 − s_0.5 + 5); latch has_high_fsc_at_limit when FSC(C/2−1) > 0.2."""
    c.incr_size = max(c.incr_size, first_below(fsc, 0.143) - first_below(fsc, 0.5) + 5)
    edge = c.current_size // 2 - 1
    if 0 < edge < len(fsc) and fsc[edge] > 0.2:
        c.has_high_fsc_at_limit = True


def image_sizes(c: Counters, box: int, angpix: float, ave_pmax: float, final: bool, order: int,
                diameter: float) -> tuple[int, int]:
    """(C, C_coarse): current size from the resolution (§3.8) and the coarse size of pass 1 (§2.5)."""
    if final:
        size = box
    else:
        r = round(c.current_resolution * box * angpix)
        r += round(0.25 * box / 2) if (ave_pmax > 0.1 and c.has_high_fsc_at_limit) else c.incr_size
        size = min(box, 2 * r)
    arc = angular_step(order) / 360.0 * math.pi * diameter / 1.2
    coarse = min(size, 2 * math.ceil(box * angpix / arc))
    return size, coarse


def angle_schedule() -> NDArray[np.float64]:
    """The running values e of the rotational accuracy search (deg), §5.1."""
    e, out = 0.0, []
    while e < ANGLE_LIMIT:
        e = round(e + (0.05 if e < 0.2 else 0.1 if e < 1 else 0.2 if e < 2 else 0.5 if e < 5 else 1 if e < 10
                       else 2 if e < 20 else 5), 6)
        out.append(min(e, ANGLE_LIMIT))
    return np.round(np.array(out), 6)


def shift_schedule() -> NDArray[np.float64]:
    """The running values e of the translational accuracy search (px), §5.1."""
    e, out = 0.0, []
    while e < SHIFT_LIMIT:
        e = round(e + (0.1 if e < 1 else 0.2 if e < 2 else 0.5 if e < 5 else 1 if e < 10 else 2), 6)
        out.append(min(e, SHIFT_LIMIT))
    return np.round(np.array(out), 6)


def first_exceeding(diffs: NDArray[np.float64], schedule: NDArray[np.float64], limit: float) -> NDArray:
    """Per row, the schedule value where diffs first exceed −ln(0.01), else the limit."""
    over = diffs > 4.60517
    idx = np.where(over.any(1), over.argmax(1), -1)
    return np.where(idx >= 0, schedule[np.maximum(idx, 0)], limit)


def perturbed_pose_matrices(rot, tilt, psi, schedule, rng: np.random.Generator) -> NDArray[np.float64]:
    """(n, len(schedule), 3, 3): each particle's pose with one random angle (rot, tilt or psi) moved by e."""
    n = len(rot)
    which = rng.integers(0, 3, size=n)
    angles = np.stack([rot, tilt, psi], -1)[:, None, :].repeat(len(schedule), 1).copy()
    angles[np.arange(n), :, which] += schedule[None, :]
    return euler_to_matrix(angles[..., 0], angles[..., 1], angles[..., 2])


def update_sampling(opts: RefineOptions, s: SamplingState, c: Counters, acc_rot: float, acc_trans: float,
                    delta_offset: float) -> tuple[SamplingState, str]:
    """updateAngularSampling (auto-refine branch, §5.3–§5.5); returns the new state and why."""
    fine = angular_step(s.healpix_order + s.oversampling)
    theta_res = 360.0 / math.ceil(math.pi * opts.particle_diameter * c.current_resolution) \
        if c.current_resolution > 0 else 360.0
    go_res = (opts.auto_resol_angles and theta_res < fine and s.healpix_order + 1 != opts.auto_local_healpix_order) \
        or c.nr_iter_wo_resol_gain >= 1
    go_hid = opts.auto_ignore_angles or c.nr_iter_wo_large_changes >= 1
    if not (go_res and go_hid):
        why = []
        if not go_res:
            why.append("resolution still improving")
        if not go_hid:
            why.append("orientations/offsets still changing")
        return s, "sampling unchanged: " + " and ".join(why)
    if fine < 0.75 * acc_rot:
        c.has_fine_enough_angular_sampling = True
        return s, (f"sampling unchanged: angular step {fine:g} deg is finer than 0.75 x estimated accuracy "
                   f"{acc_rot:g} deg")
    c.has_fine_enough_angular_sampling = False
    # new translations (§5.4): the coarse step follows the estimated translational accuracy
    step = min(1.5, 0.75 * acc_trans) * 2 ** s.oversampling
    rng_ = min(5 * delta_offset, 1.3 * s.offset_range)
    rng_ = max(rng_, 1.5 * step)
    if rng_ > 4 * step:
        rng_ /= 2
    if rng_ > 4 * step:
        step = rng_ / 4
    if step > s.offset_step:
        step, rng_ = s.offset_step, s.offset_range
    order = s.healpix_order + 1
    local = order >= opts.auto_local_healpix_order
    new = replace(s, healpix_order=order, psi_step=angular_step(order), offset_range=rng_, offset_step=step,
                  local_searches=local, sigma_ang=2 * angular_step(order + s.oversampling) if local else 0.0)
    c.nr_iter_wo_resol_gain = 0
    c.nr_iter_wo_large_changes = 0
    c.smallest_changes_orient, c.smallest_changes_offset, c.smallest_changes_class = 999.0, 999.0, 9999999.0
    return new, (f"sampling refined: HEALPix order {order} (fine step {angular_step(order + s.oversampling):g} deg), "
                 f"{'local' if local else 'global'} searches; estimated accuracy {acc_rot:g} deg")
