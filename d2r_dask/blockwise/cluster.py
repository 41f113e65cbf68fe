"""Connect to a dask.distributed cluster: an existing one, or a local one sized for this machine.

``connect(None)`` starts a ``LocalCluster`` (or dask-cuda's ``LocalCUDACluster``,
one worker per GPU, where GPUs and dask-cuda are present); ``connect("tcp://...")``
joins a running scheduler (dask-jobqueue on SLURM, a dask-cuda node, ...);
``connect(client)`` uses a ``Client`` the caller made. Threads are never
oversubscribed: each worker runs one task at a time, and the engine gives torch
``cores // workers on the host`` threads.

Without an explicit ``client=``, the path API (``restore``, ``infer``, ``run``) and the lazy
API run on the process's default ``distributed.Client`` (the one a notebook made last) when
there is one (:func:`current_client`, :func:`resolve_client`), else in this process.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

from distributed import Client, LocalCluster

log = logging.getLogger(__name__)


def gpu_count() -> int:
    """GPUs visible to this process (0 without torch/CUDA)."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # pragma: no cover - broken CUDA installs
        return 0


def local_cluster(*, n_workers: int | None = None, memory_limit: str | None = "auto",
                  dashboard: bool = True) -> LocalCluster:
    """A cluster for this machine: one worker per GPU, else ``min(2, cores)`` CPU workers.

    With dask-cuda each worker is pinned to its GPU by ``CUDA_VISIBLE_DEVICES``; without
    it the workers are named 0..n-1 and :func:`~.runtime.place_workers` gives worker i
    ``cuda:i``. Cores are ``dask.system.CPU_COUNT`` (cgroup and affinity aware).
    """
    from dask.system import CPU_COUNT

    gpus = gpu_count()
    if gpus:
        try:
            from dask_cuda import LocalCUDACluster

            log.info("starting LocalCUDACluster with %d GPU workers", gpus)
            return LocalCUDACluster(threads_per_worker=1, memory_limit=memory_limit,
                                    dashboard_address=":0" if dashboard else None)
        except ImportError:
            log.info("dask-cuda not installed; pinning one LocalCluster worker per GPU")
    n = n_workers or gpus or min(2, CPU_COUNT)
    return LocalCluster(n_workers=n, threads_per_worker=1, processes=True, memory_limit=memory_limit,
                        dashboard_address=":0" if dashboard else None)


@contextlib.contextmanager
def connect(scheduler: str | Client | None = None, *, n_workers: int | None = None,
            memory_limit: str | None = "auto") -> Iterator[Client]:
    """Yield a client for ``scheduler`` (address, Client, or None for a local cluster).

    Clusters started here are closed on exit; given clients and schedulers are left running.
    """
    if isinstance(scheduler, Client):
        yield scheduler
        return
    if scheduler:
        with Client(scheduler) as client:
            log.info("connected to %s (dashboard %s)", scheduler, client.dashboard_link)
            yield client
        return
    with local_cluster(n_workers=n_workers, memory_limit=memory_limit) as cluster, Client(cluster) as client:
        log.info("started %s (dashboard %s)", cluster, client.dashboard_link)
        yield client


def current_client() -> Client | None:
    """The default ``distributed.Client`` of this process (a notebook's), or None.

    None inside a task on a Dask worker (a task must not submit the blockwise job to the
    cluster it runs on) and for a client that is closed or closing.
    """
    from distributed import default_client, get_worker

    try:
        get_worker()
        return None  # inside a worker's task
    except ValueError:
        pass
    try:
        client = default_client()
    except ValueError:
        return None
    return client if client.status in ("running", "connecting", "newly-created") else None


def resolve_client(client: Any = None, serial: bool = False) -> Any:
    """The client a job runs on: ``client`` if given, none when ``serial``, else the default
    client if one exists (logged), else None (this process)."""
    if client is not None or serial:
        return client
    client = current_client()
    if client is not None:
        log.info("using the default Dask client (%s); pass client= or serial=True to choose", client.dashboard_link)
    return client
