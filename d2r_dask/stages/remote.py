"""Training on a cluster worker: Stages I and III run where the GPU is, not in the client.

:func:`train_on_cluster` submits a trainer (:func:`~.train.train_restorer`,
:func:`~.train.train_dgean`) as one task (``pure=False``) to one worker of the client's
cluster (:func:`training_worker`: one that declares a ``GPU`` resource, else one placed on
a GPU, else any), and waits for it::

    client (login node, notebook)                  worker (GPU)
      train_on_cluster ── submit ─────────────────▶ trainer(..., report=…)
        progress bar, log lines ◀── event topic ──   progress (≤ 1/s) and each validation row
                                                      checkpoints, metrics.csv → the work directory
        result / the worker's exception ◀── future

The worker writes the checkpoints, ``metrics.csv`` and ``validation.png`` itself, so the
output folder must be on a filesystem the client and the workers share (as every path
given to d2r on a cluster must). An error on the worker is raised in the client with its
original type and message.

The training lives as long as its client wants it: when the client stops waiting (Ctrl-C,
the client process dies, its connection is lost and the scheduler drops it), the scheduler
cancels the task and the training stops at the end of its current step; the last
checkpoint stays, and a rerun resumes from it. It does not outlive its client on purpose:
a rerun takes over the work directory's lock, and two trainers must never write one folder.
If the GPU worker it is pinned to leaves the cluster, the client raises
:class:`~d2r_dask.errors.WorkerLostError` (rerun to resume); a task that may go to any
worker is retried by Dask on another one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5
"""How often the client reads the training's progress."""
LOST_CHECK_SECONDS = 5.0
"""How often the client checks that the worker a training is pinned to is still there."""
REPORT_SECONDS = 1.0
"""How often the worker publishes it (and at every validation and at the end)."""


class TrainingCancelled(RuntimeError):
    """Raised on the worker, between two steps, once the client no longer wants the training."""


def training_worker(client: Any) -> tuple[dict[str, Any], str]:
    """Where a training task goes: ``(submit options, device type)``.

    Workers that declare a ``GPU`` resource (``dask worker --resources GPU=1``) get it by
    resource; else the first worker :func:`~d2r_dask.blockwise.runtime.configure_workers`
    placed on a GPU (and only it: a training sized for a GPU must not fall back to a CPU);
    else any worker, on its CPU.
    """
    from ..blockwise.runtime import configure_workers

    placements = configure_workers(client)  # each worker's device and torch threads, as the engine does
    info = client.scheduler_info(n_workers=-1)["workers"]
    if any(w.get("resources", {}).get("GPU") for w in info.values()):
        return {"resources": {"GPU": 1}}, "cuda"
    address = {str(w.get("name", a)): a for a, w in info.items()}
    for name, p in placements.items():
        if p.device is not None and name in address:
            return {"workers": [address[name]], "allow_other_workers": False}, "cuda"
    return {}, "cpu"


def trains_better_on_cluster(client: Any, device: str | None = None) -> bool:
    """Whether a training should go to a worker of ``client``'s cluster rather than stay here.

    Yes where the training worker has a GPU (``device``, the device type
    :func:`training_worker` gives, looked up if None) or no worker runs on this host (a login
    node or notebook next to a remote cluster); no for CPU workers on this machine (a
    notebook's ``LocalCluster``), whose one-thread workers would train slower than this process
    with all its cores.
    """
    if (device or training_worker(client)[1]) == "cuda":
        return True
    from distributed.comm import get_address_host
    from distributed.utils import get_ip

    here = {"127.0.0.1", "localhost", "::1"}
    for this_host in (get_ip, lambda: socket.gethostbyname(socket.gethostname())):  # worker addresses are IPs
        with contextlib.suppress(OSError, ValueError):
            here.add(this_host())
    hosts = {get_address_host(a) for a in client.scheduler_info(n_workers=-1)["workers"]}
    return not hosts <= here


def train_on_cluster(client: Any, trainer: Callable[..., dict[str, Any]], *args: Any, progress: bool = True,
                     **kwargs: Any) -> dict[str, Any]:
    """``trainer(*args, **kwargs)`` run on one worker of ``client``'s cluster; its summary.

    The summary gains ``worker`` (address), ``pid`` and ``thread`` (where it ran). Progress
    is shown here (a progress bar unless ``progress`` is False; validation rows logged) while
    the worker trains.
    """
    from distributed import wait
    from tqdm.auto import tqdm

    options, _ = training_worker(client)
    out = Path(args[1] if len(args) > 1 else kwargs["out"])
    topic = f"d2r-train-{out.name}-{uuid.uuid4().hex[:12]}"
    events: queue.SimpleQueue[Mapping[str, Any]] = queue.SimpleQueue()
    client.subscribe_topic(topic, lambda event: events.put(event[1]))  # called in the client's event loop
    future = client.submit(_train_here, trainer, args, kwargs, topic, pure=False, key=topic, **options)
    bar = tqdm(desc=f"train {out.name} (cluster)", unit="step", disable=not progress)

    def show(state: Mapping[str, Any]) -> None:
        bar.total, bar.n = state["steps"], state["step"]
        bar.set_postfix(loss=f"{state['loss']:.4g}")
        for row in state["rows"]:
            log.info("%s step %d: %s", out.name, row["step"],
                     ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "step"))

    checked = time.monotonic()
    try:
        while not future.done():
            with contextlib.suppress(TimeoutError):
                wait(future, timeout=POLL_SECONDS)
            if options.get("workers") and time.monotonic() - checked > LOST_CHECK_SECONDS and not future.done():
                _check_worker(client, options["workers"][0], out, bar.n)
                checked = time.monotonic()
            while not events.empty():
                show(events.get())
        summary = future.result()  # the worker's exception, as it was raised there
        with contextlib.suppress(queue.Empty):  # the last progress may arrive after the result
            while bar.n < summary["steps"]:
                show(events.get(timeout=2 * POLL_SECONDS))
        log.info("trained %s on worker %s (pid %d)", out, summary["worker"], summary["pid"])
        return summary
    finally:
        bar.close()
        if not future.done():
            future.cancel()  # Ctrl-C here: stop the training there (it stops after its current step)
        with contextlib.suppress(Exception):
            client.unsubscribe_topic(topic)


def _check_worker(client: Any, address: str, out: Path, step: int) -> None:
    """Raise :class:`WorkerLostError` if the worker at ``address`` left the cluster: the task,
    pinned to it, would wait for it forever (a restarted worker has another address)."""
    from ..errors import WorkerLostError

    if not client.run_on_scheduler(_has_worker, address):
        raise WorkerLostError(f"the worker {address} training {out} left the cluster (about step {step}); the last "
                              f"checkpoint in {out} stays: rerun the command to resume from it")


def _has_worker(address: str, dask_scheduler: Any = None) -> bool:
    return address in dask_scheduler.workers


def _train_here(trainer: Callable[..., dict[str, Any]], args: tuple[Any, ...], kwargs: dict[str, Any],
                topic: str) -> dict[str, Any]:
    """The task (its key is ``topic``): train on this worker, on its placed device, publishing
    the progress and each new validation row as events of ``topic`` (no client needed here)."""
    import torch
    from distributed import get_worker

    from ..blockwise.runtime import RUNTIME

    worker = get_worker()
    last = {"time": 0.0, "rows": 0}

    def report(state: Mapping[str, Any]) -> None:
        task = worker.state.tasks.get(topic)
        if task is None or task.state == "cancelled":
            raise TrainingCancelled(f"the client stopped waiting for {topic}; stopped at step {state['step']} "
                                    "(its last checkpoint stays; a rerun resumes from it)")
        now, rows = time.monotonic(), state["rows"]
        if now - last["time"] >= REPORT_SECONDS or len(rows) > last["rows"] or state["step"] == state["steps"]:
            worker.log_event(topic, {**state, "rows": list(rows[last["rows"]:])})
            last.update(time=now, rows=len(rows))

    device = RUNTIME.device  # this worker's GPU, as placed; "cuda" in the trainer means it
    placed = torch.cuda.device(device) if device and device.startswith("cuda") else contextlib.nullcontext()
    try:
        with placed:
            summary = trainer(*args, progress=False, report=report, **kwargs)
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # leave the GPU to the blockwise stages that follow
    return {**summary, "worker": worker.address, "pid": os.getpid(), "thread": threading.get_ident()}
