"""Runs that cannot hurt each other or their inputs: exclusive locks (a second live run is
refused naming the holder, a dead run's lock is taken over), the overwrite rule, and a
crash between writing the job identity and the first chunk that resumes."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
from click.testing import CliRunner
from d2r_testkit import dgean_checkpoint, restorer_checkpoint, synth_array, write

from d2r_dask.blockwise import jobstate, lock, scheduler
from d2r_dask.blockwise.lock import acquire, exclusive, lock_path, release
from d2r_dask.blockwise.processors import ModelSpec
from d2r_dask.blockwise.scheduler import run_blockwise
from d2r_dask.cli import cli
from d2r_dask.data.degrade import MIN_LR_SLICES
from d2r_dask.errors import IncompleteVolumeError, InputError, LockedError, OutputExistsError
from d2r_dask.io import files
from d2r_dask.io.volume import open_volume, prepare_output, written_by_d2r

HOLDER = """
import sys, time
from d2r_dask.blockwise.lock import exclusive
with exclusive(sys.argv[1], what=sys.argv[2]):
    print("held", flush=True)
    time.sleep(300)
"""


@pytest.fixture
def holder() -> Iterator[Callable[[Path, str], subprocess.Popen]]:
    """``holder(target, what)``: another process that holds ``target``'s lock until killed."""
    procs: list[subprocess.Popen] = []

    def start(target: Path, what: str = "output") -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(target), what], stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def kill_hard(proc: subprocess.Popen) -> None:
    """kill -9: the process cannot clean up, its lock file stays."""
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def conv() -> ModelSpec:
    return ModelSpec("conv3d", options={"scale_z": 2})


KW: dict[str, Any] = dict(block=(4, 6, 5), halo=(2, 2, 2), scale=(2, 1, 1), serial=True, progress=False)


@pytest.fixture
def src(tmp_path: Path) -> Path:
    data = np.random.default_rng(0).random((9, 11, 10)).astype(np.float32)
    return write(tmp_path / "in.zarr", data, chunks=(4, 6, 5))


# --- the lock ---------------------------------------------------------------------------------


def test_lock_names_its_holder_is_reentrant_and_goes_on_release(tmp_path: Path) -> None:
    target = tmp_path / "out.zarr"
    path = acquire(target)
    assert path == lock_path(target) == tmp_path / "out.zarr.d2r-lock"
    held = json.loads(path.read_text())
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname() and held["started"]
    assert acquire(target) == path  # the pipeline holds it while the engine takes it again
    release(target)
    assert path.exists()
    release(target)
    assert not path.exists()
    with exclusive(target):
        assert path.exists()
    assert not path.exists()


def test_second_live_run_is_refused_with_the_holder_named(tmp_path: Path, holder: Callable[..., Any]) -> None:
    lr = write(tmp_path / "lr.zarr", synth_array((8, 32, 32), seed=2))
    model = dgean_checkpoint(tmp_path / "dgean")
    out = tmp_path / "sr.zarr"
    proc = holder(out)
    runner = CliRunner()
    for args in (["infer", lr, out, "--model", model, "--serial"],
                 ["restore", lr, out, "--model", restorer_checkpoint(tmp_path / "restorer"), "--serial"],
                 ["run", lr, out, "-s", 4, "--serial"]):
        result = runner.invoke(cli, [str(a) for a in args])
        assert result.exit_code == 1, result.output
        line = result.output.strip().splitlines()[-1]
        assert line.startswith("Error: output") and "is in use by another d2r run" in line, line
        assert f"PID {proc.pid} on host {socket.gethostname()}" in line and "wait for it to finish" in line
    assert not out.exists() and not (tmp_path / "sr.d2r-work").exists()  # the refused runs wrote nothing
    assert not lock_path(tmp_path / "sr.d2r-work").exists()  # and released what they held
    assert json.loads(lock_path(out).read_text())["pid"] == proc.pid  # and left the holder's lock alone

    # the holder dies without cleaning up: its lock is stale and the next run takes it over
    kill_hard(proc)
    assert lock_path(out).exists()
    result = runner.invoke(cli, [str(a) for a in ["infer", lr, out, "--model", model, "--serial"]])
    assert result.exit_code == 0, result.output
    assert open_volume(out).shape == (32, 32, 32)
    assert not lock_path(out).exists()


def test_run_refuses_a_work_directory_in_use(tmp_path: Path, holder: Callable[..., Any]) -> None:
    lr = write(tmp_path / "lr.zarr", synth_array((8, 32, 32), seed=2))
    work = tmp_path / "work"
    proc = holder(work, "work directory")
    result = CliRunner().invoke(cli, [str(a) for a in ["run", lr, tmp_path / "sr.zarr", "-s", 4, "--workdir", work,
                                                       "--serial"]])
    assert result.exit_code == 1
    assert f"Error: work directory {work} is in use by another d2r run: PID {proc.pid}" in result.output
    assert not work.exists()


def test_stale_lock_is_taken_over_with_a_message(tmp_path: Path, src: Path, holder: Callable[..., Any],
                                                 caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "out.zarr"
    proc = holder(out)
    with pytest.raises(LockedError, match=f"PID {proc.pid}"):
        run_blockwise(src, out, conv(), **KW)
    kill_hard(proc)
    with caplog.at_level(logging.WARNING, logger="d2r_dask.blockwise.lock"):
        run_blockwise(src, out, conv(), **KW)
    assert f"taking over the lock of output {out}" in caplog.text and f"PID {proc.pid}" in caplog.text
    assert "no longer running" in caplog.text
    assert not lock_path(out).exists()


def test_a_reused_pid_does_not_keep_a_lock(tmp_path: Path) -> None:
    """Our own PID, recorded with another process start: the PID was reused, the holder is gone."""
    target = tmp_path / "out.zarr"
    me = lock._me()
    lock_path(target).write_text(json.dumps({**me, "process_start": "1"}))
    with exclusive(target):
        assert json.loads(lock_path(target).read_text())["process_start"] == me["process_start"]


def test_a_lock_from_another_host_is_refused_saying_what_to_delete(tmp_path: Path) -> None:
    target = tmp_path / "out.zarr"
    lock_path(target).write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "yesterday"}))
    with pytest.raises(LockedError, match=r"PID 1 on host elsewhere.*cannot check it.*delete .*out.zarr.d2r-lock"):
        acquire(target)
    lock_path(target).write_text("{half")
    with pytest.raises(LockedError, match="unreadable lock file"):
        acquire(target)


def test_no_lock_file_inside_an_input(src: Path) -> None:
    before = sorted(p.name for p in src.rglob("*"))
    with pytest.raises(InputError, match="would overwrite the input"):
        run_blockwise(src, src / "out.zarr", conv(), **KW)
    assert sorted(p.name for p in src.rglob("*")) == before


# --- overwrite removes only what d2r wrote ---------------------------------------------------


def test_overwrite_removes_only_what_d2r_wrote(tmp_path: Path, src: Path) -> None:
    for foreign in (tmp_path / "home", tmp_path / "other-tool.zarr"):
        foreign.mkdir()
    (tmp_path / "home" / ".bashrc").write_text("keep")
    (tmp_path / "other-tool.zarr" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group"}')
    for foreign in (tmp_path / "home", tmp_path / "other-tool.zarr"):
        assert not written_by_d2r(foreign)
        with pytest.raises(OutputExistsError, match="not a Zarr store or folder written by d2r"):
            prepare_output(foreign, overwrite=True)
        assert foreign.exists()
        with pytest.raises(OutputExistsError, match="will not delete it"):
            run_blockwise(src, foreign, conv(), overwrite=True, **KW)
        assert foreign.exists()
    # d2r's own outputs go: a finished engine output, and a work directory of a run
    out = run_blockwise(src, tmp_path / "out.zarr", conv(), **KW)
    assert written_by_d2r(out)
    work = tmp_path / "sr.d2r-work"
    work.mkdir()
    (work / "run.json").write_text(json.dumps({"config": {}, "stages": {}}))
    assert written_by_d2r(work)
    prepare_output(work, overwrite=True)
    assert not work.exists()
    run_blockwise(src, out, conv(), overwrite=True, **{**KW, "block": (3, 6, 5)})
    assert open_volume(out).shape == (18, 11, 10)


# --- a crash between job identity and the first chunk resumes --------------------------------


class _Crash(Exception):
    pass


def test_crash_between_job_identity_and_first_chunk_resumes(tmp_path: Path, src: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    reference = open_volume(run_blockwise(src, tmp_path / "ref.zarr", conv(), **KW)).values
    out = tmp_path / "out.zarr"

    def crash(*args: Any, **kwargs: Any) -> None:
        raise _Crash

    # 1. killed while writing job.json: only the state folder exists
    with monkeypatch.context() as m:
        m.setattr(jobstate, "write_json", crash)
        with pytest.raises(_Crash):
            run_blockwise(src, out, conv(), **KW)
    assert [p.name for p in out.iterdir()] == [".d2r"] and not (out / ".d2r" / "job.json").exists()
    # 2. killed after job.json, before the image exists
    with monkeypatch.context() as m:
        m.setattr(jobstate, "create_volume", crash)
        with pytest.raises(_Crash):
            run_blockwise(src, out, conv(), **KW)
    assert (out / ".d2r" / "job.json").exists() and not (out / "0").exists() and not (out / "zarr.json").exists()
    with pytest.raises(InputError, match="not a Zarr array or OME-Zarr image"):
        open_volume(out)
    # 3. killed after the image, before its first chunk
    with monkeypatch.context() as m:
        m.setattr(scheduler, "run_group", crash)
        with pytest.raises(_Crash):
            run_blockwise(src, out, conv(), **KW)
    assert not list((out / "0").rglob("c/*"))  # no chunk written
    with pytest.raises(IncompleteVolumeError):
        open_volume(out)
    # each rerun resumed (none asked for --overwrite); this one finishes
    run_blockwise(src, out, conv(), **KW)
    np.testing.assert_array_equal(open_volume(out).values, reference)
    assert not lock_path(out).exists()


def test_job_identity_is_written_before_the_image(tmp_path: Path, src: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    order: list[str] = []
    real_write, real_create = files.write_json, jobstate.create_volume
    monkeypatch.setattr(jobstate, "write_json", lambda *a, **k: (order.append("job.json"), real_write(*a, **k))[1])
    monkeypatch.setattr(jobstate, "create_volume", lambda *a, **k: (order.append("image"), real_create(*a, **k))[1])
    run_blockwise(src, tmp_path / "out.zarr", conv(), **KW)
    assert order == ["job.json", "image"]


def test_min_lr_slices_is_dgeans_attention_window() -> None:
    from d2r_dask.models.dgean import PRESETS, dgean_config

    assert {dgean_config(p, 4).ca_pool for p in PRESETS} == {MIN_LR_SLICES}


# --- files are closed when convert is done with them, also when it fails ---------------------


def _tracked(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[Any]:
    """Every ``module.name`` object opened from now on (their ``close`` must have run)."""
    opened: list[Any] = []
    real = getattr(module, name)

    def opening(*args: Any, **kwargs: Any) -> Any:
        handle = real(*args, **kwargs)
        opened.append(handle)
        return handle

    monkeypatch.setattr(module, name, opening)
    return opened


def test_convert_closes_tiff_and_hdf5_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import h5py
    import tifffile

    from d2r_dask.io.convert import convert

    data = np.arange(4 * 6 * 5, dtype=np.uint8).reshape(4, 6, 5)
    tifffile.imwrite(tmp_path / "v.tif", data, photometric="minisblack")
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((2, 4, 4, 3), np.uint8), photometric="rgb")
    with h5py.File(tmp_path / "v.h5", "w") as f:
        f["raw"] = data
    tiffs, h5s = _tracked(monkeypatch, tifffile, "TiffFile"), _tracked(monkeypatch, h5py, "File")
    convert(tmp_path / "v.tif", tmp_path / "a.zarr", voxel_size=(1, 1, 1))
    convert(f"{tmp_path / 'v.h5'}:raw", tmp_path / "b.zarr", voxel_size=(1, 1, 1))
    with pytest.raises(InputError, match="colour"):
        convert(tmp_path / "rgb.tif", tmp_path / "c.zarr", voxel_size=(1, 1, 1))
    with pytest.raises(InputError, match="datasets in the file: raw"):
        convert(f"{tmp_path / 'v.h5'}:nope", tmp_path / "d.zarr", voxel_size=(1, 1, 1))
    bad = np.ones((2, 3, 3), np.float32)
    bad[1, 1, 1] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", bad, photometric="minisblack")
    with pytest.raises(InputError, match="NaN"):  # a failure while reading slabs closes the file too
        convert(tmp_path / "nan.tif", tmp_path / "e.zarr", voxel_size=(1, 1, 1))
    assert len(tiffs) == 3 and len(h5s) == 2
    assert all(t.filehandle.closed for t in tiffs)
    assert not any(f.id.valid for f in h5s)  # an HDF5 file's id goes invalid when it is closed
    for name in ("a", "b"):
        np.testing.assert_array_equal(open_volume(tmp_path / f"{name}.zarr").values, data)


# --- training state: never unpickled, an older format is a clear error -------------------------


class _OldStyle:
    """What an older d2r might have pickled into train_state.pt (a Python object, not a tensor)."""


def test_training_state_of_an_older_format_is_a_clear_error(tmp_path: Path) -> None:
    import torch

    from d2r_dask.errors import CheckpointError
    from d2r_dask.models.checkpoint import TRAIN_STATE, TRAIN_STATE_FORMAT, read_train_state, save_checkpoint

    torch.save({"step": 3, "rng": _OldStyle()}, tmp_path / TRAIN_STATE)
    with pytest.raises(CheckpointError, match=r"written by an older d2r or another program: delete it to restart"):
        read_train_state(tmp_path)
    torch.save({"format": TRAIN_STATE_FORMAT + 1, "step": 3}, tmp_path / TRAIN_STATE)
    with pytest.raises(CheckpointError, match=f"format {TRAIN_STATE_FORMAT + 1}"):
        read_train_state(tmp_path)
    save_checkpoint(tmp_path / "ok", weights={"w": torch.ones(2)}, config={"kind": "dgean"},
                    train_state={"step": 5, "model": {"w": torch.ones(2)}})
    state = read_train_state(tmp_path / "ok")
    assert state["format"] == TRAIN_STATE_FORMAT and state["step"] == 5


# --- a corrupt chunk read on a worker of a real cluster ---------------------------------------


def test_corrupt_chunk_on_a_cluster_worker_is_one_clear_error(tmp_path: Path, src: Path) -> None:
    from distributed import Client, LocalCluster

    from d2r_dask.errors import ChunkReadError

    chunk = src / "0" / "c" / "1" / "1" / "0"
    chunk.write_bytes(b"not zstd at all" * 8)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        with pytest.raises(ChunkReadError, match=r"chunk \(1, 1, 0\) of array '0' of the store .*in.zarr .*re-convert"):
            run_blockwise(src, tmp_path / "out.zarr", conv(), client=client, **{**KW, "serial": False})
    assert not lock_path(tmp_path / "out.zarr").exists()


def test_demo_overwrite_deletes_only_its_own_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``d2r demo --out ~ --overwrite`` must not delete a home directory; its own folder it may."""
    from d2r_dask import demo as demo_mod
    from d2r_dask.io.volume import FOLDER_MARKER, mark_folder

    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("keep")
    with pytest.raises(OutputExistsError, match="will not delete it"):
        demo_mod.demo(home, overwrite=True, quick=True, serial=True, progress=False)
    assert (home / "notes.txt").read_text() == "keep" and not (home / FOLDER_MARKER).exists()
    own = mark_folder(tmp_path / "marked", "demo")
    (own / "lr.zarr").mkdir()
    assert written_by_d2r(own)
    prepare_output(own, overwrite=True)
    assert not own.exists()
    # the demo marks a folder it creates, and --overwrite then replaces it
    from d2r_dask.stages import pipeline

    def stop(*args: Any, **kwargs: Any) -> None:
        raise _Crash

    monkeypatch.setattr(pipeline, "run", stop)
    fresh = tmp_path / "d2r-demo"
    with pytest.raises(_Crash):
        demo_mod.demo(fresh, quick=True, serial=True, progress=False)
    assert (fresh / FOLDER_MARKER).is_file() and (fresh / "lr.zarr").is_dir()
    (fresh / "stale.txt").write_text("from the earlier demo")
    with pytest.raises(_Crash):
        demo_mod.demo(fresh, quick=True, serial=True, progress=False, overwrite=True)
    assert not (fresh / "stale.txt").exists() and (fresh / FOLDER_MARKER).is_file()


@pytest.mark.parametrize("damage", ["empty", "truncated", "random"])
def test_damaged_chunk_is_named_never_zeros(tmp_path: Path, damage: str) -> None:
    """Whichever way a chunk is damaged, and however it is read (a Dask slab, a fancy z-pick,
    the engine's eager reader), the read fails naming that chunk and its file."""
    from d2r_dask.errors import ChunkReadError
    from d2r_dask.io.volume import open_reader

    path = write(tmp_path / "v.zarr", np.full((8, 8, 12), 7, np.uint8), chunks=(4, 8, 6))
    chunk = path / "0" / "c" / "1" / "0" / "1"
    data = chunk.read_bytes()
    chunk.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "random": os.urandom(len(data))}[damage])
    vol = open_volume(path)
    assert int(vol[:4].values.min()) == 7  # the intact chunks still read
    match = r"chunk \(1, 0, 1\) of array '0' of the store .*v.zarr cannot be read \(file .*v.zarr/0/c/1/0/1;"
    for read in (lambda: vol.values, lambda: vol.data[[0, 5]].compute(),
                 lambda: open_reader(path)((slice(2, 8), slice(0, 8), slice(0, 12)))):
        with pytest.raises(ChunkReadError, match=match + ".*re-convert it from the source"):
            read()
