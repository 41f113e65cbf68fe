"""Volumes on an object store: convert, infer (on a real LocalCluster), kill -9 and resume,
degrade and evaluate, all on ``s3://`` URLs served by a local S3-compatible endpoint
(moto's server, started here, as zarr-python's own tests do). Results equal the same
commands on local paths, bit for bit; the done-state and the lock live on the store.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
from conftest import assert_cli_error, assert_cli_ok, random_volume
from d2r_testkit import ORIGIN, S, VOXEL, dgean_checkpoint, kill_after, slowed_engine_script, synth_array, write
from d2r_testkit import one_torch_thread  # noqa: F401  (autouse)

try:
    import s3fs  # noqa: F401
    from moto.server import ThreadedMotoServer
except ImportError as exc:  # the [dev] extra installs both
    pytest.skip(f"object-store tests need s3fs and moto[server] (pip install -e '.[dev]'): {exc}",
                allow_module_level=True)

from d2r_dask.blockwise import scheduler
from d2r_dask.blockwise.lock import acquire, lock_path, release
from d2r_dask.errors import ChunkReadError, IncompleteVolumeError, LockedError
from d2r_dask.io import stores
from d2r_dask.io.volume import is_complete, open_volume



def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fs() -> Any:
    import fsspec

    return fsspec.filesystem("s3", **stores.STORAGE_OPTIONS)


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    """A local S3 endpoint for this module; credentials and endpoint through the environment,
    as a user sets them (``AWS_ENDPOINT_URL`` is read by botocore, so by s3fs, in every process)."""
    import fsspec

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as m:
        for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}.items():
            m.setenv(key, value)
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
            m.delenv(key, raising=False)
        fsspec.get_filesystem_class("s3").clear_instance_cache()  # none made for another endpoint
        try:
            yield endpoint
        finally:
            fsspec.get_filesystem_class("s3").clear_instance_cache()
            server.stop()


@pytest.fixture
def bucket(s3: str) -> str:
    """A new, empty bucket: ``s3://NAME``."""
    name = f"d2r-{uuid.uuid4().hex[:12]}"
    _fs().mkdir(name)
    return f"s3://{name}"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny DGEAN checkpoint (random weights; local: models are not volumes)."""
    return dgean_checkpoint(tmp_path_factory.mktemp("s3model") / "dgean", intensity=(0.0, 255.0), seed=5)


@pytest.fixture(scope="module")
def cluster(s3: str) -> Iterator[str]:
    """A two-process LocalCluster started after the endpoint is in the environment; its address."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      memory_limit="2GiB") as c:
        yield c.scheduler_address


def _objects(url: str) -> list[str]:
    return [p.split("/", 1)[1] for p in _fs().find(url.removeprefix("s3://"))]


# --- convert, info, overwrite, errors ---------------------------------------------------------


def test_convert_and_info_on_s3(tmp_path: Path, bucket: str, cli_run: Callable[..., Any]) -> None:
    data = random_volume((9, 20, 24), np.uint16, seed=2)
    np.save(tmp_path / "stack.npy", data)
    out = f"{bucket}/lr.zarr"
    assert_cli_ok(cli_run("convert", tmp_path / "stack.npy", out, "--voxel-size", 40, 5, 5, "--chunks", 4, 8, 8))
    vol = open_volume(out)
    np.testing.assert_array_equal(vol.values, data)
    assert vol.attrs["voxel_size"] == (40.0, 5.0, 5.0) and vol.attrs["source"] == out
    assert f"{bucket.removeprefix('s3://')}/lr.zarr/zarr.json" in _fs().find(bucket.removeprefix("s3://"))

    info = cli_run("info", out, "--json")
    assert_cli_ok(info)
    d = json.loads(info.output)
    assert d["shape"] == [9, 20, 24] and d["size_on_disk_bytes"] > 0 and not d["size_on_disk_estimated"]

    # a damaged chunk on the store is one error naming its object, never zeros
    key = f"{out.removeprefix('s3://')}/0/c/1/0/2"
    good = _fs().cat(key)
    _fs().pipe(key, good[: len(good) // 2])
    with pytest.raises(ChunkReadError, match=f"chunk \\(1, 0, 2\\) .* \\(file {out}/0/c/1/0/2;"):
        open_volume(out).values
    _fs().pipe(key, good)

    # an existing output: refused, then replaced with --overwrite (d2r wrote it: it may delete it)
    assert_cli_error(cli_run("convert", tmp_path / "stack.npy", out, "--voxel-size", 40, 5, 5), "already exists")
    assert_cli_ok(cli_run("convert", tmp_path / "stack.npy", out, "--voxel-size", 30, 5, 5, "--overwrite"))
    assert open_volume(out).attrs["voxel_size"] == (30.0, 5.0, 5.0)
    # an object store's Zarr volume converts like a local one (here: back to disk)
    assert_cli_ok(cli_run("convert", out, tmp_path / "back.zarr"))
    np.testing.assert_array_equal(open_volume(tmp_path / "back.zarr").values, data)
    # foreign data on the store is never deleted, even with --overwrite
    _fs().pipe(f"{bucket.removeprefix('s3://')}/theirs.zarr/notes.txt", b"not d2r's")
    assert_cli_error(cli_run("convert", tmp_path / "stack.npy", f"{bucket}/theirs.zarr", "--voxel-size", 40, 5, 5,
                             "--overwrite"), "not a Zarr store or folder written by d2r")
    assert _fs().cat(f"{bucket.removeprefix('s3://')}/theirs.zarr/notes.txt") == b"not d2r's"


def test_clear_errors_for_urls(tmp_path: Path, bucket: str, cli_run: Callable[..., Any]) -> None:
    np.save(tmp_path / "s.npy", random_volume((4, 8, 8)))
    assert_cli_error(cli_run("convert", tmp_path / "s.npy", "ftp://host/lr.zarr", "--voxel-size", 40, 5, 5),
                     "ftp://host/lr.zarr", "unknown storage scheme 'ftp'", "s3://")
    assert_cli_error(cli_run("convert", tmp_path / "s.npy", "s3://no-such-bucket-d2r/lr.zarr",
                             "--voxel-size", 40, 5, 5), "s3://no-such-bucket-d2r", "does not exist")
    assert_cli_error(cli_run("info", f"{bucket}/nothing.zarr"), f"{bucket}/nothing.zarr", "nothing at this URL")
    assert_cli_error(cli_run("info", "s3://no-such-bucket-d2r/x.zarr"), "s3://no-such-bucket-d2r/x.zarr")
    try:
        import gcsfs  # noqa: F401
    except ImportError:  # the optional package missing: named, with the extra that installs it
        assert_cli_error(cli_run("info", "gs://bucket/lr.zarr"), "gs://bucket/lr.zarr", "gcsfs", "d2r-dask[cloud]")
    # d2r run keeps its work directory on a file system; a dry run plans for volumes on the store
    write(tmp_path / "lr.zarr", synth_array((6, 24, 24), seed=1), VOXEL)
    assert_cli_ok(cli_run("convert", tmp_path / "lr.zarr", f"{bucket}/lr.zarr"))
    assert_cli_error(cli_run("run", f"{bucket}/lr.zarr", f"{bucket}/sr.zarr", "-s", 4, "--workdir", f"{bucket}/w",
                             "--dry-run"), "must be on a local or shared file system")
    assert_cli_error(cli_run("infer", f"{bucket}/lr.zarr", f"{bucket}/sr.zarr", "--model", f"{bucket}/dgean"),
                     f"{bucket}/dgean", "--model must be on a local or shared file system")
    result = cli_run("run", f"{bucket}/lr.zarr", f"{bucket}/sr.zarr", "-s", 4, "--dry-run")
    assert_cli_ok(result)
    assert '"factor": 4' in result.output


# --- infer on a cluster, kill -9 and resume -------------------------------------------------------


def test_infer_on_s3_through_a_cluster_equals_local(tmp_path: Path, bucket: str, model: Path, cluster: str,
                                                    cli_run: Callable[..., Any]) -> None:
    data = synth_array((5, 14, 18), seed=11)
    local_lr = write(tmp_path / "lr.zarr", data, VOXEL, ORIGIN, chunks=(2, 5, 7))
    block = ("--block", 3, 7, 9)  # 8 tasks, each reading chunks of several
    assert_cli_ok(cli_run("infer", local_lr, tmp_path / "sr.zarr", "--model", model, *block, "--serial",
                          "--levels", 1))
    lr, sr = f"{bucket}/lr.zarr", f"{bucket}/sr.zarr"
    assert_cli_ok(cli_run("convert", local_lr, lr, "--chunks", 2, 5, 7))
    assert_cli_ok(cli_run("infer", lr, sr, "--model", model, *block, "--scheduler", cluster, "--levels", 1))
    assert is_complete(sr)
    result, expected = open_volume(sr), open_volume(tmp_path / "sr.zarr")
    assert result.shape == (5 * S, 14, 18)
    np.testing.assert_array_equal(result.values, expected.values)
    assert result.attrs["translation"] == expected.attrs["translation"]
    objects = _objects(bucket)
    assert "sr.zarr/.d2r/job.json" in objects  # the job identity stays beside the result
    assert not [o for o in objects if "/.d2r/done" in o or o.endswith(".d2r-lock")]  # done-state and lock gone
    job = json.loads(stores.read_bytes(f"{sr}/.d2r/job.json"))
    assert job["identity"]["input"]["path"] == lr
    # a rerun finds the finished job and does nothing
    assert_cli_ok(cli_run("infer", lr, sr, "--model", model, *block, "--serial", "--levels", 1))


_KILLED_INFER = """
from d2r_dask.cli import main
sys.argv = ["d2r", "infer"] + sys.argv[1:]
main()
"""


@pytest.mark.slow
def test_infer_killed_on_s3_resumes_where_it_stopped(tmp_path: Path, bucket: str, model: Path,
                                                     cli_run: Callable[..., Any], monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    data = synth_array((6, 18, 18), seed=7)
    local_lr = write(tmp_path / "lr.zarr", data, VOXEL, ORIGIN, chunks=(2, 6, 6))
    args = ["--model", model, "--block", 3, 6, 6, "--group", 1, "--serial", "--levels", 1]
    assert_cli_ok(cli_run("infer", local_lr, tmp_path / "sr.zarr", *args))
    lr, sr = f"{bucket}/lr.zarr", f"{bucket}/sr.zarr"
    assert_cli_ok(cli_run("convert", local_lr, lr, "--chunks", 6, 18, 18))  # one chunk: one read per task
    n_groups = 2 * 3 * 3

    script = tmp_path / "killed.py"
    script.write_text(slowed_engine_script(_KILLED_INFER, 0.1))
    done_prefix = f"{sr.removeprefix('s3://')}/.d2r/done"

    def n_done() -> int:
        return len(_fs().glob(f"{done_prefix}/write-*")) if _fs().exists(done_prefix) else 0

    proc = subprocess.Popen([sys.executable, str(script), lr, sr, *map(str, args)], stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    kill_after(proc, n_done, 4, timeout=120)
    done = n_done()
    assert 4 <= done < n_groups
    with pytest.raises(IncompleteVolumeError):
        open_volume(sr)
    assert stores.exists(lock_path(sr))  # kill -9: the lock stays, naming a process that is gone

    seen: list[int] = []
    real = scheduler.run_group
    monkeypatch.setattr(scheduler, "run_group", lambda job, phase, gid: (seen.append(gid), real(job, phase, gid))[1])
    with caplog.at_level(logging.WARNING, logger="d2r_dask.blockwise.lock"):
        assert_cli_ok(cli_run("infer", lr, sr, *args))
    assert f"taking over the lock of output {sr}" in caplog.text and f"PID {proc.pid}" in caplog.text
    assert len(seen) == n_groups - done  # only what was not recorded done is recomputed
    np.testing.assert_array_equal(open_volume(sr).values, open_volume(tmp_path / "sr.zarr").values)
    assert not stores.exists(lock_path(sr))


def test_blend_job_and_its_pyramid_on_s3_equal_local(tmp_path: Path, bucket: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Stage II's stitch mode: its scratch tiles and done-state live on the store, then go."""
    from d2r_dask.blockwise import pyramid
    from d2r_dask.blockwise.processors import ModelSpec

    monkeypatch.setattr(pyramid, "MIN_SIZE", 4)
    data = random_volume((6, 16, 16), np.float32, seed=3)
    kw: dict[str, Any] = dict(block=(3, 8, 8), halo=(1, 2, 2), context=(1, 1, 1), scale=(2, 1, 1), stitch="blend",
                              serial=True, progress=False, levels=3)
    outs = []
    for root in (tmp_path, bucket):
        src = write(stores.join(root, "in.zarr"), data, chunks=(3, 8, 8))
        outs.append(scheduler.run_blockwise(src, stores.join(root, "out.zarr"),
                                            ModelSpec("tile-variant", options={"scale_z": 2}), **kw))
    assert outs[1] == f"{bucket}/out.zarr"
    for level in range(3):
        local, remote = (open_volume(o, level=level) for o in outs)
        assert remote.shape == local.shape
        np.testing.assert_array_equal(remote.values, local.values)
    assert not [o for o in _objects(bucket) if "/.d2r/tiles" in o or "/.d2r/done" in o]


def test_lock_on_s3_refuses_a_second_run_and_names_the_lock(bucket: str) -> None:
    target = f"{bucket}/out.zarr"
    assert lock_path(target) == f"{target}.d2r-lock"
    path = acquire(target)
    assert json.loads(stores.read_bytes(path))["pid"] == os.getpid()
    release(target)
    assert not stores.exists(path)
    stores.write_bytes(path, json.dumps({"host": "elsewhere", "pid": 1, "started": "yesterday"}).encode())
    with pytest.raises(LockedError, match=f"delete {path}"):
        acquire(target)


# --- degrade and evaluate read the store -----------------------------------------------------------


def test_degrade_and_evaluate_on_s3_equal_local(tmp_path: Path, bucket: str, cli_run: Callable[..., Any],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    gt = synth_array((24, 32, 32), seed=9)
    noisy = np.clip(gt.astype(np.int16) + np.random.default_rng(0).integers(-6, 7, gt.shape), 0, 255).astype(np.uint8)
    for root in (tmp_path, bucket):
        vol = stores.join(root, "gt.zarr")
        write(vol, gt, (10.0, 10.0, 10.0), chunks=(8, 16, 16))
        write(stores.join(root, "sr.zarr"), noisy, (10.0, 10.0, 10.0), chunks=(8, 16, 16))
        assert_cli_ok(cli_run("degrade", vol, stores.join(root, "lr.zarr"), "-s", 4, "--levels", 1))
    np.testing.assert_array_equal(open_volume(f"{bucket}/lr.zarr").values, open_volume(tmp_path / "lr.zarr").values)

    assert_cli_ok(cli_run("evaluate", tmp_path / "sr.zarr", tmp_path / "gt.zarr", "--lr", tmp_path / "lr.zarr"))
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")  # a remote SR's report goes to the current folder
    assert_cli_ok(cli_run("evaluate", f"{bucket}/sr.zarr", f"{bucket}/gt.zarr", "--lr", f"{bucket}/lr.zarr"))
    remote = json.loads((tmp_path / "here" / "sr.report" / "metrics.json").read_text())
    local = json.loads((tmp_path / "sr.report" / "metrics.json").read_text())
    assert remote["ground_truth"] == f"{bucket}/gt.zarr"
    assert remote["results"] == local["results"] and set(remote["results"]) == {"sr", "nearest", "linear", "cubic"}
    assert remote["results"]["sr"]["psnr"] > remote["results"]["cubic"]["psnr"]
