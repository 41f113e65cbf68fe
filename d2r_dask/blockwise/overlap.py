"""The engine's layout as a lazy Dask array: any block processor via ``da.map_overlap``.

The same :class:`~.layout.Layout` as a batch job, built as a graph instead of run::

    LR (any chunks) --reflect_pad--> padded by the margin, np.pad-style, to whole blocks
       --rechunk--> chunks of k blocks (the first and last also hold the margin)
       --map_overlap(depth = margin, boundary="none")--> each chunk sees exactly the read
         boxes of its blocks, as the engine reads them
       crop:  --crop_region--> output chunks of k blocks x scale          --slice to the ROI
       blend: --tile_region--> weighted tiles (the engine's scratch layout)
              --map_overlap(depth = halo x scale)--merge_region--> output --slice to the ROI

``k`` blocks per chunk (per axis) is the fewest whose extent covers the margin, so the
overlap never reaches past a neighbouring chunk (Dask would otherwise rechunk and break the
block grid). Dask's own ``boundary="reflect"`` repeats the edge voxel; the padding here is
:func:`~.layout.reflect_index`, the engine's own. The tasks are
:func:`~.tasks.crop_region`, :func:`~.tasks.tile_region` and :func:`~.tasks.merge_region`,
which call the same processor, crop, blend and cast as the engine's phases, so a lazy
result equals the batch job bit for bit. Slicing the result computes only the chunks it needs.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import dask.array as da
import numpy as np
from dask.base import tokenize

from ..errors import InputError
from ..io.geometry import Box, Triple
from .layout import Layout, reflect_index
from .processors import ModelSpec
from .stitching import out_margin, tile_shape
from .tasks import crop_region, merge_region, tile_region

log = logging.getLogger(__name__)

MAX_BLOCKS = 2048
"""The most blocks a lazy graph may hold. A block costs 30-100 tasks (padding, rechunking,
overlap, the model, the slice; measured), so 2048 blocks are about 10^5 tasks and some
seconds to build: what the Dask scheduler handles interactively. Beyond it, the batch
engine's sliding window (a few dozen tasks in flight whatever the volume) is the tool."""


def reflect_pad(data: da.Array, roi: Box, before: Sequence[int], after: Sequence[int]) -> da.Array:
    """``data[roi]`` grown by ``before``/``after`` voxels per axis, lazily.

    Voxels outside ``data`` are mirrored as ``np.pad(mode="reflect")`` does
    (``[2 1 | 0 1 2]``, repeated for margins longer than the volume): the engine's
    :func:`~.layout.reflect_index`. Voxels outside the ROI but inside the volume are real data.
    """
    for axis in range(data.ndim):
        n = data.shape[axis]
        idx = reflect_index(np.arange(roi.start[axis] - before[axis], roi.stop[axis] + after[axis]), n)
        pieces = []
        for first, step, length in _runs(idx):
            sel: list[Any] = [slice(None)] * data.ndim
            if step == 1:
                sel[axis] = slice(first, first + length)
                pieces.append(data[tuple(sel)])
            elif step == -1:
                sel[axis] = slice(first - length + 1, first + 1)
                pieces.append(data[tuple(sel)][(slice(None),) * axis + (slice(None, None, -1),)])
            else:  # a volume one voxel thick along this axis
                sel[axis] = slice(first, first + 1)
                pieces.append(da.repeat(data[tuple(sel)], length, axis=axis))
        data = pieces[0] if len(pieces) == 1 else da.concatenate(pieces, axis=axis)
    return data


def _runs(idx: np.ndarray) -> list[tuple[int, int, int]]:
    """``idx`` as runs ``(first, step, length)`` with step +1, -1 or 0."""
    runs: list[tuple[int, int, int]] = []
    i = 0
    while i < len(idx):
        j = i + 1
        step = int(idx[j] - idx[i]) if j < len(idx) else 1
        while j < len(idx) and idx[j] - idx[j - 1] == step:
            j += 1
        runs.append((int(idx[i]), step, j - i))
        i = j
    return runs


def blocks_per_chunk(layout: Layout) -> Triple:
    """Blocks per Dask chunk along each axis: the fewest that cover the margin."""
    return tuple(max(1, math.ceil((h + c) / b))  # type: ignore[return-value]
                 for h, c, b in zip(layout.halo, layout.context, layout.block))


def _split(n_blocks: int, per: int) -> list[int]:
    """Blocks in each chunk along one axis."""
    return [min(per, n_blocks - a) for a in range(0, n_blocks, per)]


def lazy_blockwise(
    data: da.Array,
    spec: ModelSpec,
    layout: Layout,
    *,
    out_dtype: Any,
    token: str | None = None,
    max_blocks: int = MAX_BLOCKS,
    batch_command: str = "the batch engine (run_blockwise)",
) -> da.Array:
    """``spec``'s processor over ``layout.roi`` of the ``(z, y, x)`` array ``data``, as a lazy
    Dask array of shape ``layout.out_shape`` and dtype ``out_dtype``.

    Equal to :func:`~.scheduler.run_blockwise` on the same volume and layout (same read
    boxes, batches of ``layout.group`` blocks, crop or blend, cast). Refuses a layout of
    more than ``max_blocks`` blocks with a message naming ``batch_command``.
    """
    if data.ndim != 3:
        raise InputError(f"expected a 3D (z, y, x) volume, got {data.ndim} dimension(s)")
    layout.check_volume(data.shape)
    if layout.n_blocks > max_blocks:
        raise InputError(
            f"{layout.n_blocks} blocks of {layout.block} (grid {layout.grid}) is more than the lazy API "
            f"builds into one Dask graph (max_blocks={max_blocks}); select a region (roi=..., or slice the "
            f"input), use a larger block, or run the batch engine: {batch_command} "
            "(resumable, done-markers, a bounded scheduler)"
        )
    margin = layout.margin
    token = token if token is not None else spec.token()
    per = blocks_per_chunk(layout)
    splits = [_split(g, k) for g, k in zip(layout.grid, per)]
    whole = tuple(g * b for g, b in zip(layout.grid, layout.block))  # the ROI grown to whole blocks
    padded = reflect_pad(data, layout.roi, margin,
                         tuple(w - n + m for w, n, m in zip(whole, layout.shape, margin)))
    in_chunks = tuple(_with_margin([k * b for k in split], m) for split, b, m in zip(splits, layout.block, margin))
    padded = padded.rechunk(in_chunks)
    name = tokenize(data.name, spec.to_dict(), token, layout.to_dict(), str(out_dtype))
    firsts = [np.cumsum([0] + split[:-1]) for split in splits]

    def first_block(info: Any) -> Triple:
        return tuple(int(f[c]) for f, c in zip(firsts, info[None]["chunk-location"]))  # type: ignore[return-value]

    if layout.stitch == "crop":
        def crop_task(region: np.ndarray, block_info: Any = None) -> np.ndarray:
            return crop_region(spec, token, layout, region, first_block(block_info), str(np.dtype(out_dtype)))

        out = da.map_overlap(
            crop_task, padded, depth=dict(enumerate(margin)), boundary="none", trim=False, allow_rechunk=False,
            chunks=tuple(tuple(k * b for k in split) for split, b in zip(splits, layout.out_block)),
            dtype=out_dtype, meta=np.empty((0, 0, 0), dtype=out_dtype), name=f"d2r-crop-{name}",
        )
    else:
        shape = tile_shape(layout)

        def tile_task(region: np.ndarray, block_info: Any = None) -> np.ndarray:
            return tile_region(spec, token, layout, region, first_block(block_info))

        tiles = da.map_overlap(
            tile_task, padded, depth=dict(enumerate(margin)), boundary="none", trim=False, allow_rechunk=False,
            chunks=tuple(tuple(k * t for k in split) for split, t in zip(splits, shape)),
            dtype=np.float32, meta=np.empty((0, 0, 0), dtype=np.float32), name=f"d2r-tiles-{name}",
        )
        halo_out = out_margin(layout, layout.halo)

        def merge_task(region: np.ndarray, block_info: Any = None) -> np.ndarray:
            loc = block_info[None]["chunk-location"]
            first = first_block(block_info)
            counts = tuple(split[c] for split, c in zip(splits, loc))
            # the region starts one halo before this chunk's first tile, except at the volume's start
            start = tuple(f * t - (h if c > 0 else 0) for f, t, h, c in zip(first, shape, halo_out, loc))
            return merge_region(layout, region, start, first, counts, str(np.dtype(out_dtype)))

        out = da.map_overlap(
            merge_task, tiles, depth=dict(enumerate(halo_out)), boundary="none", trim=False, allow_rechunk=False,
            chunks=tuple(tuple(k * b for k in split) for split, b in zip(splits, layout.out_block)),
            dtype=out_dtype, meta=np.empty((0, 0, 0), dtype=out_dtype), name=f"d2r-merge-{name}",
        )
    log.debug("lazy %s graph: %d blocks in chunks of %s blocks", layout.stitch, layout.n_blocks, per)
    return out[tuple(slice(0, n) for n in layout.out_shape)]


def _with_margin(sizes: list[int], margin: int) -> tuple[int, ...]:
    """Chunk sizes along one axis with the margin added to the first and the last chunk."""
    sizes = list(sizes)
    sizes[0] += margin
    sizes[-1] += margin
    return tuple(sizes)
