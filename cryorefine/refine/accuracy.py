"""Expected angular and translational accuracies from a reference and particles' CTFs (spec §5.1)."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from cryorefine.fourier.projector import Projector, project
from cryorefine.geometry.euler import euler_to_matrix
from cryorefine.refine.autosampling import (ANGLE_LIMIT, SHIFT_LIMIT, angle_schedule, first_exceeding,
                                            perturbed_pose_matrices, shift_schedule)
from cryorefine.refine.data import ctf_on_pixels
from cryorefine.refine.pixels import PixelSet, optics_size, pixel_set, shift_phases
from cryorefine.refine.state import RunState


def particle_accuracies(proj: Projector, ps: PixelSet, ctf: NDArray[np.float32], inv_sigma2: NDArray[np.float64],
                        rot: NDArray, tilt: NDArray, psi: NDArray, rng: np.random.Generator,
                        project=project) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Per particle (rotation deg, translation px): the perturbation at which Σ|CTF(P−P')|²/2σ² first exceeds
    −ln 0.01 (spec §5.1).

    ctf is (n, m) on the pixel set `ps` (shells ≥ 1 counted), poses are the particles' current ones; shifts are in
    pixels of the box of `ps`.
    """
    isig = inv_sigma2[ps.shell].astype(np.float32)
    isig[ps.shell == 0] = 0.0
    a0 = euler_to_matrix(rot, tilt, psi)
    p0 = project(proj, a0, ps.kx_model, ps.ky_model)                           # (n, m)
    sched_a = angle_schedule()
    mats = perturbed_pose_matrices(rot, tilt, psi, sched_a, rng)              # (n, S, 3, 3)
    n, ns = mats.shape[:2]
    pe = project(proj, mats.reshape(-1, 3, 3), ps.kx_model, ps.ky_model).reshape(n, ns, -1)
    w = (ctf * ctf * isig[None, :])[:, None, :]
    diff_a = 0.5 * (np.abs(pe - p0[:, None, :]) ** 2 * w).sum(-1)
    acc_rot = first_exceeding(diff_a, sched_a, ANGLE_LIMIT)

    sched_t = shift_schedule()
    axis = rng.integers(0, 2, size=n)
    p0_pow = (np.abs(p0) ** 2 * ctf * ctf * isig[None, :])                    # (n, m)
    shifts_x = np.stack([sched_t, np.zeros_like(sched_t)], -1)
    shifts_y = np.stack([np.zeros_like(sched_t), sched_t], -1)
    fac_x = np.abs(1 - shift_phases(ps, shifts_x)) ** 2                          # (S, m)
    fac_y = np.abs(1 - shift_phases(ps, shifts_y)) ** 2
    diff_t = 0.5 * np.where(axis[:, None] == 0, p0_pow @ fac_x.T, p0_pow @ fac_y.T)
    acc_trans = first_exceeding(diff_t, sched_t, SHIFT_LIMIT)
    return acc_rot.astype(np.float64), acc_trans.astype(np.float64)


def expected_accuracies(proj: Projector, ps: PixelSet, ctf: NDArray[np.float32], inv_sigma2: NDArray[np.float64],
                        rot: NDArray, tilt: NDArray, psi: NDArray, angpix: float,
                        rng: np.random.Generator, project=project) -> tuple[float, float]:
    """(acc_rot deg, acc_trans Å): the means of particle_accuracies over particles of one optics group."""
    acc_rot, acc_trans = particle_accuracies(proj, ps, ctf, inv_sigma2, rot, tilt, psi, rng, project)
    return float(acc_rot.mean()), float(acc_trans.mean() * angpix)


def accuracy_sample(subset: NDArray[np.int64], rng: np.random.Generator, n_max: int = 100) -> NDArray[np.int64]:
    """Rows of min(n_max, n) half-1 particles drawn at random without replacement (all optics groups), sorted."""
    rows = np.nonzero(subset == 1)[0]
    return np.sort(rng.choice(rows, size=min(n_max, len(rows)), replace=False))


def estimate_accuracy(state: RunState, proj: Projector, rng: np.random.Generator) -> tuple[float, float]:
    """Accuracy of rotations (deg) and translations (Å) averaged over up to 100 random half-1 particles of all
    optics groups, each group on its own pixel set, CTFs, 1/σ² and pixel size, against the half-1 reference
    (spec §5.1)."""
    data = state.data
    rows = accuracy_sample(data.subset, rng)      # half-sets are never empty (refine.command checks)
    rots, shifts_A = [], []
    for o in np.unique(data.optics_index[rows]):
        sel = rows[data.optics_index[rows] == o]
        og = data.optics[int(o)]
        ps = pixel_set(og.box, optics_size(state.counters.current_size, og.box, og.model_scale), og.model_scale,
                       og.mag)
        ctf = ctf_on_pixels(data, sel, ps.kx, ps.ky, state.opts.ctf)
        acc_rot, acc_trans = particle_accuracies(proj, ps, ctf, 1.0 / state.models[0].sigma2[int(o)],
                                                 state.poses.rot[sel], state.poses.tilt[sel], state.poses.psi[sel],
                                                 rng, project=state.backend.project)
        rots.append(acc_rot)
        shifts_A.append(acc_trans * og.angpix)
    return float(np.concatenate(rots).mean()), float(np.concatenate(shifts_A).mean())
