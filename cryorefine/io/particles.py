"""Lazy, memory-mapped access to the particle images of a ParticleTable (`NNNNNN@stack.mrcs` names).

Each stack file is opened once and its memory map cached (least recently used ones are dropped past
`max_open` so thousands of stacks do not exhaust file descriptors). Image names are resolved relative to the
current directory and, failing that, to the STAR file's folder.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from cryorefine.errors import InputError, require
from cryorefine.io.mrc import open_stack, read_header
from cryorefine.io.star import ParticleTable, optics_row_index, particle_optics, resolve_image_path


# pixel values beyond this are a broken image, not data: their squares summed over a large box's Fourier transform
# reach float32's 3e38 (counting detectors give < 1e4, normalised images ~1)
MAX_PIXEL_VALUE = 1e10


class ParticleImages:
    """Reads particle images by row position in `table.particles`: `.read(rows) -> (n, N, N) float32`."""

    def __init__(self, table: ParticleTable, max_open: int = 256) -> None:
        self.table = table
        self.max_open = max_open
        self._checked: set[int] = set()       # stacks whose image size was checked against the optics table
        names = table.particles["rlnImageName"].astype(str)
        has_at = names.str.contains("@", regex=False).to_numpy()
        split = names.str.partition("@")
        index_text = np.where(has_at, split[0].to_numpy(dtype=object), "1")
        files = np.where(has_at, split[2].to_numpy(dtype=object), names.to_numpy(dtype=object))
        # plain digits only: to_numeric would take 'inf', '1.5', '+3' or a number beyond int64
        text = pd.Series(index_text, dtype=object).astype(str).str.strip()
        digits = text.str.fullmatch(r"\d{1,18}").to_numpy(dtype=bool)
        if not digits.all():
            bad = names.iloc[int(np.argmin(digits))]
            raise InputError(f"{table.path}: bad rlnImageName {bad!r} (expected NNNNNN@stack.mrcs)")
        idx = text.astype(np.int64).to_numpy()
        require(bool(np.all(idx >= 1)), f"{table.path}: image numbers in rlnImageName start at 1")
        self._index = (idx - 1).astype(np.int64)  # 0-based slice in the stack
        codes, uniques = pd.factorize(pd.Series(files))
        # a name without NNNNNN@ is a file of one image (RELION); on a stack it would silently be image 1
        self._bare = {int(c): str(n) for c, n, at in zip(codes, names, has_at) if not at}
        self._stack_id = codes.astype(np.int64)
        star_dir = Path(table.path).resolve().parent if table.path else Path.cwd()
        self._paths = [resolve_image_path(str(f), star_dir) for f in uniques]
        self._names = [str(f) for f in uniques]
        for name, p in zip(self._names, self._paths):
            if not p.is_file():
                raise InputError(f"{table.path}: image stack {name} not found (looked in . and in {star_dir} and its parents)")
        try:
            self.box = particle_optics(table, "rlnImageSize").astype(np.int64)
        except InputError:
            self.box = np.zeros(len(names), dtype=np.int64)  # no optics size: taken from each stack
        self._maps: OrderedDict[int, NDArray] = OrderedDict()

    @property
    def nr_particles(self) -> int:
        """Number of particles in the table."""
        return len(self._index)

    def stack_path(self, row: int) -> Path:
        """Resolved stack file of one particle."""
        return self._paths[self._stack_id[row]]

    def header_pixel_mismatches(self) -> list[str]:
        """One line per optics group whose first stack's header pixel size differs by more than 1 % from the STAR
        file's rlnImagePixelSize (the STAR file's is used, as RELION does; headers of 0 are not compared)."""
        pix = particle_optics(self.table, "rlnImagePixelSize")
        groups = optics_row_index(self.table)
        lines = []
        for g in pd.unique(groups):
            row = int(np.argmax(groups == g))
            head = read_header(self.stack_path(row)).angpix
            if head > 0 and abs(head - pix[row]) > 0.01 * pix[row]:
                group = self.table.optics["rlnOpticsGroup"].iloc[g]
                lines.append(f"optics group {group}: rlnImagePixelSize {pix[row]:g} A in {self.table.path} but "
                             f"{head:g} A in the header of {self._names[self._stack_id[row]]}; using {pix[row]:g} "
                             f"(the STAR file's, as RELION)")
        return lines

    def _stack(self, sid: int) -> NDArray:
        """Memory map of stack `sid` (checked against the optics box on first open)."""
        m = self._maps.get(sid)
        if m is not None:
            self._maps.move_to_end(sid)
            return m
        path = self._paths[sid]
        m = open_stack(path)
        if sid not in self._checked:     # batches in orientation order reopen stacks: check each once
            ny, nx = m.shape[1:]
            require(ny == nx, f"{path}: images are {nx}x{ny}, not square")
            boxes = np.unique(self.box[self._stack_id == sid])
            boxes = boxes[boxes > 0]
            require(boxes.size == 0 or (boxes.size == 1 and boxes[0] == nx),
                    f"{path}: image size {nx} does not match rlnImageSize {boxes.tolist()} in {self.table.path}")
            self._checked.add(sid)
        self._maps[sid] = m
        while len(self._maps) > self.max_open:
            self._maps.popitem(last=False)
        return m

    def read(self, rows) -> NDArray[np.float32]:
        """Images of the given row positions, in that order, as (n, N, N) float32 (finite values checked)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        require(bool(np.all((rows >= 0) & (rows < self.nr_particles))),
                f"{self.table.path}: particle row out of range 0..{self.nr_particles - 1}")
        if rows.size == 0:
            n = int(self.box[0]) if self.nr_particles and self.box[0] > 0 else 0
            return np.zeros((0, n, n), dtype=np.float32)
        out: NDArray[np.float32] | None = None
        sids = self._stack_id[rows]
        for sid in pd.unique(sids):
            pos = np.nonzero(sids == sid)[0]
            stack = self._stack(int(sid))
            if int(sid) in self._bare and stack.shape[0] > 1:
                raise InputError(f"{self.table.path}: rlnImageName {self._bare[int(sid)]!r} has no image number "
                                 f"(NNNNNN@), but {self._names[sid]} holds {stack.shape[0]} images")
            idx = self._index[rows[pos]]
            bad = idx >= stack.shape[0]
            if bad.any():
                raise InputError(f"{self._paths[sid]}: image {int(idx[bad][0]) + 1} requested but the stack "
                                 f"has only {stack.shape[0]} images")
            order = np.argsort(idx, kind="stable")  # sequential access through the map
            imgs = np.asarray(stack[idx[order]], dtype=np.float32)
            peak = np.abs(imgs).reshape(len(imgs), -1).max(axis=1)      # nan or inf when an image holds one
            if not np.isfinite(peak).all():
                k = int(np.argmin(np.isfinite(peak)))
                raise InputError(f"{self._paths[sid]}: image {int(idx[order][k]) + 1} contains NaN or inf")
            if (peak >= MAX_PIXEL_VALUE).any():
                k = int(np.argmax(peak >= MAX_PIXEL_VALUE))
                raise InputError(f"{self._paths[sid]}: image {int(idx[order][k]) + 1} has values up to "
                                 f"{peak[k]:.3g}, beyond ±{MAX_PIXEL_VALUE:.0e} (its powers would overflow float32)")
            if out is None:
                out = np.empty((rows.size,) + imgs.shape[1:], dtype=np.float32)
            require(out.shape[1:] == imgs.shape[1:],
                    f"{self._paths[sid]}: image size {imgs.shape[-1]} differs from other stacks read together")
            out[pos[order]] = imgs
        return out

    def close(self) -> None:
        """Drop the cached memory maps."""
        self._maps.clear()
