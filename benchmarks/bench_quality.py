"""Quality of the D2R pipeline on real FIB-SEM with ground truth (fib25, 10 nm isotropic).

For each axial factor ``s`` (default 4 and 8), following the evaluation protocol of D2R.md:

1. convert ``fib25_sample1_10nm.tif`` (250^3, 10 nm) to OME-Zarr (the ground truth, GT);
2. decimate it along z by ``s`` (the LR input; the pipeline never sees anything else);
3. Stage I: train the diffusion restorer on XY patches of the LR volume;
4. Stage II: restore the XZ/YZ slices of an ROI (all LR slices x the central ``roi_xy``^2)
   into the pseudo-HR;
5. Stage III: train DGEAN on the pseudo-HR; Stage IV: DGEAN over the whole LR volume (SR);
6. supervised upper bound: DGEAN trained on (decimated GT, GT) pairs from GT slices
   ``[0, split)`` only, run over the whole LR volume;
7. score against the GT: linear / cubic z-interpolation of the LR, pseudo-HR, SR, supervised.

Scores are reported on three regions (GT voxel indices):

* ``heldout``: z ``split..250`` x full XY: the region the supervised DGEAN never trained on;
  the fair table for linear / cubic / D2R SR / supervised;
* ``heldout_roi``: the held-out z x the Stage II ROI: the only region where every method,
  the pseudo-HR included, has a value;
* ``full``: the whole volume (linear / cubic / D2R SR; the supervised model saw half of it).

Outputs ``<out>/quality_fib25.json`` and ``<out>/quality_fib25.md`` plus, per factor and region,
the evaluation report (``report.md``, ``panels.png``, ``frc.png``, ``metrics.json``) in
``<out>/quality_fib25_x<s>/<region>/``. Large volumes and checkpoints go to ``--work``.

    python benchmarks/bench_quality.py --factors 4 8 --restorer-steps 1000 --dgean-steps 400
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any


sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import machine_info  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_GT = HERE.parent.parent / "shared" / "data" / "fib25_sample1_10nm.tif"
log = logging.getLogger("bench_quality")


def _done_training(folder: Path, steps: int) -> bool:
    try:
        cfg = json.loads((folder / "config.json").read_text())
        return int(cfg.get("step", -1)) >= steps and (folder / "metrics.csv").exists()
    except (OSError, ValueError):
        return False


def _last_val(folder: Path) -> dict[str, float]:
    import csv

    try:
        rows = list(csv.DictReader((folder / "metrics.csv").open()))
    except OSError:
        return {}
    return {k: float(v) for k, v in rows[-1].items()} if rows else {}


def _val_curve(folder: Path) -> list[dict[str, float]]:
    import csv

    try:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader((folder / "metrics.csv").open())]
    except OSError:
        return []


def _crop_gt(gt_path: Path, out: Path, box: Any) -> Path:
    """A GT sub-volume as its own OME-Zarr, placed at its true physical position."""
    from d2r_dask.io.geometry import Geometry
    from d2r_dask.io.volume import is_complete, open_volume, write_volume

    if out.exists() and is_complete(out):
        return out
    gt = open_volume(gt_path)
    g = Geometry.of(gt)
    translation = tuple(t + a * v for t, a, v in zip(g.translation, box.start, g.voxel_size))
    write_volume(out, gt.data[box.slices], Geometry(g.voxel_size, translation), overwrite=True,
                 name=out.stem, inputs=[str(gt_path)])
    return out


def run_factor(args: argparse.Namespace, s: int, gt: Path, work: Path, out: Path) -> dict[str, Any]:
    from d2r_dask.data.degrade import AxialDegradation, degrade_volume
    from d2r_dask.evaluation.evaluate import evaluate
    from d2r_dask.io.geometry import Box
    from d2r_dask.stages.infer import infer
    from d2r_dask.stages.restore import restore
    from d2r_dask.stages.train import (DGEANTrainConfig, RestorerConfig, TrainConfig, train_dgean,
                                train_restorer)
    from d2r_dask.io.geometry import Geometry
    from d2r_dask.io.volume import is_complete, open_volume, write_volume

    wd = work / f"x{s}"
    wd.mkdir(parents=True, exist_ok=True)
    times_path = wd / "times.json"  # stage times survive reruns that reuse finished stages
    times: dict[str, float] = json.loads(times_path.read_text()) if times_path.exists() else {}
    record: dict[str, Any] = {"factor": s, "mode": "decimate", "times_s": times}

    def timed(name: str, fn: Any) -> Any:
        t0 = time.perf_counter()
        result = fn()
        times[name] = round(time.perf_counter() - t0, 1)
        times_path.write_text(json.dumps(times, indent=1))
        log.info("x%d %s: %.1f s", s, name, times[name])
        return result

    # -- LR input ------------------------------------------------------------------------
    lr = wd / "lr.zarr"
    if not (lr.exists() and is_complete(lr)):
        def make_lr() -> None:
            vol = degrade_volume(open_volume(gt), AxialDegradation(s, "decimate"))
            write_volume(lr, vol.data, Geometry.of(vol), overwrite=True, inputs=[str(gt)], name="lr",
                         metadata={"degradation": vol.attrs["degradation"], "source": str(gt)})
        timed("degrade", make_lr)
    lr_shape = tuple(open_volume(lr).shape)
    record["lr_shape"] = lr_shape
    if args.baselines_only:
        return _score_baselines(args, s, lr, work / "gt.zarr", wd, out, record, timed)

    # -- Stage I -------------------------------------------------------------------------
    restorer = wd / "restorer"
    rcfg = RestorerConfig(factor=s, preset=args.restorer_preset, patch=args.restorer_patch)
    rt = TrainConfig(steps=args.restorer_steps, batch_size=args.restorer_batch, lr=args.restorer_lr,
                     checkpoint_every=args.restorer_val_every, val_every=args.restorer_val_every, seed=args.seed)
    if not _done_training(restorer, rt.steps):
        timed("stage1_train_restorer", lambda: train_restorer(lr, restorer, rcfg, rt, resume=True,
                                                               progress=args.progress))
    record["restorer"] = {"preset": rcfg.preset, "patch": rcfg.patch, "steps": rt.steps, "batch": rt.batch_size,
                          "lr": rt.lr, "ema": rt.ema, "sampler": rcfg.sampler, "sampler_steps": rcfg.sampler_steps,
                          "validation": _val_curve(restorer), "checkpoint": str(restorer)}

    # -- Stage II (ROI) ------------------------------------------------------------------
    ny, nx = lr_shape[1:]
    r = min(args.roi_xy, ny, nx)
    y0, x0 = (ny - r) // 2, (nx - r) // 2
    roi = Box((0, y0, x0), (lr_shape[0], y0 + r, x0 + r))
    pseudo = wd / "pseudo_hr.zarr"
    if not (pseudo.exists() and is_complete(pseudo)):
        # one tile covers the whole ROI depth (no z seams); an xy halo only at the ROI border
        block = (lr_shape[0], r, r)
        timed("stage2_restore", lambda: restore(lr, pseudo, restorer, roi=roi, block=block,
                                                halo=(0, args.halo_xy, args.halo_xy), slice_batch=args.slice_batch,
                                                serial=True, overwrite=True, progress=args.progress))
    record["stage2"] = {"roi_lr": [list(roi.start), list(roi.stop)], "block": [lr_shape[0], r, r],
                        "halo": [0, args.halo_xy, args.halo_xy], "sampler": rcfg.sampler,
                        "sampler_steps": rcfg.sampler_steps, "network_evaluations_per_slice": rcfg.sampler_steps,
                        "orientations": ["xz", "yz"], "engine": "serial (one process)"}

    # -- Stage III + IV (self-supervised D2R) ----------------------------------------------
    dt = TrainConfig(steps=args.dgean_steps, batch_size=args.dgean_batch, lr=args.dgean_lr,
                     checkpoint_every=args.dgean_val_every, val_every=args.dgean_val_every, seed=args.seed)
    dcfg = DGEANTrainConfig(factor=s, preset=args.dgean_preset, patch_xy=args.dgean_patch_xy,
                            patch_lr_z=args.dgean_patch_lr_z)
    dgean = wd / "dgean"
    if not _done_training(dgean, dt.steps):
        timed("stage3_train_dgean", lambda: train_dgean(pseudo, dgean, dcfg, dt, resume=True,
                                                         progress=args.progress))
    sr = wd / "sr.zarr"
    if not (sr.exists() and is_complete(sr)):
        timed("stage4_infer", lambda: infer(lr, sr, dgean, block=tuple(args.infer_block), serial=True,
                                            overwrite=True, progress=args.progress, levels=1))
    record["dgean"] = {"preset": dcfg.preset, "patch": [dcfg.patch_lr_z * s, dcfg.patch_xy, dcfg.patch_xy],
                       "steps": dt.steps, "batch": dt.batch_size, "lr": dt.lr, "hf_weight": dcfg.hf_weight,
                       "trained_on": "pseudo-HR (Stage II ROI)", "validation": _val_curve(dgean),
                       "infer_block": args.infer_block}

    # -- supervised upper bound -----------------------------------------------------------
    gt_zarr = work / "gt.zarr"
    n_gt = open_volume(gt_zarr).shape[0]
    split = args.split if args.split else n_gt // 2
    sup = wd / "dgean_supervised"
    scfg = DGEANTrainConfig(factor=s, preset=args.dgean_preset, patch_xy=args.dgean_patch_xy,
                            patch_lr_z=args.dgean_patch_lr_z, supervised=True)
    if not _done_training(sup, dt.steps):
        timed("supervised_train_dgean", lambda: train_dgean(gt_zarr, sup, scfg, dt, resume=True,
                                                             progress=args.progress, z_range=(0, split)))
    sup_sr = wd / "sr_supervised.zarr"
    if not (sup_sr.exists() and is_complete(sup_sr)):
        timed("supervised_infer", lambda: infer(lr, sup_sr, sup, block=tuple(args.infer_block), serial=True,
                                                overwrite=True, progress=args.progress, levels=1))
    record["supervised"] = {"trained_on_gt_z": [0, split], "validation": _val_curve(sup),
                            "note": f"trained on GT slices 0..{split - 1} (its last tenth for validation), "
                                    f"scored on GT slices {split}..{n_gt - 1}"}

    # -- scoring -------------------------------------------------------------------------
    regions = {
        "heldout": Box((split, 0, 0), (n_gt, ny, nx)),
        "heldout_roi": Box((split, y0, x0), (n_gt, y0 + r, x0 + r)),
        "full": None,
    }
    cands = {
        "heldout": {"d2r_sr": sr, "supervised": sup_sr},
        "heldout_roi": {"pseudo_hr": pseudo, "d2r_sr": sr, "supervised": sup_sr},
        "full": {"d2r_sr": sr},
    }
    record["regions"] = {}
    for name, box in regions.items():
        ref = gt_zarr if box is None else _crop_gt(gt_zarr, wd / f"gt_{name}.zarr", box)
        ev_dir = out / f"quality_fib25_x{s}" / name
        summary = timed(f"evaluate_{name}", lambda: evaluate(ref, cands[name], lr_path=lr, factor=s,
                                                             mode="decimate", out_dir=ev_dir))
        res = {}
        for method, m in summary["results"].items():
            res[method] = {k: m[k] for k in ("region", "psnr", "ssim", "z_resolution_nm", "xz_ring_resolution_nm",
                                              "x_resolution_nm", "boundary_dice")}
        record["regions"][name] = {"gt_box": None if box is None else [list(box.start), list(box.stop)],
                                   "results": res, "report": str(ev_dir.relative_to(out))}
    return record


def _score_baselines(args: argparse.Namespace, s: int, lr: Path, gt_zarr: Path, wd: Path, out: Path,
                     record: dict[str, Any], timed: Any) -> dict[str, Any]:
    """Only the z-interpolations of the LR (no training): the cheap part of the protocol."""
    from d2r_dask.evaluation.evaluate import evaluate
    from d2r_dask.io.geometry import Box
    from d2r_dask.io.volume import open_volume

    n_gt, ny, nx = open_volume(gt_zarr).shape
    split = args.split if args.split else n_gt // 2
    record["baselines_only"] = True
    record["regions"] = {}
    for name, box in {"heldout": Box((split, 0, 0), (n_gt, ny, nx)), "full": None}.items():
        ref = gt_zarr if box is None else _crop_gt(gt_zarr, wd / f"gt_{name}.zarr", box)
        ev_dir = out / f"quality_fib25_x{s}" / name
        summary = timed(f"evaluate_{name}", lambda: evaluate(ref, {}, lr_path=lr, factor=s, mode="decimate",
                                                             out_dir=ev_dir))
        res = {m: {k: v[k] for k in ("region", "psnr", "ssim", "z_resolution_nm", "xz_ring_resolution_nm",
                                     "x_resolution_nm", "boundary_dice")} for m, v in summary["results"].items()}
        record["regions"][name] = {"gt_box": None if box is None else [list(box.start), list(box.stop)],
                                   "results": res, "report": str(ev_dir.relative_to(out))}
    return record


METHOD_LABEL = {"linear": "linear z-interp.", "cubic": "cubic z-interp.", "pseudo_hr": "pseudo-HR (Stage II)",
                "d2r_sr": "D2R SR (Stage IV, self-supervised)", "supervised": "supervised DGEAN (upper bound)"}
ORDER = ["linear", "cubic", "pseudo_hr", "d2r_sr", "supervised"]


def markdown(payload: dict[str, Any]) -> str:
    lines = ["# D2R quality on fib25 (FlyEM FIB-SEM, 10 nm isotropic ground truth)", "",
             f"Device: {payload['device']}; torch {payload['machine']['torch']}; "
             f"{payload['machine']['cpu_model']}; {payload['threads']} torch threads; "
             f"date {payload['machine']['date']}.", "",
             f"Command: `{payload['command']}`", ""]
    region_text = {
        "heldout": "held-out GT slices z {z0}..{z1} x full XY (supervised DGEAN never trained here)",
        "heldout_roi": "held-out z {z0}..{z1} x Stage II ROI y {y0}..{y1}, x {x0}..{x1} (every method has values here)",
        "full": "whole volume (the supervised model trained on half of it, so it is left out)",
    }
    for rec in payload["factors"]:
        s = rec["factor"]
        lines += [f"## x{s} (decimate; LR shape {tuple(rec['lr_shape'])})", ""]
        if rec.get("baselines_only"):
            lines += ["- learned stages **not run** for this factor (`--baselines-only`: CPU time budget); "
                      "only the z-interpolation baselines are scored"]
        else:
            rs, dg, st2, sup = rec["restorer"], rec["dgean"], rec["stage2"], rec["supervised"]
            lines += [
                f"- Stage I: NAFNet preset `{rs['preset']}`, {rs['steps']} steps x batch {rs['batch']} of "
                f"{rs['patch']}^2 XY patches, lr {rs['lr']}, EMA {rs['ema']}; Stage II sampler "
                f"{st2['sampler']}@{st2['sampler_steps']} on LR ROI {st2['roi_lr'][0]}..{st2['roi_lr'][1]} "
                f"(XZ and YZ, fused by mean)",
                f"- Stage III: DGEAN preset `{dg['preset']}`, {dg['steps']} steps x batch {dg['batch']} of "
                f"{tuple(dg['patch'])} HR patches of the pseudo-HR, lr {dg['lr']}; Stage IV blocks "
                f"{tuple(dg['infer_block'])} LR over the whole LR volume",
                f"- supervised DGEAN: same preset/steps, {sup['note']}",
            ]
        lines.append("- wall time per stage (s): " + ", ".join(f"{k} {v}" for k, v in rec["times_s"].items()))
        for name, txt in rec.get("stage_notes", {}).items():
            lines.append(f"- {name}: {txt}")
        lines.append("")
        for region, data in rec["regions"].items():
            box = data["gt_box"]
            fmt = {}
            if box:
                fmt = dict(z0=box[0][0], z1=box[1][0] - 1, y0=box[0][1], y1=box[1][1] - 1, x0=box[0][2],
                           x1=box[1][2] - 1)
            lines += [f"### x{s}, {region}: " + region_text[region].format(**fmt), "",
                      "| method | PSNR (dB) | SSIM XY | SSIM XZ | SSIM YZ | z-res. FRC 1/7 (nm) | membrane Dice |",
                      "|---|---|---|---|---|---|---|"]
            for m in ORDER:
                if m not in data["results"]:
                    continue
                r = data["results"][m]
                lines.append(f"| {METHOD_LABEL[m]} | {r['psnr']:.2f} | {r['ssim']['xy']:.3f} | {r['ssim']['xz']:.3f} "
                             f"| {r['ssim']['yz']:.3f} | {r['z_resolution_nm']:.1f} | {r['boundary_dice']:.3f} |")
            lines += ["", f"Report with panels and FRC curves: `{data['report']}/report.md`", ""]
    if payload.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in payload["notes"]] + [""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gt", type=Path, default=DEFAULT_GT)
    p.add_argument("--factors", type=int, nargs="+", default=[4, 8])
    p.add_argument("--restorer-steps", type=int, default=1000)
    p.add_argument("--restorer-batch", type=int, default=8)
    p.add_argument("--restorer-lr", type=float, default=2e-4)
    p.add_argument("--restorer-patch", type=int, default=64)
    p.add_argument("--restorer-val-every", type=int, default=250)
    p.add_argument("--dgean-steps", type=int, default=400)
    p.add_argument("--dgean-batch", type=int, default=4)
    p.add_argument("--dgean-lr", type=float, default=2e-4)
    p.add_argument("--dgean-patch-xy", type=int, default=48)
    p.add_argument("--dgean-patch-lr-z", type=int, default=8)
    p.add_argument("--dgean-val-every", type=int, default=100)
    p.add_argument("--presets", nargs=2, default=["tiny", "tiny"], metavar=("RESTORER", "DGEAN"),
                   help="network presets of the restorer and of DGEAN")
    p.add_argument("--roi-xy", type=int, default=64, help="Stage II ROI: all LR slices x the central N^2 (LR voxels)")
    p.add_argument("--halo-xy", type=int, default=8, help="Stage II halo read around the ROI in x/y")
    p.add_argument("--slice-batch", type=int, default=64, help="Stage II slices per forward pass")
    p.add_argument("--infer-block", type=int, nargs=3, default=[16, 128, 128])
    p.add_argument("--split", type=int, default=0, help="supervised training on GT z < split (default: half)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    p.add_argument("--work", type=Path, default=Path("/tmp/d2r_bench_quality"))
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--fresh", action="store_true", help="delete --work first (otherwise finished stages are reused)")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--baselines-only", action="store_true",
                   help="only degrade and score the z-interpolations (no training; minutes instead of an hour)")
    args = p.parse_args()
    args.restorer_preset, args.dgean_preset = args.presets
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    import torch

    from d2r_dask.io.convert import convert
    from d2r_dask.io.volume import is_complete

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.gt.exists():
        sys.exit(f"ground truth {args.gt} not found (it lives in ../shared/data beside the project)")
    if args.fresh and args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    gt_zarr = args.work / "gt.zarr"
    if not (gt_zarr.exists() and is_complete(gt_zarr)):
        convert(args.gt, gt_zarr, voxel_size=(10.0, 10.0, 10.0), overwrite=True)
    payload: dict[str, Any] = {
        "benchmark": "quality_fib25",
        "ground_truth": str(args.gt),
        "device": "CPU (2 cores)" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
        "gpu": "not measured: no GPU in this session" if not torch.cuda.is_available() else "used",
        "threads": torch.get_num_threads(),
        "machine": machine_info(),
        "command": "python benchmarks/bench_quality.py " + " ".join(sys.argv[1:]),
        "factors": [],
    }
    json_path, md_path = args.out / "quality_fib25.json", args.out / "quality_fib25.md"
    previous = {}
    if json_path.exists():  # keep factors run earlier (e.g. x4 and x8 in separate invocations)
        try:
            previous = {r["factor"]: r for r in json.loads(json_path.read_text()).get("factors", [])}
        except ValueError:
            previous = {}
    for s in args.factors:
        previous[s] = run_factor(args, s, gt_zarr, args.work, args.out)
        payload["factors"] = [previous[k] for k in sorted(previous)]
        payload["total_wall_s"] = round(time.perf_counter() - t0, 1)
        json_path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
        md_path.write_text(markdown(payload))
        print(md_path.read_text())


if __name__ == "__main__":
    main()
