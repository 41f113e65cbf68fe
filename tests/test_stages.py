"""Stages II and IV through the engine, on real Zarr stores: blockwise == whole volume,
output geometry, chunking and worker-count independence of the pseudo-HR.

The models are tiny and randomly initialised (written as the trainers write them): what is
tested is the stitching and placement, not what a model has learned.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from conftest import assert_cli_ok
from d2r_testkit import ORIGIN, S, VOXEL, dgean_checkpoint, restorer_checkpoint, synth_array, write
from d2r_testkit import one_torch_thread  # noqa: F401  (autouse)

from d2r_dask.blockwise.stitching import apply_whole
from d2r_dask.io.geometry import Box, sr_geometry
from d2r_dask.stages.infer import DGEANProcessor, infer
from d2r_dask.models.dgean import receptive_field
from d2r_dask.stages.restore import RestorerProcessor, restore, stage2_layout, stage2_work
from d2r_dask.models.checkpoint import load_dgean
from d2r_dask.io.volume import open_volume


def expected_geometry(mode: str, start: tuple[int, int, int] = (0, 0, 0)) -> tuple[tuple, tuple]:
    """D2R.md's rule, written out: SR slice j sits at LR coordinate j/s (decimate) or
    (j - (s-1)/2)/s (mean), measured from the region's first LR slice."""
    dz, dy, dx = VOXEL
    first = 0.0 if mode == "decimate" else -(S - 1) / 2 / S
    translation = (ORIGIN[0] + (start[0] + first) * dz, ORIGIN[1] + start[1] * dy, ORIGIN[2] + start[2] * dx)
    return (dz / S, dy, dx), translation


def check_geometry(path: Path, mode: str, shape: tuple[int, int, int], start: tuple[int, int, int] = (0, 0, 0)) -> None:
    vol = open_volume(path)
    voxel, translation = expected_geometry(mode, start)
    assert vol.shape == shape
    np.testing.assert_allclose(vol.attrs["voxel_size"], voxel)
    np.testing.assert_allclose(vol.attrs["translation"], translation)
    np.testing.assert_allclose(vol["z"].values[:2], [translation[0], translation[0] + voxel[0]])


# --- Stage IV -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lr_float(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """A float32 LR volume (intensities in [0, 1]) in chunks that match no block below."""
    data = (synth_array((5, 14, 18), seed=11) / 255.0).astype(np.float32)
    path = write(tmp_path_factory.mktemp("stage4") / "lr.zarr", data, VOXEL, ORIGIN, chunks=(2, 5, 7))
    return path, data


@pytest.fixture(scope="module")
def dgean_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("dgean")
    return {mode: dgean_checkpoint(base / mode, mode=mode, intensity=(0.0, 1.0), seed=3)
            for mode in ("decimate", "mean")}


@pytest.fixture(scope="module")
def whole_sr(lr_float: tuple[Path, np.ndarray], dgean_models: dict[str, Path]) -> np.ndarray:
    model = dgean_models["decimate"]
    net, _ = load_dgean(model)
    return apply_whole(DGEANProcessor(str(model), "cpu"), lr_float[1], receptive_field(net.cfg))


@pytest.mark.parametrize("block", [(3, 8, 11), (2, 14, 5)])
def test_stage4_blockwise_equals_whole_volume(block: tuple[int, int, int], tmp_path: Path,
                                              lr_float: tuple[Path, np.ndarray], dgean_models: dict[str, Path],
                                              whole_sr: np.ndarray) -> None:
    lr, data = lr_float
    out = infer(lr, tmp_path / "sr.zarr", dgean_models["decimate"], block=block, serial=True, progress=False,
                levels=1)
    sr = open_volume(out)
    assert sr.dtype == np.float32
    assert whole_sr.shape == (5 * S, 14, 18)
    np.testing.assert_allclose(sr.values, whole_sr, rtol=0, atol=1e-5)
    # DGEAN adds to a cubic upsampling: the SR keeps the LR slices it was given, roughly
    assert np.abs(sr.values[::S] - data).mean() < 0.2
    check_geometry(out, "decimate", (5 * S, 14, 18))
    assert sr_geometry(open_volume(lr), S, "decimate").translation == tuple(sr.attrs["translation"])


def test_stage4_roi_from_the_cli(tmp_path: Path, lr_float: tuple[Path, np.ndarray], dgean_models: dict[str, Path],
                                 whole_sr: np.ndarray, cli_run: Callable[..., Any]) -> None:
    lr, _ = lr_float
    out = tmp_path / "roi.zarr"
    result = cli_run("infer", lr, out, "--model", dgean_models["decimate"], "--roi", 1, 2, 3, 4, 12, 15,
                     "--block", 2, 6, 7, "--serial", "--levels", 1)
    assert_cli_ok(result)
    check_geometry(out, "decimate", (3 * S, 10, 12), start=(1, 2, 3))
    # the region's context is real data from around it, so it is the whole result, cropped
    np.testing.assert_allclose(open_volume(out).values, whole_sr[1 * S:4 * S, 2:12, 3:15], rtol=0, atol=1e-5)


def test_stage4_mean_mode_geometry_and_integer_output(tmp_path: Path, dgean_models: dict[str, Path]) -> None:
    data = synth_array((4, 9, 10), seed=12)
    lr = write(tmp_path / "lr8.zarr", data, VOXEL, ORIGIN, chunks=(3, 4, 4))
    model = dgean_checkpoint(tmp_path / "m", mode="mean", intensity=(0.0, 255.0), seed=4)
    out = infer(lr, tmp_path / "sr.zarr", model, block=(3, 5, 6), serial=True, progress=False, levels=1)
    check_geometry(out, "mean", (4 * S, 9, 10))
    sr = open_volume(out)
    assert sr.dtype == np.uint8  # written in the LR's dtype: clipped and rounded
    whole = apply_whole(DGEANProcessor(str(model), "cpu"), data, receptive_field(load_dgean(model)[0].cfg))
    expected = np.clip(np.rint(whole), 0, 255)
    assert np.abs(sr.values.astype(np.float64) - expected).max() <= 1  # a .5 may round either way
    assert np.mean(sr.values == expected) > 0.99


def test_sr_geometry_matches_the_rule() -> None:
    from d2r_dask.io.geometry import Geometry
    from d2r_dask.io.volume import as_dataarray

    lr = as_dataarray(np.zeros((6, 8, 8), np.uint8), Geometry(VOXEL, ORIGIN))
    for mode in ("decimate", "mean"):
        for start in ((0, 0, 0), (2, 3, 5)):
            g = sr_geometry(lr, S, mode, Box(start, (6, 8, 8)) if any(start) else None)
            voxel, translation = expected_geometry(mode, start)
            np.testing.assert_allclose(g.voxel_size, voxel)
            np.testing.assert_allclose(g.translation, translation)


# --- Stage II -----------------------------------------------------------------------------------


RESTORE = {"block": (4, 16, 16), "halo": (1, 4, 4), "serial": True, "progress": False, "levels": 1}


@pytest.fixture(scope="module")
def stage2(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One LR volume stored twice (two chunkings), a random restorer, and the serial pseudo-HR."""
    base = tmp_path_factory.mktemp("stage2")
    data = synth_array((8, 24, 24), seed=13)
    a = write(base / "lr_a.zarr", data, VOXEL, ORIGIN, chunks=(3, 7, 11))
    b = write(base / "lr_b.zarr", data, VOXEL, ORIGIN, chunks=(8, 24, 24))
    model = restorer_checkpoint(base / "restorer", steps=2, seed=5)
    ref = restore(a, base / "ph_a.zarr", model, **RESTORE)
    return {"base": base, "data": data, "a": a, "b": b, "model": model, "ref": open_volume(ref).values}


def test_stage2_pseudo_hr_is_chunking_independent(stage2: dict[str, Any]) -> None:
    out = restore(stage2["b"], stage2["base"] / "ph_b.zarr", stage2["model"], **RESTORE)
    np.testing.assert_array_equal(open_volume(out).values, stage2["ref"])


def test_stage2_pseudo_hr_geometry_and_values(stage2: dict[str, Any]) -> None:
    ref = stage2["ref"]
    check_geometry(stage2["base"] / "ph_a.zarr", "decimate", (8 * S, 24, 24))
    assert ref.dtype == np.uint8
    assert 20 < ref.mean() < 235 and ref.std() > 5  # a picture, not a constant
    # all tiles were blended in: no region was left at the store's fill value
    assert (ref.reshape(8 * S, 3, 8, 3, 8) == 0).all(axis=(0, 2, 4)).sum() == 0


def test_stage2_float_roi_seeds_and_range(stage2: dict[str, Any], tmp_path: Path) -> None:
    data = (stage2["data"] / 255.0).astype(np.float32)
    lr = write(tmp_path / "lr_f.zarr", data, VOXEL, ORIGIN, chunks=(4, 12, 12))
    model = restorer_checkpoint(tmp_path / "restorer", steps=2, seed=5, intensity=(0.0, 1.0))
    roi = Box((2, 4, 6), (6, 16, 20))
    outs = [open_volume(restore(lr, tmp_path / f"seed{seed}.zarr", model, roi=roi, seed=seed, **RESTORE))
            for seed in (0, 1)]
    check_geometry(tmp_path / "seed0.zarr", "decimate", (4 * S, 12, 14), start=(2, 4, 6))
    for out in outs:
        values = out.values
        assert values.dtype == np.float32
        assert np.isfinite(values).all()
        # float volumes are not clipped to the intensity mapping's range (its tails survive), only
        # bounded by the sampler's clamp of x0 (IRSDE.X0_RANGE, in the checkpoint's unit range)
        assert values.min() >= -0.5 - 1e-5 and values.max() <= 1.5 + 1e-5
    assert not np.array_equal(outs[0].values, outs[1].values), "the seed changes nothing"


def test_stage2_worker_count_independent(stage2: dict[str, Any]) -> None:
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      memory_limit="2GiB") as cluster, Client(cluster) as client:
        out = restore(stage2["a"], stage2["base"] / "ph_cluster.zarr", stage2["model"], client=client,
                      **{**RESTORE, "serial": False})
    np.testing.assert_array_equal(open_volume(out).values, stage2["ref"])


def test_stage2_restores_each_slice_once_and_fuses_like_the_3d_blend(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Each XZ slice is restored once per tile of its XZ plane (YZ likewise), the pixels counted
    are what :func:`stage2_work` plans, and the result is the former rule's: the mean of the XZ and
    YZ restorations of every 3D tile (all its slices, halo included), blended in 3D."""
    from d2r_dask.blockwise.layout import Layout, read_reflected
    from d2r_dask.blockwise.stitching import blend_weights

    data = (synth_array((6, 20, 20), seed=3) / 255.0).astype(np.float32)
    lr = write(tmp_path / "lr.zarr", data, VOXEL, ORIGIN, chunks=(6, 20, 20))
    model = restorer_checkpoint(tmp_path / "restorer", steps=2, seed=5, intensity=(0.0, 1.0))
    block, halo = (3, 10, 10), (1, 3, 3)
    restore_slices = RestorerProcessor.restore_slices
    pixels: list[int] = []

    def counted(self: RestorerProcessor, slices: np.ndarray, keys: Any, stream: int) -> np.ndarray:
        pixels.append(slices.shape[0] * slices.shape[1] * self.factor * slices.shape[2])
        return restore_slices(self, slices, keys, stream)

    monkeypatch.setattr(RestorerProcessor, "restore_slices", counted)
    out = open_volume(restore(lr, tmp_path / "ph.zarr", model, block=block, halo=halo, serial=True,
                              progress=False, levels=1)).values
    layout = stage2_layout(data.shape, block=block, halo=halo, factor=S)
    assert layout.grid == (2, 2, 2) and layout.halo == halo
    work = stage2_work(layout)
    assert sum(pixels) == work["pixel_evaluations"] and work["slices"] == 2 * 20 * 4
    # the former tiling restored every slice of every 3D tile: 8 tiles x (16 + 16) slices of 5*S x 16,
    # i.e. the 10 slices a tile owns across each plane and the 6 of its halo, which its neighbours own
    assert work["pixel_evaluations"] == 8 * 32 * 5 * S * 16 * 10 // 16

    proc = RestorerProcessor(str(model), "cpu")
    blend = Layout(roi=layout.roi, block=block, halo=halo, scale=layout.scale, stitch="blend")
    ref = np.zeros(blend.out_shape, np.float32)
    for index, _ in blend.blocks():
        box = blend.read_box(index)
        tile = proc.intensity.to_unit(read_reflected(lambda sl: data[sl], data.shape, box))
        zh = np.arange(box.start[0] * S, box.stop[0] * S)
        ys, xs = np.arange(box.start[1], box.stop[1]), np.arange(box.start[2], box.stop[2])
        xz = restore_slices(proc, tile.transpose(1, 0, 2), (zh[None, :, None], ys[:, None, None],
                                                             xs[None, None, :]), 0).transpose(1, 0, 2)
        yz = restore_slices(proc, tile.transpose(2, 0, 1), (zh[None, :, None], ys[None, None, :],
                                                             xs[:, None, None]), 1).transpose(1, 2, 0)
        weighted = proc.intensity.from_unit((xz + yz) / 2) * blend_weights(blend, index)
        lo = tuple(a * sc for a, sc in zip(box.start, blend.scale))
        dst = Box(lo, tuple(a + n for a, n in zip(lo, weighted.shape))).clip(blend.out_shape)
        ref[dst.slices] += weighted[dst.shift(lo).slices]
    np.testing.assert_allclose(out, ref, atol=2e-5)


@pytest.mark.parametrize("mode", ["decimate", "mean"])
def test_stage2_flips_map_every_voxel_back_to_itself(mode: str, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Flipped copies are flipped back onto the voxels they restore. A stand-in network that
    writes each output voxel's noise keys (its global z, and its lateral coordinate) must give
    the keys back after the average; one that interpolates (flip-equivariant) must give the
    unflipped restoration. In decimate mode the s - 1 slices past the last LR slice have no
    mirror and keep the unflipped copies only."""
    from d2r_dask.data.degrade import upsample_axis
    from d2r_dask.io.geometry import hr_to_lr_coord, mirror_reach

    n = 5
    reach = mirror_reach(n, S, mode)
    j = np.arange(n * S)
    mirrored = j[:reach + 1]
    np.testing.assert_allclose(hr_to_lr_coord(reach - mirrored, S, mode), n - 1 - hr_to_lr_coord(mirrored, S, mode))
    assert reach == ((n - 1) * S if mode == "decimate" else n * S - 1)

    slices = np.random.default_rng(0).random((3, n, 11), dtype=np.float32)
    keys = (np.arange(40, 40 + n * S)[None, :, None], np.arange(3)[:, None, None], np.arange(7, 18)[None, None, :])
    model = restorer_checkpoint(tmp_path / "r", mode=mode)
    plain = RestorerProcessor(str(model), "cpu")
    both = RestorerProcessor(str(model), "cpu", flips=("lateral", "z"))
    streams: list[int] = []

    def key_writer(self: RestorerProcessor, x: np.ndarray, k: tuple, stream: int) -> np.ndarray:
        streams.append(stream)
        return np.broadcast_to(k[0] * 1000.0 + k[2], (len(x), x.shape[1] * S, x.shape[2])).astype(np.float32)

    monkeypatch.setattr(RestorerProcessor, "_restore", key_writer)
    np.testing.assert_array_equal(both.restore_slices(slices, keys, 1), plain.restore_slices(slices, keys, 1))
    assert streams == [1, 3, 5, 7, 1]  # each copy draws its own noise; no flips: the stream of before

    def interpolate(self: RestorerProcessor, x: np.ndarray, k: tuple, stream: int) -> np.ndarray:
        return upsample_axis(x, S, axis=1, mode=mode, method="cubic")

    monkeypatch.setattr(RestorerProcessor, "_restore", interpolate)
    np.testing.assert_allclose(both.restore_slices(slices, keys, 0), plain.restore_slices(slices, keys, 0), atol=1e-6)
    z_only = RestorerProcessor(str(model), "cpu", flips=["z"])
    assert z_only.flips == ("z",)


def test_stage2_flips_through_the_engine(stage2: dict[str, Any], tmp_path: Path) -> None:
    """``flips`` reaches the processor through ``restore``: a network that is not
    flip-equivariant gives another pseudo-HR, stored like the plain one and, its noise keyed by
    global voxels, the same whatever the input's chunking."""
    from d2r_dask.errors import InputError

    out = open_volume(restore(stage2["a"], tmp_path / "flip_a.zarr", stage2["model"], flips=("z", "lateral"),
                              **RESTORE)).values
    assert out.shape == stage2["ref"].shape and out.dtype == stage2["ref"].dtype
    assert not np.array_equal(out, stage2["ref"])
    again = restore(stage2["b"], tmp_path / "flip_b.zarr", stage2["model"], flips=("lateral", "z"), **RESTORE)
    np.testing.assert_array_equal(open_volume(again).values, out)
    with pytest.raises(InputError, match="distinct values out of z, lateral"):
        restore(stage2["a"], tmp_path / "bad.zarr", stage2["model"], flips=("x",), **RESTORE)
    assert not (tmp_path / "bad.zarr").exists()


def test_stage2_restorer_runs_only_in_slices_mode(stage2: dict[str, Any], tmp_path: Path) -> None:
    from d2r_dask.blockwise.processors import ModelSpec
    from d2r_dask.blockwise.scheduler import run_blockwise
    from d2r_dask.errors import InputError

    with pytest.raises(InputError, match="makes its output from slices; run it with stitch='slices'"):
        run_blockwise(stage2["a"], tmp_path / "blend.zarr", ModelSpec("restorer", str(stage2["model"])),
                      block=(4, 16, 16), halo=(1, 4, 4), scale=(S, 1, 1), stitch="blend", serial=True, progress=False)
    assert not (tmp_path / "blend.zarr").exists()  # refused before anything was created


def test_stage2_tiles_have_a_halo_only_between_tiles() -> None:
    one = stage2_layout((16, 96, 96), factor=S)  # the default block holds it: one tile, no halo
    assert one.block == (16, 96, 96) and one.halo == (0, 0, 0) and one.stitch == "slices"
    work = stage2_work(one, nfe=3)
    assert work["pixel_evaluations"] == work["useful_pixel_evaluations"] == 3 * 2 * 96 * 16 * S * 96
    roi = Box((0, 10, 0), (20, 70, 50))
    cut = stage2_layout((40, 100, 60), roi, block=(32, 32, 64), halo=(4, 8, 8), factor=S)
    assert cut.block == (20, 32, 50) and cut.halo == (0, 8, 0) and cut.grid == (1, 2, 1)
    # the plan's closed form against the owned slices of every block
    xz = yz = 0
    for index, _ in cut.blocks():
        owned, read = cut.owned(index), cut.read_box(index)
        xz += (owned.stop[1] - owned.start[1]) * read.shape[0] * S * read.shape[2]
        yz += (owned.stop[2] - owned.start[2]) * read.shape[0] * S * read.shape[1]
    both = stage2_work(cut)
    assert both["pixel_evaluations"] == xz + yz and stage2_work(cut, ("yz",))["pixel_evaluations"] == yz
    assert xz == 60 * 20 * S * 50  # no halo across XZ planes: each XZ slice exactly once
    assert both["useful_pixel_evaluations"] == 2 * 20 * S * 60 * 50


def test_stage4_resumes_after_a_kill_while_writing_the_pyramid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               dgean_models: dict[str, Path]) -> None:
    import zarr

    from d2r_dask.blockwise import scheduler

    data = (synth_array((2, 64, 64), seed=14) / 255.0).astype(np.float32)
    lr = write(tmp_path / "lr.zarr", data, (40.0, 5.0, 5.0), chunks=(2, 32, 32))
    kw: dict[str, Any] = {"block": (2, 64, 64), "serial": True, "progress": False, "levels": 2}
    real_pyramid = scheduler.build_pyramid

    def killed_mid_pyramid(job: Any, *_: Any) -> None:  # level 1 created, then the process dies
        zarr.open_group(job.output, mode="r+").create_array("1", shape=(8, 32, 32), chunks=(8, 32, 32),
                                                           dtype="float32")
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(scheduler, "build_pyramid", killed_mid_pyramid)
    with pytest.raises(KeyboardInterrupt):
        infer(lr, tmp_path / "sr.zarr", dgean_models["decimate"], **kw)
    monkeypatch.setattr(scheduler, "build_pyramid", real_pyramid)
    out = infer(lr, tmp_path / "sr.zarr", dgean_models["decimate"], **kw)
    assert open_volume(out).shape == (8, 64, 64)
