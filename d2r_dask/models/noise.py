"""Keyed Gaussian noise made on the device: the torch twin of :mod:`d2r_dask.data.noise`.

The sampler of Stage II draws its noise from ``keyed_normal(seed, stream, z, y, x)`` so that
every tile sees the same field. On a GPU, hashing on the host and copying the field over
costs a host round trip per draw; :func:`keyed_normal` here computes the same splitmix64
chain and Box-Muller transform with torch on the tensors' device. Torch has no uint64
arithmetic, so the hash runs in int64: addition, multiplication and XOR wrap alike in two's
complement, and the logical right shift is an arithmetic shift with the sign bits masked off.
The integer hash is exact (the same 64 bits as NumPy's); the float64 ``log``/``cos`` may
differ by an ulp between libraries, which the final float32 rounding absorbs (tested).
"""

from __future__ import annotations

import math

import torch

from ..data.noise import _MASK, _mix_int

_MUL1 = 0xBF58476D1CE4E5B9
_MUL2 = 0x94D049BB133111EB


def _signed(value: int) -> int:
    """The int64 with the bits of the uint64 ``value``."""
    value &= _MASK
    return value - (1 << 64) if value >= 1 << 63 else value


def _srl(h: torch.Tensor, shift: int) -> torch.Tensor:
    """Logical right shift of int64 bits (``>>`` on int64 is arithmetic: mask the sign copies)."""
    return (h >> shift) & ((1 << (64 - shift)) - 1)


def _mix(h: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finaliser on int64 tensors holding uint64 bits (wrapping)."""
    h = h ^ _srl(h, 30)
    h = h * _signed(_MUL1)
    h = h ^ _srl(h, 27)
    h = h * _signed(_MUL2)
    return h ^ _srl(h, 31)


def keyed_int64(seed: int, stream: int, *coords: torch.Tensor) -> torch.Tensor:
    """The 64-bit hash of :func:`d2r_dask.data.noise.keyed_uint64`, as int64 bits, over the
    broadcast of integer tensors ``coords`` (on their device)."""
    key = _mix_int(_mix_int(seed & _MASK) ^ (stream & _MASK))
    if not coords:
        raise ValueError("keyed noise needs at least one coordinate")
    device = coords[0].device
    h = torch.tensor([_signed(key)], dtype=torch.int64, device=device)
    for position, coord in enumerate(coords):
        if coord.dtype.is_floating_point or coord.dtype.is_complex or coord.dtype == torch.bool:
            raise ValueError(f"coordinate {position} must be integers, got dtype {coord.dtype}")
        h = _mix(h ^ coord.to(torch.int64))
    return h.reshape(torch.broadcast_shapes(*(c.shape for c in coords)))


def keyed_normal(seed: int, stream: int, *coords: torch.Tensor) -> torch.Tensor:
    """Standard normals (float32) keyed by ``(seed, stream, coords...)``: the values of
    :func:`d2r_dask.data.noise.keyed_normal`, computed on the coordinates' device.

    Pass coordinates as an open mesh (``z[:, None], x[None, :]``), as for the NumPy version.
    """
    h = keyed_int64(seed, stream, *coords)
    radius = _srl(h, 32).to(torch.float64)
    angle = (h & 0xFFFFFFFF).to(torch.float64)  # the low 32 bits
    radius = torch.sqrt(torch.log((radius + 0.5) * 2.0**-32) * -2.0)
    return (radius * torch.cos(angle * (2.0 * math.pi * 2.0**-32))).to(torch.float32)
