"""Counter-based Gaussian noise: one standard-normal value per integer coordinate.

A diffusion sampler run blockwise must draw the same noise for a voxel whichever block, tile
or worker computes it. ``keyed_normal`` therefore has no state: each value is a pure function
of ``(seed, stream, coords...)``. The key is hashed with the splitmix64 finaliser, chained over
the coordinates (order matters), in wrapping uint64 arithmetic; the high and low 32 bits of the
hash are two uniforms that Box-Muller turns into a normal (so |z| < 6.8). Integer hashing is
exact on every platform; the float64 ``log``/``cos`` may differ by an ulp between CPUs or SIMD
paths, which the final float32 rounding absorbs.

Pass coordinates as an open mesh (``np.ix_`` style, e.g. ``z[:, None], x[None, :]``): the hash
of the leading coordinates is then computed on the small arrays, only the last on the tile.
"""

from __future__ import annotations

import numpy as np

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)
_SHIFTS = (np.uint64(30), np.uint64(27), np.uint64(31))
_HIGH = np.uint64(32)


def _mix_int(value: int) -> int:
    """splitmix64 step on a Python int (exact, for the scalar part of the key)."""
    z = (value + _GOLDEN) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array, in place (multiplication wraps mod 2**64)."""
    shifted = np.empty_like(h)
    for shift, mul in zip(_SHIFTS, (_MUL1, _MUL2, None)):
        np.right_shift(h, shift, out=shifted)
        h ^= shifted
        if mul is not None:
            h *= mul
    return h


def _as_uint64(coord: np.ndarray | int, position: int) -> np.ndarray:
    array = np.asarray(coord)
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"coordinate {position} must be integers, got dtype {array.dtype}")
    return array.astype(np.int64, copy=False).view(np.uint64)


def keyed_uint64(seed: int, stream: int, *coords: np.ndarray | int) -> np.ndarray:
    """A 64-bit hash per element of the broadcast of integer ``coords`` (order matters)."""
    key = _mix_int(_mix_int(seed & _MASK) ^ (stream & _MASK))
    coords_u64 = [_as_uint64(coord, position) for position, coord in enumerate(coords)]
    shape = np.broadcast_shapes(*(c.shape for c in coords_u64))
    h = np.array([key], dtype=np.uint64)  # 1-d, so every step stays an array (never a scalar)
    for coord in coords_u64:
        h = _mix(np.bitwise_xor(h, coord))
    return h.reshape(shape)


def keyed_uniform(seed: int, stream: int, *coords: np.ndarray | int) -> np.ndarray:
    """Uniforms in [0, 1) (float64, 53 random bits), keyed like :func:`keyed_uint64`."""
    h = keyed_uint64(seed, stream, *coords)
    return ((h.reshape(-1) >> np.uint64(11)).astype(np.float64) * 2.0**-53).reshape(h.shape)


def keyed_normal(seed: int, stream: int, *coords: np.ndarray | int) -> np.ndarray:
    """Standard normals (float32) over the broadcast of integer ``coords``, keyed by them.

    The value at an element depends only on ``seed``, ``stream`` (e.g. the sampler step) and
    that element's coordinates, so any tiling of the coordinate space sees the same field.
    """
    h = keyed_uint64(seed, stream, *coords)
    shape, h = h.shape, h.reshape(-1)  # 1-d: numpy ufuncs on 0-d arrays return scalars
    radius = (h >> _HIGH).astype(np.uint32).astype(np.float64)
    angle = h.astype(np.uint32).astype(np.float64)  # the low 32 bits
    radius += 0.5  # uniform in (0, 2**32): the log below is finite
    radius *= 2.0**-32
    np.log(radius, out=radius)
    radius *= -2.0
    np.sqrt(radius, out=radius)
    angle *= 2.0 * np.pi * 2.0**-32
    np.cos(angle, out=angle)
    radius *= angle
    return radius.astype(np.float32).reshape(shape)
