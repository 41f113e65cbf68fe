"""Stage II + IV on one multi-GPU node: one Dask worker per GPU with dask-cuda.

    pip install 'd2r-dask[gpu]'
    python multi_gpu_node.py lr.zarr sr.zarr --restorer work/restorer --dgean work/dgean

``LocalCUDACluster`` starts one worker process per visible GPU and pins each to its
device (CUDA_VISIBLE_DEVICES), so every worker loads the model once onto "its" GPU
and runs batched, bf16-autocast blocks. ``d2r infer`` does the same automatically
when dask-cuda is installed and GPUs are present.
"""

from __future__ import annotations

import argparse
import logging

from dask_cuda import LocalCUDACluster
from distributed import Client

from d2r_dask.stages.infer import infer
from d2r_dask.stages.restore import restore

logging.basicConfig(level=logging.INFO)

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("lr")
parser.add_argument("sr")
parser.add_argument("--restorer", help="Stage I checkpoint: also (re)make the pseudo-HR of the whole volume")
parser.add_argument("--dgean", required=True, help="Stage III checkpoint")
args = parser.parse_args()

with LocalCUDACluster(threads_per_worker=1) as cluster, Client(cluster) as client:
    print("dashboard:", client.dashboard_link)
    if args.restorer:
        restore(args.lr, args.sr.replace(".zarr", "") + ".pseudo_hr.zarr", args.restorer,
                block=(32, 128, 256), halo=(4, 16, 16), slice_batch=128, client=client)
    infer(args.lr, args.sr, args.dgean, block=(32, 256, 256), group=4, compile=True, client=client)
