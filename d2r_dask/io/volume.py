"""Read and write volumes: OME-Zarr (NGFF 0.5 on Zarr v3, 0.4 on Zarr v2) and plain Zarr.

The only module that imports zarr. A volume opens as a lazy
:class:`xarray.DataArray` over a Dask array with dims ``("z", "y", "x")`` and
coordinates in nanometres taken from the NGFF ``scale``/``translation``.

Writing is crash-safe by construction::

    create_volume()  -> group attrs {"d2r": {"complete": false}}, array "0" (empty)
    ... chunks written, each exactly once ...
    finalize_volume() -> pyramid levels, then NGFF "multiscales" + complete=true LAST

so a store left by an interrupted run carries no NGFF image metadata, is refused by
:func:`open_volume`, and never looks finished to us or to other readers.

Longer than most modules on purpose: it is the Zarr boundary (reading NGFF 0.4/0.5 and
plain Zarr, creating, writing, finalizing, describing), kept in one file so that no other
module imports zarr.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import dask.array as da
import numpy as np
from dask.base import tokenize
import xarray as xr
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from .. import __version__
from ..errors import ChunkReadError, D2RError, IncompleteVolumeError, InputError, OutputExistsError
from . import stores
from .files import write_json
from .geometry import Geometry
from .stores import Location, location

log = logging.getLogger(__name__)

AXES = ("z", "y", "x")
_ZARR_MARKERS = ("zarr.json", ".zgroup", ".zarray")
SUPPORTED_DTYPES = (np.dtype("uint8"), np.dtype("uint16"), np.dtype("float32"))
_UNIT_TO_NM = {
    "angstrom": 0.1,
    "nanometer": 1.0,
    "micrometer": 1e3,
    "millimeter": 1e6,
    "meter": 1e9,
}


# --- reading ---------------------------------------------------------------------------


def to_dtype(arr: np.ndarray, dtype: Any) -> np.ndarray:
    """Cast float data to ``dtype``: integers are rounded and clipped to their range (data
    already of ``dtype`` is returned as it is). :func:`d2r_dask.models.intensity.to_dtype` is
    its torch twin (the same bits, on a device)."""
    dtype = np.dtype(dtype)
    if arr.dtype == dtype:
        return arr
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(arr), info.min, info.max).astype(dtype)
    return arr.astype(dtype)


def check_dtype(dtype: Any, what: str = "volume") -> np.dtype:
    """Return the working dtype for ``dtype`` or raise naming the fix."""
    dtype = np.dtype(dtype)
    if dtype == np.float64:
        return np.dtype("float32")
    if dtype not in SUPPORTED_DTYPES:
        raise InputError(
            f"{what} has dtype {dtype}, which d2r does not support; convert it to uint8, "
            "uint16 or float32 (e.g. `d2r convert` on a rescaled copy)"
        )
    return dtype


def _store(path: str | os.PathLike, mode: str) -> Any:
    """What Zarr opens for ``path``: the path itself (local) or an ``FsspecStore`` (object store)."""
    loc = location(path)
    if isinstance(loc, Path):
        return str(loc)
    from zarr.storage import FsspecStore

    url, options = stores.fs_url(loc)
    return FsspecStore.from_url(url, storage_options=options, read_only=mode == "r")


def _open_node(path: str | os.PathLike) -> zarr.Array | zarr.Group:
    p = location(path)
    if not stores.exists(p):
        if isinstance(p, str):
            raise InputError(f"{p}: nothing at this URL (no such bucket or key); check the URL")
        raise InputError(f"{p}: no such file or directory; check the path")
    try:
        return zarr.open(_store(p, "r"), mode="r")
    except Exception as exc:  # zarr raises several types for "not a store"
        raise InputError(
            f"{p} is not a Zarr array or OME-Zarr image ({exc.__class__.__name__}: {exc}); "
            "convert other formats first with `d2r convert`"
        ) from exc


def _multiscales(attrs: Mapping[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    if "ome" in attrs and "multiscales" in attrs["ome"]:
        return attrs["ome"]["multiscales"][0], str(attrs["ome"].get("version", "0.5"))
    if "multiscales" in attrs:
        ms = attrs["multiscales"][0]
        return ms, str(ms.get("version", "0.4"))
    return None, None


def _transforms(items: Sequence[Mapping[str, Any]], ndim: int) -> tuple[np.ndarray, np.ndarray]:
    scale, translation = np.ones(ndim), np.zeros(ndim)
    for item in items or ():
        if item.get("type") == "scale":
            scale = scale * np.asarray(item["scale"], dtype=float)
        elif item.get("type") == "translation":
            translation = translation + np.asarray(item["translation"], dtype=float)
    return scale, translation


def _spatial_axes(axes: Sequence[Any], shape: Sequence[int], path: Location) -> list[int]:
    """Indices of the z, y, x axes; other axes must have size 1."""
    names = [a["name"] if isinstance(a, Mapping) else str(a) for a in axes]
    spatial = [names.index(n) if n in names else -1 for n in AXES]
    if -1 in spatial:
        raise InputError(f"{path}: axes {names} lack one of z, y, x; d2r needs a 3D (z, y, x) volume")
    for i, n in enumerate(names):
        if i not in spatial and shape[i] != 1:
            raise InputError(
                f"{path}: axis {n!r} has size {shape[i]}; d2r works on one 3D channel, "
                "select it first (e.g. write that channel to its own store)"
            )
    return spatial


def _parent_image(path: Location) -> tuple[Location, int] | None:
    """``(image, level)`` if the array at ``path`` is a level of an OME-Zarr image."""
    up = path.parent if isinstance(path, Path) else stores.parent(path)
    try:
        group = zarr.open_group(_store(stores.parent(path), "r"), mode="r")
    except Exception:
        return None
    attrs = group.attrs.asdict()
    if attrs.get("d2r", {}).get("complete") is False:
        raise IncompleteVolumeError(
            f"{path} belongs to {up}, which was left by an interrupted or running d2r job "
            "and is incomplete; rerun the command that made it (restore, infer and run resume) or delete it"
        )
    ms, _ = _multiscales(attrs)
    paths = [str(d.get("path")) for d in ms["datasets"]] if ms else []
    name = stores.name(path)
    return (up, paths.index(name)) if name in paths else None


class _CheckedArray:
    """A Zarr array's reads, where a chunk that cannot be decoded is one clear error.

    Every voxel d2r reads (:func:`open_volume`'s Dask arrays, :class:`VolumeReader`)
    goes through :meth:`__getitem__`, so a corrupt or truncated chunk fails naming the
    store, the array and the chunk, in every command, instead of a codec's traceback.
    A chunk that is *absent* is Zarr's fill value by design (a sparse store), not an error.
    """

    def __init__(self, array: zarr.Array) -> None:
        self.array = array
        self.shape = tuple(array.shape)
        self.dtype = array.dtype
        self.ndim = array.ndim
        self.chunks = array.chunks

    def __getitem__(self, selection: Any) -> np.ndarray:
        try:
            return self.array[selection]
        except Exception as exc:  # codecs raise RuntimeError, ValueError, OSError, ...
            if isinstance(exc, D2RError):
                raise
            raise _chunk_error(self.array, selection, exc) from exc


def _touched_chunks(array: zarr.Array, selection: Any) -> list[tuple[int, ...]]:
    """Grid indices of the chunks a selection (per axis: a slice, an int or integer indices) reads."""
    sel = selection if isinstance(selection, tuple) else (selection,)
    sel = sel + (slice(None),) * (array.ndim - len(sel))
    per_axis = []
    for s, n, c in zip(sel, array.shape, array.chunks):
        idx = np.arange(n)[s] if isinstance(s, slice) else np.atleast_1d(np.asarray(s, dtype=np.int64)) % n
        per_axis.append(sorted(set((idx // c).tolist())))  # only on the error path: cost is no concern
    return list(itertools.product(*per_axis))


def _store_name(store: Any) -> Any:
    """Where a Zarr store is, for messages: its folder, or its URL (an ``FsspecStore``)."""
    root = getattr(store, "root", None)
    if root is not None:
        return root
    fs = getattr(store, "fs", None)
    if fs is None:
        return store
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    return f"{protocol}://{store.path}"


def _chunk_error(array: zarr.Array, selection: Any, exc: BaseException) -> ChunkReadError:
    """The error for a failed read: which chunk (re-read one by one to find it), and the fix."""
    store = _store_name(array.store)
    where = f"array '{array.path or '/'}' of the store {store}"
    bad = None
    try:
        for idx in _touched_chunks(array, selection):
            try:
                array[tuple(slice(i * c, (i + 1) * c) for i, c in zip(idx, array.chunks))]
            except Exception:
                bad = idx
                break
    except Exception:  # a selection we cannot take apart: report the read as a whole
        bad = None
    reason = f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'}"
    if bad is None:
        what = f"a chunk of {where} cannot be read ({reason})"
    else:
        shards = array.shards
        key_idx = bad if shards is None else tuple(i * c // s for i, c, s in zip(bad, array.chunks, shards))
        what = (f"chunk {bad} of {where} cannot be read (file {store}/"
                f"{(array.path + '/') if array.path else ''}{array.metadata.encode_chunk_key(key_idx)}; {reason})")
    if isinstance(exc, PermissionError):
        return ChunkReadError(f"{what}; check the file permissions")
    return ChunkReadError(f"{what}; the store is damaged: re-convert it from the source (`d2r convert`) "
                          "or copy it again from an intact copy")


@dataclass(frozen=True)
class _Located:
    """A stored volume resolved to its Zarr array: which axes are z, y, x and its placement."""

    array: zarr.Array
    spatial: tuple[int, int, int]  # storage axis of z, y, x
    dtype: np.dtype  # working dtype (float64 is read as float32)
    geometry: Geometry
    ngff_version: str | None
    has_voxel_size: bool

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(self.array.shape[i]) for i in self.spatial)  # type: ignore[return-value]

    @property
    def checked(self) -> _CheckedArray:
        """The array to read voxels through (unreadable chunks become one clear error)."""
        return _CheckedArray(self.array)

    def index(self, slices: Sequence[slice]) -> tuple[Any, ...]:
        """The storage-order selection for ``(z, y, x)`` slices (other axes at 0)."""
        return tuple(slices[self.spatial.index(i)] if i in self.spatial else 0 for i in range(self.array.ndim))

    @property
    def order(self) -> list[int]:
        """Transpose that takes the selected storage axes to ``(z, y, x)``."""
        stored = sorted(self.spatial)
        return [stored.index(i) for i in self.spatial]


def _locate(path: Location, level: int, voxel_size: Sequence[float] | None) -> _Located:
    node = _open_node(path)
    version = None
    scale = translation = None
    if isinstance(node, zarr.Group):
        attrs = node.attrs.asdict()
        d2r = attrs.get("d2r", {})
        if d2r.get("complete") is False:
            raise IncompleteVolumeError(
                f"{path} was left by an interrupted or running d2r job and is incomplete; "
                "rerun the command that made it (restore, infer and run resume; others need --overwrite) or delete it"
            )
        ms, version = _multiscales(attrs)
        if ms is None:
            raise InputError(
                f"{path} is a Zarr group without OME-Zarr 'multiscales' metadata; "
                f"give the path of the array inside it (e.g. {path}/0) or convert it with `d2r convert`"
            )
        datasets = ms["datasets"]
        if not 0 <= level < len(datasets):
            raise InputError(f"{path}: level {level} does not exist (it has {len(datasets)} levels)")
        arr = node[datasets[level]["path"]]
        ndim = arr.ndim
        axes = ms.get("axes") or list(AXES[-ndim:])
        scale, translation = _transforms(datasets[level].get("coordinateTransformations", []), ndim)
        s2, t2 = _transforms(ms.get("coordinateTransformations", []), ndim)
        scale, translation = scale * s2, translation * s2 + t2
        units = [a.get("unit") if isinstance(a, Mapping) else None for a in axes]
    else:
        parent = _parent_image(path)
        if parent is not None:  # an array of an OME-Zarr image: take the image's geometry
            return _locate(parent[0], parent[1], voxel_size)
        arr = node
        ndim = arr.ndim
        axes = list(arr.metadata.dimension_names or ()) if arr.metadata.zarr_format == 3 else []
        if not axes or None in axes:  # unnamed: the last three axes are (z, y, x)
            axes = [f"dim_{i}" for i in range(ndim - 3)] + list(AXES[-ndim:])
        units = [None] * ndim
    if ndim < 3:
        raise InputError(f"{path} has {ndim} dimension(s); d2r needs a 3D (z, y, x) volume")
    spatial = _spatial_axes(axes, arr.shape, path)
    dtype = check_dtype(arr.dtype, str(path))

    if scale is not None:
        to_nm = []
        for i in spatial:
            unit = units[i]
            if unit is not None and unit not in _UNIT_TO_NM:
                raise InputError(f"{path}: unsupported spatial unit {unit!r}")
            to_nm.append(_UNIT_TO_NM.get(unit, 1.0) if unit else 1.0)
        vs = tuple(float(scale[i] * f) for i, f in zip(spatial, to_nm))
        tr = tuple(float(translation[i] * f) for i, f in zip(spatial, to_nm))
    else:
        vs, tr = (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)
    if voxel_size is not None:
        vs = Geometry(tuple(voxel_size)).voxel_size
    return _Located(arr, tuple(spatial), dtype, Geometry(vs, tr), version,  # type: ignore[arg-type]
                    scale is not None or voxel_size is not None)


def open_volume(
    path: str | os.PathLike,
    *,
    level: int = 0,
    voxel_size: Sequence[float] | None = None,
) -> xr.DataArray:
    """Open a volume lazily as a ``(z, y, x)`` DataArray with nm coordinates.

    ``path`` is an OME-Zarr image group (NGFF 0.4 or 0.5), an array inside one, or a
    plain 3D Zarr array. ``voxel_size`` overrides (or, for plain arrays, supplies)
    the voxel size in nm. Attributes: ``voxel_size``, ``translation`` (nm),
    ``source`` (the path) and ``ngff_version`` (None for plain arrays).
    """
    path = location(path)
    loc = _locate(path, level, voxel_size)
    if not loc.has_voxel_size:
        log.warning("%s has no voxel size; assuming 1 nm (pass voxel_size to set it)", path)
    # da.from_zarr's name and chunks, reading through the checked array
    name = "from-zarr-" + tokenize(loc.array, loc.array.chunks)
    data = da.from_array(loc.checked, chunks=loc.array.chunks, name=name)
    data = data[loc.index([slice(None)] * 3)].transpose(loc.order)
    if data.dtype != loc.dtype:
        data = data.astype(loc.dtype)
    return as_dataarray(data, loc.geometry, source=str(path), ngff_version=loc.ngff_version)


class VolumeReader:
    """Reads ``(z, y, x)`` boxes of a stored volume straight from Zarr, as numpy.

    The eager counterpart of :func:`open_volume` for workers that read many small
    boxes: no Dask graph per read (a graph costs milliseconds; a small Zarr read
    about as much as the chunks it touches). Picklable.

    With ``cache_bytes`` it keeps up to that many bytes of decoded chunks (least recently
    used dropped first) and assembles each box from them, so boxes that share chunks, like
    training patches drawn again and again from one volume, decode each chunk once. The
    cache belongs to one process and one thread: it is not pickled (a copy sent to another
    process starts empty) and not locked.
    """

    def __init__(self, located: _Located, *, cache_bytes: int = 0) -> None:
        self._loc = located
        self.shape = located.shape
        self.dtype = located.dtype
        self.cache_bytes = int(cache_bytes)
        self._chunks: OrderedDict[tuple[int, ...], np.ndarray] = OrderedDict()
        self._held = 0
        self.decoded = 0  # chunks this process decoded through the cache (tests, benchmarks)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_chunks": OrderedDict(), "_held": 0, "decoded": 0}

    def __call__(self, slices: Sequence[slice]) -> np.ndarray:
        """The data inside ``slices`` (one per axis z, y, x; steps of 1, inside the volume)."""
        selection = self._loc.index(tuple(slices))
        data = self._assemble(selection) if self.cache_bytes > 0 else np.asarray(self._loc.checked[selection])
        return data.transpose(self._loc.order).astype(self.dtype, copy=False)

    def _assemble(self, selection: tuple[Any, ...]) -> np.ndarray:
        """``selection`` (storage order: slices, and ints on non-spatial axes) from cached chunks."""
        array = self._loc.array
        sel = [s if isinstance(s, int) else slice(*s.indices(n)[:2]) for s, n in zip(selection, array.shape)]
        out = np.empty([s.stop - s.start for s in sel if isinstance(s, slice)], dtype=array.dtype)
        grid = [range(s // c, s // c + 1) if isinstance(s, int) else range(s.start // c, -(-s.stop // c))
                for s, c in zip(sel, array.chunks)]
        for idx in itertools.product(*grid):
            chunk, src, dst = self._chunk(idx), [], []
            for s, i, c in zip(sel, idx, array.chunks):
                if isinstance(s, int):
                    src.append(s - i * c)
                    continue
                a, b = max(s.start, i * c), min(s.stop, (i + 1) * c)
                src.append(slice(a - i * c, b - i * c))
                dst.append(slice(a - s.start, b - s.start))
            out[tuple(dst)] = chunk[tuple(src)]
        return out

    def _chunk(self, idx: tuple[int, ...]) -> np.ndarray:
        """Chunk ``idx`` of the array (grid index, storage order), decoded once while cached."""
        if idx in self._chunks:
            self._chunks.move_to_end(idx)
            return self._chunks[idx]
        array = self._loc.array
        box = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(idx, array.chunks, array.shape))
        chunk = np.asarray(self._loc.checked[box])
        self.decoded += 1
        self._chunks[idx] = chunk
        self._held += chunk.nbytes
        while self._held > self.cache_bytes and len(self._chunks) > 1:
            self._held -= self._chunks.popitem(last=False)[1].nbytes
        return chunk


def open_reader(path: str | os.PathLike, *, level: int = 0, cache_bytes: int = 0) -> VolumeReader:
    """A :class:`VolumeReader` for the volume :func:`open_volume` would open (same axes, dtype);
    ``cache_bytes``: how many bytes of decoded chunks it may keep (0: none)."""
    return VolumeReader(_locate(location(path), level, None), cache_bytes=cache_bytes)


def as_dataarray(
    data: da.Array | np.ndarray,
    geometry: Geometry,
    *,
    source: str | None = None,
    ngff_version: str | None = None,
) -> xr.DataArray:
    """Wrap a ``(z, y, x)`` array with nm coordinates for ``geometry``."""
    if data.ndim != 3:
        raise InputError(f"expected a 3D (z, y, x) volume, got {data.ndim} dimension(s)")
    coords = {
        ax: t + s * np.arange(n, dtype=np.float64)
        for ax, n, s, t in zip(AXES, data.shape, geometry.voxel_size, geometry.translation)
    }
    return xr.DataArray(
        data,
        dims=AXES,
        coords=coords,
        attrs={
            "voxel_size": geometry.voxel_size,
            "translation": geometry.translation,
            "units": "nm",
            "source": source,
            "ngff_version": ngff_version,
        },
    )


# --- writing ---------------------------------------------------------------------------


def check_output_path(path: str | os.PathLike, inputs: Sequence[str | os.PathLike | None] = (), *,
                      containing: bool = True, what: str = "output") -> Location:
    """Refuse an output that is, lies inside or (``containing``) holds any of ``inputs``; nothing is written.

    ``containing=False`` for outputs that are only added to, never deleted whole (checkpoint folders).
    Returns ``path`` as a location (:func:`~.stores.location`: a Path, or an object store's URL).
    """
    path = location(path)
    for src in inputs:
        if src is not None and stores.same_or_inside(path, src, containing):
            raise InputError(f"{what} {path} would overwrite the input {src}; choose another {what} path")
    return path


FOLDER_MARKER = ".d2r-folder"
"""Marks a plain folder a d2r command made and owns (``d2r demo``'s), so ``--overwrite`` may delete it."""


def mark_folder(path: str | os.PathLike, command: str) -> Path:
    """Create ``path`` (if needed) and mark it as made by d2r's ``command``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if not (path / FOLDER_MARKER).exists():
        write_json(path / FOLDER_MARKER, {"command": command, "version": __version__})
    return path


def written_by_d2r(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder a d2r command wrote, so ``--overwrite`` may delete it.

    Recognised by what d2r writes first: a volume's ``d2r`` attributes, a blockwise
    job's state (``.d2r/``, written before its volume), a run's ``run.json``, the marker
    of :func:`mark_folder`; an empty folder holds nothing to lose. Anything else (a file,
    a home directory, a store of another tool) is not d2r's to delete.
    """
    path = location(path)
    if not stores.is_dir(path):
        return False
    children = {stores.name(child): folder for child, folder in stores.entries(path)}
    if (not children or children.get(".d2r") is True or children.get(FOLDER_MARKER) is False
            or d2r_metadata(path)):
        return True
    record = stores.join(path, "run.json")
    try:
        data = json.loads(stores.read_bytes(record)) if children.get("run.json") is False else None
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"config", "stages"} <= set(data)


def prepare_output(
    path: str | os.PathLike, *, overwrite: bool = False, inputs: Sequence[str | os.PathLike | None] = ()
) -> Path:
    """Check that ``path`` may be written: never an input, existing only with ``overwrite``.

    The one home of the overwrite rule: with ``overwrite`` an existing ``path`` is
    deleted only if d2r wrote it (:func:`written_by_d2r`), otherwise refused. On an
    object store the bucket must exist (:func:`~.stores.check_bucket`).
    """
    path = check_output_path(path, inputs)
    if stores.exists(path):
        if not overwrite:
            raise OutputExistsError(f"{path} already exists; pass --overwrite (overwrite=True) to replace it")
        check_removable(path)
        stores.remove(path, missing_ok=False)
    else:
        stores.check_bucket(path)
    return path


def check_removable(path: str | os.PathLike) -> None:
    """Refuse (:class:`OutputExistsError`) an existing ``path`` that d2r did not write: ``--overwrite`` keeps it."""
    if stores.exists(path) and not written_by_d2r(path):
        raise OutputExistsError(
            f"{path} is not a Zarr store or folder written by d2r (a file, a folder of other data, or a store "
            "of another tool); d2r will not delete it even with --overwrite: choose another output path"
        )


def default_chunks(shape: Sequence[int], dtype: Any) -> tuple[int, int, int]:
    """Chunks of about 1-2 MiB, as cubic as the shape allows (good for any viewing axis)."""
    edge = 128 if np.dtype(dtype).itemsize == 1 else 96
    return tuple(max(1, min(int(n), edge)) for n in shape)  # type: ignore[return-value]


def _codec(compression: str) -> list[Any]:
    if compression == "zstd":
        return [ZstdCodec(level=3)]
    if compression == "blosc":
        return [BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")]
    if compression == "none":
        return []
    raise InputError(f"unknown compression {compression!r}; use zstd, blosc or none")


def create_volume(
    path: str | os.PathLike,
    *,
    shape: Sequence[int],
    dtype: Any,
    geometry: Geometry,
    chunks: Sequence[int] | None = None,
    shards: Sequence[int] | None = None,
    compression: str = "zstd",
    overwrite: bool = False,
    inputs: Sequence[str | os.PathLike] = (),
    name: str = "image",
    metadata: Mapping[str, Any] | None = None,
    in_job_folder: bool = False,
) -> zarr.Array:
    """Create an (incomplete) OME-Zarr image and return its full-resolution array.

    The group is marked ``complete: false`` until :func:`finalize_volume` runs.
    ``metadata`` is stored under the group's ``d2r`` attributes (provenance,
    configuration). ``shards`` groups chunks into larger files (Zarr v3 sharding),
    which keeps file counts sane for terabyte volumes. ``in_job_folder``: ``path``
    already holds the blockwise job's state, written first (the caller checked the
    path); the image is (re)made beside it and its ``d2r`` attributes come last.
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"volume shape must be three positive sizes (z, y, x), got {shape}")
    dtype = check_dtype(dtype)
    chunks = tuple(int(c) for c in (chunks or default_chunks(shape, dtype)))
    if len(chunks) != 3 or min(chunks) < 1:
        raise InputError(f"chunks must be three positive sizes, got {chunks}")
    attrs = {
        "complete": False,
        "version": __version__,
        "name": name,
        "voxel_size": list(geometry.voxel_size),
        "translation": list(geometry.translation),
        **dict(metadata or {}),
    }
    if in_job_folder:
        group = zarr.open_group(_store(path, "a"), mode="a", zarr_format=3)  # "w" would delete the job state
    else:
        path = prepare_output(path, overwrite=overwrite, inputs=inputs)
        group = zarr.open_group(_store(path, "w"), mode="w", zarr_format=3)
        group.attrs["d2r"] = attrs
    array = group.create_array(
        "0",
        shape=shape,
        chunks=chunks,
        shards=tuple(int(s) for s in shards) if shards else None,
        dtype=dtype,
        compressors=_codec(compression),
        fill_value=0,
        dimension_names=AXES,
        overwrite=in_job_folder,  # an array left by a crash before the attributes holds no result yet
    )
    if in_job_folder:
        group.attrs["d2r"] = attrs  # last: attributes naming the job mean the image is made
    return array


def output_array(path: str | os.PathLike, level: int = 0) -> zarr.Array:
    """Open an array (``level``, default the full resolution) of a volume being written
    (incomplete allowed)."""
    return zarr.open_array(_store(stores.join(path, str(level)), "r+"), mode="r+")


def create_scratch(path: str | os.PathLike, *, shape: Sequence[int], chunks: Sequence[int]) -> zarr.Array:
    """An uncompressed float32 working array (not a volume: no metadata, deleted after use;
    one left by an interrupted creation is replaced)."""
    return zarr.create_array(_store(path, "w"), shape=tuple(shape), chunks=tuple(chunks), dtype="float32",
                             compressors=None, fill_value=0, overwrite=True)


def open_scratch(path: str | os.PathLike) -> zarr.Array:
    """Open an array made by :func:`create_scratch` for reading and writing."""
    return zarr.open_array(_store(path, "r+"), mode="r+")


def d2r_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``d2r`` attributes a volume was written with (provenance, factor, mode), or {}."""
    try:
        node = zarr.open(_store(path, "r"), mode="r")
    except Exception:
        return {}
    return dict(node.attrs.get("d2r", {})) if isinstance(node, zarr.Group) else {}


def is_complete(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a finished volume (OME metadata written, not marked incomplete)."""
    try:
        node = zarr.open(_store(path, "r"), mode="r")
    except Exception:
        return False
    if isinstance(node, zarr.Array):
        try:
            _parent_image(location(path))
        except IncompleteVolumeError:
            return False
        return True
    attrs = node.attrs.asdict()
    return attrs.get("d2r", {}).get("complete", True) and _multiscales(attrs)[0] is not None


def pyramid_factors(voxel_size: Sequence[float]) -> tuple[int, int, int]:
    """Per-axis factor (1 or 2) for the next pyramid level: coarsen the finest axes
    until the voxel is about isotropic, then all axes together."""
    finest_ok = [2 * v <= max(voxel_size) * 1.001 for v in voxel_size]
    return tuple(2 if ok else 1 for ok in finest_ok) if any(finest_ok) else (2, 2, 2)  # type: ignore[return-value]


@dataclass(frozen=True)
class PyramidLevel:
    """One coarser level: array ``path`` of ``shape``/``chunks``, ``factors`` (1 or 2 per
    axis) times coarser than the level before it, placed at ``geometry``."""

    path: str
    shape: tuple[int, int, int]
    chunks: tuple[int, int, int]
    factors: tuple[int, int, int]
    geometry: Geometry


def pyramid_plan(path: str | os.PathLike, *, levels: int = 1, min_size: int = 32) -> list[PyramidLevel]:
    """The levels below the full resolution that ``finalize_volume`` writes, from the
    metadata alone. ``levels`` counts the full-resolution level; fewer are planned where
    a level would be smaller than ``min_size`` along an axis being coarsened."""
    group = zarr.open_group(_store(path, "r"), mode="r")
    d2r = group.attrs.asdict()["d2r"]
    base = group["0"]
    shape, vs, tr = np.array(base.shape), np.array(d2r["voxel_size"], float), np.array(d2r["translation"], float)
    out: list[PyramidLevel] = []
    for level in range(1, max(1, levels)):
        f = np.array(pyramid_factors(vs))
        new_shape = shape // f
        if np.any(new_shape[f > 1] < min_size):
            break
        tr = tr + (f - 1) * vs / 2.0  # a coarse voxel's centre is the mean of its fine centres
        vs = vs * f
        shape = new_shape
        chunks = tuple(min(int(c), int(n)) for c, n in zip(base.chunks, shape))
        out.append(PyramidLevel(str(level), tuple(int(n) for n in shape), chunks,  # type: ignore[arg-type]
                                tuple(int(v) for v in f), Geometry(tuple(vs), tuple(tr))))  # type: ignore[arg-type]
    return out


def create_pyramid_level(path: str | os.PathLike, level: PyramidLevel, *, keep: bool = True) -> zarr.Array:
    """Create the array of ``level`` (like the base: dtype, compressors). An existing one of
    the same shape, chunks and dtype is kept when ``keep`` (a resumed job keeps the regions
    it wrote); otherwise it is replaced (derived data: redone from the level above)."""
    group = zarr.open_group(_store(path, "r+"), mode="r+")
    base = group["0"]
    if keep and level.path in group:
        old = group[level.path]
        if isinstance(old, zarr.Array) and (old.shape, old.chunks, old.dtype) == (level.shape, level.chunks,
                                                                                   base.dtype):
            return old
    return group.create_array(level.path, shape=level.shape, chunks=level.chunks, dtype=base.dtype,
                              compressors=base.compressors, fill_value=0, dimension_names=AXES, overwrite=True)


def downsample_region(source: zarr.Array, target: zarr.Array, factors: Sequence[int],
                      slices: Sequence[slice]) -> None:
    """Write ``target[slices]`` as the mean of the ``factors``-sized cells of ``source``
    under it (integers rounded half to even and clipped), one Zarr read and one write."""
    f = tuple(int(v) for v in factors)
    src = tuple(slice(s.start * k, s.stop * k) for s, k in zip(slices, f))
    data = np.asarray(source[src], dtype=np.float32)
    n = [s.stop - s.start for s in slices]
    mean = data.reshape(n[0], f[0], n[1], f[1], n[2], f[2]).mean(axis=(1, 3, 5))
    dtype = np.dtype(target.dtype)
    if np.issubdtype(dtype, np.integer):
        mean = np.clip(np.round(mean), 0, np.iinfo(dtype).max)
    target[tuple(slices)] = mean.astype(dtype)


def level_regions(shape: Sequence[int], chunks: Sequence[int], per_region: int = 1 << 24) -> tuple[int, int, int]:
    """A region shape for computing a level: whole chunks, about ``per_region`` voxels,
    grown along x, then y, then z (a task's reads and writes stay chunk-aligned)."""
    region = [int(c) for c in chunks]
    for ax in (2, 1, 0):
        while region[ax] < shape[ax] and math.prod(region) * 2 <= per_region:
            region[ax] = min(int(shape[ax]), region[ax] * 2)
        region[ax] = -(-region[ax] // chunks[ax]) * chunks[ax]
    return tuple(region)  # type: ignore[return-value]


def write_multiscales(path: str | os.PathLike, pyramid: Sequence[PyramidLevel]) -> None:
    """Write the NGFF ``multiscales`` of the base level and ``pyramid``, then mark the
    volume complete: the very last write of a volume."""
    group = zarr.open_group(_store(path, "r+"), mode="r+")
    d2r = group.attrs.asdict()["d2r"]
    geometry = Geometry(tuple(d2r["voxel_size"]), tuple(d2r["translation"]))
    datasets = [_dataset("0", geometry)] + [_dataset(lv.path, lv.geometry) for lv in pyramid]
    group.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [
            {
                "name": d2r.get("name", "image"),
                "axes": [{"name": a, "type": "space", "unit": "nanometer"} for a in AXES],
                "datasets": datasets,
            }
        ],
    }
    group.attrs["d2r"] = {**d2r, "complete": True}


def finalize_volume(path: str | os.PathLike, *, levels: int = 1, min_size: int = 32) -> None:
    """Write pyramid levels (mean downsampling), then the NGFF metadata, last.

    Each level is computed region by region (:func:`level_regions`) straight from Zarr:
    memory and graph size stay bounded whatever the volume (no Dask graph). The blockwise
    engine distributes the same regions over its workers, resumably
    (:mod:`d2r_dask.blockwise.pyramid`); this is the in-process path (``write_volume``,
    ``convert``). ``levels`` counts the full-resolution level.
    """
    from .geometry import iter_blocks

    pyramid = pyramid_plan(path, levels=levels, min_size=min_size)
    group = zarr.open_group(_store(path, "r+"), mode="r+")
    src = group["0"]
    for level in pyramid:
        out = create_pyramid_level(path, level, keep=False)
        region = level_regions(level.shape, level.chunks)
        for _, box in iter_blocks(level.shape, region):
            downsample_region(src, out, level.factors, box.slices)
        src = out
    write_multiscales(path, pyramid)


def _dataset(path: str, geometry: Geometry) -> dict[str, Any]:
    return {
        "path": path,
        "coordinateTransformations": [
            {"type": "scale", "scale": list(geometry.voxel_size)},
            {"type": "translation", "translation": list(geometry.translation)},
        ],
    }


def write_volume(
    path: str | os.PathLike,
    data: da.Array | np.ndarray,
    geometry: Geometry,
    *,
    chunks: Sequence[int] | None = None,
    levels: int = 1,
    overwrite: bool = False,
    inputs: Sequence[str | os.PathLike] = (),
    name: str = "image",
    metadata: Mapping[str, Any] | None = None,
    compression: str = "zstd",
) -> Location:
    """Write a whole array as a finished OME-Zarr image (chunk-aligned, then finalized)."""
    if not isinstance(data, da.Array):
        data = da.from_array(np.asarray(data), chunks=chunks or default_chunks(np.shape(data), data.dtype))
    arr = create_volume(
        path,
        shape=data.shape,
        dtype=data.dtype,
        geometry=geometry,
        chunks=chunks,
        overwrite=overwrite,
        inputs=inputs,
        name=name,
        metadata=metadata,
        compression=compression,
    )
    da.store(data.rechunk(arr.chunks), arr, lock=False)
    finalize_volume(path, levels=levels)
    return location(path)


_METADATA_FILES = ("zarr.json", ".zarray", ".zgroup", ".zattrs")


def _metadata_files(path: str | os.PathLike) -> dict[str, list[Location]]:
    """The metadata documents of the hierarchy at ``path``, by file name, each list
    sorted: groups are listed, array folders (where the chunks are) never."""
    found: dict[str, list[Location]] = {name: [] for name in _METADATA_FILES}

    def walk(folder: Location) -> None:
        present = [name for name in found if stores.is_file(stores.join(folder, name))]
        for name in present:
            found[name].append(stores.join(folder, name))
        if ".zarray" in present or ("zarr.json" in present and json.loads(
                stores.read_bytes(stores.join(folder, "zarr.json"))).get("node_type") == "array"):
            return  # an array: its folder holds chunks only
        for child, is_folder in stores.entries(folder):
            if is_folder:
                walk(child)

    walk(location(path))
    return {name: sorted(files) for name, files in found.items()}  # type: ignore[type-var]


def metadata_digest(path: str | os.PathLike) -> str:
    """SHA-256 of the metadata documents (``zarr.json``, ``.zarray``) of the volume at
    ``path``, found without listing chunk files; equal to hashing every such file that a
    full walk of the store finds, in that order (the fingerprint of jobs made before)."""
    found = _metadata_files(path)
    digest = hashlib.sha256()
    for f in found["zarr.json"] + found[".zarray"]:
        digest.update(stores.read_bytes(f))
    return digest.hexdigest()


def _arrays(path: str | os.PathLike) -> list[zarr.Array]:
    """The arrays of a volume: its levels (an image) or itself (a plain array)."""
    node = zarr.open(_store(path, "r"), mode="r")
    if isinstance(node, zarr.Array):
        return [node]
    ms, _ = _multiscales(node.attrs.asdict())
    return [node[d["path"]] for d in ms["datasets"]] if ms else []


def disk_usage(path: str | os.PathLike, *, exact_up_to: int = 4096, sample: int = 512) -> dict[str, Any]:
    """Bytes on disk of a volume (metadata and chunks or shards), without listing chunks.

    Each array's storage keys follow from its metadata (grid and key encoding); up to
    ``exact_up_to`` keys in all are each stat-ed (exact), beyond that ``sample`` keys per
    array, evenly spread, and the mean is scaled up (``estimated``). Unwritten chunks
    (the fill value) count 0.
    """
    total = sum(stores.size(f) or 0 for files in _metadata_files(path).values() for f in files)
    objects, looked, estimated = 0, 0, False
    arrays = _arrays(path)
    counts = []
    for arr in arrays:
        grid_chunks = arr.metadata.chunk_grid.chunk_shape if arr.metadata.zarr_format == 3 else arr.metadata.chunks
        counts.append(tuple(-(-n // c) for n, c in zip(arr.shape, grid_chunks)))
    exact = sum(math.prod(g) for g in counts) <= exact_up_to
    for arr, grid in zip(arrays, counts):
        root = stores.join(path, arr.store_path.path) if arr.store_path.path else location(path)
        n = math.prod(grid)
        flat = range(n) if exact else np.unique(np.linspace(0, n - 1, min(n, sample)).round().astype(np.int64))
        size = 0
        for i in flat:
            key = arr.metadata.encode_chunk_key(tuple(int(v) for v in np.unravel_index(int(i), grid)))
            size += stores.size(stores.join(root, key)) or 0
        looked += len(flat)
        objects += n
        total += size if exact or len(flat) == n else round(size / len(flat) * n)
        estimated = estimated or len(flat) < n
    return {"bytes": int(total), "estimated": estimated, "objects": objects, "looked_at": looked}


def describe(path: str | os.PathLike, *, sample_slices: int = 16, sample_window: int = 1024) -> dict[str, Any]:
    """A summary of a volume for ``d2r info``: shape, dtype, chunks, geometry, size, intensities.

    The intensity summary reads the central ``sample_window``-square of at most
    ``sample_slices`` evenly spaced z-slices.
    """
    vol = open_volume(path)
    reader = open_reader(path)
    n = vol.shape[0]
    picks = np.unique(np.linspace(0, n - 1, min(n, sample_slices)).round().astype(int))
    # a central window of each sampled slice, read straight from Zarr (no Dask graph over
    # the volume's chunks), keeps `d2r info` fast on terabyte volumes
    window = tuple(slice(max(0, (m - sample_window) // 2), min(m, max(0, (m - sample_window) // 2) + sample_window))
                   for m in vol.shape[1:])
    sample = np.concatenate([reader((slice(int(z), int(z) + 1), *window)).ravel() for z in picks]).astype(np.float64)
    levels = [tuple(a.shape) for a in _arrays(path)] if vol.attrs["ngff_version"] else []
    usage = disk_usage(path)
    return {
        "path": str(path),
        "ngff_version": vol.attrs["ngff_version"],
        "shape": tuple(vol.shape),
        "dtype": str(vol.dtype),
        "chunks": tuple(c[0] for c in vol.data.chunks),
        "voxel_size_nm": vol.attrs["voxel_size"],
        "translation_nm": vol.attrs["translation"],
        "levels": levels,
        "size_on_disk_bytes": usage["bytes"],
        "size_on_disk_estimated": usage["estimated"],
        "uncompressed_bytes": int(np.prod(vol.shape)) * vol.dtype.itemsize,
        "intensity_sample": {
            "slices": len(picks),
            "min": float(sample.min()),
            "max": float(sample.max()),
            "mean": float(sample.mean()),
            "std": float(sample.std()),
            "p1": float(np.percentile(sample, 1)),
            "p99": float(np.percentile(sample, 99)),
            "nonfinite": int((~np.isfinite(sample)).sum()),
        },
    }
