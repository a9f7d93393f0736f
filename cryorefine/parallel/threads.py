"""One thread count for every pool a run uses: numba's kernels, the BLAS behind numpy, and PyTorch's CPU ops."""

from __future__ import annotations

import sys


def limit_threads(n: int) -> None:
    """Use at most n threads in numba, BLAS (threadpoolctl) and, if it is loaded, PyTorch (n <= 0: leave all)."""
    if n <= 0:
        return
    import numba
    from threadpoolctl import threadpool_limits
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    threadpool_limits(limits=n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
