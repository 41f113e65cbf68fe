"""Counter-based random numbers keyed by global voxel coordinates.

A value depends only on ``(seed, stream, coordinates)``, never on how a volume is
cut into blocks or which worker draws it, so stochastic steps (diffusion
sampling, simulated acquisition noise, synthetic data) are chunking-independent.
"""

from __future__ import annotations

import numpy as np

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective avalanche on uint64."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def keyed_uint64(seed: int, stream: int, *coords: np.ndarray) -> np.ndarray:
    """A 64-bit hash per element of the broadcast of integer coordinate arrays."""
    with np.errstate(over="ignore"):
        h = _mix(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * _GOLDEN + np.uint64(stream & 0xFFFFFFFF))
        h = np.broadcast_to(h, ())
        for c in coords:
            h = _mix(h * _GOLDEN ^ np.asarray(c).astype(np.int64).astype(np.uint64))
    return np.asarray(h)


def keyed_uniform(seed: int, stream: int, *coords: np.ndarray) -> np.ndarray:
    """Uniform float64 in the open interval (0, 1), keyed like :func:`keyed_uint64`."""
    bits = keyed_uint64(seed, stream, *coords) >> np.uint64(11)  # 53 random bits
    return (bits.astype(np.float64) + 0.5) / float(1 << 53)


def keyed_normal(seed: int, stream: int, *coords: np.ndarray) -> np.ndarray:
    """Standard normal float32 per coordinate (Box-Muller on two keyed uniforms)."""
    u1 = keyed_uniform(seed, 2 * stream, *coords)
    u2 = keyed_uniform(seed, 2 * stream + 1, *coords)
    return (np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)).astype(np.float32)
