"""Intensity normalisation: stored intensities <-> the unit range the networks see.

One mapping per run, measured on the LR volume (robust percentiles, any dtype), saved in
``run.json`` and in every checkpoint's config, so Stages I-IV map intensities alike.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..errors import InputError


@dataclass(frozen=True)
class Intensity:
    """Linear map of stored intensities to the unit range the networks see."""

    low: float
    high: float

    def __post_init__(self) -> None:
        if not self.high > self.low:
            raise InputError(f"intensity range [{self.low}, {self.high}] is empty; is the volume constant?")

    @classmethod
    def for_volume(cls, data: Any, dtype: np.dtype | None = None, *, percentiles: tuple[float, float] = (0.1, 99.9),
                   max_slices: int = 16, max_side: int = 1024) -> Intensity:
        """Robust percentiles of a bounded sample of the volume, whatever its dtype.

        A uint16 volume that uses 2% of its range gets as much of the unit range as a uint8 one;
        float volumes of any scale likewise. The sample is up to ``max_slices`` evenly spaced z
        slices, each at most ``max_side``² voxels around its centre, so a terabyte volume costs
        a few reads. Values beyond the percentiles are not clipped: they map outside [0, 1].
        """
        n, ny, nx = data.shape
        picks = np.unique(np.linspace(0, n - 1, min(n, max_slices)).round().astype(int))
        y0, x0 = max(0, (ny - max_side) // 2), max(0, (nx - max_side) // 2)
        block = data[picks, y0 : y0 + max_side, x0 : x0 + max_side]
        sample = np.asarray(block.compute(scheduler="synchronous") if hasattr(block, "compute") else block,
                            dtype=np.float64)
        if not np.isfinite(sample).all():
            raise InputError("the volume holds NaN or infinite values; fix or mask them before running d2r")
        low, high = (float(v) for v in np.percentile(sample, percentiles))
        if not high > low:  # a mostly constant sample: fall back to its full range
            low, high = float(sample.min()), float(sample.max())
        if not high > low:
            raise InputError(f"the sampled slices of the volume are constant ({low}); nothing to restore")
        return cls(low, high)

    def to_unit(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, dtype=np.float32) - self.low) / (self.high - self.low)).astype(np.float32)

    def from_unit(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float32) * (self.high - self.low) + self.low).astype(np.float32)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)
