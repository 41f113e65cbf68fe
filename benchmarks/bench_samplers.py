"""Restorer samplers: quality against network evaluations on real XZ slices (fib25, x4).

A trained Stage I restorer (``--model``, e.g. the one ``bench_quality.py`` trains) restores a
fixed set of real XZ slices of the decimated fib25 volume (``--slices`` slices, evenly spaced in
y, each all LR z x the central ``--width`` x) with every sampler setting, exactly as Stage II
does (``RestorerProcessor.restore_slices``: cubic condition, keyed noise, clamp to [0, 1]).
Each result is scored against the ground-truth XZ slices (PSNR, SSIM, data range 1).

Settings: the authors' reverse SDE at 100 steps (the reference) and at fewer steps, the
deterministic ``ddim`` and the stochastic ``posterior`` sampler at a few step counts. The
recommendation is the setting with the fewest network evaluations whose PSNR is within
``--tolerance`` dB (default 0.2) of sde@100.

    python benchmarks/bench_samplers.py --model /tmp/d2r_bench_quality/x4/restorer \\
        --lr /tmp/d2r_bench_quality/x4/lr.zarr --gt /tmp/d2r_bench_quality/gt.zarr
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import machine_info  # noqa: E402

HERE = Path(__file__).resolve().parent
WORK = Path("/tmp/d2r_bench_quality")
DEFAULT_SETTINGS = ["sde:100", "sde:50", "sde:20", "ddim:1", "ddim:2", "ddim:5", "ddim:10", "ddim:20", "ddim:50",
                    "posterior:2", "posterior:3",
                    "posterior:5", "posterior:10", "posterior:20"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=WORK / "x4" / "restorer")
    p.add_argument("--lr", type=Path, default=WORK / "x4" / "lr.zarr")
    p.add_argument("--gt", type=Path, default=WORK / "gt.zarr")
    p.add_argument("--slices", type=int, default=8, help="XZ slices (evenly spaced in y)")
    p.add_argument("--width", type=int, default=96, help="x extent of each slice (central)")
    p.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, help="sampler:steps ...")
    p.add_argument("--tolerance", type=float, default=0.2, help="dB of PSNR below sde@100 still accepted")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args()

    import torch

    from d2r_dask.data.degrade import upsample_axis
    from d2r_dask.evaluation.metrics import psnr, ssim
    from d2r_dask.stages.restore import RestorerProcessor
    from d2r_dask.io.volume import open_volume

    lr, gt = open_volume(args.lr), open_volume(args.gt)
    proc = RestorerProcessor(str(args.model), "cpu", seed=args.seed, slice_batch=args.batch)
    s = proc.factor
    nz, ny, nx = lr.shape
    w = min(args.width, nx)
    x0 = (nx - w) // 2
    ys = np.linspace(ny * 0.1, ny * 0.9, args.slices).round().astype(np.int64)
    lr_slices = np.stack([np.asarray(lr.data[:, y, x0:x0 + w].compute()) for y in ys])  # (N, nz, w)
    n_hr = min(nz * s, gt.shape[0])
    gt_slices = np.stack([np.asarray(gt.data[:n_hr, y, x0:x0 + w].compute()) for y in ys])
    unit_lr = proc.intensity.to_unit(lr_slices)
    unit_gt = proc.intensity.to_unit(gt_slices)
    zh = np.arange(nz * s, dtype=np.int64)
    xs = np.arange(x0, x0 + w, dtype=np.int64)
    keys = (zh[None, :, None], ys[:, None, None], xs[None, None, :])

    def score(pred: np.ndarray) -> dict[str, float]:
        pred = pred[:, :n_hr]
        return {"psnr": psnr(pred, unit_gt, data_range=1.0), "ssim": ssim(pred, unit_gt, data_range=1.0, axis=0)}

    rows: list[dict[str, Any]] = []
    for method in ("linear", "cubic"):
        rows.append({"setting": f"{method} interpolation", "sampler": method, "steps": 0, "nfe": 0, "seconds": 0.0,
                     **score(np.clip(upsample_axis(unit_lr, s, axis=1, mode=proc.mode, method=method), 0, 1))})
        print(rows[-1], flush=True)
    t_start = time.perf_counter()
    for setting in args.settings:
        name, steps = setting.split(":")
        proc.sampler, proc.steps = name, int(steps)
        nfe = proc.sde.n_evaluations(name, int(steps))
        t0 = time.perf_counter()
        pred = proc.restore_slices(unit_lr, keys, 0)
        dt = time.perf_counter() - t0
        rows.append({"setting": setting, "sampler": name, "steps": int(steps), "nfe": nfe, "seconds": round(dt, 2),
                     "network_evaluations_per_s": round(nfe * len(ys) / dt, 3) if dt else None, **score(pred)})
        print(rows[-1], flush=True)
    ref = next((r for r in rows if r["setting"] == "sde:100"), None)
    chosen = None
    if ref is not None:
        ok = [r for r in rows if r["nfe"] > 0 and r["psnr"] >= ref["psnr"] - args.tolerance]
        chosen = min(ok, key=lambda r: (r["nfe"], -r["psnr"]))
    from d2r_dask.models.checkpoint import read_config

    cfg = read_config(args.model, "restorer")
    payload = {
        "benchmark": "restorer_samplers",
        "device": "CPU (2 cores)" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
        "gpu": "not measured: no GPU in this session" if not torch.cuda.is_available() else "used",
        "threads": torch.get_num_threads(),
        "machine": machine_info(),
        "command": "python benchmarks/bench_samplers.py " + " ".join(sys.argv[1:]),
        "model": str(args.model),
        "model_preset": cfg.get("preset"),
        "model_train_steps": cfg.get("step"),
        "factor": s,
        "data": {"lr": str(args.lr), "gt": str(args.gt), "xz_slices_y": ys.tolist(), "x_range": [x0, x0 + w],
                 "slice_shape_hr": [n_hr, w], "lr_slices": nz},
        "tolerance_db": args.tolerance,
        "rows": rows,
        "reference": ref["setting"] if ref else None,
        "recommended": chosen,
        "total_wall_s": round(time.perf_counter() - t_start, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "samplers_fib25_x4.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    lines = ["# Restorer samplers on real fib25 XZ slices (x4)", "",
             f"Device: {payload['device']}; torch {payload['machine']['torch']}; {payload['threads']} threads; "
             f"restorer `{args.model}` (preset {cfg.get('preset')}, {cfg.get('step')} training steps).", "",
             f"{len(ys)} XZ slices (y = {ys.tolist()}), each {nz} LR z-slices -> {nz * s} HR x {w} x "
             f"(x {x0}..{x0 + w - 1}); PSNR/SSIM vs ground truth on the {n_hr} HR rows that exist, unit range.", "",
             f"Command: `{payload['command']}`", "",
             "| setting | network evals / slice | wall (s) | PSNR (dB) | SSIM | dPSNR vs sde@100 |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        d = f"{r['psnr'] - ref['psnr']:+.2f}" if ref else ""
        lines.append(f"| {r['setting']} | {r['nfe']} | {r['seconds']} | {r['psnr']:.2f} | {r['ssim']:.3f} | {d} |")
    if chosen:
        lines += ["", f"Fastest setting within {args.tolerance} dB PSNR of sde@100: **{chosen['setting']}** "
                      f"({chosen['nfe']} network evaluations per slice, PSNR {chosen['psnr']:.2f} dB, "
                      f"SSIM {chosen['ssim']:.3f})."]
    (args.out / "samplers_fib25_x4.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
