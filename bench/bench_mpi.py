"""The same refinement under `mpiexec -n N` and on one process: wall time ratio and map agreement (issue 9).

    python bench/bench_mpi.py tutorial          # mpiexec -n 3, against bench/results/refine_tutorial.json
    python bench/bench_mpi.py small -n 2        # further options go to cryorefine refine

The one-process run is `python bench/bench_refine.py SET` (its map Refine3D/bench_class001.mrc and its JSON); it is
run first when its JSON is missing. Writes bench/results/refine_SET_mpiN.json with the ratio of wall times and the
lowest FSC between the two final maps up to the one-process run's reported resolution.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench_refine import map_agreement, run_set  # noqa: E402
from bench.standard_sets import DATA  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    """Run the set under mpiexec and compare it with the one-process run."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("set")
    ap.add_argument("-n", type=int, default=3, help="MPI processes")
    args, extra = ap.parse_known_args()
    mpiexec = shutil.which("mpiexec")
    if mpiexec is None:
        sys.exit("bench_mpi: no mpiexec on PATH (pip install mpich mpi4py)")
    one_json = RESULTS / f"refine_{args.set}.json"
    one = json.loads(one_json.read_text()) if one_json.exists() else run_set(args.set, extra)
    tag = f"_mpi{args.n}"
    res = run_set(args.set, extra, tag=tag, launcher=(mpiexec, "-n", str(args.n)))
    if "wall_s" in res and "wall_s" in one:
        res["one_process"] = {"json": one_json.name, "wall_s": one["wall_s"], "reported_A": one["reported_A"],
                              "peak_rss_gb": one["peak_rss_gb"]}
        res["wall_ratio_to_one_process"] = round(res["wall_s"] / one["wall_s"], 3)
        res["vs_one_process"] = map_agreement(DATA / args.set, "bench", f"bench{tag}", one.get("reported_A"))
        (RESULTS / f"refine_{args.set}{tag}.json").write_text(json.dumps(res, indent=1))
    print(json.dumps({k: res.get(k) for k in ("wall_s", "wall_ratio_to_one_process", "vs_one_process",
                                               "reported_A", "peak_rss_gb")}, indent=1))


if __name__ == "__main__":
    main()
