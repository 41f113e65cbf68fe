"""What one task does: read a group of blocks, run the model, write what they own.

A task is ``run_group(job, phase, group_id)``: the group's blocks go to the model as
one batch, and the phase function named by ``phase`` writes the result; then the
group's done-marker is left. The phases of each stitch mode (:data:`STITCH_PHASES`):

* ``crop``: ``write`` -- predict, crop the halos, write the owned output chunks.
* ``blend``: ``tiles`` -- predict, write each weighted tile to the scratch array;
  then ``merge`` -- sum the tiles covering each output chunk and write it.

Blocks are read straight from Zarr (a group's blocks along a row in one read, their
outputs in one write), so every output chunk is written whole, once, by one task.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import numpy as np

from ..errors import InputError
from ..io.geometry import Box, Triple
from ..io.volume import to_dtype
from .jobstate import Job, mark_done
from .layout import read_reflected
from .runtime import RUNTIME
from .stitching import blend_weights


def read_boxes(job: Job, boxes: Sequence[Box]) -> np.ndarray:
    """Read ``boxes`` (ROI-relative, equal shapes) as a float32 batch, with one Zarr read
    of their bounding box where they are adjacent (a group's blocks along a row)."""
    reader = RUNTIME.source(job)
    glob = [b.shift(tuple(-r for r in job.layout.roi.start)) for b in boxes]  # ROI-relative -> global
    union = Box(tuple(map(min, zip(*(b.start for b in glob)))), tuple(map(max, zip(*(b.stop for b in glob)))))
    if len(glob) > 1 and math.prod(union.shape) <= 1.5 * sum(math.prod(b.shape) for b in glob):
        data = read_reflected(reader, reader.shape, union)
        parts = [data[b.shift(union.start).slices] for b in glob]
    else:
        parts = [read_reflected(reader, reader.shape, b) for b in glob]
    return np.stack(parts).astype(np.float32, copy=False)


def check_processor(job: Job) -> tuple[Triple, Triple]:
    """Load the job's processor here and check it fits the layout; return ``(halo, scale)``."""
    proc = RUNTIME.processor(job.spec, job.model_token)
    layout = job.layout
    if tuple(proc.scale) != layout.scale:
        raise InputError(f"model {job.spec.kind!r} scales by {tuple(proc.scale)} but the job asks for "
                         f"{layout.scale}; pass scale={tuple(proc.scale)}")
    if layout.stitch == "crop" and any(h < r for h, r in zip(layout.halo, proc.halo)):
        raise InputError(
            f"halo {layout.halo} is smaller than the receptive field {tuple(proc.halo)} of model "
            f"{job.spec.kind!r}: crop mode would show seams; use halo >= {tuple(proc.halo)}"
        )
    return tuple(proc.halo), tuple(proc.scale)  # type: ignore[return-value]


def predict(job: Job, indices: Sequence[Triple]) -> np.ndarray:
    """The model's output for the read boxes of the blocks at ``indices`` (full-size, with halos)."""
    layout = job.layout
    proc = RUNTIME.processor(job.spec, job.model_token)
    boxes = [layout.read_box(i) for i in indices]
    with RUNTIME.timed("read"):
        batch = read_boxes(job, boxes)
    origins = [tuple(a + r for a, r in zip(b.start, layout.roi.start)) for b in boxes]
    with RUNTIME.timed("model"):
        out = np.asarray(proc(batch, origins), dtype=np.float32)
    expected = tuple(n * s for n, s in zip(batch.shape[1:], layout.scale))
    if out.shape[1:] != expected:
        raise InputError(f"model returned blocks of shape {out.shape[1:]}, expected {expected}")
    return out


def write_blocks(job: Job, items: Sequence[tuple[Triple, np.ndarray]]) -> None:
    """Write the owned part of each block's ``values`` (full-block output coordinates).

    Consecutive blocks of one row (a group runs along x in C order) go out in one Zarr
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


def _out_margin(job: Job, margin: Triple) -> Triple:
    """``margin`` (input voxels) in output voxels."""
    return tuple(m * s for m, s in zip(margin, job.layout.scale))  # type: ignore[return-value]


def write_phase(job: Job, indices: Sequence[Triple]) -> None:
    """``crop``: predict, crop halo and context, write the owned chunks."""
    hs, cs = _out_margin(job, job.layout.halo), _out_margin(job, job.layout.context)
    out = predict(job, indices)
    crop = (slice(None),) + tuple(slice(h + c, n - h - c) for h, c, n in zip(hs, cs, out.shape[1:]))
    with RUNTIME.timed("write"):
        write_blocks(job, list(zip(indices, out[crop])))


def tiles_phase(job: Job, indices: Sequence[Triple]) -> None:
    """``blend``, first phase: predict, crop the context, write each weighted tile to scratch."""
    layout = job.layout
    cs = _out_margin(job, layout.context)
    out = predict(job, indices)
    out = out[(slice(None),) + tuple(slice(c, n - c) for c, n in zip(cs, out.shape[1:]))]
    tiles = RUNTIME.tiles(job)
    with RUNTIME.timed("write"):
        for index, values in zip(indices, out):
            sl = tuple(slice(i * n, (i + 1) * n) for i, n in zip(index, values.shape))
            tiles[sl] = values * blend_weights(layout, index)


def merge_phase(job: Job, indices: Sequence[Triple]) -> None:
    """``blend``, second phase: sum the (up to 27) weighted tiles over each owned chunk, write it."""
    layout = job.layout
    hs = _out_margin(job, layout.halo)
    tiles = RUNTIME.tiles(job)
    tile_shape = tuple(b + 2 * h for b, h in zip(layout.out_block, hs))
    items = []
    t0 = time.perf_counter()
    for index in indices:
        acc = np.zeros(layout.out_block, dtype=np.float32)
        for off in np.ndindex(*(3 if h else 1 for h in layout.halo)):
            nb = tuple(i + (o - 1 if h else 0) for i, o, h in zip(index, off, layout.halo))
            if any(n < 0 or n >= g for n, g in zip(nb, layout.grid)):
                continue
            # the neighbour's tile, in this block's full-size output frame
            lo = tuple((n - i) * b - h for n, i, b, h in zip(nb, index, layout.out_block, hs))
            dst = Box(lo, tuple(a + t for a, t in zip(lo, tile_shape))).clip(layout.out_block)
            src = dst.shift(lo)
            origin = tuple(n * t for n, t in zip(nb, tile_shape))
            acc[dst.slices] += tiles[src.shift(tuple(-o for o in origin)).slices]
        items.append((index, acc))
    RUNTIME.add_seconds("read", time.perf_counter() - t0)
    with RUNTIME.timed("write"):
        write_blocks(job, items)


PHASES: dict[str, Callable[[Job, Sequence[Triple]], None]] = {
    "write": write_phase,
    "tiles": tiles_phase,
    "merge": merge_phase,
}
"""Phase name (it names the done-markers) -> what a task of that phase does."""

STITCH_PHASES: dict[str, tuple[str, ...]] = {"crop": ("write",), "blend": ("tiles", "merge")}
"""The phases of each stitch mode, in order."""


def run_group(job: Job, phase: str, group_id: int) -> int:
    """Process task ``group_id`` of ``phase`` and leave its done-marker. Idempotent."""
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; known: {', '.join(PHASES)}")
    indices = job.layout.group_blocks(group_id)
    PHASES[phase](job, indices)
    with RUNTIME.timed("marker"):
        mark_done(job, phase, group_id)
    RUNTIME.blocks += len(indices)
    return len(indices)
