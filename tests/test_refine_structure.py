"""Structure of the refinement: each piece of state has one writer (checked on the source with `ast`), the
accumulator sums every field over processes, and the backend is the seam the E-step calls."""

from __future__ import annotations

import ast
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest

from cryorefine.refine import estep
from cryorefine.refine.state import Counters, HalfModel, SamplingState

REFINE = Path(__file__).resolve().parent.parent / "cryorefine" / "refine"

# dataclass -> the one module allowed to assign its fields (None: no module assigns them, all use replace())
OWNERS = {Counters: "counters.py", HalfModel: "mstep.py", SamplingState: "autosampling.py"}


def _assigned_attributes(tree: ast.AST) -> set[str]:
    """Names of attributes that appear as assignment targets (x.a = .., x.a += .., x.a, y.b = ..)."""
    out = set()

    def visit_target(t):
        if isinstance(t, ast.Attribute):
            out.add(t.attr)
        elif isinstance(t, (ast.Tuple, ast.List)):
            for e in t.elts:
                visit_target(e)
        elif isinstance(t, ast.Starred):
            visit_target(t.value)

    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for t in node.targets:
                visit_target(t)
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            visit_target(node.target)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr" and len(node.args) > 1:
            arg = node.args[1]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                out.add(arg.value)
    return out


@pytest.mark.parametrize("cls", list(OWNERS), ids=lambda c: c.__name__)
def test_only_the_owner_assigns_fields(cls):
    names = {f.name for f in fields(cls)}
    offenders = []
    for path in sorted(REFINE.glob("*.py")):
        if path.name in (OWNERS[cls], "state.py"):
            continue
        hit = _assigned_attributes(ast.parse(path.read_text())) & names
        offenders += [f"{path.name}: {a}" for a in sorted(hit)]
    assert not offenders, f"{cls.__name__} fields assigned outside {OWNERS[cls]}: {offenders}"


def test_the_checker_sees_assignments():
    tree = ast.parse("c.acc_rot = 1\nc.a, c.nr_iter_wo_resol_gain = 1, 2\nc.best_resolution += 1\n"
                     "setattr(c, 'fsc', 0)\nc.x[0] = 1\n")
    assert _assigned_attributes(tree) == {"acc_rot", "a", "nr_iter_wo_resol_gain", "best_resolution", "fsc"}


class _FakeReducer:
    """Two processes with identical sums: every summed value doubles."""

    size = 2

    def sum_array(self, a):
        a *= 2
        return a

    def sum_scalar(self, x):
        return 2 * x


def test_accumulator_reduce_sums_every_field():
    acc = estep.empty_accumulator(16, 2, 8, [16, 24], 3, 5)
    for f in fields(acc):
        v = getattr(acc, f.name)
        if isinstance(v, np.ndarray):
            v[...] = 1
        elif isinstance(v, dict):
            for a in v.values():
                a[...] = 1
        elif f.name != "bp":
            setattr(acc, f.name, type(v)(1))
    acc.bp.data[...] = 1
    acc.bp.weight[...] = 1
    acc.reduce(_FakeReducer())
    for f in fields(acc):
        v = getattr(acc, f.name)
        if f.name == "bp":
            assert np.all(v.data == 2) and np.all(v.weight == 2)
        elif isinstance(v, dict):
            assert all(np.all(a == 2) for a in v.values()), f.name
        else:
            assert np.all(np.asarray(v) == 2), f.name


def test_one_thread_count_for_numba_and_blas():
    import numba
    from threadpoolctl import threadpool_info, threadpool_limits

    from cryorefine.parallel.threads import limit_threads
    before = numba.get_num_threads()
    blas_before = max([p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"], default=1)
    try:
        limit_threads(1)
        assert numba.get_num_threads() == 1
        assert all(p["num_threads"] == 1 for p in threadpool_info() if p["user_api"] == "blas")
    finally:
        numba.set_num_threads(before)
        threadpool_limits(limits=blas_before, user_api="blas")
