"""The one exception type for user mistakes (bad files, options, inputs)."""

from __future__ import annotations


class InputError(Exception):
    """A user mistake: the CLI prints one line `error: <message>` and exits 2 (no traceback).

    The message must name the file (or option) and the problem, e.g.
    ``"particles.star: no data_particles table"``.
    """


def require(condition: bool, message: str) -> None:
    """Raise InputError(message) unless condition holds."""
    if not condition:
        raise InputError(message)


class JobAborted(Exception):
    """The RELION pipeliner asked the job to stop (`RELION_JOB_ABORT_NOW` in its --pipeline_control folder)."""
