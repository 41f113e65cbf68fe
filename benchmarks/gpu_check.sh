#!/usr/bin/env bash
# One GPU, at most 8 minutes: Stage IV (DGEAN base and full x4, bare model vs the Zarr -> GPU ->
# Zarr pipeline) and Stage II (the restorer with `d2r run`'s GPU defaults), eager and compiled.
# Writes benchmarks/results/gpu_check_<card>.json (benchmarks/bench_gpu_check.py says what is timed).
#
#   bash benchmarks/gpu_check.sh               # a GPU
#   bash benchmarks/gpu_check.sh --cpu-smoke   # tiny, on the CPU: checks that the script works
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec timeout 480 python benchmarks/bench_gpu_check.py "$@"
