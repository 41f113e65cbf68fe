"""Shared helpers of the engine benchmarks: machine description, input volumes, models,
cluster options, timing, memory sampling, tables, JSON."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

RESULTS = Path(__file__).resolve().parent / "results"


def machine_info() -> dict[str, Any]:
    """CPU count, load, library versions and the date: what a number depends on."""
    import dask
    import distributed
    import numpy
    import psutil
    import torch
    import zarr

    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average_at_start": list(os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "dask": dask.__version__,
        "distributed": distributed.__version__,
        "zarr": zarr.__version__,
        "numpy": numpy.__version__,
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def synthetic_volume(path: Path, shape: Sequence[int], *, chunks: Sequence[int] = (32, 128, 128),
                     seed: int = 0) -> Path:
    """A synthetic vEM volume on disk (``d2r_dask.data.synth``), reused when already there."""
    from d2r_dask.io.geometry import Geometry
    from d2r_dask.io.volume import is_complete, open_volume, write_volume

    if path.exists() and is_complete(path) and tuple(open_volume(path).shape) == tuple(shape):
        return path
    try:
        from d2r_dask.data.synth import synth_dask

        data = synth_dask(tuple(shape), chunks=tuple(min(c, n) for c, n in zip(chunks, shape)), seed=seed)
    except ImportError:  # before the synthetic generator exists: random data
        import dask.array as da

        data = da.random.default_rng(seed).integers(0, 256, size=tuple(shape), chunks=tuple(chunks),
                                                    dtype="uint8")
    write_volume(path, data, Geometry((40.0, 5.0, 5.0)), chunks=tuple(min(c, n) for c, n in zip(chunks, shape)),
                 overwrite=True)
    return path


def random_dgean(directory: Path, factor: int, preset: str) -> Path:
    """A DGEAN checkpoint with random weights, written as the trainer writes one (speed does
    not depend on training)."""
    import torch

    from d2r_dask.models.checkpoint import save_checkpoint
    from d2r_dask.models.dgean import DGEAN, dgean_config

    torch.manual_seed(0)
    cfg = dgean_config(preset, factor, "decimate")
    net = DGEAN(cfg)
    config = {"kind": "dgean", "model": cfg.to_dict(), "preset": preset, "factor": factor, "mode": "decimate",
              "intensity": {"low": 0.0, "high": 255.0}, "step": 0}
    return save_checkpoint(directory, weights=net.state_dict(), config=config)


def dgean_train_step(preset: str, factor: int, patch_lr: Sequence[int], device: Any, *, batch: int = 4,
                     channels_last: bool = True, bf16: bool = False) -> Callable[[], None]:
    """One DGEAN training step as Stage III takes it (forward, hf loss, backward, AdamW) on
    random patches of ``batch`` x ``patch_lr`` LR voxels, seeded; returns the step to time."""
    import torch

    from d2r_dask.models.dgean import DGEAN, dgean_config
    from d2r_dask.models.losses import hf_loss
    from d2r_dask.models.precision import channels_last as cl_model, channels_last_input

    torch.manual_seed(0)
    net = DGEAN(dgean_config(preset, factor, "decimate")).to(device)
    lr = torch.rand(batch, 1, *patch_lr, device=device)
    if channels_last:
        net, lr = cl_model(net), channels_last_input(lr)
    hr = torch.rand(batch, 1, patch_lr[0] * factor, *patch_lr[1:], device=device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)

    def step() -> None:
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            loss = hf_loss(net(lr).float(), hr, weight=0.5)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def cluster_options(ap: argparse.ArgumentParser, *, memory_limit: str, workdir: str,
                    memory_help: str | None = None) -> None:
    """``--workers``, ``--memory-limit`` (per worker) and ``--workdir`` (under the temp folder)."""
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--memory-limit", default=memory_limit, help=memory_help)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / workdir)


@contextlib.contextmanager
def local_cluster(args: argparse.Namespace) -> Iterator[Any]:
    """A client of a LocalCluster of ``args.workers`` processes x 1 thread, ``args.memory_limit`` each."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                      memory_limit=args.memory_limit) as cluster, Client(cluster) as client:
        yield client


def params(args: argparse.Namespace) -> dict[str, Any]:
    """The command-line arguments as JSON-ready values (paths as strings)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def print_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def save(name: str, payload: Mapping[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    print(f"saved {path}")
    return path


class _Sampler:
    """Calls ``sample()`` every ``interval`` seconds from a background thread while in a ``with``."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> None:
        raise NotImplementedError

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> Any:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


class RssSampler(_Sampler):
    """Samples the RSS of every worker (``client.run``) and of the scheduler
    (``client.run_on_scheduler``) from a background thread of the client."""

    def __init__(self, client: Any, interval: float = 0.25) -> None:
        super().__init__(interval)
        self.client = client
        self.workers: dict[str, list[int]] = {}
        self.scheduler: list[int] = []

    def sample(self) -> None:
        try:
            for addr, rss in self.client.run(_rss).items():
                self.workers.setdefault(addr, []).append(rss)
            self.scheduler.append(self.client.run_on_scheduler(_rss))
        except Exception:  # a worker restarting; sample again
            pass

    def summary(self) -> dict[str, float]:
        mib = 2**20
        peaks = [max(v) for v in self.workers.values() if v]
        return {
            "worker_peak_mib": max(peaks) / mib if peaks else float("nan"),
            "worker_start_mib": max(v[0] for v in self.workers.values()) / mib if peaks else float("nan"),
            "scheduler_peak_mib": max(self.scheduler) / mib if self.scheduler else float("nan"),
            "samples": len(self.scheduler),
        }


class LocalRss(_Sampler):
    """Peak RSS of this process, sampled from a thread (a local mode's 'worker')."""

    def __init__(self, interval: float = 0.25) -> None:
        import psutil

        super().__init__(interval)
        self.proc, self.samples = psutil.Process(), [psutil.Process().memory_info().rss]

    def sample(self) -> None:
        self.samples.append(self.proc.memory_info().rss)

    def summary(self) -> dict[str, float]:
        return {"worker_start_mib": self.samples[0] / 2**20, "worker_peak_mib": max(self.samples) / 2**20,
                "samples": len(self.samples)}


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def repeat_timed(fn: Callable[[], Any], reps: int, sync: Callable[[], None] = lambda: None) -> list[float]:
    """Wall seconds of each of ``reps`` calls of ``fn``, ``sync()`` (a device's queue drained) in each."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times
