"""MRC reading and writing: headers like RELION's, float16, gzip, stacks, streaming, bad files."""

from __future__ import annotations

import gzip
import io
import shutil

import mrcfile
import numpy as np
import pytest

from cryorefine.errors import InputError
from cryorefine.io.mrc import StackWriter, open_stack, read_header, read_map, write_map, write_stack


def test_write_read_map_header_like_relion(tmp_path):
    rng = np.random.default_rng(0)
    vol = rng.normal(size=(16, 16, 16)).astype(np.float32)
    path = tmp_path / "v.mrc"
    write_map(path, vol, 1.37)
    data, angpix = read_map(path)
    np.testing.assert_array_equal(data, vol)
    assert angpix == pytest.approx(1.37, rel=1e-6)
    with mrcfile.open(path) as m:
        h = m.header
        assert int(h.mode) == 2
        assert (int(h.nx), int(h.ny), int(h.nz)) == (16, 16, 16)
        assert (int(h.mx), int(h.my), int(h.mz)) == (16, 16, 16)
        np.testing.assert_allclose([h.cella.x, h.cella.y, h.cella.z], 16 * 1.37, rtol=1e-6)
        np.testing.assert_allclose([h.cellb.alpha, h.cellb.beta, h.cellb.gamma], 90.0)
        assert (int(h.mapc), int(h.mapr), int(h.maps)) == (1, 2, 3)
        assert (float(h.origin.x), float(h.origin.y), float(h.origin.z)) == (0.0, 0.0, 0.0)
        assert float(h.dmin) == pytest.approx(vol.min()) and float(h.dmax) == pytest.approx(vol.max())
        assert float(h.dmean) == pytest.approx(vol.mean(), abs=1e-6)
        assert float(h.rms) == pytest.approx(vol.std(), rel=1e-5)
        assert int(h.nlabl) == 1 and h.label[0].startswith(b"cryorefine")
    assert read_header(path) == ((16, 16, 16), pytest.approx(1.37, rel=1e-6), 2)
    assert mrcfile.validate(str(path), print_file=io.StringIO())


def test_float16_mode12(tmp_path):
    img = np.linspace(-3, 3, 64 * 48, dtype=np.float32).reshape(48, 64)
    path = tmp_path / "h.mrc"
    write_map(path, img, 2.0, float16=True)
    assert read_header(path).mode == 12
    assert path.stat().st_size == 1024 + img.size * 2
    data, angpix = read_map(path)
    assert data.dtype == np.float32 and data.shape == (48, 64) and angpix == 2.0
    np.testing.assert_array_equal(data, img.astype(np.float16).astype(np.float32))


def test_gzipped_map(bench_dir, tmp_path):
    src = bench_dir / "maps" / "d2tet_small_b64_a2.5.mrc"
    gz = tmp_path / "small.mrc.gz"
    with open(src, "rb") as f, gzip.open(gz, "wb") as g:
        shutil.copyfileobj(f, g)
    a, pa = read_map(src)
    b, pb = read_map(gz)
    np.testing.assert_array_equal(a, b)
    assert pa == pb == 2.5
    assert read_header(gz).shape == (64, 64, 64)


def test_stack_and_streaming_writer_agree(tmp_path):
    rng = np.random.default_rng(1)
    imgs = rng.normal(size=(7, 24, 24)).astype(np.float32)
    write_stack(tmp_path / "a.mrcs", imgs, 3.0)
    with StackWriter(tmp_path / "b.mrcs", 3.0) as w:
        w.write(imgs[:3])
        w.write(imgs[3])
        w.write(imgs[4:])
    for name in ("a.mrcs", "b.mrcs"):
        with mrcfile.open(tmp_path / name) as m:
            assert int(m.header.ispg) == 0 and int(m.header.nz) == 7 and int(m.header.mz) == 7
            assert float(m.header.cella.x) == pytest.approx(72.0)
            assert float(m.header.rms) == pytest.approx(imgs.std(), rel=1e-5)
        np.testing.assert_array_equal(open_stack(tmp_path / name), imgs)
    assert (tmp_path / "a.mrcs").read_bytes()[1024:] == (tmp_path / "b.mrcs").read_bytes()[1024:]


def test_failed_writes_leave_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with StackWriter(tmp_path / "s.mrcs", 1.0) as w:
            w.write(np.zeros((2, 8, 8)))
            raise RuntimeError("stop")
    with pytest.raises(InputError):
        with StackWriter(tmp_path / "t.mrcs", 1.0) as w:
            w.write(np.zeros((2, 8, 8)))
            w.write(np.zeros((2, 10, 10)))
    with pytest.raises(InputError):
        write_map(tmp_path / "z.mrc", np.zeros((4, 4)), 0.0)
    assert list(tmp_path.iterdir()) == []


def test_bad_files(tmp_path, bench_dir):
    with pytest.raises(InputError, match="no such file"):
        read_map(tmp_path / "missing.mrc")
    junk = tmp_path / "junk.mrc"
    junk.write_bytes(np.random.default_rng(2).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    with pytest.raises(InputError, match="junk.mrc: not a readable MRC"):
        read_map(junk)
    trunc = tmp_path / "trunc.mrc"
    trunc.write_bytes((bench_dir / "maps" / "d2tet_small_b64_a2.5.mrc").read_bytes()[:50_000])
    for fn in (read_map, read_header, open_stack):
        with pytest.raises(InputError) as err:
            fn(trunc)
        assert "trunc.mrc" in str(err.value)


@pytest.mark.parametrize("order", [(3, 2, 1), (2, 3, 1), (1, 3, 2)])
def test_axis_order_of_ccp4_maps(tmp_path, order):
    """mapc, mapr, maps ≠ 1, 2, 3 (crystallographic CCP4 maps): the volume comes back as [z, y, x], not transposed;
    no warning from mrcfile reaches the user."""
    rng = np.random.default_rng(3)
    vol = rng.normal(size=(6, 8, 10)).astype(np.float32)              # [z, y, x]
    # stored as [section, row, column] with column = axis order[0], row = order[1], section = order[2]
    dim = {1: 2, 2: 1, 3: 0}                                          # axis -> dim of vol
    stored = vol.transpose(dim[order[2]], dim[order[1]], dim[order[0]])
    path = tmp_path / "ccp4.map"
    with mrcfile.new(path) as m:
        m.set_data(np.ascontiguousarray(stored))
        m.header.mapc, m.header.mapr, m.header.maps = order
        m.voxel_size = 1.5
    data, angpix = read_map(path)
    np.testing.assert_array_equal(data, vol)
    assert angpix == pytest.approx(1.5)


def test_non_cubic_voxels_are_an_error(tmp_path):
    path = tmp_path / "aniso.mrc"
    with mrcfile.new(path) as m:
        m.set_data(np.zeros((8, 8, 8), np.float32))
        m.voxel_size = (2.5, 2.5, 3.0)
    with pytest.raises(InputError, match=r"aniso.mrc: voxels are not cubic \(2.5 x 2.5 x 3 Å\)"):
        read_map(path)
