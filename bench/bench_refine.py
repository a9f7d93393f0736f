"""End-to-end auto-refine benchmark on a standard set: wall time, per-iteration time, E-step GFLOP/s, peak
memory, reported resolution, FSC vs truth, pose errors. Prints a markdown table row and writes JSON.

    python bench/bench_refine.py small          # ~3-5 min on 2 cores
    python bench/bench_refine.py medium         # the issue's benchmark
"""

from __future__ import annotations

import json
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.standard_sets import BENCH, ensure_set  # noqa: E402

DIAMETER = {"small": 150, "medium": 150, "noise": 150}


def main(name: str, extra: list[str]) -> dict:
    """Run `cryorefine refine` on the set, score it, and return the measurements."""
    d = ensure_set(name)
    out = d / "Refine3D" / "bench"
    out.parent.mkdir(exist_ok=True)
    for f in out.parent.glob("bench*"):
        f.unlink()
    cmd = [sys.executable, "-m", "cryorefine", "refine", "--i", "particles.star", "--ref", "reference.mrc",
           "--o", "Refine3D/bench", "--ini_high", "50", "--sym", "D2",
           "--particle_diameter", str(DIAMETER.get(name, 150)), *extra]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=d, capture_output=True, text=True)
    wall = time.time() - t0
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2 ** 20
    if proc.returncode != 0:
        sys.exit(f"refine failed:\n{proc.stderr}")
    log = proc.stdout
    iters = [float(x) for x in re.findall(r"Iteration \d+ took ([\d.]+) s", log)]
    gflops = [float(x) for x in re.findall(r"([\d.]+) GFLOP/s", log)]
    final = re.findall(r"Final resolution \(without masking\) is: ([\d.]+)", log)
    score = subprocess.run([sys.executable, str(BENCH / "score.py"), "--map", "Refine3D/bench_class001.mrc",
                            "--truth", "truth.mrc", "--mask", "mask.mrc", "--data", "Refine3D/bench_data.star",
                            "--truth-star", "truth.star", "--sym", "D2"], cwd=d, capture_output=True, text=True)
    text = score.stdout
    s = json.loads(text.strip().splitlines()[-1])
    res = {
        "set": name, "command": " ".join(cmd[2:]), "wall_s": round(wall, 1), "iterations": len(iters),
        "mean_iteration_s": round(sum(iters) / max(len(iters), 1), 1),
        "estep_gflops_median": sorted(gflops)[len(gflops) // 2] if gflops else None,
        "peak_rss_gb": round(peak_gb, 2), "reported_A": float(final[0]) if final else None,
        "score_text": [ln for ln in text.splitlines() if not ln.startswith("{")],
        "score": s,
    }
    print(json.dumps({k: v for k, v in res.items() if k != "score"}, indent=1))
    outdir = Path(__file__).parent / "results"
    outdir.mkdir(exist_ok=True)
    (outdir / f"refine_{name}.json").write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "small", sys.argv[2:])
