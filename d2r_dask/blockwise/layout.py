"""Layout: the pure geometry of a blockwise job (after daisy's vocabulary).

The input region ``roi`` is cut into ``block`` s on a fixed grid from the ROI's origin
(block ids are grid positions, stable across runs, so they can name done-markers); a
block's *write box* is the part of the output it owns, its *read box* is the full-size
block grown by the ``halo`` (and, in blend mode, the ``context``). Read boxes reaching
outside the volume are filled by reflection, exactly like ``np.pad(mode="reflect")`` of
the whole volume, so blockwise and whole-volume results agree::

        halo   block (write box)   halo
      |<---->|<------------------>|<---->|        read box = block + 2 * halo
              ^ output chunk = write box * scale (one task writes it, once)

Tasks are runs of ``group`` consecutive blocks in C order (``group_blocks``); a task
gives its blocks to the model ``batch`` at a time (default: the whole group), so a
worker can read the next batch and write the previous one while the model runs
(:func:`~.tasks.pipelined`). :func:`default_group` is the engine's default ``group``:
enough blocks per task that the per-task cost of scheduling vanishes. Nothing here
reads or writes a store.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from ..errors import InputError
from ..io.geometry import Box, Triple, grid_shape, iter_blocks

STITCH_MODES = ("crop", "blend", "slices")
BLENDED = ("blend", "slices")
"""The stitch modes whose tiles overlap and are cross-faded (a scratch array of weighted tiles, then a merge)."""


@dataclass(frozen=True)
class Layout:
    """Blocks over an input region. Sizes in input voxels; ``scale`` is output/input per axis."""

    roi: Box
    block: Triple
    halo: Triple
    scale: Triple = (1, 1, 1)
    stitch: str = "crop"
    group: int = 1
    context: Triple = (0, 0, 0)
    batch: int = 0  # blocks per model call; 0: the whole group

    def __post_init__(self) -> None:
        for name in ("block", "halo", "scale", "context"):
            value = tuple(int(v) for v in getattr(self, name))
            if len(value) != 3:
                raise InputError(f"{name} needs three values (z, y, x), got {value}")
            object.__setattr__(self, name, value)
        if min(self.block) < 1 or min(self.scale) < 1 or min(self.halo) < 0 or min(self.context) < 0:
            raise InputError(f"block {self.block} and scale {self.scale} must be >= 1, halo {self.halo} >= 0")
        if self.stitch not in STITCH_MODES:
            raise InputError(f"unknown stitch mode {self.stitch!r}; use one of {', '.join(STITCH_MODES)}")
        if self.group < 1:
            raise InputError("blocks per task (group) must be >= 1")
        if self.batch < 0:
            raise InputError("blocks per model batch (batch) must be >= 1")
        object.__setattr__(self, "batch", min(int(self.batch) or self.group, self.group))
        if min(self.roi.shape) < 1:
            raise InputError(f"region {self.roi} is empty")
        if self.stitch in BLENDED:
            for ax, b, h, n in zip("zyx", self.block, self.halo, self.roi.shape):
                if h and n > b and b < 2 * h:
                    raise InputError(
                        f"blend mode needs blocks at least twice the halo: block {ax}={b} < 2 x {h}; "
                        f"use a block of >= {2 * h} along {ax} or a halo of <= {b // 2} (--halo)"
                    )

    @property
    def shape(self) -> Triple:
        return self.roi.shape  # type: ignore[return-value]

    @property
    def out_shape(self) -> Triple:
        return tuple(n * s for n, s in zip(self.shape, self.scale))  # type: ignore[return-value]

    @property
    def out_block(self) -> Triple:
        return tuple(b * s for b, s in zip(self.block, self.scale))  # type: ignore[return-value]

    @property
    def grid(self) -> Triple:
        return grid_shape(self.shape, self.block)  # type: ignore[return-value]

    @property
    def n_blocks(self) -> int:
        return math.prod(self.grid)

    def blocks(self) -> Iterator[tuple[Triple, Box]]:
        """``(index, write box)`` per block, ROI-relative input coordinates, C order."""
        return iter_blocks(self.shape, self.block)  # type: ignore[return-value]

    @property
    def margin(self) -> Triple:
        """What a read box adds to its block on each side: the halo and, in blend mode, the context."""
        return tuple(h + c for h, c in zip(self.halo, self.context))  # type: ignore[return-value]

    def check_volume(self, shape: Sequence[int]) -> None:
        """Refuse a volume of ``shape`` this layout cannot run on: its region outside the
        volume, or an axis of one voxel where a read box needs context (reflection needs 2)."""
        if any(a < 0 or b > n for a, b, n in zip(self.roi.start, self.roi.stop, shape)):
            raise InputError(f"region {self.roi.start}..{self.roi.stop} is outside the volume {tuple(shape)}")
        for ax, n, m in zip("zyx", shape, self.margin):
            if m and n < 2:
                raise InputError(
                    f"the volume has {n} voxel along {ax}, but the model needs {m} voxel(s) of context there "
                    f"(read by reflection, which needs >= 2 voxels); use a volume with >= 2 voxels along {ax} "
                    f"or halo 0 along {ax} if the model works on single {ax}-slices"
                )

    def read_box(self, index: Sequence[int]) -> Box:
        """The full-size block at ``index`` grown by halo and context (ROI-relative; may leave the ROI)."""
        start = tuple(i * b for i, b in zip(index, self.block))
        return Box(start, tuple(a + b for a, b in zip(start, self.block))).grow(self.margin)

    def owned(self, index: Sequence[int]) -> Box:
        """The input voxels the block at ``index`` owns (its block, clipped to the ROI), in the
        coordinates of its read box (``slices`` mode tells the processor which slices to make)."""
        read = self.read_box(index)
        start = tuple(i * b for i, b in zip(index, self.block))
        stop = tuple(min(a + b, n) for a, b, n in zip(start, self.block, self.shape))
        return Box(start, stop).shift(read.start)

    @property
    def n_groups(self) -> int:
        """Tasks per phase: runs of ``group`` consecutive blocks (C order)."""
        return -(-self.n_blocks // self.group)

    def group_size(self, group_id: int) -> int:
        """Blocks in task ``group_id`` (``group``, fewer for the last)."""
        return max(0, min(self.group, self.n_blocks - group_id * self.group))

    def group_blocks(self, group_id: int) -> list[Triple]:
        """Grid indices of the blocks of task ``group_id``, computed on demand, so a job of
        10^7 blocks never holds a list of them."""
        if not 0 <= group_id < self.n_groups:
            raise IndexError(f"group {group_id} outside 0..{self.n_groups - 1}")
        flat = range(group_id * self.group, min((group_id + 1) * self.group, self.n_blocks))
        return [tuple(int(v) for v in np.unravel_index(i, self.grid)) for i in flat]  # type: ignore[misc]

    def write_box(self, index: Sequence[int]) -> Box:
        """The output voxels the block at ``index`` owns (output units, ROI-relative)."""
        start = tuple(i * b for i, b in zip(index, self.out_block))
        return Box(start, tuple(a + b for a, b in zip(start, self.out_block))).clip(self.out_shape)

    def batches(self, indices: Sequence[Triple]) -> list[list[Triple]]:
        """``indices`` (a task's blocks) in runs of ``batch``: one model call each."""
        return [list(indices[a:a + self.batch]) for a in range(0, len(indices), self.batch)]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["roi"] = {"start": list(self.roi.start), "stop": list(self.roi.stop)}
        if self.batch == self.group:  # the meaning before ``batch`` existed: jobs made then keep their identity
            del d["batch"]
        return d


BATCH_VOXELS = 1 << 18
"""The default batch holds about this many input voxels (read boxes): one block of any real size."""
TASK_VOXELS = 1 << 25
"""About how many input voxels (owned, halo not counted) one task of the default group holds."""
MIN_TASKS = 8
"""The default group leaves at least this many tasks per phase (where there are as many blocks)."""


def default_group(shape: Sequence[int], block: Sequence[int]) -> int:
    """The engine's default blocks per task for a region of ``shape`` cut into ``block`` s.

    A task costs the scheduler about a millisecond on a cluster (ten on a loaded laptop)
    whatever its size, so small blocks are grouped until a task holds ~``TASK_VOXELS``
    voxels, but never into fewer than ``MIN_TASKS`` tasks (so the workers share the
    work). Depends on the geometry only, never on the workers, so a job keeps its identity
    (and resumes) on any cluster. Memory does not grow with the group: a task streams its
    blocks ``batch`` at a time.
    """
    n_blocks = math.prod(grid_shape(shape, block))
    return max(1, min(TASK_VOXELS // max(1, math.prod(block)), n_blocks // MIN_TASKS))


def default_batch(block: Sequence[int], margin: Sequence[int], group: int) -> int:
    """Blocks per model call with the default group: one block (so a task's reads and writes
    overlap its model), unless blocks are tiny (read boxes of ``block + 2 * margin`` below
    ``BATCH_VOXELS``), which are then batched, so that a read decompresses an input chunk once
    for many blocks rather than once per block. Never more than ``group``."""
    read = math.prod(b + 2 * m for b, m in zip(block, margin))
    return max(1, min(group, BATCH_VOXELS // max(1, read)))


def halo_overhead(block: Sequence[int], halo: Sequence[int]) -> float:
    """Voxels a block computes per voxel it keeps: ``prod((b + 2h) / b)``."""
    return math.prod((b + 2 * h) / b for b, h in zip(block, halo))


def choose_block(shape: Sequence[int], halo: Sequence[int], *, max_voxels: float, target: float = 1.3,
                 multiple: int = 16) -> Triple:
    """The default block for a volume of ``shape`` and a model of ``halo`` (input voxels).

    Blocks are cubes of edge a multiple of ``multiple`` (axes shorter than the edge are
    taken whole), so the halo costs the least for their size. The smallest cube whose
    :func:`halo_overhead` is at most ``target`` is chosen, if its read box (block +
    2 x halo) holds at most ``max_voxels`` input voxels (what fits the device's memory);
    otherwise the largest cube that fits, which is then the least overhead the memory
    allows. Pure arithmetic (unit-tested); callers size ``max_voxels`` for their model.
    """
    shape = tuple(int(n) for n in shape)
    halo = tuple(int(h) for h in halo)

    def cube(edge: int) -> Triple:
        return tuple(min(edge, n) for n in shape)  # type: ignore[return-value]

    def read(block: Triple) -> int:
        return math.prod(b + 2 * h for b, h in zip(block, halo))

    best = cube(multiple)
    edge = multiple
    while True:
        block = cube(edge)
        if read(block) > max_voxels and block != cube(multiple):
            return best
        best = block
        if halo_overhead(block, halo) <= target or block == tuple(shape):
            return best
        edge += multiple


def reflect_index(idx: np.ndarray, n: int) -> np.ndarray:
    """Map indices outside ``[0, n)`` inside by mirror reflection (``np.pad`` ``reflect``)."""
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    idx = np.mod(idx, period)
    return np.where(idx >= n, period - idx, idx)


def read_reflected(read: Any, volume_shape: Sequence[int], box: Box) -> np.ndarray:
    """Read ``box`` (global coordinates) from a volume, reflecting outside its bounds.

    ``read(slices)`` returns the array inside the volume; only the bounding box of
    the needed voxels is read.
    """
    idx = [reflect_index(np.arange(a, b), n) for a, b, n in zip(box.start, box.stop, volume_shape)]
    lo = [int(i.min()) for i in idx]
    hi = [int(i.max()) + 1 for i in idx]
    data = np.asarray(read(tuple(slice(a, b) for a, b in zip(lo, hi))))
    if all(a >= 0 and b <= n for a, b, n in zip(box.start, box.stop, volume_shape)):
        return data  # inside the volume: nothing to reflect
    return data[np.ix_(*(i - a for i, a in zip(idx, lo)))]
