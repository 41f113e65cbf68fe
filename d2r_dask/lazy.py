"""The lazy API: Stage IV and Stage II as Dask/xarray operations, for notebooks and pipelines.

::

    import d2r_dask as d2r
    lr = d2r.open_volume("lr.zarr")                   # lazy (z, y, x) DataArray in nm
    dgean = d2r.load_model("work/dgean")              # a small picklable handle (a ModelSpec)
    sr = d2r.super_resolve(lr, dgean)                 # lazy: nothing has run yet
    sr.sel(z=slice(4000, 6000)).compute()             # only the blocks under that slab run
    d2r.write_volume(sr, "sr.zarr")                   # streamed to OME-Zarr, chunk by chunk

Each function builds a Dask graph over the engine's own block layout
(:func:`d2r_dask.blockwise.overlap.lazy_blockwise`: ``da.map_overlap`` with the engine's
``np.pad``-style reflection, the receptive field as depth, output chunks ``z * s``), and its
tasks call the engine's block functions, so ``super_resolve`` equals ``d2r infer`` and
``restore_slices`` equals ``d2r restore`` bit for bit. Workers load a model once and keep it
(the engine's :class:`~d2r_dask.blockwise.runtime.WorkerRuntime` cache).

Where it runs: on the default ``distributed.Client`` when one exists (Dask's own rule for
``.compute()``; :func:`super_resolve` and :func:`restore_slices` give its workers their torch
threads), else on Dask's local threaded scheduler. The lazy API is for regions one looks at
and for composing with other Dask operations; terabyte volumes belong to the batch engine
(``d2r infer`` / ``d2r restore``: resumable, done-markers, a bounded scheduler), and a graph of
more than :data:`~d2r_dask.blockwise.overlap.MAX_BLOCKS` blocks is refused with that advice.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import dask
import dask.array as da
import numpy as np
import xarray as xr

from .blockwise.cluster import resolve_client
from .blockwise.layout import Layout
from .blockwise.overlap import MAX_BLOCKS, lazy_blockwise
from .blockwise.processors import ModelSpec
from .blockwise.runtime import configure_workers
from .errors import InputError
from .io.geometry import Box, Geometry, region_of, sr_geometry
from .io.volume import AXES, as_dataarray, check_dtype, default_chunks
from .io.volume import write_volume as _write_stored

log = logging.getLogger(__name__)

__all__ = ["MAX_BLOCKS", "load_model", "restore_slices", "super_resolve", "write_volume"]


def load_model(path: str | os.PathLike, **options: Any) -> ModelSpec:
    """A handle on the restorer or DGEAN checkpoint in ``path``: its kind, path and ``options``.

    Small and cheap to pickle: it travels in the graph, and each worker loads the weights
    once and keeps them. ``options`` are the processor's (DGEAN: ``tta``, ``compile``;
    restorer: ``sampler``, ``steps``, ``seed``, ``slice_batch``). The checkpoint's config is
    checked here, so a wrong path fails now rather than on a worker.
    """
    from .models.checkpoint import read_config, read_dgean_config, read_restorer_config

    kind = read_config(path).get("kind")
    if kind == "dgean":
        read_dgean_config(path)
    elif kind == "restorer":
        read_restorer_config(path)
    else:
        raise InputError(f"{path} holds a {kind!r} checkpoint; load_model reads 'dgean' and 'restorer' models")
    return ModelSpec(kind, str(Path(path)), options)


def super_resolve(
    lr: Any,
    model: ModelSpec | str | os.PathLike,
    *,
    block: Sequence[int] | None = None,
    tta: bool = False,
    roi: Box | Sequence[int] | None = None,
    group: int = 1,
    voxel_size: Sequence[float] | None = None,
    translation: Sequence[float] | None = None,
    client: Any = None,
    max_blocks: int = MAX_BLOCKS,
) -> xr.DataArray:
    """Stage IV, lazily: the isotropic volume of ``lr`` as a Dask-backed DataArray.

    ``lr`` is a ``(z, y, x)`` DataArray (as :func:`~d2r_dask.io.volume.open_volume` returns
    it; a slice of one keeps its coordinates), a Dask array or a NumPy array (then
    ``voxel_size`` in nm is required). ``model`` is :func:`load_model`'s handle or a DGEAN
    checkpoint folder. ``block`` (LR voxels, default ``d2r infer``'s), ``tta``, ``roi`` (a
    :class:`~d2r_dask.io.geometry.Box` or ``z0 y0 x0 z1 y1 x1``, read with real context
    around it) and ``group`` (blocks per batch) mean what they mean for ``d2r infer``, and the
    values equal its output. The result carries SR coordinates, voxel size and translation.
    """
    from .stages.infer import DEFAULT_BLOCK, dgean_job

    spec = _spec(model, "dgean", "super_resolve")
    job = dgean_job(spec.path, tta=bool(tta or spec.options.get("tta", False)),  # type: ignore[arg-type]
                    compile=bool(spec.options.get("compile", False)))
    vol = _as_volume(lr, voxel_size, translation)
    layout = Layout(roi=region_of(roi, vol.shape), block=tuple(block or DEFAULT_BLOCK), halo=job["halo"],  # type: ignore[arg-type]
                    scale=job["scale"], stitch="crop", group=group)
    command = f"`d2r infer LR.zarr SR.zarr --model {spec.path}`"
    return _lazy(vol, job, layout, command, client, max_blocks)


def restore_slices(
    lr: Any,
    restorer: ModelSpec | str | os.PathLike,
    orientation: str = "both",
    *,
    roi: Box | Sequence[int] | None = None,
    block: Sequence[int] | None = None,
    halo: Sequence[int] | None = None,
    seed: int | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    slice_batch: int | None = None,
    flips: Sequence[str] | None = None,
    voxel_size: Sequence[float] | None = None,
    translation: Sequence[float] | None = None,
    client: Any = None,
    max_blocks: int = MAX_BLOCKS,
) -> xr.DataArray:
    """Stage II, lazily: XZ and/or YZ slices restored and fused into the pseudo-HR volume.

    ``orientation`` is ``"both"`` (averaged, as ``d2r restore``), ``"xz"`` or ``"yz"``;
    ``flips`` (``"z"``, ``"lateral"``) also restores each slice flipped and averages.
    Tiles of ``block`` LR voxels grown by ``halo`` restore the slices they own and are
    cross-faded as the engine's ``slices`` mode does, and the sampler's noise is keyed by
    global voxel coordinates and ``seed``, so the result equals ``d2r restore`` with the same
    options whatever the input's chunking. Options
    left out come from :func:`load_model`'s handle, then from ``d2r restore``'s defaults.
    """
    from .stages.restore import DEFAULT_BLOCK, DEFAULT_HALO, restorer_job

    spec = _spec(restorer, "restorer", "restore_slices")
    opts = dict(spec.options)
    vol = _as_volume(lr, voxel_size, translation)
    job = restorer_job(
        spec.path, vol.shape, roi=region_of(roi, vol.shape), block=tuple(block or DEFAULT_BLOCK),  # type: ignore[arg-type]
        halo=tuple(halo or DEFAULT_HALO),  # type: ignore[arg-type]
        sampler=sampler if sampler is not None else opts.get("sampler"),
        steps=steps if steps is not None else opts.get("steps"),
        seed=int(seed if seed is not None else opts.get("seed", 0)),
        slice_batch=int(slice_batch if slice_batch is not None else opts.get("slice_batch", 64)),
        compile=bool(opts.get("compile", False)), orientation=orientation,
        flips=tuple(flips if flips is not None else opts.get("flips", ())))
    layout = job["layout"]
    command = f"`d2r restore LR.zarr PSEUDO_HR.zarr --model {spec.path}`"
    return _lazy(vol, job, layout, command, client, max_blocks)


def write_volume(
    volume: Any,
    path: str | os.PathLike,
    geometry: Geometry | None = None,
    *,
    chunks: Sequence[int] | None = None,
    levels: int = 3,
    overwrite: bool = False,
    name: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    compression: str = "zstd",
    inputs: Sequence[str | os.PathLike] = (),
    client: Any = None,
) -> Path:
    """Stream a (lazy) volume to an OME-Zarr image at ``path``; return the path.

    ``volume`` is a ``(z, y, x)`` DataArray -- what :func:`super_resolve` or
    :func:`restore_slices` return, or a slice of it -- written with its voxel size,
    translation and ``d2r`` provenance; chunk by chunk (Dask stores each output chunk as it
    is computed, so memory stays bounded by a few chunks per thread), then ``levels`` pyramid
    levels and the NGFF metadata last (an interrupted write never looks complete). It runs
    on ``client``, else the default ``distributed.Client``, else local threads (as many as
    the cores hold torch's threads). The output may not be one of the volume's inputs.

    The former form ``write_volume(path, data, geometry, ...)`` (a path first) writes an
    array with ``geometry`` (:func:`d2r_dask.io.volume.write_volume`).
    """
    if isinstance(volume, (str, os.PathLike)):  # write_volume(path, data, geometry, ...)
        return _write_stored(volume, path, geometry, chunks=chunks, levels=levels,  # type: ignore[arg-type]
                             overwrite=overwrite, inputs=inputs, name=name or "image", metadata=metadata,
                             compression=compression)
    if isinstance(volume, xr.DataArray):
        vol = _as_volume(volume, geometry.voxel_size if geometry else None,
                         geometry.translation if geometry else None)
    elif geometry is not None:
        vol = _as_volume(volume, geometry.voxel_size, geometry.translation)
    else:
        raise InputError("write_volume(array, path) needs the array's geometry: pass geometry=Geometry(voxel_size)"
                         " or a DataArray from open_volume/super_resolve")
    data = vol.data
    meta = {**dict(volume.attrs.get("d2r", {}) if isinstance(volume, xr.DataArray) else {}), **dict(metadata or {})}
    sources = [*(volume.attrs.get("inputs", ()) if isinstance(volume, xr.DataArray) else ()), *inputs]
    chunks = tuple(chunks) if chunks else _regular_chunks(data)
    with _scheduler(client):
        return _write_stored(path, data, Geometry.of(vol), chunks=chunks, levels=levels, overwrite=overwrite,
                             inputs=[str(s) for s in sources if s], name=name or Path(path).name.removesuffix(".zarr"),
                             metadata=meta, compression=compression)


# --- helpers ----------------------------------------------------------------------------------


def _spec(model: ModelSpec | str | os.PathLike, kind: str, what: str) -> ModelSpec:
    spec = model if isinstance(model, ModelSpec) else load_model(model)
    if spec.kind != kind or spec.path is None:
        raise InputError(f"{what} needs a {kind} model, got a {spec.kind!r} one ({spec.path}); "
                         f"load it with d2r.load_model(<{kind} checkpoint folder>)")
    return spec


def _as_volume(lr: Any, voxel_size: Sequence[float] | None, translation: Sequence[float] | None) -> xr.DataArray:
    """``lr`` as a Dask-backed ``(z, y, x)`` DataArray in its working dtype, placed in nm.

    A DataArray's placement comes from its coordinates (so a slice of an opened volume keeps
    its position), else its ``voxel_size``/``translation`` attributes; arrays need ``voxel_size``.
    """
    if isinstance(lr, xr.DataArray):
        if tuple(lr.dims) != AXES:
            raise InputError(f"expected a DataArray with dims {AXES}, got {tuple(lr.dims)}; transpose it first")
        vs = voxel_size or lr.attrs.get("voxel_size")
        spacing = _spacing(lr)  # the coordinates win over attributes they contradict (a strided slice)
        if not voxel_size and spacing is not None and (vs is None or not np.allclose(spacing, vs, rtol=1e-6)):
            vs = spacing
        if vs is None:
            raise InputError("the DataArray has no voxel size (attrs or coordinates); pass voxel_size=(z, y, x) in nm")
        tr = translation or tuple(float(lr[ax].values[0]) if ax in lr.coords and lr.sizes[ax] else t
                                  for ax, t in zip(AXES, lr.attrs.get("translation", (0.0, 0.0, 0.0))))
        data, source = lr.data, lr.attrs.get("source")
        inputs = [source, *lr.attrs.get("inputs", ())]
    elif isinstance(lr, (da.Array, np.ndarray)):
        if voxel_size is None:
            raise InputError(f"a {type(lr).__module__.split('.')[0]} array carries no geometry; pass voxel_size=(z, y, x) "
                             "in nm (and translation= for its origin), or give the DataArray from open_volume")
        vs, tr, data, inputs = voxel_size, translation or (0.0, 0.0, 0.0), lr, []
    else:
        raise InputError(f"expected an xarray.DataArray, a Dask or a NumPy array, got {type(lr).__name__}")
    if data.ndim != 3:
        raise InputError(f"expected a 3D (z, y, x) volume, got {data.ndim} dimension(s)")
    dtype = check_dtype(data.dtype, "the input")
    if not isinstance(data, da.Array):
        data = da.from_array(np.asarray(data), chunks=default_chunks(data.shape, dtype))
    if data.dtype != dtype:
        data = data.astype(dtype)
    out = as_dataarray(data, Geometry(tuple(vs), tuple(tr)))  # type: ignore[arg-type]
    out.attrs["inputs"] = [str(s) for s in inputs if s]
    return out


def _spacing(lr: xr.DataArray) -> tuple[float, ...] | None:
    """Voxel size from the coordinates' spacing (None without two coordinates per axis)."""
    if any(ax not in lr.coords or lr.sizes[ax] < 2 for ax in AXES):
        return None
    return tuple(float(lr[ax].values[1] - lr[ax].values[0]) for ax in AXES)


_CONFIGURED: set[str] = set()


def _lazy(vol: xr.DataArray, job: Mapping[str, Any], layout: Layout, command: str, client: Any,
          max_blocks: int) -> xr.DataArray:
    """The job's lazy output over ``vol`` as a DataArray placed by D2R's geometry rule."""
    client = resolve_client(client)
    if client is not None and client.id not in _CONFIGURED:
        configure_workers(client)  # torch threads x workers within each host's cores
        _CONFIGURED.add(client.id)
    out = lazy_blockwise(vol.data, job["spec"], layout, out_dtype=vol.dtype, max_blocks=max_blocks,
                         batch_command=command)
    sr = as_dataarray(out, sr_geometry(vol, job["factor"], job["mode"], layout.roi))
    sr.attrs["d2r"] = dict(job["metadata"])
    sr.attrs["inputs"] = list(vol.attrs["inputs"])
    sr.name = "pseudo_hr" if layout.stitch == "slices" else "sr"
    return sr


def _regular_chunks(data: Any) -> tuple[int, ...]:
    """The array's chunk shape when Dask's chunks are regular (each computed chunk is then one
    Zarr chunk, written once, with no rechunking), else :func:`default_chunks`."""
    if isinstance(data, da.Array):
        sizes = [c[0] for c in data.chunks]
        if all(all(n == c[0] for n in c[:-1]) and c[-1] <= c[0] for c in data.chunks):
            return tuple(sizes)
    return default_chunks(data.shape, data.dtype)


@contextlib.contextmanager
def _scheduler(client: Any) -> Iterator[None]:
    """Compute on ``client``, else the default client, else threads that leave torch its threads."""
    client = resolve_client(client)
    if client is not None:
        with client.as_current(), dask.config.set(scheduler=client):
            yield
        return
    import sys

    torch_threads = sys.modules["torch"].get_num_threads() if "torch" in sys.modules else 1
    with dask.config.set(scheduler="threads", num_workers=max(1, (os.cpu_count() or 1) // torch_threads)):
        yield
