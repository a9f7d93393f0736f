"""Resolution, image sizes, accuracy estimates and the automatic sampling schedule (spec §3.8, §5)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from numpy.typing import NDArray

from cryorefine.geometry.euler import euler_to_matrix
from cryorefine.geometry.sampling import angular_step
from cryorefine.refine.state import Counters, RefineOptions, SamplingState

ANGLE_LIMIT = 30.0   # deg, where the accuracy search stops
SHIFT_LIMIT = 10.0   # px


def accuracy_limited_resolution(acc_rot: float, acc_trans: float, diameter: float) -> float:
    """Best resolution (Å) that alignments this accurate can support: the arc the angular error sweeps at the
    particle edge, π·D·acc_rot/360, or twice the translational error, whichever is worse."""
    return max(math.pi * diameter * acc_rot / 360.0, 2.0 * acc_trans)


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


@dataclass(frozen=True)
class SamplingDecision:
    """What the sampling update decided: fine_enough None = not evaluated; refined = the sampling became finer."""

    refined: bool
    fine_enough: bool | None
    note: str


def resolution_angular_step(particle_diameter: float, current_resolution: float) -> float:
    """The angular step (deg) the current resolution (1/Å) needs for a particle of this diameter (Å):
    360 / ⌈π d / res⌉, RELION's "requires orientationSampling of at least" (360 when nothing is resolved)."""
    if current_resolution <= 0:
        return 360.0
    return 360.0 / max(1, math.ceil(math.pi * particle_diameter * current_resolution))


def next_sampling(opts: RefineOptions, s: SamplingState, c: Counters) -> tuple[SamplingState, SamplingDecision]:
    """updateAngularSampling (auto-refine branch, §5.3–§5.5): the new sampling and the decision, from the
    counters' accuracies, changes and no-gain counts (pure; refine.counters applies the decision)."""
    acc_rot, acc_trans, delta_offset = c.acc_rot, c.acc_trans, c.changes_offset
    fine = angular_step(s.healpix_order + s.oversampling)
    theta_res = resolution_angular_step(opts.particle_diameter, c.current_resolution)
    go_res = (opts.auto_resol_angles and theta_res < fine and s.healpix_order + 1 != opts.auto_local_healpix_order) \
        or c.nr_iter_wo_resol_gain >= 1
    go_hid = opts.auto_ignore_angles or c.nr_iter_wo_large_changes >= 1
    if not (go_res and go_hid):
        why = []
        if not go_res:
            why.append("resolution still improving")
        if not go_hid:
            why.append("orientations/offsets still changing")
        return s, SamplingDecision(False, None, "sampling unchanged: " + " and ".join(why))
    if fine < 0.75 * acc_rot:
        return s, SamplingDecision(False, True, f"sampling unchanged: angular step {fine:g} deg is finer than "
                                                f"0.75 x estimated accuracy {acc_rot:g} deg")
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
    return new, SamplingDecision(True, False, f"sampling refined: HEALPix order {order} (fine step "
                                              f"{angular_step(order + s.oversampling):g} deg), "
                                              f"{'local' if local else 'global'} searches; estimated accuracy "
                                              f"{acc_rot:g} deg")


def initial_sampling(opts: RefineOptions, angpix: float) -> SamplingState:
    """The sampling of iteration 1 from the options (offsets converted from px of the model box to Å)."""
    order = opts.healpix_order
    local = order >= opts.auto_local_healpix_order
    return SamplingState(
        healpix_order=order, psi_step=angular_step(order), offset_range=opts.offset_range_px * angpix,
        offset_step=opts.offset_step_px * angpix, oversampling=opts.oversampling, local_searches=local,
        sigma_ang=2 * angular_step(order + opts.oversampling) if local else 0.0, perturb_factor=opts.perturb,
        perturb=0.0, healpix_order_original=order, offset_range_original=opts.offset_range_px * angpix,
        offset_step_original=opts.offset_step_px * angpix)


def perturbed(s: SamplingState, rng: np.random.Generator) -> SamplingState:
    """The sampling with this iteration's random perturbation ρ ∈ [−f, f] (one draw per iteration)."""
    f = s.perturb_factor
    rho = s.perturb + rng.uniform(f / 2, f)
    return replace(s, perturb=(rho + f) % (2 * f) - f if f > 0 else 0.0)
