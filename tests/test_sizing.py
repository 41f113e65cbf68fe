"""Blocks sized to the device: the halo overhead, the block choice, and what --dry-run prints."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from d2r_dask.blockwise.layout import choose_block, halo_overhead
from d2r_dask.models.dgean import dgean_config
from d2r_dask.stages.config import InferStage, RunConfig, resolve_auto
from d2r_dask.stages.sizing import dgean_bytes_per_voxel, infer_block

H200 = {"type": "cuda", "memory_bytes": 139 * 2**30, "cores": 16, "name": "H200"}
LAPTOP = {"type": "cpu", "memory_bytes": 16 * 2**30, "cores": 2, "name": "cpu"}


def test_halo_overhead() -> None:
    assert halo_overhead((32, 128, 128), (12, 12, 12)) == pytest.approx(56 / 32 * (152 / 128) ** 2)
    assert halo_overhead((10, 10, 10), (0, 0, 0)) == 1.0
    # the former default block: 2.5x, 3.5x, 6.2x for the tiny, base and full halos
    assert [round(halo_overhead((32, 128, 128), (h,) * 3), 1) for h in (12, 18, 30)] == [2.5, 3.5, 6.2]


def test_choose_block_reaches_the_target_when_memory_allows() -> None:
    block = choose_block((10_000,) * 3, (18, 18, 18), max_voxels=1e9, target=1.3)
    assert block == (400, 400, 400)  # the smallest multiple of 16 with overhead <= 1.3
    assert halo_overhead(block, (18,) * 3) <= 1.3 < halo_overhead((384,) * 3, (18,) * 3)


def test_choose_block_is_bounded_by_memory() -> None:
    block = choose_block((10_000,) * 3, (30, 30, 30), max_voxels=4e7, target=1.3)
    assert math.prod(b + 60 for b in block) <= 4e7 < math.prod(b + 16 + 60 for b in block)
    assert halo_overhead(block, (30,) * 3) > 1.3  # the least the memory allows
    # even when the smallest block does not fit, a block is returned
    assert choose_block((100,) * 3, (30,) * 3, max_voxels=10) == (16, 16, 16)


@pytest.mark.parametrize("shape", [(8, 40, 40), (1, 2000, 3000), (300, 20, 5000)])
def test_choose_block_never_exceeds_the_volume(shape: tuple[int, int, int]) -> None:
    block = choose_block(shape, (12, 12, 12), max_voxels=1e8, target=1.3)
    assert all(1 <= b <= n for b, n in zip(block, shape))
    assert all(b % 16 == 0 or b == n for b, n in zip(block, shape))


def test_infer_block_on_a_gpu_keeps_the_halo_under_1_3x_for_base() -> None:
    cfg = dgean_config("base", 4)
    sized = infer_block((4000, 20000, 20000), cfg, H200)
    assert sized["halo_overhead"] <= 1.3 and sized["block"] == [400, 400, 400]
    read = math.prod(b + 2 * h for b, h in zip(sized["block"], sized["halo"]))
    assert read * dgean_bytes_per_voxel(cfg, "cuda") <= 0.6 * H200["memory_bytes"]
    # full needs more than an H200 holds for 1.3x: the least overhead that fits, and still far
    # below the former default's 6.2x
    full = infer_block((4000, 20000, 20000), dgean_config("full", 4), H200)
    assert 1.3 < full["halo_overhead"] < 2.0
    # two GPUs take half the time
    assert infer_block((4000, 20000, 20000), cfg, H200, workers=2)["estimated_seconds"] == pytest.approx(
        sized["estimated_seconds"] / 2, rel=0.01)


def test_infer_block_on_a_cpu_and_a_given_block() -> None:
    cfg = dgean_config("tiny", 4)
    sized = infer_block((250, 1000, 1000), cfg, LAPTOP, workers=2)
    assert sized["halo_overhead"] < 2.0 and sized["device"] == "cpu (cpu)"  # the former default: 2.5
    assert sized["estimated_seconds"] > 0
    given = infer_block((250, 1000, 1000), cfg, LAPTOP, block=(32, 128, 128))
    assert given["block"] == [32, 128, 128] and given["halo_overhead"] == pytest.approx(2.5, abs=0.05)
    assert given["blocks"] == 8 * 8 * 8
    assert given["estimated_seconds"] > sized["estimated_seconds"]  # more halo, more time


def test_dry_run_prints_block_overhead_and_time(tmp_path: Path, cli_run: Callable[..., Any]) -> None:
    from d2r_dask.io.geometry import Geometry
    from d2r_dask.io.volume import write_volume

    lr = write_volume(tmp_path / "lr.zarr", np.zeros((8, 40, 40), np.uint8), Geometry((40.0, 10.0, 10.0)))
    result = cli_run("run", lr, tmp_path / "sr.zarr", "--factor", 4, "--dry-run", "--dgean-preset", "tiny")
    assert result.exit_code == 0, result.output
    four = json.loads(result.output)["stages"][3]
    assert four["block"] == [8, 40, 40]  # the whole (small) volume
    assert four["halo_overhead"] == pytest.approx(halo_overhead((8, 40, 40), (12, 12, 12)), abs=1e-3)
    assert four["estimated_seconds"] >= 0 and four["device"].startswith("cpu")


def test_a_resumed_run_keeps_its_recorded_block() -> None:
    cfg = RunConfig(factor=4)
    assert cfg.infer.block is None
    old = RunConfig(factor=4, infer=InferStage(block=(32, 128, 128))).to_dict()  # recorded before sizing
    assert resolve_auto(cfg, "cuda", recorded=old).infer.block == (32, 128, 128)
    assert resolve_auto(cfg, "cpu", recorded={"factor": 4}).infer.block is None  # a record without one: sized
    mine = RunConfig(factor=4, infer=InferStage(block=(16, 64, 64)))
    # an explicit block wins (and a mismatch is refused later)
    assert resolve_auto(mine, "cpu", recorded=old).infer == mine.infer
    assert RunConfig.from_dict({"factor": 4, "infer": {"block": [8, 8, 8]}}).infer.block == (8, 8, 8)
