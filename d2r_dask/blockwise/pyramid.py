"""The pyramid of an engine output, computed blockwise by the engine: bounded and resumable.

Level ``k`` (``k >= 1``) is the phase ``pyramid-k``: its array is cut into regions of
whole chunks (:func:`~d2r_dask.io.volume.level_regions`), and each task means-down the
region of level ``k - 1`` under one region and writes it, then records it done like any
other task (:func:`~.jobstate.mark_done`). The scheduler runs these phases after the
model's, in order, through the same sliding window, so the scheduler holds a few tasks
whatever the output's size, and a killed run resumes at the first region not done.
The NGFF metadata is written after the last level (:func:`~d2r_dask.io.volume.write_multiscales`).
"""

from __future__ import annotations

from ..io.geometry import Box
from ..io.volume import PyramidLevel, downsample_region, level_regions, output_array, pyramid_plan
from .jobstate import Job, mark_done
from .layout import Layout
from .runtime import RUNTIME

PREFIX = "pyramid-"
REGION_VOXELS = 1 << 24
"""About how many voxels of a level one task writes (whole chunks)."""
MIN_SIZE = 32
"""No level smaller than this along an axis it coarsens (as :func:`~d2r_dask.io.volume.finalize_volume`)."""


def pyramid_phase(level: PyramidLevel) -> str:
    """The phase (and done-state) name of ``level``."""
    return f"{PREFIX}{level.path}"


def level_layout(level: PyramidLevel) -> Layout:
    """The regions of ``level`` as a layout (no halo, scale 1): one region per task."""
    return Layout(roi=Box((0, 0, 0), level.shape), block=level_regions(level.shape, level.chunks, REGION_VOXELS),
                  halo=(0, 0, 0))


def _level(job: Job, phase: str) -> PyramidLevel:
    k = int(phase[len(PREFIX):])
    plan = pyramid_plan(job.output, levels=k + 1, min_size=MIN_SIZE)
    if len(plan) < k:
        raise ValueError(f"{job.output} has no pyramid level {k} (volume too small for it)")
    return plan[k - 1]


def pyramid_group(job: Job, phase: str, group_id: int) -> int:
    """Task ``group_id`` of phase ``pyramid-k``: write its regions of level ``k`` from
    level ``k - 1``, then record it done. Idempotent."""
    level = _level(job, phase)
    layout = level_layout(level)
    k = int(level.path)
    source = RUNTIME.cached(job, f"level{k - 1}", lambda: output_array(job.output, k - 1))
    target = RUNTIME.cached(job, f"level{k}", lambda: output_array(job.output, k))
    indices = layout.group_blocks(group_id)
    with RUNTIME.timed("pyramid"):
        for index in indices:
            downsample_region(source, target, level.factors, layout.write_box(index).slices)
    with RUNTIME.timed("marker"):
        mark_done(job, phase, group_id)
    return len(indices)
