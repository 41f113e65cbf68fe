"""Scale: the engine planning and running a no-op model over a virtual multi-terabyte layout.

The input is a real OME-Zarr image of ``--shape`` (default 2048 x 32768 x 32768 uint8,
2.2 TB) whose chunks were never written: reads return its fill value, so no disk is
needed. The output is as large, and its chunks stay unwritten too (a no-op model over
zeros writes only empty chunks, which Zarr skips). With ``--block`` 32 x 256 x 256 that is
~10^6 blocks. Measured, for each ``--groups`` (blocks per task):

* **planning** on the client, over the whole layout: the job's identity (input
  fingerprint from metadata), creating the output, reading the done-state of all its
  groups, and walking the ids of the groups to do -- time and client memory;
* **running**: the same job resumed with all but ``--run-blocks`` blocks recorded done
  (through the engine's own ``mark_done``, as a killed run leaves them), so the run submits
  its tasks over the full 10^6-group layout but only the remainder's data is touched:
  wall time per block, the memory of the process holding the client and the scheduler
  (a LocalCluster's scheduler runs in it) and the number of tasks the scheduler holds
  (sampled), and the engine's scheduling overhead per block: the wall time in which the
  workers were not inside a task (wall minus the workers' task time over the workers),
  per block. The workers are placed once before (:func:`~d2r_dask.blockwise.runtime.configure_workers`,
  which imports torch on each: a few seconds, once per cluster, that a real run amortises).

``--groups`` takes blocks per task, or ``auto`` for the engine's default
(:func:`~d2r_dask.blockwise.layout.default_group` and ``default_batch``).

    python benchmarks/bench_scale.py                     # ~10^6 blocks, a few minutes on 2 cores
    python benchmarks/bench_scale.py --shape 4096 65536 65536 --groups 1 auto 64
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

from _bench import RssSampler, machine_info, print_table, save


def virtual_volume(path: Path, shape: tuple[int, ...], chunks: tuple[int, ...]) -> Path:
    """A finished OME-Zarr image of ``shape`` with no chunk written (reads give zeros)."""
    from d2r_dask.io.geometry import Geometry
    from d2r_dask.io.volume import create_volume, write_multiscales

    create_volume(path, shape=shape, dtype="uint8", geometry=Geometry((8.0, 8.0, 8.0)), chunks=chunks,
                  overwrite=True)
    write_multiscales(path, [])
    return path


def _d2r_tasks(dask_scheduler: Any) -> int:
    return sum(str(key).startswith("d2r-") for key in dask_scheduler.tasks)


def plan(src: Path, out: Path, spec: Any, block: tuple[int, ...], group: int,
         batch: int = 0) -> tuple[Any, dict[str, Any]]:
    """Client-side planning of the whole job (identity, output), timed and traced."""
    from d2r_dask.blockwise.jobstate import Job, job_hash, job_identity, prepare_output
    from d2r_dask.blockwise.layout import Layout
    from d2r_dask.io.geometry import Box, Geometry
    from d2r_dask.io.volume import open_volume

    tracemalloc.start()
    t0 = time.perf_counter()
    vol = open_volume(src)
    layout = Layout(roi=Box((0, 0, 0), tuple(vol.shape)), block=block, halo=(0, 0, 0), group=group, batch=batch)
    identity = job_identity(str(src), spec, layout, "uint8")
    job = Job(str(src), str(out), spec, layout, "uint8", token=job_hash(identity))
    prepare_output(job, identity, Geometry.of(vol), True, None, lambda: None)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return job, {"blocks": layout.n_blocks, "groups": layout.n_groups, "plan_s": time.perf_counter() - t0,
                 "plan_client_peak_mib": peak / 2**20}


def resume_scan(job: Any) -> dict[str, Any]:
    """What a resumed run does first: read (and compact) the done-state of every group and
    walk the ids of those to do; timed and traced."""
    from d2r_dask.blockwise.jobstate import done_flags, todo_groups

    tracemalloc.start()
    t0 = time.perf_counter()
    flags = done_flags(job, "write", job.layout.n_groups)
    n_todo = sum(1 for _ in todo_groups(flags))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    state = job.state_dir / "done"
    return {"todo": n_todo, "resume_scan_s": time.perf_counter() - t0, "resume_scan_peak_mib": peak / 2**20,
            "done_state_bytes": sum(f.stat().st_size for f in state.iterdir()),
            "done_state_files": len(list(state.iterdir()))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, default=(2048, 32768, 32768), help="virtual input (z y x)")
    ap.add_argument("--block", type=int, nargs=3, default=(32, 256, 256))
    ap.add_argument("--groups", nargs="+", default=("1", "auto"), help="blocks per task to try (or auto)")
    ap.add_argument("--run-blocks", type=int, default=2048, help="blocks actually run (the rest recorded done)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "d2r-bench-scale")
    args = ap.parse_args()

    from distributed import Client, LocalCluster

    from d2r_dask.blockwise.jobstate import mark_done
    from d2r_dask.blockwise.layout import default_batch, default_group
    from d2r_dask.blockwise.processors import ModelSpec
    from d2r_dask.blockwise.runtime import configure_workers, worker_stats
    from d2r_dask.blockwise.scheduler import run_blockwise

    info = machine_info()
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    shape, block = tuple(args.shape), tuple(args.block)
    src = virtual_volume(args.workdir / "virtual.zarr", shape, block)
    terabytes = math.prod(shape) / 1e12
    spec = ModelSpec("noop")
    rows: list[dict[str, Any]] = []
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                      memory_limit=None) as cluster, Client(cluster) as client:
        configure_workers(client)  # once per cluster (torch imported on the workers): not a per-block cost
        for name in args.groups:
            group = default_group(shape, block) if name == "auto" else int(name)
            batch = default_batch(block, (0, 0, 0), group) if name == "auto" else 0
            out = args.workdir / f"out-g{group}.zarr"
            job, p = plan(src, out, spec, block, group, batch)
            layout = job.layout
            run_groups = -(-args.run_blocks // group)
            t0 = time.perf_counter()
            for gid in range(layout.n_groups - run_groups):  # a killed run's record: all but the last done
                mark_done(job, "write", gid)
            t_mark = time.perf_counter() - t0
            p.update(resume_scan(job))
            print(f"group {group}: planned {p['blocks']:,} blocks / {p['groups']:,} tasks in {p['plan_s']:.2f} s "
                  f"(client peak {p['plan_client_peak_mib']:.1f} MiB); recorded {layout.n_groups - run_groups:,} "
                  f"done in {t_mark:.1f} s ({t_mark / max(1, layout.n_groups - run_groups) * 1e6:.0f} us each); "
                  f"resume scan {p['resume_scan_s']:.2f} s, {p['done_state_bytes']:,} bytes in "
                  f"{p['done_state_files']} file(s)", flush=True)
            before = client.run(worker_stats)
            in_flight: list[int] = []
            stop = threading.Event()

            def sample() -> None:
                while not stop.is_set():
                    try:
                        in_flight.append(client.run_on_scheduler(_d2r_tasks))
                    except Exception:
                        pass
                    stop.wait(0.05)

            thread = threading.Thread(target=sample, daemon=True)
            with RssSampler(client) as rss:
                thread.start()
                t0 = time.perf_counter()
                run_blockwise(src, out, spec, block=block, halo=(0, 0, 0), group=group, batch=batch or None,
                              out_dtype="uint8", client=client, progress=False)
                wall = time.perf_counter() - t0
                stop.set()
                thread.join()
            after = client.run(worker_stats)
            blocks = sum(after[w]["blocks"] - before[w]["blocks"] for w in after)
            busy = {k: sum(after[w]["seconds"].get(k, 0) - before[w]["seconds"].get(k, 0) for w in after)
                    for k in ("read", "model", "write", "marker", "task")}
            mem = rss.summary()
            written = sum(1 for _ in (out / "0").rglob("*") if _.is_file())  # small: the chunks stay unwritten
            rows.append({
                "group": f"{group} (auto)" if name == "auto" else group, "layout blocks": p["blocks"], "tasks": p["groups"], "TB": round(terabytes, 2),
                "plan s": p["plan_s"], "plan client MiB": p["plan_client_peak_mib"],
                "resume scan s": p["resume_scan_s"], "resume scan MiB": p["resume_scan_peak_mib"],
                "done-state bytes": p["done_state_bytes"], "done-state files": p["done_state_files"],
                "ran blocks": blocks, "run s": wall,
                "ms/block": wall / blocks * 1e3,
                "overhead ms/block": (wall - busy["task"] / args.workers) / blocks * 1e3,
                "marker us/block": busy["marker"] / blocks * 1e6,
                "tasks in flight max": max(in_flight, default=0),
                "client+scheduler MiB first": rss.scheduler[0] / 2**20 if rss.scheduler else float("nan"),
                "client+scheduler MiB peak": mem["scheduler_peak_mib"],
                "worker peak MiB": mem["worker_peak_mib"], "chunk files written": written,
            })
            print(rows[-1], flush=True)
            shutil.rmtree(out, ignore_errors=True)
    load = os.getloadavg()
    print(f"\nvirtual input {shape} uint8 = {terabytes:.1f} TB, block {block}; {args.workers} workers x 1 thread; "
          f"load average at start {info['load_average_at_start']}, at end {list(load)}")
    print_table(rows, ["group", "layout blocks", "tasks", "plan s", "plan client MiB", "resume scan s",
                       "resume scan MiB", "done-state bytes", "ran blocks",
                       "ms/block", "overhead ms/block", "tasks in flight max", "client+scheduler MiB first", "client+scheduler MiB peak",
                       "worker peak MiB", "chunk files written"])
    save("bench_scale", {"machine": {**info, "load_average_at_end": list(load)},
                         "params": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                         "virtual_terabytes": terabytes, "rows": rows})
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
