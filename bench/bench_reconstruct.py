"""Benchmark `cryorefine reconstruct --ctf --sym D2` on the standard 'medium' set (true poses).

Targets (shared/bench/README.md, RELION 5 relion_reconstruct on the same machine kind: 3.56 / 3.86 Å, 54 s):
FSC 0.5 vs truth ≤ 3.60 Å masked and ≤ 3.90 Å unmasked, wall time < 54 s.

    python bench/bench_reconstruct.py [--set medium] [--extra=--dont_skip_gridding] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.standard_sets import BENCH, ensure_set  # noqa: E402

TARGETS = {"fsc05_masked_A": 3.60, "fsc05_A": 3.90, "seconds": 54.0}


def reconstruct_and_score(data: Path, rec: Path, sym: str = "D2", extra: list[str] | None = None) -> dict:
    """`cryorefine reconstruct --ctf` of a set's true poses (truth.star) into `rec`, scored against the truth:
    {"seconds", **score.py's JSON}, or {"error": ...}."""
    cmd = [sys.executable, "-m", "cryorefine", "reconstruct", "--i", str(data / "truth.star"), "--ctf",
           "--sym", sym, "--o", str(rec), *(extra or [])]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    score = subprocess.run([sys.executable, str(BENCH / "score.py"), "--map", str(rec),
                            "--truth", str(data / "truth.mrc"), "--mask", str(data / "mask.mrc")],
                           capture_output=True, text=True)
    if score.returncode != 0:
        return {"error": score.stderr[-2000:]}
    return {"seconds": round(seconds, 1), **json.loads(score.stdout.strip().splitlines()[-1])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", default="medium", help="standard set name (default medium)")
    ap.add_argument("--sym", default="D2")
    ap.add_argument("--extra", default="", help="extra options for cryorefine reconstruct")
    ap.add_argument("--keep", default=None, help="folder for rec.mrc (default: a temporary one)")
    args = ap.parse_args(argv)

    data = ensure_set(args.set)
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(args.keep or tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        res = reconstruct_and_score(data, out_dir / "rec.mrc", args.sym, shlex.split(args.extra))
    if "error" in res:
        print(res["error"], file=sys.stderr)
        return 1
    result = {"set": args.set, "seconds": res["seconds"], "fsc05_masked_A": res["fsc05_masked_A"],
              "fsc05_A": res["fsc05_A"], "fsc0143_masked_A": res["fsc0143_masked_A"],
              "fsc0143_A": res["fsc0143_A"], "shift_A": res["shift_A"]}
    ok = all(result[k] <= v for k, v in TARGETS.items())
    print(f"reconstruct {args.set}: {result['seconds']:.1f} s; FSC 0.5 masked {result['fsc05_masked_A']:.2f} Å, "
          f"unmasked {result['fsc05_A']:.2f} Å; 0.143 masked {result['fsc0143_masked_A']:.2f} Å, "
          f"unmasked {result['fsc0143_A']:.2f} Å -> {'meets' if ok else 'MISSES'} targets {TARGETS}")
    print(json.dumps({**result, "targets_met": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
