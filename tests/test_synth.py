"""Synthetic vEM generator: exact tiling, laziness, appearance statistics, validation."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from d2r_dask.data import synth
from d2r_dask.data.synth import SynthParams, synth_block, synth_dask

# Small cells keep blocks cheap while still crossing several grid cells per block.
SMALL = SynthParams(cell_size=16, membrane_thickness=2.0)


def _assemble(offset, edges, *, seed, params):
    """Generate a volume piece by piece along the given per-axis cut positions."""
    shape = tuple(e[-1] for e in edges)
    out = np.full(shape, 7, np.uint8)
    for z0, z1 in zip(edges[0], edges[0][1:]):
        for y0, y1 in zip(edges[1], edges[1][1:]):
            for x0, x1 in zip(edges[2], edges[2][1:]):
                out[z0:z1, y0:y1, x0:x1] = synth_block(
                    (offset[0] + z0, offset[1] + y0, offset[2] + x0), (z1 - z0, y1 - y0, x1 - x0),
                    seed=seed, params=params)
    return out


@pytest.mark.parametrize("params", [SMALL, SynthParams(cell_size=20, blur_sigma=0.0, noise=0.0, warp=0.0)])
def test_pieces_equal_whole_bit_for_bit(params):
    # uneven pieces, 1-voxel slabs, negative offsets, pieces ending mid grid cell
    offset = (-7, 5, 1000)
    edges = ([0, 1, 12, 13, 33], [0, 17, 18, 40], [0, 9, 31])
    whole = synth_block(offset, (33, 40, 31), seed=11, params=params)
    np.testing.assert_array_equal(_assemble(offset, edges, seed=11, params=params), whole)


def test_default_params_tile_exactly():
    whole = synth_block((3, 50, 90), (20, 45, 37), seed=2)
    np.testing.assert_array_equal(_assemble((3, 50, 90), ([0, 9, 20], [0, 1, 45], [0, 30, 37]), seed=2, params=None),
                                  whole)


def test_dask_matches_block_with_uneven_chunks_and_is_lazy():
    vol = synth_dask((30, 41, 26), chunks=((7, 23), (20, 1, 20), (26,)), seed=4, params=SMALL)
    assert isinstance(vol, da.Array) and vol.dtype == np.uint8
    assert vol.chunks == ((7, 23), (20, 1, 20), (26,))
    np.testing.assert_array_equal(vol.compute(scheduler="synchronous"),
                                  synth_block((0, 0, 0), (30, 41, 26), seed=4, params=SMALL))
    # a sub-window computes only its own blocks and equals the same window of the whole
    np.testing.assert_array_equal(vol[5:9, 18:22, 3:4].compute(scheduler="synchronous"),
                                  synth_block((5, 18, 3), (4, 4, 1), seed=4, params=SMALL))


def test_dask_graph_names_are_deterministic():
    a = synth_dask((16, 16, 16), chunks=8, seed=1, params=SMALL)
    b = synth_dask((16, 16, 16), chunks=8, seed=1, params=SMALL)
    c = synth_dask((16, 16, 16), chunks=8, seed=2, params=SMALL)
    assert a.name == b.name != c.name


def test_volume_larger_than_memory_is_lazy():
    vol = synth_dask((2048, 2048, 4096), chunks=(64, 128, 128))
    assert vol.nbytes == 2**34  # 16 GiB described, nothing generated
    np.testing.assert_array_equal(vol[2040:2044, 0:3, 4090:4093].compute(scheduler="synchronous"),
                                  synth_block((2040, 0, 4090), (4, 3, 3)))


def test_seed_changes_everything_and_same_seed_repeats():
    a = synth_block((0, 0, 0), (8, 24, 24), seed=0, params=SMALL)
    np.testing.assert_array_equal(a, synth_block((0, 0, 0), (8, 24, 24), seed=0, params=SMALL))
    b = synth_block((0, 0, 0), (8, 24, 24), seed=1, params=SMALL)
    assert np.mean(a != b) > 0.9


def test_looks_like_neuropil():
    """Histogram and structure of a default block: dark membranes, mid-grey cytoplasm, isotropy."""
    v = synth_block((0, 0, 0), (64, 64, 64), seed=5)
    assert v.dtype == np.uint8 and v.shape == (64, 64, 64)
    dark = np.mean(v < 95)
    assert 0.05 < dark < 0.4, dark  # membranes + organelles + dark cells, not the majority
    assert 125 <= np.median(v) <= 180
    assert np.percentile(v, 99) < 230 and np.percentile(v, 1) > 30
    # isotropic structure: mean absolute gradient along z, y, x within 15 % of each other
    grads = [np.abs(np.diff(v.astype(np.int16), axis=a)).mean() for a in range(3)]
    assert max(grads) / min(grads) < 1.15, grads


def test_noise_level_is_calibrated_after_blur():
    """``noise`` is the std of the noise in the output: compare renders with and without it."""
    clean = synth_block((0, 0, 0), (32, 48, 48), seed=3, params=SynthParams(noise=0.0)).astype(float)
    noisy = synth_block((0, 0, 0), (32, 48, 48), seed=3, params=SynthParams(noise=12.0)).astype(float)
    assert np.std(noisy - clean) == pytest.approx(12.0, rel=0.08)


def test_box_muller_noise_is_standard_normal():
    c = np.arange(-20, 44)
    n = synth._gaussian_noise(9, 1, c, c, c).astype(np.float64).ravel()
    assert abs(n.mean()) < 0.005
    assert n.std() == pytest.approx(1.0, abs=0.005)
    assert np.mean(np.abs(n) > 1.96) == pytest.approx(0.05, abs=0.003)


@pytest.mark.parametrize("kwargs", [
    {"cell_size": 4}, {"cell_size": 20.0}, {"cell_jitter": 0.7}, {"warp": 0.35}, {"noise": -1.0},
    {"noise": float("nan")}, {"membrane_thickness": 30.0}, {"vesicle_density": 1.5}, {"blur_sigma": -0.1},
])
def test_params_validation(kwargs):
    with pytest.raises(ValueError):
        SynthParams(**kwargs)


@pytest.mark.parametrize("offset, shape", [((0, 0), (4, 4, 4)), ((0, 0, 0), (4, 0, 4)), ((0, 0, 0.5), (4, 4, 4))])
def test_bad_boxes_are_rejected(offset, shape):
    with pytest.raises(ValueError, match="offset|shape"):
        synth_block(offset, shape)


def test_bad_seed_is_rejected():
    with pytest.raises(ValueError, match="seed"):
        synth_block((0, 0, 0), (4, 4, 4), seed=1.5)
