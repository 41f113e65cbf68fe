"""Precision and memory layout (models.precision): which device trains in bf16, what `auto`
picks for it, and that channels-last memory leaves float32 results unchanged."""

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

from d2r_dask.models.checkpoint import load_dgean, read_weights
from d2r_dask.models.dgean import DGEAN, dgean_config
from d2r_dask.models.nafnet import ConditionalNAFNet, nafnet_config
from d2r_dask.models.precision import channels_last, channels_last_input, inference_bf16, native_bf16, train_bf16
from d2r_dask.stages.config import AUTO, RunConfig, device_kind, resolve_auto
from d2r_dask.stages.train import train_dgean


def test_bf16_rule_follows_the_device_and_the_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("D2R_BF16", raising=False)
    assert native_bf16("cuda") and native_bf16("cuda:1")
    cpu = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    assert native_bf16("cpu") == cpu
    assert device_kind("cpu") == ("cpu-bf16" if cpu else "cpu") and device_kind("cuda:0") == "cuda"
    assert inference_bf16("cuda") and not inference_bf16("cpu")  # CPU inference stays float32
    monkeypatch.setenv("D2R_BF16", "0")
    assert not native_bf16("cpu") and not native_bf16("cuda") and device_kind("cpu") == "cpu"
    monkeypatch.setenv("D2R_BF16", "1")
    assert native_bf16("cpu") and device_kind("cpu") == "cpu-bf16"
    dgean, restorer = DGEAN(dgean_config("tiny", 4, "decimate")), ConditionalNAFNet(nafnet_config("tiny"))
    assert train_bf16("cpu", dgean) and not train_bf16("cpu", restorer)  # the 2D restorer gains nothing on a CPU
    assert train_bf16("cuda", dgean) and train_bf16("cuda", restorer)


@pytest.mark.parametrize("flag, row", [("0", "cpu"), ("1", "cpu-bf16")])
def test_auto_gives_a_bf16_cpu_its_own_row(monkeypatch: pytest.MonkeyPatch, flag: str, row: str) -> None:
    monkeypatch.setenv("D2R_BF16", flag)
    cfg = resolve_auto(RunConfig(factor=4), "cpu")
    assert cfg.dgean.steps == AUTO[row]["dgean"]["steps"] and cfg.dgean.preset == AUTO[row]["dgean"]["preset"]
    assert cfg.restorer.steps == AUTO[row]["restorer"]["steps"]
    # the faster CPU trains DGEAN longer, never a different network
    assert AUTO["cpu-bf16"]["dgean"]["steps"] > AUTO["cpu"]["dgean"]["steps"]
    assert AUTO["cpu-bf16"]["dgean"]["preset"] == AUTO["cpu"]["dgean"]["preset"]


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


def test_bf16_training_is_used_and_saves_float32_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = write(tmp_path / "hr.zarr", synth_array((32, 32, 32), seed=6), voxel_size=(10.0, 10.0, 10.0))
    outs = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("D2R_BF16", flag)
        outs[flag] = tmp_path / f"dgean{flag}"
        summary = train_dgean(data, outs[flag], tiny_dgean_cfg(), tiny_train(steps=4, amp=True), progress=False)
        assert np.isfinite(summary["final_loss"])
    w32, w16 = read_weights(outs["0"]), read_weights(outs["1"])
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in w16.values())
    # the flag reached the loop: the same seed and batches, different arithmetic, different weights
    assert any(not torch.equal(w32[k], w16[k]) for k in w32)
    net, _ = load_dgean(outs["1"])
    assert torch.isfinite(net(torch.rand(1, 1, 6, 16, 16))).all()
