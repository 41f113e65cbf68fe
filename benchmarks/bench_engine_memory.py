"""Engine memory: peak RSS of workers and scheduler for a volume 1x and 8x larger, same block.

Memory per worker should depend on the block (read box, model activations, output
block), not on the volume; the scheduler's on the window of tasks in flight, not on
the number of blocks. Both volumes are synthetic (``d2r_dask.data.synth``) and stored on
disk; the large job's output (float32, ``scale_z`` times more slices) is larger than
the memory limit given to each worker, so a result that piled up in a worker would
show (or get the worker killed).

RSS is sampled every 0.25 s from a client thread: ``client.run`` on the workers,
``client.run_on_scheduler`` on the scheduler. Goal: peak(8x) / peak(1x) <= 1.2.

    python benchmarks/bench_engine_memory.py                 # small defaults, a few minutes
    python benchmarks/bench_engine_memory.py --shape 64 512 512 --block 16 128 128 --memory-limit 1GiB
"""

from __future__ import annotations

import argparse
import math
import time

from _bench import RssSampler, cluster_options, local_cluster, machine_info, params, print_table, save
from _bench import synthetic_volume


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, default=(48, 256, 256), help="the 1x volume (z y x); 8x doubles each")
    ap.add_argument("--block", type=int, nargs=3, default=(16, 64, 64))
    ap.add_argument("--scale-z", type=int, default=8, help="output slices per input slice")
    cluster_options(ap, memory_limit="640MiB", workdir="d2r-bench",
                    memory_help="per worker (dask pauses a worker at 80%%)")
    args = ap.parse_args()

    from dask.utils import parse_bytes

    from d2r_dask.blockwise.scheduler import run_blockwise
    from d2r_dask.blockwise.processors import ModelSpec

    info = machine_info()
    args.workdir.mkdir(parents=True, exist_ok=True)
    spec = ModelSpec("conv3d", options={"scale_z": args.scale_z})
    rows = []
    limit_mib = parse_bytes(args.memory_limit) / 2**20
    with local_cluster(args) as client:
        for factor in (1, 8):
            shape = tuple(n * (2 if factor == 8 else 1) for n in args.shape)
            t0 = time.perf_counter()
            src = synthetic_volume(args.workdir / f"memory-{'x'.join(map(str, shape))}.zarr", shape)
            print(f"{factor}x input {shape} ready in {time.perf_counter() - t0:.1f}s", flush=True)
            client.restart()  # the same fresh start for both sizes
            out = args.workdir / f"memory-out-{factor}x.zarr"
            t0 = time.perf_counter()
            with RssSampler(client) as rss:
                run_blockwise(src, out, spec, block=tuple(args.block), halo=(2, 2, 2), scale=(args.scale_z, 1, 1),
                              out_dtype="float32", client=client, overwrite=True, progress=False)
            seconds = time.perf_counter() - t0
            out_mib = math.prod(shape) * args.scale_z * 4 / 2**20
            rows.append({"volume": f"{factor}x", "input shape": "x".join(map(str, shape)),
                         "blocks": math.prod(-(-n // b) for n, b in zip(shape, args.block)),
                         "output MiB": out_mib, "worker limit MiB": limit_mib, "seconds": seconds,
                         **rss.summary()})
            print(rows[-1], flush=True)
    for key in ("worker_peak_mib", "scheduler_peak_mib"):
        rows.append({"volume": "8x / 1x", key: rows[1][key] / rows[0][key]})
    print(f"\nblock {tuple(args.block)}, scale_z {args.scale_z}, {args.workers} workers x {args.memory_limit}")
    print_table(rows, ["volume", "input shape", "blocks", "output MiB", "worker limit MiB", "seconds",
                       "worker_start_mib", "worker_peak_mib", "scheduler_peak_mib", "samples"])
    print("(LocalCluster runs the scheduler inside the client process: its RSS includes the client)")
    save("bench_engine_memory", {"machine": info, "params": params(args), "rows": rows,
                                 "goal": "peak RSS ratio 8x / 1x <= 1.2 (workers and scheduler)"})


if __name__ == "__main__":
    main()
