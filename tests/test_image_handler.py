"""`cryorefine image-handler` and the resize functions: RELION resizeMap semantics and map fidelity."""

from __future__ import annotations

import shutil

import mrcfile

import numpy as np
import pytest

from cryorefine.cli import main
from cryorefine.fourier.resize import resize_fourier, window_real
from cryorefine.io.mrc import read_header, read_map, write_map
from cryorefine.io.particles import ParticleImages
from cryorefine.io.star import particle_optics, read_particles
from cryorefine.tools.image_handler import (highpass_map, largest_filter_gain, lowpass_map, output_range_error,
                                           rescaled_box)


def fsc_curve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """FSC per shell round(|k|), shells 0..N/2 (small helper, independent of cryorefine.fourier.fsc)."""
    n = a.shape[0]
    fa, fb = np.fft.rfftn(a), np.fft.rfftn(b)
    k = np.fft.fftfreq(n, 1.0 / n)
    kx = np.arange(n // 2 + 1)
    r = np.rint(np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2)).astype(int).ravel()
    num = np.bincount(r, (fa * fb.conj()).real.ravel())
    d1 = np.bincount(r, (np.abs(fa) ** 2).ravel())
    d2 = np.bincount(r, (np.abs(fb) ** 2).ravel())
    return (num / np.sqrt(d1 * d2))[: n // 2 + 1]


def _min_fsc_to(curve: np.ndarray, box: int, angpix: float, resolution: float) -> float:
    shells = np.arange(1, len(curve))
    return float(curve[1:][box * angpix / shells >= resolution].min())


@pytest.fixture()
def maps(bench_dir):
    return bench_dir / "maps" / "d2tet_small_b64_a2.5.mrc", bench_dir / "maps" / "d2tet_medium_b128_a1.5.mrc"


def test_small_to_medium(maps, tmp_path, capsys):
    small, medium = maps
    out = tmp_path / "up.mrc"
    assert main(["image-handler", "--i", str(small), "--rescale_angpix", "1.5", "--new_box", "128",
                 "--o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "1.509434" in err  # 1.509434 differs from 1.5 by > 0.1 %
    hdr = read_header(out)
    assert hdr.shape == (128, 128, 128)
    assert hdr.angpix == pytest.approx(64 * 2.5 / 106, rel=1e-6)
    assert round(hdr.angpix, 6) == 1.509434
    up, _ = read_map(out)
    ref, _ = read_map(medium)
    assert _min_fsc_to(fsc_curve(up, ref), 128, 1.5, 5.5) >= 0.98


def test_odd_new_box_windows_about_the_centre(maps, tmp_path):
    """--new_box 63 (RELION windows to any size): voxel N//2 of the input is voxel 63//2 of the output."""
    small, _ = maps
    ref, _ = read_map(small)
    assert main(["image-handler", "--i", str(small), "--new_box", "63", "--o", str(tmp_path / "odd.mrc")]) == 0
    odd, angpix = read_map(tmp_path / "odd.mrc")
    assert odd.shape == (63, 63, 63) and angpix == pytest.approx(2.5)
    np.testing.assert_array_equal(odd, ref[1:, 1:, 1:])      # indices 1..63 keep 32 at 31


def test_medium_to_small(maps, tmp_path):
    small, medium = maps
    out = tmp_path / "down.mrc"
    assert main(["image-handler", "--i", str(medium), "--rescale-angpix", "2.5", "--new-box", "64",
                 "--o", str(out)]) == 0
    hdr = read_header(out)
    assert hdr.shape == (64, 64, 64)
    assert round(hdr.angpix, 6) == 2.526316
    down, _ = read_map(out)
    ref, _ = read_map(small)
    assert _min_fsc_to(fsc_curve(down, ref), 64, 2.5, 5.5) >= 0.94


def test_verbatim_relion_command(maps, tmp_path, monkeypatch, capsys):
    small, _ = maps
    shutil.copy(small, tmp_path / "run_it025_class004.mrc")
    monkeypatch.chdir(tmp_path)
    rc = main("image-handler --i run_it025_class004.mrc --angpix 3.54 --rescale_angpix 1.244 "
              "--new_box 256 --o out.mrc".split())
    assert rc == 0
    err = capsys.readouterr().err
    assert "note" in err and "3.54" in err  # header said 2.5
    assert "warning" not in err  # 64*3.54/182 = 1.244835 is within 0.1 % of 1.244
    hdr = read_header(tmp_path / "out.mrc")
    assert hdr.shape == (256, 256, 256)
    assert hdr.angpix == pytest.approx(64 * 3.54 / 182, rel=1e-6)


def test_rescaled_box_rule():
    assert rescaled_box(64, 2.5, 1.5) == 106  # round(106.67) = 107 -> even 106
    assert rescaled_box(128, 1.5, 2.5) == 76  # round(76.8) = 77 -> 76
    assert rescaled_box(256, 1.0, 2.0) == 128


def test_resize_is_fourier_interpolation():
    # a band-limited 2D pattern resampled on a finer grid is the same pattern (exactly)
    n, m = 32, 48
    x = np.arange(n) - n // 2
    img = np.cos(2 * np.pi * 3 * x / n)[:, None] * np.sin(2 * np.pi * 5 * x / n)[None, :] + 0.7
    xm = (np.arange(m) - m // 2) * n / m
    want = np.cos(2 * np.pi * 3 * xm / n)[:, None] * np.sin(2 * np.pi * 5 * xm / n)[None, :] + 0.7
    np.testing.assert_allclose(resize_fourier(img, m), want, atol=1e-5)
    # down again: back to the original; mean preserved both ways
    np.testing.assert_allclose(resize_fourier(want, n), img, atol=1e-5)
    assert resize_fourier(img, m).mean() == pytest.approx(0.7, abs=1e-6)


def test_resize_stack_equals_per_image_and_keeps_centre():
    rng = np.random.default_rng(3)
    stack = rng.normal(size=(5, 24, 24)).astype(np.float32)
    out = resize_fourier(stack, 16, stack=True)
    assert out.shape == (5, 16, 16)
    for i in range(5):
        np.testing.assert_allclose(out[i], resize_fourier(stack[i], 16), atol=1e-6)
    # a centred Gaussian blob stays centred at N'//2 (3D)
    n = 32
    g = np.arange(n) - n // 2
    blob = np.exp(-(g[:, None, None] ** 2 + g[None, :, None] ** 2 + g[None, None, :] ** 2) / 8.0)
    big = resize_fourier(blob, 48)
    assert np.unravel_index(np.argmax(big), big.shape) == (24, 24, 24)


def test_window_real_keeps_centre():
    a = np.zeros((10, 10), np.float32)
    a[5, 5] = 1.0
    a[0, 0] = 2.0
    b = window_real(a, 16)
    assert b[8, 8] == 1.0 and b[3, 3] == 2.0 and b.sum() == 3.0
    c = window_real(b, 6, fill=0.0)
    assert c[3, 3] == 1.0 and c.sum() == 1.0
    v = window_real(np.ones((4, 4, 4)), 8, fill=-1.0)
    assert v.shape == (8, 8, 8) and v[2:6, 2:6, 2:6].min() == 1.0 and v.sum() == 64 - (512 - 64)


def test_lowpass_raised_cosine():
    rng = np.random.default_rng(4)
    img = rng.normal(size=(64, 64))
    out = lowpass_map(img, 10.0, 2.0, ndim=2)  # shell round(64*2/10) = 13, edge 12..14
    ft_in, ft_out = np.fft.rfft2(img), np.fft.rfft2(out)
    ky = np.fft.fftfreq(64, 1 / 64)[:, None]
    kx = np.arange(33)[None, :]
    r = np.sqrt(kx ** 2 + ky ** 2)
    np.testing.assert_allclose(ft_out[r < 12], ft_in[r < 12], rtol=1e-4, atol=1e-3)
    assert np.abs(ft_out[r > 14]).max() < 1e-3
    mid = np.isclose(r, 13.0)
    np.testing.assert_allclose(np.abs(ft_out[mid]), 0.5 * np.abs(ft_in[mid]), rtol=1e-4)


def test_stack_float16_and_pixel_override(small_set, tmp_path, capsys):
    src = small_set / "particles.mrcs"
    out = tmp_path / "bin.mrcs"
    assert main(["image-handler", "--i", str(src), "--rescale_angpix", "5", "--float16", "--o", str(out)]) == 0
    hdr = read_header(out)
    assert hdr.shape == (1000, 32, 32) and hdr.mode == 12 and hdr.angpix == 5.0
    data, _ = read_map(out)
    orig, _ = read_map(src)
    np.testing.assert_allclose(data[7], resize_fourier(orig[7], 32).astype(np.float16), atol=2e-3)
    # images keep their mean (RELION resizeMap)
    np.testing.assert_allclose(data.mean(axis=(1, 2)), orig.mean(axis=(1, 2)), atol=2e-3)


def test_particle_star_input(small_set, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["image-handler", "--i", str(small_set / "particles.star"), "--rescale_angpix", "5",
                 "--new_box", "24", "--o", "Binned/particles.star"]) == 0
    table = read_particles(tmp_path / "Binned" / "particles.star")
    # named from the current (project) folder, as RELION writes them and looks for them
    assert table.particles["rlnImageName"].iloc[0] == "000001@Binned/particles.mrcs"
    np.testing.assert_array_equal(particle_optics(table, "rlnImageSize"), 24)
    np.testing.assert_array_equal(particle_optics(table, "rlnImagePixelSize"), 5.0)
    imgs = ParticleImages(table).read([0, 999])
    orig, _ = read_map(small_set / "particles.mrcs")
    np.testing.assert_allclose(imgs, window_real(resize_fourier(orig[[0, 999]], 32, stack=True), 24, stack=True),
                               atol=1e-6)


def _copy_small(small_set, dst):
    """The small set's STAR and stack in a folder of their own (outputs are written beside the input stacks)."""
    dst.mkdir()
    for name in ("particles.star", "particles.mrcs"):
        shutil.copy(small_set / name, dst / name)
    return dst / "particles.star"


def test_relion_output_forms_for_a_star_input(small_set, tmp_path, monkeypatch):
    """relion_image_handler's --o with a STAR input: a bare word is a suffix (<stack>_<o>.mrcs beside each input
    stack, <in>_<o>.star), a .mrcs name one stack (STAR <in>_<o>.star); the images are those of the .star form."""
    monkeypatch.chdir(tmp_path)
    star = _copy_small(small_set, tmp_path / "Extract")
    opts = ["--rescale_angpix", "5", "--force_header_angpix", "4.9"]
    assert main(["image-handler", "--i", str(star), *opts, "--o", "ref.star"]) == 0
    assert main(["image-handler", "--i", str(star), *opts, "--o", "bin2"]) == 0
    suffixed = read_particles(tmp_path / "Extract" / "particles_bin2.star")
    # the input names open from the STAR's folder: read as names from the current folder, then suffixed
    assert suffixed.particles["rlnImageName"].iloc[5] == "000006@Extract/particles_bin2.mrcs"
    assert main(["image-handler", "--i", str(star), *opts, "--o", "one.mrcs"]) == 0
    single = read_particles(tmp_path / "Extract" / "particles_one.mrcs.star")
    assert single.particles["rlnImageName"].iloc[5] == "000006@one.mrcs"
    reference = read_particles(tmp_path / "ref.star")
    expected = ParticleImages(reference).read([0, 5, 999])
    for table in (suffixed, single):
        np.testing.assert_array_equal(ParticleImages(table).read([0, 5, 999]), expected)
        # the optics table has the true pixel size, the MRC headers the forced one (RELION)
        np.testing.assert_array_equal(particle_optics(table, "rlnImagePixelSize"), 5.0)
    assert read_header(tmp_path / "one.mrcs").angpix == pytest.approx(4.9)


def test_bare_word_output_of_a_stack_is_a_suffix(small_set, tmp_path):
    stack = tmp_path / "parts.mrcs"
    shutil.copy(small_set / "particles.mrcs", stack)
    assert main(["image-handler", "--i", str(stack), "--rescale_angpix", "5", "--o", "small"]) == 0
    assert read_header(tmp_path / "parts_small.mrcs").shape == (1000, 32, 32)


def test_odd_box_filters_keep_what_is_below_the_cutoff(tmp_path):
    """--lowpass on a 45-box: a cosine at 15 Å passes, one at 5 Å goes; the header keeps the input's pixel size
    when --angpix is given only for the filter (RELION copies the input header)."""
    n, angpix = 45, 2.0
    i = np.arange(n) / n
    z, y, x = np.meshgrid(i, i, i, indexing="ij")
    slow = np.cos(2 * np.pi * (3 * x + 0 * y + 0 * z))            # 3 periods in 90 Å: 30 Å
    fast = np.cos(2 * np.pi * (10 * x + 12 * y + 0 * z))          # |k| = 15.6: 5.8 Å
    write_map(tmp_path / "odd.mrc", (slow + fast).astype(np.float32), 1.0)
    assert main(["image-handler", "--i", str(tmp_path / "odd.mrc"), "--angpix", str(angpix), "--lowpass", "15",
                 "--o", str(tmp_path / "lp.mrc")]) == 0
    out, header_angpix = read_map(tmp_path / "lp.mrc")
    np.testing.assert_allclose(out, slow, atol=1e-5)
    assert header_angpix == pytest.approx(1.0)


def test_2d_image(tmp_path):
    rng = np.random.default_rng(5)
    write_map(tmp_path / "img.mrc", rng.normal(size=(40, 40)), 1.0)
    assert main(["image-handler", "--i", str(tmp_path / "img.mrc"), "--rescale_angpix", "2", "--o",
                 str(tmp_path / "small.mrc")]) == 0
    hdr = read_header(tmp_path / "small.mrc")
    assert hdr.shape == (20, 20) and hdr.angpix == 2.0


# ----------------------------------------------------------------------------------------------------------
# bad input: one error line, exit 2, nothing written, no numpy warnings (pytest captures warnings, so the tests
# that could overflow turn them into errors)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "Warning" not in err, err
    return err


def _unit_map(path, angpix: float = 2.5, n: int = 16) -> np.ndarray:
    """A map with values in [-1, 1] (peak exactly 1)."""
    data = np.random.default_rng(8).uniform(-1.0, 1.0, size=(n, n, n)).astype(np.float32)
    data[0, 0, 0] = 1.0
    write_map(path, data, angpix)
    return data


@pytest.mark.filterwarnings("error")   # numpy overflow warnings fail the test
@pytest.mark.parametrize("extra, message", [
    (["--multiply_constant", "1e39"], "exceed the float32 range"),
    (["--multiply_constant", "1e7", "--float16"], "values up to 1e+07 exceed the float16 range (largest 65504)"),
    (["--multiply_constant", "1e5", "--invert_contrast", "--float16"], "values up to 1e+05 exceed the float16"),
])
def test_output_beyond_the_file_type_is_refused(tmp_path, capsys, extra, message):
    _unit_map(tmp_path / "in.mrc")
    out = tmp_path / "out.mrc"
    assert main(["image-handler", "--i", str(tmp_path / "in.mrc"), "--o", str(out), *extra]) == 2
    err = _one_error_line(capsys)
    assert f"{out}: " in err and message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mrc"]        # no output, no temporary file


@pytest.mark.filterwarnings("error")   # numpy overflow warnings fail the test
def test_stack_beyond_float16_is_refused(tmp_path, capsys):
    write_map(tmp_path / "img.mrc", np.ones((8, 8), np.float32), 1.0)
    from cryorefine.io.mrc import StackWriter
    with StackWriter(tmp_path / "in.mrcs", 1.0) as w:
        w.write(np.ones((3, 8, 8), np.float32))
    assert main(["image-handler", "--i", str(tmp_path / "in.mrcs"), "--o", str(tmp_path / "o.mrcs"),
                 "--multiply_constant", "1e5", "--float16"]) == 2
    assert "o.mrcs: values up to 1e+05 exceed the float16 range" in _one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.mrc", "in.mrcs"]


@pytest.mark.filterwarnings("error")   # numpy overflow warnings fail the test
def test_large_factor_that_fits_float32_is_exact(tmp_path, capsys):
    """The product is taken in float64: 1e39 (beyond float32) times values of 0.01 is 1e37, a float32 value."""
    data = _unit_map(tmp_path / "in.mrc") * np.float32(0.01)
    write_map(tmp_path / "in.mrc", data, 2.5)
    assert main(["image-handler", "--i", str(tmp_path / "in.mrc"), "--o", str(tmp_path / "o.mrc"),
                 "--multiply_constant", "1e39"]) == 0
    assert "Warning" not in capsys.readouterr().err
    out, _ = read_map(tmp_path / "o.mrc")
    np.testing.assert_allclose(out, data.astype(np.float64) * 1e39, rtol=1e-6)


def test_output_range_error_limits():
    assert output_range_error(np.array([65504.0, -65519.0], np.float32), float16=True) is None  # rounds to 65504
    assert "float16" in output_range_error(np.array([65520.0], np.float32), float16=True)
    assert output_range_error(np.array([1e38], np.float32), float16=False) is None
    assert "float32" in output_range_error(np.array([np.inf], np.float32), float16=False)


@pytest.mark.parametrize("extra, message", [
    (["--highpass", "10", "--lowpass", "20"], "--highpass 10 Å with --lowpass 20 Å keeps no frequency"),
    (["--highpass", "0.5"], "--highpass 0.5 Å removes every frequency of this map (box 16, 2.5 Å/px, Nyquist 5 Å)"),
])
def test_filters_that_keep_nothing_are_refused(tmp_path, capsys, extra, message):
    _unit_map(tmp_path / "in.mrc")
    assert main(["image-handler", "--i", str(tmp_path / "in.mrc"), "--o", str(tmp_path / "o.mrc"), *extra]) == 2
    err = _one_error_line(capsys)
    assert "in.mrc: " in err and message in err
    assert not (tmp_path / "o.mrc").exists()


def test_largest_filter_gain_agrees_with_the_filtered_map():
    img = np.random.default_rng(9).normal(size=(32, 32))
    for low, high in ((20.0, 10.0), (None, 0.5), (10.0, 20.0), (None, 4.0), (6.0, 6.0)):
        out = img
        if low is not None:
            out = lowpass_map(out, low, 2.5, ndim=2)
        if high is not None:
            out = highpass_map(out, high, 2.5, ndim=2)
        nothing = largest_filter_gain(32, 2, 2.5, low, high) < 1e-6
        assert nothing == (np.abs(out).max() < 1e-5 * np.abs(img).max()), (low, high)
    assert largest_filter_gain(32, 3, 2.5, 1e6, None) == 1.0        # a low-pass alone keeps the mean


def test_output_folder_and_stats_with_o(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outdir").mkdir()
    # refused before any work: the (missing) input is not even read
    assert main(["image-handler", "--i", "missing.mrc", "--o", "outdir", "--lowpass", "20"]) == 2
    assert "error: --o outdir: is a folder, not a file" in _one_error_line(capsys)
    _unit_map(tmp_path / "in.mrc")
    assert main(["image-handler", "--i", "in.mrc", "--stats", "--o", "x.mrc"]) == 2
    assert "--stats prints its result; it writes no --o" in _one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mrc", "outdir"]
    assert not any((tmp_path / "outdir").iterdir())
    assert main(["image-handler", "--i", "in.mrc", "--stats"]) == 0


@pytest.mark.parametrize("option", ["--angpix", "--rescale_angpix", "--lowpass", "--highpass", "--force_header_angpix"])
def test_non_finite_pixel_options_are_refused(tmp_path, capsys, option):
    _unit_map(tmp_path / "in.mrc")
    assert main(["image-handler", "--i", str(tmp_path / "in.mrc"), "--o", str(tmp_path / "o.mrc"), option, "inf"]) == 2
    assert f"{option}: must be a finite number > 0 (got inf)" in _one_error_line(capsys)
    assert not (tmp_path / "o.mrc").exists()


def test_mirrors_as_relion(tmp_path):
    """RELION image_handler: --flipX/Y/Z map index i to N-1-i; --invert_hand maps x to (N-x) mod N (0 stays 0), a
    mirror about the centre pixel N/2 that keeps a symmetry axis through it where it is. Loops as RELION's."""
    rng = np.random.default_rng(7)
    vol = rng.normal(size=(6, 6, 6)).astype(np.float32)
    write_map(tmp_path / "v.mrc", vol, 2.0)
    n = 6
    expect = {"--flipX": np.empty_like(vol), "--flipY": np.empty_like(vol), "--flipZ": np.empty_like(vol),
              "--invert_hand": np.empty_like(vol)}
    for k in range(n):
        for i in range(n):
            for j in range(n):
                expect["--flipX"][k, i, j] = vol[k, i, n - 1 - j]
                expect["--flipY"][k, i, j] = vol[k, n - 1 - i, j]
                expect["--flipZ"][k, i, j] = vol[n - 1 - k, i, j]
                expect["--invert_hand"][k, i, j] = vol[k, i, 0 if j == 0 else n - j]
    for option, want in expect.items():
        out = tmp_path / f"{option[2:]}.mrc"
        assert main(["image-handler", "--i", str(tmp_path / "v.mrc"), "--o", str(out), option]) == 0
        got, angpix = read_map(out)
        np.testing.assert_array_equal(got, want, err_msg=option)
        assert angpix == 2.0
    # invert_hand twice is the identity
    again = tmp_path / "twice.mrc"
    assert main(["image-handler", "--i", str(tmp_path / "invert_hand.mrc"), "--o", str(again), "--invert_hand"]) == 0
    np.testing.assert_array_equal(read_map(again)[0], vol)


def test_mirror_options_that_cannot_work(tmp_path, capsys):
    write_map(tmp_path / "img.mrc", np.ones((8, 8), np.float32), 1.0)
    write_map(tmp_path / "v.mrc", np.ones((8, 8, 8), np.float32), 1.0)
    assert main(["image-handler", "--i", str(tmp_path / "img.mrc"), "--o", str(tmp_path / "o.mrc"), "--flipZ"]) == 2
    assert "--flipZ: this image is 2D" in capsys.readouterr().err
    assert main(["image-handler", "--i", str(tmp_path / "v.mrc"), "--o", str(tmp_path / "o.mrc"), "--flipX",
                 "--invert_hand"]) == 2
    assert "--flipX, --invert_hand: give one mirror at a time" in capsys.readouterr().err


def test_relion_arithmetic_bfactor_and_thresholds(maps, small_set, tmp_path, capsys):
    """relion_image_handler's --add/--subtract/--divide_constant, pixel-by-pixel --multiply/--divide/--add/--subtract
    (each image of a stack by one image), --bfactor and --threshold_above/below, against numpy on the same data."""
    small, _ = maps
    ref, _ = read_map(small)
    ref = ref.astype(np.float64)
    mask, _ = read_map(small_set / "mask.mrc")
    out = tmp_path / "o.mrc"

    def run(*opts) -> np.ndarray:
        assert main(["image-handler", "--i", str(small), "--o", str(out), *opts]) == 0
        return read_map(out)[0].astype(np.float64)

    tol = {"atol": 1e-5 * float(np.abs(ref).max())}
    np.testing.assert_allclose(run("--add_constant", "1.5"), ref + 1.5, **tol)
    np.testing.assert_allclose(run("--subtract_constant", "2"), ref - 2, **tol)
    np.testing.assert_allclose(run("--divide_constant", "4"), ref / 4, **tol)
    np.testing.assert_allclose(run("--multiply", str(small_set / "mask.mrc")), ref * mask, **tol)
    np.testing.assert_allclose(run("--add", str(small)), 2 * ref, **tol)
    np.testing.assert_allclose(run("--subtract", str(small)), 0 * ref, **tol)
    # division: 0 where the divisor is (almost) 0, as RELION
    expected = np.where(mask < 1e-10, 0.0, ref / np.where(mask < 1e-10, 1.0, mask))
    np.testing.assert_allclose(run("--divide", str(small_set / "mask.mrc")), expected, rtol=1e-5, atol=1e-6)
    # B-factor: exp(-B s^2/4) up to Nyquist, 0 beyond (RELION applyBFactorToMap)
    n = ref.shape[0]
    k = np.fft.fftfreq(n, 1.0 / n)
    k2 = k[:, None, None] ** 2 + k[None, :, None] ** 2 + np.arange(n // 2 + 1)[None, None, :] ** 2
    s2 = k2 / (n * 2.5) ** 2
    gain = np.where(s2 <= 1 / 5.0 ** 2, np.exp(100 / 4 * s2), 0.0)
    want = np.fft.irfftn(np.fft.rfftn(ref) * gain, s=ref.shape, axes=(0, 1, 2))
    np.testing.assert_allclose(run("--bfactor", "-100"), want, atol=1e-5 * float(np.abs(want).max()))
    np.testing.assert_allclose(run("--threshold_above", "0.01", "--threshold_below", "-0.01"),
                               np.clip(ref, -0.01, 0.01), atol=1e-7)
    # a stack: each image by one 2D image
    stack = tmp_path / "s.mrcs"
    imgs = np.random.default_rng(0).normal(size=(3, 16, 16)).astype(np.float32)
    mrcfile.write(stack, imgs, voxel_size=2.0)
    mrcfile.write(tmp_path / "w.mrc", imgs[0], voxel_size=2.0)
    assert main(["image-handler", "--i", str(stack), "--o", str(tmp_path / "m.mrcs"), "--multiply",
                 str(tmp_path / "w.mrc")]) == 0
    np.testing.assert_allclose(mrcfile.read(tmp_path / "m.mrcs"), imgs * imgs[0], rtol=1e-6)
    capsys.readouterr()
    assert main(["image-handler", "--i", str(small), "--o", str(out), "--add_constant", "1",
                 "--multiply", str(small)]) == 2
    assert "--add_constant, --multiply: give one arithmetic operation at a time" in capsys.readouterr().err
    assert main(["image-handler", "--i", str(small), "--o", str(out), "--multiply", str(tmp_path / "w.mrc")]) == 2
    assert "--multiply: shape 16x16 differs from the map's 64x64x64" in capsys.readouterr().err


def test_relion_sym_shift_fsc_and_remove_nan(maps, tmp_path, capsys):
    """--sym (mean over the group's rotations about voxel N//2), --shift_x/y/z (content moved, zero fill, linear
    interpolation), --fsc (a data_fsc table on stdout) and --remove_nan, against index arithmetic."""
    import starfile

    from cryorefine.fourier.fsc import fsc
    small, _ = maps
    ref, _ = read_map(small)
    ref = ref.astype(np.float64)
    out = tmp_path / "o.mrc"

    def run(*opts) -> np.ndarray:
        assert main(["image-handler", "--i", str(small), "--o", str(out), *opts]) == 0
        return read_map(out)[0].astype(np.float64)

    # C2 about z: (x, y) -> (2c - x, 2c - y); index 0 maps to 2c = N, outside the box: zero. On a map without
    # symmetry (the D2 reference has these axes already)
    rough = np.random.default_rng(2).normal(size=ref.shape)
    write_map(tmp_path / "rough.mrc", rough, 2.5)
    turned = np.zeros_like(rough)
    turned[:, 1:, 1:] = rough[:, 1:, 1:][:, ::-1, ::-1]
    assert main(["image-handler", "--i", str(tmp_path / "rough.mrc"), "--o", str(out), "--sym", "C2"]) == 0
    np.testing.assert_allclose(read_map(out)[0], 0.5 * (rough + turned), atol=1e-5)
    c4 = run("--sym", "C4")
    write_map(tmp_path / "c4.mrc", c4, 2.5)
    assert main(["image-handler", "--i", str(tmp_path / "c4.mrc"), "--o", str(out), "--sym", "C4"]) == 0
    np.testing.assert_allclose(read_map(out)[0], c4, atol=1e-6)          # 90-degree turns keep the grid
    # shifts: content moves towards +x by 3 px; half a pixel is the mean of two neighbours
    moved = np.zeros_like(ref)
    moved[..., 3:] = ref[..., :-3]
    np.testing.assert_allclose(run("--shift_x", "3"), moved, atol=1e-6)
    half = run("--shift_z", "0.5")
    np.testing.assert_allclose(half[1:], 0.5 * (ref[1:] + ref[:-1]), atol=1e-6)
    # --fsc: a STAR table on stdout, the FSC of the two maps; a map with itself is 1 everywhere
    noisy = ref + np.random.default_rng(1).normal(scale=float(ref.std()), size=ref.shape)
    write_map(tmp_path / "noisy.mrc", noisy, 2.5)
    capsys.readouterr()
    assert main(["image-handler", "--i", str(small), "--fsc", str(tmp_path / "noisy.mrc")]) == 0
    (tmp_path / "fsc.star").write_text(capsys.readouterr().out)
    table = starfile.read(tmp_path / "fsc.star")
    np.testing.assert_allclose(table["rlnFourierShellCorrelation"], fsc(ref, noisy), atol=1e-5)
    assert table["rlnAngstromResolution"].iloc[16] == pytest.approx(10.0)
    # --remove_nan: replaced before anything else (a NaN map is otherwise refused)
    bad = ref.copy()
    bad[0, 0, :3] = [np.nan, np.inf, -np.inf]
    write_map(tmp_path / "bad.mrc", bad, 2.5)
    assert main(["image-handler", "--i", str(tmp_path / "bad.mrc"), "--o", str(out)]) == 2
    assert main(["image-handler", "--i", str(tmp_path / "bad.mrc"), "--o", str(out), "--remove_nan",
                 "--replace_nan", "7"]) == 0
    fixed = read_map(out)[0]
    assert list(fixed[0, 0, :3]) == [7.0, 7.0, 7.0] and np.isfinite(fixed).all()


def test_center_of_mass_and_shift_com(tmp_path, capsys):
    """--com: the centre of mass of the positive values relative to voxel N//2, as (x, y, z); --shift_com moves it
    there (RELION's centerOfMass and selfTranslateCenterOfMassToCenter)."""
    vol = np.zeros((32, 32, 32), np.float32)
    vol[16 + 2, 16 - 3, 16 + 5] = 2.0
    vol[16 + 2, 16 - 3, 16 + 7] = 2.0         # x 5 and 7: mean 6
    vol[0, 0, 0] = -50.0                      # negative values do not count
    write_map(tmp_path / "v.mrc", vol, 1.0)
    capsys.readouterr()
    assert main(["image-handler", "--i", str(tmp_path / "v.mrc"), "--com"]) == 0
    assert "center of mass (relative to XmippOrigin) x 6 y -3 z 2" in capsys.readouterr().out
    assert main(["image-handler", "--i", str(tmp_path / "v.mrc"), "--shift_com", "--o", str(tmp_path / "c.mrc")]) == 0
    moved = read_map(tmp_path / "c.mrc")[0]
    assert moved[16, 16, 15] == pytest.approx(2.0) and moved[16, 16, 17] == pytest.approx(2.0)


def test_map_only_options_refuse_a_particle_star_file(small_set, tmp_path, capsys):
    """--sym on a STAR input would have symmetrised a batch of particle images as if it were a 3D map; --fsc and
    --com need a map too: one error line each."""
    for opts in (["--sym", "C2", "--o", str(tmp_path / "s.star")], ["--fsc", str(small_set / "reference.mrc")],
                 ["--com"]):
        capsys.readouterr()
        assert main(["image-handler", "--i", str(small_set / "particles.star"), *opts]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{opts[0]}: give a map, image or stack, not a STAR file" in err[0], err
    assert not list(tmp_path.iterdir())
