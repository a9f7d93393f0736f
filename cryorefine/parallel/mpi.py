"""MPI reducer (mpi4py): every rank takes a share of each half's particles; sums are all-reduced; each half's
reconstruction runs on one rank (half 1 on rank 0, half 2 on rank 1) and is broadcast; rank 0 writes the files."""

from __future__ import annotations

import os
import time

import numpy as np
from numpy.typing import NDArray


class MpiReducer:
    """Same methods as parallel.local.LocalReducer, over an MPI communicator."""

    def __init__(self, comm=None):
        from mpi4py import MPI
        self._mpi = MPI
        self.comm = comm or MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        # ranks sharing this node's cores (and memory)
        self.local_size = self.comm.Split_type(MPI.COMM_TYPE_SHARED).Get_size() if self.size > 1 else 1

    @property
    def is_leader(self) -> bool:
        """True on rank 0, the one that writes files and the log."""
        return self.rank == 0

    def share(self, rows: NDArray[np.int64]) -> NDArray[np.int64]:
        """Every size-th row starting at this rank (balanced over micrographs and optics groups)."""
        return rows[self.rank::self.size]

    def half_owner(self, half: int) -> int:
        """The rank that reconstructs half 1 or 2: two ranks reconstruct the halves at once, one keeps both."""
        return (half - 1) % self.size

    def wait_for_all(self) -> None:
        """Block until every rank arrives, sleeping rather than polling: MPICH's blocking calls spin, and a rank
        spinning while others finish their E-step share or a reconstruction takes their cores."""
        if self.size == 1:
            return
        request = self.comm.Ibarrier()
        pause = 1e-4
        while not request.Test():
            time.sleep(pause)
            pause = min(2 * pause, 0.02)

    def library(self) -> str:
        """The first line of the MPI library's version string."""
        return " ".join(self._mpi.Get_library_version().strip().splitlines()[0].split())

    def sum_array(self, a: NDArray) -> NDArray:
        """In-place element-wise sum over ranks (a must be a contiguous numpy array)."""
        if self.size > 1:
            self.wait_for_all()
            self.comm.Allreduce(self._mpi.IN_PLACE, a, op=self._mpi.SUM)
        return a

    def sum_scalar(self, x: float) -> float:
        """Sum of a number over ranks."""
        if self.size == 1:
            return x
        self.wait_for_all()
        return self.comm.allreduce(x, op=self._mpi.SUM)

    def broadcast(self, obj, root: int):
        """`obj` of rank `root` (pickled) on every rank."""
        if self.size == 1:
            return obj
        self.wait_for_all()
        return self.comm.bcast(obj, root=root)

    def allgather(self, obj) -> list:
        """Every rank's `obj` (pickled), in rank order, on every rank."""
        if self.size == 1:
            return [obj]
        self.wait_for_all()
        return self.comm.allgather(obj)

    def gather_rows(self, rows: NDArray[np.int64], values: NDArray) -> tuple[NDArray[np.int64], NDArray]:
        """All ranks' (rows, values) concatenated, on every rank."""
        if self.size == 1:
            return rows, values
        self.wait_for_all()
        parts = self.comm.allgather((rows, values))
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE")     # the world size each launcher exports


def launched_size() -> int:
    """How many processes mpiexec/srun started (MPICH, Open MPI, PMIx), from the launcher's environment; 1 if none."""
    sizes = [os.environ.get(v, "") for v in _SIZE_VARS]
    return max([int(s) for s in sizes if s.strip().isdigit()] or [1])


def launched_by_mpiexec() -> bool:
    """True when this process is one of several started by mpiexec/srun (MPICH, Open MPI, Slurm)."""
    return launched_size() > 1 or int(os.environ.get("MPI_LOCALNRANKS", "1") or 1) > 1


def get_reducer():
    """An MpiReducer under mpiexec with more than one rank, else the one-process LocalReducer."""
    from cryorefine.parallel.local import LocalReducer
    if launched_by_mpiexec():
        from cryorefine.errors import InputError
        try:
            reducer = MpiReducer()
        except ImportError as exc:
            raise InputError("started by mpiexec but mpi4py is not installed (pip install 'cryorefine[mpi]')") from exc
        expected = launched_size()
        if reducer.size == 1 and expected > 1:
            # every process would run the whole job alone and write the same files
            raise InputError(f"started by mpiexec as {expected} processes, but mpi4py's MPI library "
                             f"({reducer.library()}) sees only this one: mpi4py loaded another MPI than the one "
                             f"mpiexec belongs to (point MPI4PY_LIBMPI at that MPI's libmpi.so)")
        return reducer
    return LocalReducer()
