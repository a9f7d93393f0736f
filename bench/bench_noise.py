"""Honesty on pure noise: auto-refine of the standard `noise` set (default options) for several seeds, and the
checks of issue 13 on each run's final gold-standard FSC (`run_model.star`).

    python bench/bench_noise.py               # seeds 1 2 3
    python bench/bench_noise.py 1 --maxsig 500
    python bench/bench_noise.py 1 --j 1 & python bench/bench_noise.py 2 --j 1   # two seeds at once

Checks: no resolution override in the log; the reported resolution worse than 25 Å; beyond the shell of the
40 Å join + 2 the unmasked FSC looks like chance: no run of 4 consecutive shells above 0.143 and a mean of at most
0.05 over those shells.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench_refine import run_set  # noqa: E402
from bench.standard_sets import ensure_set  # noqa: E402

JOIN_A = 40.0


def chance_checks(fsc: np.ndarray, box: int, angpix: float, join_A: float = JOIN_A) -> dict:
    """The FSC beyond the join shell + 2: longest run of shells above 0.143 and the mean (chance: 0 and ~0)."""
    first = math.ceil(box * angpix / join_A) + 3
    tail = np.asarray(fsc[first:], dtype=np.float64)
    run = longest = 0
    for above in tail > 0.143:
        run = run + 1 if above else 0
        longest = max(longest, run)
    return {"first_shell": first, "longest_run_above_0.143": longest, "mean": float(tail.mean()),
            "passes": bool(longest < 4 and tail.mean() <= 0.05)}


def run_tag(extra: list[str]) -> str:
    """The options that change the science (not --j and its value) as a run-name suffix: '' for the defaults, so
    runs with other options do not overwrite the default runs' files."""
    kept = [a for i, a in enumerate(extra) if a != "--j" and not (i and extra[i - 1] == "--j")]
    return "".join("_" + a.lstrip("-") for a in kept)


def final_fsc(model_star: Path) -> np.ndarray:
    """The gold-standard FSC of a run's final model STAR file."""
    from cryorefine.io.star import read_star
    return read_star(model_star)["model_class_1"]["rlnGoldStandardFsc"].to_numpy()


def main() -> None:
    # seeds lead; everything from the first option on goes to `cryorefine refine` (so `--j 1` stays an option)
    lead = next((i for i, a in enumerate(sys.argv[1:]) if not a.isdigit()), len(sys.argv) - 1)
    seeds = [int(a) for a in sys.argv[1:1 + lead]] or [1, 2, 3]
    extra = sys.argv[1 + lead:]
    d = ensure_set("noise")
    rows = []
    for seed in seeds:
        tag = f"_s{seed}{run_tag(extra)}"
        res = run_set("noise", ["--random_seed", str(seed), *extra], tag=tag)
        if "failed" in res or "timed_out_after_s" in res:
            sys.exit(f"seed {seed}: the refinement did not finish: {res.get('failed') or res.get('log_tail')}")
        log = (d / "Refine3D" / f"bench{tag}.out").read_text() if (d / "Refine3D" / f"bench{tag}.out").exists() else ""
        fsc = final_fsc(d / "Refine3D" / f"bench{tag}_model.star")
        chk = chance_checks(fsc, 64, 2.5)
        row = {"seed": seed, "wall_s": res.get("wall_s"), "iterations": res.get("iterations"),
               "reported_A": res.get("reported_A"), "override_line": "Reporting" in log,
               "fsc_shells_5_8": [round(float(x), 3) for x in fsc[5:9]], **chk}
        row["passes"] = bool(chk["passes"] and (row["reported_A"] or 0) > 25.0 and not row["override_line"])
        rows.append(row)
        print(json.dumps(row))
    # one file per seed list, so seeds run as separate processes at once do not overwrite each other
    name = f"noise{'_'.join([''] + extra).replace('-', '')}_s{''.join(map(str, seeds))}"
    out = Path(__file__).parent / "results" / f"{name}.json"
    out.write_text(json.dumps({"extra": extra, "runs": rows}, indent=1))
    print("| seed | reported | FSC shells 5-8 | longest run > 0.143 beyond shell 7 | mean beyond | wall |")
    for r in rows:
        print(f"| {r['seed']} | {r['reported_A']} Å | {r['fsc_shells_5_8']} | {r['longest_run_above_0.143']} | "
              f"{r['mean']:.3f} | {r['wall_s']} s |")


if __name__ == "__main__":
    main()
