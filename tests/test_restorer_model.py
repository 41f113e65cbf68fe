"""Stage I/II restorer: conditional NAFNet, IR-SDE (objective, samplers) and keyed noise."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from d2r_dask.models.nafnet import (
    PRESETS,
    ChannelMean,
    ConditionalNAFNet,
    NAFNetConfig,
    nafnet_config,
)
from d2r_dask.data.noise import keyed_normal
from d2r_dask.models.sde import IRSDE, SDEConfig

TINY = PRESETS["tiny"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def smooth_pair(height: int = 24, width: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth x0 in [0, 1] and its condition mu: 4-row means, repeated (an axial degradation)."""
    yy, xx = torch.meshgrid(torch.arange(height * 1.0), torch.arange(width * 1.0), indexing="ij")
    x0 = (0.5 + 0.3 * torch.sin(yy / 3) * torch.cos(xx / 5)).view(1, 1, height, width)
    mu = F.avg_pool2d(x0, (4, 1)).repeat_interleave(4, dim=2)
    return x0, mu


def oracle(sde: IRSDE, x0: torch.Tensor):
    """A perfect noise predictor for a known x0: eps = (x_t - E[x_t | x0]) / sigma_bar_t."""

    def model(inp: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        mu = inp[:, 1:2]
        x_t = inp[:, 0:1] + mu
        mean = sde.q_sample(x0, mu, t, torch.zeros_like(x0))
        return (x_t - mean) / sde.sigma_bars.to(x0)[t].view(-1, 1, 1, 1)

    return model


# -- NAFNet ----------------------------------------------------------------------------------


@pytest.mark.parametrize("height, width", [(24, 40), (23, 37), (8, 8), (5, 3), (1, 1)])
def test_output_shape_any_size(height, width):
    model = ConditionalNAFNet(TINY).eval()
    assert model.size_multiple == 8
    x = torch.randn(2, 2, height, width)
    assert model(x, torch.tensor([3, 97])).shape == (2, 1, height, width)
    assert model(x, 50.0).shape == (2, 1, height, width)  # a scalar t is broadcast


def test_presets_build_with_expected_sizes():
    counts = {name: ConditionalNAFNet(cfg).n_parameters() for name, cfg in PRESETS.items()}
    # tiny 340,353; small 4,917,857; full (the authors' width 64, [14,1,1,1]/1/[1,1,1,1]) 20,325,825.
    assert counts == {"tiny": 340_353, "small": 4_917_857, "full": 20_325_825}


def test_parameter_names_match_the_authors_module():
    keys = set(ConditionalNAFNet(TINY).state_dict())
    for key in ("time_mlp.1.weight", "time_mlp.3.bias", "intro.weight", "ending.bias",
                "encoders.0.0.norm1.g", "encoders.2.0.sca.1.weight", "downs.2.weight",
                "middle_blks.0.mlp.1.weight", "ups.0.0.weight", "decoders.2.0.beta"):
        assert key in keys


def test_config_round_trip_and_validation():
    for cfg in PRESETS.values():
        assert NAFNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert nafnet_config("tiny") is TINY
    assert nafnet_config(TINY.to_dict()) == TINY
    assert nafnet_config(dict(width=8, enc_blocks=[1], middle_blocks=0, dec_blocks=[2])).enc_blocks == (1,)
    bad = [
        dict(width=15, enc_blocks=(1,), middle_blocks=1, dec_blocks=(1,)),
        dict(width=16, enc_blocks=(1, 1), middle_blocks=1, dec_blocks=(1,)),
        dict(width=16, enc_blocks=(1,), middle_blocks=-1, dec_blocks=(1,)),
        dict(width=16, enc_blocks=(1,), middle_blocks=1, dec_blocks=(1,), sca_window=0),
        dict(width=16, enc_blocks=(1,), middle_blocks=1, dec_blocks=(1,), depth=3),
    ]
    for spec in bad:
        with pytest.raises(ValueError):
            nafnet_config(spec)
    with pytest.raises(ValueError, match="preset"):
        nafnet_config("huge")


def test_local_channel_mean():
    x = torch.randn(2, 3, 7, 11)
    torch.testing.assert_close(ChannelMean(None)(x), x.mean(dim=(2, 3), keepdim=True))
    torch.testing.assert_close(ChannelMean(21)(x), x.mean(dim=(2, 3), keepdim=True).expand_as(x))
    box = ChannelMean(3)(x)  # interior pixel: the plain 3x3 mean; corner: the 2x2 inside
    torch.testing.assert_close(box[..., 3, 5], x[..., 2:5, 4:7].mean(dim=(-2, -1)))
    torch.testing.assert_close(box[..., 0, 0], x[..., :2, :2].mean(dim=(-2, -1)))


def test_receptive_radius_bounds_the_influence_of_a_pixel():
    model = ConditionalNAFNet(replace(TINY, sca_window=8)).eval().double()
    assert ConditionalNAFNet(TINY).receptive_radius is None
    radius = model.receptive_radius
    assert radius == 55
    with torch.no_grad():
        for block in model.modules():  # zero-initialised residual scales would hide the blocks
            if hasattr(block, "beta"):
                block.beta.fill_(1.0)
                block.gamma.fill_(1.0)
        x = torch.randn(1, 2, 16, 160, dtype=torch.float64)
        bumped = x.clone()
        bumped[0, :, 8, 80] += 10.0
        t = torch.tensor([40])
        # float64 so that the rounding the cumsum of local SCA leaks (~1e-16) stays far below
        # the influence, which decays fast with distance at random init
        changed = (model(bumped, t) - model(x, t)).abs().amax(dim=(0, 1, 2)) > 1e-13
    columns = torch.nonzero(changed).flatten()
    reach = int(max(80 - columns.min(), columns.max() - 80))
    assert radius // 2 < reach <= radius


def test_channels_last_and_compile_fullgraph():
    model = ConditionalNAFNet(replace(TINY, sca_window=16)).eval()
    x, t = torch.randn(1, 2, 24, 40), torch.tensor([7])
    with torch.no_grad():
        expected = model(x, t)
        compiled = torch.compile(model, backend="eager", fullgraph=True)  # fails on any graph break
        torch.testing.assert_close(compiled(x, t), expected)
        model = model.to(memory_format=torch.channels_last)
        channels_last = model(x.contiguous(memory_format=torch.channels_last), t)
        torch.testing.assert_close(channels_last, expected, atol=1e-5, rtol=1e-5)


# -- IR-SDE ----------------------------------------------------------------------------------


def authors_schedule(T: int = 100, s: float = 0.008, eps: float = 0.005, sigma_max: float = 50 / 255):
    """The authors' IRSDE._initialize, in float64: raw thetas, their dt, and sigma_bars."""
    x = np.linspace(0, T + 2, T + 3)
    alphas_cumprod = np.cos(((x / (T + 2)) + s) / (1 + s) * math.pi * 0.5) ** 2
    thetas = 1 - (alphas_cumprod / alphas_cumprod[0])[1:-1]
    thetas_cumsum = np.cumsum(thetas) - thetas[0]
    dt = -1 / thetas_cumsum[-1] * math.log(eps)
    sigmas = np.sqrt(sigma_max**2 * 2 * thetas)
    sigma_bars = np.sqrt(sigma_max**2 * (1 - np.exp(-2 * thetas_cumsum * dt)))
    return thetas, thetas_cumsum, dt, sigmas, sigma_bars


def test_schedule_matches_the_authors_and_is_stationary_at_T():
    sde = IRSDE()
    thetas, thetas_cumsum, dt, sigmas, sigma_bars = authors_schedule()
    np.testing.assert_allclose(sde.theta_bars.numpy(), thetas_cumsum * dt, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(sde.thetas.numpy()[1:], thetas[1:] * dt, rtol=1e-12)
    np.testing.assert_allclose(sde.sigmas.numpy()[1:], sigmas[1:] * math.sqrt(dt), rtol=1e-12)
    np.testing.assert_allclose(sde.sigma_bars.numpy(), sigma_bars, rtol=1e-12, atol=1e-15)
    assert sde.sigma_bars[0] == 0
    assert math.exp(-sde.theta_bars[-1]) == pytest.approx(0.005, rel=1e-12)
    assert float(sde.sigma_bars[-1]) == pytest.approx(50 / 255, rel=1e-4)
    # the marginal variance composes step by step: s_t^2 = e^{-2 theta_t} s_{t-1}^2 + lam^2 (1 - e^{-2 theta_t})
    a2 = torch.exp(-2 * sde.thetas[1:])
    composed = a2 * sde.sigma_bars[:-1] ** 2 + (50 / 255) ** 2 * (1 - a2)
    torch.testing.assert_close(composed, sde.sigma_bars[1:] ** 2)


def test_sde_config_round_trip_and_validation():
    cfg = SDEConfig(T=20, eps=0.01)
    assert SDEConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    for bad in (dict(T=0), dict(sigma_max=0.0), dict(schedule="linear"), dict(eps=1.0), dict(lam=1)):
        with pytest.raises(ValueError):
            SDEConfig.from_dict(bad)


def test_q_sample_statistics():
    sde = IRSDE()
    x0, mu = torch.full((4, 1, 64, 64), 0.8), torch.full((4, 1, 64, 64), 0.3)
    t = 40
    x_t = sde.q_sample(x0, mu, t, torch.randn_like(x0))
    expected_mean = 0.3 + 0.5 * math.exp(-float(sde.theta_bars[t]))
    assert float(x_t.mean()) == pytest.approx(expected_mean, abs=3e-3)
    assert float(x_t.std()) == pytest.approx(float(sde.sigma_bars[t]), rel=0.02)
    noise = torch.randn_like(x0)
    t_vec = torch.tensor([t, 1, 100, t])
    batched = sde.q_sample(x0, mu, t_vec, noise)
    torch.testing.assert_close(batched[0], sde.q_sample(x0, mu, t, noise)[0])
    torch.testing.assert_close(batched[2], sde.q_sample(x0, mu, 100, noise)[2])


@pytest.mark.parametrize("t", [1, 2, 50, 100])
def test_optimal_reverse_state_is_the_posterior_mean(t):
    """Condition x_{t-1} ~ N(mu + C (x0 - mu), lam^2 (1 - C^2)) on x_t = mu + A (x_{t-1} - mu) + noise."""
    sde = IRSDE()
    x0, mu = torch.rand(1, 1, 8, 8, dtype=torch.float64), torch.rand(1, 1, 8, 8, dtype=torch.float64)
    x_t = sde.q_sample(x0, mu, t, torch.randn_like(x0))
    lam2 = (50 / 255) ** 2
    a = math.exp(-float(sde.thetas[t]))
    c = math.exp(-float(sde.theta_bars[t - 1]))
    prior_var, lik_var = lam2 * (1 - c**2), lam2 * (1 - a**2)
    if prior_var == 0:  # t = 1: x_0 is known
        expected = x0
    else:
        precision = 1 / prior_var + a**2 / lik_var
        expected = ((mu + c * (x0 - mu)) / prior_var + a * (x_t - mu + a * mu) / lik_var) / precision
    torch.testing.assert_close(sde.optimal_reverse_state(x_t, x0, mu, t), expected)
    batched = sde.optimal_reverse_state(x_t, x0, mu, torch.tensor([t]))
    torch.testing.assert_close(batched, expected)


def test_reverse_sde_step_is_the_authors_euler_maruyama():
    sde = IRSDE()
    thetas, _, dt, sigmas, _ = authors_schedule()
    x, mu, score, z = (torch.rand(1, 1, 4, 4, dtype=torch.float64) for _ in range(4))
    for t in (1, 37, 100):
        expected = x - (thetas[t] * (mu - x) - sigmas[t] ** 2 * score) * dt - sigmas[t] * z * math.sqrt(dt)
        torch.testing.assert_close(sde.reverse_sde_step(x, mu, score, t, z), expected)
    torch.testing.assert_close(sde.score_from_noise(z, 37), -z / float(sde.sigma_bars[37]))


def test_n_evaluations_time_grid_and_validation():
    sde = IRSDE()
    assert sde.n_evaluations("sde") == 100
    assert sde.n_evaluations("sde", 25) == 25
    assert sde.n_evaluations("ddim", 10) == 10
    assert sde.n_evaluations("posterior", 100) == 100
    for steps in (1, 3, 7, 33, 99, 100):
        grid = sde.time_grid(steps)
        assert len(grid) == steps + 1 and grid[0] == 100 and grid[-1] == 0
        assert all(a > b for a, b in zip(grid, grid[1:]))
    assert sde.time_grid(100) == list(range(100, -1, -1))
    for sampler, steps in (("ddpm", 10), ("ddim", None), ("ddim", 0), ("ddim", 101), ("sde", True), ("posterior", 2.0)):
        with pytest.raises(ValueError):
            sde.n_evaluations(sampler, steps)
    model = ConditionalNAFNet(TINY)
    with pytest.raises(ValueError, match="4D"):
        sde.sample(model, torch.zeros(1, 8, 8), sampler="ddim", steps=2)
    with pytest.raises(ValueError, match="noise_fn"):
        sde.sample(model, torch.zeros(1, 1, 8, 8), sampler="ddim", steps=2, noise_fn=lambda k, shape: torch.zeros(3))


def test_training_reduces_the_loss_on_a_fixed_batch():
    sde = IRSDE()
    model = ConditionalNAFNet(TINY)
    x0, mu = smooth_pair(32, 32)
    x0 = torch.cat([x0, x0.flip(-1)])
    mu = torch.cat([mu, mu.flip(-1)])

    def held_out_loss(predictor) -> float:  # the same timesteps and noise every time
        with torch.no_grad():
            return sum(
                float(sde.training_loss(predictor, x0, mu, generator=torch.Generator().manual_seed(seed)))
                for seed in range(8)
            ) / 8

    before = held_out_loss(model)
    predicts_no_noise = held_out_loss(lambda inp, t: torch.zeros_like(inp[:, :1]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for step in range(30):
        loss = sde.training_loss(model, x0, mu, generator=torch.Generator().manual_seed(100 + step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = held_out_loss(model)
    # ~0.45x after 30 steps over a few init seeds; the untrained net is no better than zeros
    assert math.isfinite(after) and after < 0.7 * min(before, predicts_no_noise)


# -- samplers --------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler, steps", [("sde", None), ("sde", 7), ("ddim", 100), ("ddim", 4), ("posterior", 4)])
def test_samplers_shape_determinism_and_seeds(sampler, steps):
    sde = IRSDE()
    model = ConditionalNAFNet(TINY).eval()
    mu = torch.rand(1, 1, 12, 21)

    def run(seed: int) -> torch.Tensor:
        return sde.sample(model, mu, sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(seed))

    out = run(1)
    assert out.shape == mu.shape and out.dtype == mu.dtype and torch.isfinite(out).all()
    torch.testing.assert_close(run(1), out, rtol=0, atol=0)
    assert not torch.equal(run(2), out)


def test_noise_fn_numbering_and_keyed_determinism():
    sde = IRSDE()
    model = ConditionalNAFNet(TINY).eval()
    mu = torch.rand(1, 1, 16, 24)
    y, x = np.arange(16)[:, None], np.arange(24)[None, :]
    expected_calls = {"sde": [0, 1, 2, 3, 4, 5], "posterior": [0, 1, 2, 3, 4], "ddim": [0]}
    for sampler, calls in expected_calls.items():
        seen: list[int] = []

        def keyed(k: int, shape: torch.Size, seed: int = 5) -> torch.Tensor:
            seen.append(k)
            return torch.from_numpy(keyed_normal(seed, k, y, x)).view(shape)

        first = sde.sample(model, mu, sampler=sampler, steps=5, noise_fn=keyed)
        assert seen == calls
        again = sde.sample(model, mu, sampler=sampler, steps=5, noise_fn=keyed)
        torch.testing.assert_close(again, first, rtol=0, atol=0)
        other = sde.sample(model, mu, sampler=sampler, steps=5, noise_fn=lambda k, shape: keyed(k, shape, seed=6))
        assert not torch.equal(other, first)


@pytest.mark.parametrize(
    "sampler, steps, tolerance",
    [("ddim", 100, 1e-5), ("ddim", 5, 1e-5), ("ddim", 1, 1e-4), ("posterior", 100, 1e-5), ("posterior", 5, 1e-5),
     ("sde", None, 0.01), ("sde", 20, 0.03)],
)
def test_samplers_recover_x0_with_a_perfect_model(sampler, steps, tolerance):
    sde = IRSDE()
    x0, mu = smooth_pair()
    out = sde.sample(oracle(sde, x0), mu, sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(0))
    assert float((mu - x0).abs().mean()) > 0.03  # the condition alone is far off
    assert float((out - x0).abs().mean()) < tolerance


def test_posterior_step_at_full_resolution_is_the_optimal_reverse_state():
    sde = IRSDE()
    x0, mu = smooth_pair(8, 16)
    perfect = oracle(sde, x0)
    states: list[torch.Tensor] = []

    def recording(inp: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        states.append(inp[:, 0:1] + inp[:, 1:2])
        return perfect(inp, t)

    zeros_after_start = lambda k, shape: torch.randn(shape) if k == 0 else torch.zeros(shape)  # noqa: E731
    sde.sample(recording, mu, sampler="posterior", steps=100, noise_fn=zeros_after_start)
    torch.testing.assert_close(states[1], sde.optimal_reverse_state(states[0], x0, mu, 100))
    torch.testing.assert_close(states[50], sde.optimal_reverse_state(states[49], x0, mu, 51))


def test_x0_range_clamps_the_prediction():
    sde = IRSDE()
    x0, mu = smooth_pair()
    lifted = x0 + 2.0  # outside [0, 1]: a clamped ddim lands on the clamp
    out = sde.sample(oracle(sde, lifted), mu, sampler="ddim", steps=3, x0_range=(0.0, 1.0),
                     generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, torch.ones_like(out), atol=1e-4, rtol=0)
