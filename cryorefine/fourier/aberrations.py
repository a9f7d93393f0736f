"""Optical aberrations of an optics group, as RELION 3.1+'s `ObservationModel` models them
(`src/jaz/single_particle/obs_model.cpp`): beam tilt and odd (antisymmetric) Zernike aberrations as a phase
factor of the image, even (symmetric) Zernike aberrations added to the CTF's γ, and an anisotropic
magnification matrix M that maps the image's frequencies onto the reference's.

Model (k = the image frequency, M = rlnMagMat, A the Euler matrix):

    image FT(k) = V̂(Aᵀ(M k, 0)) · CTF(M k) · exp(i φ_odd(M k))

Frequencies are given in Fourier pixels (kx, ky) of the optics group's box N_o (RELION's half-complex
layout: kx ≥ 0, the Nyquist row negative) and converted to 1/Å as k/(N_o p_o), as in
`ObservationModel::getPhaseCorrection` (`as = angpix · boxSize`). The Zernike polynomials are RELION's
unnormalised ones of the frequency in 1/Å (`src/jaz/math/Zernike.cpp`), so a coefficient of order n is in
rad·Åⁿ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
from numpy.typing import ArrayLike, NDArray

from cryorefine.fourier.ctf import CtfParams, ctf_values, electron_wavelength

IDENTITY = (1.0, 0.0, 0.0, 1.0)


@dataclass(frozen=True)
class OpticsModel:
    """The image-formation model of one optics group (hashable: used as a cache key).

    odd: effective odd Zernike coefficients, beam tilt already inserted (`TiltHelper::insertTilt`);
    even: even Zernike coefficients (rlnEvenZernike); mag: (M00, M01, M10, M11) of rlnMagMat;
    premultiplied: rlnCtfDataAreCtfPremultiplied (data = CTF·image, modelled as CTF²·projection);
    phase_flipped: rlnCtfDataArePhaseFlipped (the CTF is |CTF|); intact_first_peak, only_flip_phases: RELION's
    --ctf_intact_first_peak (CTF 1 until its first peak) and --only_flip_phases (the CTF's sign only).
    """

    box: int                                  # N_o, px
    angpix: float                             # p_o, Å/px
    odd: tuple[float, ...] = ()
    even: tuple[float, ...] = ()
    mag: tuple[float, float, float, float] = IDENTITY
    premultiplied: bool = False
    phase_flipped: bool = False
    intact_first_peak: bool = False
    only_flip_phases: bool = False

    @property
    def has_odd(self) -> bool:
        """True when the odd phase is not identically 0."""
        return any(c != 0.0 for c in self.odd)

    @property
    def has_even(self) -> bool:
        """True when the even-Zernike γ offset is not identically 0."""
        return any(c != 0.0 for c in self.even)

    @property
    def has_mag(self) -> bool:
        """True when the magnification matrix is not the identity."""
        return tuple(self.mag) != IDENTITY

    @property
    def projection_key(self) -> tuple:
        """Groups with equal keys see the reference at the same frequencies (share projections)."""
        return (self.box, self.angpix, self.mag)

    def without_aberrations(self) -> OpticsModel:
        """The same group with no tilt, Zernike terms or mag matrix (flags kept)."""
        return replace(self, odd=(), even=(), mag=IDENTITY)


# ----------------------------------------------------------------------------------------------------------
# Zernike polynomials (src/jaz/math/Zernike.cpp)


def odd_index_to_mn(i: int) -> tuple[int, int]:
    """RELION `Zernike::oddIndexToMN`: k = ⌊(√(1+4i) − 1)/2⌋, n = 2k+1, m = 2(i − k² − k) − n."""
    k = int((math.sqrt(1 + 4 * i) - 1.0) / 2.0)
    n = 2 * k + 1
    return 2 * (i - k * k - k) - n, n


def even_index_to_mn(i: int) -> tuple[int, int]:
    """RELION `Zernike::evenIndexToMN`: k = ⌊√i⌋, m = 2(i − k² − k), n = 2k."""
    k = int(math.sqrt(i))
    return 2 * (i - k * k - k), 2 * k


def zernike_radial(m: int, n: int, rho: NDArray) -> NDArray[np.float64]:
    """Unnormalised radial polynomial R_n^m(ρ) = Σ_k (−1)^k (n−k)! / (k! ((n+m)/2−k)! ((n−m)/2−k)!) ρ^(n−2k)."""
    m = abs(m)
    if m > n:
        raise ValueError(f"Zernike R: m = {m} > n = {n}")
    out = np.zeros_like(rho, dtype=np.float64)
    if (n - m) % 2:
        return out
    for k in range((n - m) // 2 + 1):
        c = (-1) ** k * math.factorial(n - k) / (
            math.factorial(k) * math.factorial((n + m) // 2 - k) * math.factorial((n - m) // 2 - k))
        out += c * rho ** (n - 2 * k)
    return out


def zernike_cart(m: int, n: int, x: NDArray, y: NDArray) -> NDArray[np.float64]:
    """RELION `Zernike::Z_cart`: R_n^|m|(ρ)·cos(mφ) for m ≥ 0, R_n^|m|(ρ)·sin(|m|φ) for m < 0, φ = atan2(y, x)."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    rho = np.hypot(x, y)
    phi = np.arctan2(y, x)          # atan2(0, 0) = 0, as RELION's special case
    if m >= 0:
        return zernike_radial(m, n, rho) * np.cos(m * phi)
    return zernike_radial(-m, n, rho) * np.sin(-m * phi)


def zernike_sum(coeffs: tuple[float, ...] | NDArray, x: NDArray, y: NDArray, odd: bool) -> NDArray[np.float64]:
    """Σ_i c_i Z_i(x, y) in RELION's odd or even index order (x, y in 1/Å; result in rad)."""
    x = np.asarray(x, np.float64)
    out = np.zeros(np.broadcast_shapes(x.shape, np.shape(y)), np.float64)
    for i, c in enumerate(coeffs):
        if c != 0.0:
            m, n = odd_index_to_mn(i) if odd else even_index_to_mn(i)
            out += float(c) * zernike_cart(m, n, x, y)
    return out


# ----------------------------------------------------------------------------------------------------------
# beam tilt (src/jaz/single_particle/ctf/tilt_helper.cpp)


def insert_beam_tilt(odd: tuple[float, ...] | list, tilt_x: float, tilt_y: float, cs: float,
                     voltage: float) -> tuple[float, ...]:
    """Odd Zernike coefficients with a beam tilt (mrad) added, as `TiltHelper::insertTilt`: with
    s = Cs·2·10⁴·λ²·π (Cs in mm, λ in Å, RELION's literal π) and Z3 = −s·t/3: o₁ += 2 Z3x, o₀ += 2 Z3y,
    o₄ += Z3x, o₃ += Z3y, i.e. φ_tilt = −2π·10⁴·Cs·λ²·|k|²·(tx kx + ty ky)."""
    out = [float(c) for c in odd]
    out += [0.0] * max(0, 5 - len(out))
    lam = float(electron_wavelength(voltage))
    s = cs * 20000.0 * lam * lam * 3.141592654
    z3x, z3y = -s * tilt_x / 3.0, -s * tilt_y / 3.0
    out[1] += 2.0 * z3x
    out[0] += 2.0 * z3y
    out[4] += z3x
    out[3] += z3y
    return tuple(out)


# ----------------------------------------------------------------------------------------------------------
# per-pixel quantities of an optics group


def mag_frequencies(mag: tuple[float, float, float, float], kx: ArrayLike, ky: ArrayLike
                    ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """M·(kx, ky) with M = [[M00, M01], [M10, M11]] (rlnMagMat; `CTF::getCTF`, `getPhaseCorrection`); any units."""
    kx = np.asarray(kx, np.float64)
    ky = np.asarray(ky, np.float64)
    m00, m01, m10, m11 = (float(v) for v in mag)
    return m00 * kx + m01 * ky, m10 * kx + m11 * ky


def _angstrom_frequencies(optics: OpticsModel, kx: ArrayLike, ky: ArrayLike
                          ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """M·k in 1/Å for Fourier pixels (kx, ky) of the group's box (k/(N_o p_o))."""
    scale = 1.0 / (optics.box * optics.angpix)
    x, y = mag_frequencies(optics.mag, kx, ky)
    return x * scale, y * scale


def odd_phase(optics: OpticsModel, kx: ArrayLike, ky: ArrayLike) -> NDArray[np.complex64]:
    """exp(i φ_odd(M k)), φ_odd = Σ_i odd_i Z_i (beam tilt included), at Fourier pixels of the group's box.

    The model multiplies the prediction by it (`predictObservation`); demodulating data means multiplying by
    its conjugate (`ObservationModel::demodulatePhase`, used by relion_reconstruct and relion_refine)."""
    if not optics.has_odd:
        return np.ones(np.broadcast_shapes(np.shape(kx), np.shape(ky)), np.complex64)
    x, y = _angstrom_frequencies(optics, kx, ky)
    return np.exp(1j * zernike_sum(optics.odd, x, y, odd=True)).astype(np.complex64)


def gamma_offset(optics: OpticsModel, kx: ArrayLike, ky: ArrayLike) -> NDArray[np.float64]:
    """Σ_i even_i Z_i(M k) in rad, added to the CTF's γ (`ObservationModel::getGammaOffset`)."""
    x, y = _angstrom_frequencies(optics, kx, ky)
    return zernike_sum(optics.even, x, y, odd=False)


def model_frequencies(optics: OpticsModel, kx: ArrayLike, ky: ArrayLike, model_scale: float
                      ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Where pixel k of the group's box samples the model: s·M·k in Fourier pixels of the model box, with
    s = (N_o p_o)/(N p) (`applyAnisoMag` A → M₃⁻¹A, `applyScaleDifference`; the slice is at Aᵀ(s M k, 0))."""
    x, y = mag_frequencies(optics.mag, kx, ky)
    return x * model_scale, y * model_scale


def optics_ctf(params: CtfParams, optics: OpticsModel, kx: ArrayLike, ky: ArrayLike) -> NDArray[np.float32]:
    """(n, m) CTF(M k) of n particles of one group with the even-Zernike γ offset, |CTF| for phase-flipped
    data (`CTF::getFftwImage` without padding; the premultiplied flag is *not* applied here)."""
    x, y = mag_frequencies(optics.mag, kx, ky)
    goff = gamma_offset(optics, kx, ky) if optics.has_even else None
    return ctf_values(params, x, y, optics.box, optics.angpix, gamma_offset=goff, absolute=optics.phase_flipped,
                      intact_first_peak=optics.intact_first_peak, only_flip_phases=optics.only_flip_phases)


def with_ctf_switches(optics: OpticsModel, intact_first_peak: bool = False, only_flip_phases: bool = False,
                      phase_flipped: bool = False) -> OpticsModel:
    """The group's model with RELION's run-wide CTF options (--ctf_intact_first_peak, --only_flip_phases,
    --ctf_phase_flipped; phase-flipped also where the optics table says so)."""
    return replace(optics, intact_first_peak=intact_first_peak, only_flip_phases=only_flip_phases,
                   phase_flipped=optics.phase_flipped or phase_flipped)


def model_ctf(params: CtfParams, optics: OpticsModel, kx: ArrayLike, ky: ArrayLike) -> NDArray[np.float32]:
    """The factor that multiplies a projection to predict the data: CTF, or CTF² for premultiplied data
    (`MlOptimiser` squares Fctf when `ctf_premultiplied`; `ObservationModel::predictObservation`)."""
    c = optics_ctf(params, optics, kx, ky)
    return c * c if optics.premultiplied else c


@lru_cache(maxsize=256)
def odd_phase_grid(optics: OpticsModel) -> NDArray[np.complex64]:
    """odd_phase on the whole (N_o, N_o//2+1) half-complex grid of the group's box (cached per group)."""
    from cryorefine.fourier.transforms import rfft_freqs_2d

    ky, kx = rfft_freqs_2d(optics.box)
    out = odd_phase(optics, kx, ky)
    out.setflags(write=False)
    return out


def demodulate(ft: NDArray[np.complex64], optics: OpticsModel) -> NDArray[np.complex64]:
    """Data transforms (..., N_o, N_o//2+1) multiplied by exp(−i φ_odd(M k)) (`demodulatePhase`); a no-op
    (same array) without odd aberrations."""
    if not optics.has_odd:
        return ft
    return (ft * np.conj(odd_phase_grid(optics))).astype(np.complex64, copy=False)
