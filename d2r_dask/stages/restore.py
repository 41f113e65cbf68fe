"""Stage II: restore every XZ and YZ slice of the LR volume and fuse them into the pseudo-HR.

The engine runs the restorer in ``slices`` mode (:mod:`d2r_dask.blockwise.stitching`). Each
tile is a ``(Z, Y, X)`` LR block grown by the ``halo``; the processor restores the XZ slices
of the rows ``y`` the block owns (over the tile's whole z and x extent) and the YZ slices of
the columns ``x`` it owns (over its z and y extent), never the slices of the halo, which
belong to the neighbouring tiles. Each slice's condition ``mu`` is its cubic z-upsampling
placed by the acquisition geometry, exactly as Stage I built its conditions; the restorer's
reverse diffusion runs on batches of ``slice_batch`` slices. The engine cross-fades the XZ
slices of neighbouring tiles along z and x, the YZ slices along z and y, and averages the two
orientations: so every slice is restored once per tile of its own plane (not once per tile
that overlaps it in 3D, as before), with the same fusion rule -- the blend of the mean.

Along an axis the region fits in one block there is nothing to blend, so the tile has no
halo there (:func:`stage2_layout`): a volume of one tile restores each slice exactly once.
Every Gaussian draw of the sampler is keyed by ``(seed, orientation, step, global HR voxel)``
(made on the device when that is a GPU, :mod:`d2r_dask.models.noise`), so the result does not
depend on chunking or worker count.

``flips`` (self-ensemble): each slice is also restored flipped along z and/or along its lateral
axis, and the restorations, flipped back, are averaged. The network is not equivariant to
flips, so its errors differ between the copies and partly cancel; each flip doubles the
work. A z-flip reflects the slice through its centre, which maps HR slice ``j`` to
``reach - j`` (:func:`~d2r_dask.io.geometry.mirror_reach`); in ``decimate`` mode the ``s - 1``
slices past the last LR slice have no mirror and keep the unflipped restorations only. Each
copy draws its own noise, keyed by the global voxel it restores.
"""

from __future__ import annotations

import itertools
import logging
import os
from typing import Any, Sequence

import numpy as np
import torch

from ..blockwise.cluster import resolve_client
from ..blockwise.layout import Layout
from ..blockwise.processors import ModelSpec, register_checkpoint
from ..blockwise.scheduler import run_blockwise
from ..data.degrade import upsample_axis
from ..data.intensity import Intensity
from ..data.noise import keyed_normal
from ..errors import InputError, renamed
from ..io.geometry import Box, Triple, mirror_reach, sr_geometry
from ..io.volume import open_volume
from ..models.noise import keyed_normal as keyed_normal_on_device
from ..models.precision import autocast_bf16, channels_last
from .config import FLIPS, check_flips

log = logging.getLogger(__name__)

SLICE_AXIS = {"xz": 1, "yz": 2}
"""Orientation -> the axis its slices are stacked along (an XZ slice per y, a YZ slice per x)."""
STREAM = {"xz": 0, "yz": 1}
"""Orientation -> its noise stream (times 1024, plus the sampler's draw)."""


@register_checkpoint("restorer", "restorer")
class RestorerProcessor:
    """Stage II on one device: ``(B, Z, Y, X)`` LR tiles -> ``(B, P, Z*s, Y, X)``, one part per
    orientation, holding the restored slices each block owns (``slices`` mode)."""

    def __init__(self, directory: str, device: str, *, sampler: str | None = None, steps: int | None = None,
                 seed: int = 0, slice_batch: int = 64, orientations: Sequence[str] = ("xz", "yz"),
                 flips: Sequence[str] = (), compile: bool = False, batch: int | None = None) -> None:
        from ..models.checkpoint import load_restorer

        if batch is not None:  # the option's former name
            slice_batch = renamed("restorer option batch", "slice_batch", batch)  # type: ignore[assignment]

        net, self.sde, config = load_restorer(directory)
        self.device = torch.device(device)
        self.net = channels_last(net.to(self.device))
        self.bf16 = autocast_bf16(self.device)
        if compile:  # shapes vary only between edge and interior tiles: few recompilations
            self.net = torch.compile(self.net, dynamic=False)
        self.factor, self.mode = int(config["factor"]), str(config["mode"])
        self.sampler = sampler or config.get("sampler", {}).get("name", "ddim")
        self.steps = steps if steps is not None else config.get("sampler", {}).get("steps")
        self.sde.n_evaluations(self.sampler, self.steps)  # validates the pair
        self.intensity = Intensity(**config["intensity"])
        self.seed, self.slice_batch = int(seed), int(slice_batch)
        if not set(orientations) <= set(SLICE_AXIS) or not orientations:
            raise InputError(f"orientations must be xz and/or yz, got {orientations}")
        self.orientations = tuple(orientations)
        self.flips = check_flips(flips)
        self.slice_axes: tuple[int, ...] = tuple(SLICE_AXIS[o] for o in self.orientations)
        self.scale: Triple = (self.factor, 1, 1)
        self.halo: Triple = (0, 0, 0)  # a diffusion U-Net: tiles are blended, not cropped
        # the same values either way (tested); NumPy is 2.5x faster on a CPU core, the device saves a copy
        self.noise_on_device = self.device.type != "cpu"

    def _noise(self, seed_stream: int, keys: tuple[np.ndarray, ...], shape: torch.Size) -> torch.Tensor:
        """The keyed normals of ``keys``: made on the device (a GPU), or with NumPy (the CPU)."""
        if not self.noise_on_device:
            z = keyed_normal(self.seed, seed_stream, *keys)
            return torch.from_numpy(np.ascontiguousarray(z)).reshape(shape)
        coords = [torch.from_numpy(np.ascontiguousarray(k)).to(self.device) for k in keys]
        return keyed_normal_on_device(self.seed, seed_stream, *coords).reshape(shape)

    def restore_slices(self, slices: np.ndarray, keys: tuple[np.ndarray, np.ndarray, np.ndarray],
                       stream: int) -> np.ndarray:
        """Restore ``(N, Z, L)`` unit-range LR slices to ``(N, Z*s, L)``, averaged over ``flips``.

        ``keys`` are the global (z_hr, y, x) coordinates of the output, broadcastable
        to ``(N, Z*s, L)`` in that orientation (z along axis 1, the lateral axis along 2),
        for the noise.
        """
        reach = mirror_reach(slices.shape[1], self.factor, self.mode)
        total = np.zeros((slices.shape[0], slices.shape[1] * self.factor, slices.shape[2]), dtype=np.float32)
        count = np.zeros((1, total.shape[1], 1), dtype=np.float32)
        combos = itertools.product(*[(False, True) if f in self.flips else (False,) for f in FLIPS])
        for i, (flip_z, flip_lateral) in enumerate(combos):
            x, k = slices, keys
            if flip_lateral:
                x, k = x[:, :, ::-1], tuple(np.flip(a, 2) for a in k)
            if flip_z:  # output j restores HR slice reach - j: key it by that voxel
                x, k = x[:, ::-1], (2 * k[0].min() + reach - k[0], *k[1:])
            y = self._restore(np.ascontiguousarray(x), k, stream + len(STREAM) * i)
            if flip_lateral:
                y = y[:, :, ::-1]
            if flip_z:
                total[:, :reach + 1] += y[:, reach::-1]
                count[:, :reach + 1] += 1
            else:
                total += y
                count += 1
        return total / count

    def _restore(self, slices: np.ndarray, keys: tuple[np.ndarray, ...], stream: int) -> np.ndarray:
        """One reverse diffusion of ``(N, Z, L)`` slices, ``slice_batch`` at a time."""
        mu = upsample_axis(slices, self.factor, axis=1, mode=self.mode, method="cubic")
        out = np.empty_like(mu)
        for a in range(0, len(mu), self.slice_batch):
            b = min(a + self.slice_batch, len(mu))
            sub = tuple(k[a:b] if k.shape[0] > 1 else k for k in keys)

            def noise_fn(k: int, shape: torch.Size, sub: tuple = sub) -> torch.Tensor:
                return self._noise(stream * 1024 + k, sub, shape)

            mu_t = torch.from_numpy(mu[a:b, None]).to(self.device)
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                x = self.sde.sample(self.net, mu_t, sampler=self.sampler, steps=self.steps, noise_fn=noise_fn,
                                    x0_range=self.sde.X0_RANGE)
            out[a:b] = x.float()[:, 0].cpu().numpy()  # clipped only by the final cast to the stored dtype
        return out

    def __call__(self, blocks: np.ndarray, origins: Sequence[Triple], owned: Sequence[Box] | None = None) -> np.ndarray:
        """The restored slices of each block: part ``p`` holds orientation ``p``'s slices on the
        rows (XZ) or columns (YZ) the block owns (``owned``, in block coordinates), 0 elsewhere."""
        if owned is None:
            raise InputError("the restorer makes its output from slices: run it with stitch='slices'")
        s = self.factor
        out = np.zeros((blocks.shape[0], len(self.orientations), blocks.shape[1] * s, *blocks.shape[2:]),
                       dtype=np.float32)
        for i, (block, (z0, y0, x0), box) in enumerate(zip(blocks, origins, owned)):
            unit = self.intensity.to_unit(block)
            nz, ny, nx = unit.shape
            zh = np.arange(z0 * s, (z0 + nz) * s, dtype=np.int64)
            ys, xs = np.arange(y0, y0 + ny, dtype=np.int64), np.arange(x0, x0 + nx, dtype=np.int64)
            for p, orientation in enumerate(self.orientations):
                a, b = box.start[SLICE_AXIS[orientation]], box.stop[SLICE_AXIS[orientation]]
                if orientation == "xz":  # one slice per owned y: (n, Z, X)
                    keys = (zh[None, :, None], ys[a:b, None, None], xs[None, None, :])
                    done = self.restore_slices(unit[:, a:b].transpose(1, 0, 2), keys, STREAM[orientation])
                    out[i, p, :, a:b, :] = self.intensity.from_unit(done).transpose(1, 0, 2)
                else:  # one slice per owned x: (n, Z, Y)
                    keys = (zh[None, :, None], ys[None, None, :], xs[a:b, None, None])
                    done = self.restore_slices(unit[:, :, a:b].transpose(2, 0, 1), keys, STREAM[orientation])
                    out[i, p, :, :, a:b] = self.intensity.from_unit(done).transpose(1, 2, 0)
        return out


DEFAULT_BLOCK: Triple = (128, 256, 256)
"""``d2r restore``'s tile: a slice is restored over (128 + 2 x 4) x (256 + 2 x 16) LR voxels for
128 x 256 it owns, 1.2x the useful work with the default halo (:func:`stage2_work`)."""
DEFAULT_HALO: Triple = (4, 16, 16)
ORIENTATIONS = {"both": ("xz", "yz"), "xz": ("xz",), "yz": ("yz",)}
"""``orientation`` -> the slices restored and averaged."""


def stage2_layout(shape: Sequence[int], roi: Box | None = None, *, block: Sequence[int] = DEFAULT_BLOCK,
                  halo: Sequence[int] = DEFAULT_HALO, factor: int = 1) -> Layout:
    """Stage II's tiles over ``roi`` (default: all) of a volume of ``shape``: blocks no larger
    than the region, and a halo only along axes cut into several blocks (along the others a
    tile has no neighbour to blend with) and below half the volume's extent (reflection).
    The one home of this rule: ``d2r restore``, ``d2r run`` and the lazy API use it."""
    roi = roi or Box((0, 0, 0), tuple(shape))
    block = tuple(min(int(b), n) for b, n in zip(block, roi.shape))
    halo = tuple(0 if b >= n else h for b, h, n in zip(block, fitted_halo(halo, shape), roi.shape))
    return Layout(roi=roi, block=block, halo=halo, scale=(factor, 1, 1), stitch="slices")  # type: ignore[arg-type]


def stage2_work(layout: Layout, orientations: Sequence[str] = ("xz", "yz"), nfe: int = 1) -> dict[str, int]:
    """What Stage II computes on ``layout``: slices restored and pixel-evaluations (one pixel
    through the network once), against the useful ones (each slice of the region once).

    A block restores the slices it owns (clipped to the region) over its whole tile in the two
    other axes; summed over the grid that is, for XZ, ``ny`` rows x ``gz * gx`` tiles of
    ``(bz + 2hz) * s x (bx + 2hx)`` pixels (YZ likewise).
    """
    nz, ny, nx = layout.shape
    (gz, gy, gx), (bz, by, bx), (hz, hy, hx) = layout.grid, layout.block, layout.halo
    s = layout.scale[0]
    zext = (bz + 2 * hz) * s
    slices = computed = useful = 0
    for orientation in orientations:
        if orientation == "xz":
            n, tiles, length, region = ny, gz * gx, bx + 2 * hx, nx
        else:
            n, tiles, length, region = nx, gz * gy, by + 2 * hy, ny
        slices += n * tiles
        computed += n * tiles * zext * length
        useful += n * nz * s * region
    return {"slices": slices, "useful_slices": sum(ny if o == "xz" else nx for o in orientations),
            "pixel_evaluations": computed * nfe, "useful_pixel_evaluations": useful * nfe}


def restorer_job(model: str | os.PathLike, shape: Sequence[int], *, roi: Box | None = None,
                 block: Sequence[int] = DEFAULT_BLOCK, halo: Sequence[int] = DEFAULT_HALO,
                 sampler: str | None = None, steps: int | None = None, seed: int = 0, slice_batch: int = 64,
                 compile: bool = False, orientation: str = "both", flips: Sequence[str] = ()) -> dict[str, Any]:
    """What a Stage II job over ``roi`` of a volume of ``shape`` needs from a restorer
    checkpoint, without loading its weights: the ``spec`` workers load, the ``layout``
    (:func:`stage2_layout`), ``factor``, ``mode`` and the output's ``metadata``. Shared by
    :func:`restore` and the lazy :func:`d2r_dask.lazy.restore_slices`, so both run the same job."""
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
    if orientation != "both":  # "both" keeps the spec of runs made before the option
        options["orientations"] = list(ORIENTATIONS[orientation])
    if flips:  # none keeps the spec of runs made before the option
        options["flips"] = list(check_flips(flips))
    layout = stage2_layout(shape, roi, block=block, halo=halo, factor=factor)
    return {"spec": ModelSpec("restorer", str(model), options), "layout": layout, "factor": factor, "mode": mode,
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
    flips: Sequence[str] = (),
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

    Tiles of ``block`` LR voxels grown by ``halo`` (so neighbours overlap by ``2 * halo``;
    no halo along an axis the region fits in one block) restore the XZ and YZ slices they own
    (``orientation="both"``, averaged) or one of them, ``slice_batch`` slices per forward pass,
    each also restored under ``flips`` (``"z"``, ``"lateral"``; averaged), and are blended
    (``slices`` mode). Restarting with the
    same arguments resumes. Without ``client`` (and not ``serial``) it runs on the default
    ``distributed.Client`` when one exists, else in this process. ``overlap`` and ``batch``
    are the deprecated names of ``halo`` and ``slice_batch``.
    """
    if overlap is not None:
        halo = renamed("restore(overlap=...)", "halo", overlap)  # type: ignore[assignment]
    if batch is not None:
        slice_batch = renamed("restore(batch=...)", "slice_batch", batch)  # type: ignore[assignment]
    lr = open_volume(lr_path)
    job = restorer_job(model, lr.shape, roi=roi, block=block, halo=halo, sampler=sampler, steps=steps, seed=seed,
                       slice_batch=slice_batch, compile=compile, orientation=orientation, flips=flips)
    layout = job["layout"]
    return run_blockwise(
        lr_path, output, job["spec"], block=layout.block, halo=layout.halo, scale=layout.scale,
        stitch=layout.stitch, roi=roi,
        geometry=sr_geometry(lr, job["factor"], job["mode"], roi), client=resolve_client(client, serial),
        serial=serial, overwrite=overwrite, progress=progress, levels=levels, metadata=job["metadata"],
    )
