"""Volumes: OME-Zarr 0.5 / 0.4 and plain Zarr, geometry, pyramids, crash safety, describe."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import random_volume

from d2r_dask.errors import IncompleteVolumeError, InputError, OutputExistsError
from d2r_dask.io.volume import (
    Geometry,
    check_dtype,
    create_volume,
    describe,
    finalize_volume,
    is_complete,
    open_volume,
    output_array,
    prepare_output,
    pyramid_factors,
    write_volume,
)


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
def test_round_trip(tmp_path: Path, dtype: str) -> None:
    data = random_volume((9, 14, 11), dtype, seed=3)
    geom = Geometry((30.0, 4.0, 5.0), (120.0, -8.0, 2.5))
    path = write_volume(tmp_path / "v.zarr", data, geom, chunks=(4, 8, 8))
    assert is_complete(path)
    vol = open_volume(path)
    assert vol.dims == ("z", "y", "x")
    assert vol.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(vol.values, data)
    assert vol.attrs["voxel_size"] == (30.0, 4.0, 5.0)
    assert vol.attrs["translation"] == (120.0, -8.0, 2.5)
    assert vol.attrs["ngff_version"] == "0.5"
    assert vol.attrs["units"] == "nm"
    np.testing.assert_allclose(vol.z.values, 120.0 + 30.0 * np.arange(9))
    np.testing.assert_allclose(vol.y.values, -8.0 + 4.0 * np.arange(14))
    np.testing.assert_allclose(vol.x.values, 2.5 + 5.0 * np.arange(11))
    assert Geometry.of(vol) == geom
    assert zarr.open_array(str(path / "0"), mode="r").chunks == (4, 8, 8)
    assert vol.data.chunks[0] == (4, 4, 1)  # lazy, chunked like the store


def test_write_volume_float64_stored_as_float32(tmp_path: Path) -> None:
    data = np.linspace(0, 1, 4 * 5 * 6).reshape(4, 5, 6)
    vol = open_volume(write_volume(tmp_path / "v.zarr", data, Geometry()))
    assert vol.dtype == np.float32
    np.testing.assert_allclose(vol.values, data, rtol=1e-6)


def test_check_dtype() -> None:
    assert check_dtype("float64") == np.float32
    for ok in ("uint8", "uint16", "float32"):
        assert check_dtype(ok) == np.dtype(ok)
    for bad in ("int64", "int16", "complex64", "bool", "uint32"):
        with pytest.raises(InputError, match="uint8, uint16 or float32"):
            check_dtype(bad)


def test_geometry_validation() -> None:
    with pytest.raises(InputError, match="positive"):
        Geometry((0.0, 1.0, 1.0))
    with pytest.raises(InputError, match="positive"):
        Geometry((float("nan"), 1.0, 1.0))
    with pytest.raises(InputError, match="three values"):
        Geometry((1.0, 1.0))


# --- pyramids ---------------------------------------------------------------------------


def _mean_down(a: np.ndarray, f: tuple[int, int, int]) -> np.ndarray:
    n = [s // k for s, k in zip(a.shape, f)]
    a = a[: n[0] * f[0], : n[1] * f[1], : n[2] * f[2]].astype(np.float64)
    m = a.reshape(n[0], f[0], n[1], f[1], n[2], f[2]).mean(axis=(1, 3, 5))
    return np.clip(np.rint(m), 0, 255).astype(np.uint8)


def test_pyramid_factors() -> None:
    assert pyramid_factors((10.0, 10.0, 10.0)) == (2, 2, 2)
    assert pyramid_factors((40.0, 5.0, 5.0)) == (1, 2, 2)
    assert pyramid_factors((40.0, 20.0, 20.0)) == (1, 2, 2)
    assert pyramid_factors((40.0, 40.0, 40.0)) == (2, 2, 2)
    assert pyramid_factors((8.0, 4.0, 4.0)) == (1, 2, 2)
    assert pyramid_factors((30.0, 20.0, 20.0)) == (2, 2, 2)  # no axis can halve alone


def _centres(vol) -> list[np.ndarray]:
    return [vol[d].values for d in ("z", "y", "x")]


def test_pyramid_isotropic(tmp_path: Path) -> None:
    data = random_volume((21, 18, 17), "uint8", seed=1)
    geom = Geometry((10.0, 10.0, 10.0), (100.0, 50.0, 0.0))
    arr = create_volume(tmp_path / "p.zarr", shape=data.shape, dtype="uint8", geometry=geom, chunks=(5, 8, 8))
    arr[:] = data
    finalize_volume(tmp_path / "p.zarr", levels=3, min_size=4)
    l0, l1, l2 = (open_volume(tmp_path / "p.zarr", level=i) for i in range(3))
    with pytest.raises(InputError, match="level 3 does not exist"):
        open_volume(tmp_path / "p.zarr", level=3)
    assert l1.shape == (10, 9, 8) and l2.shape == (5, 4, 4)
    assert l1.attrs["voxel_size"] == (20.0, 20.0, 20.0) and l2.attrs["voxel_size"] == (40.0, 40.0, 40.0)
    np.testing.assert_array_equal(l1.values, _mean_down(data, (2, 2, 2)))
    np.testing.assert_array_equal(l2.values, _mean_down(l1.values, (2, 2, 2)))
    # a coarse voxel's centre is the mean of the centres of the fine voxels it covers
    for fine, coarse in ((l0, l1), (l1, l2)):
        for cf, cc in zip(_centres(fine), _centres(coarse)):
            np.testing.assert_allclose(cc, cf[: 2 * len(cc)].reshape(-1, 2).mean(axis=1))
    assert describe(tmp_path / "p.zarr")["levels"] == [(21, 18, 17), (10, 9, 8), (5, 4, 4)]


def test_pyramid_anisotropic_coarsens_xy_first(tmp_path: Path) -> None:
    data = random_volume((9, 40, 36), "uint8", seed=2)
    path = tmp_path / "a.zarr"
    arr = create_volume(path, shape=data.shape, dtype="uint8", geometry=Geometry((40.0, 5.0, 5.0), (0.0, 0.0, 0.0)))
    arr[:] = data
    finalize_volume(path, levels=4, min_size=4)
    l1, l2, l3 = (open_volume(path, level=i) for i in (1, 2, 3))
    assert l1.shape == (9, 20, 18) and l1.attrs["voxel_size"] == (40.0, 10.0, 10.0)
    assert l1.attrs["translation"] == (0.0, 2.5, 2.5)  # z untouched
    assert l2.shape == (9, 10, 9) and l2.attrs["voxel_size"] == (40.0, 20.0, 20.0)
    assert l3.shape == (9, 5, 4) and l3.attrs["voxel_size"] == (40.0, 40.0, 40.0)
    assert l3.attrs["translation"] == (0.0, 17.5, 17.5)
    np.testing.assert_array_equal(l1.values, _mean_down(data, (1, 2, 2)))


def test_pyramid_stops_at_min_size(tmp_path: Path) -> None:
    path = write_volume(tmp_path / "s.zarr", random_volume((40, 40, 40)), Geometry(), levels=5)
    assert describe(path)["levels"] == [(40, 40, 40)]  # a 20-voxel level is under min_size 32


# --- NGFF validity ------------------------------------------------------------------------


def test_ngff_05_validates(tmp_path: Path) -> None:
    from ome_zarr_models.v05.image import Image

    path = tmp_path / "v.zarr"
    arr = create_volume(path, shape=(8, 64, 64), dtype="uint16", geometry=Geometry((40.0, 4.0, 4.0), (80.0, 0.0, 0.0)))
    arr[:] = 7
    finalize_volume(path, levels=2)
    image = Image.from_zarr(zarr.open_group(str(path), mode="r"))
    ms = image.attributes.ome.multiscales[0]
    assert [a.name for a in ms.axes] == ["z", "y", "x"]
    assert [a.unit for a in ms.axes] == ["nanometer"] * 3
    assert [d.path for d in ms.datasets] == ["0", "1"]
    assert list(ms.datasets[1].coordinateTransformations[0].scale) == [40.0, 8.0, 8.0]


def _write_ngff04(path: Path, data: np.ndarray, scales: list, translations: list, unit: str = "micrometer") -> None:
    """An NGFF 0.4 image on Zarr v2, as other tools (ome-zarr-py, bioformats2raw) write it."""
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    datasets = []
    for i, (sc, tr) in enumerate(zip(scales, translations)):
        level = data[:: round(sc[0] / scales[0][0]), :: round(sc[1] / scales[0][1]), :: round(sc[2] / scales[0][2])]
        group.create_array(str(i), shape=level.shape, dtype=data.dtype, chunks=(4, 16, 16))[:] = level
        datasets.append(
            {
                "path": str(i),
                "coordinateTransformations": [
                    {"type": "scale", "scale": sc},
                    {"type": "translation", "translation": tr},
                ],
            }
        )
    group.attrs["multiscales"] = [
        {
            "version": "0.4",
            "name": "em",
            "axes": [{"name": a, "type": "space", "unit": unit} for a in "zyx"],
            "datasets": datasets,
        }
    ]


def test_ngff_04_zarr_v2_reads(tmp_path: Path) -> None:
    from ome_zarr_models.v04.image import Image

    data = random_volume((6, 20, 24), "uint8", seed=4)
    path = tmp_path / "v04.zarr"
    _write_ngff04(
        path, data, [[0.04, 0.005, 0.005], [0.04, 0.01, 0.01]], [[1.0, 0.5, 0.0], [1.0, 0.5025, 0.0025]]
    )
    Image.from_zarr(zarr.open_group(str(path), mode="r"))  # a maintained validator accepts it
    vol = open_volume(path)
    assert vol.attrs["ngff_version"] == "0.4"
    np.testing.assert_array_equal(vol.values, data)
    np.testing.assert_allclose(vol.attrs["voxel_size"], (40.0, 5.0, 5.0))
    np.testing.assert_allclose(vol.attrs["translation"], (1000.0, 500.0, 0.0))
    np.testing.assert_allclose(vol.z.values, 1000.0 + 40.0 * np.arange(6))
    l1 = open_volume(path, level=1)
    assert l1.shape == (6, 10, 12)
    np.testing.assert_allclose(l1.attrs["voxel_size"], (40.0, 10.0, 10.0))
    np.testing.assert_allclose(l1.attrs["translation"], (1000.0, 502.5, 2.5))
    assert is_complete(path)
    d = describe(path)
    assert d["ngff_version"] == "0.4" and d["levels"] == [(6, 20, 24), (6, 10, 12)]


def test_ngff_multiscale_level_transform_composes(tmp_path: Path) -> None:
    data = random_volume((4, 6, 8), "uint8")
    path = tmp_path / "c.zarr"
    _write_ngff04(path, data, [[2.0, 1.0, 1.0]], [[1.0, 0.0, 0.0]], unit="nanometer")
    group = zarr.open_group(str(path), mode="r+")
    ms = group.attrs["multiscales"]
    ms[0]["coordinateTransformations"] = [{"type": "scale", "scale": [10.0, 4.0, 4.0]}]
    group.attrs["multiscales"] = ms
    vol = open_volume(path)
    # x_phys = (i * 2 + 1) * 10 along z: scale 20, origin 10
    assert vol.attrs["voxel_size"] == (20.0, 4.0, 4.0)
    assert vol.attrs["translation"] == (10.0, 0.0, 0.0)


def test_unsupported_unit(tmp_path: Path) -> None:
    path = tmp_path / "u.zarr"
    _write_ngff04(path, random_volume((4, 6, 8)), [[1.0, 1.0, 1.0]], [[0.0, 0.0, 0.0]], unit="parsec")
    with pytest.raises(InputError, match="unit 'parsec'"):
        open_volume(path)


# --- other layouts --------------------------------------------------------------------------


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_plain_array(tmp_path: Path, caplog: pytest.LogCaptureFixture, zarr_format: int) -> None:
    data = random_volume((5, 7, 9), "uint16")
    path = tmp_path / "plain.zarr"
    zarr.create_array(str(path), shape=data.shape, dtype=data.dtype, chunks=(2, 7, 9), zarr_format=zarr_format)[:] = data
    with caplog.at_level(logging.WARNING, logger="d2r_dask"):
        vol = open_volume(path)
    assert "no voxel size" in caplog.text
    np.testing.assert_array_equal(vol.values, data)
    assert vol.attrs["voxel_size"] == (1.0, 1.0, 1.0) and vol.attrs["ngff_version"] is None
    vol = open_volume(path, voxel_size=(40, 4, 4))
    assert vol.attrs["voxel_size"] == (40.0, 4.0, 4.0)
    np.testing.assert_allclose(vol.z.values, 40.0 * np.arange(5))
    assert is_complete(path)
    assert describe(path)["levels"] == []


def test_plain_array_singleton_leading_axis(tmp_path: Path) -> None:
    data = random_volume((1, 5, 7, 9))
    path = tmp_path / "p4.zarr"
    zarr.create_array(str(path), shape=data.shape, dtype=data.dtype, chunks=(1, 5, 7, 9))[:] = data
    np.testing.assert_array_equal(open_volume(path, voxel_size=(1, 1, 1)).values, data[0])


def test_array_inside_ome_image_keeps_geometry(tmp_path: Path) -> None:
    path = tmp_path / "img.zarr"
    arr = create_volume(path, shape=(8, 64, 64), dtype="uint8", geometry=Geometry((40.0, 4.0, 4.0), (80.0, 0.0, 0.0)))
    # the full-resolution array of an unfinished image is refused too
    with pytest.raises(IncompleteVolumeError):
        open_volume(path / "0")
    assert not is_complete(path / "0")
    arr[:] = 3
    finalize_volume(path, levels=2)
    l1 = open_volume(path / "1")
    assert l1.shape == (8, 32, 32)
    assert l1.attrs["voxel_size"] == (40.0, 8.0, 8.0)
    assert l1.attrs["translation"] == (80.0, 2.0, 2.0)
    assert open_volume(path / "0", voxel_size=(10, 1, 1)).attrs["voxel_size"] == (10.0, 1.0, 1.0)


def _write_5d(path: Path, data: np.ndarray) -> None:
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    group.create_array("0", shape=data.shape, dtype=data.dtype, chunks=(1, 1, 4, 8, 8),
                       dimension_names=("t", "c", "z", "y", "x"))[:] = data
    group.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [
            {
                "axes": [
                    {"name": "t", "type": "time", "unit": "second"},
                    {"name": "c", "type": "channel"},
                    *({"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"),
                ],
                "datasets": [
                    {"path": "0", "coordinateTransformations": [
                        {"type": "scale", "scale": [1.0, 1.0, 0.03, 0.006, 0.006]},
                        {"type": "translation", "translation": [5.0, 0.0, 0.3, 0.0, 0.0]},
                    ]}
                ],
            }
        ],
    }


def test_5d_singleton_opens_as_3d(tmp_path: Path) -> None:
    from ome_zarr_models.v05.image import Image

    data = random_volume((1, 1, 6, 10, 12), "uint8")
    path = tmp_path / "t.zarr"
    _write_5d(path, data)
    Image.from_zarr(zarr.open_group(str(path), mode="r"))
    vol = open_volume(path)
    assert vol.dims == ("z", "y", "x") and vol.shape == (6, 10, 12)
    np.testing.assert_array_equal(vol.values, data[0, 0])
    np.testing.assert_allclose(vol.attrs["voxel_size"], (30.0, 6.0, 6.0))
    np.testing.assert_allclose(vol.attrs["translation"], (300.0, 0.0, 0.0))


def test_5d_two_channels_refused(tmp_path: Path) -> None:
    path = tmp_path / "c2.zarr"
    _write_5d(path, random_volume((1, 2, 6, 10, 12), "uint8"))
    with pytest.raises(InputError, match="axis 'c' has size 2.*one 3D channel"):
        open_volume(path)


# --- crash safety and output rules ----------------------------------------------------------


def test_incomplete_store_refused(tmp_path: Path) -> None:
    path = tmp_path / "partial.zarr"
    arr = create_volume(path, shape=(4, 8, 8), dtype="uint8", geometry=Geometry())
    arr[:2] = 5
    assert not is_complete(path)
    with pytest.raises(IncompleteVolumeError, match="incomplete"):
        open_volume(path)
    with pytest.raises(IncompleteVolumeError):
        describe(path)
    # a writer (resuming) can still reach the array
    output_array(path)[2:] = 6
    finalize_volume(path)
    assert is_complete(path)
    assert open_volume(path).values.sum() == 5 * 128 + 6 * 128


def test_is_complete_missing(tmp_path: Path) -> None:
    assert not is_complete(tmp_path / "nothing.zarr")
    (tmp_path / "empty").mkdir()
    assert not is_complete(tmp_path / "empty")


def test_existing_output(tmp_path: Path) -> None:
    path = tmp_path / "v.zarr"
    write_volume(path, np.ones((2, 3, 4), np.uint8), Geometry())
    with pytest.raises(OutputExistsError, match="--overwrite"):
        write_volume(path, np.zeros((2, 3, 4), np.uint8), Geometry())
    assert open_volume(path).values.min() == 1  # untouched
    write_volume(path, np.zeros((3, 3, 4), np.uint8), Geometry(), overwrite=True)
    assert open_volume(path).shape == (3, 3, 4) and open_volume(path).values.max() == 0


def test_overwrite_refuses_to_delete_non_zarr_folder(tmp_path: Path) -> None:
    folder = tmp_path / "precious"
    folder.mkdir()
    (folder / "thesis.txt").write_text("do not delete")
    with pytest.raises(OutputExistsError, match="not a Zarr store"):
        prepare_output(folder, overwrite=True)
    assert (folder / "thesis.txt").exists()
    notes = tmp_path / "notes.txt"
    notes.write_text("keep")
    with pytest.raises(OutputExistsError, match="not a Zarr store"):
        prepare_output(notes, overwrite=True)
    assert notes.read_text() == "keep"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert prepare_output(empty, overwrite=True) == empty  # an empty folder may go
    assert not empty.exists()


def test_output_inside_or_equal_input(tmp_path: Path, write_random_volume) -> None:
    src, _ = write_random_volume("in.zarr")
    for out in (src, src / "lr.zarr", tmp_path):
        with pytest.raises(InputError, match="would overwrite the input"):
            prepare_output(out, overwrite=True, inputs=[src])
        with pytest.raises(InputError, match="choose another output"):
            write_volume(out, np.ones((2, 2, 2), np.uint8), Geometry(), overwrite=True, inputs=[src])
    assert is_complete(src)
    assert prepare_output(tmp_path / "other.zarr", inputs=[src]) == tmp_path / "other.zarr"


def test_describe(tmp_path: Path) -> None:
    data = random_volume((10, 12, 14), "uint16", seed=5)
    path = write_volume(tmp_path / "d.zarr", data, Geometry((40.0, 5.0, 5.0), (40.0, 0.0, 0.0)), chunks=(4, 6, 14))
    d = describe(path)
    assert d["shape"] == (10, 12, 14) and d["dtype"] == "uint16"
    assert d["chunks"] == (4, 6, 14)
    assert d["voxel_size_nm"] == (40.0, 5.0, 5.0) and d["translation_nm"] == (40.0, 0.0, 0.0)
    assert d["ngff_version"] == "0.5" and d["levels"] == [(10, 12, 14)]
    assert d["uncompressed_bytes"] == 10 * 12 * 14 * 2
    assert d["size_on_disk_bytes"] == sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    s = d["intensity_sample"]
    assert s["slices"] == 10 and s["nonfinite"] == 0
    assert s["min"] == data.min() and s["max"] == data.max()
    assert s["mean"] == pytest.approx(data.mean()) and s["std"] == pytest.approx(data.std())
    assert s["p1"] == pytest.approx(np.percentile(data, 1)) and s["p99"] == pytest.approx(np.percentile(data, 99))
    # sampling reads evenly spaced slices only
    s4 = describe(path, sample_slices=4)["intensity_sample"]
    assert s4["slices"] == 4
    assert s4["mean"] == pytest.approx(data[[0, 3, 6, 9]].mean())


def test_cli_info_text(tmp_path: Path, write_random_volume, cli_run) -> None:
    from conftest import assert_cli_ok

    path, data = write_random_volume(shape=(6, 8, 10), dtype="uint16", voxel_size=(40, 4, 4), translation=(20, 0, 0))
    r = cli_run("info", path)
    assert_cli_ok(r)
    assert "(OME-Zarr 0.5)" in r.output and "(6, 8, 10)  uint16" in r.output
    assert "40 x 4 x 4 nm" in r.output and "20 x 0 x 0 nm" in r.output
    assert f"max {int(data.max())}" in r.output
    plain = tmp_path / "plain.zarr"
    zarr.create_array(str(plain), shape=(2, 3, 4), dtype="uint8")[:] = 1
    r = cli_run("info", plain)
    assert_cli_ok(r)
    assert "(plain Zarr array)" in r.output and "1 x 1 x 1 nm" in r.output
