"""The kernel seam: one Backend, chosen once at start-up, bundles every hot kernel of an iteration.

The E-step and M-step call only these functions: slice extraction (`project`), insertion (`insert`), the
likelihood scores of the coarse and fine passes, and the weighted image sums. The CPU backend is numba + numpy
(BLAS); a GPU backend is one more module with the same functions and one branch in `make_backend`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from cryorefine.errors import option_error
from cryorefine.fourier import backprojector as bpm
from cryorefine.fourier import projector as pjm
from cryorefine.refine import likelihood


@dataclass(frozen=True)
class Backend:
    """Hot kernels of one device; every function takes and returns numpy arrays."""

    name: str
    make_projector: Callable      # (volume, pad, r_max) -> Projector
    project: Callable             # (Projector, rotations (n,3,3), kx, ky, out=None) -> (n, m) complex64
    insert: Callable              # (BackProjector, rotations, kx, ky, values (n,m), weights (n,m)) -> None
    coarse_significant: Callable  # likelihood.coarse_significant
    block_scores: Callable        # likelihood.block_scores: fine pass and local coarse pass (flattened blocks)
    finish: Callable = lambda bp: None   # (BackProjector) -> None: device sums back into bp after a half's E-step
    memory_note: Callable = lambda: ""   # () -> a log line on device memory ("" on the CPU)
    # block_scores reads the blocks' projection rows (layout.p_row) in place from a larger host array, such as the
    # fine-projection cache; a device backend gets only the batch's rows instead of copying the whole array over
    reads_rows_in_place: bool = True

    def describe(self) -> str:
        """One line for the log."""
        return f"kernels: {self.name}"


def cpu_backend() -> Backend:
    """numba kernels for projection, insertion and the block products, numpy BLAS for the global coarse products."""
    return Backend("CPU (numba, numpy BLAS)", pjm.make_projector, pjm.project, bpm.insert,
                   likelihood.coarse_significant, likelihood.block_scores)


def make_backend(gpu: str | None, rank: int = 0) -> tuple[Backend, str]:
    """(backend, log note) for `--gpu` (RELION spelling: None = CPU, "" = the rank's GPU, "0", "0:1" = one entry
    per rank; "cpu" = the PyTorch kernels on the CPU, for tests). Without PyTorch or a CUDA device the run goes
    on on the CPU, as RELION's GUI users on a CPU machine would want; a GPU id that does not exist is an error."""
    if gpu is None:
        return cpu_backend(), ""
    try:
        from cryorefine.refine.backend_torch import cuda_devices, torch_backend
    except ImportError:
        return cpu_backend(), (" WARNING: --gpu: PyTorch is not installed (pip install 'cryorefine[gpu]'); "
                               "running on the CPU")
    if gpu.strip().lower() != "cpu" and cuda_devices() == 0:
        return cpu_backend(), " WARNING: --gpu: PyTorch sees no CUDA device; running on the CPU"
    with option_error(f"--gpu {gpu!r}"):
        return torch_backend(gpu, rank), ""
