"""The one exception type for user mistakes (bad files, options, inputs)."""

from __future__ import annotations

import contextlib
import math
import sys
from typing import Iterator


class InputError(Exception):
    """A user mistake: the CLI prints one line `error: <message>` and exits 2 (no traceback).

    The message must name the file (or option) and the problem, e.g.
    ``"particles.star: no data_particles table"``.
    """


@contextlib.contextmanager
def option_error(option: str) -> Iterator[None]:
    """Turn a ValueError of a numerical function into an InputError naming the option it came from."""
    try:
        yield
    except ValueError as exc:
        raise InputError(f"{option}: {exc}") from None


def check(condition: bool, message: str) -> None:
    """Raise ValueError(message) unless condition holds (numerical functions: no command-line flags in messages)."""
    if not condition:
        raise ValueError(message)


def require(condition: bool, message: str) -> None:
    """Raise InputError(message) unless condition holds."""
    if not condition:
        raise InputError(message)


def require_finite(args, dests) -> None:
    """InputError for the first option among `dests` (argparse destinations, spelled --dest) that is nan or ±inf:
    nan passes and fails every comparison, so a later `> 0` test would let it through or skip it silently."""
    for dest in dests:
        value = getattr(args, dest)
        require(math.isfinite(value), f"--{dest}: must be a finite number (got {value:g})")


class JobAborted(Exception):
    """The RELION pipeliner asked the job to stop (`RELION_JOB_ABORT_NOW` in its --pipeline_control folder)."""


class Terminated(BaseException):
    """SIGTERM (a batch system's scancel, `kill`): unwinds like KeyboardInterrupt, so outputs of the unfinished
    iteration are removed and RELION's failure marker is written."""


_TERMINATION = {"requested": False}


def request_termination(signum=None, frame=None) -> None:
    """SIGTERM handler: raise Terminated now, and remember it, since an exception raised while Python runs a
    finaliser (__del__) is printed and dropped: check_termination raises it again at the next safe point."""
    _TERMINATION["requested"] = True
    raise Terminated("SIGTERM")


def check_termination() -> None:
    """Raise Terminated if SIGTERM arrived and its first exception was lost."""
    if _TERMINATION["requested"]:
        raise Terminated("SIGTERM")


def quiet_after_termination(unraisable) -> None:
    """sys.unraisablehook: after SIGTERM, finalisers of objects it interrupted half-built (a JIT compilation's)
    print tracebacks on the way out; the job's one line says what happened."""
    if not _TERMINATION["requested"]:
        sys.__unraisablehook__(unraisable)
