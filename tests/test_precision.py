"""Arithmetic and memory layout (models.precision): bf16 on a GPU only, channels-last memory
everywhere with float32 results unchanged, and float32 training that repeats its bits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from d2r_testkit import (
    one_torch_thread,  # noqa: F401  (autouse)
    synth_array,
    tiny_dgean_cfg,
    tiny_train,
    write,
)

from d2r_dask.models.checkpoint import read_weights
from d2r_dask.models.dgean import DGEAN, dgean_config
from d2r_dask.models.nafnet import ConditionalNAFNet, nafnet_config
from d2r_dask.models.precision import autocast_bf16, channels_last, channels_last_input
from d2r_dask.stages.train import train_dgean


def test_bf16_on_a_gpu_only() -> None:
    assert autocast_bf16("cuda") and autocast_bf16("cuda:1") and autocast_bf16(torch.device("cuda", 0))
    assert not autocast_bf16("cpu")


@pytest.mark.parametrize("kind", ["dgean", "restorer"])
def test_channels_last_keeps_float32_results(kind: str) -> None:
    torch.manual_seed(0)
    if kind == "dgean":
        net, x = DGEAN(dgean_config("tiny", 4, "decimate")).eval(), torch.rand(2, 1, 6, 20, 20)
        fmt, forward = torch.channels_last_3d, (lambda n, v: n(v))
    else:
        net, x = ConditionalNAFNet(nafnet_config("tiny")).eval(), torch.rand(2, 2, 24, 24)
        fmt, forward = torch.channels_last, (lambda n, v: n(v, torch.full((2,), 7.0)))
    with torch.no_grad():
        ref = forward(net, x)
        fast = channels_last(net)
        conv = next(m for m in fast.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)))
        assert conv.weight.is_contiguous(memory_format=fmt)
        xin = channels_last_input(x)
        assert xin.is_contiguous(memory_format=fmt)
        np.testing.assert_allclose(forward(fast, xin).numpy(), ref.numpy(), atol=1e-5)


def test_cpu_training_repeats_its_bits_and_saves_plain_float32(tmp_path: Path) -> None:
    """The default (amp on) trains in channels-last float32 on the CPU: two runs of one seed
    give the same weights, stored contiguous float32 whatever the layout in training."""
    data = write(tmp_path / "hr.zarr", synth_array((32, 32, 32), seed=6), voxel_size=(10.0, 10.0, 10.0))
    weights = []
    for run in ("a", "b"):
        train_dgean(data, tmp_path / run, tiny_dgean_cfg(), tiny_train(steps=4, amp=True), progress=False)
        weights.append(read_weights(tmp_path / run))
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in weights[0].values())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
