"""Nothing proportional to the chunk count on one machine: compact done-state (and the
former per-task markers), metadata fingerprints, the blockwise resumable pyramid, and
`d2r info` without listing chunks."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from d2r_dask.blockwise import jobstate, pyramid, scheduler
from d2r_dask.blockwise.layout import Layout
from d2r_dask.blockwise.processors import ModelSpec
from d2r_dask.blockwise.scheduler import run_blockwise
from d2r_dask.errors import IncompleteVolumeError
from d2r_dask.io.geometry import Box, Geometry
from d2r_dask.io.volume import describe, disk_usage, finalize_volume, metadata_digest, open_volume, write_volume

from conftest import random_volume

CONV = ModelSpec("conv3d", options={"scale_z": 2, "channels": 4})
KW: dict[str, Any] = dict(block=(2, 8, 8), halo=(2, 2, 2), scale=(2, 1, 1), out_dtype="uint8", group=1,
                          serial=True, progress=False)  # a task per block: these tests count tasks


class _Crash(Exception):
    pass


def _crash_after(monkeypatch: pytest.MonkeyPatch, name: str, n: int) -> list[tuple[str, int]]:
    """Make ``scheduler.<name>`` raise on its call number ``n + 1``; return the calls seen."""
    real = getattr(scheduler, name)
    seen: list[tuple[str, int]] = []

    def spy(job: Any, phase: str, gid: int) -> int:
        if len(seen) >= n:
            raise _Crash
        seen.append((phase, gid))
        return real(job, phase, gid)

    monkeypatch.setattr(scheduler, name, spy)
    return seen


@pytest.fixture
def source(tmp_path: Path) -> Path:
    data = random_volume((8, 40, 48), "uint8", seed=3)
    return write_volume(tmp_path / "in.zarr", data, Geometry((20.0, 5.0, 5.0)), chunks=(4, 16, 16))


def _job(out: Path, n: int = 100) -> jobstate.Job:
    layout = Layout(roi=Box((0, 0, 0), (n, 1, 1)), block=(1, 1, 1), halo=(0, 0, 0))
    return jobstate.Job("src", str(out), ModelSpec("noop"), layout, "uint8")


# --- done-state -------------------------------------------------------------------------


def test_done_state_is_compact_and_survives_torn_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    job = _job(tmp_path / "o.zarr", n=10_000)
    for gid in range(0, 10_000, 2):
        jobstate.mark_done(job, "write", gid)
    monkeypatch.setattr(jobstate, "_LOG", {str(os.getpid()): "other-process"})  # a second worker process
    jobstate.mark_done(job, "write", 9_999)
    jobstate.mark_done(job, "tiles", 3)
    done = job.state_dir / "done"
    assert len(list(done.iterdir())) == 3  # one log per process and phase, not a file per task
    with open(done / "write.other-process.log", "ab") as f:
        f.write(b"\x07\x00\x00")  # a record torn by a kill: ignored
    flags = jobstate.done_flags(job, "write", 10_000)
    assert flags.sum() == 5_001 and flags[9_999] and not flags[1] and not flags[7]
    # compacted: one bit per group, the logs of the phase gone, other phases untouched
    names = sorted(p.name for p in done.iterdir())
    assert len(names) == 2 and names[0].startswith("tiles.") and names[1] == "write.bits"
    assert (done / "write.bits").stat().st_size == 10_000 // 8
    jobstate.mark_done(job, "write", 1)
    assert jobstate.done_groups(job, "write") == set(range(0, 10_000, 2)) | {1, 9_999}
    assert jobstate.done_groups(job, "tiles") == {3}
    todo = list(jobstate.todo_groups(jobstate.done_flags(job, "write", 10_000), batch=1000))
    assert todo[:3] == [3, 5, 7] and len(todo) == 10_000 - 5_002


def test_done_block_count() -> None:
    layout = Layout(roi=Box((0, 0, 0), (1, 1, 10)), block=(1, 1, 1), halo=(0, 0, 0), group=4)  # 4 + 4 + 2
    assert jobstate.done_block_count(layout, np.array([True, False, True])) == 6
    assert jobstate.done_block_count(layout, np.array([True, True, False])) == 8


def test_resume_reads_old_per_task_markers(tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An output left by an earlier version (a done-marker file per task) resumes."""
    reference = open_volume(run_blockwise(source, tmp_path / "ref.zarr", CONV, **KW)).values
    out = tmp_path / "out.zarr"
    with monkeypatch.context() as m:
        _crash_after(m, "run_group", 7)
        with pytest.raises(_Crash):
            run_blockwise(source, out, CONV, **KW)
    done = out / ".d2r" / "done"
    # rewrite the new-format state as the former markers, as an earlier version left them
    for log in done.glob("write.*.log"):
        for gid in np.frombuffer(log.read_bytes(), "<u8"):
            (done / f"write-{gid}").touch()
        log.unlink()
    assert len(list(done.iterdir())) == 7
    seen = _crash_after(monkeypatch, "run_group", 10**6)
    run_blockwise(source, out, CONV, **KW)
    n_groups = 4 * 5 * 6
    assert sorted(g for _, g in seen) == list(range(7, n_groups))
    np.testing.assert_array_equal(open_volume(out).values, reference)
    assert not (out / ".d2r" / "done").exists()


# --- fingerprints from metadata ----------------------------------------------------------


def _old_digest(path: Path) -> str:
    """The former fingerprint: every zarr.json and .zarray that a walk of the whole store finds."""
    h = hashlib.sha256()
    for f in sorted(path.rglob("zarr.json")) + sorted(path.rglob(".zarray")):
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_metadata_digest_equals_the_former_walk_without_listing_chunks(
        tmp_path: Path, zarr_format: int, monkeypatch: pytest.MonkeyPatch) -> None:
    import zarr

    data = random_volume((9, 40, 36), "uint8", seed=2)
    image = write_volume(tmp_path / "img.zarr", data, Geometry((40.0, 5.0, 5.0)), chunks=(3, 8, 8), levels=3)
    (image / ".d2r").mkdir()
    (image / ".d2r" / "job.json").write_text("{}")
    plain = tmp_path / "plain.zarr"
    zarr.create_array(str(plain), shape=data.shape, dtype="uint8", chunks=(2, 7, 9), zarr_format=zarr_format)[:] = data
    expected = {p: _old_digest(p) for p in (image, image / "0", plain)}
    listed: list[str] = []
    real = os.scandir

    def spy(path: Any) -> Any:
        listed.append(str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", spy)
    for path, digest in expected.items():
        assert metadata_digest(path) == digest
    # groups and plain folders are listed; never an array's folder, where its chunks are
    names = sorted(str(Path(p).relative_to(tmp_path)) for p in listed)
    assert names == ["img.zarr", "img.zarr/.d2r"], names


def test_job_identity_of_an_existing_output_is_unchanged(tmp_path: Path, source: Path) -> None:
    """A job.json written by the former fingerprint still matches: runs started before resume."""
    identity = jobstate.job_identity(str(source), CONV, Layout(roi=Box((0, 0, 0), (8, 40, 48)), block=(2, 8, 8),
                                                               halo=(2, 2, 2), scale=(2, 1, 1)), "uint8")
    assert identity["input"]["metadata_sha256"] == _old_digest(source)


# --- the pyramid, blockwise and resumable ------------------------------------------------


def test_pyramid_is_blockwise_and_resumes(tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pyramid, "REGION_VOXELS", 4 * 8 * 8)  # many small regions per level
    monkeypatch.setattr(pyramid, "MIN_SIZE", 4)
    kw = {**KW, "levels": 3}
    ref = run_blockwise(source, tmp_path / "ref.zarr", CONV, **kw)
    out = tmp_path / "out.zarr"
    with monkeypatch.context() as m:  # killed in the middle of level 2
        m.setattr(scheduler, "pyramid_group", _crash_at(pyramid.pyramid_group, "pyramid-2", 2))
        with pytest.raises(_Crash):
            run_blockwise(source, out, CONV, **kw)
    with pytest.raises(IncompleteVolumeError):
        open_volume(out)
    calls: list[tuple[str, int]] = []
    monkeypatch.setattr(scheduler, "pyramid_group", _record(pyramid.pyramid_group, calls))
    monkeypatch.setattr(scheduler, "run_group", _record(scheduler.run_group, calls))
    run_blockwise(source, out, CONV, **kw)
    layout2 = pyramid.level_layout(pyramid.pyramid_plan(out, levels=3, min_size=4)[1])
    assert layout2.n_groups > 3
    assert calls == [("pyramid-2", g) for g in range(2, layout2.n_groups)]  # nothing done twice
    for level in range(3):
        np.testing.assert_array_equal(open_volume(out, level=level).values, open_volume(ref, level=level).values)
    # the same pyramid as the in-process finalize over the same base
    other = write_volume(tmp_path / "w.zarr", open_volume(out).values, Geometry.of(open_volume(out)),
                         chunks=(4, 8, 8))
    finalize_volume(other, levels=3, min_size=4)
    for level in (1, 2):
        np.testing.assert_array_equal(open_volume(other, level=level).values, open_volume(out, level=level).values)


def _crash_at(fn: Callable[..., int], phase: str, gid: int) -> Callable[..., int]:
    def wrapped(job: Any, ph: str, g: int) -> int:
        if ph == phase and g == gid:
            raise _Crash
        return fn(job, ph, g)

    return wrapped


def _record(fn: Callable[..., int], calls: list[tuple[str, int]]) -> Callable[..., int]:
    def wrapped(job: Any, ph: str, g: int) -> int:
        calls.append((ph, g))
        return fn(job, ph, g)

    return wrapped


def test_finalize_writes_regions_not_a_graph(tmp_path: Path) -> None:
    """The in-process pyramid equals the mean of 2-cells (rounded half to even) on every level."""
    data = random_volume((20, 36, 40), "uint16", seed=4)
    path = write_volume(tmp_path / "p.zarr", data, Geometry((10.0, 10.0, 10.0)), chunks=(4, 8, 8), levels=1)
    finalize_volume(path, levels=3, min_size=4)
    l1 = open_volume(path, level=1).values
    want = np.round(data[:20, :36, :40].astype(np.float32).reshape(10, 2, 18, 2, 20, 2).mean(axis=(1, 3, 5)))
    np.testing.assert_array_equal(l1, want.astype(np.uint16))


# --- d2r info without listing chunks -----------------------------------------------------


def test_info_never_lists_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli_run: Any) -> None:
    data = random_volume((16, 64, 64), "uint8", seed=6)
    path = write_volume(tmp_path / "i.zarr", data, Geometry((40.0, 5.0, 5.0)), chunks=(2, 8, 8), levels=2)
    files = [f for f in path.rglob("*") if f.is_file()]
    real_size = sum(f.stat().st_size for f in files)

    def no_walk(*a: Any, **k: Any) -> Any:
        raise AssertionError("walked the store")

    monkeypatch.setattr(Path, "rglob", no_walk)
    monkeypatch.setattr(Path, "iterdir", no_walk)
    real_scandir = os.scandir

    def scandir(p: Any) -> Any:
        assert not any(part in ("0", "1", "c") for part in Path(p).relative_to(path).parts), p
        return real_scandir(p)

    monkeypatch.setattr(os, "scandir", scandir)
    assert disk_usage(path) == {"bytes": real_size, "estimated": False, "objects": 8 * 8 * 8 + 8 * 4 * 4,
                                "looked_at": 8 * 8 * 8 + 8 * 4 * 4}
    est = disk_usage(path, exact_up_to=10, sample=64)
    assert est["estimated"] and est["looked_at"] == 128 and abs(est["bytes"] / real_size - 1) < 0.1
    d = describe(path)
    assert d["size_on_disk_bytes"] == real_size and not d["size_on_disk_estimated"]
    assert d["levels"] == [(16, 64, 64), (16, 32, 32)]
    result = cli_run("info", path)
    assert result.exit_code == 0, result.output
    assert "on disk" in result.output


@pytest.mark.slow
def test_pyramid_on_a_cluster_equals_serial(tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from distributed import Client, LocalCluster

    source = write_volume(tmp_path / "big.zarr", random_volume((8, 64, 64), "uint8", seed=8),
                          Geometry((20.0, 5.0, 5.0)), chunks=(4, 32, 32))
    kw = {**KW, "levels": 2, "serial": False, "block": (4, 16, 16)}
    serial = run_blockwise(source, tmp_path / "s.zarr", CONV, **{**kw, "serial": True})
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      memory_limit="1GiB") as cluster, Client(cluster) as client:
        dist = run_blockwise(source, tmp_path / "d.zarr", CONV, client=client, **kw)
    for level in range(2):
        np.testing.assert_array_equal(open_volume(dist, level=level).values, open_volume(serial, level=level).values)
    assert open_volume(dist, level=1).shape == (16, 32, 32)
