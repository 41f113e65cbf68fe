"""Precision and memory layout side by side: float32 vs channels-last vs bf16 autocast.

The measurements behind :mod:`d2r_dask.models.precision`, on this machine, one process, in turn:

* DGEAN training step (AdamW, Stage III's loss) on the CPU ``auto`` batch: 4 patches of
  ``patch_lr_z`` x 48 x 48 LR voxels;
* DGEAN inference on one Stage IV block with its halo;
* the restorer (ConditionalNAFNet) training step (8 x 64², Stage I's batch) and inference on
  64 slices of 252 x 250 pixels (a Stage II batch).

Each is timed in three forms: ``float32`` (contiguous, the layout before channels-last),
``float32 channels-last`` (what the code runs on a CPU), and ``bf16 channels-last`` (autocast;
what it runs on a GPU). The bf16 rows are skipped on a CPU without native bf16 (AMX or
AVX512-BF16), which would emulate it. Prints a table and saves ``results/precision_<cpu>.json``::

    python benchmarks/bench_precision.py                    # about a minute on 2 cores
    python benchmarks/bench_precision.py --dgean-preset full --device cuda
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import dgean_train_step, machine_info, print_table, repeat_timed, save  # noqa: E402


def native_bf16(device: Any) -> bool:
    """Whether ``device`` computes bf16 natively: a GPU, or a CPU with AMX or AVX512-BF16."""
    import torch

    if device.type != "cpu":
        return True
    checks = [getattr(torch.cpu, n, None) for n in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(check() for check in checks if check is not None)


def _forms(native: bool) -> list[tuple[str, bool, bool]]:
    forms = [("float32", False, False), ("float32 channels-last", True, False)]
    return forms + ([("bf16 channels-last", True, True)] if native else [])


def _timed(name: str, form: str, fn: Callable[[], Any], reps: int, sync: Callable[[], None]) -> dict[str, Any]:
    fn()  # warm-up: allocations and oneDNN / cuDNN primitive creation
    times = repeat_timed(fn, reps, sync)
    return {"what": name, "form": form, "median_s": statistics.median(times), "min_s": min(times), "reps": reps}


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    from d2r_dask.models.dgean import DGEAN, dgean_config
    from d2r_dask.models.nafnet import ConditionalNAFNet, nafnet_config
    from d2r_dask.models.precision import channels_last, channels_last_input

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    s, rows = args.factor, []
    for form, cl, bf16 in _forms(native_bf16(device) or args.force_bf16):
        fmt = channels_last if cl else (lambda m: m)
        inp = channels_last_input if cl else (lambda x: x)
        amp = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)  # noqa: E731

        dgean_step = dgean_train_step(args.dgean_preset, s, (args.patch_lr_z, 48, 48), device,
                                      channels_last=cl, bf16=bf16)
        rows.append(_timed(f"DGEAN {args.dgean_preset} train step", form, dgean_step, args.reps, sync))
        torch.manual_seed(0)
        net = fmt(DGEAN(dgean_config(args.dgean_preset, s, "decimate")).to(device)).eval()
        block = inp(torch.rand(1, 1, *args.block, device=device))

        def dgean_infer() -> None:
            with torch.no_grad(), amp():
                net(block)

        rows.append(_timed(f"DGEAN {args.dgean_preset} block {'x'.join(map(str, args.block))}", form, dgean_infer,
                           max(2, args.reps // 5), sync))

        torch.manual_seed(0)
        rnet = fmt(ConditionalNAFNet(nafnet_config(args.restorer_preset)).to(device))
        ropt = torch.optim.AdamW(rnet.parameters(), lr=1e-3)
        x, t = inp(torch.rand(8, 2, 64, 64, device=device)), torch.full((8,), 50.0, device=device)

        def restorer_step() -> None:
            with amp():
                loss = (rnet(x, t).float() - 0.5).abs().mean()
            ropt.zero_grad(set_to_none=True)
            loss.backward()
            ropt.step()

        rows.append(_timed(f"restorer {args.restorer_preset} train step", form, restorer_step, args.reps, sync))
        sl, ts = inp(torch.rand(64, 2, 252, 250, device=device)), torch.full((64,), 50.0, device=device)

        def restorer_infer() -> None:
            with torch.no_grad(), amp():
                rnet(sl, ts)

        rows.append(_timed(f"restorer {args.restorer_preset} 64 slices", form, restorer_infer,
                           max(2, args.reps // 5), sync))
    for row in rows:  # speed-up against float32 contiguous, same task
        base = next(r for r in rows if r["what"] == row["what"] and r["form"] == "float32")
        row["speedup"] = round(base["median_s"] / row["median_s"], 2)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--factor", type=int, default=4)
    ap.add_argument("--dgean-preset", default="medium")
    ap.add_argument("--restorer-preset", default="tiny")
    ap.add_argument("--patch-lr-z", type=int, default=4)
    ap.add_argument("--block", type=int, nargs=3, default=[93, 174, 174], help="a Stage IV block with its halo (LR)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--force-bf16", action="store_true", help="time bf16 even where the CPU would emulate it")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    info = {**machine_info(), "torch_threads": torch.get_num_threads(),
            "native_bf16": native_bf16(torch.device(args.device))}
    rows = run(args)
    print(f"{info['cpu_model']}, {info['torch_threads']} threads, native bf16: {info['native_bf16']}, "
          f"load {info['load_average_at_start'][0]:.2f}")
    print_table(rows, ["what", "form", "median_s", "min_s", "speedup"])
    card = info["cpu_model"] if args.device == "cpu" else torch.cuda.get_device_name(args.device)
    name = re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-")
    save(f"precision_{name}", {"machine": info, "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
