"""The chance level of the gold-standard FSC of a pure-noise refinement, measured rather than assumed.

K fresh noise sets (the `noise` set's simulator options with other seeds) go through the rest of a finished noise
run: each is continued from the run's iteration N (`--continue`) with that run's references, half split, poses and
counters, so it refines its own independent images against the same references. Shells that the references
determine have the same FSC in every set; beyond them each set's gold-standard FSC (`_model.star`) is a draw of the
FSC under chance, whose spread is the noise level of the FSC itself.

    python bench/bench_noise_null.py data/noise/Refine3D/bench_s1 8 --k 8     # iteration 8 of seed 1's run

Prints, per shell, the mean and standard deviation of the K FSCs, the fraction above 0.143, and 1/√(n/symmetry)
of independent voxels (fsc.fsc_sigma), and issue 13's chance checks of each set's final FSC; writes
bench/results/noise_null_<root>_it<N>.json (noise_null.json: the first run, from bench_s1 with --maxsig 500).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench_noise import chance_checks, final_fsc  # noqa: E402
from bench.standard_sets import BENCH, DATA, STANDARD_SETS  # noqa: E402
from cryorefine.fourier.fsc import fsc_sigma  # noqa: E402

N_SYM = 4   # the noise set is refined with D2 (bench_refine's settings)


def fresh_noise(out: Path, seed: int, n: int | None = None) -> Path:
    """The `noise` set's simulation with another seed (and n images, default the set's), in out (made once)."""
    if not (out / "particles.mrcs").exists():
        args = [a if not a.startswith("maps/") else str(BENCH / a) for a in STANDARD_SETS["noise"]]
        args[args.index("--seed") + 1] = str(seed)
        if n is not None:
            args[args.index("--n") + 1] = str(n)
        subprocess.run([sys.executable, str(BENCH / "simulate.py"), *args, "--quiet", "--out", str(out)],
                       check=True, stdout=subprocess.DEVNULL)
    return out / "particles.mrcs"


def continued_copy(root: Path, iteration: int, dest: Path, stack: Path) -> Path:
    """Copy root's iteration files into dest with the images replaced by `stack` (same indices) and the
    optimiser's file names pointing into dest; returns the optimiser file to --continue from."""
    it = f"{root.name}_it{iteration:03d}"
    dest.mkdir(parents=True, exist_ok=True)
    for f in root.parent.glob(f"{it}_*"):
        shutil.copy(f, dest / f.name)
    data = dest / f"{it}_data.star"
    data.write_text(re.sub(r"@\S+", f"@{stack.resolve()}", data.read_text()))
    opt = dest / f"{it}_optimiser.star"
    opt.write_text(re.sub(rf"(\s)\S*{re.escape(it)}_", rf"\g<1>{dest.resolve()}/{it}_", opt.read_text()))
    return opt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path, help="output root of a finished noise run, e.g. data/noise/Refine3D/bench_s1")
    p.add_argument("iteration", type=int, help="the iteration to continue from (the one before the final)")
    p.add_argument("--k", type=int, default=8, help="number of fresh noise sets")
    p.add_argument("--first-seed", type=int, default=101)
    p.add_argument("--j", type=int, default=2)
    a = p.parse_args()
    work = DATA / "noise_null"
    fscs, reported, checks = [], [], []
    for seed in range(a.first_seed, a.first_seed + a.k):
        stack = fresh_noise(work / f"set{seed}", seed)
        dest = work / f"run{seed}"
        shutil.rmtree(dest, ignore_errors=True)
        opt = continued_copy(a.root, a.iteration, dest, stack)
        data = opt.with_name(opt.name.replace("_optimiser.star", "_data.star"))
        proc = subprocess.run([sys.executable, "-m", "cryorefine", "refine", "--continue", str(opt), "--i", str(data),
                               "--o", str(dest / a.root.name), "--j", str(a.j)], capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"continue of set {seed} failed:\n{proc.stderr[-2000:]}")
        fscs.append(final_fsc(dest / f"{a.root.name}_model.star"))
        res = re.findall(r"Final resolution \(without masking\) is: ([\d.]+)", proc.stdout)
        reported.append(float(res[0]) if res else None)
        checks.append(chance_checks(fscs[-1], 64, 2.5))
        print(f"set {seed}: reported {reported[-1]} A; FSC shells 4-8 {np.round(fscs[-1][4:9], 2).tolist()}; "
              f"issue 13's checks beyond shell 7: longest run above 0.143 {checks[-1]['longest_run_above_0.143']}, "
              f"mean {checks[-1]['mean']:.3f}", flush=True)
    f = np.array(fscs)
    sigma = fsc_sigma(2 * (f.shape[1] - 1), N_SYM)
    rows = [{"shell": s, "mean": round(float(f[:, s].mean()), 3), "sd": round(float(f[:, s].std(ddof=1)), 3),
             "above_0.143": round(float((f[:, s] > 0.143).mean()), 2), "independent_sd": round(float(sigma[s]), 3)}
            for s in range(1, f.shape[1])]
    print("| shell | mean | sd | fraction > 0.143 | 1/√(n/4) |\n|---|---|---|---|---|")
    for r in rows[:20]:
        print(f"| {r['shell']} | {r['mean']:.2f} | {r['sd']:.2f} | {r['above_0.143']:.2f} | {r['independent_sd']:.3f} |")
    out = Path(__file__).parent / "results" / f"noise_null_{a.root.name}_it{a.iteration:03d}.json"
    out.write_text(json.dumps({"root": str(a.root), "iteration": a.iteration, "k": a.k, "first_seed": a.first_seed,
                               "reported_A": reported, "checks": checks, "shells": rows}, indent=1))


if __name__ == "__main__":
    main()
