"""Training patches: read at random from a stored volume, augment, and degrade into pairs.

The volume is never loaded whole: each patch is assembled from the Zarr chunks it touches,
read straight from the store (no Dask graph per patch) through a small per-process cache of
decoded chunks (:data:`CHUNK_CACHE_BYTES`), so patches that share chunks decode them once.
Draws are keyed by ``(seed, step)`` so a resumed run sees exactly the batches an
uninterrupted one would, whichever process draws them. Pair construction is pure numpy,
testable without any store:

* Stage I  (:func:`lateral_pair`): an XY patch, flipped/rotated, degraded along
  its rows like z was acquired, and the condition ``mu`` = that degraded patch
  upsampled back (bicubic, each row at its true position).
* Stage III (:func:`axial_pair`): a 3D pseudo-HR patch, flipped / xy-swapped /
  xy-rotated, degraded along z exactly as the acquisition degrades. Patches start on the
  acquisition grid (:meth:`PatchSource.read` with ``z_align``) and z-flips keep it, so the
  network's inputs are the *acquired* slices of the pseudo-HR, as at inference, never
  slices the restorer synthesised in between.

:class:`LateralBatches` and :class:`AxialBatches` turn ``(rng, n)`` into a batch of ``n``
such pairs; they are picklable, so data-loader processes can draw batches in parallel.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import InputError
from ..io.volume import open_reader, open_volume
from .degrade import degrade_along, upsample_axis
from .intensity import Intensity


def step_rng(seed: int, step: int, stream: int = 0) -> np.random.Generator:
    """The random generator of one training step (independent of run history)."""
    return np.random.default_rng([seed, step, stream])


CHUNK_CACHE_BYTES = 128 << 20
"""Decoded chunks each process keeps per patch source (a data-loader worker is one process)."""


class PatchSource:
    """Random patches of a stored volume, in unit intensities, from a z-range of it.

    Picklable: a copy in another process reads through its own chunk cache.
    """

    def __init__(self, path: str | os.PathLike, *, z_range: tuple[int, int] | None = None,
                 intensity: Intensity | None = None, cache_bytes: int = CHUNK_CACHE_BYTES) -> None:
        vol = open_volume(path)
        self.path = str(path)
        self.data = vol.data  # lazy: the intensity sample and callers that want the whole volume
        self.reader = open_reader(path, cache_bytes=cache_bytes)
        self.geometry = vol.attrs
        self.shape: tuple[int, int, int] = tuple(vol.shape)  # type: ignore[assignment]
        self.z_range = z_range or (0, self.shape[0])
        self.intensity = intensity or Intensity.for_volume(self.data, self.data.dtype)

    def check_fits(self, patch: Sequence[int], what: str,
                   fix: str = "use a smaller --patch or a larger volume") -> None:
        """Refuse a patch larger than the volume, stating both sizes (z x y x x) and ``fix``."""
        zs = self.z_range[1] - self.z_range[0]
        if zs < patch[0] or self.shape[1] < patch[1] or self.shape[2] < patch[2]:
            raise InputError(
                f"{self.path}: one {what} training patch needs {patch[0]} x {patch[1]} x {patch[2]} voxels "
                f"(z x y x x), but the volume has {zs} usable slices x {self.shape[1]} x {self.shape[2]}; {fix}"
            )

    def read(self, rng: np.random.Generator, patch: Sequence[int], *, z_align: int = 1) -> np.ndarray:
        """One random ``patch``-shaped block, unit intensities, float32.

        ``z_align``: the block starts on a multiple of it (the LR grid of an SR-geometry volume).
        """
        first = -(-self.z_range[0] // z_align) * z_align
        n_starts = (self.z_range[1] - patch[0] - first) // z_align + 1
        if n_starts < 1:
            raise InputError(f"{self.path}: slices {self.z_range} hold no {patch[0]}-slice patch starting on a "
                             f"multiple of {z_align}; use a smaller patch or a larger volume")
        z0 = first + z_align * rng.integers(0, n_starts)
        y0 = rng.integers(0, self.shape[1] - patch[1] + 1)
        x0 = rng.integers(0, self.shape[2] - patch[2] + 1)
        block = self.reader((slice(z0, z0 + patch[0]), slice(y0, y0 + patch[1]), slice(x0, x0 + patch[2])))
        return self.intensity.to_unit(block)


def augment_2d(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random one of the 8 flips/90-degree rotations of a square 2D patch."""
    img = np.rot90(img, int(rng.integers(4)))
    return np.ascontiguousarray(img[:, ::-1] if rng.integers(2) else img)


def augment_3d(vol: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random y/x flips, an x/y swap and an xy rotation of a ``(z, y, x)`` patch (y == x).

    z is left alone: :func:`axial_pair` flips it without moving the acquisition grid.
    """
    vol = np.rot90(vol, int(rng.integers(4)), axes=(1, 2))
    for axis in (1, 2):
        if rng.integers(2):
            vol = np.flip(vol, axis)
    if rng.integers(2):
        vol = vol.transpose(0, 2, 1)
    return np.ascontiguousarray(vol)


def lateral_pair(patch: np.ndarray, factor: int, mode: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Stage I pair ``(x0, mu)`` from a square 2D patch: ``mu`` is x0 degraded along rows
    and upsampled back to x0's size."""
    x0 = augment_2d(patch, rng)
    lr = degrade_along(x0, factor, axis=0, mode=mode)
    mu = upsample_axis(lr, factor, axis=0, mode=mode, method="cubic", length=x0.shape[0])
    return x0.astype(np.float32), mu.astype(np.float32)


def axial_pair(block: np.ndarray, factor: int, mode: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Stage III pair ``(lr, hr)``, ``hr`` of ``(D·s, P, P)``, from a ``((D+1)·s, P, P)`` block.

    The block starts on the acquisition grid: with ``decimate`` its slices ``0, s, 2s, …`` were
    acquired, with ``mean`` each run ``k·s … k·s+s−1`` is one section. A z-flip (one pair in two)
    reverses the block and crops it so that the grid still falls there; the extra LR period is
    what makes that crop possible. ``lr`` is then ``hr`` degraded like the acquisition.
    """
    if block.shape[0] % factor or block.shape[0] < 2 * factor:
        raise InputError(f"block depth {block.shape[0]} must be a multiple of the factor {factor}, "
                         "with one LR period to spare")
    depth = block.shape[0] - factor
    start = 0
    if rng.integers(2):
        block = block[::-1]
        start = factor - 1 if mode == "decimate" else 0  # acquired slices moved to phase s-1
    hr = augment_3d(block[start : start + depth], rng)
    lr = degrade_along(hr, factor, axis=0, mode=mode).astype(np.float32)
    return lr, hr.astype(np.float32)


def stack_pairs(pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The first and the second members of ``pairs``, each stacked as ``(N, 1, ...)`` float32."""
    return tuple(np.ascontiguousarray(np.stack([p[i] for p in pairs])[:, None], dtype=np.float32)
                 for i in (0, 1))  # type: ignore[return-value]


@dataclass(frozen=True)
class LateralBatches:
    """Stage I batches ``(x0, mu)``, each ``(n, 1, P, P)``: :func:`lateral_pair` of XY patches."""

    source: PatchSource
    patch: int
    factor: int
    mode: str

    def __call__(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        return stack_pairs([lateral_pair(self.source.read(rng, (1, self.patch, self.patch))[0], self.factor,
                                         self.mode, rng) for _ in range(n)])


@dataclass(frozen=True)
class AxialBatches:
    """Stage III batches ``(lr, hr)``, ``hr`` of ``(n, 1, depth, size, size)``: :func:`axial_pair`
    of blocks one LR period deeper, starting on the acquisition grid."""

    source: PatchSource
    depth: int
    size: int
    factor: int
    mode: str

    def __call__(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        s = self.factor
        return stack_pairs([axial_pair(self.source.read(rng, (self.depth + s, self.size, self.size), z_align=s),
                                       s, self.mode, rng) for _ in range(n)])
