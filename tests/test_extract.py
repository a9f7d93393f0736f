"""`cryorefine extract`: windowing, re-centring, rescaling, normalisation, stacks and the CLI (mics set)."""

from __future__ import annotations

import glob
import importlib.util
import os
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from cryorefine.cli import main
from cryorefine.extract.extraction import (ExtractParams, crosses_edge, default_bg_radius, extract_from_micrograph,
                                           output_angpix, process_boxes, window_particles)
from cryorefine.extract.recenter import recenter, relion_round
from cryorefine.geometry.euler import euler_to_matrix

MIC_APIX = 1.5


def _run(tmp: Path, monkeypatch, *argv: str) -> int:
    """Run the CLI in folder tmp (image names in the output are relative to it)."""
    monkeypatch.chdir(tmp)
    return main(["extract", "--no_progress", *argv])


def _stack(star: Path) -> np.ndarray:
    """All images of a particles.star, in its order (paths relative to the star's run folder)."""
    parts = starfile.read(star)["particles"]
    run_dir = star.parents[2]     # <run>/Extract/jobNNN/particles.star
    cache: dict[str, np.ndarray] = {}
    out = []
    for name in parts["rlnImageName"]:
        idx, path = name.split("@")
        if path not in cache:
            cache[path] = mrcfile.read(run_dir / path)
        out.append(cache[path][int(idx) - 1])
    return np.asarray(out)


@pytest.fixture(scope="module")
def runs(mics_set, tmp_path_factory):
    """The extraction jobs the tests look at, each run once (about 1-2 s each)."""
    base = tmp_path_factory.mktemp("extract")
    mp = pytest.MonkeyPatch()
    m = str(mics_set)
    jobs = {
        # plain extraction like the simulator's reference (RELION GUI defaults: norm + invert)
        "list": ["--coord_list", f"{m}/coordinates.star", "--extract_size", "128", "--norm", "--bg_radius", "48",
                 "--invert_contrast"],
        # the same from coordinate files next to the micrographs, float16, two processes
        "suffix16": ["--coord_suffix", "_pick.star", "--extract_size", "128", "--norm", "--bg_radius", "48",
                     "--invert_contrast", "--float16", "--j", "2"],
        # refined particles, re-centred, binned to 3.0 A/px
        "recenter64": ["--reextract_data_star", f"{m}/particles_mic_refined.star", "--recenter",
                       "--extract_size", "128", "--scale", "64", "--norm", "--invert_contrast"],
        "recenter128": ["--reextract_data_star", f"{m}/particles_mic_refined.star", "--recenter",
                        "--extract_size", "128", "--norm", "--invert_contrast"],
        "reset": ["--reextract_data_star", f"{m}/particles_mic_refined.star", "--reset_offsets",
                  "--extract_size", "128", "--scale", "64", "--norm", "--invert_contrast"],
    }
    out = {}
    try:
        for k, (name, argv) in enumerate(jobs.items()):
            rc = _run(base, mp, "--i", f"{m}/micrographs_ctf.star", "--o", f"Extract/job{k + 1:03d}/", *argv)
            assert rc == 0, name
            out[name] = base / f"Extract/job{k + 1:03d}/particles.star"
    finally:
        mp.undo()
    return out


# ------------------------------------------------------------------------------------------------
# re-centring


def test_relion_round_halves_away_from_zero():
    assert relion_round([-2.5, -1.5, -0.4, 0.5, 1.5, 2.49]).tolist() == [-3, -2, 0, 1, 2, 2]


def test_recenter_on_a_3d_point():
    """--recenter_x/y/z: the box moves to where A·c lands, in micrograph pixels; remainder kept in the origin."""
    # rot = 90, tilt = psi = 0: A = RELION Rz(90) sends (10, 0, 0) to (0, -10, 0)
    r = recenter([500.0], [400.0], [0.0], [0.0], [90.0], [0.0], [0.0], 1.5, 1.5, center_xyz=(10.0, 0.0, 0.0))
    assert r.coord_x[0] == pytest.approx(500.0) and r.coord_y[0] == pytest.approx(390.0)
    assert abs(r.origin_x_A[0]) < 1e-9 and abs(r.origin_y_A[0]) < 1e-9
    # general case: coordinate - origin/p_mic must equal the old centre + (A c)_xy (all in micrograph px)
    rng = np.random.default_rng(0)
    n = 50
    rot, tilt, psi = rng.uniform(-180, 180, n), rng.uniform(0, 180, n), rng.uniform(-180, 180, n)
    ox, oy = rng.uniform(-9, 9, n), rng.uniform(-9, 9, n)
    cx, cy = rng.integers(100, 900, n).astype(float), rng.integers(100, 900, n).astype(float)
    c = (7.0, -3.0, 12.0)
    p_part, p_mic, ref_apix = 3.0, 1.5, 2.0      # particles binned 2x; point given in a 2.0 A/px reference
    r = recenter(cx, cy, ox, oy, rot, tilt, psi, p_part, p_mic, center_xyz=c, ref_angpix=ref_apix)
    a_c = np.einsum("nij,j->ni", euler_to_matrix(rot, tilt, psi), np.array(c) * ref_apix / p_part)
    want_x = cx - ox / p_mic + a_c[:, 0] * p_part / p_mic
    want_y = cy - oy / p_mic + a_c[:, 1] * p_part / p_mic
    np.testing.assert_allclose(r.coord_x - r.origin_x_A / p_mic, want_x, atol=1e-9)
    np.testing.assert_allclose(r.coord_y - r.origin_y_A / p_mic, want_y, atol=1e-9)
    assert np.all(r.coord_x == np.round(r.coord_x)) and np.all(np.abs(r.origin_x_A / p_mic) <= 0.5)


def test_recenter_puts_true_centre_in_the_box_centre(runs, mics_set):
    """After --recenter: true centre within 0.5 micrograph px of (box centre - remaining origin); rest kept."""
    out = starfile.read(runs["recenter64"])
    parts, truth = out["particles"], starfile.read(mics_set / "truth_mic.star")
    refined = starfile.read(mics_set / "particles_mic_refined.star")["particles"]
    assert len(parts) == len(truth) == 800
    assert (parts["rlnMicrographName"] == truth["rlnMicrographName"]).all()
    # box centre on the micrograph = (int)coordinate (extraction convention)
    box_x, box_y = np.trunc(parts["rlnCoordinateX"]), np.trunc(parts["rlnCoordinateY"])
    ex = box_x - parts["rlnOriginXAngst"] / MIC_APIX - truth["rlnCoordinateX"]
    ey = box_y - parts["rlnOriginYAngst"] / MIC_APIX - truth["rlnCoordinateY"]
    assert np.abs(ex).max() < 0.5 and np.abs(ey).max() < 0.5
    # the sub-pixel remainder stays (RELION does not zero it) and is at most half a micrograph pixel
    assert np.abs(parts["rlnOriginXAngst"]).max() <= 0.5 * MIC_APIX + 1e-9
    assert np.abs(parts["rlnOriginXAngst"]).max() > 0.1
    # the picked boxes were off by up to 4 px + sub-pixel, now the integer part is gone
    assert np.abs(refined["rlnCoordinateX"] - truth["rlnCoordinateX"]).max() > 3
    for label in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnDefocusU", "rlnDefocusAngle", "rlnClassNumber"):
        np.testing.assert_array_equal(parts[label].to_numpy(), refined[label].to_numpy())


def test_reset_offsets_zero_origins_same_coordinates(runs, mics_set):
    parts = starfile.read(runs["reset"])["particles"]
    refined = starfile.read(mics_set / "particles_mic_refined.star")["particles"]
    assert (parts["rlnOriginXAngst"] == 0).all() and (parts["rlnOriginYAngst"] == 0).all()
    np.testing.assert_array_equal(parts["rlnCoordinateX"], refined["rlnCoordinateX"])
    np.testing.assert_array_equal(parts["rlnCoordinateY"], refined["rlnCoordinateY"])


# ------------------------------------------------------------------------------------------------
# windowing and edges


def _ramp_micrograph(ny=120, nx=150):
    y, x = np.mgrid[0:ny, 0:nx]
    return (x + 1000.0 * y).astype(np.float32)


def test_window_centre_and_edge_replication():
    """Pixel (int)coord sits at box index N//2; outside pixels take the nearest edge value (RELION)."""
    mic = _ramp_micrograph()
    cx = np.array([75.9, 2.0, 149.0, -3.0, 60.0])
    cy = np.array([60.2, 50.0, 119.0, 10.0, 130.0])
    boxes = window_particles(mic, cx, cy, 16)
    assert boxes[0, 8, 8] == mic[60, 75]
    padded = np.pad(mic, 40, mode="edge")
    for k in range(len(cx)):
        x0, y0 = int(cx[k]) - 8 + 40, int(cy[k]) - 8 + 40
        np.testing.assert_array_equal(boxes[k], padded[y0:y0 + 16, x0:x0 + 16])
    assert crosses_edge(cx, cy, 16, mic.shape).tolist() == [False, True, True, True, True]
    # a box touching the last column from inside is not outside
    assert not crosses_edge([150 - 8], [60], 16, mic.shape)[0]
    assert crosses_edge([150 - 7], [60], 16, mic.shape)[0]


def test_skip_outside_drops_only_edge_crossers():
    mic = _ramp_micrograph()
    cx, cy = np.array([75.0, 3.0, 143.0]), np.array([60.0, 60.0, 60.0])
    params = ExtractParams(extract_size=16, skip_outside=True)
    images, keep = extract_from_micrograph(mic, cx, cy, params)
    assert keep.tolist() == [True, False, False] and images.shape == (1, 16, 16)
    images, keep = extract_from_micrograph(mic, cx, cy, ExtractParams(extract_size=16))
    assert keep.all() and images.shape == (3, 16, 16)


# ------------------------------------------------------------------------------------------------
# rescaling and normalisation


def _background(box: int, radius: int) -> np.ndarray:
    c = np.arange(box) - box // 2
    return (c[:, None] ** 2 + c[None, :] ** 2) > radius ** 2


def test_rescale_keeps_band_limited_content():
    """--scale: a cosine below the new Nyquist survives Fourier cropping exactly (mean kept, centre kept)."""
    n, m = 64, 32
    y, x = np.mgrid[0:n, 0:n] - n // 2
    img = 3.0 + np.cos(2 * np.pi * (5 * x + 3 * y) / n)
    small = process_boxes(np.stack([img, -img]), ExtractParams(extract_size=n, scale=m))
    ys, xs = np.mgrid[0:m, 0:m] - m // 2
    np.testing.assert_allclose(small[0], 3.0 + np.cos(2 * np.pi * (5 * xs + 3 * ys) / m), atol=1e-5)
    np.testing.assert_allclose(small[1], -small[0], atol=1e-5)
    assert output_angpix(1.5, 128, 64) == 3.0 and default_bg_radius(64) == 24 and default_bg_radius(360) == 135


def test_normalise_removes_ramp_on_noise():
    """--norm on noise + offset + steep plane: whole box mean 0 / std 1 (within 0.05), background exact."""
    rng = np.random.default_rng(3)
    n = 96
    y, x = np.mgrid[0:n, 0:n] - n // 2
    imgs = 7.0 + 0.2 * x - 0.15 * y + 3.0 * rng.standard_normal((20, n, n))
    out = process_boxes(imgs, ExtractParams(extract_size=n, norm=True, bg_radius=36, invert_contrast=True))
    bg = _background(n, 36)
    assert np.abs(out[:, bg].mean(1)).max() < 1e-5 and np.abs(out[:, bg].std(1) - 1).max() < 1e-5
    assert np.abs(out.mean((1, 2))).max() < 0.05 and np.abs(out.std((1, 2)) - 1).max() < 0.05
    slope = np.polyfit(np.arange(n), out.mean((0, 1)), 1)[0]
    assert abs(slope) < 1e-3                       # inverted, so a left-over plane would show as -0.2/3 per px
    no_ramp = process_boxes(imgs, ExtractParams(extract_size=n, norm=True, bg_radius=36, ramp=False))
    assert np.abs(no_ramp.std((1, 2)) - 1).min() > 0.1


def test_normalised_particles_background_stats(runs):
    """Output background (independently computed mask) has mean 0 and std 1, at box 128 and after binning to 64."""
    for key, box, radius in (("list", 128, 48), ("recenter64", 64, 24)):
        imgs = _stack(runs[key]).astype(np.float64)
        assert imgs.shape[1:] == (box, box)
        bg = _background(box, radius)
        assert np.abs(imgs[:, bg].mean(1)).max() < 0.05
        assert np.abs(imgs[:, bg].std(1) - 1).max() < 0.05


def test_matches_simulator_extraction(runs, mics_set):
    """Our extraction of the picked coordinates correlates >= 0.999 with the simulator's RELION-style one."""
    ours = _stack(runs["list"]).reshape(800, -1).astype(np.float64)
    ref = mrcfile.read(mics_set / "Extract/particles_mic.mrcs").reshape(800, -1).astype(np.float64)
    ours -= ours.mean(1, keepdims=True)
    ref -= ref.mean(1, keepdims=True)
    cc = (ours * ref).sum(1) / np.sqrt((ours ** 2).sum(1) * (ref ** 2).sum(1))
    assert cc.min() >= 0.999


def test_float16_and_parallel_equal_float32(runs):
    """Mode-12 stacks from --j 2 equal the float32 --j 1 ones rounded to float16; image names and headers agree."""
    a32, a16 = _stack(runs["list"]), _stack(runs["suffix16"])
    assert a16.dtype == np.float16 and a32.dtype == np.float32
    np.testing.assert_array_equal(a16, a32.astype(np.float16))
    p32, p16 = starfile.read(runs["list"])["particles"], starfile.read(runs["suffix16"])["particles"]
    assert [n.split("@")[0] for n in p32["rlnImageName"]] == [n.split("@")[0] for n in p16["rlnImageName"]]
    stacks = sorted(glob.glob(str(runs["suffix16"].parent / "Micrographs" / "*.mrcs")))
    assert len(stacks) == 20 and stacks[0].endswith("Micrographs/mic_0001.mrcs")
    with mrcfile.open(stacks[0]) as mrc:
        assert mrc.header.mode == 12 and mrc.voxel_size.x == pytest.approx(1.5)


def test_rescaled_optics_table(runs):
    """128 -> 64 from 1.5 A/px micrographs: optics pixel 3.0 A, box 64, original pixel 1.5; stacks say 3.0."""
    out = starfile.read(runs["recenter64"])
    opt = out["optics"].iloc[0]
    assert opt["rlnImagePixelSize"] == pytest.approx(3.0) and int(opt["rlnImageSize"]) == 64
    assert opt["rlnMicrographOriginalPixelSize"] == pytest.approx(1.5) and int(opt["rlnImageDimensionality"]) == 2
    name = out["particles"]["rlnImageName"].iloc[0]
    assert name == "000001@Extract/job003/Micrographs/mic_0001.mrcs"
    with mrcfile.open(runs["recenter64"].parents[2] / name.split("@")[1]) as mrc:
        assert mrc.voxel_size.x == pytest.approx(3.0) and mrc.data.shape == (40, 64, 64)


# ------------------------------------------------------------------------------------------------
# CLI: user mistakes and missing inputs


def _synthetic_project(tmp: Path, n_mics: int = 2) -> Path:
    """Micrographs 200x160 with a few coordinates, some at or over the edge."""
    (tmp / "Micrographs").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    rows = []
    for k in range(n_mics):
        name = f"Micrographs/m{k}.mrc"
        with mrcfile.new(tmp / name, overwrite=True) as mrc:
            mrc.set_data(rng.standard_normal((160, 200)).astype(np.float32))
            mrc.voxel_size = 2.0
        coords = pd.DataFrame({"rlnCoordinateX": [100.0, 5.0, 199.0, 100.0], "rlnCoordinateY": [80.0, 80.0, 80.0, 150.0]})
        starfile.write({"": coords}, tmp / f"Micrographs/m{k}_pick.star", overwrite=True)
        rows.append({"rlnMicrographName": name, "rlnOpticsGroup": 1, "rlnDefocusU": 15000.0, "rlnDefocusV": 14000.0,
                     "rlnDefocusAngle": 30.0})
    optics = pd.DataFrame({"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1], "rlnVoltage": [300.0],
                           "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1],
                           "rlnMicrographPixelSize": [2.0]})
    starfile.write({"optics": optics, "micrographs": pd.DataFrame(rows)}, tmp / "mics.star", overwrite=True)
    return tmp / "mics.star"


def test_edge_particles_filled_or_skipped(tmp_path, monkeypatch, capsys):
    star = _synthetic_project(tmp_path)
    common = ["--i", str(star), "--coord_suffix", "_pick.star", "--extract_size", "32", "--norm"]
    assert _run(tmp_path, monkeypatch, *common, "--o", "Extract/job001/") == 0
    log = capsys.readouterr().out
    assert "6 filled by edge replication, 0 skipped" in log
    parts = starfile.read(tmp_path / "Extract/job001/particles.star")["particles"]
    assert len(parts) == 8 and (parts["rlnDefocusU"] == 15000.0).all() and (parts["rlnCtfScalefactor"] == 1).all()
    assert np.isfinite(_stack(tmp_path / "Extract/job001/particles.star")).all()
    assert _run(tmp_path, monkeypatch, *common, "--skip_outside", "--o", "Extract/job002/") == 0
    assert "0 filled by edge replication, 6 skipped" in capsys.readouterr().out
    parts = starfile.read(tmp_path / "Extract/job002/particles.star")
    parts = parts["particles"] if isinstance(parts, dict) else parts
    assert len(parts) == 2 and (parts["rlnCoordinateX"] == 100).all()
    opt = starfile.read(tmp_path / "Extract/job002/particles.star")["optics"].iloc[0]
    assert opt["rlnImagePixelSize"] == pytest.approx(2.0) and opt["rlnMicrographOriginalPixelSize"] == pytest.approx(2.0)
    assert "rlnMicrographPixelSize" not in starfile.read(tmp_path / "Extract/job002/particles.star")["optics"]


def test_missing_micrograph_error_or_skip(tmp_path, monkeypatch, capsys):
    star = _synthetic_project(tmp_path)
    (tmp_path / "Micrographs/m1.mrc").unlink()
    common = ["--i", str(star), "--coord_suffix", "_pick.star", "--extract_size", "32"]
    assert _run(tmp_path, monkeypatch, *common, "--o", "Extract/job001/") == 2
    err = capsys.readouterr().err
    assert "Micrographs/m1.mrc" in err and "not found" in err and "Traceback" not in err
    assert not (tmp_path / "Extract/job001/particles.star").exists()
    assert _run(tmp_path, monkeypatch, *common, "--skip_missing", "--o", "Extract/job002/") == 0
    captured = capsys.readouterr()
    assert "warning" in captured.err and "Micrographs/m1.mrc" in captured.err
    assert len(starfile.read(tmp_path / "Extract/job002/particles.star")["particles"]) == 4


@pytest.mark.parametrize("bad, option", [(["--extract_size", "33"], "--extract_size"),
                                         (["--extract_size", "32", "--scale", "0"], "--scale"),
                                         (["--extract_size", "32", "--norm", "--bg_radius", "17"], "--bg_radius")])
def test_bad_sizes_exit_2(tmp_path, monkeypatch, capsys, bad, option):
    star = _synthetic_project(tmp_path, n_mics=1)
    assert _run(tmp_path, monkeypatch, "--i", str(star), "--coord_suffix", "_pick.star", *bad, "--o", "E/") == 2
    err = capsys.readouterr().err
    assert option in err and err.count("\n") == 1
    assert not (tmp_path / "E").exists()


def test_coordinate_files_not_found_are_named(tmp_path, monkeypatch, capsys):
    """No coordinate file at all: one error line naming what was looked for (it was a warning, then "no particles
    to extract"); one missing of two: the warning names it and the other micrograph is extracted."""
    _synthetic_project(tmp_path, n_mics=2)
    assert _run(tmp_path, monkeypatch, "--i", "mics.star", "--coord_suffix", "_nope.star", "--extract_size", "32",
                "--o", "E/") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no coordinate file for any of the 2 micrographs" in err, err
    assert "Micrographs/m0_nope.star" in err and not (tmp_path / "E").exists()
    (tmp_path / "Micrographs/m1_pick.star").unlink()
    assert _run(tmp_path, monkeypatch, "--i", "mics.star", "--coord_suffix", "_pick.star", "--extract_size", "32",
                "--o", "E/") == 0
    assert "1 micrographs have no coordinate file (first: Micrographs/m1_pick.star)" in capsys.readouterr().err


@pytest.mark.filterwarnings("error")
def test_float16_overflow_is_one_line_and_no_stack(tmp_path, monkeypatch, capsys):
    """--float16 without --norm on a micrograph of values near 1e6: RELION's mode 12 cannot hold them (inf in the
    stack, exit 0 before); one line naming the stack, nothing left, no numpy warning."""
    _synthetic_project(tmp_path, n_mics=1)
    with mrcfile.open(tmp_path / "Micrographs/m0.mrc", "r+") as mrc:
        mrc.set_data((mrc.data * 1e6).astype(np.float32))
    assert _run(tmp_path, monkeypatch, "--i", "mics.star", "--coord_suffix", "_pick.star", "--extract_size", "32",
                "--float16", "--o", "E/") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "exceed the float16 range" in err and "m0.mrcs" in err, err
    assert not list(tmp_path.rglob("*.mrcs")) and not (tmp_path / "E").exists()


def test_odd_scale_is_rounded_up_as_relion(tmp_path, monkeypatch, capsys):
    """relion_preprocess makes --scale 15 into 16 with a warning (the GUI lets a user type an odd size)."""
    star = _synthetic_project(tmp_path, n_mics=1)
    assert _run(tmp_path, monkeypatch, "--i", str(star), "--coord_suffix", "_pick.star", "--extract_size", "32",
                "--scale", "15", "--o", "E/") == 0
    assert "--scale 15 -> 16" in capsys.readouterr().err
    table = starfile.read(tmp_path / "E/particles.star")
    assert int(table["optics"]["rlnImageSize"].iloc[0]) == 16
    stack = tmp_path / table["particles"]["rlnImageName"].iloc[0].split("@")[1]
    assert mrcfile.read(stack).shape[-2:] == (16, 16)


# ------------------------------------------------------------------------------------------------
# binning at extraction vs binning afterwards: same reconstruction


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _shell_fsc(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    fa, fb = np.fft.rfftn(a), np.fft.rfftn(b)
    n = a.shape[0]
    k = np.fft.fftfreq(n) * n
    kx = np.arange(n // 2 + 1)
    r = np.rint(np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2)).astype(int)
    num = np.bincount(r.ravel(), (fa * fb.conj()).real.ravel())
    den = np.sqrt(np.bincount(r.ravel(), (np.abs(fa) ** 2).ravel()) * np.bincount(r.ravel(), (np.abs(fb) ** 2).ravel()))
    return (num / np.maximum(den, 1e-30))[: n // 2 + 1]


_NEEDS_TOOLS = pytest.mark.skipif(
    not (_has("cryorefine.fourier.reconstruct_command") and _has("cryorefine.tools.image_handler")),
    reason="needs `cryorefine reconstruct` and `cryorefine image-handler`")


def _reconstruct(star: Path, out: Path) -> np.ndarray:
    """`cryorefine reconstruct --ctf --sym D2` (true angles from the STAR file) -> map at 3.0 A/px."""
    here = os.getcwd()
    os.chdir(star.parents[2])          # image names are relative to the folder extraction ran in
    try:
        assert main(["reconstruct", "--i", str(star), "--ctf", "--sym", "D2", "--o", str(out)]) == 0
    finally:
        os.chdir(here)
    with mrcfile.open(out) as mrc:
        assert mrc.voxel_size.x == pytest.approx(3.0, rel=1e-3)
        return np.asarray(mrc.data, dtype=np.float64)


@pytest.fixture(scope="module")
def map_extract64(runs, tmp_path_factory):
    """Reconstruction of the re-centred particles extracted at box 128 and binned to 64 by extract --scale."""
    return _reconstruct(runs["recenter64"], tmp_path_factory.mktemp("rec") / "extract64.mrc")


@_NEEDS_TOOLS
def test_recentred_particles_reconstruct_the_truth(runs, mics_set, map_extract64, tmp_path):
    """Re-centred particles give the truth to 10 A (FSC >= 0.8); the same boxes with origins reset do not."""
    from cryorefine.fourier.resize import resize_fourier
    with mrcfile.open(mics_set / "truth.mrc") as mrc:
        truth = resize_fourier(np.asarray(mrc.data, dtype=np.float64), 64)       # 1.5 -> 3.0 A/px
    good = _shell_fsc(map_extract64, truth)
    bad = _shell_fsc(_reconstruct(runs["reset"], tmp_path / "reset.mrc"), truth)
    s10, s12 = int(64 * 3.0 / 10.0), int(64 * 3.0 / 12.0)
    assert good[1:s10 + 1].min() >= 0.8, good[: s10 + 1]
    assert bad[s12] < 0.5, bad[: s12 + 1]


@_NEEDS_TOOLS
def test_binning_at_extraction_equals_binning_afterwards(runs, map_extract64, tmp_path, monkeypatch):
    """Reconstructions (true angles, CTF, D2) from box-64 extraction and from box-128 + image-handler agree to 7 A."""
    run_dir = runs["recenter128"].parents[2]
    monkeypatch.chdir(run_dir)
    # bin every box-128 stack with image-handler, then point a copy of the STAR file at the binned stacks
    out = starfile.read(runs["recenter128"])
    parts, optics = out["particles"].copy(), out["optics"].copy()
    stacks = sorted({n.split("@")[1] for n in parts["rlnImageName"]})
    for stack in stacks:
        binned_stack = tmp_path / stack.replace("/", "_")
        assert main(["image-handler", "--i", stack, "--rescale_angpix", "3.0", "--new_box", "64",
                     "--o", str(binned_stack)]) == 0
    parts["rlnImageName"] = [f"{n.split('@')[0]}@{tmp_path / n.split('@')[1].replace('/', '_')}"
                             for n in parts["rlnImageName"]]
    optics["rlnImagePixelSize"], optics["rlnImageSize"] = 3.0, 64
    binned = run_dir / "Extract/binned/particles.star"
    binned.parent.mkdir()
    starfile.write({"optics": optics, "particles": parts}, binned, overwrite=True)
    fsc = _shell_fsc(map_extract64, _reconstruct(binned, tmp_path / "handler64.mrc"))
    last = int(64 * 3.0 / 7.0)           # shells out to 7 A
    assert fsc[1:last + 1].min() >= 0.95, fsc[: last + 1]


# ------------------------------------------------------------------------------------------------
# bad inputs: boxes off the micrograph, pixel sizes that disagree, re-centring options and columns


def _error_line(capsys) -> str:
    """stderr of a failed run, asserted to be one line with no traceback."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def _warnings(text: str) -> list[str]:
    return [line for line in text.splitlines() if "warning:" in line]


def test_wholly_outside_means_no_pixel_of_the_box_on_the_micrograph():
    """RELION's test: x0 = (int)x - box/2, xF = x0 + box - 1; outside when xF < 0 or x0 >= nx (same for y)."""
    cx = np.array([0.0, -15.9, -16.0, -17.0, 165.9, 166.0, 75.0, 5000.0])
    cy = np.array([0.0, 10.0, 10.0, 10.0, 60.0, 60.0, 135.9, 5000.0])
    from cryorefine.extract.extraction import wholly_outside
    assert wholly_outside(cx, cy, 32, (120, 150)).tolist() == [False, False, True, True, False, True, False, True]


def _add_coordinates(tmp: Path, mic: int, rows: list[tuple[float, float]], replace: bool = False) -> None:
    """Append (or, with replace, write only) these x, y rows to the coordinate file of synthetic micrograph `mic`."""
    path = tmp / f"Micrographs/m{mic}_pick.star"
    old = starfile.read(path)
    new = pd.DataFrame(rows, columns=["rlnCoordinateX", "rlnCoordinateY"])
    starfile.write({"": new if replace else pd.concat([old, new], ignore_index=True)}, path, overwrite=True)


def test_boxes_off_the_micrograph_as_relion(tmp_path, monkeypatch, capsys):
    """A box holding no micrograph pixel (5000, 5000 on 200 x 160) stops the job with one line naming the file and
    row, as RELION's "lies completely outside micrograph"; a box centred off the micrograph that still overlaps it
    (-10, -10; x 200 = nx) is extracted with edge replication, as RELION does."""
    star = _synthetic_project(tmp_path)
    _add_coordinates(tmp_path, 0, [(-10.0, -10.0), (200.0, 80.0)])          # rows 5 and 6 of m0: overlapping
    assert _run(tmp_path, monkeypatch, "--i", str(star), "--coord_suffix", "_pick.star", "--extract_size", "32",
                "--o", "Extract/job001/") == 0
    parts = starfile.read(tmp_path / "Extract/job001/particles.star")["particles"]
    assert {-10.0, 200.0} <= set(parts["rlnCoordinateX"].tolist())
    _add_coordinates(tmp_path, 0, [(5000.0, 5000.0)])                       # row 7: wholly outside
    assert _run(tmp_path, monkeypatch, "--i", str(star), "--coord_suffix", "_pick.star", "--extract_size", "32",
                "--o", "Extract/job002/") == 2
    err = _error_line(capsys)
    assert "Micrographs/m0_pick.star row 7" in err and "lies completely outside" in err
    assert not (tmp_path / "Extract/job002").exists()


def test_recentred_box_off_the_micrograph_names_the_particle_row(mics_set, tmp_path, monkeypatch, capsys):
    """Re-extraction: the row of the refined STAR file is named."""
    table = starfile.read(mics_set / "particles_mic_refined.star")
    table["particles"].loc[2, ["rlnCoordinateX", "rlnCoordinateY"]] = [5000.0, -40.0]
    refined = tmp_path / "refined.star"
    starfile.write(table, refined, overwrite=True)
    assert _run(tmp_path, monkeypatch, "--i", f"{mics_set}/micrographs_ctf.star", "--reextract_data_star",
                str(refined), "--recenter", "--extract_size", "64", "--o", "Extract/job001/") == 2
    err = _error_line(capsys)
    assert f"{refined} row 3" in err and "lies completely outside" in err


def test_star_pixel_size_used_but_a_different_header_warned_once(tmp_path, monkeypatch, capsys):
    """rlnMicrographPixelSize 2.0 in the STAR file, 1.5 in both MRC headers: 2.0 is used (RELION), one warning."""
    star = _synthetic_project(tmp_path)
    assert _run(tmp_path, monkeypatch, "--i", str(star), "--coord_suffix", "_pick.star", "--extract_size", "32",
                "--o", "Extract/job001/") == 0
    assert not _warnings(capsys.readouterr().err)                                # headers agree: nothing to say
    for k in range(2):
        with mrcfile.open(tmp_path / f"Micrographs/m{k}.mrc", "r+") as mrc:
            mrc.voxel_size = 1.5
    assert _run(tmp_path, monkeypatch, "--i", str(star), "--coord_suffix", "_pick.star", "--extract_size", "32",
                "--o", "Extract/job002/") == 0
    warnings = _warnings(capsys.readouterr().err)
    assert len(warnings) == 1
    assert "Micrographs/m0.mrc" in warnings[0] and "rlnMicrographPixelSize 2" in warnings[0]
    assert "1.5 A/px in the MRC header" in warnings[0] and "1 more micrograph likewise" in warnings[0]
    opt = starfile.read(tmp_path / "Extract/job002/particles.star")["optics"].iloc[0]
    assert opt["rlnImagePixelSize"] == pytest.approx(2.0)


@pytest.mark.parametrize("axis", ["x", "y", "z"])
def test_recenter_point_without_recenter_is_an_error(tmp_path, monkeypatch, capsys, axis):
    star = _synthetic_project(tmp_path, n_mics=1)
    assert _run(tmp_path, monkeypatch, "--i", str(star), "--coord_suffix", "_pick.star", "--extract_size", "32",
                f"--recenter_{axis}", "5", "--o", "E/") == 2
    assert f"--recenter_{axis} needs --recenter" in _error_line(capsys)
    assert not (tmp_path / "E").exists()


@pytest.mark.parametrize("drop, point, named", [
    (["rlnOriginXAngst", "rlnOriginYAngst"], [], ["rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginX"]),
    (["rlnOriginYAngst"], [], ["rlnOriginYAngst"]),
    (["rlnAngleTilt"], ["--recenter_z", "10"], ["rlnAngleTilt"])])
def test_recenter_without_offsets_is_an_error(mics_set, tmp_path, monkeypatch, capsys, drop, point, named):
    """--recenter reads the refined offsets (and, for a --recenter_x/y/z point, the angles): missing, not zeros."""
    table = starfile.read(mics_set / "particles_mic_refined.star")
    table["particles"] = table["particles"].drop(columns=drop)
    refined = tmp_path / "refined.star"
    starfile.write(table, refined, overwrite=True)
    assert _run(tmp_path, monkeypatch, "--i", f"{mics_set}/micrographs_ctf.star", "--reextract_data_star",
                str(refined), "--recenter", *point, "--extract_size", "64", "--o", "Extract/job001/") == 2
    err = _error_line(capsys)
    assert str(refined) in err and all(label in err for label in named)
    assert not (tmp_path / "Extract").exists()


def test_minimum_pick_fom_keeps_only_larger_values(tmp_path, monkeypatch, capsys):
    """RELION keeps a coordinate when rlnAutopickFigureOfMerit > --minimum_pick_fom (strictly)."""
    star = _synthetic_project(tmp_path, n_mics=1)
    path = tmp_path / "Micrographs/m0_pick.star"
    coords = starfile.read(path)
    coords["rlnAutopickFigureOfMerit"] = [0.2, 0.5, 0.7, 0.9]
    starfile.write({"": coords}, path, overwrite=True)
    assert _run(tmp_path, monkeypatch, "--i", str(star), "--coord_suffix", "_pick.star", "--extract_size", "32",
                "--minimum_pick_fom", "0.5", "--o", "Extract/job001/") == 0
    parts = starfile.read(tmp_path / "Extract/job001/particles.star")["particles"]
    assert sorted(parts["rlnAutopickFigureOfMerit"].tolist()) == [0.7, 0.9]


def test_reextraction_matches_micrographs_after_the_job_folder(mics_set, tmp_path, monkeypatch, capsys):
    """Particles refined from MotionCorr/job002's micrographs, re-extracted from another job's (RELION matches the
    name after the job folder): every particle found, named as the micrograph STAR names it."""
    table = starfile.read(mics_set / "particles_mic_refined.star")
    table["particles"]["rlnMicrographName"] = "MotionCorr/job002/" + table["particles"]["rlnMicrographName"]
    refined = tmp_path / "refined.star"
    starfile.write(table, refined, overwrite=True)
    assert _run(tmp_path, monkeypatch, "--i", f"{mics_set}/micrographs_ctf.star", "--reextract_data_star",
                str(refined), "--extract_size", "64", "--o", "Extract/job001/") == 0
    parts = starfile.read(tmp_path / "Extract/job001/particles.star")["particles"]
    assert len(parts) == len(table["particles"])
    assert not parts["rlnMicrographName"].str.startswith("MotionCorr").any()


def test_white_dust_removed_with_norm(tmp_path, monkeypatch, capsys):
    """--norm --white_dust 5 replaces a hot pixel (RELION's removeDust inside normalise); without it the pixel stays."""
    star = _synthetic_project(tmp_path, n_mics=1)
    with mrcfile.open(tmp_path / "Micrographs/m0.mrc", "r+") as mrc:
        data = mrc.data.copy()
        data[80, 102] = 500.0                        # inside the box at (100, 80)
        mrc.set_data(data)
    common = ["--i", str(star), "--coord_suffix", "_pick.star", "--extract_size", "32", "--norm"]
    assert _run(tmp_path, monkeypatch, *common, "--o", "Extract/job001/") == 0
    assert _run(tmp_path, monkeypatch, *common, "--white_dust", "5", "--o", "Extract/job002/") == 0
    plain = _stack(tmp_path / "Extract/job001/particles.star")
    clean = _stack(tmp_path / "Extract/job002/particles.star")
    assert plain[0].max() > 100 and clean[0].max() < 8
    np.testing.assert_allclose(clean[1:], plain[1:], atol=1e-5)     # boxes without dust: the same images


def test_reextraction_of_particles_without_ctf_takes_the_micrographs(mics_set, tmp_path, monkeypatch):
    """RELION (preprocessing.cpp) writes the micrograph's CTF into re-extracted particles that have none."""
    table = starfile.read(mics_set / "particles_mic_refined.star")
    table["particles"] = table["particles"].drop(columns=[c for c in table["particles"].columns
                                                          if c.startswith(("rlnDefocus", "rlnCtf", "rlnPhase"))])
    refined = tmp_path / "refined.star"
    starfile.write(table, refined, overwrite=True)
    assert _run(tmp_path, monkeypatch, "--i", f"{mics_set}/micrographs_ctf.star", "--reextract_data_star",
                str(refined), "--extract_size", "64", "--o", "Extract/job001/") == 0
    parts = starfile.read(tmp_path / "Extract/job001/particles.star")["particles"]
    mics = starfile.read(mics_set / "micrographs_ctf.star")["micrographs"].set_index("rlnMicrographName")
    np.testing.assert_allclose(parts["rlnDefocusU"], mics.loc[parts["rlnMicrographName"], "rlnDefocusU"])
