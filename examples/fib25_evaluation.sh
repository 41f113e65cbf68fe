#!/usr/bin/env bash
# The evaluation protocol of D2R.md on real FIB-SEM: degrade the isotropic fib25 crop by 4 along z,
# run the pipeline on the LR only, score against the ground truth.
set -euo pipefail
DATA=${1:-../shared/data}
OUT=${2:-fib25-x4}
mkdir -p "$OUT"
d2r convert "$DATA/fib25_sample1_10nm.tif" "$OUT/gt.zarr" --voxel-size 10 10 10 --overwrite
d2r degrade "$OUT/gt.zarr" "$OUT/lr.zarr" --factor 4 --mode decimate --overwrite
d2r run "$OUT/lr.zarr" "$OUT/sr.zarr" --factor 4 --workdir "$OUT/work"
d2r evaluate "$OUT/sr.zarr" "$OUT/gt.zarr" --lr "$OUT/lr.zarr" --pseudo-hr "$OUT/work/pseudo_hr.zarr" --out "$OUT/report"
