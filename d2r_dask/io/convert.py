"""Convert image stacks to OME-Zarr in bounded memory.

Sources, each behind the same tiny contract (``shape``, ``dtype``, ``read(z0, z1)``):
a multi-page TIFF, a folder of PNG/TIFF slices, an HDF5 dataset
(``file.h5:dataset``), a ``.npy`` file (memory-mapped), or a Zarr/OME-Zarr volume.
Conversion reads one output chunk-row of slices at a time, so a 100 GB TIFF stack
converts with memory for ``chunk_z`` slices.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm

from ..errors import D2RError, InputError
from . import stores
from .geometry import Geometry
from .stores import Location
from .volume import check_dtype, check_output_path, create_volume, default_chunks, finalize_volume, open_volume

log = logging.getLogger(__name__)

SLICE_SUFFIXES = (".tif", ".tiff", ".png")


def check_finite(arr: np.ndarray, what: str = "input") -> None:
    """Raise if a float array holds NaN or inf (integer arrays always pass)."""
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise InputError(
            f"{what} contains NaN or infinite values; replace them (e.g. with the volume's "
            "median) before running d2r"
        )


@dataclass
class StackSource:
    """A 3D stack readable in z-slabs; a context manager that closes its file (if it keeps one open)."""

    description: str
    shape: tuple[int, int, int]
    dtype: np.dtype
    read: Callable[[int, int], np.ndarray]
    voxel_size: tuple[float, float, float] | None = None
    translation: tuple[float, float, float] | None = None
    close: Callable[[], None] = lambda: None

    def __enter__(self) -> StackSource:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@contextlib.contextmanager
def _closed_on_error(handle: Any) -> Iterator[None]:
    """Close ``handle`` if building its source fails (on success the source owns it)."""
    try:
        yield
    except BaseException:
        handle.close()
        raise


def _natural_key(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _check_3d(shape: Sequence[int], what: str) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise InputError(
            f"{what} has shape {tuple(shape)} ({len(shape)}D); d2r needs one 3D (z, y, x) stack"
        )
    if min(shape) < 1:
        raise InputError(f"{what} is empty (shape {tuple(shape)})")
    return tuple(int(n) for n in shape)  # type: ignore[return-value]


def _squeezed(shape: Sequence[int]) -> tuple[int, ...]:
    """``shape`` without its singleton axes if it has more than three (e.g. ``(1, z, y, x)``)."""
    return tuple(int(n) for n in shape if n != 1) if len(shape) > 3 else tuple(int(n) for n in shape)


def _tiff_source(path: Path) -> StackSource:
    import tifffile

    tif = tifffile.TiffFile(path)
    with _closed_on_error(tif):
        series = tif.series[0]
        if series.axes.endswith("S") and series.shape[-1] > 1:  # interleaved colour samples
            raise InputError(
                f"{path} holds colour (RGB) images, axes {series.axes}; d2r needs greyscale: "
                "convert the images to 8- or 16-bit greyscale first"
            )
        shape = _squeezed(series.shape)
        if len(shape) == 2:
            shape = (1, *shape)
        shape = _check_3d(shape, str(path))
        pages = series.pages
        if len(pages) == shape[0]:

            def read(z0: int, z1: int) -> np.ndarray:
                return np.stack([pages[i].asarray().reshape(shape[1:]) for i in range(z0, z1)])

        else:  # one page holds the volume (rare): it can only be read whole
            log.warning("%s stores its volume in %d page(s); reading it whole", path, len(pages))
            whole = series.asarray().reshape(shape)

            def read(z0: int, z1: int) -> np.ndarray:
                return whole[z0:z1]

        return StackSource(f"TIFF {path}", shape, np.dtype(series.dtype), read, close=tif.close)


def _slices_source(folder: Path) -> StackSource:
    files = sorted(
        (f for f in folder.iterdir() if f.suffix.lower() in SLICE_SUFFIXES), key=lambda f: _natural_key(f.name)
    )
    if not files:
        raise InputError(f"{folder} holds no {'/'.join(SLICE_SUFFIXES)} slices; point at a folder of 2D images")

    def load(f: Path) -> np.ndarray:
        try:
            if f.suffix.lower() == ".png":
                from PIL import Image

                with Image.open(f) as im:
                    return np.asarray(im)
            import tifffile

            return tifffile.imread(f)
        except (OSError, ValueError) as exc:
            raise InputError(f"{f}: cannot read this slice ({exc.__class__.__name__}: {exc})") from exc

    first = load(files[0])
    if first.ndim != 2:
        raise InputError(f"{files[0]} has shape {first.shape}; slices must be 2D greyscale images")

    def read(z0: int, z1: int) -> np.ndarray:
        out = []
        for f in files[z0:z1]:
            img = load(f)
            if img.shape != first.shape:
                raise InputError(f"{f} has shape {img.shape}, unlike {files[0].name} {first.shape}")
            out.append(img)
        return np.stack(out)

    return StackSource(f"{len(files)} slices in {folder}", (len(files), *first.shape), first.dtype, read)


def _hdf5_source(spec: str) -> StackSource:
    filename, _, dataset = spec.partition(":")
    try:
        import h5py
    except ImportError as exc:
        raise InputError("reading HDF5 needs h5py: pip install 'd2r-dask[hdf5]'") from exc
    if not Path(filename).exists():
        raise InputError(f"{filename}: no such file; check the path")
    f = h5py.File(filename, "r")
    with _closed_on_error(f):
        if not dataset or not isinstance(f.get(dataset), h5py.Dataset):
            names: list[str] = []
            f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
            raise InputError(f"name the dataset as {filename}:DATASET; datasets in the file: "
                             f"{', '.join(names) or 'none'}")
        dset = f[dataset]
        shape = _check_3d(_squeezed(dset.shape), spec)
        # z is the first non-singleton axis; singleton extra axes are indexed away
        index = [0 if n == 1 and dset.ndim > 3 else slice(None) for n in dset.shape]
        z_axis = next(i for i, ix in enumerate(index) if ix != 0)

        def read(z0: int, z1: int) -> np.ndarray:
            return dset[tuple(slice(z0, z1) if i == z_axis else ix for i, ix in enumerate(index))]

        return StackSource(f"HDF5 {spec}", shape, dset.dtype, read, close=f.close)


def _npy_source(path: Path) -> StackSource:
    """A .npy file, memory-mapped per read: no mapping stays open between reads."""

    def mapped() -> np.ndarray:
        arr = np.load(path, mmap_mode="r")
        return arr.reshape(_check_3d(_squeezed(arr.shape), str(path)))  # a view: singleton extra axes dropped

    probe = mapped()
    shape, dtype = probe.shape, probe.dtype
    del probe  # unmaps the file (the last reference)

    def read(z0: int, z1: int) -> np.ndarray:
        arr = mapped()
        try:
            return np.array(arr[z0:z1])  # a copy, so the mapping goes with ``arr``
        finally:
            del arr

    return StackSource(f"NumPy {path}", shape, dtype, read)  # type: ignore[arg-type]


def _zarr_source(path: Location, voxel_size: Sequence[float] | None) -> StackSource:
    vol = open_volume(path, voxel_size=voxel_size)
    data = vol.data
    return StackSource(
        f"Zarr {path}",
        tuple(vol.shape),  # type: ignore[arg-type]
        data.dtype,
        lambda z0, z1: data[z0:z1].compute(),
        voxel_size=vol.attrs["voxel_size"],
        translation=vol.attrs["translation"],
    )


def open_source(spec: str | os.PathLike, *, voxel_size: Sequence[float] | None = None) -> StackSource:
    """Pick the reader for ``spec`` by what it is on disk."""
    try:
        return _open_source(str(spec), voxel_size)
    except D2RError:
        raise
    except (OSError, ValueError) as exc:  # how tifffile, h5py, numpy and PIL refuse a file
        raise InputError(
            f"{spec}: cannot read it ({exc.__class__.__name__}: {exc}); check that the file is "
            "intact and of the kind its name says"
        ) from exc


def _open_source(text: str, voxel_size: Sequence[float] | None) -> StackSource:
    if stores.is_remote(text):  # on an object store: a Zarr volume
        return _zarr_source(stores.location(text), voxel_size)
    if ".h5:" in text or ".hdf5:" in text or text.endswith((".h5", ".hdf5")):
        return _hdf5_source(text)
    path = Path(text)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory; check the path")
    suffix = path.suffix.lower()
    if path.is_dir() and any((path / m).exists() for m in ("zarr.json", ".zarray", ".zgroup")):
        return _zarr_source(path, voxel_size)
    if path.is_dir():
        return _slices_source(path)
    if suffix in (".tif", ".tiff"):
        return _tiff_source(path)
    if suffix == ".npy":
        return _npy_source(path)
    raise InputError(
        f"{path}: unsupported input; give a TIFF stack, a folder of PNG/TIFF slices, "
        "file.h5:dataset, a .npy file or a Zarr volume"
    )


def convert(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    voxel_size: Sequence[float] | None = None,
    translation: Sequence[float] = (0.0, 0.0, 0.0),
    chunks: Sequence[int] | None = None,
    levels: int = 1,
    overwrite: bool = False,
    compression: str = "zstd",
    progress: bool = False,
) -> Location:
    """Convert a stack to an OME-Zarr image, reading ``chunks[0]`` slices at a time.

    ``output`` (and a Zarr ``source``) may be on an object store (``s3://``, ``gs://``).

    ``voxel_size`` (nm, z y x) is required unless the source carries one (Zarr).
    Float64 input is stored as float32; NaN/inf input is refused.
    """
    input_path = str(source).split(":")[0] if ".h5:" in str(source) or ".hdf5:" in str(source) else str(source)
    check_output_path(output, [input_path])  # before opening anything
    with open_source(source, voxel_size=voxel_size) as src:
        if voxel_size is None and src.voxel_size is None:
            raise InputError("give the voxel size in nm: --voxel-size Z Y X (e.g. --voxel-size 40 4 4)")
        dtype = check_dtype(src.dtype, src.description)
        geometry = Geometry(
            tuple(voxel_size or src.voxel_size),  # type: ignore[arg-type]
            tuple(src.translation if src.translation and translation == (0.0, 0.0, 0.0) else translation),  # type: ignore[arg-type]
        )
        chunks = tuple(chunks or default_chunks(src.shape, dtype))
        arr = create_volume(
            output,
            shape=src.shape,
            dtype=dtype,
            geometry=geometry,
            chunks=chunks,
            overwrite=overwrite,
            inputs=[input_path],
            compression=compression,
            name=Path(stores.name(str(source))).stem,
            metadata={"converted_from": src.description},
        )
        step = chunks[0]
        for z0 in tqdm(range(0, src.shape[0], step), desc="convert", unit="slab", disable=not progress):
            slab = np.asarray(src.read(z0, min(z0 + step, src.shape[0])))
            check_finite(slab, f"{src.description} slices {z0}..")
            arr[z0 : z0 + slab.shape[0]] = slab.astype(dtype, copy=False)
    finalize_volume(output, levels=levels)
    log.info("converted %s -> %s", src.description, output)
    return stores.location(output)
