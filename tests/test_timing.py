"""The per-iteration `Time:` line: phase and kernel wall times add up, and `take` starts again from zero."""

import time
from dataclasses import replace

from cryorefine.refine.backend import cpu_backend
from cryorefine.refine.timing import KERNELS, PhaseClock, parse_time_line, time_line, timed_backend


def test_phases_and_kernels_accumulate_and_reset():
    clock = PhaseClock()
    calls = []

    def project(*args):
        calls.append(args)
        time.sleep(0.03)
        return len(calls)

    slow = timed_backend(replace(cpu_backend(), project=project), clock)
    with clock.phase("E-step"):
        assert slow.project(1) == 1 and slow.project(2) == 2     # results passed back
    with clock.phase("M-step"):
        time.sleep(0.02)
    phases, kernels = clock.take()
    assert calls == [(1,), (2,)]                      # arguments passed through
    assert 0.06 <= kernels["projection"] < 0.3         # two calls of 30 ms each, summed
    assert phases["E-step"] >= kernels["projection"]    # kernels run inside phases
    assert 0.02 <= phases["M-step"] < 0.3
    assert list(phases) == ["E-step", "M-step"]          # in the order they ran
    assert clock.take() == ({}, {})                       # the next iteration starts from zero


def test_every_kernel_is_timed():
    clock = PhaseClock()
    timed = timed_backend(cpu_backend(), clock)
    for field in KERNELS:
        assert getattr(timed, field) is not getattr(cpu_backend(), field)
    assert timed.name == cpu_backend().name


def test_time_line_lists_phases_then_kernels():
    line = time_line({"E-step": 12.34, "M-step": 0.5}, {"insertion": 1.0, "projection": 2.0, "finish": 0.0})
    assert line == " Time: E-step 12.3 s, M-step 0.5 s; kernels within them: projection 2.0 s, insertion 1.0 s"
    assert time_line({"output": 0.1}, {}) == " Time: output 0.1 s"


def test_time_line_reads_back():
    phases = {"references": 0.1, "E-step": 55.8, "FSC": 0.0, "M-step": 2.5}
    kernels = {"projection": 3.1, "coarse products": 20.0, "device sums back": 0.1}
    assert parse_time_line(time_line(phases, kernels)) == (phases, kernels)
    assert parse_time_line(time_line(phases, {})) == (phases, {})
