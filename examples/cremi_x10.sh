#!/usr/bin/env bash
# A real, natively anisotropic input: CREMI serial-section TEM, 4 x 4 nm in XY, 40 nm sections (x10).
# No isotropic ground truth exists for it: inspect the result visually (see viewing.md).
# Usage: bash examples/cremi_x10.sh [DATA_DIR] [OUT_DIR]
set -euo pipefail
DATA=${1:-../shared/data}
OUT=${2:-cremi-x10}
mkdir -p "$OUT"
d2r convert "$DATA/cremi_lr_4x4x40nm.tif" "$OUT/lr.zarr" --voxel-size 40 4 4 --overwrite
d2r info "$OUT/lr.zarr"
d2r run "$OUT/lr.zarr" "$OUT/sr.zarr" --factor 10 --mode mean --workdir "$OUT/work" \
    --restorer-steps 3000 --dgean-steps 3000
d2r info "$OUT/sr.zarr"
