"""`cryorefine mask-create` (relion_mask_create) against RELION's autoMask loops written out, on small maps."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from cryorefine.cli import main
from cryorefine.io.mrc import StackWriter, read_map, write_map
from cryorefine.tools.mask_create import binary_mask, extended, soft_edge


def relion_automask(img: np.ndarray, threshold: float, extend: float, width: float) -> np.ndarray:
    """mask.cpp autoMask as RELION writes it: neighbour loops over a (2·ceil+1)³ box, strict distance tests."""
    out = (img >= threshold).astype(np.float64)
    shape = img.shape

    def neighbours(k, i, j, size):
        for kp, ip, jp in itertools.product(range(k - size, k + size + 1), range(i - size, i + size + 1),
                                            range(j - size, j + size + 1)):
            if 0 <= kp < shape[0] and 0 <= ip < shape[1] and 0 <= jp < shape[2]:
                yield kp, ip, jp, (kp - k) ** 2 + (ip - i) ** 2 + (jp - j) ** 2

    if extend != 0:
        cp = out.copy()
        size = abs(math.ceil(extend))
        for k, i, j in itertools.product(*map(range, shape)):
            if extend > 0 and cp[k, i, j] < 0.001:
                if any(cp[n[:3]] > 0.999 and n[3] < extend * extend for n in neighbours(k, i, j, size)):
                    out[k, i, j] = 1.0
            elif extend < 0 and cp[k, i, j] > 0.999:
                if any(cp[n[:3]] < 0.001 and n[3] < extend * extend for n in neighbours(k, i, j, size)):
                    out[k, i, j] = 0.0
    if width > 0:
        cp = out.copy()
        size = math.ceil(width)
        for k, i, j in itertools.product(*map(range, shape)):
            if cp[k, i, j] < 0.001:
                r2 = min([n[3] for n in neighbours(k, i, j, size) if cp[n[:3]] > 0.999], default=9999.0)
                if r2 < width * width:
                    out[k, i, j] = 0.5 + 0.5 * math.cos(math.pi * math.sqrt(r2) / width)
    return out


def blobs(n: int = 14, seed: int = 3) -> np.ndarray:
    """A few Gaussian blobs, one touching the box edge."""
    c = np.arange(n, dtype=np.float64)
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    rng = np.random.default_rng(seed)
    vol = np.zeros((n, n, n))
    for centre in [*rng.uniform(3, n - 3, (3, 3)), (0.0, n / 2, n / 2)]:
        vol += np.exp(-((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2) / (2 * 1.5 ** 2))
    return vol


@pytest.mark.parametrize("extend, width", [(0.0, 0.0), (2.0, 0.0), (2.5, 3.0), (-1.5, 2.0), (0.0, 4.2)])
def test_mask_matches_relion_automask_loops(extend, width):
    vol = blobs()
    ours = soft_edge(extended(binary_mask(vol, 0.3), extend), width)
    np.testing.assert_allclose(ours, relion_automask(vol, 0.3, extend, width), atol=1e-6)


def test_mask_create_command(tmp_path, capsys):
    vol = blobs(16).astype(np.float32)
    write_map(tmp_path / "map.mrc", vol, 1.7)
    other = np.roll(vol, 4, axis=2)
    write_map(tmp_path / "other.mrc", other, 1.7)
    args = ["--i", str(tmp_path / "map.mrc"), "--ini_threshold", "0.3", "--extend_inimask", "1",
            "--width_soft_edge", "3"]
    # RELION's program name and spelling, through the command line
    assert main(["relion_mask_create", *args, "--o", str(tmp_path / "m.mrc")]) == 0
    mask, apix = read_map(tmp_path / "m.mrc")
    assert apix == pytest.approx(1.7) and mask.dtype == np.float32
    np.testing.assert_allclose(mask, relion_automask(vol, 0.3, 1, 3), atol=1e-6)
    assert main(["mask-create", *args, "--invert", "--o", str(tmp_path / "inv.mrc")]) == 0
    np.testing.assert_allclose(read_map(tmp_path / "inv.mrc")[0], 1 - mask, atol=1e-6)
    assert main(["mask-create", *args, "--and", str(tmp_path / "other.mrc"), "--o", str(tmp_path / "and.mrc")]) == 0
    both = ((vol >= 0.3) & (other >= 0.3)).astype(float)
    np.testing.assert_allclose(read_map(tmp_path / "and.mrc")[0], relion_automask(both, 0.5, 1, 3), atol=1e-6)
    # a threshold above the map: one line naming the file, nothing written
    capsys.readouterr()
    assert main(["mask-create", "--i", str(tmp_path / "map.mrc"), "--ini_threshold", "5",
                 "--o", str(tmp_path / "none.mrc")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "map.mrc: no voxel is at or above --ini_threshold 5" in err[0]
    assert not (tmp_path / "none.mrc").exists()
    # a particle stack is not a map (it read as a 40 x 16 x 16 volume and gave a mask)
    with StackWriter(tmp_path / "p.mrcs", 1.7) as w:
        w.write(np.repeat(vol[:1], 40, axis=0))
    capsys.readouterr()
    assert main(["mask-create", "--i", str(tmp_path / "p.mrcs"), "--o", str(tmp_path / "s.mrc")]) == 2
    assert "a cubic 3D map is needed" in capsys.readouterr().err and not (tmp_path / "s.mrc").exists()


def test_denovo_crown_matches_relion_loop(tmp_path):
    """--denovo: raisedCrownMask as RELION writes it, voxel by voxel (Xmipp origin at N//2)."""
    n, inner, outer, width, centre = 20, 3.0, 7.5, 2.5, (1.0, -2.0, 0.5)
    expected = np.zeros((n, n, n))
    for k, i, j in itertools.product(range(n), repeat=3):
        d = math.sqrt((centre[2] - (k - n // 2)) ** 2 + (centre[1] - (i - n // 2)) ** 2
                      + (centre[0] - (j - n // 2)) ** 2)
        if d < inner - width:
            v = 0.0
        elif d < inner:
            v = 0.5 - 0.5 * math.cos(math.pi * (d - (inner - width)) / width)
        elif d < outer:
            v = 1.0
        elif d < outer + width:
            v = 0.5 - 0.5 * math.cos(math.pi * (outer + width - d) / width)
        else:
            v = 0.0
        expected[k, i, j] = v
    out = tmp_path / "crown.mrc"
    assert main(["mask-create", "--denovo", "--box_size", str(n), "--inner_radius", str(inner), "--outer_radius",
                 str(outer), "--width_soft_edge", str(width), "--center_x", "1", "--center_y", "-2", "--center_z",
                 "0.5", "--angpix", "1.5", "--o", str(out)]) == 0
    mask, apix = read_map(out)
    assert apix == pytest.approx(1.5)
    np.testing.assert_allclose(mask, expected, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# bad input: one error line naming the file or option, exit 2, nothing written


def _refused(argv: list[str], capsys, out) -> str:
    capsys.readouterr()
    assert main(["mask-create", *argv, "--o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not out.exists()
    return err


@pytest.fixture()
def blob_map(tmp_path):
    vol = blobs(16).astype(np.float32)
    write_map(tmp_path / "map.mrc", vol, 2.5)
    return tmp_path / "map.mrc", vol


@pytest.mark.parametrize("argv, message", [
    (["--extend_inimask", "-1000"], "--extend_inimask -1000: shrinking removes every voxel of the binary mask of"),
    (["--ini_threshold", "-1", "--invert"], "--invert: the mask of"),
])
def test_empty_mask_is_refused(blob_map, tmp_path, capsys, argv, message):
    path, _ = blob_map
    threshold = [] if "--ini_threshold" in argv else ["--ini_threshold", "0.3"]
    err = _refused(["--i", str(path), *threshold, *argv], capsys, tmp_path / "m.mrc")
    assert message in err and "would be empty" in err


def test_empty_after_combining_is_refused(blob_map, tmp_path, capsys):
    path, vol = blob_map
    write_map(tmp_path / "other.mrc", np.zeros_like(vol), 2.5)
    err = _refused(["--i", str(path), "--ini_threshold", "0.3", "--and", str(tmp_path / "other.mrc")], capsys,
                   tmp_path / "m.mrc")
    assert "other.mrc: the mask would be empty" in err and "after --and" in err
    # the same map with --or is fine
    assert main(["mask-create", "--i", str(path), "--ini_threshold", "0.3", "--or", str(tmp_path / "other.mrc"),
                 "--o", str(tmp_path / "m.mrc")]) == 0


@pytest.mark.parametrize("argv, message", [
    (["--outer_radius", "10", "--center_x", "1000"], "--denovo: the mask would be empty"),
    (["--invert"], "--invert: the de novo mask fills the whole box"),
])
def test_empty_denovo_mask_is_refused(tmp_path, capsys, argv, message):
    err = _refused(["--denovo", "--box_size", "16", *argv], capsys, tmp_path / "m.mrc")
    assert message in err


@pytest.mark.parametrize("flag", ["--and", "--or", "--and_not", "--or_not"])
def test_combined_map_is_checked_like_the_input(blob_map, tmp_path, capsys, flag):
    path, vol = blob_map
    bad = vol.copy()
    bad[3, 4, 5] = np.nan
    write_map(tmp_path / "nan.mrc", bad, 2.5)
    err = _refused(["--i", str(path), flag, str(tmp_path / "nan.mrc")], capsys, tmp_path / "m.mrc")
    assert f"nan.mrc: the {flag} map holds NaN or infinite values" in err
    with StackWriter(tmp_path / "p.mrcs", 2.5) as w:
        w.write(vol)
    err = _refused(["--i", str(path), flag, str(tmp_path / "p.mrcs")], capsys, tmp_path / "m.mrc")
    assert "p.mrcs: a cubic 3D map is needed" in err


def test_combined_map_with_another_pixel_size_is_refused(blob_map, tmp_path, capsys):
    path, vol = blob_map
    write_map(tmp_path / "other.mrc", np.roll(vol, 4, axis=2), 3.0)
    err = _refused(["--i", str(path), "--ini_threshold", "0.3", "--or", str(tmp_path / "other.mrc")], capsys,
                   tmp_path / "m.mrc")
    assert "other.mrc: --or map has pixel size 3 Å" in err and "map.mrc has 2.5 Å" in err
    # within 0.1 % it is the same grid
    write_map(tmp_path / "other.mrc", np.roll(vol, 4, axis=2), 2.5001)
    assert main(["mask-create", "--i", str(path), "--ini_threshold", "0.3", "--or", str(tmp_path / "other.mrc"),
                 "--o", str(tmp_path / "m.mrc")]) == 0


@pytest.mark.parametrize("option, value, message", [
    ("--lowpass", "nan", "--lowpass: must be a finite number (got nan)"),
    ("--extend_inimask", "nan", "--extend_inimask: must be a finite number (got nan)"),
    ("--ini_threshold", "nan", "--ini_threshold: must be a finite number (got nan)"),
    ("--angpix", "inf", "--angpix: must be a finite number (got inf)"),
    ("--j", "-4", "--j: the number of threads must be >= 1 (got -4)"),
])
def test_bad_option_values_are_refused(blob_map, tmp_path, capsys, option, value, message):
    path, _ = blob_map
    assert message in _refused(["--i", str(path), option, value], capsys, tmp_path / "m.mrc")


def test_output_folder_is_refused(blob_map, tmp_path, capsys):
    path, _ = blob_map
    (tmp_path / "outdir").mkdir()
    capsys.readouterr()
    assert main(["mask-create", "--i", str(path), "--o", str(tmp_path / "outdir")]) == 2
    assert f"--o {tmp_path / 'outdir'}: is a folder, not a file" in capsys.readouterr().err
    assert not any((tmp_path / "outdir").iterdir())


def relion_combined(vin: np.ndarray, vp: np.ndarray, thr: float, flag: str) -> np.ndarray:
    """makeMaskFromFile's --and/--or/--and_not/--or_not loop as RELION writes it: thr ± 1 per voxel, then >= thr."""
    out = np.empty_like(vin)
    for n in range(vin.size):
        a, b = vin.flat[n], vp.flat[n]
        keep = {"--and": b > thr and a > thr, "--or": b > thr or a > thr,
                "--and_not": a > thr and b < thr, "--or_not": a > thr or b < thr}[flag]
        out.flat[n] = thr + 1.0 if keep else thr - 1.0
    return out >= thr


@pytest.mark.parametrize("flag", ["--and", "--or", "--and_not", "--or_not"])
def test_combinations_compare_strictly_as_relion(tmp_path, flag):
    """Voxels exactly at the threshold (here 0, as in maps with a zero background) are in neither map's set."""
    rng = np.random.default_rng(5)
    a = rng.choice([-1.0, 0.0, 1.0], size=(12, 12, 12)).astype(np.float32)
    b = rng.choice([-1.0, 0.0, 1.0], size=(12, 12, 12)).astype(np.float32)
    write_map(tmp_path / "a.mrc", a, 2.0)
    write_map(tmp_path / "b.mrc", b, 2.0)
    assert main(["mask-create", "--i", str(tmp_path / "a.mrc"), flag, str(tmp_path / "b.mrc"), "--ini_threshold", "0",
                 "--extend_inimask", "0", "--width_soft_edge", "0", "--o", str(tmp_path / "m.mrc")]) == 0
    ours = read_map(tmp_path / "m.mrc")[0]
    expected = relion_combined(a.astype(np.float64), b.astype(np.float64), 0.0, flag)
    assert np.array_equal(ours > 0.5, expected), (int((ours > 0.5).sum()), int(expected.sum()))


def test_gui_helical_line_names_what_is_missing(blob_map, tmp_path, capsys):
    """The MaskCreate GUI's helical line (--helix --z_percentage 0.3): one line saying helical masks are missing,
    not an unknown option."""
    path, _ = blob_map
    err = _refused(["--i", str(path), "--helix", "--z_percentage", "0.3"], capsys, tmp_path / "m.mrc")
    assert "--helix: helical masks are not available" in err


def test_denovo_with_an_input_map_is_refused(blob_map, tmp_path, capsys):
    """--i was silently unused beside --denovo."""
    path, _ = blob_map
    err = _refused(["--denovo", "--box_size", "16", "--outer_radius", "5", "--i", str(path)], capsys, tmp_path / "m.mrc")
    assert "--denovo makes a mask from scratch" in err
