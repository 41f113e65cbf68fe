"""The pipelined block loop: reads, model and writes overlapped within a task, with the
serial loop's bits; errors of the reader and writer threads fail the task before its
done-marker; intensities and casts on the device with NumPy's bits."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

from d2r_dask.blockwise import jobstate, tasks
from d2r_dask.blockwise.layout import BATCH_VOXELS, MIN_TASKS, TASK_VOXELS, Layout, default_batch, default_group
from d2r_dask.blockwise.processors import ModelSpec
from d2r_dask.blockwise.runtime import RUNTIME, tune_backend
from d2r_dask.blockwise.scheduler import run_blockwise
from d2r_dask.data.intensity import Intensity
from d2r_dask.io.geometry import Box
from d2r_dask.io.volume import open_volume, to_dtype
from d2r_dask.models import intensity as device_intensity

KW: dict[str, Any] = dict(block=(3, 4, 4), halo=(2, 2, 2), scale=(2, 1, 1), serial=True, progress=False)


@pytest.fixture
def overlap() -> Callable[[bool], None]:
    """``overlap(flag)`` sets this process's pipelining for the test, restored after it."""
    before = RUNTIME.overlap

    def set_(flag: bool) -> None:
        RUNTIME.overlap = flag

    yield set_
    RUNTIME.overlap = before


def _record_threads(monkeypatch: pytest.MonkeyPatch, name: str) -> list[str]:
    """Record the thread that runs each call of ``tasks.<name>``."""
    seen: list[str] = []
    real = getattr(tasks, name)

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(tasks, name, spy)
    return seen


@pytest.mark.parametrize(("spec", "stitch", "dtype"), [
    (ModelSpec("conv3d", options={"scale_z": 2}), "crop", "uint8"),
    (ModelSpec("tile-variant", options={"scale_z": 2}), "blend", "float32"),
])
def test_pipelined_equals_serial_bit_for_bit(tmp_path: Path, write_random_volume: Callable[..., Any],
                                             monkeypatch: pytest.MonkeyPatch, overlap: Callable[[bool], None],
                                             spec: ModelSpec, stitch: str, dtype: str) -> None:
    path, _ = write_random_volume("in.zarr", shape=(9, 16, 20), chunks=(3, 8, 8))
    kw = {**KW, "stitch": stitch, "out_dtype": dtype, "group": 8, "batch": 2}
    if stitch == "blend":
        kw.update(block=(4, 4, 4), halo=(1, 1, 1), context=(2, 2, 2))
    overlap(False)
    serial = open_volume(run_blockwise(path, tmp_path / "serial.zarr", spec, **kw)).values
    overlap(True)
    reads, writes = _record_threads(monkeypatch, "read_boxes"), _record_threads(monkeypatch, "write_blocks")
    piped = open_volume(run_blockwise(path, tmp_path / "piped.zarr", spec, **kw)).values
    assert piped.dtype == serial.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(piped, serial)
    # the work really ran in the reader and writer threads, 4 batches per task
    assert reads and all(name.startswith("d2r-read") for name in reads)
    assert writes and all(name.startswith("d2r-write") for name in writes)


def test_default_group_gives_the_bits_of_one_block_per_task(tmp_path: Path, write_random_volume: Callable[..., Any]) -> None:
    path, _ = write_random_volume("in.zarr", shape=(9, 16, 20), chunks=(3, 8, 8))
    spec = ModelSpec("conv3d", options={"scale_z": 2})
    auto = run_blockwise(path, tmp_path / "auto.zarr", spec, **KW)
    one = run_blockwise(path, tmp_path / "one.zarr", spec, group=1, **KW)
    np.testing.assert_array_equal(open_volume(auto).values, open_volume(one).values)
    layout = Layout(roi=Box((0, 0, 0), (9, 16, 20)), block=(3, 4, 4), halo=(2, 2, 2))
    assert default_group(layout.shape, layout.block) == layout.n_blocks // MIN_TASKS == 7


def test_failed_write_fails_the_task_and_leaves_no_done_mark(tmp_path: Path,
                                                             write_random_volume: Callable[..., Any],
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             overlap: Callable[[bool], None]) -> None:
    path, _ = write_random_volume("in.zarr", shape=(9, 16, 20), chunks=(3, 8, 8))
    spec = ModelSpec("conv3d", options={"scale_z": 2})
    kw = {**KW, "group": 8, "batch": 2}
    reference = open_volume(run_blockwise(path, tmp_path / "ref.zarr", spec, **kw)).values
    overlap(True)
    real = tasks.write_blocks
    failed: list[str] = []

    def flaky(job: Any, items: Any) -> None:
        if any(index == (0, 1, 2) for index, _ in items):  # the 4th batch of task 0
            failed.append(threading.current_thread().name)
            raise OSError("disk full")
        real(job, items)

    monkeypatch.setattr(tasks, "write_blocks", flaky)
    out = tmp_path / "out.zarr"
    with pytest.raises(OSError, match="disk full"):
        run_blockwise(path, out, spec, **kw)
    assert failed and failed[0].startswith("d2r-write")
    layout = Layout(roi=Box((0, 0, 0), (9, 16, 20)), block=(3, 4, 4), halo=(2, 2, 2), scale=(2, 1, 1), group=8,
                    batch=2)
    assert not jobstate.done_flags(jobstate.Job(str(path), str(out), spec, layout, "uint8"), "write",
                                   layout.n_groups).any()
    monkeypatch.setattr(tasks, "write_blocks", real)
    np.testing.assert_array_equal(open_volume(run_blockwise(path, out, spec, **kw)).values, reference)


def test_pipelined_order_bounds_and_errors() -> None:
    held: list[int] = []
    peak = [0]
    lock = threading.Lock()
    written: list[int] = []

    def read(i: int) -> int:
        with lock:
            held.append(i)
            peak[0] = max(peak[0], len(held))
        time.sleep(0.002)
        return i * 10

    def write(i: int, value: int) -> None:
        time.sleep(0.005)
        written.append(value)
        with lock:
            held.remove(i)

    tasks.pipelined(list(range(12)), read, lambda i, v: v + 1, write)
    assert written == [i * 10 + 1 for i in range(12)]
    assert peak[0] <= 3  # one read ahead, this one, one write behind

    def bad_read(i: int) -> int:
        if i == 3:
            raise ValueError("unreadable chunk")
        return i

    computed: list[int] = []
    with pytest.raises(ValueError, match="unreadable chunk"):
        tasks.pipelined(list(range(8)), bad_read, lambda i, v: computed.append(i), lambda i, v: None)
    assert computed == [0, 1, 2]


def test_layout_batches_and_identity() -> None:
    roi = Box((0, 0, 0), (8, 8, 8))
    old = Layout(roi=roi, block=(2, 2, 2), halo=(0, 0, 0), group=5)
    assert old.batch == 5 and "batch" not in old.to_dict()  # jobs made before ``batch`` keep their identity
    new = Layout(roi=roi, block=(2, 2, 2), halo=(0, 0, 0), group=5, batch=2)
    assert new.to_dict()["batch"] == 2
    assert [len(b) for b in new.batches(new.group_blocks(0))] == [2, 2, 1]
    assert default_group((4096, 4096, 4096), (64, 64, 64)) == TASK_VOXELS // 64**3
    assert default_group((64, 64, 64), (64, 64, 64)) == 1
    assert default_batch((32, 64, 64), (3, 3, 3), 4) == 1  # real blocks: one per model call, overlapped
    assert default_batch((2, 4, 4), (0, 0, 0), 12500) == BATCH_VOXELS // 32  # tiny ones: a chunk decoded once
    assert default_batch((2, 4, 4), (0, 0, 0), 100) == 100


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
def test_device_intensity_and_cast_match_numpy_bits(dtype: str) -> None:
    g = np.random.default_rng(3)
    top = {"uint8": 255, "uint16": 65535, "float32": 1.0}[dtype]
    inten = Intensity(low=0.137 * top, high=0.913 * top)
    stored = (g.random((2, 5, 7, 9)) * top).astype(dtype)
    unit = inten.to_unit(stored)
    np.testing.assert_array_equal(device_intensity.to_unit(torch.from_numpy(stored), inten).numpy(), unit)
    y = (g.standard_normal(unit.shape) * 0.7 + 0.5).astype(np.float32)
    y.flat[:6] = np.array([-0.5, 0.5, 1.5, 2.5, 1e6, -1e6], np.float32) / top  # ties and far out of range
    back = inten.from_unit(y)
    np.testing.assert_array_equal(device_intensity.from_unit(torch.from_numpy(y), inten).numpy(), back)
    ties = np.concatenate([back.ravel(), np.array([0.5, 1.5, 2.5, -0.5, 254.5, 255.5, 65534.5, 7e4], np.float32)])
    cast = device_intensity.to_dtype(torch.from_numpy(ties), dtype).numpy()
    assert cast.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(cast, to_dtype(ties, dtype))


def test_dgean_device_io_equals_the_float_path(tmp_path: Path) -> None:
    from d2r_testkit import dgean_checkpoint

    from d2r_dask.stages.infer import DGEANProcessor

    proc = DGEANProcessor(str(dgean_checkpoint(tmp_path / "dgean", factor=2)), "cpu")
    assert proc.device_io
    blocks = np.random.default_rng(0).integers(0, 256, (2, 4, 10, 10), dtype=np.uint8)
    as_float = proc(blocks.astype(np.float32), [(0, 0, 0)] * 2)
    assert as_float.dtype == np.float32
    np.testing.assert_array_equal(proc(blocks, [(0, 0, 0)] * 2), as_float)
    stored = proc(blocks, [(0, 0, 0)] * 2, out_dtype="uint8")
    assert stored.dtype == np.uint8
    np.testing.assert_array_equal(stored, to_dtype(as_float, "uint8"))


def test_cudnn_benchmark_only_for_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    tune_backend("cpu")
    assert torch.backends.cudnn.benchmark is False
    tune_backend("cuda:0")  # sets the flag; needs no GPU
    assert torch.backends.cudnn.benchmark is True
