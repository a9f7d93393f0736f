"""The part of a pure-noise refinement's FSC that the halves share, separated from chance by a sign flip.

Two full refinements (default options, `bench_refine`'s settings) of the `noise` set with explicit alternating
halves: the images as they are, and with every half-1 image's Fourier components beyond |k| = R negated, an equally
likely image set for stationary Gaussian noise. Beyond the references' band a part of the FSC that comes from the
images' sign (chance) changes sign with the flip; a part the halves share does not. So (FSC_a + FSC_b)/2 estimates
the shared part and (FSC_a − FSC_b)/2 the chance part, shell by shell, as far as the two runs took the same poses
(the particle mask, the zero-filled pre-shift and solvent flattening mix frequencies, so they need not:
`tests/test_noise_sign_symmetry.py` replaces the first two and switches off the third to make them exact).

    python bench/bench_noise_flip.py --random_seed 0 --j 1

Prints both parts beyond the 40 Å join shell + 2 and writes bench/results/noise_flip_s<seed>.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench_noise import chance_checks, final_fsc  # noqa: E402
from bench.standard_sets import DATA, ensure_set  # noqa: E402

R_FLIP = 6.0     # |k| (Fourier px of the box) beyond which half 1's image components are negated


def flipped_copy(star: Path, stack: Path, dest: Path, r_flip: float = R_FLIP) -> Path:
    """A copy of `star` (images 1..n of `stack`, rlnRandomSubset set) whose half-1 images have their Fourier
    components beyond r_flip (Fourier px of the box) negated, as dest/flipped.mrcs and dest/flipped.star."""
    import starfile

    from cryorefine.fourier.transforms import freq_radius, irfft2_centered, rfft2_centered
    from cryorefine.io.mrc import open_stack, read_header, write_stack
    blocks = starfile.read(star, always_dict=True)
    parts = blocks["particles"].copy()
    imgs = np.array(open_stack(stack)[:len(parts)], dtype=np.float64)
    n = imgs.shape[-1]
    ft = rfft2_centered(imgs)
    half1 = parts["rlnRandomSubset"].to_numpy() == 1
    ft[half1] = ft[half1] * np.where(freq_radius((n, n)) > r_flip, -1.0, 1.0)
    write_stack(dest / "flipped.mrcs", irfft2_centered(ft, n).astype(np.float32), read_header(stack).angpix)
    parts["rlnImageName"] = [f"{i + 1:06d}@{dest / 'flipped.mrcs'}" for i in range(len(parts))]
    starfile.write({"optics": blocks["optics"], "particles": parts}, dest / "flipped.star")
    return dest / "flipped.star"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--random_seed", type=int, default=0)
    p.add_argument("--j", type=int, default=1, help="threads per run (the two runs go at once)")
    a = p.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from conftest import write_subset
    noise = ensure_set("noise")
    work = DATA / "noise_flip" / f"s{a.random_seed}"
    work.mkdir(parents=True, exist_ok=True)
    star = write_subset(noise, 1000, work / "noise.star", alternate_halves=True)
    flipped = flipped_copy(star, noise / "particles.mrcs", work)

    def run(tag_star):
        tag, s = tag_star
        cmd = [sys.executable, "-m", "cryorefine", "refine", "--i", str(s), "--ref", str(noise / "reference.mrc"),
               "--o", str(work / tag), "--ini_high", "50", "--sym", "D2", "--particle_diameter", "150",
               "--random_seed", str(a.random_seed), "--j", str(a.j)]
        return subprocess.run(cmd, capture_output=True, text=True)

    with ThreadPoolExecutor(2) as pool:
        procs = list(pool.map(run, [("a", star), ("b", flipped)]))
    for proc in procs:
        if proc.returncode:
            sys.exit(f"a refinement failed:\n{proc.stderr[-2000:]}")
    fa, fb = final_fsc(work / "a_model.star"), final_fsc(work / "b_model.star")
    first = chance_checks(fa, 64, 2.5)["first_shell"]
    shared, chance = (fa + fb) / 2, (fa - fb) / 2
    row = {"seed": a.random_seed, "checks_a": chance_checks(fa, 64, 2.5), "checks_b": chance_checks(fb, 64, 2.5),
           "shared_mean": float(shared[first:].mean()), "chance_mean": float(chance[first:].mean()),
           "shared_rms": float(np.sqrt((shared[first:] ** 2).mean())),
           "chance_rms": float(np.sqrt((chance[first:] ** 2).mean())),
           "fsc_a": [round(float(x), 4) for x in fa], "fsc_b": [round(float(x), 4) for x in fb]}
    print(f"shells {first}-{len(fa) - 1}: shared (a+b)/2 mean {row['shared_mean']:.3f} rms {row['shared_rms']:.3f}; "
          f"chance (a-b)/2 mean {row['chance_mean']:.3f} rms {row['chance_rms']:.3f}")
    print("shared per shell:", np.round(shared[first:], 3).tolist())
    print("checks a / b:", row["checks_a"], row["checks_b"])
    out = Path(__file__).parent / "results" / f"noise_flip_s{a.random_seed}.json"
    out.write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
