"""Engine overhead: blockwise on Dask vs a bare PyTorch loop over the same blocks.

The bare loop is the floor: the whole volume in memory, reflect-padded once, the
same blocks (full size, halo included) through the same model, results copied
into a numpy array; one process with the machine's cores as torch threads. The
engine does the same work plus Zarr reads and writes, done-markers and (on a
cluster) task scheduling, with the same total number of threads:

* ``engine-serial``: one process, ``cores`` torch threads;
* ``engine-cluster``: a LocalCluster of ``workers`` processes x 1 task, torch
  threads = cores / workers each;
* ``engine-cluster, no overlap``: the same with each task's reads, model and writes one
  after the other (``RUNTIME.overlap = False``): what the pipelined block loop gains.

The engine reads the zstd-compressed input and writes a zstd-compressed output (the
default codec), so the ratios include real decompression and compression; ``--out-dtype
uint8`` writes what Stage IV writes. The engine runs with its default blocks per task
(``--group``) unless given; the bare loop runs the engine's model batches.

Reported: throughput (input voxels per second) and its ratio to the bare loop.
Each configuration runs ``--repeats`` times, interleaved (the machine may be
shared); the best run counts.

    python benchmarks/bench_engine_overhead.py               # small defaults, a few minutes
    python benchmarks/bench_engine_overhead.py --shape 128 512 512 --block 32 128 128
    python benchmarks/bench_engine_overhead.py --out-dtype uint8   # saved as bench_engine_overhead_uint8
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from _bench import machine_info, print_table, save, synthetic_volume


def _set_overlap(flag: bool) -> None:
    from d2r_dask.blockwise.runtime import RUNTIME

    RUNTIME.overlap = flag


def bare_loop(src: Path, spec: Any, block: tuple, halo: tuple, group: int, threads: int) -> float:
    """The same blocks through the same model in a plain loop; seconds (model loaded before)."""
    import torch

    from d2r_dask.blockwise.layout import Layout
    from d2r_dask.io.geometry import Box
    from d2r_dask.blockwise.processors import load_processor
    from d2r_dask.io.volume import open_volume

    torch.set_num_threads(threads)
    proc = load_processor(spec)
    t0 = time.perf_counter()
    data = open_volume(src).values.astype(np.float32)
    layout = Layout(roi=Box((0, 0, 0), data.shape), block=block, halo=halo, group=group)
    padded = np.pad(data, [(h, h + b) for h, b in zip(halo, block)], mode="reflect")
    out = np.empty(data.shape, dtype=np.float32)
    for gid in range(layout.n_groups):
        starts = [tuple(i * b for i, b in zip(index, block)) for index in layout.group_blocks(gid)]
        batch = np.stack([padded[tuple(slice(a, a + b + 2 * h) for a, b, h in zip(s, block, halo))] for s in starts])
        pred = proc(batch, starts)
        for s, p in zip(starts, pred):
            box = Box(s, tuple(a + b for a, b in zip(s, block))).clip(data.shape)
            out[box.slices] = p[tuple(slice(h, h + n) for h, n in zip(halo, box.shape))]
    return time.perf_counter() - t0


def _time(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, default=(64, 256, 256), help="input volume (z y x)")
    ap.add_argument("--block", type=int, nargs=3, default=(32, 64, 64))
    ap.add_argument("--group", type=int, default=None, help="blocks per task [default: the engine's]")
    ap.add_argument("--batch", type=int, default=None,
                    help="blocks per model call [default: the engine's]")
    ap.add_argument("--out-dtype", default="float32", help="the output's dtype (zstd-compressed)")
    ap.add_argument("--channels", type=int, default=16, help="conv3d width")
    ap.add_argument("--depth", type=int, default=3, help="conv3d layers (receptive field = depth)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "d2r-bench")
    args = ap.parse_args()

    import torch
    from distributed import Client, LocalCluster

    from d2r_dask.blockwise.layout import default_batch, default_group
    from d2r_dask.blockwise.scheduler import run_blockwise
    from d2r_dask.blockwise.processors import ModelSpec

    cores = os.cpu_count() or 1
    info = machine_info()
    args.workdir.mkdir(parents=True, exist_ok=True)
    src = synthetic_volume(args.workdir / f"overhead-{'x'.join(map(str, args.shape))}.zarr", args.shape)
    spec = ModelSpec("conv3d", options={"channels": args.channels, "depth": args.depth})
    halo = (args.depth,) * 3
    block = tuple(args.block)
    n_vox = math.prod(args.shape)
    n_blocks = math.prod(-(-n // b) for n, b in zip(args.shape, block))
    group = args.group or default_group(args.shape, block)
    batch = args.batch or (default_batch(block, halo, group) if args.group is None else group)
    kw: dict[str, Any] = dict(block=block, halo=halo, group=group, batch=batch, out_dtype=args.out_dtype,
                              overwrite=True, progress=False)
    times: dict[str, list[float]] = {"bare-loop": [], "engine-serial": [], "engine-cluster": [],
                                     "engine-cluster, no overlap": []}
    threads = max(1, cores // args.workers)
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                      memory_limit=None) as cluster, Client(cluster) as client:
        for rep in range(args.repeats + 1):  # round 0 warms caches and loads the models
            t = bare_loop(src, spec, block, halo, batch, cores)
            torch.set_num_threads(cores)
            t_ser = _time(lambda: run_blockwise(src, args.workdir / "ser.zarr", spec, serial=True, **kw))
            t_dist = _time(lambda: run_blockwise(src, args.workdir / "dist.zarr", spec, client=client, **kw))
            client.run(_set_overlap, False)
            t_plain = _time(lambda: run_blockwise(src, args.workdir / "plain.zarr", spec, client=client, **kw))
            client.run(_set_overlap, True)
            if rep:
                times["bare-loop"].append(t)
                times["engine-serial"].append(t_ser)
                times["engine-cluster"].append(t_dist)
                times["engine-cluster, no overlap"].append(t_plain)
            print(f"round {rep}{' (warm-up)' if not rep else ''}: bare {t:.2f}s, serial {t_ser:.2f}s, "
                  f"cluster {t_dist:.2f}s, cluster without overlap {t_plain:.2f}s", flush=True)
    best = {k: min(v) for k, v in times.items()}
    load_end = list(os.getloadavg())
    layout = {"bare-loop": f"1 x {cores}", "engine-serial": f"1 x {cores}",
              "engine-cluster": f"{args.workers} x {threads}", "engine-cluster, no overlap": f"{args.workers} x {threads}"}
    rows = [{
        "config": name,
        "procs x threads": layout[name],
        "best s": t,
        "all s": " ".join(f"{v:.2f}" for v in times[name]),
        "Mvox/s": n_vox / t / 1e6,
        "ms/block": t / n_blocks * 1e3,
        "ratio vs bare": best["bare-loop"] / t,
    } for name, t in best.items()]
    print(f"\nvolume {tuple(args.shape)}, block {block}, halo {halo}, {n_blocks} blocks, {group} per task in "
          f"batches of {batch}, {args.out_dtype} out (zstd), conv3d {args.channels} ch x {args.depth} layers; "
          f"{cores} cores, load average at start {info['load_average_at_start']}, at end {load_end}")
    print_table(rows, ["config", "procs x threads", "best s", "all s", "Mvox/s", "ms/block", "ratio vs bare"])
    name = "bench_engine_overhead" + ("" if args.out_dtype == "float32" else f"_{args.out_dtype}")
    save(name, {"machine": {**info, "load_average_at_end": load_end},
                "params": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "group": group, "batch": batch, "n_blocks": n_blocks, "rows": rows,
                "goal": "engine-cluster ratio >= 0.90"})


if __name__ == "__main__":
    main()
