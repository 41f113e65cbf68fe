"""Stage II: restore every XZ and YZ slice of the LR volume and fuse them into the pseudo-HR.

Each engine tile is a ``(Z, Y, X)`` LR block grown by the ``halo`` (neighbouring tiles
overlap by twice it). The processor cuts it into XZ slices (one per y) and YZ slices
(one per x); each slice's condition ``mu`` is its cubic z-upsampling placed by the
acquisition geometry, exactly as Stage I built its conditions; the restorer's reverse
diffusion runs on batches of ``slice_batch`` slices; the two orientations are averaged.
Every Gaussian draw of the sampler is keyed by ``(seed, orientation, step, global HR
voxel)``, so the result does not depend on chunking or worker count, and the engine's
``blend`` mode cross-fades tiles so no tile edge shows.
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
from ..data.degrade import upsample_axis
from ..data.intensity import Intensity
from ..data.noise import keyed_normal
from ..errors import InputError, renamed
from ..io.geometry import Box, Triple, sr_geometry
from ..io.volume import open_volume

log = logging.getLogger(__name__)


@register_checkpoint("restorer", "restorer")
class RestorerProcessor:
    """Stage II on one device: ``(B, Z, Y, X)`` LR tiles -> ``(B, Z*s, Y, X)`` pseudo-HR."""

    def __init__(self, directory: str, device: str, *, sampler: str | None = None, steps: int | None = None,
                 seed: int = 0, slice_batch: int = 64, orientations: Sequence[str] = ("xz", "yz"),
                 compile: bool = False, batch: int | None = None) -> None:
        from ..models.checkpoint import load_restorer

        if batch is not None:  # the option's former name
            slice_batch = renamed("restorer option batch", "slice_batch", batch)  # type: ignore[assignment]

        net, self.sde, config = load_restorer(directory)
        self.device = torch.device(device)
        self.net = net.to(self.device)
        if self.device.type == "cuda":
            self.net = self.net.to(memory_format=torch.channels_last)
        if compile:  # shapes vary only between edge and interior tiles: few recompilations
            self.net = torch.compile(self.net, dynamic=False)
        self.factor, self.mode = int(config["factor"]), str(config["mode"])
        self.sampler = sampler or config.get("sampler", {}).get("name", "ddim")
        self.steps = steps if steps is not None else config.get("sampler", {}).get("steps")
        self.sde.n_evaluations(self.sampler, self.steps)  # validates the pair
        self.intensity = Intensity(**config["intensity"])
        self.seed, self.slice_batch = int(seed), int(slice_batch)
        if not set(orientations) <= {"xz", "yz"} or not orientations:
            raise InputError(f"orientations must be xz and/or yz, got {orientations}")
        self.orientations = tuple(orientations)
        self.scale: Triple = (self.factor, 1, 1)
        self.halo: Triple = (0, 0, 0)  # a diffusion U-Net: tiles are blended, not cropped

    def restore_slices(self, slices: np.ndarray, keys: tuple[np.ndarray, np.ndarray, np.ndarray],
                       stream: int) -> np.ndarray:
        """Restore ``(N, Z, L)`` unit-range LR slices to ``(N, Z*s, L)``.

        ``keys`` are the global (z_hr, y, x) coordinates of the output, broadcastable
        to ``(N, Z*s, L)`` in that orientation, for the noise.
        """
        mu = upsample_axis(slices, self.factor, axis=1, mode=self.mode, method="cubic")
        out = np.empty_like(mu)
        for a in range(0, len(mu), self.slice_batch):
            b = min(a + self.slice_batch, len(mu))
            sub = tuple(k[a:b] if k.shape[0] > 1 else k for k in keys)

            def noise_fn(k: int, shape: torch.Size, sub: tuple = sub) -> torch.Tensor:
                z = keyed_normal(self.seed, stream * 1024 + k, *sub)
                return torch.from_numpy(np.ascontiguousarray(z)).reshape(shape)

            mu_t = torch.from_numpy(mu[a:b, None]).to(self.device)
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                                enabled=self.device.type == "cuda"):
                x = self.sde.sample(self.net, mu_t, sampler=self.sampler, steps=self.steps, noise_fn=noise_fn,
                                    x0_range=self.sde.X0_RANGE)
            out[a:b] = x.float()[:, 0].cpu().numpy()  # clipped only by the final cast to the stored dtype
        return out

    def __call__(self, blocks: np.ndarray, origins: Sequence[Triple]) -> np.ndarray:
        s = self.factor
        out = np.zeros((blocks.shape[0], blocks.shape[1] * s, *blocks.shape[2:]), dtype=np.float32)
        for i, (block, (z0, y0, x0)) in enumerate(zip(blocks, origins)):
            unit = self.intensity.to_unit(block)
            nz, ny, nx = unit.shape
            zh = np.arange(z0 * s, (z0 + nz) * s, dtype=np.int64)
            ys, xs = np.arange(y0, y0 + ny, dtype=np.int64), np.arange(x0, x0 + nx, dtype=np.int64)
            acc = np.zeros((nz * s, ny, nx), dtype=np.float32)
            if "xz" in self.orientations:  # one slice per y: (ny, Z, X)
                keys = (zh[None, :, None], ys[:, None, None], xs[None, None, :])
                acc += self.restore_slices(unit.transpose(1, 0, 2), keys, 0).transpose(1, 0, 2)
            if "yz" in self.orientations:  # one slice per x: (nx, Z, Y)
                keys = (zh[None, :, None], ys[None, None, :], xs[:, None, None])
                acc += self.restore_slices(unit.transpose(2, 0, 1), keys, 1).transpose(1, 2, 0)
            out[i] = self.intensity.from_unit(acc / len(self.orientations))
        return out


DEFAULT_BLOCK: Triple = (16, 64, 64)
DEFAULT_HALO: Triple = (4, 16, 16)
ORIENTATIONS = {"both": ("xz", "yz"), "xz": ("xz",), "yz": ("yz",)}
"""``orientation`` -> the slices restored and averaged."""


def restorer_job(model: str | os.PathLike, shape: Sequence[int], *, halo: Sequence[int] = DEFAULT_HALO,
                 sampler: str | None = None, steps: int | None = None, seed: int = 0, slice_batch: int = 64,
                 compile: bool = False, orientation: str = "both") -> dict[str, Any]:
    """What a Stage II job over a volume of ``shape`` needs from a restorer checkpoint, without
    loading its weights: the ``spec`` workers load, the ``halo`` fitted to the volume, ``scale``,
    ``factor``, ``mode`` and the output's ``metadata``. Shared by :func:`restore` and the lazy
    :func:`d2r_dask.lazy.restore_slices`, so both run the same job."""
    from ..models.checkpoint import read_restorer_config

    if orientation not in ORIENTATIONS:
        raise InputError(f"orientation must be one of {', '.join(ORIENTATIONS)}, got {orientation!r}")
    *_, config = read_restorer_config(model)
    factor, mode = int(config["factor"]), str(config["mode"])
    options: dict[str, Any] = {"seed": seed, "slice_batch": slice_batch, "compile": compile}
    if sampler is not None:
        options["sampler"] = sampler
    if steps is not None:
        options["steps"] = steps
    if orientation != "both":  # "both" keeps the spec (and the job hash) of runs made before the option
        options["orientations"] = list(ORIENTATIONS[orientation])
    halo = fitted_halo(halo, shape)
    return {"spec": ModelSpec("restorer", str(model), options), "halo": halo, "scale": (factor, 1, 1),
            "factor": factor, "mode": mode,
            "metadata": {"stage": "II (pseudo-HR)", "model": str(model), "factor": factor, "mode": mode}}


def fitted_halo(halo: Sequence[int], shape: Sequence[int]) -> Triple:
    """``halo`` where reflection allows it: below half the volume's extent along each axis."""
    return tuple(min(h, max(0, n // 2 - 1)) if n > 1 else 0 for h, n in zip(halo, shape))  # type: ignore[return-value]


def restore(
    lr_path: str | os.PathLike,
    output: str | os.PathLike,
    model: str | os.PathLike,
    *,
    roi: Box | None = None,
    block: Sequence[int] = DEFAULT_BLOCK,
    halo: Sequence[int] = DEFAULT_HALO,
    sampler: str | None = None,
    steps: int | None = None,
    seed: int = 0,
    slice_batch: int = 64,
    orientation: str = "both",
    compile: bool = False,
    client: Any = None,
    serial: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    levels: int = 1,
    overlap: Sequence[int] | None = None,
    batch: int | None = None,
) -> os.PathLike:
    """Stage II through the engine: the pseudo-HR volume of ``lr_path`` (or of ``roi``).

    Tiles of ``block`` LR voxels grown by ``halo`` (so neighbours overlap by ``2 * halo``)
    are blended; the restorer runs on ``slice_batch`` slices per forward pass, on the XZ
    and YZ slices (``orientation="both"``, averaged) or one of them. Restarting with the
    same arguments resumes. Without ``client`` (and not ``serial``) it runs on the default
    ``distributed.Client`` when one exists, else in this process. ``overlap`` and ``batch``
    are the deprecated names of ``halo`` and ``slice_batch``.
    """
    if overlap is not None:
        halo = renamed("restore(overlap=...)", "halo", overlap)  # type: ignore[assignment]
    if batch is not None:
        slice_batch = renamed("restore(batch=...)", "slice_batch", batch)  # type: ignore[assignment]
    lr = open_volume(lr_path)
    job = restorer_job(model, lr.shape, halo=halo, sampler=sampler, steps=steps, seed=seed,
                       slice_batch=slice_batch, compile=compile, orientation=orientation)
    return run_blockwise(
        lr_path, output, job["spec"], block=block, halo=job["halo"], scale=job["scale"], stitch="blend", roi=roi,
        geometry=sr_geometry(lr, job["factor"], job["mode"], roi), client=resolve_client(client, serial),
        serial=serial, overwrite=overwrite, progress=progress, levels=levels, metadata=job["metadata"],
    )
