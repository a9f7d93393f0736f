"""The likelihood of the E-step as pure functions on arrays (numpy; spec §2, §3.1, §3.6, DESIGN.md §3).

Residual D(θ,t) = Σ_k |X_k e^{-2πik·t/N} − s·CTF_k P_k(θ)|² / 2σ²_k, expanded as
const − Re Σ conj(X_k e^{..}) s CTF_k P_k / σ²_k + ½ Σ s² CTF_k² |P_k|² / σ²_k = const + ½·norm − cross, so the
coarse pass is two real matrix products over (particles·translations × pixels) @ (pixels × orientations).
Complex vectors enter the products as real pairs (Re, Im interleaved), for which Re(conj(a)·b) = pair(a) · pair(b).
A backend (refine.backend) bundles these functions with the projection and insertion kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from cryorefine.refine import fine_kernels
from cryorefine.refine.weights import coarse_significance


def real_pair(z: NDArray[np.complex64]) -> NDArray[np.float32]:
    """(Re z, Im z) interleaved along the last axis (a float32 view of complex64 z, no copy when contiguous), so that
    Re(conj(a)·b) = real_pair(a) · real_pair(b)."""
    return np.ascontiguousarray(z, np.complex64).view(np.float32)


def offset_log_prior(tau_A: NDArray, mu_A: NDArray, sigma: float) -> NDArray[np.float64]:
    """log of the Gaussian offset prior exp(-|τ − μ|²/2σ²) (Å; the normalisation cancels per particle)."""
    d2 = ((tau_A - mu_A) ** 2).sum(-1)
    return -d2 / (2.0 * sigma * sigma)


def weighted_images(x: NDArray[np.complex64], phases: NDArray[np.complex64],
                    weight: NDArray[np.float32]) -> NDArray[np.float32]:
    """Real pairs of the shifted, weighted images X·e^{-2πik·t/N}·w for every translation: (B, T, 2m).

    x (B, m), phases (T, m), weight (B, m) = s·CTF/σ² (the factor that turns the product with P into `cross`).
    """
    return real_pair(x[:, None, :] * phases[None, :, :] * weight[:, None, :])


def coarse_scores(a: NDArray[np.float32], p_pair: NDArray[np.float32], norm_w: NDArray[np.float32],
                  p_pow: NDArray[np.float32], cc_mode: bool) -> NDArray[np.float64]:
    """Residuals (B, T, U) of every batch particle, translation and orientation of a shared orientation set.

    a (B, T, 2m) from weighted_images, p_pair (U, 2m) projections, norm_w (B, m) = s²CTF²/σ², p_pow (U, m) = |P|².
    """
    nb, nt, m2 = a.shape
    cross = (a.reshape(nb * nt, m2) @ p_pair.T).reshape(nb, nt, -1)
    norm = (norm_w @ p_pow.T).astype(np.float32)
    # float32 products, their difference in float64: the scores of all samples of a particle are compared
    return fine_kernels.coarse_residuals(np.ascontiguousarray(cross, np.float32), norm, cc_mode)


def coarse_significant(a: NDArray[np.float32], p_pair: NDArray[np.float32], norm_w: NDArray[np.float32],
                       p_pow: NDArray[np.float32], lp_off: NDArray, lp_dir: NDArray, cc_mode: bool,
                       fraction: float, maxsig: int) -> tuple[NDArray[np.bool_], NDArray[np.int64]]:
    """Pass 1 of a batch sharing one orientation set: keep mask (B, T, U) of significant samples and their counts."""
    d = coarse_scores(a, p_pair, norm_w, p_pow, cc_mode)
    return coarse_significance(d, np.ascontiguousarray(lp_off, np.float64), np.asarray(lp_dir, np.float64),
                               cc_mode, fraction, maxsig)


@dataclass(frozen=True)
class BlockLayout:
    """Blocks of (image, translation, orientation) samples of a batch, flattened (CSR): block k pairs the shifted
    images X[img[k]]·ph[ph_row[k] + a] (a < n_a) with the projections P[p_row[k] + b] (b < n_b).

    Blocks are sorted by image (and best by p_row within an image, so that the CPU kernel reuses projections from
    cache).
    """

    img: NDArray[np.int64]
    ph_row: NDArray[np.int64]
    p_row: NDArray[np.int64]
    n_a: int
    n_b: int

    def image_offsets(self, n_images: int) -> NDArray[np.int64]:
        """img_off: the blocks of image j are img_off[j]:img_off[j+1]."""
        return np.searchsorted(self.img, np.arange(n_images + 1)).astype(np.int64)

    def pairs(self, n_p: int) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
        """(image, first projection row) of the distinct (img, p_row) pairs, and each block's pair index."""
        key, inv = np.unique(self.img * n_p + self.p_row, return_inverse=True)
        return key // n_p, key % n_p, inv.ravel()


def block_scores(xw: NDArray[np.float32], wn: NDArray[np.float32], ph: NDArray[np.float32], p: NDArray[np.float32],
                 layout: BlockLayout, cc_mode: bool) -> NDArray[np.float64]:
    """Residuals (K, n_a, n_b) of the blocks of `layout` (fine pass; local coarse pass with n_b = 1).

    xw (B, 2m) = real pairs of X·s·CTF/σ², wn (B, m) = s²CTF²/σ², ph (R, 2m) real pairs of the phase ramps
    e^{-2πik·t/N}, p (F, 2m) real pairs of the projections: cross = pair(X e^{..} s CTF/σ²)·pair(P) and
    norm = Σ wn |P|², both float32 as the BLAS products, then `fine_kernels.residual_value`.
    """
    xw, wn, ph, p = (np.ascontiguousarray(v, np.float32) for v in (xw, wn, ph, p))
    pair_img, pair_p, inv = layout.pairs(len(p))
    norm = fine_kernels.pair_norms(wn, p, pair_img, pair_p, layout.n_b)[inv]                 # (K, n_b)
    return fine_kernels.block_residuals(xw, ph, p, layout.image_offsets(len(xw)), layout.ph_row, layout.p_row,
                                        layout.n_a, layout.n_b, norm, cc_mode)


def gflop_of_products(n_rows: int, n_cols: int, depth: int) -> float:
    """GFLOP of a real (n_rows × depth) @ (depth × n_cols) product (multiply and add)."""
    return 2e-9 * n_rows * n_cols * depth


def residual_power(xpow: NDArray, cross_k: NDArray, norm_k: NDArray, wsum: float, scale: float) -> NDArray:
    """Σ_θ,t w̄ |X_k e^{..} − s CTF_k P_k|² per pixel k, from its three expanded sums (spec §3.6 σ² update).

    xpow = |X_k|², cross_k = Σ w̄ Re(conj(X e^{..}) P) CTF, norm_k = Σ w̄ |P|² CTF², wsum = Σ w̄.
    """
    return wsum * xpow - 2 * scale * cross_k + scale * scale * norm_k
