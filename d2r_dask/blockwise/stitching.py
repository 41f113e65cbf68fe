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
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

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


def blend_weights(layout: Layout, index: Sequence[int]) -> np.ndarray:
    """The 3D partition-of-unity weight of the tile at ``index`` (output units)."""
    ws = []
    for i, b, h, s, n in zip(index, layout.block, layout.halo, layout.scale, layout.shape):
        full, halo = b * s, h * s
        ws.append(blend_weights_1d(full + 2 * halo, i * full, full, halo, n * s))
    return ws[0][:, None, None] * ws[1][None, :, None] * ws[2][None, None, :]


def apply_whole(processor: BlockProcessor, volume: np.ndarray, halo: Sequence[int]) -> np.ndarray:
    """Whole-volume inference: reflect-pad by ``halo``, run once, crop (the crop-mode reference)."""
    padded = np.pad(volume.astype(np.float32), [(h, h) for h in halo], mode="reflect")
    out = processor(padded[None], [tuple(-h for h in halo)])[0]  # type: ignore[arg-type]
    crop = tuple(slice(h * s, out.shape[i] - h * s) for i, (h, s) in enumerate(zip(halo, processor.scale)))
    return out[crop]
