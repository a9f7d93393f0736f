"""The memory plan (refine.memory): each term of the estimate against the bytes of the arrays the code allocates
for tiny sizes, and the lowering of the E-step limits to a budget."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from cryorefine.fourier.projector import make_projector, project
from cryorefine.geometry.sampling import angular_step
from cryorefine.refine import memory
from cryorefine.refine.backend import cpu_backend
from cryorefine.refine.estep import (BatchInputs, PassSettings, ProjectionCache, Significant, empty_accumulator,
                                     fine_samples, fine_weights, inverse_sigma2, lazy_zeros, local_chunks)
from cryorefine.refine.likelihood import coarse_scores, weighted_images
from cryorefine.refine.memory import EStepLimits, IterationSizes
from cryorefine.refine.orientations import local_window, make_grid, make_translations
from cryorefine.refine.pixels import pixel_set, shift_phases

BOX, ANGPIX, NB = 16, 2.0, 3


def _sizes(**kw) -> IterationSizes:
    """Sizes of a box-16 global iteration (HEALPix order 0, C1) with every coarse sample significant."""
    grid = make_grid(0, "C1", angular_step(0), 1, 0.0, False)
    tg = make_translations(3.0, 2.0, ANGPIX, 1, 0.0)
    ps = pixel_set(BOX, BOX)
    n_grid = len(grid.dir_pix) * grid.n_psi
    base = dict(box=BOX, pad=2, n_half=NB, stack_bytes=0, table_bytes=0, projector_radius=BOX / 2,
                data_radius=BOX / 2, optics_box=BOX, n_shells=BOX // 2 + 1, mc=ps.m, mf=ps.m,
                n_translations=len(tg.coarse), n_translation_children=4, n_orientation_children=grid.n_children,
                n_coarse=n_grid, n_fine_grid=n_grid * grid.n_children, n_grid=n_grid, local=False,
                significant=len(tg.coarse) * n_grid)
    return IterationSizes(**(base | kw))


def _batch(seed: int = 0):
    """A tiny global batch: its inputs and pass settings (adaptive fraction 1: every sample significant)."""
    rng = np.random.default_rng(seed)
    vol = rng.normal(size=(BOX, BOX, BOX)).astype(np.float32)
    proj = make_projector(vol, pad=2, r_max=BOX / 2)
    grid = make_grid(0, "C1", angular_step(0), 1, 0.0, False)
    tg = make_translations(3.0, 2.0, ANGPIX, 1, 0.0)
    ps = pixel_set(BOX, BOX)
    m = ps.m
    x = (rng.normal(size=(NB, m)) + 1j * rng.normal(size=(NB, m))).astype(np.complex64)
    ctf = np.ones((NB, m), np.float32)
    inp = BatchInputs(rows=np.arange(NB), optics=0, angpix=ANGPIX, x_coarse=x, x_fine=x.copy(), xnm_fine=x.copy(),
                      power_beyond=np.zeros((NB, BOX // 2 + 1)), ctf_coarse=ctf, ctf_fine=ctf.copy(),
                      scale=np.ones(NB), group=np.zeros(NB, np.int64), preshift_px=np.zeros((NB, 2), np.int64),
                      prior_mu=np.zeros((NB, 2)), old_norm=np.ones(NB))
    st = PassSettings(grid=grid, translations=tg, ps_coarse=ps, ps_fine=ps, inv_sigma2=np.ones(BOX // 2 + 1),
                      adaptive_fraction=1.0, cc_mode=False, sigma_offset=3.0,
                      log_pdf_direction=np.zeros(len(grid.dir_pix)), cache=ProjectionCache(proj, grid, ps, ps, project))
    return proj, grid, tg, ps, inp, st


def test_accumulators_are_the_two_back_projectors_the_estep_allocates():
    s = _sizes(data_radius=5.0)
    acc = empty_accumulator(BOX, 2, 5.0, [BOX], 1, 0)
    est = memory.estimate_peak(s, EStepLimits(NB))
    assert est.accumulators == 2 * (acc.bp.data.nbytes + acc.bp.weight.nbytes)


def test_projectors_are_the_two_padded_transforms_make_projector_keeps():
    s = _sizes(projector_radius=3.0)
    proj = make_projector(np.zeros((BOX, BOX, BOX), np.float32), pad=2, r_max=3.0)
    assert memory.estimate_peak(s, EStepLimits(NB)).projectors == 2 * proj.ft3d.nbytes


def test_final_iteration_adds_the_raw_copies_and_the_joined_sum():
    s = _sizes()
    acc_one = memory.estimate_peak(s, EStepLimits(NB)).accumulators // 2
    diff = (memory.estimate_peak(replace(s, final=True), EStepLimits(NB)).reconstruction
            - memory.estimate_peak(s, EStepLimits(NB)).reconstruction)
    assert diff == 3 * acc_one


def test_final_floor_is_a_lower_bound_of_the_final_iteration():
    """The start-of-run 'at least' figure is never above the final iteration's own estimate, whatever the
    reference limit reached (projectors) and the E-step's batch (the tutorial's run logged 7.97 GiB 'at least',
    then 7.16 GiB for the final iteration, before the floor left the projectors out)."""
    stack = 10 ** 8
    floor = memory.final_floor(BOX, 2, stack, 0)
    for radius in (0.5, BOX / 4, BOX / 2):
        s = _sizes(final=True, stack_bytes=stack, projector_radius=radius, significant=1)
        est = memory.estimate_peak(s, EStepLimits(1))
        assert floor.peak <= est.peak
        assert floor.peak >= est.peak - est.projectors - est.estep_batch - est.caches   # only those are left out


def test_cache_is_what_a_fully_used_projection_cache_holds():
    proj, grid, tg, ps, inp, st = _batch()
    cache = st.cache
    ids = np.arange(len(grid.dir_pix) * grid.n_psi)
    cache.coarse_pairs(ids)
    fine_ids = np.arange(len(ids) * grid.n_children)
    cache.fine_projections(fine_ids, np.tile(np.eye(3), (len(fine_ids), 1, 1)))
    held = cache.coarse.nbytes + cache.pairs[1].nbytes + cache.fine.nbytes   # pairs[0] is a view of coarse
    assert memory.cache_bytes(_sizes(), EStepLimits(NB)) == held
    # above the cap the fine grid is not cached, in the code and in the estimate
    small_cap = EStepLimits(NB, fine_cache_bytes=cache.fine.nbytes - 1)
    assert ProjectionCache(proj, grid, ps, ps, project, small_cap.fine_cache_bytes).fine is None
    assert memory.cache_bytes(_sizes(), small_cap) == cache.coarse.nbytes + cache.pairs[1].nbytes


def test_fine_cache_rows_are_the_expected_union_of_the_batches_rows():
    """k batches of r distinct rows each out of G, drawn at random: the mean union over many trials."""
    rng = np.random.default_rng(3)
    g, n_half, b, per_particle = 2000, 90, 16, 11.0          # 6 batches of ceil(16 * 11) = 176 rows
    s = _sizes(n_fine_grid=g, n_half=n_half, fine_rows=per_particle)
    k, r = -(-n_half // b), int(np.ceil(b * per_particle))
    unions = [np.unique(np.concatenate([rng.choice(g, r, replace=False) for _ in range(k)])).size
              for _ in range(400)]
    assert abs(memory.fine_cache_rows(s, EStepLimits(b)) - np.mean(unions)) < 0.01 * np.mean(unions)
    # one batch that asks for the whole grid makes all of it resident
    assert memory.fine_cache_rows(_sizes(), EStepLimits(NB)) == _sizes().n_fine_grid


def test_lazy_zeros_makes_only_written_pages_resident():
    """The fine cache's rows written here and there make their own pages resident, not 2 MiB around each."""
    rss = memory.resident_bytes()
    if rss is None:
        return
    a = lazy_zeros((20_000, 2_500), np.complex64)        # 400 MB
    assert a.flags.writeable and not a[::997].any()
    rows = np.arange(0, 20_000, 400)                     # 50 rows of 20 kB, 8 MB apart
    a[rows] = 1
    assert memory.resident_bytes() - rss < 16 * 2 ** 20
    assert a.sum() == 50 * 2_500


def test_batch_stages_are_the_buffers_of_a_tiny_batch():
    proj, grid, tg, ps, inp, st = _batch()
    stages = memory.batch_stages(_sizes(), EStepLimits(NB))
    inputs = sum(getattr(inp, f).nbytes for f in ("x_coarse", "x_fine", "xnm_fine", "ctf_coarse", "ctf_fine",
                                                  "power_beyond"))
    assert stages["inputs"] == inputs
    # global pass 1: the weighted images and one complex temporary of their size; cross (float32), the float64
    # residual and the keep mask, over (B, T, U)
    ids = np.arange(len(grid.dir_pix) * grid.n_psi)
    p_pair, p_pow = st.cache.coarse_pairs(ids)
    isig = inverse_sigma2(st, ps, keep_dc=False)
    a = weighted_images(inp.x_coarse, shift_phases(ps, tg.coarse), inp.ctf_coarse * isig[None, :])
    d = coarse_scores(a, p_pair, inp.ctf_coarse ** 2 * isig[None, :], p_pow, False)
    assert stages["coarse"] == 2 * a.nbytes + d.size * (4 + 8 + 1)
    # pass 2 with every coarse pair significant: the fine projections, phase ramps and weights the code makes
    j, t, u = np.nonzero(np.ones(d.shape, bool))
    sig = Significant(j, t, ids[u], np.zeros(len(j)), np.full(NB, len(tg.coarse) * len(ids)))
    fs = fine_samples(sig, st, st.cache)
    acc = empty_accumulator(BOX, 2, BOX / 2, [BOX], 1, 1)
    fw = fine_weights(inp, st, sig, fs, isig.astype(np.float32), cpu_backend(), acc)
    own_rows = 0 if fs.p is st.cache.fine else fs.p.nbytes      # the kernels read a cached grid in place
    kept = own_rows + fs.rot.nbytes + fs.phases.nbytes + NB * ps.m * (8 + 4) + fw.w.nbytes
    # block_scores' float64 residual (its kernel forms the cross terms) and one float32 norm per (block, b)
    n_blocks = len(j)
    assert stages["fine"] == kept + fw.w.size * 8 + n_blocks * fw.w.shape[2] * 4
    assert stages["significant"] == 4 * 8 * len(j)


def test_batch_term_follows_batch_size_and_local_chunks():
    s = _sizes(n_half=1000, significant=50)
    assert memory.batch_bytes(s, EStepLimits(8)) < memory.batch_bytes(s, EStepLimits(64))
    loc = replace(s, local=True, n_coarse=400, n_fine_grid=0, mc=2000)
    big = memory.batch_stages(loc, EStepLimits(64))["coarse"]
    small = memory.batch_stages(loc, EStepLimits(64, local_chunk_bytes=memory.MIN_CHUNK_BYTES))["coarse"]
    assert small < big


def test_fit_budget_lowers_the_batch_and_says_so():
    s = _sizes(n_half=5000, significant=400, mf=3000, mc=800, n_coarse=4000, n_grid=4000, n_fine_grid=32000)
    # chunks at their floor and no fine cache: only the batch can go down
    lim = EStepLimits(64, memory.MIN_CHUNK_BYTES, memory.MIN_CHUNK_BYTES, 0)
    full = memory.estimate_peak(s, lim)
    plan = memory.fit_budget(s, lim, full.peak - full.estep_batch // 2)
    assert plan.fits and plan.estimate.peak <= plan.budget
    assert plan.limits == replace(lim, batch_size=plan.limits.batch_size) and plan.limits.batch_size < 64
    assert plan.lowered == f"--batch_size 64 -> {plan.limits.batch_size}"
    assert "lowered --batch_size 64" in memory.plan_line(plan)
    # with the default caps the step that saves most goes first: with few significant samples per particle (a
    # batch then projects few fine rows of its own without the cache) dropping the fine cache; with many, halving
    # the batch (its kernels read the cached rows in place, so without the cache it would project them itself)
    few = replace(s, significant=50)
    cached = memory.fit_budget(few, EStepLimits(64), memory.estimate_peak(few, EStepLimits(64)).peak - 1)
    assert cached.limits.fine_cache_bytes == 0 and "fine-projection cache off" in cached.lowered
    many = memory.fit_budget(s, EStepLimits(64), memory.estimate_peak(s, EStepLimits(64)).peak - 1)
    assert many.lowered == "--batch_size 64 -> 32"
    roomy = memory.fit_budget(s, lim, full.peak)
    assert roomy.limits == lim and roomy.lowered == "" and "lowered" not in memory.plan_line(roomy)


def test_fit_budget_goes_on_with_a_warning_when_nothing_fits():
    s = _sizes(n_half=5000, significant=400, mf=3000, mc=800, n_coarse=4000, n_grid=4000, n_fine_grid=32000)
    plan = memory.fit_budget(s, EStepLimits(64), 1)
    assert not plan.fits and plan.limits.batch_size == 1 and plan.limits.fine_cache_bytes == 0
    assert plan.limits.sums_chunk_bytes == memory.MIN_CHUNK_BYTES
    assert "WARNING" in memory.plan_line(plan) and "going on" in memory.plan_line(plan)


def test_expected_significant():
    spread = np.array([0, 20, 0, 20])                   # mean 10, standard deviation 10
    assert memory.expected_significant(spread, 4, 500, cc=False, after_cc=False) == 25     # 10 + 3 * 10 / 2
    assert memory.expected_significant(spread, 4, 20, cc=False, after_cc=False) == 20
    assert memory.expected_significant(spread, 4, 500, cc=True, after_cc=False) == 1
    assert memory.expected_significant(spread, 4, 500, cc=False, after_cc=True) == 500
    assert memory.expected_significant(np.zeros(5, np.int64), 2, 500, cc=False, after_cc=False) == 500
    seen = memory.EStepStats(blocks=41.2, fine_rows=100.0, columns=8.0)
    assert memory.expected_significant(spread, 4, 500, cc=False, after_cc=False, seen=seen) == 42


def test_available_and_resident_bytes_read_proc(tmp_path):
    f = tmp_path / "meminfo"
    f.write_text("MemTotal:       16000000 kB\nMemAvailable:    2000000 kB\n")
    assert memory.available_bytes(str(f)) == 2000000 * 1024
    assert memory.available_bytes(str(tmp_path / "missing")) is None
    assert memory.budget_bytes(1.5) == int(1.5 * memory.GIB)
    # the peak so far (getrusage, kB on Linux) is at least the resident memory now (VmRSS), in the same unit
    rss = memory.resident_bytes()
    assert rss is None or rss <= memory.peak_bytes() < 4 * rss


def test_a_run_over_budget_lowers_the_batch_says_so_and_goes_on(small_set, tmp_path, monkeypatch):
    """Wired in: a budget below the interpreter's own footprint lowers what saves memory (in iteration 2 the E-step
    batch, as far as that saves anything: the batches the E-step forms), logs the estimate, what it lowered and the
    warning, and the refinement still finishes."""
    from conftest import write_subset
    from cryorefine.cli import main
    from cryorefine.refine import expectation

    write_subset(small_set, 16, tmp_path / "p.star")
    batch_args, sizes = [], []
    real = expectation.iter_batches

    def recording(rows, optics_index, batch):
        batch_args.append(batch)
        for chunk in real(rows, optics_index, batch):
            sizes.append(len(chunk))
            yield chunk
    monkeypatch.setattr(expectation, "iter_batches", recording)
    out = tmp_path / "Refine3D" / "run"
    argv = ["refine", "--i", str(tmp_path / "p.star"), "--ref", str(small_set / "reference.mrc"), "--o", str(out),
            "--sym", "D2", "--ini_high", "50", "--particle_diameter", "150", "--auto_iter_max", "2", "--j", "1",
            "--quiet", "--max_memory", "0.01"]
    assert main(argv) == 0
    lines = [ln for ln in (tmp_path / "Refine3D" / "run.out").read_text().splitlines() if "estimated peak" in ln]
    assert len(lines) == 2 and all("WARNING: above the budget of 0.01 GiB" in ln and "going on" in ln for ln in lines)
    # lowered as far as it saves anything (after the CC iteration only the directions that received particles
    # are searched, RELION's direction prior, so a few particles per batch already take little)
    import re as _re
    lowered = int(_re.search(r"lowered --batch_size 64 -> (\d+)", lines[1]).group(1))
    assert lowered < 16 and batch_args[-2:] == [lowered, lowered]      # both halves of iteration 2
    assert max(sizes[-2:]) <= lowered
    # after every iteration, the measured peak so far (this process: pytest with the run in it)
    import re
    peaks = [float(x) for x in re.findall(r" Memory: measured peak ([\d.]+) GiB so far",
                                          (tmp_path / "Refine3D" / "run.out").read_text())]
    assert len(peaks) == 2 and peaks[0] <= peaks[1] and 0.1 < peaks[1] <= memory.peak_bytes() / memory.GIB + 0.01


def test_after_the_cc_iteration_the_plan_counts_a_probe_batch(small_set, tmp_path, monkeypatch):
    """Iteration 2 (after the cross-correlation one) has no earlier counts of the pass-2 buffers: pass 1 of a batch
    of half-1 particles drawn at random is run before the plan, and its counts per particle are those the E-step
    then counts on those particles (here the whole half, one batch)."""
    from conftest import write_subset
    from cryorefine.cli import main
    from cryorefine.refine import loop

    write_subset(small_set, 24, tmp_path / "p.star")
    probes, halves = [], []
    real_probe, real_expectation = loop.probe_stats, loop.expectation

    def probe(*args, **kw):
        probes.append(real_probe(*args, **kw))
        return probes[-1]

    def expectation(*args, **kw):
        new_poses, accs = real_expectation(*args, **kw)
        halves.append(accs[0])
        return new_poses, accs
    monkeypatch.setattr(loop, "probe_stats", probe)
    monkeypatch.setattr(loop, "expectation", expectation)
    argv = ["refine", "--i", str(tmp_path / "p.star"), "--ref", str(small_set / "reference.mrc"),
            "--o", str(tmp_path / "run"), "--sym", "D2", "--ini_high", "50", "--particle_diameter", "150",
            "--auto_iter_max", "2", "--j", "1", "--quiet"]
    assert main(argv) == 0
    assert len(probes) == 1 and len(halves) == 2          # probed in iteration 2 only
    acc, seen = halves[1], probes[0]
    n = acc.count
    assert 0 < n <= 64 and seen.blocks > 1              # one batch: the whole half
    assert (seen.blocks, seen.fine_rows, seen.columns) == (acc.n_blocks / n, acc.n_fine_rows / n, acc.n_columns / n)


def test_local_cache_is_the_two_window_buffers_of_the_largest_chunk():
    """Local searches: the two buffers of window projections the cache keeps, as the chunks the code makes fill them,
    against cache_bytes (a batch's windows when they fit, half the chunk cap each when they do not)."""
    proj, _, _, ps, _, _ = _batch()
    grid = make_grid(3, "C1", angular_step(3), 1, 0.0, True)     # windows of 22.5 deg: few overlap
    rng = np.random.default_rng(3)
    nb = 12
    win = local_window(grid, rng.uniform(-180, 180, nb), rng.uniform(0, 180, nb), rng.uniform(-180, 180, nb),
                       2 * angular_step(4))
    n_coarse = int(np.diff(win.offsets).max())
    t = 5
    for cap in (10 ** 9, 400 * 16 * ps.m):
        cache = ProjectionCache(proj, grid, ps, ps, project)
        for _ in range(2):                      # two batches of the same windows: both buffers get used
            for j0, j1 in local_chunks(win, 16 * ps.m, 24 * t, cap):
                cache.local_projections(np.unique(win.ids[win.offsets[j0]:win.offsets[j1]]))
        held = sum(b.nbytes for b in (cache._held, cache._spare) if b is not None)
        s = _sizes(local=True, n_half=nb, n_coarse=n_coarse, mc=ps.m, n_translations=t)
        planned = memory.cache_bytes(s, EStepLimits(nb, local_chunk_bytes=cap))
        assert 0.5 * planned < held <= planned


def test_local_cache_counts_the_distinct_orientations_of_overlapping_windows():
    """Neighbouring particles' windows overlap: the buffers hold a batch's distinct orientations, which the plan
    takes from the windows of batches in the E-step's order (local_batch_windows), not the sum of the windows."""
    from types import SimpleNamespace
    proj, _, _, ps, _, _ = _batch()
    grid = make_grid(3, "C1", angular_step(3), 1, 0.0, True)
    rng = np.random.default_rng(5)
    nb, sigma = 24, 2 * angular_step(4)
    centres = rng.uniform([-180, 20, -180], [180, 160, 180], (3, 3))[rng.integers(0, 3, nb)]
    rot, tilt, psi = (centres + rng.normal(0, 1.0, (nb, 3))).T
    largest, distinct = memory.local_batch_windows(SimpleNamespace(rot=rot, tilt=tilt, psi=psi), np.arange(nb), grid,
                                                   sigma, nb)
    win = local_window(grid, rot, tilt, psi, sigma)
    assert largest == np.diff(win.offsets).max()
    assert distinct == np.unique(win.ids).size < win.ids.size / 2
    cache = ProjectionCache(proj, grid, ps, ps, project)
    for _ in range(2):                          # two batches of the same windows: both buffers get used
        for j0, j1 in local_chunks(win, 16 * ps.m, 24 * 5, 10 ** 9):
            cache.local_projections(np.unique(win.ids[win.offsets[j0]:win.offsets[j1]]))
    held = sum(b.nbytes for b in (cache._held, cache._spare) if b is not None)
    s = _sizes(local=True, n_half=nb, n_coarse=largest, mc=ps.m, n_translations=5)
    assert memory.cache_bytes(replace(s, window_rows=distinct), EStepLimits(nb)) == held
    assert memory.cache_bytes(s, EStepLimits(nb)) > 2 * held          # without the windows' overlap
