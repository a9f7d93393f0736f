"""Threads that do not fight: the small-set refinement alone and next to two busy-looping processes, with the
worker threads' default wait policy of this package (sleep when idle) and with spinning ones (OpenMP ACTIVE,
OpenBLAS's default 2^28-cycle timeout). Wall and CPU time (user + sys of the refine process).

    python bench/bench_contention.py            # on an otherwise idle 2-core machine (check `uptime` first)
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.standard_sets import ensure_set  # noqa: E402

SPIN = {"OMP_WAIT_POLICY": "ACTIVE", "OPENBLAS_THREAD_TIMEOUT": "28"}


def refine(d: Path, env: dict, tag: str) -> dict:
    """One small-set refinement (`--j 2`): wall seconds and CPU seconds of the process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "cryorefine", "refine", "--i", "particles.star", "--ref", "reference.mrc",
                    "--o", f"Refine3D/contention_{tag}", "--ini_high", "50", "--sym", "D2", "--particle_diameter",
                    "150", "--random_seed", "1", "--j", "2", "--quiet"], cwd=d, env={**os.environ, **env},
                   check=True, stdout=subprocess.DEVNULL)
    wall = time.time() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}


def with_busy_loops(fn, n: int = 2):
    """Run fn() while n processes spin on the cores."""
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        return fn()
    finally:
        for p in loops:
            p.kill()
            p.wait()


def main() -> None:
    d = ensure_set("small")
    (d / "Refine3D").mkdir(exist_ok=True)
    res = {"uptime_before": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()}
    for name, env in (("sleeping", {}), ("spinning", SPIN)):
        res[f"{name}_idle"] = refine(d, env, f"{name}_idle")
        res[f"{name}_busy"] = with_busy_loops(lambda env=env, name=name: refine(d, env, f"{name}_busy"))
        idle, busy = res[f"{name}_idle"], res[f"{name}_busy"]
        res[f"{name}_ratio"] = {"wall": round(busy["wall_s"] / idle["wall_s"], 2),
                                "cpu": round(busy["cpu_s"] / idle["cpu_s"], 2)}
        print(name, json.dumps({k: v for k, v in res.items() if k.startswith(name)}))
    out = Path(__file__).parent / "results" / "contention.json"
    out.write_text(json.dumps(res, indent=1))
    print("| threads | idle wall / CPU | next to 2 busy loops wall / CPU | ratio wall / CPU |")
    for name in ("sleeping", "spinning"):
        i, b, r = res[f"{name}_idle"], res[f"{name}_busy"], res[f"{name}_ratio"]
        print(f"| {name} | {i['wall_s']} / {i['cpu_s']} s | {b['wall_s']} / {b['cpu_s']} s | {r['wall']} / {r['cpu']} |")


if __name__ == "__main__":
    main()
