"""Training on a cluster worker (``--scheduler``): it runs in the worker, not the client, trains
the weights it would train here, streams its progress, surfaces its errors, and stops when
the client stops waiting. Real LocalClusters, tiny runs (4 steps)."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from conftest import assert_cli_ok
from d2r_testkit import (
    one_torch_thread,  # noqa: F401  (autouse)
    synth_array,
    tiny_dgean_cfg,
    tiny_restorer_cfg,
    tiny_train,
    write,
)

from d2r_dask.errors import OutputExistsError
from d2r_dask.models.checkpoint import CONFIG, read_weights
from d2r_dask.stages import remote
from d2r_dask.stages.remote import train_on_cluster
from d2r_dask.stages.train import train_dgean, train_restorer


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    """Two worker processes (daemonic, as Dask starts them): one torch thread each on 2 cores."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      memory_limit="2GiB") as cluster, Client(cluster) as c:
        yield c


def test_training_runs_on_a_worker_and_trains_what_it_would_here(client: Any, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """DGEAN with a loader process, in a (daemonic) worker process: the checkpoint it writes
    equals the one the same training writes in this process (with the worker's torch thread
    count: CPU kernels sum in another order on another count), its validation rows reach the
    client's log, and a refused rerun is the worker's error, raised here with its message."""
    hr = write(tmp_path / "hr.zarr", synth_array((32, 40, 40), seed=4), voxel_size=(10.0, 10.0, 10.0))
    out = tmp_path / "on-a-worker"
    with caplog.at_level(logging.INFO, logger="d2r_dask.stages.remote"):
        summary = train_on_cluster(client, train_dgean, hr, out, tiny_dgean_cfg(), tiny_train(loader_workers=1),
                                   progress=False)
    assert summary["pid"] != os.getpid() and summary["pid"] in client.run(os.getpid).values()
    assert summary["worker"] in client.scheduler_info()["workers"]
    assert json.loads((out / CONFIG).read_text())["step"] == 4
    assert [r.getMessage().split(":")[0] for r in caplog.records if "val_psnr" in r.getMessage()] == \
        ["on-a-worker step 2", "on-a-worker step 4"]

    threads = torch.get_num_threads()
    torch.set_num_threads(next(iter(client.run(torch.get_num_threads).values())))
    try:
        train_dgean(hr, tmp_path / "here", tiny_dgean_cfg(), tiny_train(), progress=False)
    finally:
        torch.set_num_threads(threads)
    wa, wb = read_weights(tmp_path / "here"), read_weights(out)
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "the worker trained other weights"
    assert (out / "metrics.csv").read_text() == (tmp_path / "here" / "metrics.csv").read_text()

    with pytest.raises(OutputExistsError, match=f"{out} holds a training run; pass --resume"):
        train_on_cluster(client, train_dgean, hr, out, tiny_dgean_cfg(), tiny_train(), progress=False)


def test_training_stops_when_the_client_stops_waiting(client: Any, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C in the client cancels the task; the worker stops at the end of its step and
    keeps its last checkpoint."""
    import distributed

    lr = write(tmp_path / "lr.zarr", synth_array((12, 40, 40), seed=5))
    out = tmp_path / "model"

    def interrupt_after_two_steps(future: Any, timeout: float) -> None:  # the client's wait, Ctrl-C'd
        time.sleep(timeout)
        if (out / CONFIG).exists() and json.loads((out / CONFIG).read_text())["step"] >= 2:
            raise KeyboardInterrupt

    def executing(dask_worker: Any) -> int:
        return dask_worker.state.executing_count

    monkeypatch.setattr(distributed, "wait", interrupt_after_two_steps)
    with pytest.raises(KeyboardInterrupt):
        train_on_cluster(client, train_restorer, lr, out, tiny_restorer_cfg(),
                         tiny_train(steps=500, checkpoint_every=2, val_every=1000), progress=False)
    deadline = time.monotonic() + 60
    while any(client.run(executing).values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(client.run(executing).values()), "the training kept running after the client left"
    stopped_at = json.loads((out / CONFIG).read_text())["step"]
    assert 2 <= stopped_at < 500
    time.sleep(1)
    assert json.loads((out / CONFIG).read_text())["step"] == stopped_at, "still training"


def test_losing_the_pinned_worker_is_a_clear_error(client: Any, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A training pinned to its (GPU) worker waits for no other: when that worker dies, the
    client says so instead of waiting forever; the last checkpoint stays."""
    import distributed

    from d2r_dask.errors import WorkerLostError

    lr = write(tmp_path / "lr.zarr", synth_array((12, 40, 40), seed=5))
    out = tmp_path / "model"
    address = sorted(client.scheduler_info()["workers"])[0]
    monkeypatch.setattr(remote, "training_worker", lambda c: ({"workers": [address], "allow_other_workers": False},
                                                              "cuda"))
    monkeypatch.setattr(remote, "LOST_CHECK_SECONDS", 0.2)
    pid = client.run(os.getpid, workers=[address])[address]

    def kill_after_the_first_checkpoint(future: Any, timeout: float) -> None:
        time.sleep(timeout)
        if (out / CONFIG).exists() and address in client.scheduler_info()["workers"]:
            os.kill(pid, signal.SIGKILL)  # the worker process dies

    monkeypatch.setattr(distributed, "wait", kill_after_the_first_checkpoint)
    with pytest.raises(WorkerLostError, match=f"the worker {address} training {out} left the cluster .* rerun"):
        train_on_cluster(client, train_restorer, lr, out, tiny_restorer_cfg(),
                         tiny_train(steps=500, checkpoint_every=2, val_every=1000), progress=False)
    assert 2 <= json.loads((out / CONFIG).read_text())["step"] < 500
    client.wait_for_workers(2, timeout=60)  # the nanny restarts it, under another address


def test_train_command_with_a_scheduler_trains_on_its_worker(client: Any, tmp_path: Path, cli_run: Any) -> None:
    lr = write(tmp_path / "lr.zarr", synth_array((12, 40, 40), seed=5))
    result = cli_run("train-restorer", lr, "-s", 4, "--out", tmp_path / "m", "--patch", 32, "--steps", 2,
                     "--batch-size", 2, "--checkpoint-every", 2, "--val-every", 2, "--device", "cpu",
                     "--sampler-steps", 2, "--scheduler", client.scheduler.address)
    assert_cli_ok(result)
    assert "restorer saved to" in result.output
    assert json.loads((tmp_path / "m" / CONFIG).read_text())["step"] == 2
