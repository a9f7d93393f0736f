"""What the halves of a pure-noise refinement share by construction, measured with many images in one iteration.

A chance FSC between independent half maps has a spread set by the voxels of a shell, whatever the number of images;
a part the halves share by construction (an expectation the alignment gives both halves' sums) grows with it, as
N·μ² against σ². So one iteration of a finished noise run is continued (`--continue` from iteration N, the run's
references, sampling and counters) on a fresh noise set of many images (the `noise` set's simulator options, other
seed and size), and the gold-standard FSC of that iteration is read beyond the 40 Å join shell + 2 (from
`_model.star` when N is the run's second-to-last iteration, so that the continued one is the final, joined iteration
with data to Nyquist, as in issue 13's check; else from `_itN+1_half1_model.star`). `--no_particle_mask` runs the
same iteration with the likelihood's images left unmasked (a diagnostic, not an option of `cryorefine refine`): the
alignment then sees an image's frequencies beyond the references' band only through the zero-filled pre-shift.

    python bench/bench_noise_shared.py data/noise/Refine3D/sh_s2 8 --n 4000
    python bench/bench_noise_shared.py data/noise/Refine3D/sh_s2 8 --n 4000 --no_particle_mask

Prints the FSC per shell and issue 13's mean beyond the join shell + 2; writes
bench/results/noise_shared_<root>_it<N>_n<n>[_no_particle_mask].json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench_noise import chance_checks, final_fsc  # noqa: E402
from bench.bench_noise_null import continued_copy, fresh_noise  # noqa: E402
from bench.standard_sets import DATA  # noqa: E402


def enlarged_copy(root: Path, iteration: int, dest: Path, stack: Path, n: int) -> tuple[Path, Path]:
    """root's iteration files in dest (bench_noise_null.continued_copy), the data file cycled to n rows (poses, CTF,
    half and group of row i % n0) whose images are the n images of `stack`; returns (optimiser file, data file)."""
    import starfile
    opt = continued_copy(root, iteration, dest, stack)
    data = opt.with_name(opt.name.replace("_optimiser.star", "_data.star"))
    blocks = starfile.read(data, always_dict=True)
    parts = blocks["particles"]
    if n < len(parts):       # fewer rows would drop groups the continued model has
        sys.exit(f"--n {n}: at least the run's {len(parts)} particles are needed")
    big = parts.iloc[np.arange(n) % len(parts)].reset_index(drop=True)
    big["rlnImageName"] = [f"{i + 1:06d}@{stack.resolve()}" for i in range(n)]
    blocks["particles"] = big
    starfile.write(blocks, data, overwrite=True)
    return opt, data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path, help="output root of a noise run, e.g. data/noise/Refine3D/sh_s2")
    p.add_argument("iteration", type=int, help="the iteration to continue from (not the run's last)")
    p.add_argument("--n", type=int, default=4000, help="images in the fresh noise set")
    p.add_argument("--seed", type=int, default=201, help="simulator seed of the fresh set")
    p.add_argument("--no_particle_mask", action="store_true", help="leave the likelihood's images unmasked")
    p.add_argument("--j", type=int, default=2)
    a = p.parse_args()
    tag = f"{a.root.name}_it{a.iteration:03d}_n{a.n}" + ("_no_particle_mask" if a.no_particle_mask else "")
    work = DATA / "noise_shared"
    stack = fresh_noise(work / f"set{a.seed}_n{a.n}", a.seed, a.n)
    dest = work / tag
    shutil.rmtree(dest, ignore_errors=True)
    opt, data = enlarged_copy(a.root, a.iteration, dest, stack, a.n)
    if a.no_particle_mask:
        import cryorefine.refine.data as prepared
        prepared.mask_particles = lambda images, radius_px, edge_px, fill="mean": np.asarray(images, np.float32)
    from cryorefine.cli import main as cli_main
    rc = cli_main(["refine", "--continue", str(opt), "--i", str(data), "--o", str(dest / a.root.name),
                   "--auto_iter_max", str(a.iteration + 1), "--j", str(a.j)])
    if rc:
        sys.exit(f"the continued iteration failed (exit {rc}); see {dest / a.root.name}.out")
    final = dest / f"{a.root.name}_model.star"          # written when the continued iteration was the final one
    fsc = final_fsc(final if final.exists() else dest / f"{a.root.name}_it{a.iteration + 1:03d}_half1_model.star")
    chk = chance_checks(fsc, 64, 2.5)
    print("FSC shells 1-32:", np.round(fsc[1:], 3).tolist())
    print(json.dumps(chk))
    out = Path(__file__).parent / "results" / f"noise_shared_{tag}.json"
    out.write_text(json.dumps({"root": str(a.root), "iteration": a.iteration, "n": a.n, "seed": a.seed,
                               "no_particle_mask": a.no_particle_mask, "fsc": [round(float(x), 4) for x in fsc],
                               **chk}, indent=1))


if __name__ == "__main__":
    main()
