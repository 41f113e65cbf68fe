"""Training patches: the former path (a Dask graph per patch) vs Zarr reads through a chunk
cache, and the data loader with 0, 1, 2 worker processes.

On a real volume (FIB-25, 250^3 uint8, converted to Zarr with chunks ``--chunks``; a synthetic
one of that size when ``../shared/data`` is absent):

* ``patches``: patches/s of one random patch read at a time, Stage I's (1 x P x P) and Stage
  III's ((D+1)*s x P x P): ``dask`` (``open_volume(...).data[box].compute()``, what
  ``PatchSource.read`` did before) against ``zarr`` (straight Zarr reads, no cache: every
  patch decodes the chunks it touches, as on a volume much larger than the cache) and
  ``zarr+cache`` (``PatchSource.read`` now; this volume fits in its cache);
* ``batches``: whole training batches (patches read, augmented, degraded, stacked) per second
  through :func:`~d2r_dask.stages.loader.step_loader` with 0, 1 and 2 loader processes, and
  the former path (batches drawn in the training process from Dask reads);
* ``training``: steps/s of Stage I training (tiny preset) with 0, 1 and 2 loader processes,
  which is what sets the CPU default (``default_loader_workers``).

Each configuration runs ``--repeats`` times, interleaved; the best run counts (the machine
may be shared: its load average is recorded at start and end).

    python benchmarks/bench_train_loader.py                 # a few minutes on 2 cores
    python benchmarks/bench_train_loader.py --steps 60 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from _bench import machine_info, print_table, save, synthetic_volume

FIB25 = Path(__file__).resolve().parents[2] / "shared" / "data" / "fib25_sample1_10nm.tif"


def volume(workdir: Path, chunks: tuple[int, int, int]) -> tuple[Path, str]:
    """The benchmark volume as OME-Zarr: FIB-25 where present, else synthetic of its size."""
    from d2r_dask.io.geometry import Geometry
    from d2r_dask.io.volume import is_complete, write_volume

    path = workdir / f"fib25_{'x'.join(map(str, chunks))}.zarr"
    if FIB25.is_file():
        if not (path.exists() and is_complete(path)):
            import tifffile

            write_volume(path, tifffile.imread(FIB25), Geometry((10.0, 10.0, 10.0)), chunks=chunks, overwrite=True)
        return path, "fib25_sample1_10nm (real FIB-SEM, 250^3 uint8)"
    return synthetic_volume(workdir / "synthetic.zarr", (250, 250, 250), chunks=chunks), "synthetic 250^3 uint8"


class DaskPatchSource:
    """``PatchSource`` reading as it did before: one Dask graph per patch."""

    def __init__(self, source: Any) -> None:
        from d2r_dask.io.volume import open_volume

        self.inner, self.data = source, open_volume(source.path).data

    def read(self, rng: np.random.Generator, patch: Any, *, z_align: int = 1) -> np.ndarray:
        src = self.inner
        first = -(-src.z_range[0] // z_align) * z_align
        n_starts = (src.z_range[1] - patch[0] - first) // z_align + 1
        z0 = first + z_align * rng.integers(0, n_starts)
        y0 = rng.integers(0, src.shape[1] - patch[1] + 1)
        x0 = rng.integers(0, src.shape[2] - patch[2] + 1)
        block = self.data[z0 : z0 + patch[0], y0 : y0 + patch[1], x0 : x0 + patch[2]]
        return src.intensity.to_unit(block.compute(scheduler="synchronous"))


def rate(fn: Callable[[], int], seconds: float) -> float:
    """Items per second of ``fn`` (returns items done) called for about ``seconds``."""
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        done += fn()
    return done / (time.perf_counter() - t0)


def bench_patches(path: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    from d2r_dask.data.patches import PatchSource, step_rng

    s, p = args.factor, args.patch
    shapes = {"stage I (1 x P x P)": (1, p, p), "stage III ((D+1)s x P x P)": ((args.lr_z + 1) * s, p, p)}
    rows = []
    for name, shape in shapes.items():
        best: dict[str, float] = {}
        for _ in range(args.repeats):
            for label, make in (("dask", lambda: DaskPatchSource(PatchSource(path))),
                                ("zarr", lambda: PatchSource(path, cache_bytes=0)),
                                ("zarr+cache", lambda: PatchSource(path))):
                src, step = make(), iter(range(10**9))
                r = rate(lambda: (src.read(step_rng(0, next(step)), shape, z_align=s if "III" in name else 1), 1)[1],
                         args.seconds)
                best[label] = max(best.get(label, 0.0), r)
        rows.append({"patch": name, "shape": list(shape), **{f"{k} patches/s": v for k, v in best.items()},
                     "speedup": best["zarr+cache"] / best["dask"]})
    return rows


def bench_batches(path: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    from d2r_dask.data.patches import AxialBatches, LateralBatches, PatchSource
    from d2r_dask.stages.loader import step_loader

    s, p, n = args.factor, args.patch, args.batch_size
    makers = {"stage I": lambda src: LateralBatches(src, p, s, "decimate"),
              "stage III": lambda src: AxialBatches(src, args.lr_z * s, p, s, "decimate")}
    configs: list[tuple[str, Callable[[Any], Any], int]] = [
        ("dask, in process", lambda src: DaskPatchSource(src), 0),
        *[(f"loader, {w} process(es)", lambda src: src, w) for w in (0, 1, 2)]]
    rows = []
    for stage, maker in makers.items():
        best: dict[str, float] = {}
        for _ in range(args.repeats):
            for label, wrap, workers in configs:
                batches = maker(wrap(PatchSource(path)))
                t0 = time.perf_counter()
                count = sum(1 for _ in step_loader(batches, seed=0, batch_size=n, start=0, steps=args.batches,
                                                   workers=workers, device=torch.device("cpu")))
                best[label] = max(best.get(label, 0.0), count * n / (time.perf_counter() - t0))
        rows.append({"batches": stage, **{f"{k} patches/s": v for k, v in best.items()}})
    return rows


def bench_training(path: Path, args: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    import shutil

    from d2r_dask.stages.train import RestorerConfig, TrainConfig, train_restorer

    best: dict[int, float] = {}
    for _ in range(args.repeats):
        for workers in (0, 1, 2):
            out = workdir / f"train-{workers}"
            shutil.rmtree(out, ignore_errors=True)
            tcfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, checkpoint_every=args.steps,
                               val_every=args.steps, val_patches=2, device="cpu", loader_workers=workers)
            t0 = time.perf_counter()
            train_restorer(path, out, RestorerConfig(factor=args.factor, patch=args.patch), tcfg, progress=False)
            best[workers] = max(best.get(workers, 0.0), args.steps / (time.perf_counter() - t0))
    return [{"training": f"stage I tiny, loader {w} process(es)", "steps/s": v, "vs 0": v / best[0]}
            for w, v in best.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, nargs=3, default=(32, 128, 128))
    ap.add_argument("--patch", type=int, default=64)
    ap.add_argument("--factor", type=int, default=4)
    ap.add_argument("--lr-z", type=int, default=8, help="Stage III patch depth in LR slices.")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--batches", type=int, default=24, help="Batches per loader measurement.")
    ap.add_argument("--seconds", type=float, default=3.0, help="Seconds per patch-rate measurement.")
    ap.add_argument("--steps", type=int, default=30, help="Training steps per training measurement.")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "d2r-bench-loader")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    args.workdir.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    path, what = volume(args.workdir, tuple(args.chunks))
    print(f"volume: {what}, chunks {args.chunks}; torch threads {torch.get_num_threads()}; "
          f"load {info['load_average_at_start']}")
    patches = bench_patches(path, args)
    print_table(patches, list(patches[0]))
    batches = bench_batches(path, args)
    print_table(batches, list(batches[0]))
    training = bench_training(path, args, args.workdir)
    print_table(training, list(training[0]))
    save("train_loader", {"machine": {**info, "load_average_at_end": list(os.getloadavg()),
                                      "torch_threads": torch.get_num_threads()},
                          "volume": what, "params": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                          "patches": patches, "batches": batches, "training": training})


if __name__ == "__main__":
    main()
