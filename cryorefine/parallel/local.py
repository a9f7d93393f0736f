"""One-process reducer: the interface the refinement loop uses for sums over particles."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray


class LocalReducer:
    """Sums and shares of work for a single process (rank 0 of 1); parallel.mpi has the same methods."""

    rank = 0
    size = 1
    local_size = 1            # processes of the run on this node

    @property
    def is_leader(self) -> bool:
        """True on the process that writes files."""
        return self.rank == 0

    def share(self, rows: NDArray[np.int64]) -> NDArray[np.int64]:
        """This process's share of particle rows (all of them here)."""
        return rows

    def half_owner(self, half: int) -> int:
        """The process that reconstructs half 1 or 2 (this one)."""
        return 0

    def wait_for_all(self) -> None:
        """Nothing to wait for in one process."""

    def broadcast(self, obj, root: int):
        """`obj` itself (the only process is the root)."""
        return obj

    def sum_array(self, a: NDArray) -> NDArray:
        """Element-wise sum over processes, in place where possible."""
        return a

    def sum_scalar(self, x: float) -> float:
        """Sum of a number over processes."""
        return x

    def gather_rows(self, rows: NDArray[np.int64], values: NDArray) -> tuple[NDArray[np.int64], NDArray]:
        """All processes' (rows, values) concatenated (per-particle results)."""
        return rows, values

    def allgather(self, obj) -> list:
        """Every process's `obj`, in rank order, on every process ([obj] here)."""
        return [obj]
