#!/usr/bin/env bash
# The EPFL hippocampus FIB-SEM crop, already reduced x8 along z (5 x 5 x 40 nm): the D2R paper's other data set.
# Usage: bash examples/epfl_x8.sh [DATA_DIR] [OUT_DIR]
set -euo pipefail
DATA=${1:-../shared/data}
OUT=${2:-epfl-x8}
mkdir -p "$OUT"
d2r convert "$DATA/epfl_lr_5x5x40nm.tif" "$OUT/lr.zarr" --voxel-size 40 5 5 --overwrite
d2r run "$OUT/lr.zarr" "$OUT/sr.zarr" --factor 8 --workdir "$OUT/work" --dry-run
d2r run "$OUT/lr.zarr" "$OUT/sr.zarr" --factor 8 --workdir "$OUT/work" --restorer-steps 3000 --dgean-steps 3000
