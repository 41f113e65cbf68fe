"""Counter-based keyed noise: distribution, tiling independence, a fixed function."""

from __future__ import annotations

import numpy as np
import pytest

from d2r_dask.data.noise import keyed_normal


def test_keyed_normal_distribution_and_independence():
    z, x = np.arange(256)[:, None], np.arange(256)[None, :]
    field = keyed_normal(0, 0, z, x)
    assert field.dtype == np.float32 and field.shape == (256, 256)
    a = field.astype(np.float64)
    assert abs(a.mean()) < 0.02 and abs(a.std() - 1) < 0.02
    assert abs(np.mean(a**4) - 3) < 0.1  # Gaussian kurtosis
    assert abs(np.mean(np.abs(a) > 1.96) - 0.05) < 0.005

    def corr(u: np.ndarray, v: np.ndarray) -> float:
        return float(np.corrcoef(u.ravel(), v.ravel())[0, 1])

    assert abs(corr(a[:, 1:], a[:, :-1])) < 0.02
    assert abs(corr(a[1:], a[:-1])) < 0.02
    assert abs(corr(a, a.T)) < 0.02  # coordinate order matters
    assert abs(corr(a, keyed_normal(0, 1, z, x))) < 0.02
    assert abs(corr(a, keyed_normal(1, 0, z, x))) < 0.02


def test_keyed_normal_is_independent_of_tiling():
    z, y, x = np.arange(-3, 9), np.arange(17), np.arange(1000, 1030)
    whole = keyed_normal(42, 7, z[:, None, None], y[None, :, None], x[None, None, :])
    mesh = keyed_normal(42, 7, *np.meshgrid(z, y, x, indexing="ij"))
    np.testing.assert_array_equal(mesh, whole)
    tiled = np.empty_like(whole)
    for zs in (slice(0, 5), slice(5, 12)):
        for ys in (slice(0, 3), slice(3, 17)):
            for xs in (slice(0, 11), slice(11, 29), slice(29, 30)):
                tiled[zs, ys, xs] = keyed_normal(42, 7, z[zs, None, None], y[None, ys, None], x[None, None, xs])
    np.testing.assert_array_equal(tiled, whole)
    assert float(keyed_normal(42, 7, 4, 0, 1000)) == whole[7, 0, 0]  # scalars broadcast too


def test_keyed_normal_is_a_fixed_function():
    """Pinned values: a change of the hash would silently change every stored result."""
    values = keyed_normal(0, 0, np.arange(4))
    np.testing.assert_allclose(values, PINNED, rtol=1e-6)
    with pytest.raises(ValueError, match="integers"):
        keyed_normal(0, 0, np.linspace(0, 1, 4))
    assert keyed_normal(0, 0, -1) != keyed_normal(0, 0, 1)


PINNED = np.array([-0.091550164, -1.4442618, 1.0179495, -0.44024915], dtype=np.float32)


def test_hash_is_splitmix64():
    from d2r_dask.data import noise

    # splitmix64 from state 0: the first output is 0xE220A8397B1DCDAF
    assert noise._mix_int(0) == 0xE220A8397B1DCDAF
    keys = np.array([0, 1, 2**63 - 1, -1], dtype=np.int64).view(np.uint64)
    golden = 0x9E3779B97F4A7C15
    expected = [noise._mix_int((int(k) - golden) % 2**64) for k in keys]
    assert [int(h) for h in noise._mix(keys.copy())] == expected


def test_uniforms_are_uniform_and_keyed():
    from d2r_dask.data.noise import keyed_uniform

    u = keyed_uniform(3, 0, np.arange(200)[:, None], np.arange(300)[None, :])
    assert u.dtype == np.float64 and 0 <= u.min() and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.005
    np.testing.assert_array_equal(keyed_uniform(3, 0, np.arange(10, 20)[:, None], np.arange(300)[None, :]), u[10:20])


# --- the torch twin (the sampler's noise made on the device) ---------------------------------


def test_torch_keyed_noise_equals_numpy():
    """Same 64-bit hashes (int64 arithmetic emulating uint64) and the same float32 normals, on
    the CPU here; on a GPU the sampler runs this very code on the device."""
    import torch

    from d2r_dask.data.noise import keyed_uint64
    from d2r_dask.models import noise as device_noise

    z = np.arange(-7, 150, dtype=np.int64)
    y = np.array([0, 1, 2**31, 2**62, -(2**63)], dtype=np.int64)  # extremes: sign bits in every shift
    x = np.arange(2**40, 2**40 + 97, dtype=np.int64)
    mesh = (z[:, None, None], y[None, :, None], x[None, None, :])
    tmesh = tuple(torch.from_numpy(c) for c in mesh)
    for seed, stream in ((0, 0), (2**64 - 1, 1025), (-3, 7)):
        bits = device_noise.keyed_int64(seed, stream, *tmesh)
        np.testing.assert_array_equal(bits.numpy(), keyed_uint64(seed, stream, *mesh).view(np.int64))
        normals = device_noise.keyed_normal(seed, stream, *tmesh)
        assert normals.dtype == torch.float32 and tuple(normals.shape) == (157, 5, 97)
        # float64 log/cos may differ by an ulp between libraries: float32 rounding absorbs it
        np.testing.assert_allclose(normals.numpy(), keyed_normal(seed, stream, *mesh), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(device_noise.keyed_normal(0, 0, torch.arange(4)).numpy(), PINNED, rtol=1e-6)
    assert device_noise.keyed_normal(42, 7, torch.tensor(4), torch.tensor(0)).shape == ()  # scalars broadcast
    with pytest.raises(ValueError, match="integers"):
        device_noise.keyed_normal(0, 0, torch.linspace(0, 1, 4))


def test_restorer_noise_is_the_same_on_either_path(tmp_path):
    """The processor's device path (used off the CPU) draws the values of its NumPy path."""
    import torch
    from d2r_testkit import restorer_checkpoint

    from d2r_dask.stages.restore import RestorerProcessor

    proc = RestorerProcessor(str(restorer_checkpoint(tmp_path / "r")), "cpu", seed=9)
    keys = (np.arange(8, 40)[None, :, None], np.arange(5, 9)[:, None, None], np.arange(-3, 20)[None, None, :])
    shape = torch.Size((4, 1, 32, 23))
    assert not proc.noise_on_device  # on a GPU it is True
    on_cpu = proc._noise(1025, keys, shape)
    proc.noise_on_device = True  # the GPU's path, run here on the CPU device
    on_device = proc._noise(1025, keys, shape)
    assert on_device.shape == shape and on_device.dtype == torch.float32
    np.testing.assert_allclose(on_device.numpy(), on_cpu.numpy(), rtol=1e-6, atol=1e-7)
