"""Hidden-variable change statistics between two iterations (spec §5.2); the counters they feed are in
refine.counters."""

from __future__ import annotations

import numpy as np

from cryorefine.geometry.euler import euler_to_matrix
from cryorefine.geometry.symmetry import relion_angular_distance_deg
from cryorefine.refine.state import Poses


def pose_changes(old: Poses, new: Poses, sym_mats: np.ndarray) -> tuple[float, float]:
    """(Δang deg, Δoff Å): mean symmetry-aware angular distance and sqrt(mean |Δo|²/2) over all particles."""
    a_old = euler_to_matrix(old.rot, old.tilt, old.psi)
    a_new = euler_to_matrix(new.rot, new.tilt, new.psi)
    d_ang = float(np.mean(relion_angular_distance_deg(a_old, a_new, sym_mats)))
    d2 = (new.origin_x - old.origin_x) ** 2 + (new.origin_y - old.origin_y) ** 2
    return d_ang, float(np.sqrt(np.mean(d2) / 2.0))
