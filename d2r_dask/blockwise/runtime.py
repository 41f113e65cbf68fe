"""Worker runtime: what a worker process keeps between tasks, and where it runs.

Each process holds one :class:`WorkerRuntime` (``RUNTIME``): its device and torch
thread count, the processor of the current model (loaded once per model, keyed by the
hash of its checkpoint), open handles on the job's source, output and tile scratch
arrays, and counters of blocks and seconds per stage (:func:`worker_stats`).
:class:`WorkerSetup` gives every worker, including one the nanny restarts after a
crash, its torch threads and device; :func:`configure_workers` computes them so torch
threads x workers never exceed a host's cores, one GPU per worker on multi-GPU hosts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

from distributed.diagnostics.plugin import WorkerPlugin

from ..io.volume import open_reader, open_scratch, output_array
from .processors import BlockProcessor, ModelSpec, load_processor

if TYPE_CHECKING:
    from .jobstate import Job

log = logging.getLogger(__name__)


class WorkerRuntime:
    """The per-process cache and counters of a worker (or of the client in serial mode)."""

    def __init__(self) -> None:
        self.device: str | None = None
        self.threads: int | None = None
        self.processors: dict[str, BlockProcessor] = {}
        self.arrays: dict[tuple[str, str, str], Any] = {}
        self.loads = 0
        self.blocks = 0
        self.seconds: dict[str, float] = {}

    def configure(self, device: str | None = None, threads: int | None = None) -> None:
        self.device, self.threads = device, threads
        if threads and "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(int(threads))

    def stats(self) -> dict[str, Any]:
        return {"loads": self.loads, "blocks": self.blocks, "device": self.device, "threads": self.threads,
                "seconds": dict(self.seconds), "pid": os.getpid()}

    def add_seconds(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    @contextlib.contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add_seconds(stage, time.perf_counter() - t0)

    def processor(self, spec: ModelSpec, token: str = "") -> BlockProcessor:
        """This worker's processor for ``spec``, loaded once. ``token`` (the hash of the
        checkpoint's bytes) makes a retrained checkpoint at the same path load anew."""
        key = json.dumps(spec.to_dict(), sort_keys=True) + token
        if key not in self.processors:
            import torch

            if self.threads:
                torch.set_num_threads(int(self.threads))
            device = self.device or os.environ.get("D2R_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
            self.processors.clear()  # one model per worker at a time: a new job replaces the old one
            self.processors[key] = load_processor(spec, device)
            self.loads += 1
            log.info("loaded %s on %s (pid %d)", spec.kind, device, os.getpid())
        return self.processors[key]

    def _array(self, path: str, job: Job, kind: str, open_: Callable[[], Any]) -> Any:
        # keyed by path *and* job hash: a rerun with ``overwrite`` or another layout
        # recreates the store, and a stale handle would write with the old chunking
        key = (path, job.token, kind)
        if key not in self.arrays:
            if len(self.arrays) > 8:
                self.arrays.clear()
            self.arrays[key] = open_()
        return self.arrays[key]

    def source(self, job: Job) -> Any:
        """The job's input reader (reads straight from Zarr)."""
        return self._array(job.source, job, "source", lambda: open_reader(job.source, level=job.level))

    def output(self, job: Job) -> Any:
        """The job's output array."""
        return self._array(job.output, job, "output", lambda: output_array(job.output))

    def tiles(self, job: Job) -> Any:
        """The job's tile scratch array (blend mode)."""
        return self._array(job.output, job, "tiles", lambda: open_scratch(job.state_dir / "tiles"))


RUNTIME = WorkerRuntime()
"""This process's runtime."""


def configure_worker(device: str | None = None, threads: int | None = None) -> None:
    """Set this process's device and torch thread count (run on each worker)."""
    RUNTIME.configure(device, threads)


def worker_stats() -> dict[str, Any]:
    """What this process did: processors loaded, blocks run, seconds per stage (read,
    model, write, marker), and its settings (for tests, logs and benchmarks)."""
    return RUNTIME.stats()


class WorkerSetup(WorkerPlugin):
    """Gives every worker, including ones the nanny restarts after a crash, its torch
    thread count and device: ``threads[host]`` threads, and on hosts with several GPUs
    (without dask-cuda pinning) the GPU numbered by the worker's name."""

    name = "d2r-worker-setup"

    def __init__(self, threads: Mapping[str, int], gpus: Mapping[str, int]) -> None:
        self.threads, self.gpus = dict(threads), dict(gpus)

    def setup(self, worker: Any) -> None:
        host = worker.address.rsplit(":", 1)[0]
        gpus = self.gpus.get(host, 0)
        try:
            position = int(str(worker.name).rsplit("-", 1)[-1])
        except ValueError:
            position = abs(hash(worker.name))
        configure_worker(f"cuda:{position % gpus}" if gpus > 1 else None, self.threads.get(host))


def configure_workers(client: Any) -> None:
    """Torch threads = cores of each host / workers on it (torch and Dask never
    oversubscribe), one GPU per worker on multi-GPU hosts; kept for restarted workers."""
    from collections import Counter

    workers = client.scheduler_info(n_workers=-1)["workers"]
    per_host = Counter(addr.rsplit(":", 1)[0] for addr in workers)
    info = client.run(lambda: (os.cpu_count() or 1,
                               __import__("d2r_dask.blockwise.cluster", fromlist=["x"]).gpu_count()))
    threads: dict[str, int] = {}
    gpus: dict[str, int] = {}
    for addr, (cpus, n_gpu) in info.items():
        host = addr.rsplit(":", 1)[0]
        threads[host] = max(1, cpus // per_host[host])
        gpus[host] = n_gpu
    client.register_plugin(WorkerSetup(threads, gpus))
