"""Auto-refine with other point groups than the standard sets' D2: Cn, T, O, I on simulated symmetric objects.

    python bench/bench_point_groups.py                 # C5 T O I2
    python bench/bench_point_groups.py I2 O --j 2      # options after the groups go to cryorefine refine

For each group: a test object (six Gaussian blobs of 4 Å at random directions 15-50 Å from the centre, seed 7,
copied by every operation of the group; box 64, 2.5 Å/px), 1,000 particles simulated from it (`simulate.py`,
seed 3, its defaults otherwise: SNR 0.05, B 60, a 40 Å reference shifted and scaled), refined with the small
set's options and `--sym G`, scored with `score.py` (symmetry-aware angular errors), and reconstructed from the
true poses. Prints a markdown table; JSON in bench/results/point_groups.json. About 8 minutes on 2 cores.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench_reconstruct import reconstruct_and_score  # noqa: E402
from bench.standard_sets import BENCH, DATA  # noqa: E402
from cryorefine.geometry.symmetry import symmetry_matrices  # noqa: E402
from cryorefine.io.mrc import write_map  # noqa: E402

BOX, ANGPIX, BLOB_A = 64, 2.5, 4.0


def symmetric_object(group: str, seed: int = 7) -> np.ndarray:
    """(BOX³) float32 map: six blobs at random directions and radii 15-50 Å, each copied by the group's operations
    (RELION's matrices acting on (x, y, z) about the centre voxel BOX/2)."""
    rng = np.random.default_rng(seed)
    seeds = []
    for _ in range(6):
        v = rng.normal(size=3)
        seeds.append(v / np.linalg.norm(v) * rng.uniform(15.0, 50.0))
    centres = np.array([m @ p for m in symmetry_matrices(group) for p in seeds])
    c = (np.arange(BOX) - BOX // 2) * ANGPIX
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    vol = np.zeros((BOX,) * 3, np.float32)
    for px, py, pz in centres:
        vol += np.exp(-((x - px) ** 2 + (y - py) ** 2 + (z - pz) ** 2) / (2 * BLOB_A ** 2)).astype(np.float32)
    return vol


def make_set(group: str) -> Path:
    """data/point_groups/<group>/ with the simulator's outputs (made once)."""
    out = DATA / "point_groups" / group
    if (out / "particles.star").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    write_map(out / "object.mrc", symmetric_object(group), ANGPIX)
    subprocess.run([sys.executable, str(BENCH / "simulate.py"), "--map", str(out / "object.mrc"), "--n", "1000",
                    "--seed", "3", "--quiet", "--out", str(out)], check=True)
    return out


def refine_and_score(group: str, extra: list[str]) -> dict:
    """Refine the group's set with the small set's options and --sym group; score map, poses and reported figure."""
    d = make_set(group)
    (d / "Refine3D").mkdir(exist_ok=True)
    for f in (d / "Refine3D").glob("run[_.]*"):        # a fresh run: run.out is appended to otherwise
        f.unlink()
    cmd = [sys.executable, "-m", "cryorefine", "refine", "--i", "particles.star", "--ref", "reference.mrc",
           "--o", "Refine3D/run", "--ini_high", "50", "--sym", group, "--particle_diameter", "150", "--quiet", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=d, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"group": group, "error": proc.stderr[-2000:]}
    log = (d / "Refine3D" / "run.out").read_text()
    final = [ln for ln in log.splitlines() if "Final resolution (without masking) is:" in ln]
    score = subprocess.run([sys.executable, str(BENCH / "score.py"), "--map", "Refine3D/run_class001.mrc", "--truth",
                            "truth.mrc", "--mask", "mask.mrc", "--data", "Refine3D/run_data.star", "--truth-star",
                            "truth.star", "--sym", group], cwd=d, capture_output=True, text=True)
    s = json.loads(score.stdout.strip().splitlines()[-1])
    truth = reconstruct_and_score(d, d / "Refine3D" / "truepose.mrc", group)
    return {"group": group, "order": len(symmetry_matrices(group)), "wall_s": round(wall, 1),
            "iterations": len(re.findall(r"Iteration \d+ took", log)),
            "reported_A": float(final[-1].split()[-1]) if final else None,
            "fsc05_A": s["fsc05_A"], "fsc05_masked_A": s["fsc05_masked_A"], "ang_median_deg": s["ang_median_deg"],
            "off_median_A": s["off_median_A"], "truepose_fsc05_masked_A": truth.get("fsc05_masked_A"),
            "truepose_fsc05_A": truth.get("fsc05_A"), "command": "cryorefine " + " ".join(cmd[3:])}


def main(argv: list[str]) -> int:
    lead = next((i for i, a in enumerate(argv) if a.startswith("-")), len(argv))
    groups, extra = argv[:lead] or ["C5", "T", "O", "I2"], argv[lead:]
    rows = [refine_and_score(g, extra) for g in groups]
    out = Path(__file__).resolve().parent / "results" / "point_groups.json"
    out.write_text(json.dumps(rows, indent=1) + "\n")
    print("| group | order | wall | iterations | reported | FSC 0.5 vs truth, masked / unmasked | true poses, "
          "masked / unmasked | median angular / offset error |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['group']} | failed: {r['error'].splitlines()[-1] if r['error'] else ''} |")
            continue
        print(f"| {r['group']} | {r['order']} | {r['wall_s']:.0f} s | {r['iterations']} | {r['reported_A']:.2f} Å | "
              f"{r['fsc05_masked_A']:.2f} / {r['fsc05_A']:.2f} Å | {r['truepose_fsc05_masked_A']:.2f} / "
              f"{r['truepose_fsc05_A']:.2f} Å | {r['ang_median_deg']:.2f}° / {r['off_median_A']:.2f} Å |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
