"""The GPU check: Stage IV and Stage II throughput on one device, eager and compiled, in one JSON.

Run by ``benchmarks/gpu_check.sh`` (one GPU, <= 8 minutes); ``--cpu-smoke`` runs every
part at a tiny size on the CPU so the script is known to work where no GPU is.

* **Stage IV**, DGEAN ``base`` and ``full`` x4 (random weights: speed does not depend on
  them): the bare model on the engine's blocks (with their halo, already on the device)
  against the whole pipeline ``infer(serial=True)`` (Zarr read -> device -> Zarr write),
  in useful HR voxels/s (the voxels written) and their ratio; block as `d2r run` sizes it.
  Targets (issue 12): pipeline >= 0.8 of bare; base >= 0.6 G HR voxels/s on an H200-class GPU.
* **Stage II**, the restorer of `d2r run`'s GPU defaults (``auto``: the full preset, the
  default sampler), trained one step so its checkpoint is exactly what Stage I writes:
  pixel-evaluations/s of ``restore(serial=True)`` on a region (the pixels it computes:
  ``stage2_work``), and of the bare network on batches of slices of the same size.

Each is timed eager and with ``torch.compile`` (first call, which compiles, excluded).

    python benchmarks/bench_gpu_check.py                  # a GPU
    python benchmarks/bench_gpu_check.py --cpu-smoke      # tiny, CPU: checks the script works
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import machine_info, random_dgean, repeat_timed  # noqa: E402

HERE = Path(__file__).resolve().parent


def _sync(device: Any) -> Callable[[], None]:
    import torch

    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def lr_volume(path: Path, shape: tuple[int, int, int]) -> Path:
    """A synthetic vEM LR volume (uint8, 40 x 10 x 10 nm)."""
    from d2r_dask.data.synth import synth_dask
    from d2r_dask.io.geometry import Geometry
    from d2r_dask.io.volume import write_volume

    data = synth_dask(shape, chunks=tuple(min(64, n) for n in shape), seed=1)
    return write_volume(path, data, Geometry((40.0, 10.0, 10.0)), chunks=tuple(min(64, n) for n in shape))


def stage4(lr: Path, work: Path, preset: str, device: Any, compile_: bool, reps: int) -> dict[str, Any]:
    """Bare DGEAN on the engine's blocks vs ``infer(serial=True)``: useful HR voxels/s."""
    import numpy as np
    import torch

    from d2r_dask.blockwise.layout import Layout
    from d2r_dask.io.geometry import Box
    from d2r_dask.io.volume import open_volume
    from d2r_dask.models.checkpoint import read_dgean_config
    from d2r_dask.stages.infer import DGEANProcessor, infer
    from d2r_dask.stages.sizing import device_info, infer_block

    model = random_dgean(work / f"dgean-{preset}", 4, preset)
    shape = tuple(open_volume(lr).shape)
    cfg, _ = read_dgean_config(model)
    sized = infer_block(shape, cfg, device_info(str(device)))
    block = tuple(sized["block"])
    proc = DGEANProcessor(str(model), str(device), compile=compile_)
    layout = Layout(roi=Box((0, 0, 0), shape), block=block, halo=proc.halo, scale=proc.scale)
    tile = [b + 2 * h for b, h in zip(block, proc.halo)]
    x = torch.from_numpy(np.random.default_rng(0).random((1, 1, *tile), dtype=np.float32)).to(device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    sync = _sync(device)

    def bare() -> Any:
        with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=proc.bf16):
            return proc.forward(x)

    t0 = time.perf_counter()
    bare()  # warm-up (compiles)
    sync()
    first = time.perf_counter() - t0
    t_tile = min(repeat_timed(bare, reps, sync))
    useful = shape[0] * 4 * shape[1] * shape[2]
    bare_s = t_tile * layout.n_blocks
    t0 = time.perf_counter()
    infer(lr, work / "warm.zarr", model, block=block, compile=compile_, serial=True, overwrite=True,
          progress=False, levels=1)  # warm-up: loads (and compiles) the engine's processor
    warm = time.perf_counter() - t0
    times = []
    for i in range(reps):
        t0 = time.perf_counter()
        infer(lr, work / f"sr{i}.zarr", model, block=block, compile=compile_, serial=True, overwrite=True,
              progress=False, levels=1)
        times.append(time.perf_counter() - t0)
    shutil.rmtree(work / "warm.zarr", ignore_errors=True)
    pipe_s = min(times)
    row = {"part": "stage IV", "preset": preset, "factor": 4, "variant": "compiled" if compile_ else "eager",
           "bf16": proc.bf16, "lr_shape": list(shape), "block": list(block), "halo": list(proc.halo),
           "halo_overhead": sized["halo_overhead"], "blocks": layout.n_blocks,
           "first_call_s": round(first, 2), "pipeline_warmup_s": round(warm, 2),
           "bare_hr_voxels_per_s": round(useful / bare_s), "pipeline_hr_voxels_per_s": round(useful / pipe_s),
           "pipeline_over_bare": round(bare_s / pipe_s, 3), "pipeline_s_all": [round(t, 3) for t in times]}
    print(row, flush=True)
    return row


def restorer_checkpoint(lr: Path, work: Path, device: Any, smoke: bool) -> tuple[Path, Any]:
    """The restorer `d2r run` trains on this device (auto presets), trained for one step."""
    from dataclasses import replace

    from d2r_dask.io.volume import open_volume
    from d2r_dask.stages.config import RunConfig, resolve_auto
    from d2r_dask.stages.pipeline import _restorer_config, fit_sizes
    from d2r_dask.stages.train import TrainConfig, train_restorer

    cfg = resolve_auto(RunConfig(factor=4), device.type)
    rcfg = replace(_restorer_config(cfg), patch=fit_sizes(open_volume(lr).shape, cfg).restorer_patch)  # as d2r run
    out = work / "restorer"
    train_restorer(lr, out, rcfg, TrainConfig(steps=1, batch_size=1, checkpoint_every=1, val_every=1, val_patches=1,
                                              device=str(device), amp=device.type == "cuda"), progress=False)
    return out, rcfg


def stage2(lr: Path, work: Path, model: Path, rcfg: Any, device: Any, compile_: bool, reps: int,
           block: tuple[int, int, int], halo: tuple[int, int, int], slice_batch: int) -> dict[str, Any]:
    """Pixel-evaluations/s of ``restore(serial=True)`` and of the bare network on such slices."""
    import torch

    from d2r_dask.io.volume import open_volume
    from d2r_dask.stages.restore import RestorerProcessor, restore, stage2_layout, stage2_work

    shape = tuple(open_volume(lr).shape)
    proc = RestorerProcessor(str(model), str(device), slice_batch=slice_batch, compile=compile_)
    nfe = proc.sde.n_evaluations(proc.sampler, proc.steps)
    s = proc.factor
    layout = stage2_layout(shape, block=block, halo=halo, factor=s)  # the tiles restore() runs
    planned = stage2_work(layout, nfe=nfe)  # each slice once per tile of its plane, nfe passes
    evaluations = planned["pixel_evaluations"]
    tile = [b + 2 * h for b, h in zip(layout.block, layout.halo)]
    kw: dict[str, Any] = dict(block=block, halo=halo, slice_batch=slice_batch, compile=compile_, serial=True,
                              overwrite=True, progress=False, levels=1)
    t0 = time.perf_counter()
    restore(lr, work / "ph-warm.zarr", model, **kw)
    warm = time.perf_counter() - t0
    times = []
    for i in range(reps):
        t0 = time.perf_counter()
        restore(lr, work / f"ph{i}.zarr", model, **kw)
        times.append(time.perf_counter() - t0)
    pipe_s = min(times)
    # the bare network: one batch of slices of the tile's size, already on the device
    length = max(tile[1], tile[2])
    x = torch.rand(slice_batch, 2, tile[0] * s, length, device=device)
    t = torch.full((slice_batch,), 10, device=device, dtype=torch.long)
    net = proc.net

    def bare() -> Any:
        with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                                             enabled=device.type == "cuda"):
            return net(x, t)

    sync = _sync(device)
    bare()
    sync()
    t_bare = min(repeat_timed(bare, reps, sync))
    row = {"part": "stage II", "preset": rcfg.preset, "recipe": rcfg.recipe, "sampler": f"{proc.sampler} x{nfe}",
           "variant": "compiled" if compile_ else "eager", "lr_shape": list(shape), "block": list(layout.block),
           "halo": list(layout.halo), "tiles": layout.n_blocks, "slice_batch": slice_batch,
           "pipeline_warmup_s": round(warm, 2), "pixel_evaluations": evaluations,
           "useful_pixel_evaluations": planned["useful_pixel_evaluations"],
           "pipeline_pixel_evaluations_per_s": round(evaluations / pipe_s),
           "bare_pixel_evaluations_per_s": round(slice_batch * tile[0] * s * length / t_bare),
           "pipeline_s_all": [round(v, 3) for v in times]}
    row["pipeline_over_bare"] = round(row["pipeline_pixel_evaluations_per_s"] / row["bare_pixel_evaluations_per_s"], 3)
    print(row, flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU: check that every part runs")
    ap.add_argument("--no-compile", action="store_true", help="eager only")
    ap.add_argument("--out", type=Path, default=None, help="JSON path [default: results/gpu_check_<device>.json]")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "d2r-gpu-check")
    ap.add_argument("--budget", type=float, default=420.0,
                    help="seconds: parts not started by then are skipped (named in the JSON)")
    args = ap.parse_args()
    # gpu_check.sh's timeout sends SIGTERM: exit through the finally below, which saves what was measured
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped by the time limit"))

    import torch

    if args.cpu_smoke:
        device = torch.device("cpu")
        torch.set_num_threads(1)
        presets, lr4_shape, lr2_shape, reps = ["tiny"], (8, 48, 48), (8, 32, 32), 1
        block2, halo2, slice_batch = (8, 16, 16), (0, 4, 4), 16
    else:
        if not torch.cuda.is_available():
            sys.exit("no GPU visible: run with --cpu-smoke to check the script on a CPU")
        device = torch.device("cuda")
        torch.backends.cudnn.benchmark = True
        presets, lr4_shape, lr2_shape, reps = ["base", "full"], (96, 768, 768), (32, 256, 256), 2
        block2, halo2, slice_batch = (64, 128, 256), (4, 16, 16), 64  # d2r run's tiles: two, cut along y
    name = "cpu-smoke" if args.cpu_smoke else torch.cuda.get_device_name().split()[-1].lower().replace("-", "")
    out = args.out or HERE / "results" / f"gpu_check_{name}.json"
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    t_start = time.perf_counter()
    payload: dict[str, Any] = {
        "benchmark": "gpu_check", "device": name if args.cpu_smoke else torch.cuda.get_device_name(),
        "measured": not args.cpu_smoke, "machine": machine_info(),
        "command": "python benchmarks/bench_gpu_check.py " + " ".join(sys.argv[1:]),
        "targets": {"stage IV pipeline_over_bare": ">= 0.8", "stage IV base bare_hr_voxels_per_s (H200)": ">= 6e8"},
        "rows": [],
    }
    variants = [False] if args.no_compile else [False, True]

    def in_budget(part: str) -> bool:
        if time.perf_counter() - t_start < args.budget:
            return True
        payload["rows"].append({"part": part, "skipped": f"not started: over the {args.budget:.0f} s budget"})
        return False

    try:
        lr4 = lr_volume(args.work / "lr4.zarr", lr4_shape)
        for preset in presets:
            for compile_ in variants:
                if in_budget(f"stage IV {preset} {'compiled' if compile_ else 'eager'}"):
                    payload["rows"].append(stage4(lr4, args.work, preset, device, compile_, reps))
        lr2 = lr_volume(args.work / "lr2.zarr", lr2_shape)
        model, rcfg = restorer_checkpoint(lr2, args.work, device, args.cpu_smoke)
        for compile_ in variants:
            if in_budget(f"stage II {'compiled' if compile_ else 'eager'}"):
                payload["rows"].append(stage2(lr2, args.work, model, rcfg, device, compile_, reps, block2, halo2,
                                              slice_batch))
    finally:
        payload["total_wall_s"] = round(time.perf_counter() - t_start, 1)
        payload["load_average_at_end"] = list(__import__("os").getloadavg())
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=1, default=str) + "\n")
        print(f"saved {out} ({payload['total_wall_s']} s)")
        shutil.rmtree(args.work, ignore_errors=True)
    for r in payload["rows"]:
        if "skipped" in r:
            print(f"{r['part']}: {r['skipped']}")
            continue
        key = "hr_voxels_per_s" if r["part"] == "stage IV" else "pixel_evaluations_per_s"
        print(f"{r['part']:8s} {r['preset']:5s} {r['variant']:8s} bare {r['bare_' + key]:>14,} "
              f"pipeline {r['pipeline_' + key]:>14,} ratio {r['pipeline_over_bare']}")


if __name__ == "__main__":
    main()
