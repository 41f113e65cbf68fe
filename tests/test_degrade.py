"""Degradation and resampling: numpy references, true sample placement, the lazy volume path."""

from __future__ import annotations

import hashlib
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
from conftest import random_volume
from scipy.ndimage import gaussian_filter1d

from d2r_dask.data.degrade import (
    METHODS,
    AxialDegradation,
    degrade_along,
    degrade_lateral,
    degrade_volume,
    interp_weights,
    upsample_axis,
)
from d2r_dask.errors import InputError
from d2r_dask.io.convert import check_finite
from d2r_dask.io.geometry import Geometry, lr_transform
from d2r_dask.io.volume import as_dataarray, open_volume, to_dtype, write_volume


def _ref_degrade(a: np.ndarray, s: int, axis: int, mode: str) -> np.ndarray:
    """Slice-by-slice reference: keep HR k*s, or average HR k*s .. k*s+s-1 (complete slabs)."""
    a = np.moveaxis(a, axis, 0)
    if mode == "decimate":
        out = np.stack([a[k * s] for k in range(-(-a.shape[0] // s))])
    else:
        out = np.stack([a[k * s : k * s + s].astype(np.float64).mean(axis=0) for k in range(a.shape[0] // s)])
    return np.moveaxis(out, 0, axis)


@pytest.mark.parametrize("mode", ["decimate", "mean"])
@pytest.mark.parametrize("s", [2, 3, 4])
@pytest.mark.parametrize("axis", [0, 1, 2, -1, -2])
def test_degrade_along_matches_reference(mode: str, s: int, axis: int) -> None:
    a = random_volume((11, 9, 10), "uint8", seed=s)  # odd and even sizes, none a multiple of 4
    got = degrade_along(a, s, axis=axis, mode=mode)
    ref = _ref_degrade(a, s, axis, mode)
    assert got.shape == ref.shape
    if mode == "decimate":
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, ref)
    else:
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, ref, rtol=1e-6)


def test_degrade_along_shapes() -> None:
    a = np.zeros((250, 3, 249), np.uint16)
    assert degrade_along(a, 4, axis=0, mode="decimate").shape == (63, 3, 249)
    assert degrade_along(a, 4, axis=0, mode="mean").shape == (62, 3, 249)
    assert degrade_along(a, 8, axis=2, mode="decimate").shape == (250, 3, 32)
    assert degrade_along(a, 8, axis=-1, mode="mean").shape == (250, 3, 31)
    with pytest.raises(InputError, match="leaves no slice"):
        degrade_along(a, 4, axis=1, mode="mean")


def test_degrade_lateral() -> None:
    img = random_volume((13, 10), "uint8")
    np.testing.assert_array_equal(degrade_lateral(img, 4), img[::4])
    np.testing.assert_array_equal(degrade_lateral(img, 4, axis=-1), img[:, ::4])
    np.testing.assert_allclose(degrade_lateral(img, 3, axis=-1, mode="mean"), _ref_degrade(img, 3, 1, "mean"), rtol=1e-6)
    batch = random_volume((2, 13, 10), "uint8")  # leading axes are carried along
    np.testing.assert_array_equal(degrade_lateral(batch, 2), batch[:, ::2])
    with pytest.raises(InputError, match="lateral axis"):
        degrade_lateral(img, 4, axis=0)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mode", ["decimate", "mean"])
@pytest.mark.parametrize("s", [2, 4, 8])
def test_interp_weights_rows_sum_to_one(method: str, mode: str, s: int) -> None:
    for n_in, n_out in ((7, 7 * s), (1, s), (5, 5 * s - 3)):
        w = interp_weights(n_in, s, mode, method, n_out)
        assert w.shape == (n_out, n_in) and w.dtype == np.float32
        np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-6)


def test_interp_weights_refuses_unknown_method() -> None:
    with pytest.raises(InputError, match="nearest, linear, cubic"):
        interp_weights(5, 2, "decimate", "lanczos", 10)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("s", [2, 3, 4, 8])
def test_upsample_decimate_places_samples_exactly(method: str, s: int) -> None:
    lr = random_volume((6, 5, 7), "float32", seed=s)
    for axis in (0, 1, -1):
        up = upsample_axis(lr, s, axis=axis, mode="decimate", method=method)
        assert up.dtype == np.float32
        assert up.shape[axis] == lr.shape[axis] * s
        np.testing.assert_array_equal(np.take(up, np.arange(0, up.shape[axis], s), axis=axis), lr)


@pytest.mark.parametrize("mode", ["decimate", "mean"])
@pytest.mark.parametrize("method", ["linear", "cubic"])
@pytest.mark.parametrize("s", [2, 4, 5])
def test_upsample_exact_on_linear_data(mode: str, method: str, s: int) -> None:
    """A z-ramp degraded by ``mode`` and upsampled back is the ramp, away from the edges."""
    n_lr = 9
    hr = (3.0 + 0.5 * np.arange(n_lr * s, dtype=np.float64))[:, None, None] + np.zeros((1, 3, 4))
    lr = degrade_along(hr, s, axis=0, mode=mode)  # mean of a ramp = the ramp at the slab centre
    up = upsample_axis(lr, s, axis=0, mode=mode, method=method)
    assert up.shape == hr.shape
    c = 0 if mode == "decimate" else (s - 1) / 2  # HR position of LR sample 0
    margin = 0 if method == "linear" else 1  # cubic needs one more LR neighbour each side
    j = np.arange(n_lr * s)
    interior = (j >= c + margin * s) & (j <= c + (n_lr - 1 - margin) * s)
    assert interior.sum() >= 3 * s
    np.testing.assert_allclose(up[interior], hr[interior], rtol=0, atol=1e-4)
    # and the same along another axis
    up_y = upsample_axis(np.moveaxis(lr, 0, 1), s, axis=1, mode=mode, method=method)
    np.testing.assert_allclose(np.moveaxis(up_y, 1, 0)[interior], hr[interior], rtol=0, atol=1e-4)


def test_upsample_edges_replicate_and_nearest() -> None:
    lr = np.array([1.0, 5.0, 9.0], np.float32)
    # mean mode: HR 0 lies before LR 0's centre; clamped to the edge value
    assert upsample_axis(lr, 4, axis=0, mode="mean", method="linear")[0] == 1.0
    assert upsample_axis(lr, 4, axis=0, mode="mean", method="linear")[-1] == 9.0
    np.testing.assert_array_equal(
        upsample_axis(lr, 2, axis=0, mode="decimate", method="nearest"), [1, 5, 5, 9, 9, 9]
    )
    assert upsample_axis(lr, 2, axis=0, mode="decimate", length=4).shape == (4,)


def test_to_dtype_rounds_and_clips() -> None:
    x = np.array([-3.2, 1.5, 2.5, 2.6, 300.7, 65535.4], np.float32)
    np.testing.assert_array_equal(to_dtype(x, np.uint8), [0, 2, 2, 3, 255, 255])
    np.testing.assert_array_equal(to_dtype(x, np.uint16), [0, 2, 2, 3, 301, 65535])
    assert to_dtype(x, np.float32).dtype == np.float32


def test_check_finite() -> None:
    check_finite(np.zeros(3, np.uint8))
    check_finite(np.zeros(3, np.float32))
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(InputError, match="NaN or infinite"):
            check_finite(np.array([0.0, bad], np.float32))


# --- the lazy whole-volume path -------------------------------------------------------------


def _store_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        h.update(str(f.relative_to(path)).encode())
        if f.is_file():
            h.update(f.read_bytes())
            h.update(str(f.stat().st_mtime_ns).encode())
    return h.hexdigest()


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
@pytest.mark.parametrize("mode", ["decimate", "mean"])
@pytest.mark.parametrize("s", [3, 4])
def test_degrade_volume_matches_numpy(write_random_volume, dtype: str, mode: str, s: int) -> None:
    path, data = write_random_volume(shape=(23, 10, 9), dtype=dtype, voxel_size=(10.0, 10.0, 10.0),
                                     translation=(5.0, 1.0, 2.0), chunks=(5, 6, 9))
    digest = _store_digest(path)
    vol = open_volume(path)
    lr = degrade_volume(vol, AxialDegradation(s, mode))
    assert lr.dtype == np.dtype(dtype)
    ref = to_dtype(_ref_degrade(data, s, 0, mode), dtype)
    got = lr.values
    assert got.shape == ref.shape
    if dtype == "float32":
        np.testing.assert_allclose(got, ref, rtol=1e-6)
    else:
        np.testing.assert_array_equal(got, ref)
    scale, translation = lr_transform((10.0, 10.0, 10.0), (5.0, 1.0, 2.0), s, mode)
    assert lr.attrs["voxel_size"] == scale and lr.attrs["translation"] == translation
    np.testing.assert_allclose(lr.z.values, translation[0] + scale[0] * np.arange(got.shape[0]))
    assert lr.attrs["degradation"]["factor"] == s and lr.attrs["degradation"]["mode"] == mode
    assert _store_digest(path) == digest  # reading and degrading never touched the input


@pytest.mark.parametrize("s", [2, 4])
def test_degraded_value_sits_at_its_coordinate(s: int) -> None:
    """Degrade data whose value is its physical z: each LR voxel's value is its own z coordinate."""
    hr_z = 20.0 + 8.0 * np.arange(30)
    hr = as_dataarray(da.from_array(np.broadcast_to(hr_z[:, None, None], (30, 2, 2)).astype(np.float32), chunks=7),
                      Geometry((8.0, 1.0, 1.0), (20.0, 0.0, 0.0)))
    for mode in ("decimate", "mean"):
        lr = degrade_volume(hr, AxialDegradation(s, mode))
        np.testing.assert_allclose(lr.values[:, 0, 0], lr.z.values, rtol=1e-6)


def test_degrade_volume_blur_matches_numpy(write_random_volume) -> None:
    path, data = write_random_volume(shape=(40, 6, 7), chunks=(7, 6, 7))
    lr = degrade_volume(open_volume(path), AxialDegradation(4, "mean", blur_sigma=1.5))
    blurred = gaussian_filter1d(data.astype(np.float32), 1.5, axis=0, mode="reflect")
    ref = to_dtype(_ref_degrade(blurred, 4, 0, "mean"), np.uint8)
    assert np.abs(lr.values.astype(int) - ref).max() <= 1  # float summation order only
    assert (lr.values == ref).mean() > 0.99


def test_degrade_volume_blur_wider_than_volume() -> None:
    data = random_volume((5, 4, 4), "uint8")
    lr = degrade_volume(as_dataarray(da.from_array(data, chunks=2), Geometry()), AxialDegradation(2, blur_sigma=2.0))
    ref = to_dtype(gaussian_filter1d(data.astype(np.float32), 2.0, axis=0, mode="reflect")[::2], np.uint8)
    np.testing.assert_array_equal(lr.values, ref)


@pytest.mark.parametrize("mode", ["decimate", "mean"])
def test_degrade_volume_chunking_independent(tmp_path: Path, mode: str) -> None:
    data = random_volume((37, 12, 10), "uint16", seed=9)
    deg = AxialDegradation(4, mode, blur_sigma=1.2, noise="gaussian", noise_level=0.02, seed=11)
    results = []
    for i, chunks in enumerate([(37, 12, 10), (5, 7, 3), (16, 5, 10), (2, 12, 10)]):
        path = write_volume(tmp_path / f"v{i}.zarr", data, Geometry(), chunks=chunks)
        lr = degrade_volume(open_volume(path), deg)
        results.append(lr.values)
        # and written to disk with yet another output chunking
        out = write_volume(tmp_path / f"lr{i}.zarr", lr.data, Geometry.of(lr), chunks=(3, 4, 4))
        np.testing.assert_array_equal(open_volume(out).values, lr.values)
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])
    # the noise is really there, and the seed picks it
    clean = degrade_volume(open_volume(tmp_path / "v0.zarr"), AxialDegradation(4, mode, blur_sigma=1.2)).values
    assert not np.array_equal(results[0], clean)
    other = degrade_volume(open_volume(tmp_path / "v0.zarr"),
                           AxialDegradation(4, mode, blur_sigma=1.2, noise="gaussian", noise_level=0.02, seed=12))
    assert not np.array_equal(other.values, results[0])


@pytest.mark.parametrize("noise, level, expected_std", [("gaussian", 0.05, 0.05), ("poisson", 0.01, 0.05)])
def test_noise_level(noise: str, level: float, expected_std: float) -> None:
    """Gaussian std = level * range; poisson variance = x * level * range (x = 0.25 of range here)."""
    hr = as_dataarray(da.full((8, 64, 64), 0.25, dtype=np.float32, chunks=(4, 32, 32)), Geometry())
    lr = degrade_volume(hr, AxialDegradation(2, noise=noise, noise_level=level)).values
    assert lr.dtype == np.float32
    assert abs(lr.mean() - 0.25) < 0.005
    assert lr.std() == pytest.approx(expected_std, rel=0.05)


def test_noise_clipped_for_integers() -> None:
    hr = as_dataarray(da.full((4, 32, 32), 250, dtype=np.uint8, chunks=16), Geometry())
    lr = degrade_volume(hr, AxialDegradation(2, noise="gaussian", noise_level=0.1)).values
    assert lr.dtype == np.uint8 and lr.max() == 255 and lr.min() < 250


def test_degrade_volume_refuses_too_few_slices() -> None:
    hr = as_dataarray(da.zeros((3, 4, 4), dtype=np.uint8), Geometry())
    assert degrade_volume(hr, AxialDegradation(4, "decimate")).shape == (1, 4, 4)
    with pytest.raises(InputError, match="leaves no slice"):
        degrade_volume(hr, AxialDegradation(4, "mean"))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"factor": 1}, "factor must be an integer >= 2"),
        ({"factor": 2.5}, "factor must be an integer >= 2"),
        ({"factor": 4, "mode": "max"}, "unknown degradation mode"),
        ({"factor": 4, "blur_sigma": -1.0}, ">= 0"),
        ({"factor": 4, "noise": "gaussian", "noise_level": -0.1}, ">= 0"),
        ({"factor": 4, "noise": "salt"}, "gaussian or poisson"),
        ({"factor": 4, "noise_level": 0.1}, "needs a noise model"),
    ],
)
def test_axial_degradation_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(InputError, match=match):
        AxialDegradation(**kwargs)


def test_axial_degradation_to_dict() -> None:
    d = AxialDegradation(8, "mean", 0.5, "poisson", 0.01, 3).to_dict()
    assert d == {"factor": 8, "mode": "mean", "blur_sigma": 0.5, "noise": "poisson", "noise_level": 0.01, "seed": 3}
