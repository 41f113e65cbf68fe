"""Geometry: degraded shapes, LR <-> HR coordinates, physical placement, boxes and tiling."""

from __future__ import annotations

import numpy as np
import pytest

from d2r_dask.errors import InputError
from d2r_dask.io.geometry import (
    Box,
    check_factor,
    check_mode,
    degraded_length,
    grid_shape,
    hr_to_lr_coord,
    iter_blocks,
    lr_to_hr_coord,
    lr_transform,
    sr_length,
    sr_transform,
)


@pytest.mark.parametrize(
    "n, s, decimate, mean",
    [
        (249, 4, 63, 62),
        (250, 4, 63, 62),
        (249, 8, 32, 31),
        (250, 8, 32, 31),
        (248, 8, 31, 31),
        (4, 4, 1, 1),
        (5, 4, 2, 1),
    ],
)
def test_degraded_length(n: int, s: int, decimate: int, mean: int) -> None:
    assert degraded_length(n, s, "decimate") == decimate == len(range(0, n, s))
    assert degraded_length(n, s, "mean") == mean == n // s


def test_degraded_length_too_few_slices() -> None:
    assert degraded_length(3, 4, "decimate") == 1  # slice 0 survives
    with pytest.raises(InputError, match="leaves no slice"):
        degraded_length(3, 4, "mean")  # no complete slab


def test_degraded_length_matches_brute_force() -> None:
    for s in (2, 3, 4, 5, 8):
        for n in range(s, 40):
            assert degraded_length(n, s, "decimate") == len(np.arange(n)[::s])
            assert degraded_length(n, s, "mean") == len([k for k in range(n) if (k + 1) * s <= n])


def test_sr_length() -> None:
    assert sr_length(63, 4) == 252
    assert sr_length(31, 8) == 248


@pytest.mark.parametrize("bad", [1, 0, -4, 2.0, 4.5, True, "4", None])
def test_check_factor_refuses(bad: object) -> None:
    with pytest.raises(InputError, match="factor must be an integer >= 2"):
        check_factor(bad)  # type: ignore[arg-type]


def test_check_factor_accepts_numpy_int() -> None:
    assert check_factor(np.int64(4)) == 4
    assert type(check_factor(np.int64(4))) is int


def test_check_mode() -> None:
    assert check_mode("mean") == "mean"
    with pytest.raises(InputError, match="decimate, mean"):
        check_mode("median")


@pytest.mark.parametrize("mode", ["decimate", "mean"])
@pytest.mark.parametrize("s", [2, 3, 4, 8])
def test_coords_inverse(mode: str, s: int) -> None:
    j = np.arange(-3, 50, dtype=float) + 0.25
    np.testing.assert_allclose(lr_to_hr_coord(hr_to_lr_coord(j, s, mode), s, mode), j, rtol=0, atol=1e-12)
    k = np.linspace(-2, 20, 47)
    np.testing.assert_allclose(hr_to_lr_coord(lr_to_hr_coord(k, s, mode), s, mode), k, rtol=0, atol=1e-12)


def test_coords_values() -> None:
    # decimate: LR k is HR k*s
    assert lr_to_hr_coord(3, 4, "decimate") == 12
    assert hr_to_lr_coord(12, 4, "decimate") == 3
    # mean: LR k is the centre of HR k*s .. k*s+s-1
    assert lr_to_hr_coord(0, 4, "mean") == 1.5
    assert lr_to_hr_coord(2, 8, "mean") == 16 + 3.5
    assert hr_to_lr_coord(1.5, 4, "mean") == 0


@pytest.mark.parametrize("mode", ["decimate", "mean"])
@pytest.mark.parametrize("s", [2, 4, 8, 5])
@pytest.mark.parametrize(
    "scale, translation",
    [((10.0, 10.0, 10.0), (0.0, 0.0, 0.0)), ((5.0, 4.0, 4.0), (-120.0, 12.5, 3.0)), ((8.0, 2.0, 3.0), (1000.0, 0.0, -7.0))],
)
def test_lr_then_sr_round_trips_exactly(mode: str, s: int, scale: tuple, translation: tuple) -> None:
    lr_scale, lr_tr = lr_transform(scale, translation, s, mode)
    assert lr_scale == (scale[0] * s, scale[1], scale[2])
    assert lr_tr[1:] == translation[1:]
    sr_scale, sr_tr = sr_transform(lr_scale, lr_tr, s, mode)
    assert sr_scale == tuple(scale)
    assert sr_tr == tuple(translation)


@pytest.mark.parametrize("mode", ["decimate", "mean"])
def test_lr_then_sr_round_trips_arbitrary_floats(mode: str) -> None:
    scale, translation = (3.3, 0.7, 0.7), (0.1, 1e-3, -2.2)
    for s in (3, 6, 10):
        sr = sr_transform(*lr_transform(scale, translation, s, mode), s, mode)
        np.testing.assert_allclose(sr[0], scale, rtol=1e-14)
        np.testing.assert_allclose(sr[1], translation, rtol=0, atol=1e-12)


@pytest.mark.parametrize("s", [2, 4, 8])
def test_lr_slice_physical_position(s: int) -> None:
    dz, tz = 10.0, 7.0
    hr_z = tz + dz * np.arange(10 * s)  # physical centre of every HR slice
    for mode in ("decimate", "mean"):
        (lz, _, _), (ltz, _, _) = lr_transform((dz, 4.0, 4.0), (tz, 0.0, 0.0), s, mode)
        n_lr = degraded_length(len(hr_z), s, mode)
        lr_z = ltz + lz * np.arange(n_lr)
        if mode == "decimate":
            expected = hr_z[::s]  # LR k is HR slice k*s
        else:
            expected = hr_z[: n_lr * s].reshape(n_lr, s).mean(axis=1)  # centre of the slab
        np.testing.assert_allclose(lr_z, expected, rtol=0, atol=1e-9)
        # and the SR made from it puts slice j exactly where HR slice j was
        (sz, _, _), (stz, _, _) = sr_transform((lz, 4.0, 4.0), (ltz, 0.0, 0.0), s, mode)
        np.testing.assert_allclose(stz + sz * np.arange(n_lr * s), hr_z[: n_lr * s], rtol=0, atol=1e-9)
        # and hr_to_lr_coord agrees with the physical placement
        np.testing.assert_allclose(
            ltz + lz * hr_to_lr_coord(np.arange(n_lr * s), s, mode), hr_z[: n_lr * s], rtol=0, atol=1e-9
        )


# --- boxes ------------------------------------------------------------------------------


def test_box_basics() -> None:
    b = Box((1, 2, 3), (4, 6, 9))
    assert b.shape == (3, 4, 6)
    assert b.slices == (slice(1, 4), slice(2, 6), slice(3, 9))
    assert Box((0, 0, 0), (0, 0, 0)).shape == (0, 0, 0)
    with pytest.raises(ValueError):
        Box((2, 0, 0), (1, 1, 1))
    with pytest.raises(ValueError):
        Box((0, 0), (1, 1, 1))


def test_box_grow_clip_scale_shift() -> None:
    b = Box((1, 2, 3), (4, 6, 9))
    g = b.grow((2, 1, 0))
    assert g == Box((-1, 1, 3), (6, 7, 9))
    assert g.clip((5, 7, 8)) == Box((0, 1, 3), (5, 7, 8))
    assert b.scale((4, 1, 1)) == Box((4, 2, 3), (16, 6, 9))
    assert b.shift((1, 2, 3)) == Box((0, 0, 0), (3, 4, 6))
    assert b.shift((-1, 0, 0)) == Box((2, 2, 3), (5, 6, 9))
    # a box wholly outside the volume clips to an empty (valid) box
    outside = Box((10, -5, 0), (12, -1, 3)).clip((8, 8, 8))
    assert 0 in outside.shape
    assert all(0 <= a <= n for a, n in zip(outside.start + outside.stop, (8, 8, 8) * 2))
    # grow then clip then shift: the halo-aware read box expressed relative to itself
    inner = b.shift(g.clip((5, 7, 8)).start)
    assert inner == Box((1, 1, 0), (4, 5, 6))


@pytest.mark.parametrize(
    "shape, block",
    [((7, 5, 9), (3, 2, 4)), ((10, 10, 10), (5, 5, 5)), ((1, 13, 4), (4, 4, 4)), ((9, 6, 11), (20, 20, 20))],
)
def test_iter_blocks_covers_once(shape: tuple, block: tuple) -> None:
    count = np.zeros(shape, dtype=int)
    seen = set()
    grid = grid_shape(shape, block)
    for index, box in iter_blocks(shape, block):
        assert index not in seen
        seen.add(index)
        assert box.start == tuple(i * b for i, b in zip(index, block))
        assert all(0 < n <= b for n, b in zip(box.shape, block))
        count[box.slices] += 1
    assert (count == 1).all()
    assert len(seen) == int(np.prod(grid))
    assert grid == tuple(-(-n // b) for n, b in zip(shape, block))


def test_grid_shape_refuses_bad_block() -> None:
    with pytest.raises(InputError):
        grid_shape((4, 4, 4), (2, 0, 2))
    with pytest.raises(InputError):
        grid_shape((4, 4, 4), (2, 2))


def test_region_of_checks_a_user_roi_against_the_volume() -> None:
    from d2r_dask.io.geometry import region_of

    assert region_of(None, (4, 5, 6)) == Box((0, 0, 0), (4, 5, 6))
    assert region_of((1, 0, 2, 3, 5, 6), (4, 5, 6)) == Box((1, 0, 2), (3, 5, 6))
    box = Box((0, 1, 1), (2, 2, 2))
    assert region_of(box, (4, 5, 6)) is box
    with pytest.raises(InputError, match="restore.roi needs six numbers"):
        region_of((1, 2, 3), (4, 5, 6), "restore.roi")
    for bad in ((0, 0, 0, 5, 5, 6), (2, 0, 0, 2, 5, 6), (3, 0, 0, 1, 5, 6), (-1, 0, 0, 2, 5, 6)):
        with pytest.raises(InputError, match=r"--roi .* is empty or outside the volume \(4, 5, 6\)"):
            region_of(bad, (4, 5, 6), "--roi")
