"""Ablation of the Stage I/II restorer at EQUAL CPU TIME, on real FIB-SEM with ground truth.

Dataset: FlyEM fib25 (FIB-SEM, ``fib25_sample1_10nm.tif``, 250^3 uint8, 10 nm isotropic), the
ground truth (GT). For each axial factor ``s`` the LR input is the GT decimated along z
(``gt[::s]``, voxel ``10 s x 10 x 10`` nm); no method ever sees the GT. Every learned method
gets the same wall-clock training budget (``--minutes``) on the same threads:

* **D2R restorer, fast recipe (ours)**: x0 prediction, predict-and-refine. Two short probes (n and 2n
  steps) measure seconds per step without a run's fixed costs; the run then trains ``budget / sec_per_step`` steps. Stage II
  (XZ + YZ slices of the whole LR volume, fused) with its default sampler ``posterior@1`` and
  again with ``posterior@--refine-steps``;
* **D2R restorer, authors' recipe**: noise prediction, ``t`` uniform; same budget logic;
  Stage II with ``posterior@5`` (``benchmarks/results/samplers_fib25_x4.md``: at least as good
  as the authors' ``sde@100``, 20x fewer network evaluations);
* **2D regression peer** (``_peer.py``, D2R.md's bar): plain 10-layer CNN trained on XY slices
  of the LR, applied to linearly upsampled XZ and YZ slices, averaged;
* linear and cubic z-interpolation of the LR.

Everything is scored by ``d2r_dask.evaluation.evaluate`` on the whole GT volume (or the
central ``--crop`` in y/x). Outputs ``<out>/restorer_ablation.json`` and ``.md``; volumes and
checkpoints go to ``--work``.

    python benchmarks/bench_restorer_ablation.py --factors 4 8 --minutes 6 --threads 2
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import machine_info, print_table  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_GT = HERE.parent.parent / "shared" / "data" / "fib25_sample1_10nm.tif"
VOXEL_NM = 10.0
log = logging.getLogger("bench_restorer_ablation")

LABELS = {
    "linear": "linear z-interp.",
    "cubic": "cubic z-interp.",
    "fast_p1": "D2R restorer, fast recipe (ours), posterior@1",
    "fast_pN": "D2R restorer, fast recipe (ours), posterior@{n}",
    "authors_p5": "D2R restorer, authors' recipe, posterior@5",
    "peer": "2D regression peer (D2R.md bar)",
}
ORDER = ["linear", "cubic", "fast_p1", "fast_pN", "authors_p5", "peer"]


def _label(key: str, refine: int) -> str:
    return LABELS[key].format(n=refine)


def _train_restorer_budget(lr: Path, wd: Path, name: str, rcfg: Any, budget_s: float, args: argparse.Namespace
                           ) -> dict[str, Any]:
    """Probe seconds/step with ``--probe-steps`` steps, then train ``budget / sec_per_step`` steps."""
    from d2r_dask.stages.train import TrainConfig, default_restorer_lr, train_restorer

    lr_rate = default_restorer_lr(rcfg)
    probe_dir, model_dir = wd / f"{name}_probe", wd / name

    def tcfg(steps: int) -> Any:
        return TrainConfig(steps=steps, batch_size=args.batch, lr=lr_rate, seed=args.seed, device="cpu",
                           val_every=steps, checkpoint_every=steps)

    # two probes, n and 2n steps: their difference is the cost of n steps without the fixed cost of a
    # run (its one validation, which samples with the recipe's sampler, and its checkpoint)
    n = args.probe_steps
    t0 = time.perf_counter()
    short = train_restorer(lr, probe_dir, rcfg, tcfg(n), overwrite=True, progress=False)
    long = train_restorer(lr, probe_dir, rcfg, tcfg(2 * n), overwrite=True, progress=False)
    probe_wall = time.perf_counter() - t0
    sec_per_step = max(1e-3, (long["seconds"] - short["seconds"]) / n)
    probe = {"seconds": long["seconds"]}
    steps = max(1, int(budget_s / sec_per_step))
    log.info("%s: probes of %d and %d steps: %.3f s/step -> %d steps for %.0f s", name, n, 2 * n, sec_per_step,
             steps, budget_s)
    t0 = time.perf_counter()
    summary = train_restorer(lr, model_dir, rcfg, tcfg(steps), overwrite=True, progress=args.progress)
    wall = time.perf_counter() - t0
    shutil.rmtree(probe_dir, ignore_errors=True)
    return {"recipe": rcfg.recipe, "preset": rcfg.preset, "patch": rcfg.patch, "batch": args.batch, "lr": lr_rate,
            "probe_steps": args.probe_steps, "probe_seconds": round(probe["seconds"], 2),
            "probe_wall_s": round(probe_wall, 2), "sec_per_step": sec_per_step, "steps": steps,
            "train_seconds": round(summary["seconds"], 1), "train_wall_s": round(wall, 1),
            "self_check": summary.get("self_check"), "final_loss": summary.get("final_loss"),
            "checkpoint": str(model_dir)}


def _restore(lr: Path, out: Path, model: Path, sampler: str | None, steps: int | None,
             args: argparse.Namespace) -> float:
    from d2r_dask.stages.restore import restore

    from d2r_dask.io.volume import open_volume

    shape = open_volume(lr).shape  # a block larger than the volume would only restore padding
    block = tuple(min(b, n) for b, n in zip(args.block, shape))
    halo = tuple(0 if b >= n else h for h, b, n in zip(args.halo, block, shape))
    t0 = time.perf_counter()
    restore(lr, out, model, block=block, halo=halo, sampler=sampler, steps=steps,
            seed=args.seed, serial=True, overwrite=True, progress=args.progress)
    return round(time.perf_counter() - t0, 1)


def run_factor(args: argparse.Namespace, s: int, gt: Any, gt_zarr: Path) -> dict[str, Any]:
    import numpy as np

    from _peer import apply_peer, train_peer
    from d2r_dask.evaluation.evaluate import evaluate
    from d2r_dask.io.geometry import Geometry, lr_transform, sr_transform
    from d2r_dask.io.volume import write_volume
    from d2r_dask.stages.train import RestorerConfig

    wd = args.work / f"x{s}"
    wd.mkdir(parents=True, exist_ok=True)
    budget = 60.0 * args.minutes
    lr_np = np.ascontiguousarray(gt[::s])
    lr = wd / "lr.zarr"
    lr_geom = Geometry(*lr_transform((VOXEL_NM,) * 3, (0.0, 0.0, 0.0), s, "decimate"))
    write_volume(lr, lr_np, lr_geom, overwrite=True, name="lr", inputs=[str(args.gt)],
                 metadata={"degradation": {"factor": s, "mode": "decimate"}, "source": str(args.gt)})
    rec: dict[str, Any] = {"factor": s, "mode": "decimate", "lr_shape": list(lr_np.shape),
                           "gt_shape": list(gt.shape), "budget_s": budget, "methods": {}}
    patch = min(args.patch, *lr_np.shape[1:])
    cands: dict[str, Path] = {}

    # -- D2R restorer, fast recipe (ours) -------------------------------------------------
    fast = _train_restorer_budget(lr, wd, "fast", RestorerConfig(s, preset=args.preset, patch=patch,
                                                                   recipe="fast"), budget, args)
    out = wd / "fast_p1.zarr"
    fast_p1 = dict(fast, sampler="posterior@1 (default)", stage2_s=_restore(lr, out, wd / "fast", None, None, args))
    cands["fast_p1"] = out
    out = wd / "fast_pN.zarr"
    fast_pn = dict(fast, sampler=f"posterior@{args.refine_steps}",
                   stage2_s=_restore(lr, out, wd / "fast", "posterior", args.refine_steps, args))
    cands["fast_pN"] = out
    rec["methods"]["fast_p1"], rec["methods"]["fast_pN"] = fast_p1, fast_pn

    # -- D2R restorer, authors' recipe ---------------------------------------------------
    # sampler posterior@5 is also what its validation / self-check uses (sde@100 would cost 20x)
    authors = _train_restorer_budget(lr, wd, "authors", RestorerConfig(s, preset=args.preset, patch=patch,
                                                                         recipe="authors", sampler="posterior",
                                                                         sampler_steps=5), budget, args)
    out = wd / "authors_p5.zarr"
    rec["methods"]["authors_p5"] = dict(authors, sampler="posterior@5",
                                        stage2_s=_restore(lr, out, wd / "authors", "posterior", 5, args))
    cands["authors_p5"] = out

    # -- 2D regression peer ----------------------------------------------------------------
    t0 = time.perf_counter()
    model, steps = train_peer(lr_np, s, budget, seed=args.seed, log_every=60.0 if args.progress else 0.0)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    sr = apply_peer(model, lr_np, s)
    sr8 = np.clip(np.rint(sr * 255.0), 0, 255).astype(np.uint8)
    out = wd / "peer.zarr"
    write_volume(out, sr8, Geometry(*sr_transform(lr_geom.voxel_size, lr_geom.translation, s, "decimate")),
                 overwrite=True, name="peer", inputs=[str(lr)], metadata={"factor": s, "mode": "decimate"})
    apply_s = time.perf_counter() - t0
    rec["methods"]["peer"] = {"network": "10 x conv3x3, 32 ch, ReLU, residual on input", "loss": "L1",
                              "optimizer": "AdamW 1e-3, cosine over the time budget", "patch": min(64, patch),
                              "batch": 16, "steps": steps, "train_seconds": round(train_s, 1),
                              "stage2_s": round(apply_s, 1), "sampler": "-"}
    cands["peer"] = out
    del sr, sr8, model

    # -- scoring ---------------------------------------------------------------------------
    t0 = time.perf_counter()
    summary = evaluate(gt_zarr, {k: str(v) for k, v in cands.items()}, lr_path=lr, factor=s, mode="decimate",
                       out_dir=None, report=False)
    rec["evaluate_s"] = round(time.perf_counter() - t0, 1)
    rec["scores"] = {}
    for name, r in summary["results"].items():
        stripes = r.get("stripes") or {}
        rec["scores"][name] = {"psnr": r["psnr"], "ssim": r["ssim"], "z_resolution_nm": r["z_resolution_nm"],
                               "stripe_vs_gt": stripes.get("stripe_vs_gt"), "region": r.get("region")}
    if not args.keep_volumes:
        for p in cands.values():
            shutil.rmtree(p, ignore_errors=True)
    return rec


def _fmt(v: Any, spec: str) -> str:
    try:
        return format(float(v), spec)
    except (TypeError, ValueError):
        return "-"


def table_rows(rec: dict[str, Any], refine: int) -> list[dict[str, Any]]:
    rows = []
    for key in ORDER:
        sc = rec["scores"].get(key)
        if sc is None:
            continue
        m = rec["methods"].get(key, {})
        rows.append({"method": _label(key, refine), "PSNR": _fmt(sc["psnr"], ".2f"),
                     "SSIM-XZ": _fmt(sc["ssim"]["xz"], ".3f"), "SSIM-YZ": _fmt(sc["ssim"]["yz"], ".3f"),
                     "z-res nm": _fmt(sc["z_resolution_nm"], ".1f"), "stripe/GT": _fmt(sc["stripe_vs_gt"], ".2f"),
                     "steps": m.get("steps", "-"), "train s": _fmt(m.get("train_seconds"), ".0f"),
                     "stage II s": _fmt(m.get("stage2_s"), ".0f")})
    return rows


COLUMNS = ["method", "PSNR", "SSIM-XZ", "SSIM-YZ", "z-res nm", "stripe/GT", "steps", "train s", "stage II s"]


def markdown(payload: dict[str, Any]) -> str:
    mi = payload["machine"]
    refine = payload["refine_steps"]
    crop = payload["crop"]
    lines = ["# Stage I/II restorer ablation at equal CPU time (FlyEM fib25, FIB-SEM)", "",
             f"Ground truth: `{Path(payload['ground_truth']).name}` (FlyEM fib25, FIB-SEM, 250^3 uint8, 10 nm "
             f"isotropic){'' if not crop else f', central {crop}x{crop} crop in y/x'}; LR = GT decimated along z "
             "by s (`gt[::s]`). No method sees the GT.", "",
             f"Budget: {payload['minutes']} min of training wall clock per learned method; "
             f"{payload['threads']} torch threads; {mi['cpu_count']} CPUs ({mi['cpu_model']}); torch {mi['torch']}; "
             f"date {mi['date']}; load average before {payload['load_before']}, after {payload['load_after']}.", "",
             f"Command: `{payload['command']}`", ""]
    for rec in payload["factors"]:
        s = rec["factor"]
        lines += [f"## x{s} (LR shape {tuple(rec['lr_shape'])}, GT {tuple(rec['gt_shape'])})", "",
                  "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        for row in table_rows(rec, refine):
            lines.append("| " + " | ".join(str(row[c]) for c in COLUMNS) + " |")
        lines.append("")
        for key in ("fast_p1", "authors_p5"):
            m = rec["methods"].get(key)
            if m:
                sc = m.get("self_check") or {}
                lines.append(f"- {_label(key, refine).split(',')[1].strip()}: probes of {m['probe_steps']} and "
                             f"{2 * m['probe_steps']} steps ({m['sec_per_step']:.3f} s/step) -> {m['steps']} steps, "
                             f"trained {m['train_seconds']} s; preset `{m['preset']}`, batch {m['batch']} x "
                             f"{m['patch']}^2, lr {m['lr']}; Stage I self-check: "
                             + (f"{sc.get('psnr', float('nan')):.2f} dB, margin {sc.get('margin_db', float('nan')):+.2f}"
                                f" dB vs {sc.get('interpolation')}" if sc else "n/a"))
        p = rec["methods"].get("peer")
        if p:
            lines.append(f"- peer: {p['steps']} steps of batch {p['batch']} x {p['patch']}^2 in {p['train_seconds']} s")
        lines.append(f"- scoring: {rec['evaluate_s']} s")
        lines.append("")
    lines += [
        "## How to read it", "",
        "- Every learned row gets the same training budget on the same machine and threads. The peer trains for "
        "the budget's wall clock; a restorer trains a fixed number of steps (its runs are reproducible step by "
        "step), set from two probes of n and 2n steps whose difference leaves out a run's fixed costs (one "
        "validation, one checkpoint). `train s` is the time each really took: when the machine's load changes "
        "between probe and training, the budgets drift apart, so read the rows with it.",
        "- PSNR and SSIM are over the whole GT volume (data range 255); SSIM-XZ / -YZ are the orientations that "
        "z-restoration changes. `z-res nm`: Fourier-shell resolution along z at the 1/7 threshold (lower is "
        "better; the GT voxel is 10 nm). `stripe/GT`: energy at the z-sampling period relative to the GT's "
        "(1 = no stripes, > 1 = slice-periodic artefacts).",
        "- `stage II s`: restoring all XZ and YZ slices of the whole LR volume (restorer rows, serial engine) or "
        "applying the peer (peer row). posterior@N costs N network evaluations per slice.",
        f"- The authors' recipe is sampled with posterior@5, not its native sde@100: on the x4 fib25 model in "
        "`benchmarks/results/samplers_fib25_x4.md` posterior@5 was the best sampler, above sde@100 (the fastest "
        "setting within 0.2 dB of sde@100 there was posterior@3), at 20x fewer network evaluations.",
        "- The bar (D2R.md): a learned stage is worth its cost only if it beats linear interpolation *and* the "
        "2D regression peer at equal CPU time.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gt", type=Path, default=DEFAULT_GT)
    p.add_argument("--factors", type=int, nargs="+", default=[4, 8])
    p.add_argument("--minutes", type=float, default=6.0, help="training wall-clock budget per learned method")
    p.add_argument("--refine-steps", type=int, default=3, help="posterior steps of the second fast-recipe row")
    p.add_argument("--probe-steps", type=int, default=10)
    p.add_argument("--crop", type=int, default=0, help="central y/x crop of N voxels (0: the whole volume)")
    p.add_argument("--preset", default="tiny", help="restorer network preset")
    p.add_argument("--batch", type=int, default=8, help="restorer batch size")
    p.add_argument("--patch", type=int, default=64, help="restorer XY patch size")
    p.add_argument("--block", type=int, nargs=3, default=[32, 128, 128], help="Stage II LR block")
    p.add_argument("--halo", type=int, nargs=3, default=[4, 16, 16], help="Stage II halo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    p.add_argument("--work", type=Path, default=Path("/tmp/d2r-ablation"))
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--keep-volumes", action="store_true", help="keep the restored volumes in --work")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("d2r_dask", "distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    import tifffile
    import torch

    from d2r_dask.io.geometry import Geometry
    from d2r_dask.io.volume import write_volume

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.gt.exists():
        sys.exit(f"ground truth {args.gt} not found")
    load_before = [round(x, 2) for x in os.getloadavg()]
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    gt = tifffile.imread(args.gt)
    if args.crop:
        ny, nx = gt.shape[1:]
        c = min(args.crop, ny, nx)
        y0, x0 = (ny - c) // 2, (nx - c) // 2
        gt = gt[:, y0:y0 + c, x0:x0 + c]
    gt = gt.copy()
    gt_zarr = args.work / "gt.zarr"
    write_volume(gt_zarr, gt, Geometry((VOXEL_NM,) * 3, (0.0, 0.0, 0.0)), overwrite=True, name="gt",
                 inputs=[str(args.gt)])
    payload: dict[str, Any] = {
        "benchmark": "restorer_ablation",
        "dataset": "FlyEM fib25 (FIB-SEM), 10 nm isotropic",
        "ground_truth": str(args.gt),
        "crop": args.crop,
        "minutes": args.minutes,
        "refine_steps": args.refine_steps,
        "threads": torch.get_num_threads(),
        "machine": machine_info(),
        "load_before": load_before,
        "command": "python benchmarks/bench_restorer_ablation.py " + " ".join(sys.argv[1:]),
        "factors": [],
    }
    json_path, md_path = args.out / "restorer_ablation.json", args.out / "restorer_ablation.md"
    t0 = time.perf_counter()
    for s in args.factors:
        rec = run_factor(args, s, gt, gt_zarr)
        payload["factors"].append(rec)
        payload["load_after"] = [round(x, 2) for x in os.getloadavg()]
        payload["total_wall_s"] = round(time.perf_counter() - t0, 1)
        json_path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
        md_path.write_text(markdown(payload))
        print(f"\nx{s} ({args.minutes} min per learned method)")
        print_table(table_rows(rec, args.refine_steps), COLUMNS)
    print(f"\nload average before {load_before}, after {payload['load_after']}")
    print(f"saved {json_path} and {md_path}")


if __name__ == "__main__":
    main()
