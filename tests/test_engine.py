"""Blockwise engine: reflection, partition of unity, crop == whole volume, blend seams on real
data, chunk-exact writes, resume after crashes and kill -9, and a real LocalCluster with a
killed worker.

Most equality tests run the engine's serial mode (the same task code, in this process);
the tests that are about distribution share one module-scoped two-process LocalCluster.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import dask.array as da
import numpy as np
import pytest

from d2r_dask.blockwise import jobstate, runtime, scheduler
from d2r_dask.blockwise.layout import Layout, read_reflected, reflect_index
from d2r_dask.blockwise.overlap import lazy_blockwise
from d2r_dask.blockwise.runtime import worker_stats
from d2r_dask.blockwise.scheduler import run_blockwise
from d2r_dask.blockwise.stitching import apply_whole, blend_weights
from d2r_dask.errors import IncompleteVolumeError, InputError, ResumeMismatchError
from d2r_dask.io.geometry import Box, Geometry
from d2r_dask.blockwise.processors import ModelSpec, load_processor
from d2r_dask.evaluation.seams import seam_ratio
from d2r_dask.io.volume import open_reader, open_volume, output_array, write_volume

from d2r_testkit import kill_after, slowed_engine_script

RF = (2, 2, 2)  # receptive field of the default conv3d test model (depth 2, kernel 3)
SHAPE = (11, 13, 17)  # primes: no block shape below divides it


def conv(scale_z: int = 1, **options: Any) -> ModelSpec:
    return ModelSpec("conv3d", options={"scale_z": scale_z, **options})


def whole(spec: ModelSpec, data: np.ndarray, halo: tuple[int, int, int] = RF) -> np.ndarray:
    return apply_whole(load_processor(spec), data, halo)


def result(path: Path) -> np.ndarray:
    return open_volume(path).values


@pytest.fixture
def volume(write_random_volume: Callable[..., tuple[Path, np.ndarray]]) -> tuple[Path, np.ndarray]:
    """An 11 x 13 x 17 float32 volume in [0, 1) (intensities as models see them), stored in
    chunks that match no block shape below. Float32 has ~1e-7 relative precision, so the 1e-5
    agreement asked of blockwise and whole-volume results is ~100 ulp at this scale."""
    return write_random_volume("in.zarr", shape=SHAPE, dtype=np.float32, chunks=(4, 6, 5),
                               voxel_size=(30.0, 4.0, 5.0), translation=(100.0, 20.0, -10.0))


# --- pure functions ---------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_reflect_index_matches_np_pad(n: int) -> None:
    pad = 3 * n + 1  # several reflections deep
    expected = np.pad(np.arange(n), pad, mode="reflect")
    np.testing.assert_array_equal(reflect_index(np.arange(-pad, n + pad), n), expected)


def test_reflect_index_single_voxel() -> None:
    np.testing.assert_array_equal(reflect_index(np.arange(-3, 4), 1), np.zeros(7, dtype=int))


def test_read_reflected_equals_padded_volume(rng: np.random.Generator) -> None:
    data = rng.random((5, 6, 7))
    pad = 9
    padded = np.pad(data, pad, mode="reflect")
    reads: list[tuple[slice, ...]] = []

    def read(sl: tuple[slice, ...]) -> np.ndarray:
        reads.append(sl)
        return data[sl]

    for box in [Box((-4, 2, -9), (3, 13, 1)), Box((1, 1, 1), (4, 5, 6)), Box((-9, -9, -9), (14, 15, 16))]:
        got = read_reflected(read, data.shape, box)
        np.testing.assert_array_equal(got, padded[box.shift((-pad,) * 3).slices])
    # only the bounding box of the needed voxels is read
    assert reads[1] == (slice(1, 4), slice(1, 5), slice(1, 6))


@pytest.mark.parametrize(
    ("shape", "block", "halo", "scale"),
    [
        ((20, 20, 20), (5, 5, 5), (2, 2, 2), (1, 1, 1)),  # dividing
        ((23, 17, 9), (6, 8, 4), (3, 2, 2), (1, 1, 1)),  # last blocks partial
        ((21, 13, 10), (10, 6, 5), (4, 3, 1), (3, 1, 2)),  # last block shorter than the halo; scaled
        ((7, 9, 5), (8, 9, 6), (4, 4, 3), (2, 1, 1)),  # one block larger than the volume
        ((12, 12, 12), (4, 4, 4), (0, 2, 0), (1, 1, 1)),  # no overlap along two axes
    ],
)
@pytest.mark.parametrize("slice_axis", [None, 0, 1, 2])
def test_blend_weights_partition_of_unity(shape: tuple, block: tuple, halo: tuple, scale: tuple,
                                          slice_axis: int | None) -> None:
    """Also for the parts of ``slices`` mode: 1 on the owned slices along their axis, blended along the others."""
    layout = Layout(roi=Box((0, 0, 0), shape), block=block, halo=halo, scale=scale,
                    stitch="blend" if slice_axis is None else "slices")
    hs = np.multiply(halo, scale)
    canvas = np.zeros(tuple(np.add(layout.out_shape, 2 * hs) + np.asarray(layout.out_block)), dtype=np.float64)
    for index, _ in layout.blocks():
        w = blend_weights(layout, index, slice_axis)
        if slice_axis is not None:  # only the slices the block owns, each with its full 2D blend weight
            owned = layout.owned(index).scale(scale)
            along = np.moveaxis(w, slice_axis, 0)
            kept = np.zeros(w.shape[slice_axis], bool)
            kept[owned.start[slice_axis]:owned.stop[slice_axis]] = True
            assert not along[~kept].any()
        assert w.shape == tuple(np.add(layout.out_block, 2 * hs))
        assert w.min() >= 0 and w.max() <= 1
        start = np.multiply(index, layout.out_block)  # tile starts at start - halo, canvas offset + halo
        canvas[tuple(slice(a, a + n) for a, n in zip(start, w.shape))] += w
    inside = canvas[tuple(slice(h, h + n) for h, n in zip(hs, layout.out_shape))]
    np.testing.assert_allclose(inside, 1.0, atol=1e-6)
    assert canvas.sum() == pytest.approx(inside.sum(), abs=1e-3)  # no weight outside the volume


def test_layout_validation() -> None:
    roi = Box((0, 0, 0), (40, 40, 40))
    with pytest.raises(InputError, match="twice the halo"):
        Layout(roi=roi, block=(8, 8, 8), halo=(2, 5, 2), stitch="blend")
    Layout(roi=roi, block=(8, 8, 8), halo=(2, 5, 2), stitch="crop")  # crop has no such limit
    Layout(roi=Box((0, 0, 0), (8, 8, 8)), block=(8, 8, 8), halo=(5, 5, 5), stitch="blend")  # a single block
    with pytest.raises(InputError, match="unknown stitch mode 'tile'"):
        Layout(roi=roi, block=(8, 8, 8), halo=(2, 2, 2), stitch="tile")
    with pytest.raises(InputError, match="empty"):
        Layout(roi=Box((0, 0, 0), (0, 5, 5)), block=(8, 8, 8), halo=(2, 2, 2))
    with pytest.raises(InputError, match="three values"):
        Layout(roi=roi, block=(8, 8), halo=(2, 2, 2))  # type: ignore[arg-type]
    with pytest.raises(InputError, match=">= 1"):
        Layout(roi=roi, block=(8, 0, 8), halo=(2, 2, 2))
    with pytest.raises(InputError, match="group"):
        Layout(roi=roi, block=(8, 8, 8), halo=(2, 2, 2), group=0)


def test_owned_boxes_tile_the_region() -> None:
    roi = Box((1, 2, 3), (12, 15, 20))
    layout = Layout(roi=roi, block=(4, 5, 6), halo=(1, 2, 0), stitch="slices")
    seen = np.zeros(roi.shape, int)
    for index, write in layout.blocks():
        owned = layout.owned(index)
        read = layout.read_box(index)
        assert owned.start == (1, 2, 0) and all(b <= r for b, r in zip(owned.stop, read.shape))
        seen[owned.shift(tuple(-a for a in read.start)).slices] += 1  # back to ROI-relative coordinates
        assert owned.shift(tuple(-a for a in read.start)) == write  # scale 1: what it writes
    assert (seen == 1).all()


def test_slices_mode_needs_a_slice_model(tmp_path: Path, volume: tuple[Path, np.ndarray]) -> None:
    path, _ = volume
    with pytest.raises(InputError, match="does not make its output from slices"):
        run_blockwise(path, tmp_path / "s.zarr", conv(), block=(6, 7, 9), halo=(2, 2, 2), stitch="slices",
                      serial=True, progress=False)


def test_layout_groups_cover_blocks_in_order() -> None:
    layout = Layout(roi=Box((0, 0, 0), SHAPE), block=(4, 5, 6), halo=(0, 0, 0), group=5)
    flat = [i for g in range(layout.n_groups) for i in layout.group_blocks(g)]
    assert flat == [index for index, _ in layout.blocks()]
    assert sum(layout.group_size(g) for g in range(layout.n_groups)) == layout.n_blocks == 27
    assert layout.group_size(layout.n_groups - 1) == 2


def test_planning_a_huge_job_is_lazy(tmp_path: Path) -> None:
    """10^6 blocks: no list of blocks is built; tasks are numbered and expanded on demand."""
    layout = Layout(roi=Box((0, 0, 0), (400, 400, 400)), block=(4, 4, 4), halo=(1, 1, 1), group=7)
    t0 = time.perf_counter()
    assert layout.n_blocks == 10**6 and layout.n_groups == -(-(10**6) // 7)
    assert layout.group_blocks(layout.n_groups - 1) == [(99, 99, 99)]
    assert layout.group_blocks(15) == [(0, 1, i) for i in range(5, 12)]
    job = jobstate.Job("src", str(tmp_path / "o.zarr"), ModelSpec("noop"), layout, "uint8")
    (job.state_dir / "done").mkdir(parents=True)
    for gid in (3, 5, 99):
        job.marker("write", gid).touch()
    (job.state_dir / "done" / "tiles-4").touch()
    assert jobstate.done_groups(job, "write") == {3, 5, 99}
    assert time.perf_counter() - t0 < 1.0


def test_seam_ratio_detects_steps(rng: np.random.Generator) -> None:
    a = rng.random((20, 24, 30))
    assert all(abs(r - 1) < 0.1 for r in seam_ratio(a, (5, 6, 10)))
    b = a.copy()
    b[:, 12:] += 1.0  # a step at one of the three y boundaries (6, 12, 18)
    rz, ry, rx = seam_ratio(b, (5, 6, 10))
    assert ry > 1.5 and abs(rz - 1) < 0.1 and abs(rx - 1) < 0.1
    assert np.isnan(seam_ratio(a, (20, 6, 10))[0])  # no boundary along z


# --- crop mode equals whole-volume inference ----------------------------------------------


@pytest.mark.parametrize("scale_z", [1, 3])
@pytest.mark.parametrize(("block", "halo"), [((4, 5, 6), RF), ((7, 13, 9), (3, 2, 4)), ((30, 40, 50), RF)])
def test_crop_equals_whole_volume(tmp_path: Path, volume: tuple[Path, np.ndarray], block: tuple, halo: tuple,
                                  scale_z: int) -> None:
    path, data = volume
    spec = conv(scale_z)
    out = run_blockwise(path, tmp_path / "out.zarr", spec, block=block, halo=halo, scale=(scale_z, 1, 1),
                        out_dtype="float32", serial=True, progress=False, group=2)
    got = result(out)
    expected = whole(spec, data, halo)
    assert got.shape == (SHAPE[0] * scale_z,) + SHAPE[1:]
    assert np.abs(got - expected).max() <= 1e-5


@pytest.mark.parametrize("scale_z", [1, 3])
def test_crop_roi_uses_real_context(tmp_path: Path, volume: tuple[Path, np.ndarray], scale_z: int) -> None:
    """Inside the volume an ROI's halo is real data, reflection happens only at the volume's
    edges: the result is the whole-volume result cropped to the ROI, not the ROI run alone."""
    path, data = volume
    spec = conv(scale_z)
    roi = Box((2, 3, 0), (9, 13, 12))  # touches the y-end and x-start of the volume, not z
    out = run_blockwise(path, tmp_path / "roi.zarr", spec, block=(3, 4, 5), halo=RF, scale=(scale_z, 1, 1),
                        roi=roi, out_dtype="float32", serial=True, progress=False)
    got = result(out)
    expected = whole(spec, data)[roi.scale((scale_z, 1, 1)).slices]
    assert np.abs(got - expected).max() <= 1e-5
    # the ROI alone, reflected at its own edges, differs: the context was really read
    assert np.abs(got - whole(spec, data[roi.slices])).max() > 1e-2

    vol = open_volume(out)
    assert vol.attrs["voxel_size"] == pytest.approx((30.0 / scale_z, 4.0, 5.0))
    assert vol.attrs["translation"] == pytest.approx((100.0 + 2 * 30.0, 20.0 + 3 * 4.0, -10.0))


class _ChunkSpy:
    """Wraps the output array; records which chunks each write covers and checks alignment."""

    def __init__(self, arr: Any, counts: dict[tuple[int, ...], int]) -> None:
        self.arr, self.counts = arr, counts

    def __setitem__(self, sel: tuple[slice, ...], value: np.ndarray) -> None:
        for s, c, n in zip(sel, self.arr.chunks, self.arr.shape):
            assert s.start % c == 0 and (s.stop % c == 0 or s.stop == n), f"write {sel} not chunk-aligned"
        for chunk in np.ndindex(*(-(-(s.stop - s.start) // c) for s, c in zip(sel, self.arr.chunks))):
            key = tuple(s.start // c + i for s, c, i in zip(sel, self.arr.chunks, chunk))
            self.counts[key] = self.counts.get(key, 0) + 1
        self.arr[sel] = value

    def __getattr__(self, name: str) -> Any:
        return getattr(self.arr, name)


@pytest.mark.parametrize(("stitch", "group"), [("crop", 1), ("crop", 4), ("blend", 3)])
def test_every_output_chunk_written_once(tmp_path: Path, volume: tuple[Path, np.ndarray],
                                         monkeypatch: pytest.MonkeyPatch, stitch: str, group: int) -> None:
    path, _ = volume
    counts: dict[tuple[int, ...], int] = {}
    monkeypatch.setattr(runtime, "output_array", lambda p: _ChunkSpy(output_array(p), counts))
    block, scale = (4, 5, 6), (3, 1, 1)
    out = run_blockwise(path, tmp_path / "o.zarr", conv(3), block=block, halo=RF, scale=scale, stitch=stitch,
                        group=group, context=RF if stitch == "blend" else (0, 0, 0), serial=True, progress=False)
    arr = output_array(out)
    assert arr.chunks == (12, 5, 6)  # output chunk == output block: one task owns each chunk
    grid = tuple(-(-n // c) for n, c in zip(arr.shape, arr.chunks))
    assert sorted(counts) == sorted(np.ndindex(*grid))
    assert set(counts.values()) == {1}


def test_blend_equals_whole_volume_for_agreeing_tiles(tmp_path: Path, volume: tuple[Path, np.ndarray]) -> None:
    """With a translation-invariant model all tiles agree, so the partition of unity must
    reproduce the whole-volume result: checks the tile/merge arithmetic, edges included."""
    path, data = volume
    spec = conv(3)
    roi = Box((1, 0, 2), (11, 13, 16))
    out = run_blockwise(path, tmp_path / "b.zarr", spec, block=(4, 6, 5), halo=(2, 3, 2), context=RF,
                        scale=(3, 1, 1), stitch="blend", roi=roi, out_dtype="float32", serial=True,
                        progress=False, group=2)
    expected = whole(spec, data)[roi.scale((3, 1, 1)).slices]
    assert np.abs(result(out) - expected).max() <= 1e-4
    assert not (out / ".d2r" / "tiles").exists()  # scratch removed once finished


# --- seams on real data -------------------------------------------------------------------


@pytest.mark.realdata
def test_blend_hides_seams_on_real_data(tmp_path: Path, shared_data: Callable[[str], Path]) -> None:
    import tifffile

    gt = tifffile.imread(shared_data("fib25_sample1_10nm.tif"))[100:148, 60:156, 80:176]
    src = write_volume(tmp_path / "fib.zarr", gt, Geometry((10.0, 10.0, 10.0)), chunks=(16, 48, 48))
    spec = ModelSpec("tile-variant")  # output depends on the position inside the tile
    block = (16, 24, 24)
    kw: dict[str, Any] = dict(block=block, out_dtype="float32", serial=True, progress=False, group=4)
    crop = run_blockwise(src, tmp_path / "crop.zarr", spec, halo=RF, stitch="crop", **kw)
    blend = run_blockwise(src, tmp_path / "blend.zarr", spec, halo=(4, 4, 4), context=RF, stitch="blend", **kw)
    crop_ratio = seam_ratio(result(crop), block)
    blend_ratio = seam_ratio(result(blend), block)
    assert min(crop_ratio) > 1.3, f"the metric should see crop-mode seams: {crop_ratio}"
    assert max(blend_ratio) <= 1.05, f"blend seams visible: {blend_ratio}"


# --- errors -------------------------------------------------------------------------------


def test_single_voxel_axis_with_halo(tmp_path: Path, write_random_volume: Callable[..., Any]) -> None:
    path, _ = write_random_volume("flat.zarr", shape=(1, 20, 20), chunks=(1, 10, 10))
    with pytest.raises(InputError, match="1 voxel along z"):
        run_blockwise(path, tmp_path / "o.zarr", conv(), block=(1, 8, 8), halo=RF, serial=True, progress=False)
    assert not (tmp_path / "o.zarr").exists()
    lazy = Layout(roi=Box((0, 0, 0), (1, 20, 20)), block=(1, 8, 8), halo=RF)
    with pytest.raises(InputError, match="1 voxel along z"):  # the lazy API: the same check
        lazy_blockwise(da.zeros((1, 20, 20), dtype="f4"), conv(), lazy, out_dtype="f4")


def test_halo_smaller_than_receptive_field(tmp_path: Path, volume: tuple[Path, np.ndarray]) -> None:
    path, _ = volume
    with pytest.raises(InputError, match=r"smaller than the receptive field \(4, 4, 4\).*halo >= \(4, 4, 4\)"):
        run_blockwise(path, tmp_path / "o.zarr", conv(depth=4), block=(4, 4, 4), halo=(4, 3, 4), serial=True,
                      progress=False)
    assert not (tmp_path / "o.zarr").exists()  # checked before anything is created
    with pytest.raises(InputError, match=r"scales by \(3, 1, 1\)"):
        run_blockwise(path, tmp_path / "o.zarr", conv(3), block=(4, 4, 4), halo=RF, serial=True, progress=False)


def test_roi_outside_volume(tmp_path: Path, volume: tuple[Path, np.ndarray]) -> None:
    path, _ = volume
    with pytest.raises(InputError, match="outside the volume"):
        run_blockwise(path, tmp_path / "o.zarr", conv(), block=(4, 4, 4), halo=RF, roi=Box((0, 0, 0), (12, 5, 5)),
                      serial=True, progress=False)


# --- progress -----------------------------------------------------------------------------


def test_progress_bar_counts_blocks(tmp_path: Path, volume: tuple[Path, np.ndarray],
                                    capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = volume
    run_blockwise(path, tmp_path / "o.zarr", conv(), block=(6, 7, 9), halo=RF, serial=True)
    err = capsys.readouterr().err
    assert "8/8" in err and "block/s" in err and "<" in err  # done/total, rate, elapsed<ETA


# --- resume -------------------------------------------------------------------------------


class _Crash(Exception):
    pass


def _count_groups(monkeypatch: pytest.MonkeyPatch, crash_after: int | None = None) -> list[int]:
    """Patch ``run_group`` to record group ids (and raise after ``crash_after`` of them)."""
    seen: list[int] = []
    real = scheduler.run_group

    def spy(job: Any, phase: str, gid: int) -> int:
        if crash_after is not None and len(seen) >= crash_after:
            raise _Crash
        seen.append(gid)
        return real(job, phase, gid)

    monkeypatch.setattr(scheduler, "run_group", spy)
    return seen


def test_resume_recomputes_only_unfinished_groups(tmp_path: Path, volume: tuple[Path, np.ndarray],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = volume
    kw: dict[str, Any] = dict(block=(4, 5, 6), halo=RF, scale=(3, 1, 1), group=2, serial=True, progress=False)
    reference = result(run_blockwise(path, tmp_path / "ref.zarr", conv(3), **kw))
    out = tmp_path / "out.zarr"
    n_groups = 14  # 27 blocks in groups of 2

    with monkeypatch.context() as m:
        _count_groups(m, crash_after=9)
        with pytest.raises(_Crash):
            run_blockwise(path, out, conv(3), **kw)
    with pytest.raises(IncompleteVolumeError):
        open_volume(out)
    layout = Layout(roi=Box((0, 0, 0), SHAPE), block=(4, 5, 6), halo=RF, scale=(3, 1, 1), group=2)
    job = jobstate.Job(str(path), str(out), conv(3), layout, "float32")
    assert jobstate.done_groups(job, "write") == set(range(9))
    # lose two groups' done-state, and scribble over their chunks as a half-finished write would
    arr = output_array(out)
    bits = out / ".d2r" / "done" / "write.bits"
    flags = np.unpackbits(np.frombuffer(bits.read_bytes(), np.uint8))
    flags[[2, 7]] = 0
    bits.write_bytes(np.packbits(flags).tobytes())
    for gid in (2, 7):
        for index in layout.group_blocks(gid):
            arr[layout.write_box(index).slices] = np.nan

    seen = _count_groups(monkeypatch)
    run_blockwise(path, out, conv(3), **kw)
    assert sorted(seen) == [2, 7] + list(range(9, n_groups))
    np.testing.assert_array_equal(result(out), reference)

    seen.clear()
    run_blockwise(path, out, conv(3), **kw)  # complete: returns at once
    assert seen == []


def test_resume_refuses_a_different_job(tmp_path: Path, volume: tuple[Path, np.ndarray],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = volume
    out = tmp_path / "out.zarr"
    kw: dict[str, Any] = dict(halo=RF, serial=True, progress=False)
    with monkeypatch.context() as m:
        _count_groups(m, crash_after=2)
        with pytest.raises(_Crash):
            run_blockwise(path, out, conv(), block=(4, 5, 6), **kw)
    with pytest.raises(ResumeMismatchError, match=r"different job \(differs in: layout\).*--overwrite"):
        run_blockwise(path, out, conv(), block=(4, 5, 7), **kw)
    with pytest.raises(ResumeMismatchError, match=r"differs in: model\)"):
        run_blockwise(path, out, conv(seed=1), block=(4, 5, 6), **kw)
    # a finished job refuses too, and overwrite replaces it
    run_blockwise(path, out, conv(), block=(4, 5, 6), **kw)
    with pytest.raises(ResumeMismatchError, match=r"differs in: out_dtype\)"):
        run_blockwise(path, out, conv(), block=(4, 5, 6), out_dtype="uint16", **kw)
    run_blockwise(path, out, conv(), block=(4, 5, 7), overwrite=True, **kw)
    assert open_volume(out).shape == SHAPE


def _n_done(done: Path, phase: str) -> int:
    """Groups recorded done so far in the logs of ``phase`` (read-only, as a watcher may)."""
    if not done.is_dir():
        return 0
    return sum(p.stat().st_size // 8 for p in done.glob(f"{phase}.*.log"))


_SLOW_JOB = """
from d2r_dask.blockwise.processors import ModelSpec
scheduler.run_blockwise(sys.argv[1], sys.argv[2], ModelSpec("conv3d", options={"scale_z": 2}), block=(3, 4, 4),
                        halo=(2, 2, 2), scale=(2, 1, 1), group=1, serial=True, progress=False)
"""


@pytest.mark.slow
def test_resume_after_kill_9(tmp_path: Path, volume: tuple[Path, np.ndarray]) -> None:
    path, _ = volume
    kw: dict[str, Any] = dict(block=(3, 4, 4), halo=RF, scale=(2, 1, 1), group=1, serial=True, progress=False)
    reference = result(run_blockwise(path, tmp_path / "ref.zarr", conv(2), **kw))
    script = tmp_path / "job.py"
    script.write_text(slowed_engine_script(_SLOW_JOB, 0.05))
    out = tmp_path / "out.zarr"
    proc = subprocess.Popen([sys.executable, str(script), str(path), str(out)], stderr=subprocess.PIPE)
    done = out / ".d2r" / "done"
    kill_after(proc, lambda: _n_done(done, "write"), 10, timeout=60)
    n_done = _n_done(done, "write")
    assert 10 <= n_done < 4 * 4 * 5
    with pytest.raises(IncompleteVolumeError):
        open_volume(out)
    run_blockwise(path, out, conv(2), **kw)
    np.testing.assert_array_equal(result(out), reference)


# --- a real cluster -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      memory_limit="2GiB") as cluster, Client(cluster) as c:
        yield c


def _d2r_tasks(dask_scheduler: Any) -> int:
    return sum(str(key).startswith("d2r-") for key in dask_scheduler.tasks)


def _stats(client: Any) -> dict[str, dict[str, Any]]:
    return client.run(worker_stats)


@pytest.mark.slow
def test_distributed_equals_serial_one_load_per_worker(tmp_path: Path, volume: tuple[Path, np.ndarray],
                                                       client: Any, capsys: pytest.CaptureFixture[str]) -> None:
    path, data = volume
    spec = conv(3, seed=7)  # a spec no other test loads
    before = _stats(client)
    out = run_blockwise(path, tmp_path / "d.zarr", spec, block=(4, 5, 6), halo=RF, scale=(3, 1, 1), client=client,
                        out_dtype="float32")
    assert np.abs(result(out) - whole(spec, data)).max() <= 1e-5
    after = _stats(client)
    assert set(after) == set(before)
    for addr in after:
        assert after[addr]["loads"] - before[addr]["loads"] == 1, "each worker loads the model once per job"
        assert after[addr]["threads"] == max(1, (os.cpu_count() or 1) // 2)
    blocks = [after[a]["blocks"] - before[a]["blocks"] for a in after]
    assert sum(blocks) == 27 and min(blocks) >= 5, f"work not shared between workers: {blocks}"
    err = capsys.readouterr().err
    assert "dashboard" in err and "27/27" in err

    # blend on the cluster equals blend in serial, bit for bit
    kw: dict[str, Any] = dict(block=(4, 5, 6), halo=(2, 2, 3), context=RF, scale=(3, 1, 1), stitch="blend",
                              out_dtype="float32", progress=False)
    in_flight: list[int] = []
    stop = threading.Event()

    def sample() -> None:  # tasks the scheduler holds: bounded by the window, whatever the volume
        while not stop.is_set():
            in_flight.append(client.run_on_scheduler(_d2r_tasks))
            time.sleep(0.01)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        dist = run_blockwise(path, tmp_path / "bd.zarr", ModelSpec("tile-variant", options={"scale_z": 3}),
                             client=client, group=3, window=2, **kw)
    finally:
        stop.set()
        thread.join()
    assert len(in_flight) > 5 and max(in_flight) <= 2
    ser = run_blockwise(path, tmp_path / "bs.zarr", ModelSpec("tile-variant", options={"scale_z": 3}),
                        serial=True, group=3, **kw)
    np.testing.assert_array_equal(result(dist), result(ser))


@pytest.mark.slow
def test_killed_worker_loses_nothing(tmp_path: Path, write_random_volume: Callable[..., Any], client: Any) -> None:
    path, data = write_random_volume("big.zarr", shape=(16, 24, 32), chunks=(8, 12, 16))
    spec = conv(2)
    kw: dict[str, Any] = dict(block=(2, 4, 4), halo=RF, scale=(2, 1, 1), out_dtype="float32", group=1,
                              progress=False)
    n_blocks = 8 * 6 * 8
    out = tmp_path / "k.zarr"
    done = out / ".d2r" / "done"
    pids = list(client.run(os.getpid).values())
    killed: dict[str, Any] = {}

    def killer() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if _n_done(done, "write") >= 40:
                killed["done_at_kill"] = _n_done(done, "write")
                os.kill(pids[0], signal.SIGKILL)
                return
            time.sleep(0.01)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        run_blockwise(path, out, spec, client=client, **kw)
    except Exception as exc:  # the run may give up on a killed worker; a rerun must finish it
        killed["error"] = repr(exc)
        run_blockwise(path, out, spec, client=client, **kw)
    thread.join()
    outcome = f"the run raised {killed['error']}, a rerun finished" if "error" in killed else "the run finished"
    print(f"killed a worker after {killed.get('done_at_kill')} of {n_blocks} blocks; {outcome}")
    assert 40 <= killed.get("done_at_kill", 0) < n_blocks, f"the worker was not killed mid-run: {killed}"
    assert np.abs(result(out) - whole(spec, data)).max() <= 1e-5
    client.wait_for_workers(2, timeout=60)
    assert pids[0] not in client.run(os.getpid).values()  # the nanny replaced the killed process
    # the restarted worker got its settings too
    assert {s["threads"] for s in _stats(client).values()} == {max(1, (os.cpu_count() or 1) // 2)}


def test_open_reader_matches_open_volume(tmp_path: Path, rng: np.random.Generator) -> None:
    """The engine's eager reader selects and orders axes like :func:`open_volume`."""
    import zarr

    data = rng.integers(0, 255, (5, 1, 6, 7), dtype=np.uint8)  # stored as (x, c, z, y)
    arr = zarr.create_array(str(tmp_path / "p.zarr"), shape=data.shape, chunks=(2, 1, 4, 3), dtype="uint8",
                            dimension_names=("x", "c", "z", "y"))
    arr[:] = data
    reader = open_reader(tmp_path / "p.zarr")
    expected = open_volume(tmp_path / "p.zarr").values
    assert reader.shape == expected.shape == (6, 7, 5)
    np.testing.assert_array_equal(reader((slice(None),) * 3), expected)
    np.testing.assert_array_equal(reader((slice(1, 4), slice(2, 7), slice(0, 3))), expected[1:4, 2:7, 0:3])
