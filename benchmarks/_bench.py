"""Shared helpers of the engine benchmarks: machine description, input volumes, tables, JSON."""

from __future__ import annotations

import datetime
import json
import os
import platform
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

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


class RssSampler:
    """Samples the RSS of every worker (``client.run``) and of the scheduler
    (``client.run_on_scheduler``) from a background thread of the client."""

    def __init__(self, client: Any, interval: float = 0.25) -> None:
        self.client, self.interval = client, interval
        self.workers: dict[str, list[int]] = {}
        self.scheduler: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                for addr, rss in self.client.run(_rss).items():
                    self.workers.setdefault(addr, []).append(rss)
                self.scheduler.append(self.client.run_on_scheduler(_rss))
            except Exception:  # a worker restarting; sample again
                pass
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, float]:
        mib = 2**20
        peaks = [max(v) for v in self.workers.values() if v]
        return {
            "worker_peak_mib": max(peaks) / mib if peaks else float("nan"),
            "worker_start_mib": max(v[0] for v in self.workers.values()) / mib if peaks else float("nan"),
            "scheduler_peak_mib": max(self.scheduler) / mib if self.scheduler else float("nan"),
            "samples": len(self.scheduler),
        }


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
