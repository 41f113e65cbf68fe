"""Intensities on the device: the torch twins of :class:`~d2r_dask.data.intensity.Intensity`'s
maps and of :func:`d2r_dask.io.volume.to_dtype`, with the same bits.

Stage IV sends blocks to the GPU in their stored dtype and brings them back in it, so only
those bytes cross the bus (a quarter of float32's for uint8); normalising, rounding and
casting happen on the device. NumPy computes ``x - low`` and ``/ (high - low)`` in float32
with the Python floats rounded to float32 first; here the constants are float32 tensors on
the device (never Python scalars, which some torch kernels turn into a multiplication by the
reciprocal), one operation per kernel, so each result is the same correctly rounded float32.
Rounding is half to even in both (``np.rint``, ``torch.round``). Tested on CPU tensors.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..data.intensity import Intensity

TORCH_DTYPES = {np.dtype("uint8"): torch.uint8, np.dtype("uint16"): torch.uint16,
                np.dtype("float32"): torch.float32}
"""Stored dtypes -> their torch dtypes (the dtypes d2r reads and writes)."""


def _const(value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(np.float32(value), dtype=torch.float32, device=like.device)


def to_unit(x: torch.Tensor, intensity: Intensity) -> torch.Tensor:
    """``intensity.to_unit`` on a tensor of any dtype (float32 result, on its device)."""
    x = x.to(torch.float32)
    return (x - _const(intensity.low, x)) / _const(intensity.high - intensity.low, x)


def from_unit(x: torch.Tensor, intensity: Intensity) -> torch.Tensor:
    """``intensity.from_unit`` on a tensor (float32 result, on its device)."""
    x = x.to(torch.float32)
    return x * _const(intensity.high - intensity.low, x) + _const(intensity.low, x)


def to_dtype(x: torch.Tensor, dtype: Any) -> torch.Tensor:
    """:func:`d2r_dask.io.volume.to_dtype` on a float32 tensor: integers rounded half to even and
    clipped to their range, then cast, on the tensor's device."""
    dtype = np.dtype(dtype)
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"no torch twin for dtype {dtype}; expected one of {', '.join(map(str, TORCH_DTYPES))}")
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        x = torch.clamp(torch.round(x), float(info.min), float(info.max))
    return x.to(TORCH_DTYPES[dtype])
