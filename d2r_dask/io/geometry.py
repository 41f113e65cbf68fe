"""Voxel geometry: degradation shapes, LR <-> SR index and physical mapping, boxes.

Arrays are ``(z, y, x)``. An LR volume of ``n`` slices and factor ``s`` maps to
an SR volume of ``n * s`` slices. Where an LR slice sits on the HR grid depends
on how the acquisition degraded z (``mode``)::

    decimate (point sampling)          mean (slab of thickness s)
    HR  j: 0 1 2 3 4 5 6 7             HR  j: 0 1 2 3 | 4 5 6 7
    LR  k: 0       1                   LR  k: ---0--- | ---1---
    LR k is HR k*s                     LR k is the mean of HR k*s .. k*s+s-1,
                                       centred at HR k*s + (s-1)/2

So HR slice ``j`` lies at LR coordinate ``j / s`` (decimate) or
``(j - (s-1)/2) / s`` (mean); the SR volume's z-translation follows from that,
which lets a viewer overlay LR and SR exactly. Nothing here imports zarr or dask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import product
from typing import Any, Iterator, Literal, Sequence

import numpy as np

from ..errors import InputError

Mode = Literal["decimate", "mean"]
MODES: tuple[str, ...] = ("decimate", "mean")
Triple = tuple[int, int, int]
FloatTriple = tuple[float, float, float]


def check_mode(mode: str) -> Mode:
    """Return ``mode`` if it is a known degradation mode, else raise."""
    if mode not in MODES:
        raise InputError(f"unknown degradation mode {mode!r}; use one of {', '.join(MODES)}")
    return mode  # type: ignore[return-value]


def check_factor(factor: int) -> int:
    """Validate an integer axial factor (>= 2)."""
    if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or factor < 2:
        raise InputError(
            f"factor must be an integer >= 2 (got {factor!r}); the SR factor is the ratio "
            "of the z step to the lateral pixel size, e.g. 40 nm / 5 nm -> --factor 8"
        )
    return int(factor)


def degraded_length(n_hr: int, factor: int, mode: str) -> int:
    """Number of LR slices made from ``n_hr`` HR slices.

    ``decimate`` keeps slices ``0, s, 2s, ...`` (``ceil(n/s)``); ``mean`` keeps only
    complete slabs (``floor(n/s)``).
    """
    factor, mode = check_factor(factor), check_mode(mode)
    n = math.ceil(n_hr / factor) if mode == "decimate" else n_hr // factor
    if n < 1:
        raise InputError(
            f"degrading {n_hr} slices by {factor} in mode {mode!r} leaves no slice; "
            f"use a factor <= {n_hr} or a volume with more z-slices"
        )
    return n


def sr_length(n_lr: int, factor: int) -> int:
    """Number of SR slices made from ``n_lr`` LR slices (``n * s``)."""
    return n_lr * check_factor(factor)


def hr_to_lr_coord(j: np.ndarray | float, factor: int, mode: str) -> np.ndarray | float:
    """LR (fractional) z-coordinate of HR slice ``j``."""
    factor, mode = check_factor(factor), check_mode(mode)
    offset = 0.0 if mode == "decimate" else (factor - 1) / 2.0
    return (np.asarray(j, dtype=np.float64) - offset) / factor


def lr_to_hr_coord(k: np.ndarray | float, factor: int, mode: str) -> np.ndarray | float:
    """HR (fractional) z-coordinate of LR slice ``k`` (inverse of :func:`hr_to_lr_coord`)."""
    factor, mode = check_factor(factor), check_mode(mode)
    offset = 0.0 if mode == "decimate" else (factor - 1) / 2.0
    return np.asarray(k, dtype=np.float64) * factor + offset


def mirror_reach(n_lr: int, factor: int, mode: str) -> int:
    """Reflecting ``n_lr`` LR slices through their centre maps HR slice ``j`` to ``reach - j``:
    ``(n - 1)·s`` for ``decimate``, ``n·s - 1`` for ``mean``; HR slices ``0 .. reach`` have a
    mirror image, those past it (``decimate``: the ``s - 1`` after the last LR slice) none."""
    return int(round(2 * float(lr_to_hr_coord((n_lr - 1) / 2, factor, mode))))


def lr_transform(
    hr_scale: Sequence[float], hr_translation: Sequence[float], factor: int, mode: str
) -> tuple[FloatTriple, FloatTriple]:
    """Physical ``(scale, translation)`` of the LR volume degraded from an HR one."""
    dz, dy, dx = map(float, hr_scale)
    tz, ty, tx = map(float, hr_translation)
    return (dz * factor, dy, dx), (float(tz + lr_to_hr_coord(0, factor, mode) * dz), ty, tx)


def sr_transform(
    lr_scale: Sequence[float], lr_translation: Sequence[float], factor: int, mode: str
) -> tuple[FloatTriple, FloatTriple]:
    """Physical ``(scale, translation)`` of the SR volume made from an LR one.

    The SR z-step is ``dz / s`` and SR slice ``j`` lands at the physical position of LR
    coordinate :func:`hr_to_lr_coord` ``(j)``, i.e. ``tz + dz * hr_to_lr_coord(0)``.
    """
    dz, dy, dx = map(float, lr_scale)
    tz, ty, tx = map(float, lr_translation)
    return (dz / factor, dy, dx), (float(tz + dz * hr_to_lr_coord(0, factor, mode)), ty, tx)


# --- boxes and tiling -------------------------------------------------------------------


@dataclass(frozen=True)
class Box:
    """A half-open box ``[start, stop)`` of voxels, per axis; may reach outside a volume."""

    start: tuple[int, ...]
    stop: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.start) != len(self.stop) or any(a > b for a, b in zip(self.start, self.stop)):
            raise ValueError(f"invalid box {self.start} -> {self.stop}")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in zip(self.start, self.stop))

    @property
    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop))

    def grow(self, halo: Sequence[int]) -> Box:
        """This box enlarged by ``halo`` voxels on each side."""
        return Box(
            tuple(a - h for a, h in zip(self.start, halo)),
            tuple(b + h for b, h in zip(self.stop, halo)),
        )

    def clip(self, shape: Sequence[int]) -> Box:
        """The part of this box inside a volume of ``shape``."""
        start = tuple(min(max(a, 0), n) for a, n in zip(self.start, shape))
        stop = tuple(min(max(b, 0), n) for b, n in zip(self.stop, shape))
        return Box(start, tuple(max(a, b) for a, b in zip(start, stop)))

    def scale(self, factors: Sequence[int]) -> Box:
        """This box on a grid ``factors`` times finer."""
        return Box(
            tuple(a * f for a, f in zip(self.start, factors)),
            tuple(b * f for b, f in zip(self.stop, factors)),
        )

    def shift(self, offset: Sequence[int]) -> Box:
        """This box moved by ``-offset`` (coordinates relative to ``offset``)."""
        return Box(
            tuple(a - o for a, o in zip(self.start, offset)),
            tuple(b - o for b, o in zip(self.stop, offset)),
        )


def region_of(roi: Box | Sequence[int] | None, shape: Sequence[int], name: str = "roi") -> Box:
    """``roi`` (a :class:`Box`, six numbers ``z0 y0 x0 z1 y1 x1``, or None: the whole volume),
    checked to be a non-empty box inside a volume of ``shape``; ``name`` is how the user gave it."""
    shape = tuple(int(n) for n in shape)
    if roi is None:
        return Box((0,) * len(shape), shape)
    start, stop = (roi.start, roi.stop) if isinstance(roi, Box) else (None, None)
    if start is None:
        r = tuple(int(v) for v in roi)  # type: ignore[union-attr]
        if len(r) != 6:
            raise InputError(f"{name} needs six numbers z0 y0 x0 z1 y1 x1, got {r}")
        start, stop = r[:3], r[3:]
    if any(a < 0 or b > n or b <= a for a, b, n in zip(start, stop, shape)):
        raise InputError(f"{name} {tuple(start)}..{tuple(stop)} is empty or outside the volume {shape}; "
                         "give Z0 Y0 X0 Z1 Y1 X1 inside it")
    return roi if isinstance(roi, Box) else Box(tuple(start), tuple(stop))


def grid_shape(shape: Sequence[int], block: Sequence[int]) -> tuple[int, ...]:
    """Number of blocks per axis that cover ``shape`` (the last ones may be partial)."""
    if len(shape) != len(block) or any(b < 1 for b in block):
        raise InputError(f"block shape {tuple(block)} must have {len(shape)} positive sizes")
    return tuple(math.ceil(n / b) for n, b in zip(shape, block))


def iter_blocks(shape: Sequence[int], block: Sequence[int]) -> Iterator[tuple[tuple[int, ...], Box]]:
    """Yield ``(grid_index, box)`` for every block covering ``shape``, in C order.

    Blocks are aligned to multiples of ``block`` from the origin, so a block's grid
    index is stable across runs and can name its done-marker.
    """
    for index in product(*(range(g) for g in grid_shape(shape, block))):
        start = tuple(i * b for i, b in zip(index, block))
        stop = tuple(min(a + b, n) for a, b, n in zip(start, block, shape))
        yield index, Box(start, stop)


@dataclass(frozen=True)
class Geometry:
    """Physical placement of a volume: voxel size and origin, both in nm, ``(z, y, x)``."""

    voxel_size: tuple[float, float, float] = (1.0, 1.0, 1.0)
    translation: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def __post_init__(self) -> None:
        vs = tuple(float(v) for v in self.voxel_size)
        tr = tuple(float(v) for v in self.translation)
        if len(vs) != 3 or len(tr) != 3:
            raise InputError("voxel size and translation need three values (z, y, x)")
        if not all(np.isfinite(vs)) or min(vs) <= 0:
            raise InputError(f"voxel size must be positive and finite, got {vs}")
        object.__setattr__(self, "voxel_size", vs)
        object.__setattr__(self, "translation", tr)

    @classmethod
    def of(cls, arr: Any) -> Geometry:
        """The geometry stored in a DataArray opened by :func:`open_volume`."""
        return cls(tuple(arr.attrs["voxel_size"]), tuple(arr.attrs["translation"]))


def sr_geometry(lr: Any, factor: int, mode: str, roi: Box | None = None) -> Geometry:
    """The SR volume's geometry for an LR volume (or its ``roi``), per D2R's geometry rules."""
    g = Geometry.of(lr)
    start = roi.start if roi is not None else (0, 0, 0)
    translation = tuple(t + a * v for t, a, v in zip(g.translation, start, g.voxel_size))
    return Geometry(*sr_transform(g.voxel_size, translation, factor, mode))


def central_crop(box: Box, size: Sequence[int]) -> Box:
    """A box of at most ``size`` at the centre of ``box``."""
    sz = [min(n, m) for n, m in zip(box.shape, size)]
    start = tuple(a + (n - s) // 2 for a, n, s in zip(box.start, box.shape, sz))
    return Box(start, tuple(a + s for a, s in zip(start, sz)))
