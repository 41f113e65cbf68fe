"""The stripe score (``metrics.axial_periodicity``): spectral peaks at the LR-slice period along z.

Synthetic volumes: smooth isotropic noise scores ~1; brightness or sharpness modulated every
``s`` slices scores far above; slab accumulation equals the whole-volume numbers; short
volumes and factor 1 give NaN with a reason."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from scipy import ndimage

from d2r_dask.evaluation.metrics import (
    StripeAccumulator,
    _peak_ratios,
    axial_periodicity,
    interpolate_z,
)

S = 4
HEADLINE = ("stripe_ratio_z", "stripe_vs_gt", "stripe_vs_xy")


def smooth(shape=(64, 20, 72), sigma=1.5, seed=1) -> np.ndarray:
    """Gaussian-filtered noise: isotropic, with a smooth spectrum (uint8-like range, float)."""
    v = ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=shape), sigma)
    return 128 + 40 * v / v.std()


def modulated(v: np.ndarray, s: int, depth: float = 0.1) -> np.ndarray:
    z = np.arange(v.shape[0])[:, None, None]
    return v * (1 + depth * np.cos(2 * np.pi * z / s))


def sharp_every(v: np.ndarray, s: int) -> np.ndarray:
    """Every s-th slice as is, the others blurred in-plane (a restorer that only sees LR slices sharp)."""
    out = ndimage.gaussian_filter(v, (0, 1.5, 1.5))
    out[::s] = v[::s]
    return out


def headline(score) -> dict[str, float]:
    d = score.to_dict()
    return {k: d[k] for k in HEADLINE}


def test_peak_ratio_is_one_on_a_gaussian_spectrum_and_sees_a_line():
    """A spectrum that is a parabola in log-power has no peak: ratio 1 to rounding, also at
    Nyquist (where a real signal's spectrum is even, as this one is); a line that doubles one
    LR-slice bin reads 2 there and 1 elsewhere."""
    n = 64
    f = np.arange(n // 2 + 1) / n
    power = np.exp(20 * (f - 0.5) ** 2)  # falls towards Nyquist, flat there
    np.testing.assert_allclose(_peak_ratios(power, 8), np.ones(4), rtol=1e-9)
    power[3 * n // 8] *= 2  # frequency 3/8
    np.testing.assert_allclose(_peak_ratios(power, 8), [1, 1, 2, 1], rtol=1e-9)
    power[n // 2] *= 5  # Nyquist
    assert _peak_ratios(power, 8)[3] == pytest.approx(5, rel=1e-9)


def test_smooth_isotropic_volume_scores_about_one():
    v = smooth()
    for s in (2, 3, 4, 8):
        h = headline(axial_periodicity(v, s, reference=v))
        assert h["stripe_vs_gt"] == pytest.approx(1.0, rel=1e-12), s  # the volume is its own truth
        assert 0.3 < h["stripe_ratio_z"] < 1.5 and 0.7 < h["stripe_vs_xy"] < 1.5, (s, h)
    other = smooth(seed=2)  # an independent realisation as the truth
    h = headline(axial_periodicity(v, S, reference=other))
    assert 0.7 < h["stripe_vs_gt"] < 1.5, h


def test_brightness_modulation_at_the_lr_period_scores_high():
    v = smooth()
    score = axial_periodicity(modulated(v, S), S, reference=v)
    h = headline(score)
    assert min(h.values()) > 10, h  # ~30: a line in the intensity channel
    assert score.ratio_z["intensity"][0] > 10 and score.ratio_x["intensity"][0] < 1.5
    assert score.freqs.tolist() == [0.25, 0.5]
    # the same modulation at another period is no stripe at period S (the ratios of ratios
    # scatter more: this volume has almost no power near Nyquist to compare with)
    off = headline(axial_periodicity(modulated(v, 7), S, reference=v))
    assert off["stripe_ratio_z"] < 1.5 and max(off.values()) < 2, off


def test_sharp_lr_slices_between_blurred_ones_score_high():
    """Mean brightness is not modulated, so the intensity channel stays ~1; the sharpness
    channel, (dv/dx)^2 along z, has the line."""
    v = smooth()
    score = axial_periodicity(sharp_every(v, S), S, reference=v)
    h = headline(score)
    assert min(h.values()) > 3, h
    assert np.all(score.ratio_z["sharpness"] > 3)
    assert np.all(score.ratio_z["intensity"] < 1.5)


def test_linear_interpolation_of_a_decimated_volume():
    """Linear interpolation keeps the LR slices sharp and blurs the ones between: stripes in the
    sharpness channel, a notch (ratio << 1) in the intensity one. Printed for the record; the
    fib25 sample scores 4.0 (x4) and 3.9 (x8) against its ground truth."""
    v = smooth()
    for s in (2, 4, 8):
        lin = interpolate_z(v[::s], s)
        score = axial_periodicity(lin, s, reference=v)
        h = headline(score)
        print(f"linear x{s}: " + ", ".join(f"{k} {x:.2f}" for k, x in h.items()))
        assert np.all(score.ratio_z["intensity"] < 1), s  # the triangle kernel's zeros at k/s
        assert h["stripe_vs_gt"] > 2 and h["stripe_vs_xy"] > 2, (s, h)


@pytest.mark.parametrize("cuts", [(20,), (7, 13), (1, 5, 5, 9)])
def test_slabs_give_the_whole_volume_numbers(cuts):
    v = sharp_every(smooth(), S)
    truth = smooth(seed=3)
    whole = axial_periodicity(v, S, reference=truth).to_dict()
    for axis in (1, 2):
        acc = StripeAccumulator(S)
        edges = np.cumsum((0,) + cuts) if axis == 1 else np.linspace(0, v.shape[2], len(cuts) + 1).astype(int)
        assert edges[-1] == v.shape[axis]
        for a, b in zip(edges[:-1], edges[1:]):
            sl = (slice(None), slice(a, b)) if axis == 1 else (slice(None), slice(None), slice(a, b))
            acc.update(v[sl], truth[sl], axis=axis)
        got = acc.result().to_dict()
        if axis == 1:  # same columns and rows, another summation order
            for key in ("ratio_z", "ratio_x", "ratio_gt"):
                for c in whole[key]:
                    np.testing.assert_allclose(got[key][c], whole[key][c], rtol=1e-9)
        else:  # x-slabs: x becomes y (the slabs' x extent is whole only per slab): still striped
            assert got["stripe_vs_gt"] > 3
    assert whole["stripe_vs_gt"] > 3 and whole["segment"] == 64


def test_short_volumes_and_factor_one_give_nan_with_a_reason(caplog):
    v = smooth((15, 12, 40))
    with caplog.at_level(logging.INFO, logger="d2r_dask.evaluation.metrics"):
        score = axial_periodicity(v, S, reference=v)
    h = headline(score)
    assert all(math.isnan(x) for x in h.values()) and score.segment == 0
    assert "15 z" in score.reason and "16" in score.reason and score.reason in caplog.text
    assert axial_periodicity(smooth((16, 12, 40)), S).segment == 16  # 4 s is enough
    one = axial_periodicity(smooth((32, 12, 40)), 1)
    assert one.freqs.size == 0 and math.isnan(one.stripe_ratio_z) and "factor 1" in one.reason
    assert one.to_dict()["ratio_z"] == {"intensity": [], "sharpness": []}
    # without a reference: vs_gt is NaN, the rest is there
    h = headline(axial_periodicity(modulated(smooth(), S), S))
    assert math.isnan(h["stripe_vs_gt"]) and h["stripe_vs_xy"] > 10


def test_stripe_accumulator_validation():
    v = smooth((32, 8, 40))
    with pytest.raises(ValueError, match="factor"):
        StripeAccumulator(0)
    with pytest.raises(ValueError, match="full z extent"):
        StripeAccumulator(S).update(v, v, axis=0)
    acc = StripeAccumulator(S)
    acc.update(v, v)
    with pytest.raises(ValueError, match="same z and x extents"):
        acc.update(v[:, :, :-1], v[:, :, :-1])
    with pytest.raises(ValueError, match="target slab with every update"):
        acc.update(v)
    with pytest.raises(ValueError, match="no slabs"):
        StripeAccumulator(S).result()
    with pytest.raises(ValueError, match="shape"):
        axial_periodicity(v, S, reference=v[:-1])
