"""Stage IV: run DGEAN over the whole LR volume in 3D blocks and write the isotropic volume.

Crop mode with the network's exact receptive field as halo, so the blockwise
result equals whole-volume inference. The blocks of a task are batched, in channels-last-3d
memory and, on a GPU, bf16 autocast (:mod:`~d2r_dask.models.precision`), optionally ``torch.compile`` d;
``tta`` averages the 8 xy flips/rotations. Blocks cross to the device and back in the
stored dtype (``device_io``): normalisation, rounding and casting run there.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import numpy as np
import torch

from ..blockwise.cluster import resolve_client
from ..blockwise.processors import ModelSpec, register_checkpoint
from ..blockwise.scheduler import run_blockwise
from ..data.intensity import Intensity
from ..errors import renamed
from ..io.geometry import Box, Triple, sr_geometry
from ..io.volume import open_volume
from ..models.precision import autocast_bf16, channels_last, channels_last_input

log = logging.getLogger(__name__)


@register_checkpoint("dgean", "DGEAN")
class DGEANProcessor:
    """``(B, Z, Y, X)`` LR blocks with halo -> ``(B, Z*s, Y, X)`` SR blocks on one device."""

    def __init__(self, directory: str, device: str, *, tta: bool = False, compile: bool = False,
                 bf16: bool | None = None) -> None:
        from ..models.dgean import receptive_field, tta_forward
        from ..models.checkpoint import load_dgean

        net, config = load_dgean(directory)
        self.device = torch.device(device)
        self.bf16 = autocast_bf16(self.device) if bf16 is None else bf16
        self.net = channels_last(net.to(self.device))
        self.forward = (lambda x: tta_forward(self.net, x)) if tta else self.net
        if compile:
            self.forward = torch.compile(self.forward)
        self.intensity = Intensity(**config["intensity"])
        self.factor = net.cfg.factor
        self.scale: Triple = (self.factor, 1, 1)
        self.halo: Triple = tuple(receptive_field(net.cfg))  # type: ignore[assignment]
        self._pinned: torch.Tensor | None = None

    device_io = True
    """Takes blocks in their stored dtype and, given ``out_dtype``, returns them in it: the
    intensity maps, rounding and cast run on the device (:mod:`d2r_dask.models.intensity`),
    so only stored bytes cross the bus, through a pinned staging buffer on a GPU."""

    def _to_device(self, blocks: np.ndarray) -> torch.Tensor:
        """``blocks`` on the device; on a GPU through a reused page-locked buffer, so the copy
        is a DMA that does not wait on the host (``non_blocking`` from pageable memory is a
        synchronous copy). The buffer is free again when the previous call's result has come back."""
        x = torch.from_numpy(np.ascontiguousarray(blocks))
        if self.device.type != "cuda":
            return x.to(self.device)
        if self._pinned is None or self._pinned.shape != x.shape or self._pinned.dtype != x.dtype:
            self._pinned = torch.empty(x.shape, dtype=x.dtype).pin_memory()
        self._pinned.copy_(x)
        return self._pinned.to(self.device, non_blocking=True)

    def __call__(self, blocks: np.ndarray, origins: Sequence[Triple], out_dtype: str | None = None) -> np.ndarray:
        from ..models.intensity import from_unit, to_dtype, to_unit

        x = channels_last_input(to_unit(self._to_device(blocks), self.intensity)[:, None])
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            y = self.forward(x)
        y = from_unit(y.float()[:, 0], self.intensity)  # clipped by the cast to the stored dtype
        return (y if out_dtype is None else to_dtype(y, out_dtype)).cpu().numpy()


DEFAULT_BLOCK: Triple = (32, 128, 128)
"""Stage IV's default block (LR voxels): little halo overhead, a few hundred MB on a GPU."""


def dgean_job(model: str | os.PathLike, *, tta: bool = False, compile: bool = False) -> dict[str, Any]:
    """What a Stage IV job needs from a DGEAN checkpoint, without loading its weights:
    the ``spec`` workers load, its ``halo`` (the receptive field), ``scale``, ``factor``,
    ``mode`` and the output's ``metadata``. Shared by :func:`infer` and the lazy
    :func:`d2r_dask.lazy.super_resolve`, so both run the same job."""
    from ..models.checkpoint import read_dgean_config
    from ..models.dgean import receptive_field

    cfg, _ = read_dgean_config(model)
    return {"spec": ModelSpec("dgean", str(model), {"tta": tta, "compile": compile}),
            "halo": tuple(receptive_field(cfg)), "scale": (cfg.factor, 1, 1), "factor": cfg.factor,
            "mode": cfg.mode,
            "metadata": {"stage": "IV (super-resolved)", "model": str(model), "factor": cfg.factor,
                         "mode": cfg.mode}}


def infer(
    lr_path: str | os.PathLike,
    output: str | os.PathLike,
    model: str | os.PathLike,
    *,
    block: Sequence[int] = DEFAULT_BLOCK,
    group: int | None = None,
    tta: bool = False,
    compile: bool = False,
    roi: Box | None = None,
    client: Any = None,
    serial: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    levels: int = 3,
    batch: int | None = None,
) -> os.PathLike:
    """Stage IV through the engine: the SR volume of ``lr_path``.

    Each task takes ``group`` blocks and runs them as one batch on the device (the
    engine's ``group``; default: small blocks grouped, streamed one at a time, reads and
    writes overlapping the device). Restarting with the same arguments resumes at the first
    unfinished chunk. Without ``client`` (and not ``serial``) it runs on the default
    ``distributed.Client`` when one exists, else in this process. ``batch`` is the
    deprecated name of ``group``.
    """
    if batch is not None:
        group = renamed("infer(batch=...)", "group", batch)  # type: ignore[assignment]
    job = dgean_job(model, tta=tta, compile=compile)
    lr = open_volume(lr_path)
    return run_blockwise(
        lr_path, output, job["spec"], block=block, halo=job["halo"], scale=job["scale"], stitch="crop",
        group=group, roi=roi, geometry=sr_geometry(lr, job["factor"], job["mode"], roi),
        client=resolve_client(client, serial), serial=serial, overwrite=overwrite, progress=progress,
        levels=levels, metadata=job["metadata"],
    )
