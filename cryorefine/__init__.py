"""cryorefine: RELION-compatible cryo-EM single-particle 3D auto-refine."""

import os as _os

__version__ = "0.1.0"

# Idle worker threads sleep instead of spinning, so a run shares its cores fairly (MPI ranks on one node, other jobs
# on a workstation): numba's OpenMP pool and OpenBLAS (2^4 cycles before a worker yields; its default is 2^28).
# Read when the libraries load, hence here, before numpy and numba are imported; a user's setting wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
