"""Intensity normalisation: stored intensities <-> the unit range the networks see.

Saved in every checkpoint's config, so training and inference map intensities alike.
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
    def for_volume(cls, data: Any, dtype: np.dtype) -> Intensity:
        """Integer volumes use their dtype's range; float ones the 0.1/99.9 percentiles of a sample."""
        if np.issubdtype(dtype, np.integer):
            return cls(0.0, float(np.iinfo(dtype).max))
        n = data.shape[0]
        picks = np.unique(np.linspace(0, n - 1, min(n, 8)).round().astype(int))
        sample = np.asarray(data[picks].compute(scheduler="synchronous"), dtype=np.float64)
        return cls(float(np.percentile(sample, 0.1)), float(np.percentile(sample, 99.9)))

    def to_unit(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, dtype=np.float32) - self.low) / (self.high - self.low)).astype(np.float32)

    def from_unit(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float32) * (self.high - self.low) + self.low).astype(np.float32)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)
