"""d2r-dask: isotropic volume EM from anisotropic stacks with D2R, blockwise on Dask over OME-Zarr.

The Python API mirrors the ``d2r`` commands::

    import d2r_dask as d2r
    lr = d2r.open_volume("lr.zarr")                       # lazy (z, y, x) DataArray in nm
    d2r.run("lr.zarr", "sr.zarr", d2r.RunConfig(factor=8))  # Stages I-IV, resumable
    sr = d2r.super_resolve(lr, d2r.load_model("sr.d2r-work/dgean"))  # Stage IV, lazy
    d2r.write_volume(sr[:, 1000:2000], "crop.zarr")        # streamed to OME-Zarr
    from d2r_dask.evaluation.evaluate import evaluate
    evaluate("gt.zarr", {"sr": "sr.zarr"}, lr_path="lr.zarr", out_dir="report")

Names are imported on first use, so ``import d2r_dask`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "open_volume": "io.volume", "create_volume": "io.volume", "Geometry": "io.geometry",
    "load_model": "lazy", "super_resolve": "lazy", "restore_slices": "lazy", "write_volume": "lazy",
    "AxialDegradation": "data.degrade", "degrade_volume": "data.degrade", "upsample_axis": "data.degrade",
    "synth_dask": "data.synth", "synth_block": "data.synth",
    "run_blockwise": "blockwise.scheduler", "ModelSpec": "blockwise.processors", "connect": "blockwise.cluster",
    "TrainConfig": "stages.train", "RestorerConfig": "stages.train", "DGEANTrainConfig": "stages.train",
    "train_restorer": "stages.train", "train_dgean": "stages.train",
    "RunConfig": "stages.config", "run": "stages.pipeline", "plan": "stages.pipeline",
}
# convert, restore, infer, evaluate and demo are imported from their modules
# (``from d2r_dask.stages.infer import infer``); ``d2r_dask.demo`` is itself a module here.
__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'd2r_dask' has no attribute {name!r}")
