"""Auto-refine of an aberrated set with many optics groups against the same set without aberrations.

Two sets are simulated with the same map, seed and size, so they have the same poses, CTFs and noise: one
with one optics group and no aberrations, the other with `--groups` optics groups, each with its own beam tilt
around the mean, plus trefoil, even Zernike terms and the README's anisotropic magnification. Both are refined
with the tutorial settings and scored against the truth; a third run refines the aberrated set with the
aberration labels removed from data_optics (what a program without the corrections would get). Wall time and
peak memory are measured per refine process (GNU time's maximum resident set size).

    python bench/bench_aberrations.py                        # small geometry (64², 2.5 Å), 1,000 particles
    python bench/bench_aberrations.py --size medium --n 5000  # medium geometry (128², 1.5 Å)
    python bench/bench_aberrations.py --reconstruct          # reconstruct table of the test sets (~2 min)
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

# per geometry: map, and aberrations of about 1 rad at the resolution a refinement reaches there
GEOMETRY = {
    "small": ("d2tet_small_b64_a2.5.mrc",
              ["--beamtilt=3,-2", "--odd-zernike", "0,0,150,0,0,-120", "--even-zernike", "200,0,300,0,0,0,100,0,300",
               "--aniso-mag", "1.012,0.022,0.004,0.988"]),
    "medium": ("d2tet_medium_b128_a1.5.mrc",
               ["--beamtilt=1,-0.6", "--odd-zernike", "0,0,50,0,0,-40", "--even-zernike", "80,0,120,0,0,0,40,0,120",
                "--aniso-mag", "1.012,0.022,0.004,0.988"]),
}
LABELS = ("rlnBeamTiltX", "rlnBeamTiltY", "rlnOddZernike", "rlnEvenZernike",
          "rlnMagMat00", "rlnMagMat01", "rlnMagMat10", "rlnMagMat11")


def simulate(out: Path, size: str, n: int, seed: int, extra: list[str]) -> Path:
    """The set in `out` (made once)."""
    if not (out / "truth.json").exists():
        subprocess.run([sys.executable, str(BENCH / "simulate.py"), "--map", str(BENCH / "maps" / GEOMETRY[size][0]),
                        "--n", str(n), "--snr", "0.05", "--seed", str(seed), "--quiet", *extra, "--out", str(out)],
                       check=True, stdout=subprocess.DEVNULL)
    return out


def stripped(d: Path) -> Path:
    """A copy of set d's particles.star without the aberration labels, in a sibling folder (same images)."""
    from cryorefine.io.star import read_star, write_star

    out = d.parent / (d.name + "_nolabels")
    out.mkdir(exist_ok=True)
    blocks = read_star(d / "particles.star")
    blocks["optics"] = blocks["optics"].drop(columns=[c for c in LABELS if c in blocks["optics"].columns])
    blocks["particles"]["rlnImageName"] = [f"{i}@{(d / f).resolve()}" for i, f in
                                           (v.split("@", 1) for v in blocks["particles"]["rlnImageName"])]
    write_star(out / "particles.star", blocks)
    for name in ("reference.mrc", "truth.star"):
        (out / name).write_bytes((d / name).read_bytes())
    return out


def refine(d: Path, truth_dir: Path, extra: tuple[str, ...] = ()) -> dict:
    """`cryorefine refine` in set folder d, timed, with its peak RSS, scored against truth_dir's truth."""
    out = d / "Refine3D"
    out.mkdir(exist_ok=True)
    for f in out.glob("bench*"):
        f.unlink()
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "cryorefine", "refine", "--i", "particles.star",
           "--ref", "reference.mrc", "--o", "Refine3D/bench", "--ini_high", "50", "--sym", "D2",
           "--particle_diameter", "150", *extra]
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


README_SETS = {   # ../shared/bench/README.md "Validation against RELION 5.0.1" (relion_reconstruct numbers there)
    "plain": [],
    "tilt": ["--beamtilt=1,-0.6"],
    "trefoil": ["--beamtilt=1,-0.6", "--odd-zernike", "0,0,50,0,0,-40"],
    "even": ["--even-zernike", "80,0,120,0,0,0,40,0,120"],
    "mag": ["--aniso-mag", "1.012,0.022,0.004,0.988"],
    "premult": ["--premultiply"],
    "groups4": ["--optics-groups", "4", "--beamtilt=1,-0.6"],
    "all": ["--optics-groups", "4", "--beamtilt=1,-0.6", "--odd-zernike", "0,0,50,0,0,-40", "--even-zernike",
            "80,0,120,0,0,0,40,0,120", "--aniso-mag", "1.012,0.022,0.004,0.988", "--premultiply"],
}


def readme_table() -> None:
    """The README's RELION validation sets (medium map, 2,000 particles, SNR 0.05, seed 21): masked FSC 0.5 of
    `cryorefine reconstruct --ctf --sym D2` with the labels, without them, and with a wrong convention."""
    import tempfile

    import mrcfile

    from cryorefine.cli import main as cli
    from cryorefine.fourier.fsc import fsc
    from cryorefine.io.star import read_star, write_star

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import test_aberrations as ta

    root = Path(tempfile.mkdtemp(prefix="aberr_readme_"))

    def score(star: Path) -> float:
        out = star.with_name(star.stem + "_rec.mrc")
        assert cli(["reconstruct", "--i", str(star), "--ctf", "--sym", "D2", "--o", str(out)]) == 0
        mask = mrcfile.read(root / "plain" / "mask.mrc")
        f = fsc(mrcfile.read(out) * mask, mrcfile.read(root / "plain" / "truth.mrc") * mask)
        for i in range(1, len(f)):
            if f[i] < 0.5:
                return 128 * 1.5 / (i - 1 + (f[i - 1] - 0.5) / (f[i - 1] - f[i]))
        return 3.0

    def edited(name: str, tag: str, edit) -> Path:
        blocks = read_star(root / name / "truth.star")
        blocks["optics"] = edit(blocks["optics"].copy())
        write_star(root / name / f"{tag}.star", blocks)
        return root / name / f"{tag}.star"

    print("| set | options | with labels | without | wrong convention |")
    print("|---|---|---|---|---|")
    for name, extra in README_SETS.items():
        subprocess.run([sys.executable, str(BENCH / "simulate.py"), "--map",
                        str(BENCH / "maps" / "d2tet_medium_b128_a1.5.mrc"), "--n", "2000", "--snr", "0.05",
                        "--seed", "21", "--quiet", *extra, "--out", str(root / name)], check=True,
                       capture_output=True)
        cells = [f"{score(root / name / 'truth.star'):.2f} Å"]
        if name != "plain":
            cells.append(f"{score(edited(name, 'stripped', ta._strip)):.2f} Å")
            cells.append("–" if "--premultiply" in extra else f"{score(edited(name, 'wrong', ta._wrong)):.2f} Å")
        else:
            cells += ["–", "–"]
        print(f"| {name} | `{' '.join(extra)}` | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(GEOMETRY), default="small")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--groups", type=int, default=30)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--refine-args", default="", help="further options for every refine run, e.g. '--maxsig 500'")
    p.add_argument("--concurrent", action="store_true",
                   help="run the refines at the same time (use with --refine-args '--j 1' on 2 cores): both see the "
                        "same machine load, so their wall times compare fairly on a shared machine")
    p.add_argument("--no-stripped", action="store_true",
                   help="skip the third run (the aberrated set with its labels removed)")
    p.add_argument("--reconstruct", action="store_true",
                   help="only the reconstruction table of the test sets (box 64, 400 particles)")
    p.add_argument("--readme-table", action="store_true",
                   help="only the reconstruction table of the README's RELION validation sets (medium, 2,000)")
    a = p.parse_args()
    if a.readme_table:
        readme_table()
        return
    if a.reconstruct:
        reconstruct_table()
        return
    root = DATA / f"aberr_{a.size}_n{a.n}"
    plain = simulate(root / "plain", a.size, a.n, a.seed, [])
    aberr = simulate(root / f"aberr_g{a.groups}", a.size, a.n, a.seed,
                     ["--optics-groups", str(a.groups), *GEOMETRY[a.size][1]])
    load = Path("/proc/loadavg").read_text().split()[:3]
    extra = tuple(a.refine_args.split())
    sets = [plain, aberr] + ([] if a.no_stripped else [stripped(aberr)])
    if a.concurrent:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(len(sets)) as pool:
            runs = list(pool.map(lambda d: refine(d, plain, extra), sets))
    else:
        runs = [refine(d, plain, extra) for d in sets]
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    r0, r1 = runs[:2]
    res = {"size": a.size, "n": a.n, "groups": a.groups, "refine_args": a.refine_args, "concurrent": a.concurrent, "aberrations": GEOMETRY[a.size][1], "runs": runs,
           "loadavg_before": load, "loadavg_after": load_after,
           "fsc05_masked_ratio": round(r1["fsc05_masked_A"] / r0["fsc05_masked_A"], 4),
           "fsc05_masked_ratio_nolabels": (round(runs[2]["fsc05_masked_A"] / r0["fsc05_masked_A"], 4)
                                           if len(runs) > 2 else None),
           "wall_ratio": round(r1["wall_s"] / r0["wall_s"], 3),
           "rss_ratio": round(r1["peak_rss_gb"] / r0["peak_rss_gb"], 3)}
    print(json.dumps(res, indent=1))
    outdir = Path(__file__).parent / "results"
    outdir.mkdir(exist_ok=True)
    (outdir / f"aberrations_{a.size}_n{a.n}_g{a.groups}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
