"""Hidden-variable change statistics and the auto-refine convergence test (spec §5.2, §6.1)."""

from __future__ import annotations

import numpy as np

from cryorefine.geometry.euler import euler_to_matrix
from cryorefine.geometry.symmetry import relion_angular_distance_deg
from cryorefine.refine.state import Counters, Poses


def pose_changes(old: Poses, new: Poses, sym_mats: np.ndarray) -> tuple[float, float]:
    """(Δang deg, Δoff Å): mean symmetry-aware angular distance and sqrt(mean |Δo|²/2) over all particles."""
    a_old = euler_to_matrix(old.rot, old.tilt, old.psi)
    a_new = euler_to_matrix(new.rot, new.tilt, new.psi)
    d_ang = float(np.mean(relion_angular_distance_deg(a_old, a_new, sym_mats)))
    d2 = (new.origin_x - old.origin_x) ** 2 + (new.origin_y - old.origin_y) ** 2
    return d_ang, float(np.sqrt(np.mean(d2) / 2.0))


def update_change_counters(c: Counters, d_ang: float, d_off: float, fine_angle: float, fine_step: float) -> None:
    """updateOverallChangesInHiddenVariables: count iterations without large changes, track the minima."""
    d_cls = 0.0
    stable = (1.03 * d_cls >= c.smallest_changes_class) \
        and (d_off / fine_step < 0.40 or 1.03 * d_off >= c.smallest_changes_offset) \
        and (d_ang / fine_angle < 0.40 or 1.03 * d_ang >= c.smallest_changes_orient)
    c.nr_iter_wo_large_changes = c.nr_iter_wo_large_changes + 1 if stable else 0
    c.smallest_changes_class = min(c.smallest_changes_class, d_cls)
    c.smallest_changes_offset = min(c.smallest_changes_offset, d_off)
    c.smallest_changes_orient = min(c.smallest_changes_orient, d_ang)
    c.changes_orient, c.changes_offset = d_ang, d_off


def has_converged(c: Counters, auto_ignore_angles: bool) -> bool:
    """checkConvergence: fine-enough sampling, no resolution gain, and (unless ignored) stable hidden variables."""
    return c.has_fine_enough_angular_sampling and c.nr_iter_wo_resol_gain >= 1 \
        and (auto_ignore_angles or c.nr_iter_wo_large_changes >= 1)
