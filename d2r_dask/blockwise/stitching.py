"""How blocks become one volume: ``crop`` (and its whole-volume reference) and ``blend`` weights.

* ``crop`` -- halo >= the model's receptive field, halos cropped: for a deterministic
  model the result equals whole-volume inference (:func:`apply_whole` is that reference).
* ``blend`` -- neighbouring tiles overlap by ``2 * halo`` and are cross-faded with
  weights ``sin^2`` / ``cos^2`` that sum to one everywhere (a partition of unity)::

      tile i    ...1111111[cos^2 fall]
      tile i+1            [sin^2 rise]1111111...
                          |<-2*halo->|   the two weights sum to 1 at every voxel

  Phase ``tiles`` writes each tile's weighted prediction to a scratch array, phase
  ``merge`` sums the (up to 27) tiles covering each output chunk. For models whose
  tiles disagree (stochastic samplers, position-dependent networks).
* ``slices`` -- ``blend`` for a model whose output is the mean of *parts*, each made slice
  by slice along one axis (Stage II: XZ slices along y, YZ slices along x). A slice does not
  depend on the tile's extent across it, so a part is made only on the slices the block
  owns (:meth:`~.layout.Layout.owned`) and is cross-faded along the other two axes only:
  every slice is computed once per tile of its own plane, never again for the halo of a
  neighbouring tile. Summed over the tiles, this is the ``blend`` of the mean of the parts
  (the weights along the slice axis, 1 on the owned slices and 0 elsewhere, also sum to one).

This is the one home of the stitching rules: the engine's phases (:mod:`.tasks`, Zarr
in and out) and the lazy Dask graph (:mod:`.overlap`) both call :func:`crop_margins`,
:func:`weighted_tile` and :func:`merge_block`, so both give the same bits.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ..io.geometry import Box, Triple
from .layout import Layout
from .processors import BlockProcessor


def blend_weights_1d(n_out: int, start: int, full: int, halo: int, length: int) -> np.ndarray:
    """Weights along one axis of the tile whose block starts at ``start`` (output units).

    The tile spans ``[start - halo, start + full + halo)``. Where two tiles overlap,
    ``sin^2`` rises as ``cos^2`` falls, so the weights of all tiles sum to one at
    every position inside ``[0, length)``; at the volume's ends the weight stays 1.
    """
    pos = np.arange(start - halo, start + full + halo) + 0.5
    w = np.zeros(n_out, dtype=np.float64)
    stop = min(start + full, length)
    inside = (pos >= start) & (pos < stop)
    w[inside] = 1.0
    if halo:
        if start > 0:
            u = (pos - (start - halo)) / (2 * halo)
            rise = (u >= 0) & (u < 1)
            w[rise] = np.sin(np.pi / 2 * u[rise]) ** 2
        if stop < length:
            u = (pos - (stop - halo)) / (2 * halo)
            fall = (u >= 0) & (u < 1)
            w[fall] = np.cos(np.pi / 2 * u[fall]) ** 2
    w[(pos < 0) | (pos >= length)] = 0.0
    return w.astype(np.float32)


def blend_weights(layout: Layout, index: Sequence[int], slice_axis: int | None = None) -> np.ndarray:
    """The 3D partition-of-unity weight of the tile at ``index`` (output units).

    Along ``slice_axis`` (a ``slices`` part) the weight is 1 on the slices the block owns
    and 0 on its halo, so each slice counts once.
    """
    ws = []
    for axis, (i, b, h, s, n) in enumerate(zip(index, layout.block, layout.halo, layout.scale, layout.shape)):
        full, halo = b * s, h * s
        if axis == slice_axis:
            w = np.zeros(full + 2 * halo, dtype=np.float32)
            w[halo:halo + full] = blend_weights_1d(full, i * full, full, 0, n * s)
            ws.append(w)
        else:
            ws.append(blend_weights_1d(full + 2 * halo, i * full, full, halo, n * s))
    return ws[0][:, None, None] * ws[1][None, :, None] * ws[2][None, None, :]


def out_margin(layout: Layout, margin: Sequence[int]) -> Triple:
    """``margin`` (input voxels) in output voxels."""
    return tuple(m * s for m, s in zip(margin, layout.scale))  # type: ignore[return-value]


def crop_margins(layout: Layout, out: np.ndarray, *, halo: bool = True) -> np.ndarray:
    """Predictions on read boxes (``(..., Z, Y, X)``: a batch, and the parts of ``slices``),
    cropped to the full-size blocks (``crop``: halo and context) or to the tiles (``blend``,
    ``slices``: context only)."""
    margin = [c + (h if halo else 0) for h, c in zip(layout.halo, layout.context)]
    ms = out_margin(layout, margin)
    return out[(Ellipsis,) + tuple(slice(m, n - m) for m, n in zip(ms, out.shape[-3:]))]


def tile_shape(layout: Layout) -> Triple:
    """The output shape of one ``blend`` tile: the full-size block and twice the halo."""
    return tuple(b + 2 * h for b, h in zip(layout.out_block, out_margin(layout, layout.halo)))  # type: ignore[return-value]


def weighted_tile(layout: Layout, index: Sequence[int], values: np.ndarray,
                  slice_axes: Sequence[int] = ()) -> np.ndarray:
    """The tile at ``index`` (context cropped) times its blend weight: what the tiles phase stores.

    ``slices``: ``values`` are the ``(P, Z, Y, X)`` parts made along ``slice_axes``; the
    tile is the mean of the parts, each with its own weight.
    """
    if layout.stitch != "slices":
        return values * blend_weights(layout, index)
    if values.ndim != 4 or len(values) != len(slice_axes):
        raise ValueError(f"slices mode needs one part per slice axis {tuple(slice_axes)}, got shape {values.shape}")
    acc = values[0] * blend_weights(layout, index, slice_axes[0])
    for part, axis in zip(values[1:], slice_axes[1:]):
        acc += part * blend_weights(layout, index, axis)
    return acc / np.float32(len(slice_axes)) if len(slice_axes) > 1 else acc


def merge_block(layout: Layout, index: Sequence[int],
                read_tile: Callable[[Triple, Box], np.ndarray]) -> np.ndarray:
    """Sum the (up to 27) weighted tiles over the full-size output block at ``index``.

    ``read_tile(neighbour, box)`` returns the part ``box`` (in that neighbour's tile
    coordinates) of the neighbour's weighted tile. The tiles are added in one fixed
    order, so every runner gets the same float32 sums.
    """
    hs = out_margin(layout, layout.halo)
    shape = tile_shape(layout)
    acc = np.zeros(layout.out_block, dtype=np.float32)
    for off in np.ndindex(*(3 if h else 1 for h in layout.halo)):
        nb = tuple(i + (o - 1 if h else 0) for i, o, h in zip(index, off, layout.halo))
        if any(n < 0 or n >= g for n, g in zip(nb, layout.grid)):
            continue
        # the neighbour's tile, in this block's full-size output frame
        lo = tuple((n - i) * b - h for n, i, b, h in zip(nb, index, layout.out_block, hs))
        dst = Box(lo, tuple(a + t for a, t in zip(lo, shape))).clip(layout.out_block)
        acc[dst.slices] += read_tile(nb, dst.shift(lo))  # type: ignore[arg-type]
    return acc


def apply_whole(processor: BlockProcessor, volume: np.ndarray, halo: Sequence[int]) -> np.ndarray:
    """Whole-volume inference: reflect-pad by ``halo``, run once, crop (the crop-mode reference)."""
    padded = np.pad(volume.astype(np.float32), [(h, h) for h in halo], mode="reflect")
    out = processor(padded[None], [tuple(-h for h in halo)])[0]  # type: ignore[arg-type]
    crop = tuple(slice(h * s, out.shape[i] - h * s) for i, (h, s) in enumerate(zip(halo, processor.scale)))
    return out[crop]
