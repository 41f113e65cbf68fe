"""Per-block scheduling overhead: the engine with a no-op model over >= 10^4 tiny blocks.

With ``noop`` the model costs nothing, so the wall time per block is what the
engine adds: planning on the client, task submission in a sliding window, the
scheduler, a Zarr read and a Zarr write per block (or per row of blocks in a
group) and a done-marker per task. For comparison, ``dask-baseline`` runs trivial
Python tasks through the same sliding window on the same cluster: the floor that
dask.distributed itself sets per task on this machine. Connectomics blockwise
schedulers report a few tens of microseconds per block (a Rust-cored one ~34 us
with 4 workers, on its own machine); ``group`` amortises the per-task cost.

``--groups`` takes blocks per task, or ``auto`` for the engine's default
(:func:`~d2r_dask.blockwise.layout.default_group`; these tiny blocks go to the model in
batches of ``default_batch``, so a read decodes an input chunk once for many blocks). Reported per
block: the wall time, and the scheduling overhead -- the wall time in which the workers were
not inside a task (wall minus the workers' task time over the workers).

Also timed: planning a 10^5-block job on the client (layout, done-marker scan,
the lazy list of tasks), which must not stall whatever the volume size.

    python benchmarks/bench_engine_scheduling.py                 # ~10^4 blocks, a few minutes
    python benchmarks/bench_engine_scheduling.py --groups 1 64 256 --shape 100 200 200
    python benchmarks/bench_engine_scheduling.py --groups 100 auto --shape 100 160 200   # 10^5 blocks
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from _bench import machine_info, print_table, save, synthetic_volume


def _one(i: int) -> int:
    return 1


def dask_baseline(client: Any, n: int, window: int) -> float:
    """Seconds for ``n`` trivial tasks through a sliding window of ``window``."""
    from distributed import as_completed

    it = iter(range(n))
    t0 = time.perf_counter()
    ac = as_completed([client.submit(_one, next(it), pure=False) for _ in range(min(window, n))])
    for fut in ac:
        fut.release()
        i = next(it, None)
        if i is not None:
            ac.add(client.submit(_one, i, pure=False))
    return time.perf_counter() - t0


def plan_seconds(workdir: Path, n_blocks: int) -> dict[str, float]:
    """Client-side planning for ``n_blocks`` blocks: layout, marker scan, task ids."""
    from d2r_dask.blockwise.jobstate import Job, done_groups
    from d2r_dask.blockwise.layout import Layout
    from d2r_dask.io.geometry import Box
    from d2r_dask.blockwise.processors import ModelSpec

    side = round(n_blocks ** (1 / 3))
    t0 = time.perf_counter()
    layout = Layout(roi=Box((0, 0, 0), (side * 4,) * 3), block=(4, 4, 4), halo=(0, 0, 0))
    job = Job("src", str(workdir / "plan.zarr"), ModelSpec("noop"), layout, "uint8")
    done = done_groups(job, "write")
    todo = [g for g in range(layout.n_groups) if g not in done]
    blocks = [layout.group_blocks(g) for g in todo[:: max(1, len(todo) // 1000)]]
    return {"blocks": layout.n_blocks, "seconds": time.perf_counter() - t0, "sampled_groups": len(blocks)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, default=(50, 80, 80), help="input volume (z y x)")
    ap.add_argument("--block", type=int, nargs=3, default=(2, 4, 4))
    ap.add_argument("--groups", nargs="+", default=("1", "20", "100", "auto"), help="blocks per task to try (or auto)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--baseline-tasks", type=int, default=2000)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "d2r-bench")
    args = ap.parse_args()

    from distributed import Client, LocalCluster

    from d2r_dask.blockwise.layout import default_group
    from d2r_dask.blockwise.runtime import worker_stats
    from d2r_dask.blockwise.scheduler import run_blockwise
    from d2r_dask.blockwise.processors import ModelSpec

    info = machine_info()
    args.workdir.mkdir(parents=True, exist_ok=True)
    shape, block = tuple(args.shape), tuple(args.block)
    src = synthetic_volume(args.workdir / f"sched-{'x'.join(map(str, shape))}.zarr", shape, chunks=(16, 80, 80))
    n_blocks = math.prod(-(-n // b) for n, b in zip(shape, block))
    spec = ModelSpec("noop")
    rows = []
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                      memory_limit=None) as cluster, Client(cluster) as client:
        window = 4 * args.workers
        t = dask_baseline(client, args.baseline_tasks, window)
        rows.append({"config": "dask-baseline (trivial tasks)", "blocks": args.baseline_tasks,
                     "tasks": args.baseline_tasks, "seconds": t, "us/block": t / args.baseline_tasks * 1e6,
                     "us/task": t / args.baseline_tasks * 1e6})
        print(rows[-1], flush=True)
        for name in args.groups:
            group = default_group(shape, block) if name == "auto" else int(name)
            shutil.rmtree(args.workdir / "sched-out.zarr", ignore_errors=True)  # not timed: 10^5 chunk files
            before = client.run(worker_stats)
            t0 = time.perf_counter()
            run_blockwise(src, args.workdir / "sched-out.zarr", spec, block=block, halo=(0, 0, 0),
                          group=None if name == "auto" else group, client=client, overwrite=True, progress=False)
            t = time.perf_counter() - t0
            after = client.run(worker_stats)
            per_worker = [after[w]["blocks"] - before[w]["blocks"] for w in after]
            stage = {k: sum(after[w]["seconds"].get(k, 0) - before[w]["seconds"].get(k, 0) for w in after)
                     for k in ("read", "model", "write", "marker", "task")}
            tasks = -(-n_blocks // group)
            rows.append({"config": f"engine noop, group {group}{' (auto)' if name == 'auto' else ''}",
                         "blocks": n_blocks, "tasks": tasks, "seconds": t,
                         "us/block": t / n_blocks * 1e6, "us/task": t / tasks * 1e6,
                         "scheduling us/block": (t - stage["task"] / args.workers) / n_blocks * 1e6,
                         "blocks per worker": "/".join(map(str, per_worker)),
                         **{f"{k} us/block": v / n_blocks * 1e6 for k, v in stage.items()}})
            print(rows[-1], flush=True)
    plan = plan_seconds(args.workdir, 100_000)
    load_end = list(os.getloadavg())
    print(f"\nvolume {shape}, block {block}, {args.workers} workers x 1 thread; window {4 * args.workers} tasks; "
          f"load average at start {info['load_average_at_start']}, at end {load_end}")
    cols = ["config", "blocks", "tasks", "seconds", "us/block", "us/task", "scheduling us/block", "blocks per worker",
            "read us/block", "write us/block", "marker us/block"]
    print_table(rows, cols)
    print(f"planning a {plan['blocks']}-block job on the client: {plan['seconds'] * 1e3:.0f} ms")
    save("bench_engine_scheduling", {"machine": {**info, "load_average_at_end": load_end}, "params": {k: str(v) if isinstance(v, Path) else v
                                                                  for k, v in vars(args).items()},
                                     "rows": rows, "planning_1e5_blocks": plan,
                                     "reference": "a Rust-cored blockwise scheduler reports ~34 us/block, 4 workers"})


if __name__ == "__main__":
    main()
