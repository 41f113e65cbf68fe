"""The scheduler loop: :func:`run_blockwise`, the engine's entry point.

It builds the :class:`~.layout.Layout` and the :class:`~.jobstate.Job`, creates or
validates the output (:func:`~.jobstate.prepare_output`), then for each phase of the
stitch mode submits the groups without a done-marker -- in this process (``serial``)
or to a ``distributed.Client`` in a sliding window, so the scheduler holds a bounded
number of tasks whatever the volume size -- then the pyramid levels the same way
(:mod:`.pyramid`), and finally the NGFF metadata. Done-state (:func:`~.jobstate.done_flags`)
is a bit per task, never a Python object or a file per task.
Tasks carry a model *specification*, never a model (:mod:`.processors`); what a task
does is in :mod:`.tasks`, what a worker keeps between tasks in :mod:`.runtime`.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import uuid
from dataclasses import replace
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from ..io import stores
from ..io.geometry import Box, Geometry
from ..io.stores import Location
from ..io.volume import create_pyramid_level, open_volume, pyramid_plan, write_multiscales
from .jobstate import Job, done_block_count, done_flags, job_hash, job_identity, prepare_output, todo_groups
from .layout import Layout, default_batch, default_group
from .lock import locks_output
from .processors import ModelSpec
from . import pyramid as _pyramid
from .pyramid import level_layout, pyramid_group, pyramid_phase
from .runtime import configure_workers
from .tasks import STITCH_PHASES, check_processor, run_group

log = logging.getLogger(__name__)


@locks_output
def run_blockwise(
    source: str | os.PathLike,
    output: str | os.PathLike,
    spec: ModelSpec,
    *,
    block: Sequence[int],
    halo: Sequence[int],
    scale: Sequence[int] = (1, 1, 1),
    stitch: str = "crop",
    group: int | None = None,
    batch: int | None = None,
    context: Sequence[int] = (0, 0, 0),
    roi: Box | None = None,
    geometry: Geometry | None = None,
    out_dtype: str | None = None,
    client: Any = None,
    serial: bool = False,
    overwrite: bool = False,
    levels: int = 1,
    progress: bool = True,
    metadata: Mapping[str, Any] | None = None,
    window: int | None = None,
) -> Location:
    """Run ``spec``'s processor over every block of ``source`` and write ``output``.

    ``client`` is a ``distributed.Client``; ``serial=True`` runs the same tasks in
    this process (debugging, tests). ``geometry`` is the output's physical
    placement (default: the input's, with the voxel size divided by ``scale``).
    In blend mode ``halo`` is the overlap and ``context`` extra input read around
    each tile and cropped from its prediction before blending (>= the model's
    receptive field for a convolutional model, so tile borders never show).
    A task runs ``group`` blocks (default :func:`~.layout.default_group`: small blocks are
    grouped so the scheduler's per-task cost vanishes), streamed to the model ``batch``
    blocks at a time (default: the whole group if given, else :func:`~.layout.default_batch`:
    one block, or more if they are tiny), reads and
    writes overlapping the model (:func:`~.tasks.pipelined`); ``window`` bounds the tasks
    the scheduler holds at once (default 4 per worker thread).
    Rerunning with the same arguments resumes; with different ones it refuses. The run
    holds ``output``'s lock (:mod:`.lock`): a second run on it is refused while this one lives.
    A progress bar (``tqdm.auto``: blocks done / total, rate, ETA) shows unless
    ``progress=False``; the dashboard address is logged and printed above it.
    """
    source = str(source)
    vol = open_volume(source)
    roi = roi or Box((0, 0, 0), tuple(vol.shape))
    layout = Layout(roi=roi, block=tuple(block), halo=tuple(halo), scale=tuple(scale),  # type: ignore[arg-type]
                    stitch=stitch, group=group or default_group(roi.shape, block),
                    context=tuple(context), batch=batch or 0)  # type: ignore[arg-type]
    layout.check_volume(vol.shape)
    if group is None and not batch:  # the default group: tiny blocks batched per model call
        layout = replace(layout, batch=default_batch(layout.block, layout.margin, layout.group))
    out_dtype = str(np.dtype(out_dtype or vol.dtype))
    if geometry is None:
        g = Geometry.of(vol)
        geometry = Geometry(
            tuple(v / s for v, s in zip(g.voxel_size, layout.scale)),  # type: ignore[arg-type]
            tuple(t + a * v for t, a, v in zip(g.translation, roi.start, g.voxel_size)),  # type: ignore[arg-type]
        )
    identity = job_identity(source, spec, layout, out_dtype)
    job = Job(source, str(output), spec, layout, out_dtype, token=job_hash(identity),
              model_token=identity["model"]["sha256"])
    distributed = client is not None and not serial
    name = stores.name(output)

    def check() -> None:
        if distributed:
            client.submit(check_processor, job, pure=False).result()
        else:
            check_processor(job)

    if distributed:
        configure_workers(client)
    if prepare_output(job, identity, geometry, overwrite, metadata, check):
        log.info("%s is already complete", output)
        return stores.location(output)
    if distributed:
        log.info("dashboard: %s", client.dashboard_link)
        if progress:
            _write_line(f"d2r: {name} on {len(client.scheduler_info(n_workers=-1)['workers'])} "
                        f"workers, dashboard {client.dashboard_link}")

    def run_phase(phase: str, phase_layout: Layout, task: Callable[[Job, str, int], int]) -> None:
        flags = done_flags(job, phase, phase_layout.n_groups)
        done_blocks = done_block_count(phase_layout, flags)
        todo = todo_groups(flags)
        log.info("%s: %d of %d blocks to do (%s)", name, phase_layout.n_blocks - done_blocks,
                 phase_layout.n_blocks, phase)
        t0 = time.perf_counter()
        with _progress_bar(progress, phase_layout.n_blocks, done_blocks, f"{name} {phase}") as bar:
            if distributed:
                _run_distributed(client, task, job, phase, phase_layout, todo, bar, window)
            else:
                for gid in todo:
                    bar.update(task(job, phase, gid))
        log.info("%s %s: %d blocks in %.1f s", name, phase, phase_layout.n_blocks - done_blocks,
                 time.perf_counter() - t0)

    for phase in STITCH_PHASES[layout.stitch]:
        run_phase(phase, layout, run_group)
    stores.remove(stores.join(job.state_dir, "tiles"))
    build_pyramid(job, levels, run_phase)
    stores.remove(stores.join(job.state_dir, "done"))
    return stores.location(output)


def build_pyramid(job: Job, levels: int, run_phase: Callable[[str, Layout, Callable[..., int]], None]) -> None:
    """Write ``levels - 1`` coarser levels blockwise (phases ``pyramid-k``, resumable), then
    the NGFF metadata, last (:mod:`.pyramid`)."""
    pyramid = pyramid_plan(job.output, levels=levels, min_size=_pyramid.MIN_SIZE)
    for level in pyramid:
        create_pyramid_level(job.output, level)  # kept if there: a resumed run keeps its regions
        run_phase(pyramid_phase(level), level_layout(level), pyramid_group)
    write_multiscales(job.output, pyramid)


def _run_distributed(client: Any, task: Callable[[Job, str, int], int], job: Job, phase: str, layout: Layout,
                     todo: Iterator[int], bar: Any, window: int | None) -> None:
    """Submit ``task(job, phase, gid)`` for the groups ``todo`` in a sliding window, so the
    scheduler never holds more than ``window`` tasks.

    Results are not gathered (a task returns only its block count, known here); a
    failed task raises here after its retries.
    """
    from distributed import as_completed

    n_threads = sum(w["nthreads"] for w in client.scheduler_info(n_workers=-1)["workers"].values()) or 1
    window = window or max(4, 4 * n_threads)
    run_id = uuid.uuid4().hex[:8]
    ac = as_completed()
    sizes: dict[str, int] = {}

    def submit_next() -> bool:
        gid = next(todo, None)
        if gid is None:
            return False
        fut = client.submit(task, job, phase, gid, key=f"d2r-{phase}-{run_id}-{gid}", pure=False, retries=2)
        sizes[fut.key] = layout.group_size(gid)
        ac.add(fut)
        return True

    # one slot stays free for a finished task whose release the scheduler has not processed
    # yet, so the scheduler never holds more than ``window`` tasks
    for _ in range(max(1, window - 1)):
        if not submit_next():
            break
    try:
        for fut in ac:
            if fut.status != "finished":
                fut.result()  # raises the task's error
            bar.update(sizes.pop(fut.key))
            fut.release()
            submit_next()
    except BaseException:
        ac.clear()
        raise


class _NullBar:
    def __enter__(self) -> _NullBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def update(self, n: int = 1) -> None:
        return None


def _write_line(text: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(text, file=sys.stderr)


def _progress_bar(enabled: bool, total: int, initial: int, desc: str) -> Any:
    """A ``tqdm.auto`` bar (a widget in Jupyter) counting blocks, with rate and ETA."""
    if not enabled:
        return _NullBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="block", smoothing=0.1, dynamic_ncols=True)
