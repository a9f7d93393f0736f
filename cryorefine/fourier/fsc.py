"""Fourier shell correlation and resolution read-outs (RELION conventions, spec §0, §4.3, §12).

Shells are r = round(|k|) in Fourier pixels of the N-box, r = 0 … N/2; resolution of shell r is N·p/r Å.
"""

from __future__ import annotations

import numpy as np
import scipy.fft as sfft
from numpy.typing import NDArray

from cryorefine.fourier.transforms import freq_radius, rfft_freqs_3d, shell_index, shell_index_3d


def shell_correlation(a: NDArray, b: NDArray, shell: NDArray[np.int64], n_shells: int) -> NDArray[np.float64]:
    """Σ Re(a·b*) / sqrt(Σ|a|²·Σ|b|²) per shell 0..n_shells−1 of flat complex arrays (0 for an empty shell);
    elements with shell ≥ n_shells are ignored."""
    keep = shell < n_shells
    a = np.asarray(a, dtype=np.complex128)[keep]
    b = np.asarray(b, dtype=np.complex128)[keep]
    shell = shell[keep]
    num = np.bincount(shell, (a * b.conj()).real, minlength=n_shells)
    d1 = np.bincount(shell, np.abs(a) ** 2, minlength=n_shells)
    d2 = np.bincount(shell, np.abs(b) ** 2, minlength=n_shells)
    den = np.sqrt(d1 * d2)
    out = np.zeros(n_shells)
    np.divide(num, den, out=out, where=den > 0)
    return out


def fsc_ft(ft1: NDArray, ft2: NDArray, n: int | None = None) -> NDArray[np.float64]:
    """FSC of two half-complex transforms ((..., N//2+1) rfftn layout of an N-box); shells 0..N/2, float64 sums.

    Every stored element counts (like RELION's getFSC, the duplicated kx = 0 half included).
    """
    n = ft1.shape[0] if n is None else n
    r = shell_index(tuple([n] * ft1.ndim)).ravel()
    return shell_correlation(np.ravel(ft1), np.ravel(ft2), r, n // 2 + 1)


def fsc(map1: NDArray, map2: NDArray) -> NDArray[np.float64]:
    """FSC curve (N//2+1,) of two real 2D or 3D maps of equal cubic/square size."""
    map1 = np.asarray(map1, dtype=np.float64)
    map2 = np.asarray(map2, dtype=np.float64)
    if map1.shape != map2.shape:
        raise ValueError(f"fsc: shapes differ {map1.shape} vs {map2.shape}")
    return fsc_ft(sfft.rfftn(map1, workers=-1), sfft.rfftn(map2, workers=-1), map1.shape[0])


def shell_columns(n: int, box: int, angpix: float) -> dict[str, NDArray]:
    """rlnSpectralIndex, rlnResolution (1/Å) and rlnAngstromResolution of shells 0..n−1, as RELION's postprocess
    and image_handler --fsc write them (shell 0: 999 Å, so 1/999 in 1/Å)."""
    i = np.arange(n)
    ang = np.where(i > 0, box * angpix / np.maximum(i, 1), 999.0)
    return {"rlnSpectralIndex": i, "rlnResolution": 1.0 / ang, "rlnAngstromResolution": ang}


def shell_resolutions(box: int, angpix: float) -> NDArray[np.float64]:
    """Resolution in Å of shells 0..box/2 (shell 0 = inf)."""
    r = np.arange(box // 2 + 1, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.where(r > 0, box * angpix / np.maximum(r, 1e-300), np.inf)


def resolution_at(fsc_curve: NDArray, threshold: float, box: int, angpix: float) -> float:
    """RELION style: resolution (Å) of the last shell before the curve first drops below `threshold`.

    Shell 0 is skipped; a curve that never drops gives Nyquist; one below at shell 1 gives inf.
    """
    f = np.asarray(fsc_curve, dtype=np.float64)
    below = np.nonzero(f[1:] < threshold)[0]
    last = int(below[0]) if below.size else f.size - 1  # below[0] + 1 is the first shell under
    return float(box * angpix / last) if last > 0 else float("inf")


def crossing_resolution(fsc_curve: NDArray, threshold: float, box: int, angpix: float) -> float:
    """Resolution (Å) where the curve first drops below `threshold`, linear between shells (as score.py)."""
    f = np.asarray(fsc_curve, dtype=np.float64)
    for i in range(1, f.size):
        if f[i] < threshold:
            x = i - 1 + (f[i - 1] - threshold) / (f[i - 1] - f[i]) if f[i - 1] != f[i] else float(i)
            return float(box * angpix / x) if x > 0 else float("inf")
    return 2.0 * angpix


def randomise_phases_beyond(volume: NDArray, shell: int, rng: np.random.Generator) -> NDArray[np.float64]:
    """Map with the phases of every Fourier component with |k| ≥ shell replaced by uniform random ones (RELION's
    randomizePhasesBeyond tests |k|² ≥ shell², not the rounded shell index: half of shell `shell` keeps its phases)."""
    volume = np.asarray(volume, dtype=np.float64)
    ft = sfft.rfftn(volume, workers=-1)
    sel = np.broadcast_to(freq_radius(volume.shape) >= shell, ft.shape)
    phases = rng.uniform(0.0, 2.0 * np.pi, size=int(sel.sum()))
    ft[sel] = np.abs(ft[sel]) * np.exp(1j * phases)
    return sfft.irfftn(ft, s=volume.shape, workers=-1)


def fsc_sigma(box: int, n_sym: int = 1) -> NDArray[np.float64]:
    """Standard deviation 1/√n of the FSC of two independent noise maps per shell 0..N/2, with n the voxels of the
    shell on the full N³ grid (2 × the half-complex count) divided by the symmetry order (van Heel & Schatz 2005)."""
    nb = box // 2 + 1
    counts = 2 * np.bincount(shell_index_3d(box).ravel(), minlength=nb)[:nb]
    return 1.0 / np.sqrt(np.maximum(counts / max(n_sym, 1), 1.0))


def _null_rotations() -> NDArray[np.int64]:
    """The 14 proper rotations of the cube of order 3 or 4 (R² ≠ I), as signed permutation matrices (14, 3, 3)."""
    import itertools
    mats = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            m = np.zeros((3, 3), np.int64)
            m[range(3), perm] = signs
            if round(np.linalg.det(m)) == 1 and not np.array_equal(m @ m, np.eye(3, dtype=np.int64)):
                mats.append(m)
    return np.array(mats)


NULL_ROTATIONS = _null_rotations()


def _self_match_planes(rot: NDArray, sym_mats: NDArray | None) -> NDArray[np.float64] | None:
    """Unit normals of the planes of Fourier pixels k whose image under M = −rot lands on a copy of k in a map
    symmetrised with `sym_mats` (there d(Mk) = d(k): a positive correlation that is no draw of chance), or None when
    rot is itself a symmetry operation (then every k matches).

    d(Mk) = conj(d(gᵀ rot k)) for every g in the group, and conj(d(−k)) = d(k); so k matches where h = gᵀ·rot
    turns it into −k: h a half turn and k in the plane normal to its axis."""
    if sym_mats is None:
        return np.zeros((0, 3))
    normals = []
    for g in np.asarray(sym_mats, np.float64).reshape(-1, 3, 3):
        h = g.T @ rot
        if np.allclose(h, np.eye(3), atol=1e-6):
            return None
        if abs(np.trace(h) + 1.0) < 1e-6:                    # a half turn: (h + I)/2 projects onto its axis
            axis = (h + np.eye(3))[np.argmax(np.abs(np.diag(h + np.eye(3))))]
            axis = axis / np.linalg.norm(axis)
            normals.append(axis if axis[np.argmax(np.abs(axis) > 1e-6)] > 0 else -axis)    # n and −n: one plane
    return np.unique(np.round(normals, 9), axis=0) if normals else np.zeros((0, 3))


# Fourier pixels within this distance of a matching plane are left out: the M-step's symmetrisation interpolates,
# so a voxel also correlates with its neighbours' symmetry copies
_PLANE_TOLERANCE = 1.5


def fsc_null_sigma(a1: NDArray, a2: NDArray, r_max: float,
                   sym_mats: NDArray | None = None) -> NDArray[np.float64]:
    """Per shell 0..N/2, the spread of the FSC of two maps with no common signal and the voxel-to-voxel
    correlations of these half maps: with d = a1 − a2 (half-complex N-grids, rfftn layout, x last), the RMS over
    the improper operations M = −R, R in NULL_ROTATIONS, of the shell correlation of d(k) with d(Mk); 0 beyond r_max.

    d holds no common signal by construction. M maps Fourier pixels to pixels of the same shell exactly and keeps
    neighbours neighbours, so each draw keeps the correlations that broad posteriors (an image smeared over
    neighbouring voxels) and masks give; as M² ≠ I no voxel pair is counted twice. Halves symmetrised with the
    point group `sym_mats` ((n, 3, 3), acting on (x, y, z)) match their own copies under some M: an R of the
    group is no draw (all 14 for O: then the result is 0 and callers use 1/√(n/|G|)), and the planes where
    another M meets a copy of k (_self_match_planes) are left out, the draw scaled to the whole shell's voxel count.
    1/√n (fsc_sigma) underestimates this spread when voxels are not independent.
    """
    n = a1.shape[0]
    nb = n // 2 + 1
    rad = freq_radius(a1.shape[:2] + (n,))
    sel = rad <= r_max
    shell = np.rint(rad[sel]).astype(np.int64)
    k = np.stack([g[sel] for g in rfft_freqs_3d(n)[::-1]]).astype(np.int32)    # (kx, ky, kz) of the voxels
    diff = (np.asarray(a1, np.complex128) - a2).astype(np.complex64)
    v1 = diff[sel]
    flat = diff.ravel()
    power = np.abs(v1) ** 2
    count_all = np.bincount(shell, minlength=nb).astype(np.float64)
    total = np.zeros(nb)
    draws = 0
    for rot in NULL_ROTATIONS:
        planes = _self_match_planes(rot.astype(np.float64), sym_mats)
        if planes is None:
            continue
        keep = np.ones(len(v1), bool)
        for normal in planes.astype(np.float32):
            keep &= np.abs(normal[0] * k[0] + normal[1] * k[1] + normal[2] * k[2]) >= _PLANE_TOLERANCE
        axis, sign = np.nonzero(rot)[1], rot[np.nonzero(rot)]           # (Mk)_i = −sign_i · k_axis(i)
        qx, qy, qz = (-sign[i] * k[axis[i]] for i in range(3))
        flip = qx < 0                                                    # stored at −q, conjugated
        qx, qy, qz = np.where(flip, -qx, qx), np.where(flip, -qy, qy), np.where(flip, -qz, qz)
        v2 = flat[((qz % n).astype(np.int64) * n + qy % n) * nb + qx]     # int64: no overflow at large boxes
        cross = np.where(flip, (v1 * v2).real, (v1 * v2.conj()).real)
        w = keep.astype(np.float64)
        num = np.bincount(shell, cross * w, minlength=nb)
        den = np.bincount(shell, power * w, minlength=nb)     # M keeps shells: Σ|d(Mk)|² ≈ Σ|d(k)|² over them
        f = np.zeros(nb)
        np.divide(num, den, out=f, where=den > 0)
        kept = np.bincount(shell, w, minlength=nb)
        f *= np.sqrt(np.divide(kept, count_all, out=np.zeros(nb), where=count_all > 0))   # to the whole shell
        total += f * f
        draws += 1
    return np.sqrt(total / draws) if draws else np.zeros(nb)


def first_shell_below(fsc_curve: NDArray, threshold: float) -> int:
    """First shell r > 0 with FSC < threshold (len(curve) if it never drops)."""
    f = np.asarray(fsc_curve)
    below = np.nonzero(f[1:] < threshold)[0]
    return int(below[0] + 1) if below.size else int(f.size)


def phase_randomised_fsc(half1: NDArray, half2: NDArray, mask: NDArray, randomise_from: int,
                         seed: int = 0) -> NDArray[np.float64]:
    """FSC of the masked halves after randomising their phases from shell `randomise_from` on (§12 step 2)."""
    rng = np.random.default_rng(seed)
    r1 = randomise_phases_beyond(half1, randomise_from, rng)
    r2 = randomise_phases_beyond(half2, randomise_from, rng)
    return fsc(r1 * mask, r2 * mask)


def masked_corrected_fsc(half1: NDArray, half2: NDArray, mask: NDArray, angpix: float,
                         randomize_at_fsc: float = 0.8, seed: int = 0,
                         randomise_from: int | None = None) -> dict[str, NDArray | int | float]:
    """Postprocessing FSCs (spec §12 steps 1–3): unmasked, masked, phase-randomised masked, corrected ("true").

    FSC_true = FSC_masked for r < r_rand + 2, else (FSC_masked − FSC_rand)/(1 − FSC_rand), r_rand = first shell
    (> 0) where the unmasked FSC < randomize_at_fsc, or `randomise_from` when given (--randomize_at_A).
    Also returns r_rand and the 0.143 resolution of FSC_true.
    """
    half1 = np.asarray(half1, dtype=np.float64)
    half2 = np.asarray(half2, dtype=np.float64)
    mask = np.asarray(mask, dtype=np.float64)
    box = half1.shape[0]
    unmasked = fsc(half1, half2)
    masked = fsc(half1 * mask, half2 * mask)
    if randomise_from is None:
        r_rand = min(first_shell_below(unmasked, randomize_at_fsc), box // 2)
    else:
        r_rand = int(randomise_from)
    rand = phase_randomised_fsc(half1, half2, mask, r_rand, seed)
    true = masked.copy()
    hi = np.arange(true.size) >= r_rand + 2
    with np.errstate(divide="ignore", invalid="ignore"):
        corr = (masked - rand) / (1.0 - rand)
    true[hi] = np.where(np.isfinite(corr[hi]), corr[hi], 0.0)
    return {"fsc_unmasked": unmasked, "fsc_masked": masked, "fsc_random": rand, "fsc_true": true,
            "randomise_from": r_rand, "resolution_A": resolution_at(true, 0.143, box, angpix)}
