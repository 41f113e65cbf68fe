#!/usr/bin/env bash
# One GPU, about 10 minutes: fib25 decimated x8, `d2r run` end to end with the full-size presets
# (what `auto` picks on a GPU), scored on the whole volume by `d2r evaluate`. The table goes to
# benchmarks/results/quality_fib25_gpu_<card>.md (and .json), named after the card.
#
#   bash benchmarks/gpu_quality.sh            # needs ../shared/data/fib25_sample1_10nm.tif
set -euo pipefail
cd "$(dirname "$0")/.."
card=$(python -c "import torch; assert torch.cuda.is_available(), 'no GPU'; \
print(torch.cuda.get_device_name().split()[-1].lower().replace('-', ''))")
python benchmarks/bench_quality.py --factors 8 --device cuda --serial --fresh \
    --tag "_gpu_${card}" --work "${TMPDIR:-/tmp}/d2r-gpu-quality" "$@"
