"""What one task does: read blocks, run the model, stitch what they own.

A task of the engine is ``run_group(job, phase, group_id)``: the group's blocks go to the
model as one batch, and the phase function named by ``phase`` writes the result; then the
group's done-marker is left. The phases of each stitch mode (:data:`STITCH_PHASES`):

* ``crop``: ``write`` -- predict, crop the halos, write the owned output chunks.
* ``blend``: ``tiles`` -- predict, write each weighted tile to the scratch array;
  then ``merge`` -- sum the tiles covering each output chunk and write it.
* ``slices``: the same two phases; the processor also gets the box each block owns and
  returns one part per slice axis (:mod:`.stitching`).

Blocks are read straight from Zarr (a batch's blocks along a row in one read, their
outputs in one write), so every output chunk is written whole, once, by one task.
A task streams its blocks ``layout.batch`` at a time through :func:`pipelined`: the
next batch is read and decoded in one thread and the previous one cast, compressed and
written in another while the model runs on this one (bounded queues, errors raised in
the task before its done-marker), with the same bits as one after the other.

A task of the lazy Dask graph (:mod:`.overlap`) gets its input as a NumPy region instead:
:func:`crop_region`, :func:`tile_region` and :func:`merge_region` are the same phases
on arrays. Both kinds call one processor call (:func:`run_processor`), one crop
(:func:`~.stitching.crop_margins`), one blend (:func:`~.stitching.weighted_tile`,
:func:`~.stitching.merge_block`) and one cast (:func:`~d2r_dask.io.volume.to_dtype`),
so the lazy path and the engine give the same bits.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Sequence, TypeVar

import numpy as np

from ..errors import InputError
from ..io.geometry import Box, Triple
from ..io.volume import to_dtype
from .jobstate import Job, mark_done
from .layout import Layout, read_reflected
from .processors import BlockProcessor, ModelSpec
from .runtime import RUNTIME
from .stitching import crop_margins, merge_block, tile_shape, weighted_tile


def read_boxes(job: Job, boxes: Sequence[Box]) -> np.ndarray:
    """Read ``boxes`` (ROI-relative, equal shapes) as a batch in the stored dtype, with one
    Zarr read of their bounding box where they are adjacent (a batch's blocks along a row)."""
    reader = RUNTIME.source(job)
    glob = [b.shift(tuple(-r for r in job.layout.roi.start)) for b in boxes]  # ROI-relative -> global
    union = Box(tuple(map(min, zip(*(b.start for b in glob)))), tuple(map(max, zip(*(b.stop for b in glob)))))
    if len(glob) > 1 and math.prod(union.shape) <= 1.5 * sum(math.prod(b.shape) for b in glob):
        data = read_reflected(reader, reader.shape, union)
        parts = [data[b.shift(union.start).slices] for b in glob]
    else:
        parts = [read_reflected(reader, reader.shape, b) for b in glob]
    return np.stack(parts)


def check_processor(job: Job) -> tuple[Triple, Triple]:
    """Load the job's processor here and check it fits the layout; return ``(halo, scale)``."""
    proc = processor(job.spec, job.model_token)
    layout = job.layout
    if tuple(proc.scale) != layout.scale:
        raise InputError(f"model {job.spec.kind!r} scales by {tuple(proc.scale)} but the job asks for "
                         f"{layout.scale}; pass scale={tuple(proc.scale)}")
    axes = tuple(getattr(proc, "slice_axes", ()))
    if layout.stitch == "slices" and (not axes or not set(axes) <= {0, 1, 2}):
        raise InputError(f"model {job.spec.kind!r} does not make its output from slices (no slice_axes); "
                         "run it with stitch='blend'")
    if layout.stitch != "slices" and axes:
        raise InputError(f"model {job.spec.kind!r} makes its output from slices; run it with stitch='slices'")
    if layout.stitch == "crop" and any(h < r for h, r in zip(layout.halo, proc.halo)):
        raise InputError(
            f"halo {layout.halo} is smaller than the receptive field {tuple(proc.halo)} of model "
            f"{job.spec.kind!r}: crop mode would show seams; use halo >= {tuple(proc.halo)}"
        )
    return tuple(proc.halo), tuple(proc.scale)  # type: ignore[return-value]


_LOAD_LOCK = threading.Lock()


def processor(spec: ModelSpec, token: str) -> BlockProcessor:
    """This process's processor for ``spec`` (loaded once; one loader at a time, since the
    lazy graph may run tasks on several threads of one process)."""
    with _LOAD_LOCK:
        return RUNTIME.processor(spec, token)


def run_processor(spec: ModelSpec, token: str, batch: np.ndarray, origins: Sequence[Triple],
                  scale: Sequence[int], owned: Sequence[Box] | None = None,
                  out_dtype: str | None = None) -> np.ndarray:
    """The model's output for a batch of read boxes: the one place a processor is called.

    ``batch`` is ``(B, Z, Y, X)`` raw intensities in any dtype: cast to float32 here, unless
    the processor declares ``device_io`` (it then takes the stored dtype, so only that
    crosses to its device). ``origins`` are the read boxes' global first voxels.
    ``owned`` (``slices`` mode): the box each block owns, in its read box's coordinates;
    the output then has one part per slice axis, ``(B, P, Z*sz, Y*sy, X*sx)``.
    ``out_dtype`` (``crop`` mode): a ``device_io`` processor returns the blocks already
    rounded and cast to it (:func:`~d2r_dask.io.volume.to_dtype`'s rule, on its device);
    other processors return float32, cast when written.
    """
    proc = processor(spec, token)
    device_io = bool(getattr(proc, "device_io", False))
    batch = np.ascontiguousarray(batch) if device_io else np.ascontiguousarray(batch, dtype=np.float32)
    with RUNTIME.timed("model"):
        if owned is not None:
            out = proc(batch, origins, owned)
        elif device_io and out_dtype is not None:
            out = proc(batch, origins, out_dtype=out_dtype)  # type: ignore[call-arg]
        else:
            out = proc(batch, origins)
    out = np.asarray(out)
    # a device_io processor's cast is a no-op here; one that returned floats is cast by the rule
    out = to_dtype(out, out_dtype) if device_io and out_dtype is not None and owned is None else \
        out.astype(np.float32, copy=False)
    expected = tuple(n * s for n, s in zip(batch.shape[1:], scale))
    if owned is not None:
        expected = (len(proc.slice_axes), *expected)  # type: ignore[attr-defined]
    if out.shape[1:] != expected or out.shape[0] != batch.shape[0]:
        raise InputError(f"model returned blocks of shape {out.shape[1:]}, expected {expected}")
    return out


def slice_axes(spec: ModelSpec, token: str, layout: Layout) -> tuple[int, ...]:
    """The axes of the processor's parts in ``slices`` mode (none otherwise)."""
    return tuple(processor(spec, token).slice_axes) if layout.stitch == "slices" else ()  # type: ignore[attr-defined]


def owned_boxes(layout: Layout, indices: Sequence[Triple]) -> list[Box] | None:
    """What the processor is told each block owns: in ``slices`` mode only."""
    return [layout.owned(i) for i in indices] if layout.stitch == "slices" else None


def origins_of(layout: Layout, boxes: Sequence[Box]) -> list[Triple]:
    """Global input coordinates of the first voxel of each (ROI-relative) read box."""
    return [tuple(a + r for a, r in zip(b.start, layout.roi.start)) for b in boxes]  # type: ignore[misc]


T = TypeVar("T")
A = TypeVar("A")
B = TypeVar("B")


def pipelined(items: Sequence[T], read: Callable[[T], A], compute: Callable[[T, A], B],
              write: Callable[[T, B], None], *, overlap: bool = True, ahead: int = 1) -> None:
    """``write(item, compute(item, read(item)))`` for each item in order, overlapped.

    With ``overlap`` (and more than one item) ``read`` runs in a reader thread up to
    ``ahead`` items before the one computing here, and ``write`` in a writer thread up to
    ``ahead`` items behind it, so at most ``2 * ahead + 1`` items' data are held at once.
    ``compute`` stays in the calling thread (the model's device and threads). Returns when
    every write has finished; the first error of any stage is raised here (later reads are
    cancelled), so a task never leaves its done-marker over a failed write. Each stage
    sees the items in order, so the result is the serial loop's, bit for bit.
    """
    if not overlap or len(items) < 2:
        for item in items:
            write(item, compute(item, read(item)))
        return
    with ThreadPoolExecutor(1, thread_name_prefix="d2r-read") as reader, \
            ThreadPoolExecutor(1, thread_name_prefix="d2r-write") as writer:
        reads: deque[Future[A]] = deque(reader.submit(read, it) for it in items[:ahead])
        writes: deque[Future[None]] = deque()
        try:
            for k, item in enumerate(items):
                data = reads.popleft().result()
                if k + ahead < len(items):
                    reads.append(reader.submit(read, items[k + ahead]))
                result = compute(item, data)
                del data
                while len(writes) >= ahead:
                    writes.popleft().result()
                writes.append(writer.submit(write, item, result))
                del result
            while writes:
                writes.popleft().result()
        except BaseException:
            for fut in (*reads, *writes):
                fut.cancel()
            raise


def read_batch(job: Job, indices: Sequence[Triple]) -> np.ndarray:
    """The read boxes of the blocks at ``indices``, in the stored dtype (one model batch)."""
    with RUNTIME.timed("read"):
        return read_boxes(job, [job.layout.read_box(i) for i in indices])


def predict(job: Job, indices: Sequence[Triple], batch: np.ndarray, out_dtype: str | None = None) -> np.ndarray:
    """The model's output for ``batch``, the read boxes of the blocks at ``indices`` (full-size, with halos)."""
    layout = job.layout
    return run_processor(job.spec, job.model_token, batch, origins_of(layout, [layout.read_box(i) for i in indices]),
                         layout.scale, owned_boxes(layout, indices), out_dtype)


def write_blocks(job: Job, items: Sequence[tuple[Triple, np.ndarray]]) -> None:
    """Write the owned part of each block's ``values`` (full-block output coordinates).

    Consecutive blocks of one row (a batch runs along x in C order) go out in one Zarr
    write; either way every output chunk is written whole, once, by this task.
    """
    layout = job.layout
    out = RUNTIME.output(job)
    runs: list[list[tuple[Box, np.ndarray]]] = []
    for index, values in items:
        box = layout.write_box(index)
        owned = to_dtype(values[tuple(slice(0, n) for n in box.shape)], job.out_dtype)
        last = runs[-1][-1][0] if runs else None
        if last is not None and last.start[:2] == box.start[:2] and last.stop[2] == box.start[2]:
            runs[-1].append((box, owned))
        else:
            runs.append([(box, owned)])
    for run in runs:
        if len(run) == 1:
            out[run[0][0].slices] = run[0][1]
        else:
            union = Box(run[0][0].start, run[-1][0].stop)
            out[union.slices] = np.concatenate([v for _, v in run], axis=2)


def _stream(job: Job, indices: Sequence[Triple], compute: Callable[[list[Triple], Any], Any],
            write: Callable[[list[Triple], Any], None], read: Callable[[list[Triple]], Any] | None = None) -> None:
    """A phase's blocks, ``layout.batch`` at a time, through :func:`pipelined` (the handles
    the threads use are opened here first)."""
    RUNTIME.source(job)
    pipelined(job.layout.batches(indices), read or (lambda sub: read_batch(job, sub)), compute, write,
              overlap=RUNTIME.overlap)


def write_phase(job: Job, indices: Sequence[Triple]) -> None:
    """``crop``: predict, crop halo and context, write the owned chunks (cast on the device
    where the processor can, else in the writer thread)."""
    RUNTIME.output(job)

    def write(sub: list[Triple], out: np.ndarray) -> None:
        with RUNTIME.timed("write"):
            write_blocks(job, list(zip(sub, crop_margins(job.layout, out))))

    _stream(job, indices, lambda sub, batch: predict(job, sub, batch, job.out_dtype), write)


def tiles_phase(job: Job, indices: Sequence[Triple]) -> None:
    """``blend``/``slices``, first phase: predict, crop the context, write each weighted tile to scratch."""
    layout = job.layout
    axes = slice_axes(job.spec, job.model_token, layout)
    tiles = RUNTIME.tiles(job)

    def write(sub: list[Triple], out: np.ndarray) -> None:
        with RUNTIME.timed("write"):
            for index, values in zip(sub, crop_margins(layout, out, halo=False)):
                sl = tuple(slice(i * n, (i + 1) * n) for i, n in zip(index, values.shape[-3:]))
                tiles[sl] = weighted_tile(layout, index, values, axes)

    _stream(job, indices, lambda sub, batch: predict(job, sub, batch), write)


def merge_phase(job: Job, indices: Sequence[Triple]) -> None:
    """``blend``/``slices``, second phase: sum the (up to 27) weighted tiles over each owned
    chunk (in the reader thread), write it (in the writer thread)."""
    layout = job.layout
    tiles = RUNTIME.tiles(job)
    RUNTIME.output(job)
    shape = tile_shape(layout)

    def read_tile(nb: Triple, box: Box) -> np.ndarray:
        return tiles[box.shift(tuple(-n * t for n, t in zip(nb, shape))).slices]

    def merge(sub: list[Triple]) -> list[tuple[Triple, np.ndarray]]:
        with RUNTIME.timed("read"):
            return [(index, merge_block(layout, index, read_tile)) for index in sub]

    def write(sub: list[Triple], items: list[tuple[Triple, np.ndarray]]) -> None:
        with RUNTIME.timed("write"):
            write_blocks(job, items)

    _stream(job, indices, lambda sub, items: items, write, read=merge)


# --- the same phases on in-memory regions (the lazy Dask graph) -------------------------------


def region_blocks(layout: Layout, first: Sequence[int], shape: Sequence[int], unit: Sequence[int],
                  margin: Sequence[int] = (0, 0, 0)) -> list[Triple]:
    """Grid indices (C order) of the blocks a region of ``shape`` holds, starting at block
    ``first``: ``unit`` voxels per block plus ``margin`` on each side of the region."""
    counts = [(n - 2 * m) // u for n, m, u in zip(shape, margin, unit)]
    return [tuple(int(f + o) for f, o in zip(first, off)) for off in np.ndindex(*counts)]  # type: ignore[misc]


def predict_region(spec: ModelSpec, token: str, layout: Layout, region: np.ndarray,
                   first: Sequence[int], out_dtype: str | None = None) -> list[tuple[Triple, np.ndarray]]:
    """The model's outputs for the blocks whose read boxes tile ``region``.

    ``region`` is the padded input from the read box of block ``first`` to the read box of
    the region's last block; blocks go to the model in runs of ``layout.batch`` (C order).
    """
    indices = region_blocks(layout, first, region.shape, layout.block, layout.margin)
    start = layout.read_box(first).start
    items: list[tuple[Triple, np.ndarray]] = []
    for group in layout.batches(indices):
        boxes = [layout.read_box(i) for i in group]
        batch = np.stack([region[b.shift(start).slices] for b in boxes])
        items.extend(zip(group, run_processor(spec, token, batch, origins_of(layout, boxes), layout.scale,
                                              owned_boxes(layout, group), out_dtype)))
    RUNTIME.blocks += len(indices)
    return items


def _local(index: Sequence[int], first: Sequence[int], unit: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice((i - f) * u, (i - f + 1) * u) for i, f, u in zip(index, first, unit))


def crop_region(spec: ModelSpec, token: str, layout: Layout, region: np.ndarray, first: Sequence[int],
                out_dtype: str) -> np.ndarray:
    """``crop`` on a region: the full-size output blocks of its blocks, cropped and cast."""
    items = predict_region(spec, token, layout, region, first, out_dtype)
    counts = [(n - 2 * (h + c)) // b for n, h, c, b in zip(region.shape, layout.halo, layout.context, layout.block)]
    out = np.empty(tuple(k * b for k, b in zip(counts, layout.out_block)), dtype=out_dtype)
    for index, values in items:
        out[_local(index, first, layout.out_block)] = to_dtype(crop_margins(layout, values[None])[0], out_dtype)
    return out


def tile_region(spec: ModelSpec, token: str, layout: Layout, region: np.ndarray, first: Sequence[int]) -> np.ndarray:
    """``blend``/``slices`` tiles on a region: its blocks' weighted tiles side by side (float32),
    laid out as in the engine's scratch array (tile ``i`` at ``i * tile_shape``)."""
    items = predict_region(spec, token, layout, region, first)
    shape = tile_shape(layout)
    axes = slice_axes(spec, token, layout)
    counts = [(n - 2 * (h + c)) // b for n, h, c, b in zip(region.shape, layout.halo, layout.context, layout.block)]
    out = np.empty(tuple(k * t for k, t in zip(counts, shape)), dtype=np.float32)
    for index, values in items:
        out[_local(index, first, shape)] = weighted_tile(layout, index, crop_margins(layout, values, halo=False),
                                                         axes)
    return out


def merge_region(layout: Layout, tiles: np.ndarray, start: Sequence[int], first: Sequence[int],
                 counts: Sequence[int], out_dtype: str) -> np.ndarray:
    """``blend`` merge on a region of the tile array that begins at ``start`` (tile-array
    coordinates): the ``counts`` output blocks from block ``first``, summed and cast."""
    shape = tile_shape(layout)
    out = np.empty(tuple(k * b for k, b in zip(counts, layout.out_block)), dtype=out_dtype)

    def read_tile(nb: Triple, box: Box) -> np.ndarray:
        return tiles[box.shift(tuple(s - n * t for s, n, t in zip(start, nb, shape))).slices]

    for off in np.ndindex(*counts):
        index = tuple(f + o for f, o in zip(first, off))
        out[_local(index, first, layout.out_block)] = to_dtype(merge_block(layout, index, read_tile), out_dtype)
    RUNTIME.blocks += math.prod(counts)
    return out


PHASES: dict[str, Callable[[Job, Sequence[Triple]], None]] = {
    "write": write_phase,
    "tiles": tiles_phase,
    "merge": merge_phase,
}
"""Phase name (it names the done-markers) -> what a task of that phase does."""

STITCH_PHASES: dict[str, tuple[str, ...]] = {"crop": ("write",), "blend": ("tiles", "merge"),
                                             "slices": ("tiles", "merge")}
"""The phases of each stitch mode, in order."""


def run_group(job: Job, phase: str, group_id: int) -> int:
    """Process task ``group_id`` of ``phase`` and leave its done-marker. Idempotent."""
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; known: {', '.join(PHASES)}")
    indices = job.layout.group_blocks(group_id)
    with RUNTIME.timed("task"):  # all a task does; the rest of the wall time is the scheduler's
        PHASES[phase](job, indices)
        with RUNTIME.timed("marker"):
            mark_done(job, phase, group_id)
    RUNTIME.blocks += len(indices)
    return len(indices)
