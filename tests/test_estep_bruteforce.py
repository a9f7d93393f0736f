"""The E-step of a tiny problem against a brute-force evaluation with explicit loops (spec §2, §3.1, §3.6).

Box 16/18, 72 coarse orientations (HEALPix order 0), 5 coarse translations, oversampling 1, a CTF, non-white σ²,
a non-uniform direction prior and an offset prior, two optics groups (different box and pixel size, hence a model
scale ≠ 1). With --adaptive_fraction 1 every sample is significant, so the posterior over the fine grid must be
exactly exp(−D + log prior) / Σ with D = Σ_k |X_k e^{−2πik·t/N} − s·CTF_k·P_k(θ)|² / 2σ²_k (shells ≥ 1), priors of
the coarse parent (spec §2.4: children inherit them). Everything the E-step returns or accumulates is compared, and
the M-step updates (σ², norm average, group scales, σ_offset, direction pdf) of two optics groups with different
pixel sizes sharing one half's sums. The significance rule (spec §2.6) is checked through the same E-step.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from cryorefine.fourier.backprojector import make_backprojector
from cryorefine.fourier.ctf import CtfParams, ctf_values
from cryorefine.fourier.projector import make_projector, project
from cryorefine.geometry.euler import euler_to_matrix
from cryorefine.geometry.sampling import angular_step
from cryorefine.refine import estep, mstep
from cryorefine.refine.backend import cpu_backend
from cryorefine.refine.fine_kernels import segment_weights
from cryorefine.refine.estep import (BatchInputs, PassSettings, ProjectionCache, empty_accumulator,
                                     expectation_batch)
from cryorefine.refine.orientations import coarse_direction_of, fine_matrices, make_grid, make_translations
from cryorefine.refine.pixels import pixel_set
from cryorefine.refine.state import HalfModel

MODEL_BOX, MODEL_ANGPIX = 16, 2.0
SIGMA_OFF = 3.0                # Å
OFFSET_RANGE, OFFSET_STEP = 3.0, 2.0     # Å, as the run's sampling: the pixel grids differ between optics groups


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


def _problem(box: int, angpix: float, seed: int, proj=None, pdf=None, optics: int = 0, sigma2_lo: float = 0.05):
    """Inputs of a batch of 3 particles of one optics group, and what the brute force needs; `proj` and `pdf` are
    shared by the batches of one half (default: made here)."""
    rng = np.random.default_rng(seed)
    model_scale = (MODEL_BOX * MODEL_ANGPIX) / (box * angpix)
    vol = _volume(rng)
    proj = make_projector(vol, pad=2, r_max=MODEL_BOX / 2) if proj is None else proj
    grid = make_grid(0, "C1", angular_step(0), 1, 0.13, False)
    tg = make_translations(OFFSET_RANGE, OFFSET_STEP, angpix, 1, 0.2)
    size = 2 * int(min(box // 2, MODEL_BOX // 2 / model_scale))
    ps = pixel_set(box, size, model_scale)
    nb = 3
    params = CtfParams(*(np.full(nb, v, float) for v in (9000.0, 8500.0, 30.0, 300.0, 2.7, 0.1, 0.0, 0.0, 1.0)))
    params.defocus_u[:] = [8000.0, 12000.0, 15000.0]
    ctf = ctf_values(params, ps.kx, ps.ky, box, angpix).astype(np.float32)
    true_rot = euler_to_matrix(rng.uniform(-180, 180, nb), rng.uniform(20, 160, nb), rng.uniform(-180, 180, nb))
    scale = np.array([0.8, 1.0, 1.3])
    sig = project(proj, true_rot, ps.kx_model, ps.ky_model) * ctf * scale[:, None].astype(np.float32)
    inv_sigma2 = 1.0 / np.linspace(0.2, sigma2_lo, box // 2 + 1)          # non-white noise, low SNR
    noise = (rng.normal(size=sig.shape) + 1j * rng.normal(size=sig.shape)) * np.sqrt(0.5 / inv_sigma2[ps.shell])
    x = (sig + noise).astype(np.complex64)
    xnm = (x + 0.01 * rng.normal(size=x.shape)).astype(np.complex64)       # "unmasked" image differs a little
    n_dir = len(grid.dir_pix)
    if pdf is None:
        pdf = rng.uniform(0.5, 1.5, n_dir)
        pdf /= pdf.sum()
    beyond = rng.uniform(0.01, 0.1, size=(nb, box // 2 + 1))               # masked power of shells > size/2
    beyond[:, : size // 2 + 1] = 0.0
    inp = BatchInputs(rows=np.arange(nb), optics=optics, angpix=angpix, x_coarse=x, x_fine=x, xnm_fine=xnm,
                      power_beyond=beyond, ctf_coarse=ctf, ctf_fine=ctf, scale=scale,
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
        log_evidence = np.logaddexp.reduce(logw)
        w = np.exp(logw - log_evidence)
        # RELION's dLL: with the Gaussian's normalisation, Σ over the likelihood's pixels of log(2π σ²)
        ll = log_evidence - np.sum(np.log(2 * np.pi / isig[like]))
        best = int(np.argmax(w))
        out.append(dict(w=w, ll=ll, best=samples[best], max_prob=w[best], samples=samples, p=p, mats=mats,
                        resid=np.einsum("n,nm->m", w, np.array(resid2))))
    return out


def _empty_sums(boxes: list[int], n_dir: int) -> dict:
    """Brute-force counterparts of the HalfAccumulator fields, summed over the batches of one half."""
    return {"bp": make_backprojector(MODEL_BOX, 2, MODEL_BOX / 2),
            "sigma2_num": {o: np.zeros(b // 2 + 1) for o, b in enumerate(boxes)}, "sigma2_wsum": np.zeros(len(boxes)),
            "offset_num": 0.0, "wsum": 0.0, "scale_num": np.zeros(2), "scale_den": np.zeros(2), "norm_sum": 0.0,
            "pdf": np.zeros(n_dir), "ll_sum": 0.0}


def _check_batch(res, bf, inp, st, ps, grid, box, angpix, sums) -> None:
    """Poses of one batch against the brute force; adds the batch's brute-force sums (spec §3.1, §3.6) to `sums`."""
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
        # weighted sums, by loops over the weighted samples
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
            sums["offset_num"] += wk * np.sum((tau - inp.prior_mu[j]) ** 2)
            sums["pdf"][coarse_direction_of(grid, np.array([o // grid.n_children]))[0]] += wk
        beyond = inp.power_beyond[j]
        sums["sigma2_num"][inp.optics] += np.bincount(ps.shell, b["resid"], minlength=box // 2 + 1) + sw * beyond
        sums["sigma2_wsum"][inp.optics] += sw
        sums["wsum"] += sw
        energy = b["resid"].sum() + beyond.sum()
        norm_j = inp.old_norm[j] / st.norm_average * np.sqrt(2 * energy)
        assert res.norm_correction[j] == pytest.approx(norm_j, rel=1e-4)
        sums["norm_sum"] += norm_j
        sel = st.scale_shells[ps.shell]
        sums["scale_num"][inp.group[j]] += cross[sel].sum()
        sums["scale_den"][inp.group[j]] += norm_k[sel].sum()
        sums["ll_sum"] += b["ll"]
        keep = bp_wgts > 0
        bp_ref_vals = (bp_vals[keep] * (ctf * s * isig_bp)[None, :]).astype(np.complex64)
        bp_ref_wgts = (bp_wgts[keep][:, None] * (ctf * ctf * s * s * isig_bp)[None, :]).astype(np.float32)
        cpu_backend().insert(sums["bp"], b["mats"][keep], ps.kx_model, ps.ky_model, bp_ref_vals, bp_ref_wgts)


def _check_sums(acc, sums) -> None:
    """Every accumulated field against its brute-force sum."""
    for o in sums["sigma2_num"]:
        np.testing.assert_allclose(acc.sigma2_num[o], sums["sigma2_num"][o], rtol=1e-4)
    np.testing.assert_allclose(acc.sigma2_wsum, sums["sigma2_wsum"], rtol=1e-6)
    assert acc.wsum == pytest.approx(sums["wsum"], rel=1e-6)
    assert acc.offset_num == pytest.approx(sums["offset_num"], rel=1e-5)
    assert acc.norm_sum == pytest.approx(sums["norm_sum"], rel=1e-4)
    np.testing.assert_allclose(acc.scale_num, sums["scale_num"], rtol=1e-4)
    np.testing.assert_allclose(acc.scale_den, sums["scale_den"], rtol=1e-4)
    np.testing.assert_allclose(acc.pdf, sums["pdf"], rtol=1e-5, atol=1e-9)
    bp_ref = sums["bp"]
    assert np.abs(acc.bp.data - bp_ref.data).max() <= 1e-4 * np.abs(bp_ref.data).max()
    assert np.abs(acc.bp.weight - bp_ref.weight).max() <= 1e-4 * bp_ref.weight.max()
    assert acc.ll_sum == pytest.approx(sums["ll_sum"], rel=1e-5)


@pytest.mark.parametrize("box, angpix, dense_fraction, chunk_bytes, lattice_from", [
    (16, 2.0, 0.15, None, 8.0), (18, 2.0, 0.15, None, 8.0), (16, 2.0, 0.0, 4096, 8.0),
    (16, 2.0, 2.0, 4096, np.inf), (16, 2.0, 2.0, 4096, 0.0), (18, 2.0, 2.0, None, 0.0)],
    ids=["model-box", "other-box", "dense-sums-in-row-chunks", "block-sums-in-row-chunks",
         "lattice-sums-in-row-chunks", "lattice-sums-other-box"])
def test_estep_matches_brute_force(box, angpix, dense_fraction, chunk_bytes, lattice_from, monkeypatch):
    # the weighted sums take dense products, the translation-lattice kernel or the block kernel by the weights'
    # density and translations per (orientation, particle), over chunks of rows
    monkeypatch.setattr(estep, "_DENSE_FRACTION", dense_fraction)
    monkeypatch.setattr(estep, "_LATTICE_TRANSLATIONS", lattice_from)
    proj, grid, tg, ps, inp, st, pdf = _problem(box, angpix, seed=box)
    if chunk_bytes is not None:
        st = replace(st, limits=replace(st.limits, sums_chunk_bytes=chunk_bytes))
    acc = empty_accumulator(MODEL_BOX, 2, MODEL_BOX / 2, [box], 2, len(grid.dir_pix))
    res = expectation_batch(inp, st, acc, cpu_backend())
    bf = _brute_force(proj, grid, tg, ps, inp, st, pdf, box)
    n_samples = len(tg.coarse) * len(grid.dir_pix) * grid.n_psi
    assert np.all(res.nr_significant == n_samples)          # fraction 1: every coarse sample is kept
    sums = _empty_sums([box], len(grid.dir_pix))
    _check_batch(res, bf, inp, st, ps, grid, box, angpix, sums)
    _check_sums(acc, sums)


def _npix_by_loops(box: int) -> np.ndarray:
    """Npix(r): unique half-plane pixels (kx > 0, or kx = 0 and ky ≥ 0) of each shell 0..N/2 of an N box."""
    out = np.zeros(box // 2 + 1)
    for ky in range(-box // 2, box // 2):
        for kx in range(box // 2 + 1):
            r = int(np.rint(np.hypot(kx, ky)))
            if (kx > 0 or ky >= 0) and r <= box // 2:
                out[r] += 1
    return out


def test_two_optics_groups_with_different_pixel_sizes_and_their_mstep_updates():
    """One half's sums from two optics groups (16 px x 2.0 A = the model box; 20 px x 1.4 A), then the M-step."""
    groups = [(16, 2.0), (20, 1.4)]
    proj, grid, _, _, _, _, pdf = _problem(*groups[0], seed=3)
    acc = empty_accumulator(MODEL_BOX, 2, MODEL_BOX / 2, [b for b, _ in groups], 2, len(grid.dir_pix))
    sums = _empty_sums([b for b, _ in groups], len(grid.dir_pix))
    translations = []
    for o, (box, angpix) in enumerate(groups):
        _, _, tg, ps, inp, st, _ = _problem(box, angpix, seed=10 + o, proj=proj, pdf=pdf, optics=o,
                                            sigma2_lo=0.05 + 0.03 * o)
        res = expectation_batch(inp, st, acc, cpu_backend())
        _check_batch(res, _brute_force(proj, grid, tg, ps, inp, st, pdf, box), inp, st, ps, grid, box, angpix, sums)
        translations.append(tg.coarse)
    # the same translations in Å, different in pixels
    np.testing.assert_allclose(translations[0] * groups[0][1], translations[1] * groups[1][1])
    assert not np.allclose(translations[0], translations[1])
    _check_sums(acc, sums)

    # M-step (spec §3.6) from the accumulated sums, against the formulas on the brute-force sums
    boxes = {o: b for o, (b, _) in enumerate(groups)}
    old = {o: np.full(b // 2 + 1, 9.0) for o, b in boxes.items()}
    model = HalfModel(volume=np.zeros((MODEL_BOX,) * 3, np.float32), sigma2=old, pdf_direction=pdf, sigma_offset=9.0)
    counts = np.array([2, 4])
    new = mstep.update_model_statistics(model, acc, boxes, counts, do_norm=True, do_scale=True,
                                        min_sigma2_offset=2.0, cc_iteration=False)
    for o, b in boxes.items():
        want = sums["sigma2_num"][o] / (2 * sums["sigma2_wsum"][o] * _npix_by_loops(b))
        np.testing.assert_allclose(new.sigma2[o], want, rtol=1e-4)
    assert new.sigma_offset == pytest.approx(np.sqrt(max(sums["offset_num"] / (2 * sums["wsum"]), 2.0)), rel=1e-5)
    assert new.norm_average == pytest.approx(sums["norm_sum"] / sums["wsum"], rel=1e-4)
    s = sums["scale_num"] / sums["scale_den"]
    s = np.clip(s, np.median(s) / 5, 5 * np.median(s))
    np.testing.assert_allclose(new.group_scales, s / ((s * counts).sum() / counts.sum()), rtol=1e-4)
    np.testing.assert_allclose(new.pdf_direction, sums["pdf"] / sums["pdf"].sum(), rtol=1e-5, atol=1e-9)
    assert new.ave_pmax == pytest.approx(acc.pmax_sum / acc.count) and acc.count == 6


def _flat_problem(maxsig: int, fraction: float):
    """The model-box problem with a nearly flat posterior (σ² × 10⁴), so that significance binds."""
    proj, grid, tg, ps, inp, st, _ = _problem(16, 2.0, seed=16)
    st = replace(st, inv_sigma2=st.inv_sigma2 * 1e-4, adaptive_fraction=fraction, maxsig=maxsig,
                 cache=ProjectionCache(proj, grid, ps, ps, project))
    acc = empty_accumulator(MODEL_BOX, 2, MODEL_BOX / 2, [16], 2, len(grid.dir_pix))
    return expectation_batch(inp, st, acc, cpu_backend()), acc, len(tg.coarse) * len(grid.dir_pix) * grid.n_psi


def test_maxsig_caps_pass_one_only_and_kept_weights_are_not_renormalised():
    fraction, maxsig = 0.9, 20
    res, acc, n_coarse = _flat_problem(-1, fraction)
    assert np.all(res.nr_significant > 0.5 * n_coarse)       # flat: most coarse samples are needed for 90 %
    # kept pass-2 weights are w / W_sum(pass 2): each particle's sum lies in [fraction, fraction + its largest]
    nb = len(res.max_prob)
    assert nb * fraction <= acc.wsum <= nb * fraction + res.max_prob.sum() + 1e-9
    res_c, acc_c, _ = _flat_problem(maxsig, fraction)
    assert np.all(res_c.nr_significant == maxsig)             # pass 1 capped ...
    # ... pass 2 not: its children (32 per coarse pair, flat) still keep 90 % of their weight
    assert nb * fraction <= acc_c.wsum <= nb * fraction + res_c.max_prob.sum() + 1e-9
    assert np.all(res_c.max_prob < 2.0 / (maxsig * 32))


def test_segment_weights_threshold_and_normalisation():
    """fine_kernels.segment_weights per particle (segment): keep = the largest weights reaching the fraction, divided
    by the sum of all evaluated weights; with maxsig the count is capped and the weights keep the same denominator."""
    rng = np.random.default_rng(4)
    sizes = (280, 97)
    off = np.r_[0, np.cumsum(sizes)]
    d = rng.uniform(0, 6, size=off[-1])
    lp = np.log(rng.uniform(0.2, 1.0, size=off[-1]))
    for maxsig in (-1, 10):
        w, count, log_wsum, dmin = segment_weights(d, lp, off, False, 0.95, maxsig)
        for s in range(len(sizes)):
            seg = slice(off[s], off[s + 1])
            logw = -(d[seg] - d[seg].min()) + lp[seg]
            w_all = np.exp(logw) / np.exp(logw).sum()
            order = np.argsort(w_all)[::-1]
            n_need = int(np.searchsorted(np.cumsum(w_all[order]), 0.95, side="right")) + 1
            assert w_all[order[:n_need]].sum() >= 0.95 > w_all[order[:n_need - 1]].sum()
            n_want = n_need if maxsig < 0 else min(n_need, maxsig)
            want_keep = np.zeros(w_all.size, bool)
            want_keep[order[:n_want]] = True
            assert count[s] == n_want
            np.testing.assert_array_equal(w[seg] > 0, want_keep)
            np.testing.assert_allclose(w[seg], np.where(want_keep, w_all, 0.0), rtol=1e-12)
            assert log_wsum[s] == pytest.approx(np.log(np.exp(logw).sum()), rel=1e-12)
            assert dmin[s] == d[seg].min()


def test_lattice_sums_do_not_depend_on_the_thread_count(monkeypatch):
    """The lattice kernel sums its parts' cross terms in a fixed order: 1 and 2 threads give the same bits."""
    import numba
    monkeypatch.setattr(estep, "_DENSE_FRACTION", 2.0)
    monkeypatch.setattr(estep, "_LATTICE_TRANSLATIONS", 0.0)
    proj, grid, tg, ps, inp, st, pdf = _problem(16, 2.0, seed=16)
    results = []
    n_threads = numba.get_num_threads()
    try:
        for n in (1, 2):
            numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
            acc = empty_accumulator(MODEL_BOX, 2, MODEL_BOX / 2, [16], 2, len(grid.dir_pix))
            res = expectation_batch(inp, st, acc, cpu_backend())
            results.append((acc.bp.data.copy(), acc.sigma2_num[0].copy(), res.norm_correction.copy()))
    finally:
        numba.set_num_threads(n_threads)
    for a, b in zip(*results):
        assert np.array_equal(a, b)
