"""Seam visibility of a blockwise result: gradients across block boundaries vs elsewhere.

A blockwise run leaves a seam where neighbouring blocks disagree: the intensity
step across a block boundary is then larger than a typical step between
neighbouring voxels. Along each axis::

    ratio = mean |a[i+1] - a[i]| over boundaries (i+1 = offset + k * block)
            ----------------------------------------------------------------
            mean |a[i+1] - a[i]| over all other neighbouring pairs

About 1 means invisible seams (the step across a boundary is an ordinary step);
well above 1 means visible tile edges. Pure numpy, one z-slice at a time, so a
volume costs little memory beyond itself.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def seam_ratio(volume: np.ndarray, block: Sequence[int], *, offset: Sequence[int] = (0, 0, 0)
               ) -> tuple[float, float, float]:
    """Per axis ``(z, y, x)``: mean absolute gradient across block boundaries divided by
    the mean absolute gradient between all other neighbouring voxels.

    ``block`` is the block shape in the volume's own voxels (for a super-resolved
    output: the *output* block, ``block * scale``); boundaries lie at
    ``offset + k * block``. An axis without a boundary (or without interior pairs)
    gives ``nan``.
    """
    a = np.asarray(volume)
    if a.ndim != 3 or len(block) != 3 or len(offset) != 3:
        raise ValueError(f"need a 3D volume and three block sizes, got {a.shape} and {tuple(block)}")
    if min(block) < 1:
        raise ValueError(f"block sizes must be >= 1, got {tuple(block)}")
    # pair i (between voxel i and i+1) crosses a boundary when i + 1 - offset is a multiple of block
    crosses = [((np.arange(n - 1) + 1 - o) % b) == 0 for n, b, o in zip(a.shape, block, offset)]
    across = np.zeros(3)
    total = np.zeros(3)
    prev = None
    for z in range(a.shape[0]):
        cur = a[z].astype(np.float64)
        if prev is not None:
            d = np.abs(cur - prev).sum()
            total[0] += d
            if crosses[0][z - 1]:
                across[0] += d
        for ax in (1, 2):
            d = np.abs(np.diff(cur, axis=ax - 1))
            s = d.sum(axis=1 - (ax - 1))  # per pair position along this axis
            total[ax] += s.sum()
            across[ax] += s[crosses[ax]].sum()
        prev = cur
    ratios = []
    for ax in range(3):
        plane = a.size // a.shape[ax]
        n_across = int(crosses[ax].sum()) * plane
        n_inside = (a.shape[ax] - 1) * plane - n_across
        if n_across == 0 or n_inside == 0 or total[ax] - across[ax] == 0:
            ratios.append(float("nan"))
        else:
            ratios.append(float((across[ax] / n_across) / ((total[ax] - across[ax]) / n_inside)))
    return tuple(ratios)  # type: ignore[return-value]
