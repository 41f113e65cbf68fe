"""Placement: one worker per GPU, each on its own device; torch threads from the host's cores.

``place_workers`` is pure: these tests fake what each worker reports (CPU count, GPUs it
sees, CUDA_VISIBLE_DEVICES) for the layouts that occur in practice.
"""

from __future__ import annotations

import logging

import pytest

from d2r_dask.blockwise.runtime import WorkerHost, place_workers


def _dask_cuda(n: int, host: str = "10.0.0.1", cpus: int = 64) -> list[WorkerHost]:
    """LocalCUDACluster: worker i sees every GPU, rotated so that its own comes first."""
    ids = list(range(n))
    return [WorkerHost(str(i), host, cpus, n, ",".join(map(str, ids[i:] + ids[:i]))) for i in range(n)]


def test_dask_cuda_workers_each_use_their_own_gpu() -> None:
    placed = place_workers(_dask_cuda(4))
    assert {p.device for p in placed.values()} == {"cuda:0"}  # cuda:0 is the worker's own GPU
    assert sorted(p.gpu for p in placed.values()) == ["0", "1", "2", "3"]  # all four busy, one model each
    assert {p.threads for p in placed.values()} == {16}


def test_dask_cuda_worker_names_need_not_be_numbers() -> None:
    # dask-cuda-worker names workers after their address; the old code fell back to hash(name)
    ws = [WorkerHost(f"tcp://10.0.0.1:{4000 + i}-gpu", w.host, w.cpus, w.gpus, w.visible)
          for i, w in enumerate(_dask_cuda(8))]
    placed = place_workers(ws)
    assert sorted(p.gpu for p in placed.values()) == [str(i) for i in range(8)]
    assert {p.device for p in placed.values()} == {"cuda:0"}


@pytest.mark.parametrize("names", [["0", "1", "2", "3"], ["w-3", "w-10", "w-2", "w-1"], ["d", "b", "a", "c"]])
def test_plain_local_cluster_spreads_workers_over_gpus(names: list[str]) -> None:
    # a LocalCluster without dask-cuda: every worker sees the same four GPUs
    placed = place_workers([WorkerHost(n, "node1", 32, 4, None) for n in names])
    assert sorted(p.device for p in placed.values()) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert {p.threads for p in placed.values()} == {8}
    # deterministic: the same workers in another order get the same devices
    again = place_workers([WorkerHost(n, "node1", 32, 4, None) for n in reversed(names)])
    assert again == placed


def test_natural_name_order() -> None:
    placed = place_workers([WorkerHost(str(i), "h", 12, 12, None) for i in range(12)])
    assert placed["2"].device == "cuda:2" and placed["10"].device == "cuda:10"


def test_shared_visible_devices_map_to_physical_ids() -> None:
    # a job scheduler gave the process GPUs 4-7; a plain cluster spreads over them
    placed = place_workers([WorkerHost(str(i), "h", 8, 4, "4,5,6,7") for i in range(4)])
    assert [placed[str(i)].device for i in range(4)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert [placed[str(i)].gpu for i in range(4)] == ["4", "5", "6", "7"]


def test_one_gpu_per_process_and_several_hosts() -> None:
    # SLURM / dask-jobqueue: each worker process is given exactly one GPU
    ws = [WorkerHost("a-0", "n1", 16, 1, "2"), WorkerHost("a-1", "n1", 16, 1, "3"),
          WorkerHost("b-0", "n2", 8, 1, "0")]
    placed = place_workers(ws)
    assert {n: (p.device, p.gpu, p.threads) for n, p in placed.items()} == {
        "a-0": ("cuda:0", "2", 8), "a-1": ("cuda:0", "3", 8), "b-0": ("cuda:0", "0", 8)}


def test_cpu_only_hosts_split_cores() -> None:
    placed = place_workers([WorkerHost(str(i), "h", 2, 0, None) for i in range(2)]
                           + [WorkerHost("big", "h2", 48, 0, "")])
    assert {n: (p.device, p.threads) for n, p in placed.items()} == {"0": (None, 1), "1": (None, 1),
                                                                      "big": (None, 48)}
    # more workers than cores: one thread each, never zero
    assert {p.threads for p in place_workers([WorkerHost(str(i), "h", 2, 0) for i in range(5)]).values()} == {1}


def test_more_workers_than_gpus_is_named(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        placed = place_workers([WorkerHost(str(i), "h", 8, 2, None) for i in range(4)])
    assert [placed[str(i)].device for i in range(4)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert "4 workers share 2 GPU(s)" in caplog.text


def test_configure_workers_on_a_real_cluster() -> None:
    from dask.system import CPU_COUNT
    from distributed import Client, LocalCluster

    from d2r_dask.blockwise.runtime import configure_workers, worker_stats

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      memory_limit="1GiB") as cluster, Client(cluster) as client:
        placed = configure_workers(client)
        assert sorted(placed) == ["0", "1"]  # by worker name, so a restarted worker keeps its place
        stats = client.run(worker_stats)
        assert {s["threads"] for s in stats.values()} == {max(1, CPU_COUNT // 2)}
        assert {s["device"] for s in stats.values()} == {None}  # no GPU here
