"""Model throughput: the restorer network, bare DGEAN, the full Stage IV pipeline and DGEAN's training step.

(a) Restorer (ConditionalNAFNet) presets tiny/small/full on ``(batch, 2, 256, 256)``:
    network evaluations per second and pixel-evaluations per second, eager fp32. On a
    CUDA device also bf16 autocast, + channels_last, + ``torch.compile`` (skipped on the CPU).
(b) DGEAN presets tiny/medium/base, the bare model in Stage IV's form (channels-last; bf16 on
    a GPU) on a random LR block plus the preset's halo, already on the device: computed HR
    voxels per second, per factor; on a CPU also the fit of the time model of
    :mod:`d2r_dask.stages.sizing` to these rows.
(c) Stage IV through the engine (Zarr in -> model -> Zarr out, ``infer(serial=True)``) on a real
    LR volume with a DGEAN checkpoint, against the bare model on the same blocks with their halo:
    "useful" HR voxels/s (the voxels written) for both, the halo overhead (computed / useful)
    and the pipeline/bare ratio.
(d) DGEAN's training step per factor in Stage III's form (the CPU default ``medium`` on 4 LR
    patches 4 x 48^2, the hf loss, AdamW; channels-last, bf16 on a GPU): seconds per step, and on
    a CPU the fit ``a + b * factor`` ms, the form of :data:`d2r_dask.stages.config.CPU_DGEAN_STEP_MS`
    (which was set from a quiet machine's rows and checked against whole runs' Stage III times).

    python benchmarks/bench_models_speed.py                      # CPU defaults, a few minutes
    python benchmarks/bench_models_speed.py --restorer-presets tiny small --dgean-presets tiny base
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import dgean_train_step, machine_info, repeat_timed  # noqa: E402

HERE = Path(__file__).resolve().parent
WORK = Path("/tmp/d2r_bench_quality")


def restorer_speed(presets: list[str], size: int, batch: int, reps: dict[str, int], device: Any,
                   batch_for: dict[str, int] | None = None) -> list[dict]:
    import torch

    from d2r_dask.models.nafnet import ConditionalNAFNet, nafnet_config

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = []
    for preset in presets:
        torch.manual_seed(0)
        net = ConditionalNAFNet(nafnet_config(preset)).to(device).eval()
        n_par = sum(p.numel() for p in net.parameters())
        nb = (batch_for or {}).get(preset, batch)
        x = torch.rand(nb, 2, size, size, device=device)
        t = torch.randint(1, 101, (nb,), device=device)
        variants: list[tuple[str, Callable[[], Any]]] = []

        def eager() -> Any:
            with torch.no_grad():
                return net(x, t)

        variants.append(("eager fp32", eager))
        if device.type == "cuda":
            net_cl = net.to(memory_format=torch.channels_last)
            x_cl = x.contiguous(memory_format=torch.channels_last)

            def bf16() -> Any:
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                    return net(x, t)

            def bf16_cl() -> Any:
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                    return net_cl(x_cl, t)

            compiled = torch.compile(net_cl)

            def bf16_cl_compiled() -> Any:
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                    return compiled(x_cl, t)

            variants += [("bf16 autocast", bf16), ("bf16 + channels_last", bf16_cl),
                         ("bf16 + channels_last + compile", bf16_cl_compiled)]
        base = None
        for name, fn in variants:
            with torch.no_grad():  # warm-up: a small input for the CPU, the real one (compile) on a GPU
                if device.type == "cuda":
                    fn(), fn()
                else:
                    net(x[:1, :, :64, :64], t[:1])
            times = repeat_timed(fn, reps.get(preset, 1), sync)
            best = min(times)
            row = {"part": "restorer", "preset": preset, "variant": name, "parameters": n_par,
                   "input": [nb, 2, size, size], "reps": len(times), "seconds_best": round(best, 4),
                   "seconds_all": [round(v, 4) for v in times],
                   "network_evaluations_per_s": round(nb / best, 3),
                   "pixel_evaluations_per_s": round(nb * size * size / best, 1)}
            base = base or row["network_evaluations_per_s"]
            row["speedup_vs_eager_fp32"] = round(row["network_evaluations_per_s"] / base, 3)
            rows.append(row)
            print(row, flush=True)
        if device.type != "cuda":
            rows.append({"part": "restorer", "preset": preset,
                         "variant": "bf16 autocast / channels_last / torch.compile",
                         "note": "not measured: no GPU in this session (code path runs on CUDA only)"})
    return rows


def dgean_speed(presets: list[str], factors: list[int], block: list[int], reps: dict[str, int],
                device: Any) -> list[dict]:
    """Each preset and factor in the form Stage IV runs it (:mod:`d2r_dask.models.precision`:
    channels-last memory, bf16 autocast on a GPU) on one LR ``block`` plus the preset's halo:
    the seconds per computed HR voxel that :mod:`d2r_dask.stages.sizing` models."""
    import torch

    from d2r_dask.models.dgean import DGEAN, dgean_config, flops_per_output_voxel, receptive_field
    from d2r_dask.models.precision import autocast_bf16, channels_last, channels_last_input

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    bf16 = autocast_bf16(device)
    variant = ("bf16 autocast" if bf16 else "fp32") + ", channels-last (Stage IV's form)"
    rows = []
    for preset in presets:
        for s in factors:
            torch.manual_seed(0)
            cfg = dgean_config(preset, s, "decimate")
            halo = receptive_field(cfg)
            tile = [b + 2 * h for b, h in zip(block, halo)]
            net = channels_last(DGEAN(cfg).to(device).eval())
            x = channels_last_input(torch.rand(1, 1, *tile, device=device))

            def forward() -> Any:
                with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
                    return net(x)

            forward()  # warm-up at full size: allocations and kernel choice
            times = repeat_timed(forward, reps.get(preset, 1), sync)
            best = min(times)
            hr = tile[0] * s * tile[1] * tile[2]
            row = {"part": "dgean", "preset": preset, "factor": s, "variant": variant,
                   "parameters": sum(q.numel() for q in net.parameters()),
                   "gflop_per_hr_voxel": flops_per_output_voxel(cfg) / 1e9,
                   "halo_lr": list(halo), "lr_block": block, "lr_input": tile, "reps": len(times),
                   "seconds_best": round(best, 4), "seconds_all": [round(v, 4) for v in times],
                   "hr_voxels_per_s": round(hr / best, 1)}
            rows.append(row)
            print(row, flush=True)
    return rows


def fit_cpu_time_model(rows: list[dict], cores: int) -> dict[str, float]:
    """``seconds * cores / hr_voxels = c + flops_per_voxel / F`` fitted to the DGEAN rows (least
    relative squares, so the fast tiny rows count as much as the slow ones): the two constants
    of :func:`d2r_dask.stages.sizing.estimate_seconds` on a CPU."""
    import numpy as np

    a = np.array([[1.0, r["gflop_per_hr_voxel"] * 1e9] for r in rows])
    y = np.array([cores / r["hr_voxels_per_s"] for r in rows])
    (c, inv_f), *_ = np.linalg.lstsq(a / y[:, None], np.ones_like(y), rcond=None)
    worst = float(np.max(np.abs(a @ [c, inv_f] / y - 1)))
    return {"seconds_per_voxel_core": float(c), "flops_per_core": float(1 / inv_f), "worst_relative_error": worst}


def dgean_train_speed(preset: str, factors: list[int], patch: list[int], batch: int, reps: int,
                      device: Any) -> list[dict]:
    """Seconds per DGEAN training step (forward, hf loss, backward, AdamW) per factor, best of
    ``reps`` rounds of 6 steps after 2 warm-up steps, in the form Stage III trains it."""
    import torch

    from d2r_dask.models.precision import autocast_bf16

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    bf16 = autocast_bf16(device)
    rows = []
    for s in factors:
        step = dgean_train_step(preset, s, patch, device, batch=batch, bf16=bf16)

        def steps(n: int) -> None:
            for _ in range(n):
                step()

        steps(2)
        times = [t / 6 for t in repeat_timed(lambda: steps(6), reps, sync)]
        row = {"part": "dgean_train", "preset": preset, "factor": s, "batch": batch, "lr_patch": patch,
               "variant": ("bf16 autocast" if bf16 else "fp32") + ", channels-last (Stage III's form)",
               "seconds_per_step_best": round(min(times), 4), "seconds_per_step_all": [round(t, 4) for t in times]}
        rows.append(row)
        print(row, flush=True)
    return rows


def fit_step_model(rows: list[dict]) -> dict[str, float]:
    """``step ms = a + b * factor`` by least squares, the form of ``CPU_DGEAN_STEP_MS`` (``stages/config.py``)."""
    import numpy as np

    s = np.array([r["factor"] for r in rows], dtype=float)
    ms = np.array([1000 * r["seconds_per_step_best"] for r in rows])
    b, a = np.polyfit(s, ms, 1)
    return {"a_ms": round(float(a), 1), "b_ms": round(float(b), 2),
            "worst_relative_error": float(np.max(np.abs((a + b * s) / ms - 1)))}


def pipeline_speed(lr_path: Path, model: Path, block: list[int], reps: int, device: Any) -> list[dict]:
    import numpy as np
    import torch

    from d2r_dask.blockwise.layout import Layout
    from d2r_dask.io.geometry import Box
    from d2r_dask.stages.infer import DGEANProcessor, infer
    from d2r_dask.io.volume import open_volume

    lr = open_volume(lr_path)
    proc = DGEANProcessor(str(model), str(device))
    s, halo = proc.factor, proc.halo
    layout = Layout(roi=Box((0, 0, 0), tuple(lr.shape)), block=tuple(block), halo=tuple(halo), scale=(s, 1, 1))
    n_blocks = layout.n_blocks
    useful = lr.shape[0] * s * lr.shape[1] * lr.shape[2]
    tile = [b + 2 * h for b, h in zip(block, halo)]
    # bare model on one full tile (block + halo), random input already on the device
    x = np.random.default_rng(0).integers(0, 256, size=(1, *tile)).astype(np.float32)
    xt = torch.from_numpy(proc.intensity.to_unit(x)[:, None]).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        proc.net(xt[..., :8, :16, :16])
        t_tile = min(repeat_timed(lambda: proc.net(xt), 2, sync))
    bare_total = t_tile * n_blocks
    tmp = Path(tempfile.mkdtemp(prefix="d2r_speed_"))
    times = []
    try:
        for i in range(reps):
            out = tmp / f"sr{i}.zarr"
            t0 = time.perf_counter()
            infer(lr_path, out, model, block=tuple(block), serial=True, overwrite=True, progress=False, levels=1)
            times.append(time.perf_counter() - t0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    best = min(times)
    computed_per_tile = tile[0] * s * tile[1] * tile[2]
    useful_per_tile = block[0] * s * block[1] * block[2]
    row = {"part": "stage IV pipeline", "model": str(model), "factor": s, "lr_shape": list(lr.shape),
           "block": block, "halo": list(halo), "tile_with_halo": tile, "blocks": n_blocks,
           "engine": "infer(serial=True): Zarr read -> DGEAN -> Zarr write, one process",
           "pipeline_seconds_best": round(best, 2), "pipeline_seconds_all": [round(v, 2) for v in times],
           "pipeline_useful_hr_voxels_per_s": round(useful / best, 1),
           "bare_seconds_per_tile": round(t_tile, 3), "bare_seconds_all_tiles": round(bare_total, 2),
           "bare_useful_hr_voxels_per_s": round(useful / bare_total, 1),
           "bare_computed_hr_voxels_per_s": round(computed_per_tile / t_tile, 1),
           "halo_overhead_computed_over_useful": round(computed_per_tile / useful_per_tile, 3),
           "edge_note": "edge blocks are computed full-size (reflected), so useful voxels < blocks x block size",
           "pipeline_over_bare": round(bare_total / best, 3)}
    print(row, flush=True)
    return [row]


def markdown(payload: dict[str, Any]) -> str:
    m = payload["machine"]
    lines = ["# Model throughput (CPU)", "",
             f"Device: {payload['device']}; CPU `{m['cpu_model']}` ({m['cpu_count']} cores), "
             f"torch {m['torch']}, {payload['threads']} torch threads; GPU: {payload['gpu']}. "
             f"Load average at start {m['load_average_at_start']} (the machine is shared: numbers are noisy).", "",
             f"Command: `{payload['command']}`", "",
             "## (a) Restorer network (ConditionalNAFNet), one evaluation = one image", "",
             "| preset | params | variant | input | reps | best s | network evals/s | pixel-evals/s | vs eager fp32 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in payload["restorer"]:
        if "note" in r:
            lines.append(f"| {r['preset']} | | {r['variant']} | | | | {r['note']} | | |")
            continue
        lines.append(f"| {r['preset']} | {r['parameters']:,} | {r['variant']} | {tuple(r['input'])} | {r['reps']} "
                     f"| {r['seconds_best']} | {r['network_evaluations_per_s']:.3g} | {r['pixel_evaluations_per_s']:,.0f} "
                     f"| {r['speedup_vs_eager_fp32']} |")
    lines += ["", "## (b) DGEAN, bare model in Stage IV's form, random LR block + halo already on the device", "",
              "Every HR voxel computed is counted, the halo's included (what Stage IV computes per block).", "",
              "| preset | factor | variant | halo (LR) | LR input | kFLOP / HR voxel | reps | best s | HR voxels/s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in payload["dgean"]:
        lines.append(f"| {r['preset']} | {r['factor']} | {r['variant']} | {tuple(r['halo_lr'])} "
                     f"| {tuple(r['lr_input'])} | {r['gflop_per_hr_voxel'] * 1e6:.1f} | {r['reps']} "
                     f"| {r['seconds_best']} | {r['hr_voxels_per_s']:,.0f} |")
    if "cpu_time_model" in payload:
        f = payload["cpu_time_model"]
        lines += ["", f"Fitted CPU time model (`stages/sizing.py`): seconds = HR voxels x "
                      f"({f['seconds_per_voxel_core']:.3g} + flops per voxel / {f['flops_per_core']:.3g}) / cores; "
                      f"worst row off by {100 * f['worst_relative_error']:.0f} %."]
    lines += ["", "## (c) Stage IV: full pipeline vs bare model on the same blocks", ""]
    for r in payload["pipeline"]:
        lines += [
            f"LR `{r['lr_shape']}` x{r['factor']}, block {tuple(r['block'])} + halo {tuple(r['halo'])} "
            f"= tile {tuple(r['tile_with_halo'])}, {r['blocks']} blocks; {r['engine']}.", "",
            "| | seconds | useful HR voxels/s |", "|---|---|---|",
            f"| bare model, same tiles (incl. halo) | {r['bare_seconds_all_tiles']} | {r['bare_useful_hr_voxels_per_s']:,.0f} |",
            f"| full pipeline (Zarr in -> Zarr out) | {r['pipeline_seconds_best']} | "
            f"{r['pipeline_useful_hr_voxels_per_s']:,.0f} |", "",
            f"Bare model computes {r['bare_computed_hr_voxels_per_s']:,.0f} HR voxels/s including the halo; halo "
            f"overhead (computed / useful per interior block) {r['halo_overhead_computed_over_useful']}x; "
            f"pipeline / bare throughput {r['pipeline_over_bare']}. {r['edge_note']}.", ""]
    if payload.get("dgean_train"):
        rows = payload["dgean_train"]
        lines += ["", f"## (d) DGEAN `{rows[0]['preset']}` training step per factor, {rows[0]['batch']} LR patches "
                      f"{tuple(rows[0]['lr_patch'])}, {rows[0]['variant']}", "",
                  "| factor | " + " | ".join(str(r["factor"]) for r in rows) + " |",
                  "|---|" + "---|" * len(rows),
                  "| ms per step (best) | "
                  + " | ".join(f"{1000 * r['seconds_per_step_best']:.0f}" for r in rows) + " |"]
        if "cpu_step_model" in payload:
            f = payload["cpu_step_model"]
            lines += ["", "Fit (the form of `CPU_DGEAN_STEP_MS` in `stages/config.py`): "
                          f"{f['a_ms']} + {f['b_ms']} x factor ms; "
                          f"worst row off by {100 * f['worst_relative_error']:.0f} %."]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--restorer-presets", nargs="+", default=["tiny", "small", "full"])
    p.add_argument("--restorer-size", type=int, default=256)
    p.add_argument("--restorer-batch", type=int, default=4)
    p.add_argument("--full-batch", type=int, default=None,
                   help="batch for the full restorer preset (default: --restorer-batch; 1 saves CPU time)")
    p.add_argument("--dgean-presets", nargs="+", default=["tiny", "medium", "base"])
    p.add_argument("--dgean-factors", type=int, nargs="+", default=[4, 8])
    p.add_argument("--dgean-block", type=int, nargs=3, default=[32, 96, 96],
                   help="LR block; the preset's halo is added around it")
    p.add_argument("--train-preset", default="medium", help="DGEAN preset of part (d)")
    p.add_argument("--train-factors", type=int, nargs="*", default=[2, 3, 4, 6, 8, 10],
                   help="factors of part (d), the training step (none: skip it)")
    p.add_argument("--lr", type=Path, default=WORK / "x4" / "lr.zarr", help="LR volume for the pipeline part")
    p.add_argument("--model", type=Path, default=WORK / "x4" / "dgean", help="DGEAN checkpoint for the pipeline")
    p.add_argument("--pipeline-block", type=int, nargs=3, default=[16, 128, 128])
    p.add_argument("--pipeline-reps", type=int, default=1)
    p.add_argument("--device", default=None)
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args()

    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cpu = device.type == "cpu"
    payload: dict[str, Any] = {
        "benchmark": "models_speed",
        "device": "CPU (%d cores)" % os.cpu_count() if cpu else torch.cuda.get_device_name(device),
        "gpu": "not available in this session" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
        "threads": torch.get_num_threads(),
        "machine": machine_info(),
        "command": "python benchmarks/bench_models_speed.py " + " ".join(sys.argv[1:]),
    }
    t0 = time.perf_counter()
    payload["restorer"] = restorer_speed(args.restorer_presets, args.restorer_size, args.restorer_batch,
                                         {"tiny": 5, "small": 2, "full": 1} if cpu else {"tiny": 20, "small": 20,
                                                                                          "full": 10}, device,
                                         {"full": args.full_batch} if args.full_batch else None)
    payload["dgean"] = dgean_speed(args.dgean_presets, args.dgean_factors, args.dgean_block,
                                   {"tiny": 2, "medium": 2, "base": 2, "full": 1} if cpu
                                   else {"tiny": 20, "medium": 20, "base": 10, "full": 5}, device)
    if cpu:
        payload["cpu_time_model"] = fit_cpu_time_model(payload["dgean"], torch.get_num_threads())
    if args.train_factors:
        payload["dgean_train"] = dgean_train_speed(args.train_preset, args.train_factors, [4, 48, 48], 4,
                                                   3 if cpu else 10, device)
        if cpu and len(args.train_factors) > 1:
            payload["cpu_step_model"] = fit_step_model(payload["dgean_train"])
    if args.model.exists() and args.lr.exists():
        payload["pipeline"] = pipeline_speed(args.lr, args.model, args.pipeline_block, args.pipeline_reps, device)
    else:
        payload["pipeline"] = []
        print(f"skipping the pipeline part: {args.model} or {args.lr} missing (run bench_quality.py first)")
    payload["load_average_at_end"] = list(os.getloadavg())
    payload["total_wall_s"] = round(time.perf_counter() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "models_speed.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    (args.out / "models_speed.md").write_text(markdown(payload))
    print(markdown(payload))


if __name__ == "__main__":
    main()
