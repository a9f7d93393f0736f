"""Do the final `_unfil` half maps correlate beyond what the halves share by construction? FSC of the two maps (as
`postprocess` and any reader computes it) against the gold-standard FSC of `_model.star`, and postprocess's answer.

The final iteration of a finished run is made again (`--continue` from its second-to-last iteration, with the code
as it is now), then per shell: the FSC of the two `_unfil` maps, the FSC of `_model.star`; and `cryorefine
postprocess` of the new maps with MASK.

    python bench/bench_unfil.py data/noise/Refine3D/sh_s2 8 data/small/mask.mrc
    python bench/bench_unfil.py data/small/Refine3D/run 14 data/small/mask.mrc

Writes bench/results/unfil_<set>_<root>.json.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import starfile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cryorefine.fourier.fsc import fsc  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", help="output root of a finished refinement, e.g. data/noise/Refine3D/sh_s2")
    ap.add_argument("iteration", type=int, help="its second-to-last iteration (the final one is made again)")
    ap.add_argument("mask", help="mask for postprocess")
    ap.add_argument("--j", type=int, default=2)
    args = ap.parse_args()
    root = Path(args.root).resolve()
    new = root.parent / f"{root.name}_unfil"
    for f in root.parent.glob(f"{new.name}*"):
        f.unlink()
    opt = root.parent / f"{root.name}_it{args.iteration:03d}_optimiser.star"
    subprocess.run([sys.executable, "-m", "cryorefine", "refine", "--continue", str(opt), "--o", str(new),
                    "--j", str(args.j), "--quiet"], check=True, cwd=root.parent.parent, stdout=subprocess.DEVNULL)
    halves = [mrcfile.read(f"{new}_half{h}_class001_unfil.mrc").astype(np.float64) for h in (1, 2)]
    fsc_maps = fsc(*halves)
    fsc_model = starfile.read(f"{new}_model.star")["model_class_1"]["rlnGoldStandardFsc"].to_numpy()
    pp = new.parent / f"{new.name}_postprocess"
    out = subprocess.run([sys.executable, "-m", "cryorefine", "postprocess", "--i",
                          f"{new}_half1_class001_unfil.mrc", "--mask", str(Path(args.mask).resolve()), "--o",
                          str(pp)], check=True, capture_output=True, text=True).stdout
    final = float(re.search(r"FINAL RESOLUTION: ([0-9.]+)", out).group(1))
    beyond = slice(7, len(fsc_maps))
    result = {"root": str(root), "iteration": args.iteration + 1, "mask": args.mask,
              "fsc_unfil_maps": np.round(fsc_maps, 4).tolist(), "fsc_model": np.round(fsc_model, 4).tolist(),
              "mean_beyond_shell_7_maps": float(fsc_maps[beyond].mean()),
              "mean_beyond_shell_7_model": float(fsc_model[beyond].mean()), "postprocess_resolution": final}
    print(f"FSC of the _unfil maps, shells 3-20: {np.round(fsc_maps[3:21], 2)}")
    print(f"FSC of _model.star,     shells 3-20: {np.round(fsc_model[3:21], 2)}")
    print(f"mean beyond shell 7: maps {result['mean_beyond_shell_7_maps']:.3f}, "
          f"model {result['mean_beyond_shell_7_model']:.3f}; postprocess: {final:.2f} A")
    dest = ROOT / "bench" / "results" / f"unfil_{root.parent.parent.name}_{root.name}.json"
    dest.write_text(json.dumps(result, indent=1))
    print(dest)


if __name__ == "__main__":
    main()
