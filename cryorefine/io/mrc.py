"""MRC maps, images and stacks, RELION-style (`rwMRC.h`): arrays [z, y, x], pixel size = cella.x / mx.

Reading accepts modes 0, 1, 2, 6, 12 (returned as float32) and gzip-compressed files; writing gives mode 2
(float32) or 12 (float16), cell = box·angpix, origin 0, mapc/r/s = 1, 2, 3, filled statistics and one
"cryorefine" label. Every problem with an input file raises InputError naming the file.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gzip
import warnings
import zlib
from pathlib import Path
from typing import NamedTuple

import mrcfile
import mrcfile.utils as mrcutils
import numpy as np
from mrcfile.dtypes import HEADER_DTYPE

from cryorefine import __version__
from cryorefine.errors import InputError, require
from cryorefine.io.atomic import atomic_path

_READ_ERRORS = (ValueError, OSError, EOFError, zlib.error, gzip.BadGzipFile, TypeError, MemoryError)


class MrcHeader(NamedTuple):
    """What a caller needs from an MRC header: data shape ([z,] y, x), pixel size (Å, 0 if unset), mode."""

    shape: tuple[int, ...]
    angpix: float
    mode: int


def is_stack_path(path) -> bool:
    """RELION's rule: a '.mrcs' file (optionally gzipped) is a stack of 2D images, otherwise a 2D image or 3D map."""
    name = Path(path).name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return name.endswith(".mrcs")


def _angpix_from_header(header) -> float:
    """Pixel size a/mx (Å), 0 when the header has none."""
    mx = int(header.mx)
    a = float(header.cella.x)
    if mx <= 0 or not np.isfinite(a) or a <= 0:
        return 0.0
    return a / mx


def _check_exists(path: Path) -> None:
    require(path.exists(), f"{path}: no such file")
    require(path.is_file(), f"{path}: not a file")


@contextlib.contextmanager
def _open(path: Path, header_only: bool = False):
    """mrcfile.open, strict first, then permissive for headers without the 'MAP ' stamp; errors -> InputError."""
    _check_exists(path)
    mrc = None
    try:
        with warnings.catch_warnings():     # e.g. "file is larger than expected": the data block is still whole
            warnings.simplefilter("ignore")
            mrc = mrcfile.open(path, mode="r", header_only=header_only)
    except _READ_ERRORS as exc:
        first = exc
    if mrc is None:
        # Old writers leave the map ID or machine stamp empty; accept them if the data block is complete.
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mrc = mrcfile.open(path, mode="r", permissive=True, header_only=header_only)
        except _READ_ERRORS:
            mrc = None
        if mrc is None or not _plausible(mrc.header) or (not header_only and mrc.data is None):
            if mrc is not None:
                mrc.close()
            raise InputError(f"{path}: not a readable MRC file ({_short(first)})") from None
    try:
        yield mrc
    finally:
        mrc.close()


def _short(exc: BaseException) -> str:
    """First line of an exception message."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _plausible(header) -> bool:
    """Sizes and mode that a real MRC header would have."""
    try:
        nx, ny, nz, mode = int(header.nx), int(header.ny), int(header.nz), int(header.mode)
    except (TypeError, ValueError):
        return False
    return nx > 0 and ny > 0 and nz > 0 and mode in (0, 1, 2, 6, 12)


def read_header(path) -> MrcHeader:
    """Shape ([z,] y, x; a single 2D image has no z), pixel size and mode, from the header and file size."""
    path = Path(path)
    with _open(path, header_only=True) as mrc:
        h = mrc.header
        require(_plausible(h), f"{path}: not a readable MRC file (bad sizes or mode {int(h.mode)})")
        nx, ny, nz, mode = int(h.nx), int(h.ny), int(h.nz), int(h.mode)
        angpix = _angpix_from_header(h)
        nsymbt = int(h.nsymbt)
    if not _is_gzip(path):
        need = 1024 + nsymbt + nx * ny * nz * np.dtype(mrcutils.dtype_from_mode(mode)).itemsize
        require(path.stat().st_size >= need,
                f"{path}: truncated MRC file ({path.stat().st_size} bytes, header says {need})")
    shape = (ny, nx) if nz == 1 else (nz, ny, nx)
    return MrcHeader(shape=shape, angpix=angpix, mode=mode)


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def read_map(path) -> tuple[np.ndarray, float]:
    """Whole file as float32 ([z,] y, x) and its pixel size in Å (0 if the header has none)."""
    path = Path(path)
    with _open(path) as mrc:
        data = mrc.data
        require(data is not None, f"{path}: MRC file has no data")
        require(_plausible(mrc.header), f"{path}: not a readable MRC file (bad sizes {int(mrc.header.nx)} x "
                                        f"{int(mrc.header.ny)} x {int(mrc.header.nz)} or mode {int(mrc.header.mode)})")
        require(data.ndim in (2, 3), f"{path}: {data.ndim}-D MRC data is not supported")
        angpix = _angpix_from_header(mrc.header)
        out = np.array(data, dtype=np.float32)
        if out.ndim == 3:
            out = _in_xyz_order(out, mrc.header, path)
            _check_cubic_voxels(mrc.header, path)
    return out, angpix


def _in_xyz_order(data: np.ndarray, header, path: Path) -> np.ndarray:
    """A volume stored with other axis orders (mapc, mapr, maps ≠ 1, 2, 3: CCP4 maps from crystallographic programs)
    as [z, y, x]; RELION ignores the fields and would read such a map transposed."""
    order = (int(header.mapc), int(header.mapr), int(header.maps))
    if order == (1, 2, 3) or order == (0, 0, 0):       # 0: an old header that never set them
        return data
    require(sorted(order) == [1, 2, 3], f"{path}: bad axis order mapc, mapr, maps = {order} (a permutation of "
                                        f"1, 2, 3 expected)")
    # array dims are (section, row, column); `order` names the x (1), y (2) or z (3) axis of each
    dim_of = {order[0]: 2, order[1]: 1, order[2]: 0}
    return np.ascontiguousarray(data.transpose(dim_of[3], dim_of[2], dim_of[1]))


def _check_cubic_voxels(header, path: Path) -> None:
    """Refinement maps need one pixel size: x, y and z voxel sizes that differ are an error, not one of them."""
    sizes = []
    for cell, n in ((header.cella.x, header.mx), (header.cella.y, header.my), (header.cella.z, header.mz)):
        if int(n) > 0 and np.isfinite(float(cell)) and float(cell) > 0:
            sizes.append(float(cell) / int(n))
    require(len(sizes) < 3 or max(sizes) - min(sizes) <= 1e-3 * max(sizes),
            f"{path}: voxels are not cubic ({' x '.join(f'{v:.4g}' for v in sizes)} Å); resample the map first")


def open_stack(path) -> np.ndarray:
    """Read-only (n, y, x) view of an MRC stack (memory-mapped; gzipped files are read fully)."""
    path = Path(path)
    if _is_gzip(path) if path.is_file() else False:
        data, _ = read_map(path)
        return data[None] if data.ndim == 2 else data
    with _open(path, header_only=True) as mrc:
        h = mrc.header
        require(_plausible(h), f"{path}: not a readable MRC file (bad sizes or mode {int(h.mode)})")
        nx, ny, nz = int(h.nx), int(h.ny), int(h.nz)
        dtype = mrcutils.data_dtype_from_header(h)
        offset = 1024 + int(h.nsymbt)
    need = offset + nx * ny * nz * dtype.itemsize
    size = path.stat().st_size
    require(size >= need, f"{path}: truncated MRC file ({size} bytes, header says {need})")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(nz, ny, nx))


# ----------------------------------------------------------------------------------------------------------
# writing


def _label() -> bytes:
    stamp = _dt.datetime.now().strftime("%d-%b-%Y %H:%M:%S")
    return f"cryorefine {__version__} {stamp}".encode()[:80]


def _make_header(nx: int, ny: int, nz: int, mode: int, angpix: float, stats: tuple[float, float, float, float],
                 ispg: int) -> np.ndarray:
    """A 1024-byte little-endian MRC2014 header, RELION's field choices."""
    h = np.zeros((), dtype=HEADER_DTYPE)
    h["nx"], h["ny"], h["nz"] = nx, ny, nz
    h["mode"] = mode
    h["mx"], h["my"], h["mz"] = nx, ny, nz
    h["cella"] = (nx * angpix, ny * angpix, nz * angpix)
    h["cellb"] = (90.0, 90.0, 90.0)
    h["mapc"], h["mapr"], h["maps"] = 1, 2, 3
    h["dmin"], h["dmax"], h["dmean"], h["rms"] = stats
    h["ispg"] = ispg
    h["nversion"] = 20140
    h["map"] = b"MAP "
    h["machst"] = mrcutils.machine_stamp_from_byte_order("<")
    h["nlabl"] = 1
    h["label"][0] = _label()
    return h


class _Stats:
    """Running min, max, mean and rms (standard deviation) over data written in pieces."""

    def __init__(self) -> None:
        self.n = 0
        self.total = 0.0
        self.total2 = 0.0
        self.lo = np.inf
        self.hi = -np.inf

    def add(self, data: np.ndarray) -> None:
        d = np.asarray(data, dtype=np.float64)
        if d.size == 0:
            return
        self.n += d.size
        self.total += float(d.sum())
        self.total2 += float(np.square(d).sum())
        self.lo = min(self.lo, float(d.min()))
        self.hi = max(self.hi, float(d.max()))

    def values(self) -> tuple[float, float, float, float]:
        if self.n == 0:
            return 0.0, 0.0, 0.0, 0.0
        mean = self.total / self.n
        var = max(self.total2 / self.n - mean * mean, 0.0)
        return self.lo, self.hi, mean, float(np.sqrt(var))


def read_volume(path, what: str = "map") -> tuple[np.ndarray, float]:
    """A cubic 3D map with finite values and its header pixel size, or InputError naming the file: a .mrcs is a
    stack of 2D images to RELION, never a map, whatever its shape (`what` names the map in messages)."""
    require(not is_stack_path(path), f"{path}: a cubic 3D map is needed for the {what}, and a .mrcs file is a stack "
                                     f"of 2D images (RELION's rule; save the map as .mrc)")
    data, angpix = read_map(path)
    require(data.ndim == 3 and len(set(data.shape)) == 1, f"{path}: a cubic 3D map is needed for the {what} (got shape "
                                                          f"{' x '.join(map(str, data.shape[::-1]))})")
    require(bool(np.isfinite(data).all()), f"{path}: the {what} holds NaN or infinite values")
    return data, angpix


FLOAT16_MAX = float(np.finfo(np.float16).max)   # 65504: larger values become inf in an MRC mode-12 file


def float16_overflow(data: np.ndarray) -> float | None:
    """The largest |value| when `data` cast to float16 would hold inf (from 65520 on), else None."""
    with np.errstate(over="ignore"):    # the overflow is what is tested here
        small = np.asarray(data).astype(np.float16)
    return None if np.isfinite(small).all() else float(np.nanmax(np.abs(data)))


def _check_float16(path: Path, data: np.ndarray) -> None:
    """InputError naming the output when its values do not fit float16 (mode 12 would hold inf)."""
    peak = float16_overflow(data)
    if peak is not None:
        raise InputError(f"{path}: values up to {peak:.4g} exceed the float16 range (largest {FLOAT16_MAX:g}) of "
                         f"--float16; nothing written")


def _file_dtype(float16: bool) -> tuple[np.dtype, int]:
    return (np.dtype("<f2"), 12) if float16 else (np.dtype("<f4"), 2)


def _check_angpix(path: Path, angpix: float) -> None:
    require(np.isfinite(angpix) and angpix > 0, f"{path}: pixel size must be > 0 (got {angpix})")


def _write(path: Path, data: np.ndarray, angpix: float, float16: bool, ispg: int) -> None:
    dtype, mode = _file_dtype(float16)
    if float16:
        _check_float16(path, data)
    arr = np.ascontiguousarray(data, dtype=dtype)
    stats = _Stats()
    stats.add(arr)
    if arr.ndim == 2:
        nz, (ny, nx) = 1, arr.shape
    else:
        nz, ny, nx = arr.shape
    header = _make_header(nx, ny, nz, mode, float(angpix), stats.values(), ispg)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            f.write(arr.tobytes())


def write_map(path, data: np.ndarray, angpix: float, float16: bool = False) -> None:
    """Write a 2D image or 3D map (float32, or float16 = mode 12) atomically; cell = box·angpix."""
    path = Path(path)
    data = np.asarray(data)
    require(data.ndim in (2, 3), f"{path}: can only write 2D images or 3D maps (got {data.ndim}-D)")
    _check_angpix(path, angpix)
    _write(path, data, angpix, float16, ispg=1 if data.ndim == 3 else 0)


def write_stack(path, images: np.ndarray, angpix: float, float16: bool = False) -> None:
    """Write (n, y, x) images as an MRC stack (.mrcs, images along z, ispg 0) atomically."""
    path = Path(path)
    images = np.asarray(images)
    if images.ndim == 2:
        images = images[None]
    require(images.ndim == 3, f"{path}: a stack needs (n, y, x) images (got {images.ndim}-D)")
    _check_angpix(path, angpix)
    _write(path, images, angpix, float16, ispg=0)


class StackWriter:
    """Append images to an .mrcs stack without holding them all; header (nz, stats) written on close.

    Use as a context manager; the file appears atomically only if the block succeeds::

        with StackWriter("out.mrcs", angpix=1.5) as w:
            for batch in batches:
                w.write(batch)          # (n, N, N) or (N, N)
    """

    def __init__(self, path, angpix: float, float16: bool = False) -> None:
        self.path = Path(path)
        _check_angpix(self.path, angpix)
        self.angpix = float(angpix)
        self.dtype, self.mode = _file_dtype(float16)
        self.shape: tuple[int, int] | None = None
        self.count = 0
        self._stats = _Stats()
        self._stack = contextlib.ExitStack()
        self._file = None

    def __enter__(self) -> "StackWriter":
        tmp = self._stack.enter_context(atomic_path(self.path))
        self._file = self._stack.enter_context(open(tmp, "wb"))
        self._file.write(b"\0" * 1024)  # placeholder; the real header is written on close
        return self

    def write(self, images: np.ndarray) -> None:
        """Append one image (y, x) or a batch (n, y, x)."""
        arr = np.asarray(images)
        if arr.ndim == 2:
            arr = arr[None]
        require(arr.ndim == 3, f"{self.path}: stack images must be (n, y, x)")
        if self.shape is None:
            self.shape = (int(arr.shape[1]), int(arr.shape[2]))
        require(arr.shape[1:] == self.shape, f"{self.path}: image size {arr.shape[1:]} differs from {self.shape}")
        if self.mode == 12:
            _check_float16(self.path, arr)
        arr = np.ascontiguousarray(arr, dtype=self.dtype)
        self._stats.add(arr)
        self._file.write(arr.tobytes())
        self.count += arr.shape[0]

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            try:
                require(self.shape is not None, f"{self.path}: no images written")
                ny, nx = self.shape
                h = _make_header(nx, ny, self.count, self.mode, self.angpix, self._stats.values(), ispg=0)
                self._file.seek(0)
                self._file.write(h.tobytes())
            except BaseException as err:
                self._stack.__exit__(type(err), err, err.__traceback__)  # removes the temporary file
                raise
        return bool(self._stack.__exit__(exc_type, exc, tb))
