"""Changing box size: Fourier cropping / zero-padding (RELION `resizeMap`) and real-space windowing.

Both keep the box centre (index N//2 on each axis) at the new centre N'//2 for even sizes.
"""

from __future__ import annotations

import numpy as np
import scipy.fft as sfft
from numpy.typing import NDArray


def _is_stack(data: NDArray, stack: bool | None) -> bool:
    """3D input is a stack of 2D images when asked, or (if not told) when it is not a cube."""
    if stack is not None:
        return bool(stack) and data.ndim == 3
    return data.ndim == 3 and not (data.shape[0] == data.shape[1] == data.shape[2])


def _fftw_logical(n: int, half: bool) -> NDArray[np.int64]:
    """Logical frequencies of RELION's FFTW array along one axis: 0..h-1 then (for full axes) k - n."""
    if half:
        return np.arange(n // 2 + 1)
    h = n // 2 + 1
    k = np.arange(n)
    return np.where(k < h, k, k - n)


def window_fourier(ft: NDArray, old_size: int, new_size: int, ndim: int) -> NDArray:
    """RELION windowFourierTransform on a half-complex (rfftn) array over its last `ndim` axes.

    Cropping copies every element of the smaller array from the same logical frequency of the larger one
    (its +N'/2 row is taken from +N'/2); padding copies the old elements only within |k| <= N/2 ("nothing in
    the corners", which keeps the padded transform Hermitian-symmetric).
    """
    if new_size == old_size:
        return ft.copy()
    lead = ft.shape[:-ndim]
    out = np.zeros(lead + (new_size,) * (ndim - 1) + (new_size // 2 + 1,), dtype=ft.dtype)
    if new_size < old_size:
        idx = []
        for axis in range(ndim):
            half = axis == ndim - 1
            k = _fftw_logical(new_size, half)
            idx.append(np.mod(k, old_size) if not half else k)
        out[...] = ft[(Ellipsis, *np.ix_(*idx))]
        return out
    ks = [_fftw_logical(old_size, axis == ndim - 1) for axis in range(ndim)]
    grids = np.meshgrid(*ks, indexing="ij")
    r2 = sum(g.astype(np.int64) ** 2 for g in grids)
    hmax = old_size // 2 + 1 - 1  # RELION: max_r2 = (XSIZE(in) - 1)^2
    keep = r2 <= hmax * hmax
    dest = tuple(np.mod(k, new_size) if axis < ndim - 1 else k for axis, k in enumerate(ks))
    src = ft * keep
    out[(Ellipsis, *np.ix_(*dest))] = src
    return out


def resize_fourier(data: NDArray, new_size: int, stack: bool | None = None) -> NDArray[np.float32]:
    """RELION resizeMap: FFT (forward /N^d), window to N' in Fourier space, inverse FFT at N' (unscaled).

    The mean grey value is preserved (white-noise standard deviation scales by (N'/N)^(d/2)). Works on a 2D
    image, a 3D map, or a stack of 2D images along the first axis (`stack=None`: a non-cubic 3D array is a
    stack). The transforms are uncentred, like RELION's: for even N and N' the centre voxel N//2 lands on N'//2.
    """
    arr = np.asarray(data)
    ndim = 2 if (arr.ndim == 2 or _is_stack(arr, stack)) else 3
    old = arr.shape[-1]
    if any(s != old for s in arr.shape[-ndim:]):
        raise ValueError(f"resize_fourier needs square images / cubic maps, got {arr.shape}")
    if new_size == old:
        return arr.astype(np.float32, copy=True)
    axes = tuple(range(-ndim, 0))
    ft = sfft.rfftn(arr.astype(np.float64, copy=False), axes=axes, norm="forward", workers=-1)
    ft = window_fourier(ft, old, int(new_size), ndim)
    out = sfft.irfftn(ft, s=(int(new_size),) * ndim, axes=axes, norm="forward", workers=-1)
    return out.astype(np.float32)


def window_real(data: NDArray, new_size: int, fill: float = 0.0, stack: bool | None = None) -> NDArray:
    """Real-space centred crop / pad of a 2D image, 3D map or stack: old index N//2 goes to new index N'//2."""
    arr = np.asarray(data)
    ndim = 2 if (arr.ndim == 2 or _is_stack(arr, stack)) else 3
    lead = arr.shape[:-ndim]
    out = np.full(lead + (int(new_size),) * ndim, fill, dtype=arr.dtype)
    src, dst = [], []
    for n in arr.shape[-ndim:]:
        # logical coordinate x = index - n//2 is kept; copy the overlapping logical range
        lo = max(-(n // 2), -(new_size // 2))
        hi = min(n - n // 2, new_size - new_size // 2)
        src.append(slice(lo + n // 2, hi + n // 2))
        dst.append(slice(lo + new_size // 2, hi + new_size // 2))
    out[(Ellipsis, *dst)] = arr[(Ellipsis, *src)]
    return out
