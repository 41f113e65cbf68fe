"""Conversion of stacks to OME-Zarr: every source kind, bounded memory, the real data, the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import zarr
from conftest import assert_cli_ok, random_volume

import d2r_dask.io.convert as convert_mod
from d2r_dask.io.convert import convert, open_source
from d2r_dask.io.geometry import Geometry
from d2r_dask.io.volume import is_complete, open_volume, write_volume


def _check(out: Path, data: np.ndarray, voxel_size: tuple, translation: tuple = (0.0, 0.0, 0.0)) -> None:
    assert is_complete(out)
    vol = open_volume(out)
    assert vol.dtype == data.dtype
    np.testing.assert_array_equal(vol.values, data)
    assert vol.attrs["voxel_size"] == tuple(float(v) for v in voxel_size)
    assert vol.attrs["translation"] == tuple(float(v) for v in translation)


# --- one fixture per source kind: (spec, expected array) -------------------------------------


def _tiff(tmp_path: Path) -> tuple[str, np.ndarray]:
    data = random_volume((13, 20, 24), "uint16", seed=1)
    tifffile.imwrite(tmp_path / "stack.tif", data)
    return str(tmp_path / "stack.tif"), data


def _png_slices(tmp_path: Path) -> tuple[str, np.ndarray]:
    from PIL import Image

    data = random_volume((12, 9, 11), "uint8", seed=2)
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, img in enumerate(data):  # slice_0 .. slice_11, unpadded: 2 must come before 10
        Image.fromarray(img).save(folder / f"slice_{i}.png")
    (folder / "notes.txt").write_text("ignored")
    return str(folder), data


def _tiff_slices(tmp_path: Path) -> tuple[str, np.ndarray]:
    data = random_volume((11, 8, 10), "uint16", seed=3)
    folder = tmp_path / "tifs"
    folder.mkdir()
    for i, img in enumerate(data):
        tifffile.imwrite(folder / f"z{i}.TIF", img)
    return str(folder), data


def _hdf5(tmp_path: Path) -> tuple[str, np.ndarray]:
    import h5py

    data = random_volume((10, 7, 9), "float32", seed=4)
    with h5py.File(tmp_path / "vol.h5", "w") as f:
        f.create_dataset("volumes/raw", data=data, chunks=(2, 7, 9))
        f.create_dataset("volumes/labels", data=np.zeros((2, 2, 2), np.uint64))
    return f"{tmp_path / 'vol.h5'}:volumes/raw", data


def _npy(tmp_path: Path) -> tuple[str, np.ndarray]:
    data = random_volume((9, 8, 6), "uint8", seed=5)
    np.save(tmp_path / "vol.npy", data)
    return str(tmp_path / "vol.npy"), data


def _zarr(tmp_path: Path) -> tuple[str, np.ndarray]:
    data = random_volume((10, 12, 8), "uint16", seed=6)
    write_volume(tmp_path / "src.zarr", data, Geometry((7.0, 3.0, 3.0)), chunks=(3, 5, 8))
    return str(tmp_path / "src.zarr"), data


SOURCES = {"tiff": _tiff, "png_slices": _png_slices, "tiff_slices": _tiff_slices, "hdf5": _hdf5, "npy": _npy, "zarr": _zarr}


@pytest.mark.parametrize("kind", SOURCES)
def test_convert_each_source(tmp_path: Path, kind: str) -> None:
    spec, data = SOURCES[kind](tmp_path)
    src = open_source(spec)
    assert src.shape == data.shape and src.dtype == data.dtype
    out = convert(spec, tmp_path / "out.zarr", voxel_size=(40, 4, 4), translation=(80, 0, 4), chunks=(4, 8, 8))
    _check(out, data, (40, 4, 4), (80, 0, 4))
    assert zarr.open_array(str(out / "0"), mode="r").chunks == (4, 8, 8)


def test_natural_sort(tmp_path: Path) -> None:
    spec, data = _png_slices(tmp_path)
    names = [f"slice_{i}.png" for i in range(12)]
    assert sorted(names) != names  # plain sorting would put slice_10 before slice_2
    src = open_source(spec)
    np.testing.assert_array_equal(src.read(2, 3)[0], data[2])
    np.testing.assert_array_equal(src.read(10, 12), data[10:12])


def test_uint16_png_slices(tmp_path: Path) -> None:
    from PIL import Image

    data = random_volume((3, 5, 6), "uint16", seed=7)
    folder = tmp_path / "p16"
    folder.mkdir()
    for i, img in enumerate(data):
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    _check(convert(folder, tmp_path / "o.zarr", voxel_size=(1, 1, 1)), data, (1, 1, 1))


def test_zarr_to_zarr_keeps_geometry(tmp_path: Path) -> None:
    data = random_volume((10, 12, 8), "uint8", seed=8)
    write_volume(tmp_path / "src.zarr", data, Geometry((40.0, 4.0, 4.0), (80.0, 8.0, 0.0)), chunks=(3, 5, 8))
    out = convert(tmp_path / "src.zarr", tmp_path / "a.zarr", chunks=(5, 12, 8))
    _check(out, data, (40, 4, 4), (80, 8, 0))
    # an explicit voxel size and translation win
    out = convert(tmp_path / "src.zarr", tmp_path / "b.zarr", voxel_size=(30, 3, 3), translation=(1, 2, 3))
    _check(out, data, (30, 3, 3), (1, 2, 3))


def test_npy_float64_becomes_float32(tmp_path: Path) -> None:
    data = np.linspace(-1, 1, 4 * 5 * 6).reshape(4, 5, 6)
    np.save(tmp_path / "f.npy", data)
    vol = open_volume(convert(tmp_path / "f.npy", tmp_path / "f.zarr", voxel_size=(2, 1, 1)))
    assert vol.dtype == np.float32
    np.testing.assert_allclose(vol.values, data, rtol=1e-6)


@pytest.mark.parametrize("kind", ["npy", "hdf5"])
def test_singleton_extra_axis_is_dropped(tmp_path: Path, kind: str) -> None:
    data = random_volume((1, 6, 5, 7, 1), "uint8", seed=9)
    if kind == "npy":
        np.save(tmp_path / "v.npy", data)
        spec = str(tmp_path / "v.npy")
    else:
        import h5py

        with h5py.File(tmp_path / "v.h5", "w") as f:
            f["raw"] = data
        spec = f"{tmp_path / 'v.h5'}:raw"
    out = convert(spec, tmp_path / "o.zarr", voxel_size=(1, 1, 1), chunks=(4, 5, 7))
    _check(out, data[0, ..., 0], (1, 1, 1))


@pytest.mark.filterwarnings("ignore:<tifffile.TiffWriter.write> data with shape:DeprecationWarning")
def test_tiff_singleton_axes(tmp_path: Path) -> None:
    data = random_volume((5, 1, 6, 7), "uint8", seed=10)
    tifffile.imwrite(tmp_path / "zcyx.tif", data, metadata={"axes": "ZCYX"})
    _check(convert(tmp_path / "zcyx.tif", tmp_path / "o.zarr", voxel_size=(1, 1, 1), chunks=(2, 6, 7)), data[:, 0], (1, 1, 1))
    # tifffile stores a 3- or 4-slice stack as one planar page ("SYX"): still z-slices to us
    few = random_volume((3, 6, 7), "uint8", seed=12)
    tifffile.imwrite(tmp_path / "few.tif", few)
    _check(convert(tmp_path / "few.tif", tmp_path / "few.zarr", voxel_size=(1, 1, 1)), few, (1, 1, 1))
    one = random_volume((6, 7), "uint8", seed=11)
    tifffile.imwrite(tmp_path / "one.tif", one)
    _check(convert(tmp_path / "one.tif", tmp_path / "one.zarr", voxel_size=(1, 1, 1)), one[None], (1, 1, 1))


# --- bounded memory ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", SOURCES)
def test_reads_at_most_chunk_z_slices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    spec, data = SOURCES[kind](tmp_path)
    calls: list[tuple[int, int]] = []
    real_open = convert_mod.open_source

    def spying_open(*args: Any, **kwargs: Any):
        src = real_open(*args, **kwargs)
        read = src.read

        def spy(z0: int, z1: int) -> np.ndarray:
            calls.append((z0, z1))
            out = read(z0, z1)
            assert out.shape[0] == z1 - z0
            return out

        src.read = spy
        return src

    monkeypatch.setattr(convert_mod, "open_source", spying_open)
    if kind == "tiff":  # and the TIFF reader never loads the whole series behind our back

        def whole(*a: Any, **k: Any) -> None:
            raise AssertionError("read the whole TIFF series")

        monkeypatch.setattr(tifffile.TiffPageSeries, "asarray", whole)
        monkeypatch.setattr(tifffile.TiffFile, "asarray", whole)
    out = convert(spec, tmp_path / "out.zarr", voxel_size=(1, 1, 1), chunks=(3, 16, 16))
    assert calls, "the source was never read"
    assert max(z1 - z0 for z0, z1 in calls) <= 3
    covered = np.zeros(data.shape[0], int)
    for z0, z1 in calls:
        covered[z0:z1] += 1
    assert (covered == 1).all()  # every slice read exactly once
    np.testing.assert_array_equal(open_volume(out).values, data)


# --- real data -----------------------------------------------------------------------------------


@pytest.mark.realdata
def test_convert_real_fib25(tmp_path: Path, shared_data) -> None:
    tif = shared_data("fib25_sample1_10nm.tif")
    out = convert(tif, tmp_path / "fib25.zarr", voxel_size=(10, 10, 10), chunks=(64, 100, 128))
    expected = tifffile.imread(tif)
    assert expected.shape == (250, 250, 250) and expected.dtype == np.uint8
    vol = open_volume(out)
    assert vol.data.chunks[0] == (64, 64, 64, 58)
    assert vol.data.chunks[1] == (100, 100, 50)
    np.testing.assert_array_equal(vol.values, expected)
    assert vol.attrs["voxel_size"] == (10.0, 10.0, 10.0)


@pytest.mark.realdata
@pytest.mark.slow
def test_cli_real_data(tmp_path: Path, shared_data, cli_run) -> None:
    tif = shared_data("fib25_sample1_10nm.tif")
    gt, lr = tmp_path / "gt.zarr", tmp_path / "lr.zarr"
    r = cli_run("convert", tif, gt, "--voxel-size", 10, 10, 10, "--chunks", 64, 128, 128, "--levels", 2)
    assert_cli_ok(r)
    assert f"wrote {gt}" in r.output

    r = cli_run("info", gt)
    assert_cli_ok(r)
    assert "(250, 250, 250)" in r.output and "uint8" in r.output
    assert "10 x 10 x 10 nm" in r.output and "levels          2" in r.output
    r = cli_run("info", gt, "--json")
    assert_cli_ok(r)
    d = json.loads(r.output)
    assert d["shape"] == [250, 250, 250] and d["levels"] == [[250, 250, 250], [125, 125, 125]]
    assert d["ngff_version"] == "0.5" and d["voxel_size_nm"] == [10.0, 10.0, 10.0]

    r = cli_run("degrade", gt, lr, "--factor", 4, "--levels", 1)
    assert_cli_ok(r)
    assert "(63, 250, 250)" in r.output and "40 x 10 x 10 nm" in r.output
    expected = tifffile.imread(tif)
    vol = open_volume(lr)
    np.testing.assert_array_equal(vol.values, expected[::4])
    assert vol.attrs["voxel_size"] == (40.0, 10.0, 10.0) and vol.attrs["translation"] == (0.0, 0.0, 0.0)

    r = cli_run("degrade", gt, tmp_path / "lr_mean.zarr", "-s", 8, "--mode", "mean", "--levels", 1)
    assert_cli_ok(r)
    vol = open_volume(tmp_path / "lr_mean.zarr")
    ref = np.rint(expected[:248].reshape(31, 8, 250, 250).astype(np.float64).mean(axis=1))
    assert vol.shape == (31, 250, 250)
    assert np.abs(vol.values.astype(int) - ref).max() == 0
    assert vol.attrs["voxel_size"] == (80.0, 10.0, 10.0) and vol.attrs["translation"] == (35.0, 0.0, 0.0)
    meta = zarr.open_group(str(tmp_path / "lr_mean.zarr"), mode="r").attrs["d2r"]
    assert meta["degradation"]["mode"] == "mean" and meta["degradation"]["factor"] == 8
