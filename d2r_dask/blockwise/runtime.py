"""Worker runtime: what a worker process keeps between tasks, and where it runs.

Each process holds one :class:`WorkerRuntime` (``RUNTIME``): its device and torch
thread count, the processor of the current model (loaded once per model, keyed by the
hash of its checkpoint), open handles on the job's source, output and tile scratch
arrays, and counters of blocks and seconds per stage (:func:`worker_stats`).
:func:`place_workers` (pure: unit-tested with faked hosts) gives each worker its own
GPU, with dask-cuda (which pins each worker's ``CUDA_VISIBLE_DEVICES``, so ``cuda:0`` is
its own GPU) and without it (workers of a host take ``cuda:0, 1, ...`` in name order),
and torch threads so threads x workers never exceed a host's cores
(``dask.system.CPU_COUNT``); :class:`WorkerSetup` applies it on every worker, including
one the nanny restarts after a crash; :func:`configure_workers` does both for a client.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

from distributed.diagnostics.plugin import WorkerPlugin

from ..io import stores
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
        self.overlap = os.environ.get("D2R_OVERLAP", "1") != "0"
        """Read the next batch and write the previous one in threads while the model runs
        (:func:`~.tasks.pipelined`); ``D2R_OVERLAP=0`` runs them one after the other."""
        self._lock = threading.Lock()  # the pipeline's reader and writer threads count and open arrays too

    def configure(self, device: str | None = None, threads: int | None = None) -> None:
        self.device, self.threads = device, threads
        if device:
            tune_backend(device)
        if threads and "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(int(threads))

    def stats(self) -> dict[str, Any]:
        return {"loads": self.loads, "blocks": self.blocks, "device": self.device, "threads": self.threads,
                "seconds": dict(self.seconds), "pid": os.getpid()}

    def add_seconds(self, stage: str, seconds: float) -> None:
        with self._lock:
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
            tune_backend(device)
            self.processors.clear()  # one model per worker at a time: a new job replaces the old one
            self.processors[key] = load_processor(spec, device)
            self.loads += 1
            log.info("loaded %s on %s (pid %d)", spec.kind, device, os.getpid())
        return self.processors[key]

    def cached(self, job: Job, kind: str, open_: Callable[[], Any]) -> Any:
        """An array handle of ``job``'s output, opened once per job (``kind`` names it)."""
        return self._array(job.output, job, kind, open_)

    def _array(self, path: str, job: Job, kind: str, open_: Callable[[], Any]) -> Any:
        # keyed by path *and* job hash: a rerun with ``overwrite`` or another layout
        # recreates the store, and a stale handle would write with the old chunking
        key = (path, job.token, kind)
        with self._lock:
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
        return self._array(job.output, job, "tiles", lambda: open_scratch(stores.join(job.state_dir, "tiles")))


RUNTIME = WorkerRuntime()
"""This process's runtime."""


def tune_backend(device: str) -> None:
    """Let cuDNN time its convolution algorithms once per input shape and keep the fastest
    (``cudnn.benchmark``) when ``device`` is a GPU: a block job runs a few shapes many times.
    The chosen algorithm may differ between processes, so GPU outputs agree to rounding, not
    bit for bit (they never did across GPU models); the CPU is untouched."""
    if str(device).startswith("cuda"):
        import torch

        torch.backends.cudnn.benchmark = True


def configure_worker(device: str | None = None, threads: int | None = None) -> None:
    """Set this process's device and torch thread count (run on each worker)."""
    RUNTIME.configure(device, threads)


def worker_stats() -> dict[str, Any]:
    """What this process did: processors loaded, blocks run, seconds per stage (read,
    model, write, marker), and its settings (for tests, logs and benchmarks)."""
    return RUNTIME.stats()


@dataclass(frozen=True)
class WorkerHost:
    """What a worker reports about where it runs (the input of :func:`place_workers`)."""

    name: str  # the worker's name: kept when the nanny restarts it, unlike its address
    host: str
    cpus: int  # ``dask.system.CPU_COUNT``: cgroup-, affinity- and SLURM-aware
    gpus: int  # CUDA devices this process sees
    visible: str | None = None  # its CUDA_VISIBLE_DEVICES


@dataclass(frozen=True)
class Placement:
    """Where one worker runs: its torch device (None: the CPU) and torch threads."""

    device: str | None
    threads: int
    gpu: str | None = None  # the physical GPU (its CUDA_VISIBLE_DEVICES entry), for logs and tests


def _name_key(name: str) -> tuple[int, int, str]:
    """Natural order of worker names: ``2`` before ``10``, numbers before other names."""
    tail = name.rsplit("-", 1)[-1]
    return (0, int(tail), name) if tail.isdigit() else (1, 0, name)


def place_workers(workers: Sequence[WorkerHost]) -> dict[str, Placement]:
    """One device and a thread count per worker, deterministic, from what each reports.

    Per host, torch threads are ``cpus // workers on the host`` (never oversubscribed).
    GPUs: where the workers of a host see different first devices (dask-cuda rotates
    ``CUDA_VISIBLE_DEVICES`` per worker, as do schedulers that give each process its
    own GPU), or each sees one GPU, every worker is already pinned and uses ``cuda:0``.
    Where they share one view of several GPUs (a plain ``LocalCluster``), the workers
    of the host, in natural name order, take ``cuda:0``, ``cuda:1``, ... in turn; more
    workers than GPUs share them round-robin (logged). Hosts without GPUs run on the CPU.
    """
    by_host: dict[str, list[WorkerHost]] = {}
    for w in workers:
        by_host.setdefault(w.host, []).append(w)
    out: dict[str, Placement] = {}
    for host, ws in by_host.items():
        ws = sorted(ws, key=lambda w: _name_key(w.name))
        cpus = min(max(1, w.cpus) for w in ws)
        threads = max(1, cpus // len(ws))
        firsts = [_visible(w)[0] if _visible(w) else None for w in ws]
        pinned = len(ws) > 1 and None not in firsts and len(set(firsts)) == len(ws)
        n_gpus = min(w.gpus for w in ws)
        if n_gpus and not pinned and len(ws) > n_gpus:
            log.warning("%s: %d workers share %d GPU(s), several models per GPU; start one worker per GPU",
                        host, len(ws), n_gpus)
        for rank, w in enumerate(ws):
            if w.gpus < 1:
                out[w.name] = Placement(None, threads)
                continue
            index = 0 if pinned or w.gpus == 1 else rank % w.gpus
            visible = _visible(w)
            gpu = visible[index] if index < len(visible) else str(index)
            out[w.name] = Placement(f"cuda:{index}", threads, gpu)
    return out


def _visible(w: WorkerHost) -> list[str]:
    return [v.strip() for v in (w.visible or "").split(",") if v.strip()]


def describe_worker() -> tuple[int, int, str | None]:
    """``(cpus, gpus, CUDA_VISIBLE_DEVICES)`` of this process (run on each worker)."""
    from dask.system import CPU_COUNT

    from .cluster import gpu_count

    return CPU_COUNT, gpu_count(), os.environ.get("CUDA_VISIBLE_DEVICES")


class WorkerSetup(WorkerPlugin):
    """Gives every worker, including ones the nanny restarts after a crash (same name, new
    address), the device and torch threads :func:`place_workers` chose for its name. A
    worker that joined after the placement gets its host's thread count and, where it is
    pinned to one GPU, ``cuda:0``; otherwise the default device, until the next job places it."""

    name = "d2r-worker-setup"

    def __init__(self, placements: Mapping[str, Placement], threads: Mapping[str, int]) -> None:
        self.placements, self.threads = dict(placements), dict(threads)

    def setup(self, worker: Any) -> None:
        p = self.placements.get(str(worker.name))
        if p is None:
            host = worker.address.rsplit(":", 1)[0]
            _, gpus, _ = describe_worker()
            p = Placement("cuda:0" if gpus == 1 else None, self.threads.get(host, 1))
            log.info("worker %s joined after placement: %s", worker.name, p)
        configure_worker(p.device, p.threads)


def configure_workers(client: Any) -> dict[str, Placement]:
    """Place every worker of ``client``'s cluster (:func:`place_workers`) and keep the
    placement for restarted workers (a worker plugin); return it, by worker name."""
    info = client.scheduler_info(n_workers=-1)["workers"]
    reports = client.run(describe_worker)
    hosts = [WorkerHost(str(info[addr].get("name", addr)), addr.rsplit(":", 1)[0], cpus, gpus, visible)
             for addr, (cpus, gpus, visible) in reports.items() if addr in info]
    placements = place_workers(hosts)
    threads = {h.host: placements[h.name].threads for h in hosts}
    client.register_plugin(WorkerSetup(placements, threads))
    log.info("placement: %s", {n: (p.device, p.threads, p.gpu) for n, p in placements.items()})
    return placements
