"""The lazy API (d2r_dask.lazy) against the batch engine, on real Zarr stores.

``super_resolve`` must equal ``d2r infer`` and ``restore_slices`` must equal ``d2r restore``
bit for bit, whatever the input's chunking (chunks smaller and larger than the block), at
the volume's edges and around a region; a default ``distributed.Client`` is used without
being passed; a graph too large for the lazy path is refused naming the batch command; and
slicing the result runs only the blocks under the slice. Models are tiny and random.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import dask
import numpy as np
import pytest
from d2r_testkit import ORIGIN, S, VOXEL, dgean_checkpoint, restorer_checkpoint, synth_array, write
from d2r_testkit import one_torch_thread  # noqa: F401  (autouse)

import d2r_dask as d2r
from d2r_dask.blockwise.runtime import RUNTIME, worker_stats
from d2r_dask.errors import CheckpointError, InputError
from d2r_dask.io.geometry import Box
from d2r_dask.io.geometry import grid_shape
from d2r_dask.io.volume import d2r_metadata, open_volume
from d2r_dask.stages.infer import infer
from d2r_dask.stages.restore import restore

ENGINE = {"serial": True, "progress": False, "levels": 1}


@pytest.fixture(scope="module")
def stage4(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A float32 LR volume (so no rounding hides a difference) stored in chunks smaller than
    every block below, and a random DGEAN whose receptive field (12) exceeds the volume's depth."""
    base = tmp_path_factory.mktemp("lazy4")
    data = (synth_array((5, 14, 18), seed=11) / 255.0).astype(np.float32)
    lr = write(base / "lr.zarr", data, VOXEL, ORIGIN, chunks=(2, 5, 7))
    model = dgean_checkpoint(base / "dgean", intensity=(0.0, 1.0), seed=3)
    return {"base": base, "lr": lr, "data": data, "model": model, "refs": {}}


def engine_sr(stage4: dict[str, Any], block: tuple[int, int, int], roi: Box | None = None) -> Any:
    key = (block, roi)
    if key not in stage4["refs"]:
        out = stage4["base"] / f"sr-{len(stage4['refs'])}.zarr"
        stage4["refs"][key] = open_volume(infer(stage4["lr"], out, stage4["model"], block=block, roi=roi, **ENGINE))
    return stage4["refs"][key]


def assert_same_volume(lazy: Any, ref: Any) -> None:
    """Same values (bit for bit), dtype, coordinates and geometry."""
    values = lazy.values
    assert values.dtype == ref.dtype and values.shape == ref.shape
    np.testing.assert_array_equal(values, ref.values)
    for ax in ("z", "y", "x"):
        np.testing.assert_allclose(lazy[ax].values, ref[ax].values)
    np.testing.assert_allclose(lazy.attrs["voxel_size"], ref.attrs["voxel_size"])
    # (a slice keeps the attributes of what it was cut from; its coordinates say where it is)
    np.testing.assert_allclose(lazy.attrs["translation"], [ref[ax].values[0] for ax in ("z", "y", "x")])


# --- Stage IV -------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", [(3, 8, 11), (2, 14, 5)])
@pytest.mark.parametrize("chunks", ["stored", "one chunk"])
def test_super_resolve_equals_infer_bit_for_bit(stage4: dict[str, Any], block: tuple[int, int, int],
                                                chunks: str) -> None:
    lr = d2r.open_volume(stage4["lr"])  # Dask chunks (2, 5, 7): smaller than the blocks
    if chunks == "one chunk":
        lr = lr.chunk({"z": -1, "y": -1, "x": -1})  # larger than the blocks
    sr = d2r.super_resolve(lr, d2r.load_model(stage4["model"]), block=block)
    assert sr.dims == ("z", "y", "x") and sr.shape == (5 * S, 14, 18)
    assert sr.chunks is not None and sr.data.chunks[0][0] % S == 0  # output chunks are whole blocks x s
    assert_same_volume(sr, engine_sr(stage4, block))
    assert sr.attrs["d2r"]["stage"].startswith("IV")


def test_super_resolve_region_numpy_and_sliced_input(stage4: dict[str, Any]) -> None:
    model = d2r.load_model(stage4["model"])
    roi = Box((1, 2, 3), (4, 12, 15))
    ref = engine_sr(stage4, (2, 6, 7), roi)
    # a region reads real context around it, exactly as `d2r infer --roi`
    assert_same_volume(d2r.super_resolve(d2r.open_volume(stage4["lr"]), model, block=(2, 6, 7), roi=roi), ref)
    # a NumPy array needs its voxel size; with it (and its origin) it is the same job
    with pytest.raises(InputError, match="voxel_size"):
        d2r.super_resolve(stage4["data"], model)
    whole = engine_sr(stage4, (3, 8, 11))
    sr = d2r.super_resolve(stage4["data"], model, block=(3, 8, 11), voxel_size=VOXEL, translation=ORIGIN)
    assert_same_volume(sr, whole)
    # a slice of an opened volume keeps its place: its SR lands where the whole one has those slices
    part = d2r.super_resolve(d2r.open_volume(stage4["lr"])[2:5], model, block=(3, 8, 11))
    np.testing.assert_allclose(part["z"].values, whole["z"].values[2 * S:])
    np.testing.assert_allclose(part.attrs["translation"], [whole["z"].values[2 * S], ORIGIN[1], ORIGIN[2]])


def test_slicing_runs_only_the_blocks_it_needs(tmp_path: Path) -> None:
    data = (synth_array((5, 36, 36), seed=2) / 255.0).astype(np.float32)
    lr = d2r.open_volume(write(tmp_path / "lr.zarr", data, VOXEL, chunks=(5, 9, 9)))
    sr = d2r.super_resolve(lr, dgean_checkpoint(tmp_path / "m", intensity=(0.0, 1.0)), block=(5, 12, 12))
    assert sr.data.numblocks == (1, 3, 3)  # halo 12 = block: one block per chunk, 9 in all
    before = RUNTIME.blocks
    corner = sr[:, :12, 24:].compute(scheduler="sync")
    assert RUNTIME.blocks - before == 1
    before = RUNTIME.blocks
    row = sr.isel(y=slice(14, 20)).compute(scheduler="sync")
    assert RUNTIME.blocks - before == 3
    np.testing.assert_array_equal(sr.values[:, :12, 24:], corner.values)
    np.testing.assert_array_equal(sr.values[:, 14:20], row.values)


def test_graph_size_refusal_names_the_batch_command(stage4: dict[str, Any], tmp_path: Path) -> None:
    lr = d2r.open_volume(stage4["lr"])
    with pytest.raises(InputError, match=r"d2r infer") as err:
        d2r.super_resolve(lr, stage4["model"], block=(1, 2, 2), max_blocks=100)
    assert "max_blocks=100" in str(err.value) and "315 blocks" in str(err.value)
    restorer = restorer_checkpoint(tmp_path / "r")
    with pytest.raises(InputError, match=r"d2r restore"):
        d2r.restore_slices(lr, restorer, block=(1, 4, 4), halo=(0, 1, 1), max_blocks=10)
    # the default bound is stated and generous enough for a region one looks at
    assert d2r.lazy.MAX_BLOCKS >= 1000


def test_model_handles_are_small_and_checked(stage4: dict[str, Any], tmp_path: Path) -> None:
    handle = d2r.load_model(stage4["model"], tta=True)
    assert handle.kind == "dgean" and handle.options == {"tta": True}
    assert len(pickle.dumps(handle)) < 1024
    with pytest.raises(CheckpointError, match="not a d2r checkpoint"):
        d2r.load_model(tmp_path)
    restorer = d2r.load_model(restorer_checkpoint(tmp_path / "r"))
    with pytest.raises(InputError, match="needs a dgean model"):
        d2r.super_resolve(d2r.open_volume(stage4["lr"]), restorer)


# --- Stage II -------------------------------------------------------------------------------------


RESTORE = {"block": (4, 16, 16), "halo": (1, 4, 4)}


@pytest.fixture(scope="module")
def stage2(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("lazy2")
    data = synth_array((8, 24, 24), seed=13)
    lr = write(base / "lr.zarr", data, VOXEL, ORIGIN, chunks=(3, 7, 11))
    model = restorer_checkpoint(base / "restorer", steps=2, seed=5)
    ref = open_volume(restore(lr, base / "ph.zarr", model, **RESTORE, **ENGINE))
    return {"base": base, "lr": lr, "data": data, "model": model, "ref": ref}


@pytest.mark.parametrize("chunks", [(3, 7, 11), (8, 24, 24)])
def test_restore_slices_equals_restore_whatever_the_chunking(stage2: dict[str, Any], chunks: tuple) -> None:
    lr = d2r.open_volume(stage2["lr"]).chunk(dict(zip("zyx", chunks)))
    ph = d2r.restore_slices(lr, d2r.load_model(stage2["model"]), **RESTORE)
    assert_same_volume(ph, stage2["ref"])
    assert ph.attrs["d2r"]["stage"].startswith("II")


def test_restore_slices_one_orientation_and_a_region(stage2: dict[str, Any]) -> None:
    base, model = stage2["base"], stage2["model"]
    roi = Box((2, 4, 6), (6, 20, 22))
    ref = open_volume(restore(stage2["lr"], base / "ph_xz.zarr", model, roi=roi, orientation="xz", seed=3,
                              **RESTORE, **ENGINE))
    ph = d2r.restore_slices(d2r.open_volume(stage2["lr"]), d2r.load_model(model, seed=3), "xz", roi=roi,
                            **RESTORE)
    assert_same_volume(ph, ref)
    assert not np.array_equal(ph.values, stage2["ref"].values[2 * S:6 * S, 4:20, 6:22])  # xz alone differs


# --- writing and clients --------------------------------------------------------------------------


def test_write_volume_streams_an_ome_zarr(stage4: dict[str, Any], tmp_path: Path) -> None:
    sr = d2r.super_resolve(d2r.open_volume(stage4["lr"]), stage4["model"], block=(3, 8, 11))
    part = sr.isel(z=slice(3, 17), x=slice(2, 18))  # irregular chunks: written in regular ones
    out = d2r.write_volume(part, tmp_path / "sr.zarr", levels=2)
    back = open_volume(out)
    expected = part.compute()
    assert_same_volume(back, expected)
    assert back.attrs["ngff_version"] == "0.5" and len(back.attrs["voxel_size"]) == 3
    assert d2r_metadata(out)["stage"].startswith("IV")
    # the input is never a valid output
    with pytest.raises(InputError, match="would overwrite the input"):
        d2r.write_volume(sr, stage4["lr"], overwrite=True)
    # the path-first form still writes an array with its geometry
    again = d2r.write_volume(tmp_path / "again.zarr", expected.values, d2r.Geometry(VOXEL))
    np.testing.assert_array_equal(open_volume(again).values, expected.values)


def test_default_client_is_used_by_the_path_and_the_lazy_api(stage4: dict[str, Any], tmp_path: Path) -> None:
    from distributed import Client, LocalCluster

    block = (3, 8, 11)
    n_blocks = int(np.prod(grid_shape((5, 14, 18), block)))
    ref = engine_sr(stage4, block)
    local = RUNTIME.blocks
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      memory_limit="2GiB") as cluster, Client(cluster) as client:
        # the path API: no client=, no serial -> the notebook's client
        out = infer(stage4["lr"], tmp_path / "sr.zarr", stage4["model"], block=block, progress=False, levels=1)
        on_workers = sum(s["blocks"] for s in client.run(worker_stats).values())
        assert on_workers == n_blocks
        np.testing.assert_array_equal(open_volume(out).values, ref.values)
        # the lazy API: computing goes to the same workers, each loading the model once
        sr = d2r.super_resolve(d2r.open_volume(stage4["lr"]), stage4["model"], block=block)
        assert dask.base.get_scheduler() == client.get
        values = sr.values
        stats = client.run(worker_stats).values()
        assert sum(s["blocks"] for s in stats) == on_workers + n_blocks
        assert all(s["threads"] for s in stats)  # configured: torch threads x workers <= cores
        np.testing.assert_array_equal(values, ref.values)
    assert RUNTIME.blocks == local  # nothing ran in this process
