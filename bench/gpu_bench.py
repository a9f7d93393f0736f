"""GPU benchmark (`--gpu`): make the standard sets, refine each on the GPU, score, and write one JSON file and the
markdown table for docs/benchmarks.md. Run by bench/gpu_bench.sh on a machine with a GPU and PyTorch.

    python bench/gpu_bench.py --out DIR [--sets small medium tutorial] [--budget 540] [--gpu ""]

The tutorial set (3 CPU-minutes to simulate) is made in the background while the smaller sets refine. Each
refinement gets what is left of --budget seconds; one that runs out is recorded as timed out with its iterations.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench_refine import map_agreement, run_set  # noqa: E402
from bench.standard_sets import DATA, ensure_set  # noqa: E402


def gpu_name() -> str:
    """The CUDA device's name and PyTorch version, or why there is none."""
    try:
        import torch
        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)}, PyTorch {torch.__version__}"
        return f"no CUDA device (PyTorch {torch.__version__})"
    except ImportError:
        return "no PyTorch"


def table(rows: list[dict]) -> str:
    """Markdown rows: set, wall, iterations, E-step time and TFLOP/s, GPU peak, reported, FSC vs truth, errors."""
    out = ["| set | wall time | iterations | E-step s (TFLOP/s) | GPU memory peak | peak RSS | reported | "
           "FSC vs truth 0.5 masked / unmasked | median angular / offset error |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "wall_s" not in r:
            what = f"timed out after {r['timed_out_after_s']} s ({r['iterations_done']} iterations)" \
                if "timed_out_after_s" in r else ("skipped" if "skipped" in r else "failed")
            out.append(f"| {r['set']} | {what} | | | | | | | |")
            continue
        s = r.get("score", {})
        fm, fu = s.get("fsc05_masked_A"), s.get("fsc05_A")
        out.append(f"| {r['set']} | {r['wall_s']:.0f} s | {r['iterations']} | {r['estep_s']:.0f} "
                   f"({r['estep_tflops_overall']:.2f}) | {r.get('gpu_peak_gib')} GiB | {r['peak_rss_gb']} GB | "
                   f"{r['reported_A']} Å | {fm} / {fu} Å | {s.get('ang_median_deg')}° / "
                   f"{s.get('off_median_A')} Å |")
    return "\n".join(out)


def write(out: Path, report: dict) -> None:
    """The JSON and markdown so far (a run stopped at its limit still leaves them)."""
    (out / "gpu_bench.json").write_text(json.dumps(report, indent=1))
    agree = [f"- {r['set']}: lowest FSC against the 1-rank map up to the reported resolution "
             f"{r['vs_one_rank']}" for r in report["sets"] if "vs_one_rank" in r]
    (out / "gpu_bench.md").write_text(f"Device: {report['device']}\n\n" + table(report["sets"]) + "\n\n"
                                      + "\n".join(agree) + "\n")
    print(table(report["sets"]), flush=True)


def main() -> None:
    """Make, refine and score the sets in order within the time budget."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--sets", nargs="+", default=["small", "medium", "tutorial"])
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for the whole benchmark")
    ap.add_argument("--gpu", default="", help="--gpu value for cryorefine refine")
    ap.add_argument("--mpi-set", default="small", help="set refined again by 2 MPI ranks sharing the GPU ('' = none)")
    ap.add_argument("--mpi-gpu", default="0:0", help="--gpu value of the MPI run")
    args = ap.parse_args()
    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"device": gpu_name(), "python": platform.python_version(), "sets": []}
    background = None
    if "tutorial" in args.sets and not (DATA / "tutorial" / "truth.json").exists():
        background = subprocess.Popen([sys.executable, "-c", "import sys; sys.path.insert(0, '.'); "
                                       "from bench.standard_sets import ensure_set; ensure_set('tutorial')"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    plan = [(name, 1) for name in args.sets]
    if args.mpi_set:
        at = next((i + 1 for i, (n, _) in enumerate(plan) if n == "medium"), len(plan))
        plan.insert(min(at, len(plan)), (args.mpi_set, 2))
    for name, ranks in plan:
        if ranks > 1:
            left = args.budget - (time.time() - t0)
            single = next((r for r in report["sets"] if r["set"] == name and "wall_s" in r), None)
            if left < 20 or single is None:
                report["sets"].append({"set": f"{name} (mpiexec -n {ranks})", "skipped": "no time or no 1-rank run"})
                continue
            r = run_set(name, ["--gpu", args.mpi_gpu], tag=f"_gpu_mpi{ranks}", timeout=left,
                        launcher=("mpiexec", "-n", str(ranks)))
            r["set"] = f"{name} (mpiexec -n {ranks}, --gpu {args.mpi_gpu})"
            r["vs_one_rank"] = map_agreement(DATA / name, "bench_gpu", f"bench_gpu_mpi{ranks}", single.get("reported_A"))
            report["sets"].append(r)
            write(out, report)
            continue
        t_make = time.time()
        if name == "tutorial" and background is not None:
            try:
                background.wait(timeout=max(1.0, args.budget - (time.time() - t0)))
            except subprocess.TimeoutExpired:
                background.kill()
                report["sets"].append({"set": name, "skipped": "not simulated within the budget"})
                continue
            if background.returncode != 0:
                report["sets"].append({"set": name, "failed": background.stderr.read()[-2000:]})
                continue
        ensure_set(name)
        made = time.time() - t_make
        left = args.budget - (time.time() - t0)
        if left < 20:
            report["sets"].append({"set": name, "skipped": "no time left"})
            continue
        r = run_set(name, ["--gpu", args.gpu], tag="_gpu", timeout=left)
        r["make_wait_s"] = round(made, 1)
        report["sets"].append(r)
        write(out, report)
        if "wall_s" not in r and len(report["sets"]) == 1:
            print("the first set did not finish: stopping here", flush=True)
            break
    report["total_s"] = round(time.time() - t0, 1)
    (out / "gpu_bench.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
