"""DGEAN: shapes, config, exact receptive field, blockwise == whole, geometry of the residual."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from d2r_dask.models import dgean
from d2r_dask.models.dgean import (
    DGEAN,
    PRESETS,
    DGEANConfig,
    dgean_config,
    receptive_field,
    size_table,
    tta_forward,
)
from d2r_dask.models.losses import hf_loss


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny convs run faster on one thread than fighting over shared cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _randomise(model: torch.nn.Module, *, std: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (the HR conv is zero-initialised otherwise)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    return model


def _lr_coordinates(n_hr: int, factor: int, mode: str) -> np.ndarray:
    """Where HR slice j sits in LR slice units (D2R.md, Geometry)."""
    j = np.arange(n_hr, dtype=np.float64)
    return j / factor if mode == "decimate" else (j - (factor - 1) / 2) / factor


def _keys_reference(volume: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Catmull-Rom along axis 0 at ``coords``, indices clamped (= replicate edges)."""
    def w(t: float) -> float:
        t = abs(t)
        return 1.5 * t**3 - 2.5 * t**2 + 1 if t <= 1 else (-0.5 * t**3 + 2.5 * t**2 - 4 * t + 2 if t < 2 else 0.0)

    n = volume.shape[0]
    out = np.zeros((len(coords), *volume.shape[1:]))
    for j, t in enumerate(coords):
        i = math.floor(t)
        for o in (-1, 0, 1, 2):
            out[j] += w(t - (i + o)) * volume[min(max(i + o, 0), n - 1)]
    return out


# --- shapes and configuration ------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["decimate", "mean"])
def test_output_shapes_for_all_factors(mode: str) -> None:
    x = torch.rand(2, 1, 3, 5, 7)
    for s in range(2, 11):
        y = DGEAN(dgean_config("tiny", s, mode))(x)
        assert y.shape == (2, 1, 3 * s, 5, 7) and y.dtype == torch.float32


def test_presets_build_and_run() -> None:
    x = torch.rand(1, 1, 3, 4, 5)
    for preset in PRESETS:
        model = DGEAN(dgean_config(preset, 4))
        assert model.n_parameters() == dgean.n_parameters(model.cfg) > 0
        assert model(x).shape == (1, 1, 12, 4, 5)
    sizes = [dgean.n_parameters(dgean_config(p, 4)) for p in ("tiny", "base", "full")]
    assert sizes == sorted(sizes)


def test_config_round_trip_through_json() -> None:
    cfg = dgean_config("base", 6, "mean", interp="linear", kernel=(1, 3, 3), ca_pool=1)
    again = DGEANConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and hash(again) == hash(cfg)
    assert DGEAN(again).state_dict().keys() == DGEAN(cfg).state_dict().keys()


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"factor": 1}, "factor"),
        ({"factor": 11}, "factor"),
        ({"factor": True}, "factor"),
        ({"mode": "max"}, "mode"),
        ({"interp": "nearest"}, "interp"),
        ({"width": 0}, "width"),
        ({"n_blocks": -1}, "n_blocks"),
        ({"kernel": (2, 3, 3)}, "kernel"),
        ({"hr_kernel": (3, 3)}, "hr_kernel"),
        ({"ca_pool": 2}, "ca_pool"),
        ({"colour": 1}, "unknown"),
    ],
)
def test_config_validation_names_the_problem(overrides: dict, match: str) -> None:
    data = {**dgean_config("tiny", 4).to_dict(), **overrides}
    with pytest.raises(ValueError, match=match):
        DGEANConfig.from_dict(data)


def test_unknown_preset_and_bad_input() -> None:
    with pytest.raises(ValueError, match="preset"):
        dgean_config("huge", 4)
    with pytest.raises(ValueError, match=r"\(B, 1, D, H, W\)"):
        DGEAN(dgean_config("tiny", 2))(torch.rand(1, 2, 3, 3, 3))


def test_docstring_table_is_current() -> None:
    assert "\n".join(line.strip() for line in size_table().splitlines()) in "\n".join(
        line.strip() for line in dgean.__doc__.splitlines()
    )


# --- receptive field ---------------------------------------------------------------------------


def _measured_halo(cfg: DGEANConfig, *, thin: bool = True) -> tuple[tuple[int, int], ...]:
    """(low, high) reach per axis of the s HR voxels above one LR voxel, by autograd (float64).

    Every layer has a box-shaped support, so the reach along one axis is attained by paths with
    zero offset along the others: with ``thin``, each axis is measured on its own volume, long
    (2r + 3: one voxel of slack each side, so a too-small claim would show) along that axis and
    5 voxels across. ``thin=False`` measures all three on one cube.
    """
    halo = receptive_field(cfg)
    model = _randomise(DGEAN(cfg)).double().requires_grad_(False)
    long = tuple(2 * r + 3 for r in halo)
    shapes = [tuple(n if a == b else 5 for b in range(3)) for a, n in enumerate(long)] if thin else [long]
    reach: list[tuple[int, int]] = [(-1, -1)] * 3
    for axis, shape in enumerate(shapes):
        centre = tuple(n // 2 for n in shape)
        (k, cy, cx), s = centre, cfg.factor
        x = torch.rand(1, 1, *shape, dtype=torch.float64, requires_grad=True)
        model(x)[0, 0, k * s : (k + 1) * s, cy, cx].sum().backward()
        nonzero = np.nonzero(x.grad[0, 0].numpy())
        for a in range(3) if not thin else (axis,):
            reach[a] = (centre[a] - int(nonzero[a].min()), int(nonzero[a].max()) - centre[a])
    return tuple(reach)


@pytest.mark.parametrize("preset", ["tiny", "base"])
@pytest.mark.parametrize("mode", ["decimate", "mean"])
@pytest.mark.parametrize("factor", [2, 3, 4, 7, 10])
def test_receptive_field_is_exact(preset: str, mode: str, factor: int) -> None:
    cfg = dgean_config(preset, factor, mode)
    assert _measured_halo(cfg) == tuple((r, r) for r in receptive_field(cfg))


def test_receptive_field_is_exact_on_a_cube() -> None:
    cfg = dgean_config("tiny", 3, "mean")
    assert _measured_halo(cfg, thin=False) == tuple((r, r) for r in receptive_field(cfg))


@pytest.mark.parametrize(
    "overrides",
    [
        {"factor": 2, "kernel": (1, 3, 3), "hr_kernel": (7, 3, 1), "ca_pool": 1},  # ceil(3/2) = 2
        {"factor": 3, "hf_width": 0, "interp": "linear", "ca_pool": 5, "hr_kernel": (9, 1, 1)},
        {"factor": 5, "mode": "mean", "n_blocks": 0, "hf_width": 0, "hr_kernel": (1, 1, 1)},
    ],
)
def test_receptive_field_is_exact_for_unusual_layouts(overrides: dict) -> None:
    cfg = DGEANConfig.from_dict({**dgean_config("tiny", 2).to_dict(), **overrides})
    assert _measured_halo(cfg) == tuple((r, r) for r in receptive_field(cfg))


# --- blockwise == whole ------------------------------------------------------------------------


def _blockwise(model: DGEAN, volume: np.ndarray, block: tuple[int, int, int]) -> np.ndarray:
    """Reflect-pad by the halo, run overlapping blocks, crop each to what it owns."""
    halo = receptive_field(model.cfg)
    s = model.cfg.factor
    padded = np.pad(volume, [(h, h) for h in halo], mode="reflect")
    out = np.zeros((volume.shape[0] * s, *volume.shape[1:]), dtype=np.float32)
    starts = [range(0, n, b) for n, b in zip(volume.shape, block)]
    for z0 in starts[0]:
        for y0 in starts[1]:
            for x0 in starts[2]:
                z1, y1, x1 = (min(a + b, n) for a, b, n in zip((z0, y0, x0), block, volume.shape))
                read = padded[z0 : z1 + 2 * halo[0], y0 : y1 + 2 * halo[1], x0 : x1 + 2 * halo[2]]
                with torch.no_grad():
                    y = model(torch.from_numpy(np.ascontiguousarray(read))[None, None])[0, 0].numpy()
                hz, hy, hx = halo
                out[z0 * s : z1 * s, y0:y1, x0:x1] = y[hz * s : (hz + z1 - z0) * s, hy : hy + y1 - y0, hx : hx + x1 - x0]
    return out


@pytest.mark.parametrize(("factor", "mode", "interp"), [(3, "mean", "cubic"), (2, "decimate", "linear")])
def test_blockwise_equals_whole(factor: int, mode: str, interp: str) -> None:
    model = DGEAN(dgean_config("tiny", factor, mode, interp=interp)).eval()
    torch.nn.init.normal_(model.hr_conv.weight, std=0.1)  # make the learned part count
    volume = np.random.default_rng(1).random((7, 11, 10), dtype=np.float32)
    halo = receptive_field(model.cfg)
    with torch.no_grad():
        padded = np.pad(volume, [(h, h) for h in halo], mode="reflect")
        whole = model(torch.from_numpy(padded)[None, None])[0, 0].numpy()
    hz, hy, hx = halo
    whole = whole[hz * factor : (hz + volume.shape[0]) * factor, hy:-hy, hx:-hx]
    np.testing.assert_allclose(_blockwise(model, volume, (4, 6, 7)), whole, rtol=0, atol=1e-5)


# --- the global residual -----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["decimate", "mean"])
@pytest.mark.parametrize("interp", ["linear", "cubic"])
def test_zinterp_reproduces_a_linear_ramp(mode: str, interp: str) -> None:
    n = 8
    ramp = 0.2 + 0.07 * np.arange(n)
    x = torch.from_numpy(np.broadcast_to(ramp[:, None, None], (n, 2, 3)).astype(np.float32).copy())
    for s in (2, 3, 4, 5, 8):
        y = DGEAN(dgean_config("tiny", s, mode, interp=interp)).zinterp(x[None, None])[0, 0, :, 0, 0]
        expected = 0.2 + 0.07 * _lr_coordinates(n * s, s, mode)
        interior = slice(2 * s, (n - 3) * s)  # taps reach at most 2 LR slices
        np.testing.assert_allclose(y.numpy()[interior], expected[interior], atol=1e-6)


@pytest.mark.parametrize("mode", ["decimate", "mean"])
@pytest.mark.parametrize("interp", ["linear", "cubic"])
def test_untrained_model_is_the_placed_interpolation(mode: str, interp: str) -> None:
    volume = np.random.default_rng(2).random((7, 4, 5))
    for s in (3, 4):
        with torch.no_grad():
            y = DGEAN(dgean_config("tiny", s, mode, interp=interp))(torch.from_numpy(volume).float()[None, None])
        t = _lr_coordinates(7 * s, s, mode)
        if interp == "linear":
            expected = np.apply_along_axis(lambda v: np.interp(t, np.arange(7), v), 0, volume)
        else:
            expected = _keys_reference(volume, t)
        np.testing.assert_allclose(y[0, 0].numpy(), expected, atol=1e-5)


# --- numerics, training, TTA -------------------------------------------------------------------


def test_bf16_autocast_keeps_the_interpolation_in_float32() -> None:
    model = DGEAN(dgean_config("tiny", 4))
    x = torch.rand(1, 1, 4, 6, 6)
    with torch.no_grad():
        reference = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, reference, rtol=0, atol=0)  # learned part is exactly zero


def test_channels_last_3d_matches_contiguous() -> None:
    model = DGEAN(dgean_config("tiny", 3)).eval()
    torch.nn.init.normal_(model.hr_conv.weight, std=0.1)
    x = torch.rand(1, 1, 4, 6, 7)
    with torch.no_grad():
        reference = model(x)
        y = model.to(memory_format=torch.channels_last_3d)(x.to(memory_format=torch.channels_last_3d))
    torch.testing.assert_close(y, reference, rtol=0, atol=1e-5)


def test_channel_attention_pools_after_the_squeeze_without_changing_the_function() -> None:
    """The pool runs on the squeezed channels; it must equal the textbook order (pool, then
    squeeze), pad voxels at the border included."""
    torch.manual_seed(0)
    attention = dgean.LocalChannelAttention(12, pool=3, reduction=4)
    for p in attention.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.rand(2, 12, 3, 5, 6)
    with torch.no_grad():
        reference = x * attention.excite(attention.pool(x))
        torch.testing.assert_close(attention(x), reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize("factor", [2, 3, 8])
@pytest.mark.parametrize("hr_kernel", [(3, 3, 3), (1, 3, 3), (5, 1, 3), (7, 3, 1)])
def test_hr_conv_by_phase_equals_shuffle_then_conv(factor: int, hr_kernel: tuple) -> None:
    """The HR conv computed on LR voxels (per phase) is the textbook one: shuffle the up conv's
    output to HR slices, then convolve with zero padding; z taps wider than the factor included."""
    model = _randomise(DGEAN(dgean_config("tiny", factor, hr_kernel=hr_kernel))).eval()
    f = torch.rand(2, model.cfg.width, 4, 6, 7, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        u = model.act(model.up(f))
        reference = model.hr_conv(dgean.z_shuffle(u, factor))
        phased = dgean.hr_conv_by_phase(u[:, model.phase_major], model.hr_conv.weight, model.hr_conv.bias, factor)
    torch.testing.assert_close(phased, reference, rtol=1e-5, atol=1e-5)


def test_thirty_adam_steps_reduce_l1() -> None:
    torch.manual_seed(0)
    s = 4
    z, y, x = torch.meshgrid(*(torch.arange(16.0),) * 3, indexing="ij")
    hr = (0.5 + 0.4 * torch.sin(0.9 * z + 0.3 * x) * torch.cos(0.5 * y))[None, None]
    lr = hr[:, :, ::s]  # decimate: z aliases, so interpolation alone is far off
    model = DGEAN(dgean_config("tiny", s, "decimate"))
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)

    def l1() -> float:
        with torch.no_grad():
            return float((model(lr) - hr).abs().mean())

    before = l1()
    for _ in range(30):
        optimiser.zero_grad()
        hf_loss(model(lr), hr, weight=1.0).backward()
        optimiser.step()
    assert l1() < 0.5 * before


def test_tta_is_forward_for_an_xy_invariant_input() -> None:
    model = DGEAN(dgean_config("tiny", 2)).eval()
    torch.nn.init.normal_(model.hr_conv.weight, std=0.1)
    _, r, _ = receptive_field(model.cfg)
    n = 2 * r + 3
    x = torch.rand(1, 1, 4, 1, 1).expand(1, 1, 4, n, n).contiguous()
    with torch.no_grad():
        y, y_tta = model(x), tta_forward(model, x)
    assert y_tta.shape == y.shape == (1, 1, 8, n, n) and torch.isfinite(y_tta).all()
    inner = (..., slice(r, n - r), slice(r, n - r))
    torch.testing.assert_close(y_tta[inner], y[inner], rtol=0, atol=1e-5)


# --- loss ---------------------------------------------------------------------------------------


def test_hf_loss_is_zero_only_for_equal_inputs() -> None:
    a = torch.rand(2, 1, 6, 7, 8)
    assert float(hf_loss(a, a.clone(), weight=1.0, fourier_weight=1.0)) == 0.0
    b = a + 0.01 * torch.randn_like(a)
    plain = float(hf_loss(a, b, weight=0.0))
    assert 0 < plain < float(hf_loss(a, b, weight=1.0)) < float(hf_loss(a, b, weight=1.0, fourier_weight=1.0))
    with pytest.raises(ValueError, match="differ"):
        hf_loss(a, b[..., :-1])
    with pytest.raises(ValueError, match=">= 0"):
        hf_loss(a, b, weight=-1.0)


def test_cli_offers_every_preset() -> None:
    """The CLI spells the preset lists out (so ``--help`` needs no torch); they must stay whole."""
    from d2r_dask import cli
    from d2r_dask.models import nafnet

    def choices(command: str, option: str) -> list[str]:
        param = next(p for p in cli.cli.commands[command].params if p.name == option)
        return [c for c in param.type.choices if c != "auto"]

    assert choices("train-dgean", "preset") == list(dgean.PRESETS)
    assert choices("run", "dgean_preset") == list(dgean.PRESETS)
    assert choices("train-restorer", "preset") == list(nafnet.PRESETS)
    assert choices("run", "restorer_preset") == list(nafnet.PRESETS)
