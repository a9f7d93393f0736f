"""Bad inputs to the I/O layer through the CLI: one line naming the file and the problem, exit 2, no output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from cryorefine.cli import main
from cryorefine.io.mrc import read_map, write_map, write_stack

ROOT = Path(__file__).resolve().parent.parent


def _run_cli(capsys, args: list[str], out_dir: Path) -> str:
    """Run image-handler in-process; check exit 2, a single error line, no traceback, nothing written."""
    before = set(out_dir.iterdir()) if out_dir.exists() else set()
    rc = main(["image-handler", *args])
    captured = capsys.readouterr()
    assert rc == 2
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("cryorefine image-handler: error: ")
    assert "Traceback" not in captured.err + captured.out
    after = set(out_dir.iterdir()) if out_dir.exists() else set()
    assert after == before, f"left behind: {sorted(after - before)}"
    return lines[0]


def test_missing_file_subprocess(tmp_path):
    out = tmp_path / "out.mrc"
    proc = subprocess.run([sys.executable, "-m", "cryorefine", "image-handler", "--i", str(tmp_path / "nope.mrc"),
                           "--o", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"cryorefine image-handler: error: {tmp_path / 'nope.mrc'}: no such file"]
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_corrupt_mrc(tmp_path, capsys):
    bad = tmp_path / "corrupt.mrc"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    msg = _run_cli(capsys, ["--i", str(bad), "--o", str(tmp_path / "o.mrc")], tmp_path)
    assert str(bad) in msg and "not a readable MRC file" in msg


def test_truncated_mrc(tmp_path, capsys, bench_dir):
    bad = tmp_path / "truncated.mrc"
    bad.write_bytes((bench_dir / "maps" / "d2tet_small_b64_a2.5.mrc").read_bytes()[:300_000])
    msg = _run_cli(capsys, ["--i", str(bad), "--rescale_angpix", "3", "--o", str(tmp_path / "o.mrc")], tmp_path)
    assert str(bad) in msg and "truncated" in msg


def test_truncated_header(tmp_path, capsys, bench_dir):
    bad = tmp_path / "short.mrc"
    bad.write_bytes((bench_dir / "maps" / "d2tet_small_b64_a2.5.mrc").read_bytes()[:400])
    msg = _run_cli(capsys, ["--i", str(bad), "--o", str(tmp_path / "o.mrc")], tmp_path)
    assert str(bad) in msg and "not a readable MRC file" in msg


def _star(tmp_path: Path, particles: str) -> Path:
    path = tmp_path / "in.star"
    path.write_text("data_optics\nloop_\n_rlnOpticsGroup\n_rlnImagePixelSize\n_rlnImageSize\n1 2.5 64\n\n" + particles)
    return path


def test_star_without_data_particles(tmp_path, capsys):
    star = _star(tmp_path, "")
    msg = _run_cli(capsys, ["--i", str(star), "--o", str(tmp_path / "out" / "p.star")], tmp_path)
    assert str(star) in msg and "no data_particles" in msg


def test_star_without_image_name(tmp_path, capsys):
    star = _star(tmp_path, "data_particles\nloop_\n_rlnOpticsGroup\n_rlnDefocusU\n1 12000\n")
    msg = _run_cli(capsys, ["--i", str(star), "--o", str(tmp_path / "out" / "p.star")], tmp_path)
    assert str(star) in msg and "no rlnImageName" in msg


def test_image_index_beyond_stack(tmp_path, capsys):
    write_stack(tmp_path / "s.mrcs", np.random.default_rng(1).normal(size=(3, 64, 64)), 2.5)
    rows = "".join(f"{i:06d}@s.mrcs 1\n" for i in (1, 2, 3, 4))
    star = _star(tmp_path, "data_particles\nloop_\n_rlnImageName\n_rlnOpticsGroup\n" + rows)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    msg = _run_cli(capsys, ["--i", str(star), "--rescale_angpix", "5", "--o", str(out_dir / "p.star")], out_dir)
    assert "s.mrcs" in msg and "image 4 requested but the stack has only 3 images" in msg
    assert list(out_dir.iterdir()) == []  # the partly written stack was removed


def test_odd_box_is_rescaled_as_relion(tmp_path):
    """RELION's resizeMap takes an odd box (it was refused here): 63 px at 2 Å to 3 Å gives round(42) = 42 px."""
    write_map(tmp_path / "odd.mrc", np.ones((63, 63, 63), np.float32), 2.0)
    assert main(["image-handler", "--i", str(tmp_path / "odd.mrc"), "--rescale_angpix", "3",
                 "--o", str(tmp_path / "o.mrc")]) == 0
    out, angpix = read_map(tmp_path / "o.mrc")
    assert out.shape == (42, 42, 42) and angpix == pytest.approx(3.0)
    np.testing.assert_allclose(out, 1.0, atol=1e-5)       # the mean is kept (RELION's resizeMap)


def test_non_square(tmp_path, capsys):
    write_map(tmp_path / "rect.mrc", np.zeros((48, 64), np.float32), 2.0)
    msg = _run_cli(capsys, ["--i", str(tmp_path / "rect.mrc"), "--new_box", "32",
                            "--o", str(tmp_path / "o.mrc")], tmp_path)
    assert str(tmp_path / "rect.mrc") in msg and "64x48" in msg and "square" in msg
    write_map(tmp_path / "slab.mrc", np.zeros((16, 64, 64), np.float32), 2.0)
    msg = _run_cli(capsys, ["--i", str(tmp_path / "slab.mrc"), "--rescale_angpix", "4",
                            "--o", str(tmp_path / "o.mrc")], tmp_path)
    assert str(tmp_path / "slab.mrc") in msg and "map is 16x64x64" in msg


def test_pixel_size_zero(tmp_path, capsys):
    path = tmp_path / "nopix.mrc"
    with mrcfile.new(path) as m:
        m.set_data(np.zeros((32, 32, 32), np.float32))
        m.voxel_size = 0.0
    msg = _run_cli(capsys, ["--i", str(path), "--rescale_angpix", "3", "--o", str(tmp_path / "o.mrc")], tmp_path)
    assert str(path) in msg and "pixel size is 0" in msg
    msg = _run_cli(capsys, ["--i", str(path), "--angpix", "0", "--o", str(tmp_path / "o.mrc")], tmp_path)
    assert "--angpix" in msg and "must be a finite number > 0 (got 0)" in msg
    star = _star(tmp_path, "data_particles\nloop_\n_rlnImageName\n_rlnOpticsGroup\n1@x.mrcs 1\n")
    star.write_text(star.read_text().replace("1 2.5 64", "1 0.0 64"))
    msg = _run_cli(capsys, ["--i", str(star), "--o", str(tmp_path / "out" / "p.star")], tmp_path)
    assert str(star) in msg and "rlnImagePixelSize must be > 0" in msg


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_image(tmp_path, capsys, value):
    imgs = np.zeros((2, 16, 16), np.float32)
    imgs[1, 3, 3] = float(value)
    write_stack(tmp_path / "bad.mrcs", imgs, 2.0)
    msg = _run_cli(capsys, ["--i", str(tmp_path / "bad.mrcs"), "--o", str(tmp_path / "o.mrcs")], tmp_path)
    assert "bad.mrcs" in msg and "NaN or inf" in msg
