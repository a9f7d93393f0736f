"""Auto-refine of an aberrated set with many optics groups against the same set without aberrations.

Two sets are simulated with the medium map (box 128, 1.5 Å/px) and the same seed, so they have the same poses,
CTFs and noise; one has one optics group and no aberrations, the other `--groups` optics groups, each with its
own beam tilt around 1,-0.6 mrad, plus trefoil, even Zernike terms and the README's anisotropic magnification.
Both are refined with the tutorial settings and scored against the truth; wall time and peak memory of each
refine process are measured separately (GNU time's maximum resident set size).

    python bench/bench_aberrations.py                  # 3,000 particles, 30 optics groups
    python bench/bench_aberrations.py --n 5000         # the full medium size
    python bench/bench_aberrations.py --reconstruct    # reconstruct table of the test sets (~2 min)
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.standard_sets import BENCH, DATA  # noqa: E402

ABERRATIONS = ["--beamtilt=1,-0.6", "--odd-zernike", "0,0,50,0,0,-40", "--even-zernike",
               "80,0,120,0,0,0,40,0,120", "--aniso-mag", "1.012,0.022,0.004,0.988"]


def simulate(out: Path, n: int, seed: int, extra: list[str]) -> Path:
    """The set in `out` (made once)."""
    if not (out / "truth.json").exists():
        subprocess.run([sys.executable, str(BENCH / "simulate.py"), "--map",
                        str(BENCH / "maps" / "d2tet_medium_b128_a1.5.mrc"), "--n", str(n), "--snr", "0.05",
                        "--seed", str(seed), "--quiet", *extra, "--out", str(out)], check=True,
                       stdout=subprocess.DEVNULL)
    return out


def refine(d: Path, truth_dir: Path) -> dict:
    """`cryorefine refine` in set folder d, timed, with its peak RSS, scored against truth_dir's truth."""
    out = d / "Refine3D"
    out.mkdir(exist_ok=True)
    for f in out.glob("bench*"):
        f.unlink()
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "cryorefine", "refine", "--i", "particles.star",
           "--ref", "reference.mrc", "--o", "Refine3D/bench", "--ini_high", "50", "--sym", "D2",
           "--particle_diameter", "150"]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=d, capture_output=True, text=True, check=False)
    wall = time.time() - t0
    if proc.returncode != 0:
        sys.exit(f"refine in {d} failed:\n{proc.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    log = proc.stdout
    iters = [float(x) for x in re.findall(r"Iteration \d+ took ([\d.]+) s", log)]
    final = re.findall(r"Final resolution \(without masking\) is: ([\d.]+)", log)
    score = subprocess.run([sys.executable, str(BENCH / "score.py"), "--map", "Refine3D/bench_class001.mrc",
                            "--truth", str(truth_dir / "truth.mrc"), "--mask", str(truth_dir / "mask.mrc"),
                            "--data", "Refine3D/bench_data.star", "--truth-star", "truth.star", "--sym", "D2"],
                           cwd=d, capture_output=True, text=True, check=True)
    s = json.loads(score.stdout.strip().splitlines()[-1])
    return {"set": d.name, "wall_s": round(wall, 1), "iterations": len(iters), "peak_rss_gb": round(rss_kb / 2 ** 20, 2),
            "reported_A": float(final[0]) if final else None,
            "score_text": [ln for ln in score.stdout.splitlines() if not ln.startswith("{")],
            "fsc05_masked_A": s["fsc05_masked_A"], "fsc05_A": s["fsc05_A"]}


def reconstruct_table() -> None:
    """`cryorefine reconstruct --ctf --sym D2` on the sets of tests/test_aberrations.py: masked FSC 0.5 vs the
    unaberrated truth with the labels, without them, and with a wrong convention (markdown rows)."""
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import test_aberrations as ta

    root = Path(tempfile.mkdtemp(prefix="aberr_rec_"))
    for name, extra in ta.SETS.items():
        subprocess.run([sys.executable, str(BENCH / "simulate.py"), "--map",
                        str(BENCH / "maps" / "d2tet_small_b64_a2.5.mrc"), *ta.BASE, *extra, "--out",
                        str(root / name)], check=True, capture_output=True)
    print("| set | options | with labels | without | wrong convention | time |")
    print("|---|---|---|---|---|---|")
    for name, extra in ta.SETS.items():
        t0 = time.time()
        res, hi = ta._reconstruct_score(root, root / name / "truth.star")
        dt = time.time() - t0
        cells = [f"{res:.2f} Å ({hi:.3f})"]
        if name != "plain":
            r, h = ta._reconstruct_score(root, ta._edited(root, name, "stripped", ta._strip))
            cells.append(f"{r:.2f} Å ({h:.3f})")
            if name != "premult":
                r, h = ta._reconstruct_score(root, ta._edited(root, name, "wrong", ta._wrong))
                cells.append(f"{r:.2f} Å ({h:.3f})")
            else:
                cells.append("–")
        else:
            cells += ["–", "–"]
        print(f"| {name} | `{' '.join(extra)}` | " + " | ".join(cells) + f" | {dt:.1f} s |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=3000)
    p.add_argument("--groups", type=int, default=30)
    p.add_argument("--seed", type=int, default=12)
    p.add_argument("--reconstruct", action="store_true",
                   help="only the reconstruction table of the test sets (box 64, 400 particles)")
    a = p.parse_args()
    if a.reconstruct:
        reconstruct_table()
        return
    root = DATA / f"aberr_n{a.n}"
    plain = simulate(root / "plain", a.n, a.seed, [])
    aberr = simulate(root / f"aberr_g{a.groups}", a.n, a.seed, ["--optics-groups", str(a.groups), *ABERRATIONS])
    load = Path("/proc/loadavg").read_text().split()[:3]
    runs = [refine(plain, plain), refine(aberr, plain)]
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    r0, r1 = runs
    res = {"n": a.n, "groups": a.groups, "aberrations": ABERRATIONS, "runs": runs, "loadavg_before": load,
           "loadavg_after": load_after,
           "fsc05_masked_ratio": round(r1["fsc05_masked_A"] / r0["fsc05_masked_A"], 4),
           "wall_ratio": round(r1["wall_s"] / r0["wall_s"], 3),
           "rss_ratio": round(r1["peak_rss_gb"] / r0["peak_rss_gb"], 3)}
    print(json.dumps(res, indent=1))
    outdir = Path(__file__).parent / "results"
    outdir.mkdir(exist_ok=True)
    (outdir / f"aberrations_n{a.n}_g{a.groups}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
