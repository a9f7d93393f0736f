"""One thread count for every pool a run uses: numba's kernels, the BLAS behind numpy, and PyTorch's CPU ops."""

from __future__ import annotations

import os
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


def default_threads(requested: int, local_processes: int) -> int:
    """Threads per process: --j when given (> 0), else this process's share of the cores it may run on, so that the
    MPI ranks of one node do not oversubscribe it."""
    if requested > 0:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, local_processes))
