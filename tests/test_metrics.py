"""Metrics against independent references, slab accumulation, baselines, edge cases."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from scipy import ndimage
from scipy.signal.windows import tukey

from d2r_dask.evaluation.metrics import (
    SSIM_WIN,
    MetricAccumulator,
    boundary_agreement,
    boundary_map,
    frc_curve,
    frc_resolution,
    interpolate_z,
    psnr,
    ssim,
)


def _pair(shape=(23, 29, 26), seed=0):
    """A smooth uint8 'image' volume and a noisy, slightly blurred copy of it."""
    rng = np.random.default_rng(seed)
    target = ndimage.gaussian_filter(rng.normal(size=shape), 1.2)
    target = np.clip(128 + 60 * target / target.std(), 0, 255).astype(np.uint8)
    pred = ndimage.gaussian_filter1d(target.astype(float), 0.8, axis=0) + rng.normal(scale=8, size=shape)
    return np.clip(np.rint(pred), 0, 255).astype(np.uint8), target


# --------------------------------------------------------------------------- PSNR


def test_psnr_matches_formula_and_edge_cases():
    pred, target = _pair()
    mse = np.mean((pred.astype(float) - target.astype(float)) ** 2)
    assert psnr(pred, target, data_range=255) == pytest.approx(10 * np.log10(255**2 / mse), rel=1e-12)
    assert psnr(target, target, data_range=255) == float("inf")
    with pytest.raises(ValueError, match="data_range"):
        psnr(pred, target, data_range=0)
    with pytest.raises(ValueError, match="shape"):
        psnr(pred, target[:-1], data_range=255)
    bad = target.astype(np.float32)
    bad[3, 4, 5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        psnr(bad, target, data_range=255)


# --------------------------------------------------------------------------- SSIM


def _ssim_slice_reference(x, y, data_range):
    """Wang et al. 2004 on one 2-D slice, written out: explicit 11x11 window, reflect padding."""
    r = 5
    g = np.exp(-0.5 * (np.arange(-r, r + 1) / 1.5) ** 2)
    w = np.outer(g, g) / np.outer(g, g).sum()

    def local_mean(a):
        padded = np.pad(a, r, mode="symmetric")  # scipy 'reflect' == numpy 'symmetric'
        return np.einsum("ijkl,kl->ij", sliding_window_view(padded, (2 * r + 1, 2 * r + 1)), w)

    x, y = x.astype(float), y.astype(float)
    ux, uy = local_mean(x), local_mean(y)
    vx, vy, vxy = local_mean(x * x) - ux**2, local_mean(y * y) - uy**2, local_mean(x * y) - ux * uy
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    return s[r:-r, r:-r].mean()


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_ssim_matches_direct_implementation(axis):
    pred, target = _pair(shape=(13, 17, 12))
    ref = np.mean([_ssim_slice_reference(np.take(pred, i, axis), np.take(target, i, axis), 255)
                   for i in range(pred.shape[axis])]) if min(np.delete(pred.shape, axis)) >= SSIM_WIN else None
    if ref is None:
        with pytest.raises(ValueError, match=f"{SSIM_WIN}x{SSIM_WIN}"):
            ssim(pred, target, data_range=255, axis=axis)
    else:
        assert ssim(pred, target, data_range=255, axis=axis) == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("dtype", [np.uint8, np.float64])
def test_ssim_matches_skimage(axis, dtype):
    metrics = pytest.importorskip("skimage.metrics")
    pred, target = _pair(shape=(15, 21, 19), seed=3)
    pred, target = pred.astype(dtype), target.astype(dtype)
    ref = np.mean([
        metrics.structural_similarity(np.take(pred, i, axis), np.take(target, i, axis), gaussian_weights=True,
                                      sigma=1.5, use_sample_covariance=False, data_range=255)
        for i in range(pred.shape[axis])])
    assert ssim(pred, target, data_range=255, axis=axis) == pytest.approx(ref, rel=1e-12)


def test_ssim_identical_is_one_and_validation():
    _, target = _pair()
    assert ssim(target, target, data_range=255, axis=1) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="11x11"):
        ssim(target[:, :10], target[:, :10], data_range=255, axis=0)
    with pytest.raises(ValueError, match="axis"):
        ssim(target, target, data_range=255, axis=3)
    with pytest.raises(ValueError, match="3-D"):
        ssim(target[0], target[0], data_range=255, axis=0)


# --------------------------------------------------------------------------- FRC


def _frc_reference(a, b, n_bins, spacing):
    """FRC over XZ slices with one loop per slice and per ring (independent of the binning code)."""
    nz, nx = a.shape[0], a.shape[2]
    win = np.outer(tukey(nz, 0.25), tukey(nx, 0.25))
    kz = np.fft.fftfreq(nz, spacing[0])[:, None]
    kx = np.fft.fftfreq(nx, spacing[2])[None, :]
    radius = np.hypot(kz, kx)
    step = min(0.5 / spacing[0], 0.5 / spacing[2]) / n_bins
    cross, pa, pb = np.zeros(n_bins), np.zeros(n_bins), np.zeros(n_bins)
    for y in range(a.shape[1]):
        fa = np.fft.fft2((a[:, y] - a[:, y].mean()) * win)
        fb = np.fft.fft2((b[:, y] - b[:, y].mean()) * win)
        for i in range(n_bins):
            ring = np.abs(radius / step - (i + 1)) < 0.5
            cross[i] += np.sum(fa[ring] * np.conj(fb[ring])).real
            pa[i] += np.sum(np.abs(fa[ring]) ** 2)
            pb[i] += np.sum(np.abs(fb[ring]) ** 2)
    return step * np.arange(1, n_bins + 1), cross / np.sqrt(pa * pb)


def test_frc_matches_reference_loop():
    pred, target = _pair(shape=(20, 5, 26))
    a, b = pred.astype(float), target.astype(float)
    freqs, ref = _frc_reference(a, b, n_bins=10, spacing=(10.0, 10.0, 10.0))
    curve = frc_curve(pred, target, axis_plane="xz", voxel_size_nm=10.0, n_bins=10)
    np.testing.assert_allclose(curve.freqs, freqs, rtol=1e-12)
    np.testing.assert_allclose(curve.ring, ref, rtol=1e-9)
    assert curve.plane == "xz" and set(curve.wedges) == {"z", "x"}


def test_frc_identical_volumes_reach_nyquist():
    _, target = _pair()
    for plane, axes in (("xz", ("z", "x")), ("yz", ("z", "y")), ("xy", ("y", "x"))):
        curve = frc_curve(target, target, axis_plane=plane, voxel_size_nm=10.0)
        np.testing.assert_allclose(curve.ring, 1.0, atol=1e-12)
        assert curve.freqs[-1] == pytest.approx(1 / 20)
        for name in ("ring",) + axes:
            assert curve.resolution(name) == pytest.approx(20.0)  # 2 x voxel size
    # anisotropic voxels: the ring stops at the coarser axis' Nyquist frequency
    curve = frc_curve(target, target, axis_plane="xz", voxel_size_nm=(40.0, 5.0, 5.0))
    assert curve.resolution("z") == pytest.approx(80.0)


def test_frc_z_wedge_tracks_axial_blur():
    """Blurring only along z makes the z-wedge resolution worse, monotonically; x stays at Nyquist."""
    rng = np.random.default_rng(1)
    gt = ndimage.gaussian_filter(rng.normal(size=(48, 24, 56)), 1.0)
    gt = gt / gt.std() * 30
    z_res = []
    for sigma in (1.5, 2.5, 3.5):
        blurred = ndimage.gaussian_filter1d(gt, sigma, axis=0) + rng.normal(scale=0.5, size=gt.shape)
        curve = frc_curve(blurred, gt, axis_plane="xz", voxel_size_nm=10.0)
        z_res.append(curve.resolution("z"))
        assert curve.resolution("x") < curve.resolution("z")
        assert curve.resolution("x") == pytest.approx(20.0, rel=0.1)
    assert all(b > 1.15 * a for a, b in zip(z_res, z_res[1:])), z_res


def test_frc_resolution_interpolates_and_documents_limits():
    freqs = np.array([0.01, 0.02, 0.03, 0.04])
    # crosses 1/7 between 0.02 (0.5) and 0.03 (0.0): f* = 0.02 + (0.5 - 1/7) / 0.5 * 0.01
    f_star = 0.02 + (0.5 - 1 / 7) / 0.5 * 0.01
    assert frc_resolution(freqs, np.array([0.9, 0.5, 0.0, 0.3])) == pytest.approx(1 / f_star)
    assert frc_resolution(freqs, np.array([0.9, np.nan, 0.5, 0.0])) == pytest.approx(
        1 / (0.03 + (0.5 - 1 / 7) / 0.5 * 0.01))
    assert frc_resolution(freqs, np.full(4, 0.99)) == pytest.approx(25.0)  # never crosses: 1 / freqs[-1]
    assert frc_resolution(freqs, np.array([0.1, 0.9, 0.9, 0.9])) == float("inf")  # nothing resolved
    assert frc_resolution(freqs, np.array([0.9, 0.5, 0.2, 0.1]), threshold=0.5) == pytest.approx(
        1 / (0.02 + 0.0 / 0.3 * 0.01))
    with pytest.raises(ValueError):
        frc_resolution(freqs, np.full(3, 0.5))
    with pytest.raises(ValueError):
        frc_resolution(freqs, np.full(4, np.nan))
    with pytest.raises(ValueError):
        frc_resolution(freqs[::-1], np.full(4, 0.5))


def test_frc_validation():
    _, target = _pair()
    with pytest.raises(ValueError, match="axis_plane"):
        frc_curve(target, target, axis_plane="zz", voxel_size_nm=10)
    with pytest.raises(ValueError, match="voxel_size"):
        frc_curve(target, target, axis_plane="xz", voxel_size_nm=-1)
    with pytest.raises(ValueError, match="too small"):
        frc_curve(target[:6], target[:6], axis_plane="xz", voxel_size_nm=10)
    bad = target.astype(float)
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        frc_curve(bad, target, axis_plane="xz", voxel_size_nm=10)


# --------------------------------------------------------------------------- accumulator


@pytest.mark.parametrize("axis, cuts", [
    (0, [0, 1, 2, 9, 10, 23]),  # 1-row slabs, thinner than the SSIM window
    (1, [0, 13, 14, 29]),
    (2, [0, 4, 26]),
    (1, [0, 29]),  # one slab
])
def test_accumulator_equals_one_shot(axis, cuts):
    pred, target = _pair(shape=(23, 29, 26), seed=7)
    acc = MetricAccumulator(255, (10.0, 8.0, 8.0))
    for a, b in zip(cuts, cuts[1:]):
        index = tuple(slice(a, b) if ax == axis else slice(None) for ax in range(3))
        acc.update(pred[index], target[index], axis)
    report = acc.result()
    assert report.n_voxels == pred.size
    assert report.psnr == pytest.approx(psnr(pred, target, data_range=255), rel=1e-9)
    for o, plane in enumerate(("xy", "xz", "yz")):
        assert report.ssim[plane] == pytest.approx(ssim(pred, target, data_range=255, axis=o), rel=1e-9)
    plane = ("xy", "xz", "yz")[axis]
    ref = frc_curve(pred, target, axis_plane=plane, voxel_size_nm=(10.0, 8.0, 8.0))
    assert report.frc.plane == plane
    np.testing.assert_allclose(report.frc.ring, ref.ring, rtol=1e-9)
    for name in ref.wedges:
        np.testing.assert_allclose(report.frc.wedges[name], ref.wedges[name], rtol=1e-9)
    assert report.to_dict()["ssim"] == dict(report.ssim)


def test_accumulator_validation():
    pred, target = _pair()
    acc = MetricAccumulator(255, 10.0)
    with pytest.raises(ValueError, match="update"):
        acc.result()
    acc.update(pred[:5], target[:5], 0)
    with pytest.raises(ValueError, match="axis"):
        acc.update(pred[:, :5], target[:, :5], 1)
    with pytest.raises(ValueError, match="11x11"):
        acc.result()  # only 5 z-slices so far: XZ and YZ slices are too small
    with pytest.raises(ValueError, match="11x11"):
        MetricAccumulator(255, 10.0).update(pred[:, :, :9], target[:, :, :9], 0)
    bad = target[:4].astype(float)
    bad[1, 1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        MetricAccumulator(255, 10.0).update(bad, target[:4], 0)
    with pytest.raises(ValueError, match="data_range"):
        MetricAccumulator(-1, 10.0)


# --------------------------------------------------------------------------- baselines


@pytest.mark.parametrize("method", ["nearest", "linear", "cubic"])
@pytest.mark.parametrize("factor", [1, 3, 4])
def test_interpolate_decimate_keeps_lr_slices_exactly(method, factor):
    rng = np.random.default_rng(2)
    lr = rng.integers(0, 256, size=(7, 5, 6)).astype(np.uint8)
    up = interpolate_z(lr, factor, mode="decimate", method=method)
    assert up.shape == (7 * factor, 5, 6) and up.dtype == np.float32
    np.testing.assert_array_equal(up[::factor], lr.astype(np.float32))


@pytest.mark.parametrize("mode", ["decimate", "mean"])
@pytest.mark.parametrize("method", ["linear", "cubic"])
def test_interpolate_reproduces_polynomials_in_the_interior(mode, method):
    s, n = 4, 9
    k = np.arange(n, dtype=float)[:, None, None]
    a, b = np.linspace(1, 2, 6).reshape(1, 2, 3), np.linspace(-3, 3, 6).reshape(1, 2, 3)
    coord = np.arange(n * s) / s if mode == "decimate" else (np.arange(n * s) - (s - 1) / 2) / s
    interior = (coord >= 0) & (coord <= n - 1)
    c = coord[:, None, None]
    up = interpolate_z(a + b * k, s, mode=mode, method=method)
    np.testing.assert_allclose(up[interior], (a + b * c)[interior], rtol=1e-5, atol=1e-4)
    cubic_data = 0.1 * k**3 - k**2 + 2 * k
    up = interpolate_z(cubic_data * a, s, mode=mode, method=method)
    exact = ((0.1 * c**3 - c**2 + 2 * c) * a)[interior]
    if method == "cubic":  # not-a-knot splines reproduce cubics exactly
        np.testing.assert_allclose(up[interior], exact, rtol=1e-5, atol=1e-4)
    else:  # linear interpolation cannot
        assert np.abs(up[interior] - exact).max() > 0.1


def test_interpolate_grid_and_edges():
    lr = np.arange(3, dtype=np.float32)[:, None, None] * np.ones((1, 2, 2), np.float32)
    # mean mode, s=2: HR slices sit at LR coordinates -0.25, 0.25, 0.75, 1.25, 1.75, 2.25
    lin = interpolate_z(lr, 2, mode="mean", method="linear")[:, 0, 0]
    np.testing.assert_allclose(lin, [0, 0.25, 0.75, 1.25, 1.75, 2])  # edges clamped
    near = interpolate_z(lr, 2, mode="mean", method="nearest")[:, 0, 0]
    np.testing.assert_array_equal(near, [0, 0, 1, 1, 2, 2])
    near = interpolate_z(lr, 4, mode="decimate", method="nearest")[:, 0, 0]
    np.testing.assert_array_equal(near, [0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2])  # ties round up
    assert interpolate_z(lr[:1], 3, mode="decimate", method="linear").shape == (3, 2, 2)


def test_interpolate_validation():
    lr = np.zeros((3, 4, 4), np.uint8)
    for kwargs, match in [({"factor": 0}, "factor"), ({"factor": 2.0}, "factor"), ({"mode": "avg"}, "mode"),
                          ({"method": "quadratic"}, "method"), ({"method": "cubic"}, "at least 4")]:
        args = {"factor": 2, "mode": "decimate", "method": "linear"} | kwargs
        with pytest.raises(ValueError, match=match):
            interpolate_z(lr, args.pop("factor"), **args)
    bad = lr.astype(float)
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        interpolate_z(bad, 2, mode="decimate", method="linear")


# --------------------------------------------------------------------------- boundaries


def test_boundary_map_finds_dark_sheets():
    vol = np.full((20, 24, 24), 180.0)
    vol[:, :, 11:13] = 60.0  # a dark membrane sheet at x = 11..12
    bmap = boundary_map(vol)
    assert bmap.dtype == np.float32 and bmap.min() >= 0 and bmap.max() <= 1
    profile = bmap[10, 12]
    assert profile.argmax() in (11, 12) and profile[11] > 0.9 and profile[:6].max() == 0
    assert not boundary_map(np.full((8, 8, 8), 5.0)).any()


def test_boundary_agreement_values_and_downstream_ordering():
    a = np.zeros((4, 4, 4))
    a[:, :2] = 1
    b = np.zeros((4, 4, 4))
    b[:, 1:3] = 1
    assert boundary_agreement(a, a) == 1.0
    assert boundary_agreement(a, b) == pytest.approx(0.5)  # |A&B| = 16, |A| + |B| = 64
    assert boundary_agreement(a, 1 - a) == 0.0
    assert boundary_agreement(np.zeros_like(a), np.zeros_like(a)) == 1.0
    # z-decimated + interpolated membranes agree worse with the truth than a noisy copy does
    rng = np.random.default_rng(4)
    gt = np.full((32, 32, 32), 170.0)
    for axis, pos in ((0, 9), (0, 22), (1, 15), (2, 7), (2, 25)):
        index = [slice(None)] * 3
        index[axis] = slice(pos, pos + 2)
        gt[tuple(index)] = 60.0
    gt_map = boundary_map(gt)
    noisy = boundary_map(gt + rng.normal(scale=5, size=gt.shape))
    interp = boundary_map(interpolate_z(gt[::4], 4, mode="decimate", method="linear"))
    assert boundary_agreement(noisy, gt_map) > boundary_agreement(interp, gt_map) + 0.1
    with pytest.raises(ValueError, match="threshold"):
        boundary_agreement(a, b, threshold=1.5)
