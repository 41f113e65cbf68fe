"""Bad input through the CLI: one clear message saying the fix, exit status 1, no traceback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from conftest import assert_cli_error, assert_cli_ok, random_volume

from d2r_dask.io.volume import is_complete, open_volume


# --- missing or unusable paths ------------------------------------------------------------------


def test_missing_path(tmp_path: Path, cli_run) -> None:
    missing = tmp_path / "nope.zarr"
    assert_cli_error(cli_run("info", missing), "no such file or directory", "check the path")
    assert_cli_error(cli_run("degrade", missing, tmp_path / "o.zarr", "-s", 4), "no such file")
    assert_cli_error(cli_run("convert", tmp_path / "nope.tif", tmp_path / "o.zarr", "--voxel-size", 1, 1, 1),
                     "no such file")
    assert_cli_error(cli_run("convert", f"{tmp_path / 'nope.h5'}:raw", tmp_path / "o.zarr", "--voxel-size", 1, 1, 1),
                     "nope.h5: no such file")
    assert not (tmp_path / "o.zarr").exists()


def test_empty_dir_is_not_a_volume(tmp_path: Path, cli_run) -> None:
    (tmp_path / "empty").mkdir()
    assert_cli_error(cli_run("info", tmp_path / "empty"), "is not a Zarr array or OME-Zarr image", "d2r convert")
    assert_cli_error(cli_run("degrade", tmp_path / "empty", tmp_path / "o.zarr", "-s", 2), "not a Zarr")
    # as a conversion source, an empty folder has no slices
    assert_cli_error(cli_run("convert", tmp_path / "empty", tmp_path / "o.zarr", "--voxel-size", 1, 1, 1),
                     "holds no .tif/.tiff/.png slices")


def test_group_without_multiscales(tmp_path: Path, cli_run) -> None:
    path = tmp_path / "g.zarr"
    group = zarr.open_group(str(path), mode="w")
    group.create_array("raw", shape=(2, 3, 4), dtype="uint8")
    r = cli_run("info", path)
    assert_cli_error(r, "without OME-Zarr 'multiscales' metadata", f"{path}/0")
    assert "{path}" not in r.output  # the example path is filled in


def test_text_file_is_not_a_volume(tmp_path: Path, cli_run) -> None:
    txt = tmp_path / "notes.txt"
    txt.write_text("not a volume")
    assert_cli_error(cli_run("info", txt), "is not a Zarr array")
    assert_cli_error(cli_run("convert", txt, tmp_path / "o.zarr", "--voxel-size", 1, 1, 1),
                     "unsupported input", "TIFF stack")
    # files that are not what their names say
    for name in ("bad.tif", "bad.npy", "bad.h5"):
        (tmp_path / name).write_text("not an image")
        spec = f"{tmp_path / name}:raw" if name.endswith(".h5") else tmp_path / name
        assert_cli_error(cli_run("convert", spec, tmp_path / "o.zarr", "--voxel-size", 1, 1, 1),
                         f"{name}", "cannot read it", "check that the file is intact")
    (tmp_path / "s").mkdir()
    tifffile.imwrite(tmp_path / "s" / "0.tif", np.zeros((4, 5), np.uint8))
    (tmp_path / "s" / "1.png").write_text("not a png")
    assert_cli_error(cli_run("convert", tmp_path / "s", tmp_path / "o.zarr", "--voxel-size", 1, 1, 1),
                     "1.png: cannot read this slice")
    assert not is_complete(tmp_path / "o.zarr")


# --- wrong dimensionality -------------------------------------------------------------------------


@pytest.mark.parametrize("shape, ndim", [((5, 6), "2D"), ((2, 3, 4, 5), "4D"), ((3, 1, 4, 5, 2), "4D")])
def test_npy_wrong_dimensionality(tmp_path: Path, cli_run, shape: tuple, ndim: str) -> None:
    np.save(tmp_path / "a.npy", np.zeros(shape, np.uint8))
    r = cli_run("convert", tmp_path / "a.npy", tmp_path / "o.zarr", "--voxel-size", 1, 1, 1)
    assert_cli_error(r, f"({ndim})", "needs one 3D (z, y, x) stack")
    assert not (tmp_path / "o.zarr").exists()


@pytest.mark.parametrize("shape", [(5, 6), (2, 3, 4, 5)])
def test_plain_zarr_wrong_dimensionality(tmp_path: Path, cli_run, shape: tuple) -> None:
    path = tmp_path / "a.zarr"
    zarr.create_array(str(path), shape=shape, dtype="uint8")
    r = cli_run("info", path)
    if len(shape) == 2:
        assert_cli_error(r, "2 dimension(s)", "3D (z, y, x)")
    else:
        assert_cli_error(r, "axis 'dim_0' has size 2", "one 3D channel")


def test_hdf5_and_tiff_wrong_dimensionality(tmp_path: Path, cli_run) -> None:
    import h5py

    with h5py.File(tmp_path / "f.h5", "w") as f:
        f["img"] = np.zeros((6, 7), np.uint8)
    assert_cli_error(cli_run("convert", f"{tmp_path / 'f.h5'}:img", tmp_path / "o.zarr", "--voxel-size", 1, 1, 1),
                     "(2D)", "3D")
    tifffile.imwrite(tmp_path / "czyx.tif", np.zeros((2, 3, 4, 5), np.uint8), metadata={"axes": "CZYX"},
                     photometric="minisblack")
    assert_cli_error(cli_run("convert", tmp_path / "czyx.tif", tmp_path / "o.zarr", "--voxel-size", 1, 1, 1),
                     "(4D)")
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((6, 7, 3), np.uint8), photometric="rgb")
    assert_cli_error(cli_run("convert", tmp_path / "rgb.tif", tmp_path / "o.zarr", "--voxel-size", 1, 1, 1),
                     "colour (RGB)", "greyscale")
    assert not (tmp_path / "o.zarr").exists()


def test_rgb_slices_refused(tmp_path: Path, cli_run) -> None:
    from PIL import Image

    (tmp_path / "s").mkdir()
    Image.fromarray(np.zeros((6, 7, 3), np.uint8)).save(tmp_path / "s" / "0.png")
    assert_cli_error(cli_run("convert", tmp_path / "s", tmp_path / "o.zarr", "--voxel-size", 1, 1, 1),
                     "slices must be 2D greyscale")


def test_slices_of_different_shapes(tmp_path: Path, cli_run) -> None:
    (tmp_path / "s").mkdir()
    tifffile.imwrite(tmp_path / "s" / "1.tif", np.zeros((6, 7), np.uint8))
    tifffile.imwrite(tmp_path / "s" / "2.tif", np.zeros((6, 8), np.uint8))
    r = cli_run("convert", tmp_path / "s", tmp_path / "o.zarr", "--voxel-size", 1, 1, 1)
    assert_cli_error(r, "2.tif has shape (6, 8), unlike 1.tif (6, 7)")
    assert not is_complete(tmp_path / "o.zarr")


def test_5d_with_two_channels(tmp_path: Path, cli_run) -> None:
    from test_volume import _write_5d

    _write_5d(tmp_path / "c2.zarr", random_volume((1, 2, 6, 10, 12)))
    assert_cli_error(cli_run("info", tmp_path / "c2.zarr"), "axis 'c' has size 2", "select it first")


# --- dtype and values ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["int64", "complex64", "bool"])
def test_unsupported_dtype(tmp_path: Path, cli_run, dtype: str) -> None:
    np.save(tmp_path / "a.npy", np.zeros((3, 4, 5), dtype))
    r = cli_run("convert", tmp_path / "a.npy", tmp_path / "o.zarr", "--voxel-size", 1, 1, 1)
    assert_cli_error(r, f"dtype {dtype}", "convert it to uint8, uint16 or float32")
    assert not (tmp_path / "o.zarr").exists()
    # the same dtype in a plain Zarr array
    zarr.create_array(str(tmp_path / f"{dtype}.zarr"), shape=(3, 4, 5), dtype=dtype)
    assert_cli_error(cli_run("info", tmp_path / f"{dtype}.zarr"), f"dtype {dtype}", "uint8, uint16 or float32")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_float_input(tmp_path: Path, cli_run, bad: float) -> None:
    data = np.ones((10, 4, 5), np.float32)
    data[7, 1, 2] = bad
    np.save(tmp_path / "a.npy", data)
    out = tmp_path / "o.zarr"
    r = cli_run("convert", tmp_path / "a.npy", out, "--voxel-size", 1, 1, 1, "--chunks", 4, 4, 5)
    assert_cli_error(r, "contains NaN or infinite values", "replace them")
    assert not is_complete(out)
    if out.exists():  # what is left must be refused as unfinished
        assert_cli_error(cli_run("info", out), "incomplete", "rerun")


# --- parameters ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("factor", [1, 0, -4])
def test_factor_below_two(write_random_volume, tmp_path: Path, cli_run, factor: int) -> None:
    gt, _ = write_random_volume()
    r = cli_run("degrade", gt, tmp_path / "lr.zarr", "--factor", factor)
    assert_cli_error(r, "factor must be an integer >= 2", "--factor 8")
    assert not (tmp_path / "lr.zarr").exists()


def test_factor_leaves_too_few_slices(write_random_volume, tmp_path: Path, cli_run) -> None:
    """An LR volume thinner than the stages can use is refused, stating the minimum and the factor that works."""
    gt, data = write_random_volume(shape=(6, 8, 8))
    r = cli_run("degrade", gt, tmp_path / "lr.zarr", "--factor", 4, "--mode", "mean")
    assert_cli_error(r, "leaves 1 LR slice", "need >= 3", "use --factor 2 or less")
    r = cli_run("degrade", gt, tmp_path / "lr.zarr", "--factor", 1000)
    assert_cli_error(r, "6 slices by 1000", "leaves 1 LR slice", "need >= 3", "use --factor 2 or less")
    assert not (tmp_path / "lr.zarr").exists()
    assert_cli_ok(cli_run("degrade", gt, tmp_path / "lr.zarr", "--factor", 2, "--levels", 1))
    np.testing.assert_array_equal(open_volume(tmp_path / "lr.zarr").values, data[::2])


def test_noise_level_without_noise(write_random_volume, tmp_path: Path, cli_run) -> None:
    gt, _ = write_random_volume()
    r = cli_run("degrade", gt, tmp_path / "lr.zarr", "-s", 2, "--noise-level", 0.05)
    assert_cli_error(r, "--noise gaussian")


def test_blur_wider_than_volume(write_random_volume, tmp_path: Path, cli_run) -> None:
    gt, _ = write_random_volume(shape=(5, 8, 8))
    assert_cli_ok(cli_run("degrade", gt, tmp_path / "lr.zarr", "-s", 2, "--blur-sigma", 3, "--levels", 1))


# --- outputs ------------------------------------------------------------------------------------------


def test_existing_output_needs_overwrite(tmp_path: Path, cli_run, write_random_volume) -> None:
    np.save(tmp_path / "a.npy", random_volume((4, 5, 6)))
    out = tmp_path / "o.zarr"
    assert_cli_ok(cli_run("convert", tmp_path / "a.npy", out, "--voxel-size", 1, 1, 1))
    assert_cli_error(cli_run("convert", tmp_path / "a.npy", out, "--voxel-size", 1, 1, 1),
                     "already exists", "--overwrite")
    assert_cli_ok(cli_run("convert", tmp_path / "a.npy", out, "--voxel-size", 2, 1, 1, "--overwrite"))
    assert open_volume(out).attrs["voxel_size"] == (2.0, 1.0, 1.0)

    gt, _ = write_random_volume("gt.zarr")
    assert_cli_error(cli_run("degrade", gt, out, "-s", 2), "already exists", "--overwrite")
    assert open_volume(out).attrs["voxel_size"] == (2.0, 1.0, 1.0)  # untouched
    # --overwrite never deletes a folder that is not a Zarr store
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "paper.txt").write_text("keep")
    assert_cli_error(cli_run("degrade", gt, tmp_path / "docs", "-s", 2, "--overwrite"), "not a Zarr store")
    assert (tmp_path / "docs" / "paper.txt").exists()


def test_output_is_or_inside_input(write_random_volume, cli_run) -> None:
    gt, _ = write_random_volume("gt.zarr")
    for out in (gt, gt / "lr.zarr"):
        assert_cli_error(cli_run("degrade", gt, out, "-s", 2, "--overwrite"), "would overwrite the input")
        assert_cli_error(cli_run("convert", gt, out, "--overwrite"), "choose another output path")
    assert is_complete(gt) and open_volume(gt).shape == (11, 13, 17)


def test_tiff_needs_voxel_size(tmp_path: Path, cli_run) -> None:
    tifffile.imwrite(tmp_path / "s.tif", random_volume((4, 5, 6)), photometric="minisblack")
    r = cli_run("convert", tmp_path / "s.tif", tmp_path / "o.zarr")
    assert_cli_error(r, "give the voxel size in nm", "--voxel-size Z Y X")
    assert not (tmp_path / "o.zarr").exists()


def test_bad_voxel_size_and_chunks(tmp_path: Path, cli_run) -> None:
    np.save(tmp_path / "a.npy", random_volume((4, 5, 6)))
    assert_cli_error(cli_run("convert", tmp_path / "a.npy", tmp_path / "o.zarr", "--voxel-size", 0, 1, 1),
                     "voxel size must be positive")
    assert_cli_error(cli_run("convert", tmp_path / "a.npy", tmp_path / "o.zarr", "--voxel-size", 1, 1, 1,
                             "--chunks", 0, 4, 4), "chunks must be three positive sizes")
    assert not (tmp_path / "o.zarr").exists()


def test_hdf5_without_dataset_lists_datasets(tmp_path: Path, cli_run) -> None:
    import h5py

    with h5py.File(tmp_path / "f.h5", "w") as f:
        f["volumes/raw"] = np.zeros((3, 4, 5), np.uint8)
        f["volumes/labels/seg"] = np.zeros((3, 4, 5), np.uint16)
        f.attrs["note"] = "x"
    for spec in (tmp_path / "f.h5", f"{tmp_path / 'f.h5'}:", f"{tmp_path / 'f.h5'}:volumes/missing",
                 f"{tmp_path / 'f.h5'}:volumes"):  # the last one is a group
        r = cli_run("convert", spec, tmp_path / "o.zarr", "--voxel-size", 1, 1, 1)
        assert_cli_error(r, "f.h5:DATASET", "volumes/raw", "volumes/labels/seg")
    assert_cli_ok(cli_run("convert", f"{tmp_path / 'f.h5'}:volumes/raw", tmp_path / "o.zarr", "--voxel-size", 1, 1, 1))
