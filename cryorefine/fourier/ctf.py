"""RELION's contrast transfer function (`CTF::getCTF`, spec §1.3), vectorised over particles.

Convention: protein positive, so CTF(0) = +scale·Q0; frequency of Fourier pixel k of an N-box with
pixel p is k/(N·p) 1/Å; defoci in Å (positive = underfocus), angles in degrees.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numba
import numpy as np
from numpy.typing import ArrayLike, NDArray

from cryorefine.errors import InputError
from cryorefine.fourier.transforms import rfft_freqs_2d

# optional particle columns and the value RELION assumes when they are absent
_PARTICLE_DEFAULTS = {"rlnPhaseShift": 0.0, "rlnCtfBfactor": 0.0, "rlnCtfScalefactor": 1.0, "rlnDefocusAngle": 0.0}
# the one per-particle CTF column that must be there: RELION's CTF::readByGroup takes a missing rlnDefocusV as
# rlnDefocusU (no astigmatism) and a missing rlnDefocusAngle as 0, as files of other programs often have them
CTF_REQUIRED_COLUMNS = ("rlnDefocusU",)


@dataclass
class CtfParams:
    """Per-particle CTF parameters, each a float64 array of length n (units as in the STAR file)."""

    defocus_u: NDArray[np.float64]           # Å
    defocus_v: NDArray[np.float64]           # Å
    defocus_angle: NDArray[np.float64]       # deg
    voltage: NDArray[np.float64]             # kV
    cs: NDArray[np.float64]                  # mm
    amplitude_contrast: NDArray[np.float64]  # fraction Q0
    phase_shift: NDArray[np.float64]         # deg
    bfactor: NDArray[np.float64]             # Å²
    scale: NDArray[np.float64]               # K

    def __post_init__(self) -> None:
        arrays = {f.name: np.atleast_1d(np.asarray(getattr(self, f.name), dtype=np.float64)) for f in fields(self)}
        n = max(a.size for a in arrays.values())
        for name, a in arrays.items():
            setattr(self, name, np.broadcast_to(a, (n,)).astype(np.float64, copy=True))

    def __len__(self) -> int:
        return self.defocus_u.size

    def subset(self, rows: ArrayLike) -> "CtfParams":
        """The parameters of the particles at positions `rows`."""
        rows = np.asarray(rows)
        return CtfParams(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})


def electron_wavelength(voltage_kv: ArrayLike) -> NDArray[np.float64]:
    """Relativistic electron wavelength λ in Å for an acceleration voltage in kV (RELION's constants)."""
    v = np.asarray(voltage_kv, dtype=np.float64) * 1e3
    return 12.2643247 / np.sqrt(v * (1.0 + v * 0.978466e-6))


def ctf_params_from_table(table, rows: ArrayLike | None = None) -> CtfParams:
    """CtfParams of the particles of a ParticleTable (optics values looked up per particle's optics group)."""
    from cryorefine.io.star import particle_optics

    parts = table.particles
    name = str(getattr(table, "path", None) or "particles STAR file")
    missing = [c for c in CTF_REQUIRED_COLUMNS if c not in parts.columns]
    if missing:
        raise InputError(f"{name}: no {', '.join(missing)} column (needed for CTF correction)")
    idx = np.arange(len(parts)) if rows is None else np.asarray(rows)

    def col(label: str) -> NDArray[np.float64]:
        if label in parts.columns:
            return np.asarray(parts[label].to_numpy(dtype=np.float64))[idx]
        return np.full(idx.size, _PARTICLE_DEFAULTS[label])

    def optics(label: str) -> NDArray[np.float64]:
        return np.asarray(particle_optics(table, label), dtype=np.float64)[idx]

    defocus_u = col("rlnDefocusU")
    return CtfParams(
        defocus_u=defocus_u, defocus_v=col("rlnDefocusV") if "rlnDefocusV" in parts.columns else defocus_u.copy(),
        defocus_angle=col("rlnDefocusAngle"),
        voltage=optics("rlnVoltage"), cs=optics("rlnSphericalAberration"),
        amplitude_contrast=optics("rlnAmplitudeContrast"),
        phase_shift=col("rlnPhaseShift"), bfactor=col("rlnCtfBfactor"), scale=col("rlnCtfScalefactor"),
    )


def _coefficients(params: CtfParams, box: ArrayLike, angpix: ArrayLike) -> NDArray[np.float64]:
    """Per particle (cxx, cyy, cxy, c4, c0, cb, scale) with γ = cxx·kx² + cyy·ky² + cxy·kx·ky + c4·|k|⁴ + c0
    and the envelope exp(cb·|k|²), for k in Fourier pixels of the particle's box."""
    n = len(params)
    lam = electron_wavelength(params.voltage)
    s = 1.0 / (np.broadcast_to(np.asarray(box, np.float64), (n,)) * np.broadcast_to(np.asarray(angpix, np.float64), (n,)))
    s2 = s * s
    a = np.deg2rad(params.defocus_angle)
    ca, sa = np.cos(a), np.sin(a)
    du, dv = params.defocus_u, params.defocus_v
    # Δf(u)|u|² = ΔU (ux cosα + uy sinα)² + ΔV (−ux sinα + uy cosα)², expanded in ux, uy
    dxx = du * ca * ca + dv * sa * sa
    dyy = du * sa * sa + dv * ca * ca
    dxy = 2.0 * (du - dv) * ca * sa
    k1 = -np.pi * lam * s2
    q0 = params.amplitude_contrast
    c4 = 0.5 * np.pi * params.cs * 1e7 * lam ** 3 * s2 * s2
    c0 = -np.deg2rad(params.phase_shift) - np.arctan(q0 / np.sqrt(1.0 - q0 * q0))
    cb = -params.bfactor * s2 / 4.0
    return np.ascontiguousarray(np.stack([k1 * dxx, k1 * dyy, k1 * dxy, c4, c0, cb, params.scale], axis=1))


@numba.njit(parallel=True, cache=True, fastmath=True)
def _ctf_kernel(coef, kx, ky, goff, absolute, intact_first_peak, only_flip, out):  # pragma: no cover - compiled
    n, m = out.shape
    stride = 1 if kx.shape[0] > 1 else 0
    gstride = 1 if goff.shape[0] > 1 else 0
    two_pi = 2.0 * np.pi
    half_pi = 0.5 * np.pi
    for i in numba.prange(n):
        cxx = coef[i, 0]
        cyy = coef[i, 1]
        cxy = coef[i, 2]
        c4 = coef[i, 3]
        c0 = coef[i, 4]
        cb = np.float32(coef[i, 5])
        scale = np.float32(coef[i, 6])
        row = i * stride
        for j in range(m):
            x = kx[row, j]
            y = ky[row, j]
            r2 = x * x + y * y
            # phase in float64 (it reaches hundreds of radians), reduced to [-π, π) so float32 sin is exact enough
            gamma = cxx * x * x + cyy * y * y + cxy * x * y + c4 * r2 * r2 + c0 + goff[j * gstride]
            # RELION's order (CTF::getCTF): 1 before the first peak (|γ| < π/2, the unreduced phase), damping,
            # then |·| or the sign, then the scale
            if intact_first_peak and abs(gamma) < half_pi:
                v = np.float32(1.0)
            else:
                gamma -= two_pi * np.floor(gamma / two_pi + 0.5)
                v = -np.sin(np.float32(gamma))
            v *= np.exp(cb * np.float32(r2))
            if absolute:
                v = abs(v)
            elif only_flip:
                v = np.float32(-1.0) if v < 0.0 else np.float32(1.0)
            v *= scale
            # RELION never lets the CTF be exactly 0 (later divisions); sign of 0 counts as +
            if abs(v) < 1e-8:
                v = np.float32(1e-8) if v >= 0.0 else np.float32(-1e-8)
            out[i, j] = v


def ctf_values(params: CtfParams, kx: ArrayLike, ky: ArrayLike, box: ArrayLike, angpix: ArrayLike,
               gamma_offset: ArrayLike | None = None, absolute: bool = False, intact_first_peak: bool = False,
               only_flip_phases: bool = False) -> NDArray[np.float32]:
    """(n, m) CTF of n particles at Fourier pixels (kx, ky) of their `box`-sized images (pixel `angpix` Å).

    kx, ky: (m,) shared by all particles or (n, m) per particle; box, angpix: scalars or (n,) arrays.
    gamma_offset: (m,) phase in rad added to γ at each pixel (RELION's even-Zernike `getGammaOffset`, the
    `gammaOffset` argument of `CTF::getCTF`); absolute: |CTF| (phase-flipped data, `do_abs`); intact_first_peak:
    1 where |γ| < π/2 (RELION's --ctf_intact_first_peak); only_flip_phases: the CTF's sign (±1 times the scale).
    """
    kx = np.asarray(kx, dtype=np.float64)
    ky = np.asarray(ky, dtype=np.float64)
    kx, ky = np.broadcast_arrays(kx, ky)
    if kx.ndim == 1:
        kx, ky = kx[None, :], ky[None, :]
    n = len(params)
    if kx.shape[0] not in (1, n):
        raise ValueError(f"kx has {kx.shape[0]} rows for {n} particles")
    out = np.empty((n, kx.shape[1]), dtype=np.float32)
    goff = np.zeros(1) if gamma_offset is None else np.ascontiguousarray(np.asarray(gamma_offset, np.float64).ravel())
    if goff.size not in (1, kx.shape[1]):
        raise ValueError(f"gamma_offset has {goff.size} values for {kx.shape[1]} pixels")
    if n and kx.shape[1]:
        _ctf_kernel(_coefficients(params, box, angpix), np.ascontiguousarray(kx), np.ascontiguousarray(ky), goff,
                    bool(absolute), bool(intact_first_peak), bool(only_flip_phases), out)
    return out


def ctf_grid(params: CtfParams, box: int, angpix: ArrayLike, size: int | None = None) -> NDArray[np.float32]:
    """(n, size, size//2+1) CTFs in the half-complex layout of transforms.py, for particles of a `box` image.

    With size < box this is the window of the box transform (frequencies still k/(box·angpix)).
    """
    size = box if size is None else int(size)
    if size > box:
        raise ValueError(f"CTF window {size} larger than the image box {box}")
    ky, kx = rfft_freqs_2d(size)
    vals = ctf_values(params, kx.ravel(), ky.ravel(), box, angpix)
    return vals.reshape(len(params), size, size // 2 + 1)
