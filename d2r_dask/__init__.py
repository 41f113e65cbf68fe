"""d2r-dask: isotropic volume EM from anisotropic stacks with D2R, blockwise on Dask over OME-Zarr."""

from __future__ import annotations

__version__ = "0.1.0"
