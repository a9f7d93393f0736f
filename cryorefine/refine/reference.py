"""The initial reference and the solvent mask: read, check, and bring onto the particles' box and pixel size."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from cryorefine.errors import InputError
from cryorefine.fourier.resize import resize_fourier, window_real
from cryorefine.io.mrc import read_volume


def load_reference(path: str, box: int, angpix: float, log, ref_angpix: float = -1.0) -> NDArray[np.float32]:
    """Read the reference; Fourier-rescale to `angpix` and window to `box` if needed (RELION --trust_ref_size).
    `ref_angpix` > 0: its pixel size instead of the header's (RELION's --ref_angpix)."""
    vol, header_angpix = read_volume(path, "reference")
    ref_angpix = ref_angpix if ref_angpix > 0 else header_angpix
    n_ref = vol.shape[0]
    if ref_angpix <= 0:
        raise InputError(f"{path}: the reference has no pixel size in its header; give it with --ref_angpix")
    if float(vol.max()) == float(vol.min()):
        raise InputError(f"{path}: the reference is constant ({float(vol.flat[0]):g} everywhere): there is nothing "
                         f"to align the particles to")
    if abs(ref_angpix - angpix) > 1e-3 * angpix:
        new_n = int(round(n_ref * ref_angpix / angpix))
        new_n -= new_n % 2
        if new_n < 8:
            raise InputError(f"{path}: the reference ({n_ref} px at {ref_angpix:g} A/px) cannot be rescaled to the "
                             f"particles' pixel size {angpix:g} A/px")
        vol = resize_fourier(vol, new_n)
        log.line(f" Reference {path}: pixel size {ref_angpix:g} A differs from the particles' {angpix:g} A; "
                 f"rescaled from box {n_ref} to {new_n} (pixel {n_ref * ref_angpix / new_n:g} A)")
        n_ref = new_n
    if n_ref != box:
        vol = window_real(vol, box)
        log.line(f" Reference {path}: box {n_ref} re-boxed to the particles' box {box}")
    return np.ascontiguousarray(vol, dtype=np.float32)


def load_solvent_mask(path: str, box: int, angpix: float) -> NDArray[np.float32]:
    """Read a user solvent mask (values in [0, 1]) that must match the model's box and pixel size."""
    m, p = read_volume(path, "solvent mask")
    if m.shape != (box, box, box):
        raise InputError(f"{path}: the solvent mask has box {m.shape[-1]}, the particles have {box}")
    if p > 0 and abs(p - angpix) > 1e-3 * angpix:
        raise InputError(f"{path}: the solvent mask has pixel size {p:g} A, the particles {angpix:g} A")
    if m.min() < -1e-3 or m.max() > 1 + 1e-3:
        raise InputError(f"{path}: mask values must lie between 0 and 1 (found {m.min():g} to {m.max():g})")
    if m.max() <= 0:
        raise InputError(f"{path}: the solvent mask is empty (0 everywhere): it would flatten the whole reference")
    return np.clip(m, 0, 1).astype(np.float32)
