"""Stage II work and throughput: pixel-evaluations planned against useful, and the stage's speed
against the bare network on the same cores (issue 12: planned <= 1.25x useful, throughput >= 0.8).

A *pixel-evaluation* is one pixel of one slice through the restorer once; the *useful* ones
restore each XZ and YZ slice of the region once (``2 * nz * s * ny * nx * nfe``). Parts:

* **plan**: :func:`d2r_dask.stages.restore.stage2_work` for the measured volume and for large
  volumes at the default tiles, next to what the former tiling (every slice of every 3D tile,
  halo included) computed.
* **timing**: ``restore(serial=True)`` on a synthetic LR volume (as ``d2r run`` restores it:
  the CPU's ``auto`` restorer, trained one step, its default sampler; the tiles of ``d2r run``),
  in one process with ``--threads`` torch threads; useful pixel-evaluations/s against the bare
  network's pixel-evaluations/s on exactly the batches Stage II runs (``slice_batch`` slices of
  ``Z*s x L`` at a time), with the same threads, inputs already in memory; the two are timed
  in turn, ``--reps`` times, best of each, in wall seconds and in this process's CPU seconds
  (``time.process_time``: what the work cost, less disturbed by other load). The load average (``os.getloadavg``) is recorded before and after:
  on a shared machine it says how much of the cores the numbers had.

    python benchmarks/bench_stage2.py                   # 16 x 96 x 96, 1 thread
    python benchmarks/bench_stage2.py --threads 2 --shape 16 128 128
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import machine_info, params, print_table, save  # noqa: E402
from bench_gpu_check import lr_volume, restorer_checkpoint  # noqa: E402


FORMER_RUN_BLOCK, FORMER_RESTORE_BLOCK, FORMER_HALO = (32, 128, 128), (16, 64, 64), (4, 16, 16)
"""The tiles of ``d2r run`` and ``d2r restore`` before Stage II restored each slice once."""


def former_pixel_evaluations(shape: tuple[int, int, int], block: tuple[int, int, int], factor: int,
                             nfe: int) -> int:
    """What the former tiling computed: each 3D tile (the block, not cut to the volume, grown by
    the fitted halo) restored all its XZ and YZ slices, halo included."""
    from d2r_dask.io.geometry import grid_shape
    from d2r_dask.stages.restore import fitted_halo

    halo = fitted_halo(FORMER_HALO, shape)
    zext, yext, xext = ((b + 2 * h) * s for b, h, s in zip(block, halo, (factor, 1, 1)))
    tiles = 1
    for g in grid_shape(shape, block):
        tiles *= g
    return tiles * 2 * zext * yext * xext * nfe


def plan_rows(shape: tuple[int, int, int], factor: int, nfe: int) -> list[dict[str, Any]]:
    """Planned / useful pixel-evaluations with the default tiles, now and before."""
    from d2r_dask.stages.config import RestoreStage
    from d2r_dask.stages.restore import DEFAULT_BLOCK, DEFAULT_HALO, stage2_layout, stage2_work

    run_block = RestoreStage().block
    cases = [
        ("measured volume, d2r run", shape, run_block, FORMER_RUN_BLOCK),
        ("measured volume, d2r restore", shape, DEFAULT_BLOCK, FORMER_RESTORE_BLOCK),
        ("d2r run's region 64x256x256", (64, 256, 256), run_block, FORMER_RUN_BLOCK),
        ("large volume, d2r restore", (1024, 4096, 4096), DEFAULT_BLOCK, FORMER_RESTORE_BLOCK),
    ]
    rows = []
    for name, vol, block, former_block in cases:
        layout = stage2_layout(vol, block=block, halo=DEFAULT_HALO, factor=factor)
        work = stage2_work(layout, nfe=nfe)
        former = former_pixel_evaluations(vol, former_block, factor, nfe)
        rows.append({"case": name, "volume": list(vol), "block": list(layout.block), "halo": list(layout.halo),
                     "tiles": layout.n_blocks, "slices": work["slices"], "useful_slices": work["useful_slices"],
                     "pixel_evaluations": work["pixel_evaluations"],
                     "useful_pixel_evaluations": work["useful_pixel_evaluations"],
                     "planned_over_useful": round(work["pixel_evaluations"] / work["useful_pixel_evaluations"], 3),
                     "former_block": list(former_block),
                     "former_over_useful": round(former / work["useful_pixel_evaluations"], 3)})
    return rows


def timing(args: argparse.Namespace) -> dict[str, Any]:
    """``restore(serial=True)`` vs the bare network on the same slices, same threads."""
    import numpy as np
    import torch

    from d2r_dask.blockwise.runtime import RUNTIME
    from d2r_dask.stages.config import RestoreStage
    from d2r_dask.stages.restore import RestorerProcessor, restore, stage2_layout, stage2_work

    torch.set_num_threads(args.threads)
    work_dir = args.workdir
    lr = lr_volume(work_dir / "lr.zarr", tuple(args.shape))
    model, rcfg = restorer_checkpoint(lr, work_dir, torch.device("cpu"), smoke=True)
    proc = RestorerProcessor(str(model), "cpu", slice_batch=args.slice_batch)
    nfe = proc.sde.n_evaluations(proc.sampler, proc.steps)
    block = tuple(args.block or RestoreStage().block)
    layout = stage2_layout(tuple(args.shape), block=block, factor=proc.factor)
    work = stage2_work(layout, nfe=nfe)
    kw: dict[str, Any] = dict(block=block, slice_batch=args.slice_batch, serial=True, overwrite=True,
                              progress=False, levels=1)
    # the bare network on exactly the batches Stage II feeds it (per tile and orientation, the slices
    # the block owns, ``slice_batch`` at a time), inputs already in memory
    rng = np.random.default_rng(0)
    batches = []
    zs = (layout.block[0] + 2 * layout.halo[0]) * proc.factor
    for index, _ in layout.blocks():
        owned = layout.owned(index)
        for axis, other in ((1, 2), (2, 1)):  # XZ slices along y span x; YZ along x span y
            n, length = owned.stop[axis] - owned.start[axis], layout.block[other] + 2 * layout.halo[other]
            for a in range(0, n, args.slice_batch):
                b = min(n, a + args.slice_batch) - a
                batches.append(torch.from_numpy(rng.random((b, 2, zs, length), dtype=np.float32)))
    t_vec = {len(x): torch.full((len(x),), proc.sde.config.T, dtype=torch.long) for x in batches}

    def bare() -> None:
        with torch.no_grad():
            for x in batches:
                proc.net(x, t_vec[len(x)])

    restore(lr, work_dir / "ph-warm.zarr", model, **kw)  # warm-up: loads the processor
    bare()
    load_before = os.getloadavg()
    times, cpu, model_s, bare_times, bare_cpu = [], [], [], [], []
    for i in range(args.reps):  # interleaved, so both see the same machine load
        RUNTIME.seconds.clear()
        t0, c0 = time.perf_counter(), time.process_time()
        restore(lr, work_dir / f"ph{i}.zarr", model, **kw)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        model_s.append(RUNTIME.seconds.get("model", 0.0))
        t0, c0 = time.perf_counter(), time.process_time()
        bare()
        bare_times.append(time.perf_counter() - t0)
        bare_cpu.append(time.process_time() - c0)
    t_bare = min(bare_times)
    load_after = os.getloadavg()
    best = min(times)
    row = {"lr_shape": list(args.shape), "threads": args.threads, "preset": rcfg.preset,
           "sampler": f"{proc.sampler} x{nfe}", "block": list(layout.block), "halo": list(layout.halo),
           "tiles": layout.n_blocks, "slice_batch": args.slice_batch, **work,
           "planned_over_useful": round(work["pixel_evaluations"] / work["useful_pixel_evaluations"], 3),
           "stage2_s_all": [round(v, 3) for v in times], "stage2_model_s_all": [round(v, 3) for v in model_s],
           "stage2_useful_pixel_evaluations_per_s": round(work["useful_pixel_evaluations"] / best),
           "stage2_computed_pixel_evaluations_per_s": round(work["pixel_evaluations"] / best),
           "bare_batches": len(batches), "bare_s_all": [round(v, 3) for v in bare_times],
           "bare_pixel_evaluations_per_s": round(work["pixel_evaluations"] / t_bare),
           "load_average_before": [round(v, 2) for v in load_before],
           "load_average_after": [round(v, 2) for v in load_after]}
    row["stage2_over_bare"] = round(row["stage2_useful_pixel_evaluations_per_s"] / row["bare_pixel_evaluations_per_s"], 3)
    # CPU seconds of this process: what the work cost, less sensitive than wall time to other load
    row.update({"stage2_cpu_s_all": [round(v, 3) for v in cpu], "bare_cpu_s_all": [round(v, 3) for v in bare_cpu],
                "stage2_over_bare_cpu_time": round(work["useful_pixel_evaluations"] / min(cpu)
                                                   / (work["pixel_evaluations"] / min(bare_cpu)), 3),
                "model_share_of_stage2": round(sum(model_s) / sum(times), 3)})
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, default=(16, 96, 96), metavar=("Z", "Y", "X"))
    ap.add_argument("--block", type=int, nargs=3, default=None, help="Stage II tile [default: d2r run's]")
    ap.add_argument("--threads", type=int, default=1, help="torch threads, for Stage II and the bare network")
    ap.add_argument("--slice-batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None, help="[default: a fresh temporary folder]")
    ap.add_argument("--out", default="bench_stage2")
    args = ap.parse_args()
    info = machine_info()
    with tempfile.TemporaryDirectory(prefix="d2r-bench-stage2-") as tmp:
        if args.workdir is None:
            args.workdir = Path(tmp)
        args.workdir.mkdir(parents=True, exist_ok=True)
        row = timing(args)
    plans = plan_rows(tuple(args.shape), 4, 1)
    print_table(plans, ["case", "block", "halo", "tiles", "planned_over_useful", "former_block",
                        "former_over_useful"])
    print_table([row], ["lr_shape", "threads", "tiles", "planned_over_useful", "stage2_useful_pixel_evaluations_per_s",
                        "bare_pixel_evaluations_per_s", "stage2_over_bare", "stage2_over_bare_cpu_time",
                        "load_average_before"])
    save(args.out, {"benchmark": "bench_stage2", "machine": info, "params": params(args), "timing": row,
                    "plan": plans,
                    "targets": {"planned_over_useful_max": 1.25, "stage2_over_bare_min": 0.8},
                    "notes": "pixel-evaluation: one slice pixel through the restorer once; useful: each XZ and "
                             "YZ slice of the region once. Throughput counts useful pixel-evaluations per "
                             "second of restore(serial=True), Zarr I/O, upsampling, noise and blending "
                             "included; bare: the network alone on the same slices, in memory."})


if __name__ == "__main__":
    main()
