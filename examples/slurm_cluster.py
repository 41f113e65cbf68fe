"""Run Stage IV (or the whole pipeline) on a SLURM cluster through dask-jobqueue.

    pip install 'd2r-dask[hpc]'
    python slurm_cluster.py lr.zarr sr.zarr --model work/dgean --jobs 16

Each SLURM job is one Dask worker with one task slot; torch uses the job's cores.
Add ``--gres=gpu:1`` (job_extra_directives) and ``--device cuda`` style options for
GPU partitions. The run resumes if the allocation ends early: submit it again.
Tune the account/partition/walltime for your site.
"""

from __future__ import annotations

import argparse
import logging

from dask_jobqueue import SLURMCluster
from distributed import Client

from d2r_dask.stages.infer import infer

logging.basicConfig(level=logging.INFO)

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("lr")
parser.add_argument("sr")
parser.add_argument("--model", required=True, help="DGEAN checkpoint folder (d2r train-dgean --out)")
parser.add_argument("--jobs", type=int, default=8)
parser.add_argument("--cores", type=int, default=8)
parser.add_argument("--memory", default="32GB")
parser.add_argument("--walltime", default="04:00:00")
parser.add_argument("--partition", default=None)
args = parser.parse_args()

cluster = SLURMCluster(
    cores=args.cores,
    processes=1,  # one worker per job: the model is loaded once per job and uses all its cores
    memory=args.memory,
    walltime=args.walltime,
    queue=args.partition,
    job_script_prologue=[f"export OMP_NUM_THREADS={args.cores}"],
    worker_extra_args=["--nthreads", "1"],  # one block at a time per worker; torch is multi-threaded inside
)
cluster.scale(jobs=args.jobs)
with Client(cluster) as client:
    print("dashboard:", client.dashboard_link)
    infer(args.lr, args.sr, args.model, block=(32, 256, 256), group=1, client=client)
