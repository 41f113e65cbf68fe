"""Training batches from a ``torch.utils.data.DataLoader``: drawn ahead, in worker processes.

Item ``i`` of :class:`StepBatches` is the whole batch of training step ``start + i``, drawn
with that step's own generator (:func:`~d2r_dask.data.patches.step_rng`). A batch therefore
depends on ``(seed, step)`` only, never on which process drew it or in which order, and the
loader hands batches out in step order: training gives the same weights with any number of
loader workers, and a resumed run sees the batches an uninterrupted one would.

Each loader worker is a (forked) process with its own copy of the patch source, so its own cache of
decoded chunks (:class:`~d2r_dask.io.volume.VolumeReader`); ``prefetch`` batches per worker
are drawn while the network trains on the current one. The loader is iterated once per
training run (one pass over the remaining steps), so workers start once per run.

On a Dask worker (a daemonic process, which Python's ``multiprocessing`` forbids to have
children) the loader's processes are started with that flag lifted for the moment of their
start: torch's loader workers exit by themselves when their parent dies, which is what the
flag guards against. Where the flag cannot be lifted the batches are drawn in the training
process (logged).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..data.patches import step_rng

log = logging.getLogger(__name__)

Batches = Callable[[np.random.Generator, int], tuple[np.ndarray, ...]]
"""``(rng, n) -> arrays``: a batch of ``n`` training examples (:class:`~d2r_dask.data.patches.LateralBatches`,
:class:`~d2r_dask.data.patches.AxialBatches`)."""


class StepBatches(Dataset):
    """The batches of steps ``start .. steps-1``: item ``i`` is step ``start + i``'s batch."""

    def __init__(self, batches: Batches, *, seed: int, batch_size: int, start: int, steps: int) -> None:
        self.batches, self.seed, self.batch_size = batches, seed, batch_size
        self.start, self.steps = start, steps

    def __len__(self) -> int:
        return max(0, self.steps - self.start)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        arrays = self.batches(step_rng(self.seed, self.start + i), self.batch_size)
        return tuple(torch.from_numpy(a) for a in arrays)


def default_loader_workers(device: torch.device) -> int:
    """Loader processes when none are asked for: none on a CPU (the network needs the cores,
    and a tiny network's step costs about what a batch does; measured in
    ``benchmarks/bench_train_loader.py``), else up to 4, leaving a core to the training process."""
    if device.type == "cpu":
        return 0
    from dask.system import CPU_COUNT

    return max(0, min(4, CPU_COUNT - 1))


def step_loader(batches: Batches, *, seed: int, batch_size: int, start: int, steps: int,
                workers: int | None = None, prefetch: int = 2,
                device: torch.device | None = None) -> Iterator[tuple[torch.Tensor, ...]]:
    """Yield the batches of steps ``start .. steps-1`` in order, drawn by ``workers`` loader
    processes (None: :func:`default_loader_workers`), ``prefetch`` batches ahead each."""
    device = device or torch.device("cpu")
    workers = default_loader_workers(device) if workers is None else workers
    data = StepBatches(batches, seed=seed, batch_size=batch_size, start=start, steps=steps)
    if workers > 0 and not _can_have_children():
        log.warning("this process may not start loader processes; drawing training batches in it instead")
        workers = 0
    loader = DataLoader(
        data, batch_size=None, shuffle=False, num_workers=workers, prefetch_factor=prefetch if workers else None,
        pin_memory=device.type == "cuda", worker_init_fn=_quiet_worker if workers else None,
        multiprocessing_context=_FORK if workers else None,
        generator=torch.Generator().manual_seed(seed),  # the loader's own seed draw leaves torch's global RNG alone
    )
    with _children_allowed(workers > 0):
        it = iter(loader)  # starts the worker processes
    log.debug("training batches from %d loader process(es), %d ahead each", workers, prefetch if workers else 0)
    yield from it


_FORK = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
"""Loader processes are forked where the OS can (also in a Dask worker, whose default is spawn):
a spawned one imports torch and the caller's main module anew, seconds per process. They
run numpy and Zarr only (Zarr renews its event loop after a fork), never CUDA."""


def _quiet_worker(_: int) -> None:
    """A loader worker: one thread for numpy/torch (the training process needs the cores)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def _can_have_children() -> bool:
    process = multiprocessing.current_process()
    return not process.daemon or isinstance(getattr(process, "_config", None), dict)


@contextlib.contextmanager
def _children_allowed(needed: bool) -> Iterator[None]:
    """Lift the daemon flag of this process while loader processes start (see the module docstring)."""
    config: dict[str, Any] = getattr(multiprocessing.current_process(), "_config", {})
    daemon = config.get("daemon")
    if not (needed and daemon):
        yield
        return
    config["daemon"] = False
    try:
        yield
    finally:
        config["daemon"] = daemon
