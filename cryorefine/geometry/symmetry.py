"""RELION point groups (symmetries.cpp generator axes) and symmetry-aware angular distances.

Convention: `symmetry_matrices(sym)` is the set {R} of proper rotations with V(R·x) = V(x) for a map
with that symmetry; then the RELION Euler matrices A and A·R give the same projection, and the
viewing direction of A·R (its third row) is Rᵀ·d. The set is a group (closed under products and
inverses), so "R" or "Rᵀ" conventions give the same set; the identity comes first.
"""

from __future__ import annotations

import re
from functools import lru_cache

import numpy as np
from numpy.typing import ArrayLike, NDArray


# (fold, axis) generators of RELION's fill_symmetry_class (autorefine-spec §8.3).
_GENERATORS: dict[str, list[tuple[int, tuple[float, float, float]]]] = {
    "T": [(3, (0.0, 0.0, 1.0)), (2, (0.0, 0.816496, 0.577350))],
    "O": [(3, (0.5773502, 0.5773502, 0.5773502)), (4, (0.0, 0.0, 1.0))],
    "I2": [(2, (0.0, 0.0, 1.0)), (5, (0.525731114, 0.0, 0.850650807)),
           (3, (0.0, 0.356822076, 0.934172364))],
    "I1": [(2, (1.0, 0.0, 0.0)), (5, (0.85065080702670, 0.0, -0.5257311142635)),
           (3, (0.9341723640, 0.3568220765, 0.0))],
    "I3": [(2, (-0.5257311143, 0.0, 0.8506508070)), (5, (0.0, 0.0, 1.0)),
           (3, (-0.4911234778630044, 0.3568220764705179, 0.7946544753759428))],
    "I4": [(2, (0.5257311143, 0.0, 0.8506508070)), (5, (0.8944271932547096, 0.0, 0.4472135909903704)),
           (3, (0.4911234778630044, 0.3568220764705179, 0.7946544753759428))],
}
_GENERATORS["I"] = _GENERATORS["I2"]


def canonical_name(name: str) -> tuple[str, int]:
    """Normalise a --sym value -> (family, n): ('C', n), ('D', n), ('T', 12), ('O', 24), ('I2', 60), ...

    Accepts RELION's proper point groups Cn, Dn (n = 1..99), T, O, I, I1..I4, any case.
    """
    s = str(name).strip().upper()
    m = re.fullmatch(r"([CD])([0-9]{1,2})", s)
    if m and int(m.group(2)) >= 1:
        return m.group(1), int(m.group(2))
    if s in ("T", "O"):
        return s, {"T": 12, "O": 24}[s]
    if s in ("I", "I1", "I2", "I3", "I4"):
        return ("I2" if s == "I" else s), 60
    raise ValueError(f"{name}: unknown or unsupported point group")


def rotation_about_axis(axis: ArrayLike, angle_deg: float) -> NDArray[np.float64]:
    """Active right-handed rotation by angle_deg about a (normalised) axis (Rodrigues)."""
    u = np.asarray(axis, dtype=np.float64)
    u = u / np.linalg.norm(u)
    a = np.deg2rad(angle_deg)
    k = np.array([[0.0, -u[2], u[1]], [u[2], 0.0, -u[0]], [-u[1], u[0], 0.0]])
    return np.eye(3) + np.sin(a) * k + (1.0 - np.cos(a)) * (k @ k)


def _clean(m: NDArray[np.float64]) -> NDArray[np.float64]:
    """Snap entries within 1e-12 of 0 or ±1 (so axis 2-folds are exact sign flips)."""
    m = np.where(np.abs(m) < 1e-12, 0.0, m)
    return np.where(np.abs(np.abs(m) - 1.0) < 1e-12, np.sign(m), m) + 0.0   # + 0.0 turns −0 into 0


def _generator_axes(family: str, n: int) -> list[tuple[int, tuple[float, float, float]]]:
    if family == "C":
        return [(n, (0.0, 0.0, 1.0))]
    if family == "D":
        return [(n, (0.0, 0.0, 1.0)), (2, (1.0, 0.0, 0.0))]
    return _GENERATORS[family]


def _rotation_axis(r: NDArray[np.float64], ref: NDArray[np.float64]) -> NDArray[np.float64]:
    """Unit axis of rotation r (eigenvector of eigenvalue 1), sign chosen along ref."""
    w, v = np.linalg.eig(r)
    a = np.real(v[:, np.argmin(np.abs(w - 1.0))])
    a = a / np.linalg.norm(a)
    return a if a @ ref >= 0 else -a


def _frame(a1: NDArray[np.float64], a2: NDArray[np.float64]) -> NDArray[np.float64]:
    """Orthonormal frame (columns) from axis a1 and the part of a2 orthogonal to it."""
    e1 = a1 / np.linalg.norm(a1)
    e2 = a2 - (a2 @ e1) * e1
    e2 = e2 / np.linalg.norm(e2)
    return np.stack([e1, e2, np.cross(e1, e2)], axis=1)


def _nearest_rotation(m: NDArray[np.float64]) -> NDArray[np.float64]:
    """Closest proper rotation (polar factor), removing the drift of long generator products."""
    u, _, vt = np.linalg.svd(m)
    return _clean(u @ vt)


@lru_cache(maxsize=32)
def _group(family: str, n: int) -> NDArray[np.float64]:
    spec = [(fold, np.asarray(ax, float) / np.linalg.norm(ax)) for fold, ax in _generator_axes(family, n) if fold > 1]
    gens = [_clean(rotation_about_axis(ax, 360.0 / fold)) for fold, ax in spec]
    group = [np.eye(3)]
    frontier = [np.eye(3)]
    while frontier:
        new = []
        for g in frontier:
            for h in gens:
                x = _nearest_rotation(h @ g)
                if not any(np.abs(x - y).max() < 1e-4 for y in group):
                    group.append(x)
                    new.append(x)
        frontier = new
    mats = _polish(np.array(group))
    if len(spec) > 1:
        # Polishing may tilt the group by ~1e-7; rotate it back so that the first generator axis is
        # exactly RELION's (e.g. the 3-fold of T on z) and the second lies in RELION's plane.
        flat = mats.reshape(len(mats), 9)
        pol = [mats[np.abs(flat - g.ravel()).max(axis=1).argmin()] for g in gens[:2]]
        f_pol = _frame(_rotation_axis(pol[0], spec[0][1]), _rotation_axis(pol[1], spec[1][1]))
        q = _frame(spec[0][1], spec[1][1]) @ f_pol.T
        mats = np.array([_clean(q @ m @ q.T) for m in mats])
    mats.setflags(write=False)
    return mats


def _polish(g: NDArray[np.float64], iterations: int = 8) -> NDArray[np.float64]:
    """Make an almost-closed set (generator axes are given to ~7 digits) an exact group.

    With the multiplication table fixed, ρ(g) ← polar((1/|G|) Σ_h ρ(h)ᵀ ρ(h·g)) squares the closure
    error at each step (the averaging trick for approximate representations); the identity stays put.
    """
    flat = g.reshape(len(g), 9)
    prod = np.einsum("aij,bjk->abik", g, g).reshape(len(g), len(g), 9)
    table = np.abs(prod[:, :, None, :] - flat[None, None, :, :]).max(axis=3).argmin(axis=2)   # g_a g_b = g_table[a,b]
    for _ in range(iterations):
        m = np.einsum("hji,hgjk->gik", g, g[table]) / len(g)
        g = np.array([_nearest_rotation(x) for x in m])
        err = np.abs(np.einsum("aij,bjk->abik", g, g) - g[table]).max()
        if err < 1e-15:
            break
    return g


def symmetry_matrices(name: str) -> NDArray[np.float64]:
    """Rotations (G, 3, 3) of RELION point group `name` (identity first), closed under products."""
    return _group(*canonical_name(name)).copy()


def symmetry_order(name: str) -> int:
    """Number of operators |G| of point group `name`."""
    family, n = canonical_name(name)
    if family == "C":
        return n
    if family == "D":
        return 2 * n
    return n


def _rotation_angle_deg(q: NDArray[np.float64]) -> NDArray[np.float64]:
    """Rotation angle (deg) of rotation matrices (..., 3, 3), accurate also for tiny angles."""
    cos = (np.trace(q, axis1=-2, axis2=-1) - 1.0) / 2.0
    axial = np.stack([q[..., 2, 1] - q[..., 1, 2], q[..., 0, 2] - q[..., 2, 0], q[..., 1, 0] - q[..., 0, 1]], -1)
    sin = np.linalg.norm(axial, axis=-1) / 2.0
    return np.rad2deg(np.arctan2(sin, cos))


def _best_operator(a_est: NDArray, a_true: NDArray, sym_mats: NDArray) -> NDArray[np.int64]:
    """Index of R maximising trace(A_est (A_true R)ᵀ) = Σ (A_trueᵀ A_est) ∘ R, per particle."""
    m = np.einsum("nji,njk->nik", a_true, a_est)          # A_trueᵀ · A_est
    tr = np.einsum("nik,gik->ng", m, sym_mats)
    return np.argmax(tr, axis=1)


def angular_error_deg(a_est: ArrayLike, a_true: ArrayLike, sym_mats: ArrayLike) -> NDArray[np.float64]:
    """Angle (deg) of A_est·(A_true·R)ᵀ minimised over R in sym_mats, per particle (as bench score.py)."""
    a_est, a_true, g = (np.asarray(x, dtype=np.float64) for x in (a_est, a_true, sym_mats))
    a_est, a_true = a_est.reshape(-1, 3, 3), a_true.reshape(-1, 3, 3)
    best = _best_operator(a_est, a_true, g)
    q = a_est @ np.transpose(a_true @ g[best], (0, 2, 1))
    return _rotation_angle_deg(q)


def view_error_deg(a_est: ArrayLike, a_true: ArrayLike, sym_mats: ArrayLike) -> NDArray[np.float64]:
    """Angle (deg) between viewing directions (third rows) of A_est and A_true·R, R the best full-rotation match."""
    a_est, a_true, g = (np.asarray(x, dtype=np.float64) for x in (a_est, a_true, sym_mats))
    a_est, a_true = a_est.reshape(-1, 3, 3), a_true.reshape(-1, 3, 3)
    best = _best_operator(a_est, a_true, g)
    d_est, d_true = a_est[:, 2, :], (a_true @ g[best])[:, 2, :]
    cross = np.linalg.norm(np.cross(d_est, d_true), axis=-1)
    return np.rad2deg(np.arctan2(cross, np.einsum("ni,ni->n", d_est, d_true)))


def relion_angular_distance_deg(a_old: ArrayLike, a_new: ArrayLike, sym_mats: ArrayLike) -> NDArray[np.float64]:
    """RELION calculateAngularDistance (deg): min over R of mean_i angle(row_i A_old, row_i A_new·R)."""
    a_old, a_new, g = (np.asarray(x, dtype=np.float64) for x in (a_old, a_new, sym_mats))
    a_old, a_new = a_old.reshape(-1, 3, 3), a_new.reshape(-1, 3, 3)
    best = np.full(len(a_old), np.inf)
    for r in g:                                         # |G| ≤ 60: a loop over operators, not particles
        b = a_new @ r
        # angle between corresponding rows; atan2(|u×v|, u·v) is acos(u·v) without its loss near 0
        dots = np.einsum("nij,nij->ni", a_old, b)
        cross = np.linalg.norm(np.cross(a_old, b, axis=-1), axis=-1)
        dist = np.rad2deg(np.arctan2(cross, dots)).mean(axis=1)
        best = np.minimum(best, dist)
    return best
