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
import socket
from typing import Any, Iterator

from distributed import Client, LocalCluster

from ..errors import InputError

log = logging.getLogger(__name__)


SCHEDULER_TIMEOUT = 5.0
"""Seconds to wait for a given scheduler before saying it cannot be reached."""


def check_scheduler(address: str, timeout: float = SCHEDULER_TIMEOUT) -> None:
    """Raise :class:`InputError` naming ``address`` unless something accepts connections there.

    A plain TCP connection with a short timeout: cheap enough for ``--dry-run``, and a
    clear line instead of the client's traceback after its long default timeout.
    """
    from distributed.comm import get_address_host_port

    try:
        host, port = get_address_host_port(address)
    except (ValueError, TypeError) as exc:
        raise InputError(f"--scheduler {address!r} is not a scheduler address ({exc}); "
                         "give it as tcp://HOST:PORT (e.g. tcp://node1:8786)") from exc
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        raise _unreachable(address, timeout, exc) from exc


def _unreachable(address: str, timeout: float, exc: BaseException) -> InputError:
    return InputError(
        f"cannot reach the Dask scheduler at {address} within {timeout:g} s ({exc.__class__.__name__}: "
        f"{str(exc) or 'timed out'}); check that the scheduler is running, that host and port are right and "
        "reachable from here (firewall), or drop --scheduler to use a local cluster"
    )


def check_workers(n_workers: int | None) -> None:
    """Refuse a worker count below one (a cluster without workers waits forever)."""
    if n_workers is not None and (isinstance(n_workers, bool) or int(n_workers) < 1):
        raise InputError(f"--workers must be >= 1 (got {n_workers}); a cluster without workers never runs a task")


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

    check_workers(n_workers)
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
    An unreachable ``scheduler`` is an :class:`InputError` after :data:`SCHEDULER_TIMEOUT` seconds.
    """
    if isinstance(scheduler, Client):
        yield scheduler
        return
    if scheduler:
        check_scheduler(scheduler)
        try:
            client = Client(scheduler, timeout=SCHEDULER_TIMEOUT)
        except (OSError, TimeoutError) as exc:  # something listens there, but not a scheduler
            raise _unreachable(scheduler, SCHEDULER_TIMEOUT, exc) from exc
        with client:
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
