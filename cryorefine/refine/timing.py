"""Wall time of an iteration's phases and of the backend's kernels, for the log's per-iteration `Time:` line.

Kernel times are wall times of the backend's calls, which return host arrays: on a GPU they include the copies
to and from the device, so they are what the E-step waits for.
"""

from __future__ import annotations

import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

# Backend field -> name in the log, in the order the log gives them
KERNELS = {"make_projector": "projector build", "project": "projection", "coarse_significant": "coarse products",
           "block_scores": "fine products", "insert": "insertion", "finish": "device sums back"}


@dataclass
class PhaseClock:
    """Seconds per phase and per kernel since the last `take`; written only through `phase` and `timed_backend`."""

    phases: dict[str, float] = field(default_factory=dict)
    kernels: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Add the wall time of the block to phase `name`."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - t0

    def take(self) -> tuple[dict[str, float], dict[str, float]]:
        """(phases, kernels) so far, and start again from zero."""
        out = (dict(self.phases), dict(self.kernels))
        self.phases.clear()
        self.kernels.clear()
        return out


def timed(fn: Callable, clock: PhaseClock, name: str) -> Callable:
    """fn, adding its wall time to clock.kernels[name]."""
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            clock.kernels[name] = clock.kernels.get(name, 0.0) + time.perf_counter() - t0
    return wrapper


def timed_backend(backend, clock: PhaseClock):
    """The same refine.backend.Backend with each kernel's wall time added to clock."""
    return replace(backend, **{f: timed(getattr(backend, f), clock, name) for f, name in KERNELS.items()})


def time_line(phases: dict[str, float], kernels: dict[str, float]) -> str:
    """' Time: phase s, ...; kernels within them: kernel s, ...' (phases in the order they ran)."""
    text = " Time: " + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items())
    used = [(name, kernels[name]) for name in KERNELS.values() if kernels.get(name, 0.0) >= 0.05]
    if used:
        text += "; kernels within them: " + ", ".join(f"{k} {v:.1f} s" for k, v in used)
    return text


def parse_time_line(line: str) -> tuple[dict[str, float], dict[str, float]]:
    """(phases, kernels) in seconds from a `time_line` (with or without its leading ' Time: ')."""
    text = line.strip().removeprefix("Time:").strip()
    parts = text.split("; kernels within them: ")
    found = [{name: float(sec) for name, sec in re.findall(r"([A-Za-z][\w -]*?) ([\d.]+) s(?:,|$)", part)}
             for part in parts]
    return found[0], (found[1] if len(found) > 1 else {})
