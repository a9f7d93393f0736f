"""The E-step of a tiny problem against a brute-force evaluation with explicit loops (spec §2, §3.1, §3.6).

Box 16/18, 72 coarse orientations (HEALPix order 0), 5 coarse translations, oversampling 1, a CTF, non-white σ²,
a non-uniform direction prior and an offset prior, two optics groups (different box and pixel size, hence a model
scale ≠ 1). With --adaptive_fraction 1 every sample is significant, so the posterior over the fine grid must be
exactly exp(−D + log prior) / Σ with D = Σ_k |X_k e^{−2πik·t/N} − s·CTF_k·P_k(θ)|² / 2σ²_k (shells ≥ 1), priors of
the coarse parent (spec §2.4: children inherit them). Everything the E-step returns or accumulates is compared.
"""

from __future__ import annotations

import numpy as np
import pytest

from cryorefine.fourier.backprojector import make_backprojector
from cryorefine.fourier.ctf import CtfParams, ctf_values
from cryorefine.fourier.projector import make_projector, project
from cryorefine.geometry.euler import euler_to_matrix
from cryorefine.geometry.sampling import angular_step
from cryorefine.refine.backend import cpu_backend
from cryorefine.refine.estep import (BatchInputs, PassSettings, ProjectionCache, empty_accumulator,
                                     expectation_batch)
from cryorefine.refine.orientations import coarse_direction_of, fine_matrices, make_grid, make_translations
from cryorefine.refine.pixels import pixel_set

MODEL_BOX, MODEL_ANGPIX = 16, 2.0
SIGMA_OFF = 3.0                # Å


def _volume(rng) -> np.ndarray:
    """A smooth random blob map (N³) so projections differ clearly between orientations."""
    n = MODEL_BOX
    c = np.arange(n) - n // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    vol = np.zeros((n, n, n))
    for _ in range(6):
        p = rng.uniform(-4, 4, 3)
        vol += rng.uniform(0.5, 1.5) * np.exp(-((x - p[0]) ** 2 + (y - p[1]) ** 2 + (z - p[2]) ** 2) / 4.0)
    return vol.astype(np.float32)


def _problem(box: int, angpix: float, seed: int):
    """Inputs of a batch of 3 particles of one optics group, and what the brute force needs."""
    rng = np.random.default_rng(seed)
    model_scale = (MODEL_BOX * MODEL_ANGPIX) / (box * angpix)
    proj = make_projector(_volume(rng), pad=2, r_max=MODEL_BOX / 2)
    grid = make_grid(0, "C1", angular_step(0), 1, 0.13, False)
    tg = make_translations(1.5 * angpix, 1.0 * angpix, angpix, 1, 0.2)
    size = 2 * int(min(box // 2, MODEL_BOX // 2 / model_scale))
    ps = pixel_set(box, size, model_scale)
    nb = 3
    params = CtfParams(*(np.full(nb, v, float) for v in (9000.0, 8500.0, 30.0, 300.0, 2.7, 0.1, 0.0, 0.0, 1.0)))
    params.defocus_u[:] = [8000.0, 12000.0, 15000.0]
    ctf = ctf_values(params, ps.kx, ps.ky, box, angpix).astype(np.float32)
    true_rot = euler_to_matrix(rng.uniform(-180, 180, nb), rng.uniform(20, 160, nb), rng.uniform(-180, 180, nb))
    scale = np.array([0.8, 1.0, 1.3])
    sig = project(proj, true_rot, ps.kx_model, ps.ky_model) * ctf * scale[:, None].astype(np.float32)
    inv_sigma2 = 1.0 / np.linspace(0.2, 0.05, box // 2 + 1)                # non-white noise, low SNR
    noise = (rng.normal(size=sig.shape) + 1j * rng.normal(size=sig.shape)) * np.sqrt(0.5 / inv_sigma2[ps.shell])
    x = (sig + noise).astype(np.complex64)
    xnm = (x + 0.01 * rng.normal(size=x.shape)).astype(np.complex64)       # "unmasked" image differs a little
    n_dir = len(grid.dir_pix)
    pdf = rng.uniform(0.5, 1.5, n_dir)
    pdf /= pdf.sum()
    inp = BatchInputs(rows=np.arange(nb), optics=0, angpix=angpix, x_coarse=x, x_fine=x, xnm_fine=xnm,
                      power_beyond=np.zeros((nb, box // 2 + 1)), ctf_coarse=ctf, ctf_fine=ctf, scale=scale,
                      group=np.array([0, 1, 1]), preshift_px=np.array([[0, 0], [1, -1], [-2, 0]]),
                      prior_mu=np.array([[0.0, 0.0], [1.0, -2.0], [0.0, 0.5]]), old_norm=np.array([1.0, 0.9, 1.2]))
    st = PassSettings(grid=grid, translations=tg, ps_coarse=ps, ps_fine=ps, inv_sigma2=inv_sigma2,
                      adaptive_fraction=1.0, cc_mode=False, sigma_offset=SIGMA_OFF, log_pdf_direction=np.log(pdf),
                      local=None, scale_shells=np.arange(box // 2 + 1) >= 2, norm_average=1.1, maxsig=-1,
                      cache=ProjectionCache(proj, grid, ps, ps, project))
    return proj, grid, tg, ps, inp, st, pdf


def _brute_force(proj, grid, tg, ps, inp, st, pdf, box):
    """Every E-step output by explicit loops over particles, fine translations and fine orientations."""
    n_ch = grid.n_children
    fine_ids = np.arange(len(grid.dir_pix) * grid.n_psi * n_ch)
    mats = fine_matrices(grid, fine_ids)
    p = project(proj, mats, ps.kx_model, ps.ky_model).astype(np.complex128)       # (O, m)
    coarse_t = np.arange(len(tg.coarse))
    t_fine = tg.children(coarse_t)                                                  # (T, 4, 2)
    isig = st.inv_sigma2[ps.shell]
    like = ps.shell >= 1
    out = []
    for j in range(len(inp.rows)):
        s, ctf = inp.scale[j], inp.ctf_fine[j].astype(np.float64)
        x = inp.x_fine[j].astype(np.complex128)
        logw, resid2, samples = [], [], []
        for tc in coarse_t:
            tau_c = (inp.preshift_px[j] + tg.coarse[tc]) * inp.angpix
            lp_off = -np.sum((tau_c - inp.prior_mu[j]) ** 2) / (2 * SIGMA_OFF ** 2)
            for t in t_fine[tc]:
                ph = np.exp(-2j * np.pi * (ps.kx * t[0] + ps.ky * t[1]) / box)
                for o in fine_ids:
                    diff = x * ph - s * ctf * p[o]
                    d = np.sum(np.abs(diff[like]) ** 2 * isig[like]) / 2
                    lp_dir = np.log(pdf[coarse_direction_of(grid, np.array([o // n_ch]))[0]])
                    logw.append(-d + lp_off + lp_dir)
                    resid2.append(np.abs(diff) ** 2)
                    samples.append((t, o))
        logw = np.array(logw)
        ll = np.logaddexp.reduce(logw)
        w = np.exp(logw - ll)
        best = int(np.argmax(w))
        out.append(dict(w=w, ll=ll, best=samples[best], max_prob=w[best], samples=samples, p=p, mats=mats,
                        resid=np.einsum("n,nm->m", w, np.array(resid2))))
    return out


@pytest.mark.parametrize("box, angpix", [(16, 2.0), (18, 2.0)], ids=["model-box", "other-box-and-pixel"])
def test_estep_matches_brute_force(box, angpix):
    proj, grid, tg, ps, inp, st, pdf = _problem(box, angpix, seed=box)
    acc = empty_accumulator(MODEL_BOX, 2, MODEL_BOX / 2, [box], 2, len(grid.dir_pix))
    res = expectation_batch(inp, st, acc, cpu_backend())
    bf = _brute_force(proj, grid, tg, ps, inp, st, pdf, box)
    n_samples = len(tg.coarse) * len(grid.dir_pix) * grid.n_psi
    assert np.all(res.nr_significant == n_samples)          # fraction 1: every coarse sample is kept

    bp_ref = make_backprojector(MODEL_BOX, 2, MODEL_BOX / 2)
    sigma2_num, offset_num, wsum = np.zeros(box // 2 + 1), 0.0, 0.0
    scale_num, scale_den, norm_sum, pdf_sum = np.zeros(2), np.zeros(2), 0.0, np.zeros(len(grid.dir_pix))
    isig_bp = st.inv_sigma2[ps.shell]
    for j, b in enumerate(bf):
        # log-likelihood, best pose and its probability
        assert res.log_likelihood[j] == pytest.approx(b["ll"], rel=1e-5, abs=1e-3)
        assert res.max_prob[j] == pytest.approx(b["max_prob"], rel=1e-3, abs=1e-5)
        t_best, o_best = b["best"]
        want = euler_to_matrix(res.rot[j], res.tilt[j], res.psi[j])
        np.testing.assert_allclose(want, b["mats"][o_best], atol=1e-6)
        np.testing.assert_allclose([res.origin_x[j], res.origin_y[j]], (inp.preshift_px[j] + t_best) * angpix,
                                   atol=1e-9)
        # weighted sums (spec §3.6), by loops over the weighted samples
        s, ctf = inp.scale[j], inp.ctf_fine[j].astype(np.float64)
        x, xnm = inp.x_fine[j].astype(np.complex128), inp.xnm_fine[j].astype(np.complex128)
        sw = b["w"].sum()
        bp_vals = np.zeros_like(b["p"])
        bp_wgts = np.zeros(len(b["p"]))
        cross = 0.0 * ps.kx
        norm_k = 0.0 * ps.kx
        for wk, (t, o) in zip(b["w"], b["samples"]):
            ph = np.exp(-2j * np.pi * (ps.kx * t[0] + ps.ky * t[1]) / box)
            bp_vals[o] += wk * xnm * ph
            bp_wgts[o] += wk
            cross += wk * np.real(np.conj(x * ph) * b["p"][o]) * ctf
            norm_k += wk * np.abs(b["p"][o]) ** 2 * ctf ** 2
            tau = (inp.preshift_px[j] + t) * angpix
            offset_num += wk * np.sum((tau - inp.prior_mu[j]) ** 2)
            pdf_sum[coarse_direction_of(grid, np.array([o // grid.n_children]))[0]] += wk
        sigma2_num += np.bincount(ps.shell, b["resid"], minlength=box // 2 + 1)
        wsum += sw
        energy = b["resid"].sum()
        norm_j = inp.old_norm[j] / st.norm_average * np.sqrt(2 * energy)
        assert res.norm_correction[j] == pytest.approx(norm_j, rel=1e-4)
        norm_sum += norm_j
        sel = st.scale_shells[ps.shell]
        scale_num[inp.group[j]] += cross[sel].sum()
        scale_den[inp.group[j]] += norm_k[sel].sum()
        keep = bp_wgts > 0
        bp_ref_vals = (bp_vals[keep] * (ctf * s * isig_bp)[None, :]).astype(np.complex64)
        bp_ref_wgts = (bp_wgts[keep][:, None] * (ctf * ctf * s * s * isig_bp)[None, :]).astype(np.float32)
        cpu_backend().insert(bp_ref, b["mats"][keep], ps.kx_model, ps.ky_model, bp_ref_vals, bp_ref_wgts)

    np.testing.assert_allclose(acc.sigma2_num[0], sigma2_num, rtol=1e-4)
    assert acc.sigma2_wsum[0] == pytest.approx(wsum, rel=1e-6)
    assert acc.wsum == pytest.approx(wsum, rel=1e-6)
    assert acc.offset_num == pytest.approx(offset_num, rel=1e-5)
    assert acc.norm_sum == pytest.approx(norm_sum, rel=1e-4)
    np.testing.assert_allclose(acc.scale_num, scale_num, rtol=1e-4)
    np.testing.assert_allclose(acc.scale_den, scale_den, rtol=1e-4)
    np.testing.assert_allclose(acc.pdf, pdf_sum, rtol=1e-5, atol=1e-9)
    scale = np.abs(bp_ref.data).max()
    assert np.abs(acc.bp.data - bp_ref.data).max() <= 1e-4 * scale
    assert np.abs(acc.bp.weight - bp_ref.weight).max() <= 1e-4 * bp_ref.weight.max()
    assert acc.ll_sum == pytest.approx(sum(b["ll"] for b in bf), rel=1e-5)
