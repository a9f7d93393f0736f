#!/usr/bin/env bash
# GPU benchmark on a fresh machine with a GPU and PyTorch but without this project's other dependencies.
#
# Prepare on the development machine (once), in the repository root:
#   echo /.whl/ >> .git/info/exclude; echo /.bench_shared/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl mrcfile==1.5.4 starfile==0.5.13 \
#       mpi4py==4.1.2 mpich==5.0.2
#   mkdir -p .bench_shared && cp -r ../shared/bench .bench_shared/
# then run this script there with .whl and .bench_shared carried:  bash bench/gpu_bench.sh [BUDGET_S]
# It installs the wheels, makes the small, medium and tutorial sets, refines each with --gpu, scores them and
# writes $OUT/gpu_bench.json and $OUT/gpu_bench.md (the table for docs/benchmarks.md).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        $(ls .whl/*.whl | grep -v '/mpich-') || exit 1
    export PYTHONPATH=/tmp/site:$PWD
    if ls .whl/mpich-*.whl >/dev/null 2>&1; then
        # --prefix keeps the wheel's lib/ (--target drops it); mpi4py must load this MPICH, not a system MPI,
        # or each rank started by this mpiexec runs alone (cryorefine then stops with an error)
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --ignore-installed --prefix /tmp/mpich \
            .whl/mpich-*.whl || exit 1
        export PATH=/tmp/mpich/bin:$PATH MPI4PY_LIBMPI=/tmp/mpich/lib/libmpi.so.12
    fi
else
    export PYTHONPATH=$PWD
fi
export CRYOREFINE_SHARED=${CRYOREFINE_SHARED:-$PWD/.bench_shared}
export CRYOREFINE_DATA=${CRYOREFINE_DATA:-/tmp/cryorefine_data}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
python3 bench/gpu_bench.py --out "$OUT" --budget "${1:-540}" --gpu "${GPU_BENCH_GPU:-}" ${GPU_BENCH_SETS:+--sets $GPU_BENCH_SETS} 2>&1 | tee "$OUT/gpu_bench.log"
for d in "$CRYOREFINE_DATA"/*/; do
    name=$(basename "$d")
    for f in "$d"/Refine3D/bench_gpu*.out; do
        [ -f "$f" ] && cp "$f" "$OUT/${name}_$(basename "$f")"
    done
done
exit 0
