"""Evaluation metrics: pure numpy functions, and an accumulator that gives the same numbers
when a volume too large for memory is fed slab by slab.

Arrays are ``(z, y, x)``. Orientations are named by their slice plane: ``"xy"`` slices are
perpendicular to axis 0 (z), ``"xz"`` to axis 1 (y), ``"yz"`` to axis 2 (x).

- :func:`psnr` and :func:`ssim` (mean 2-D SSIM over the slices of one orientation, the
  definition of Wang et al. 2004 as scikit-image computes it with ``gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False``; float64 throughout).
- :func:`frc_curve` / :func:`frc_resolution`: Fourier ring correlation summed over all slices
  of one orientation, over full rings and over wedges around each in-plane axis; the wedge
  around ``k_z`` measures resolution along z specifically.
- :class:`MetricAccumulator`: the same PSNR, SSIM and FRC from slabs.
- :func:`axial_periodicity` / :class:`StripeAccumulator`: stripes at the LR-slice period
  along z (power-spectrum peaks at k/s cycles/voxel against their neighbours, along z vs x).
- :func:`interpolate_z`: nearest / linear / cubic z-upsampling baselines on the project's grid.
- :func:`boundary_map` / :func:`boundary_agreement`: the downstream membrane check.

One file for the metrics of the evaluation protocol (pure numpy, no I/O), so every score in
a report is defined in one place; each metric is a few short functions read top-down.
"""

from __future__ import annotations

from collections.abc import Mapping
import logging
from dataclasses import dataclass

import numpy as np
from scipy import fft, interpolate, ndimage
from scipy.signal import windows
from scipy.signal.windows import tukey

__all__ = [
    "FRCCurve",
    "MetricAccumulator",
    "MetricReport",
    "StripeAccumulator",
    "StripeScore",
    "axial_periodicity",
    "boundary_agreement",
    "boundary_map",
    "frc_curve",
    "frc_resolution",
    "interpolate_z",
    "psnr",
    "ssim",
]

AXES = ("z", "y", "x")
PLANES = ("xy", "xz", "yz")  # indexed by the axis the slices are perpendicular to

# SSIM as Wang et al. 2004 / skimage(gaussian_weights=True): window radius int(3.5 * 1.5 + 0.5).
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
SSIM_PAD = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)
SSIM_WIN = 2 * SSIM_PAD + 1
SSIM_K1 = 0.01
SSIM_K2 = 0.03

log = logging.getLogger(__name__)

_CHUNK_VOXELS = 1 << 21  # bound on float64/complex temporaries: work goes in chunks of slices


# --------------------------------------------------------------------------- validation


def _check_volume(name: str, a: np.ndarray, ndim: int | None = 3) -> np.ndarray:
    a = np.asarray(a)
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name} must be a {ndim}-D (z, y, x) array, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name} is empty (shape {a.shape})")
    if a.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be real numeric, got dtype {a.dtype}")
    if a.dtype.kind == "f":
        if np.isnan(a).any():
            raise ValueError(f"{name} contains NaN values; mask or fill them before scoring")
        if np.isinf(a).any():
            raise ValueError(f"{name} contains infinite values")
    return a


def _check_pair(pred: np.ndarray, target: np.ndarray, ndim: int | None = 3) -> tuple[np.ndarray, np.ndarray]:
    pred = _check_volume("pred", pred, ndim)
    target = _check_volume("target", target, ndim)
    if pred.shape != target.shape:
        raise ValueError(f"pred and target differ in shape: {pred.shape} vs {target.shape}")
    return pred, target


def _check_data_range(data_range: float) -> float:
    if not np.isfinite(data_range) or data_range <= 0:
        raise ValueError(f"data_range must be a positive number (255 for uint8), got {data_range!r}")
    return float(data_range)


def _check_axis(axis: int) -> int:
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0 (z), 1 (y) or 2 (x), got {axis!r}")
    return int(axis)


def _voxel_size(voxel_size_nm: float | tuple[float, float, float]) -> tuple[float, float, float]:
    v = np.broadcast_to(np.asarray(voxel_size_nm, dtype=np.float64), (3,))
    if not np.all(np.isfinite(v)) or np.any(v <= 0):
        raise ValueError(f"voxel_size_nm must be positive (one value or z, y, x), got {voxel_size_nm!r}")
    return tuple(float(s) for s in v)


def _chunks(a: np.ndarray, axis: int) -> list[slice]:
    """Slices along ``axis`` holding about ``_CHUNK_VOXELS`` voxels each."""
    n = a.shape[axis]
    step = max(1, _CHUNK_VOXELS // max(1, a.size // n))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def _take(a: np.ndarray, axis: int, sl: slice) -> np.ndarray:
    index = [slice(None)] * a.ndim
    index[axis] = sl
    return a[tuple(index)]


# --------------------------------------------------------------------------- PSNR


def _sum_squared_error(pred: np.ndarray, target: np.ndarray) -> float:
    total = 0.0
    for sl in _chunks(pred, 0):
        d = pred[sl].astype(np.float64) - target[sl].astype(np.float64)
        total += float(np.vdot(d, d))
    return total


def _psnr_from_mse(mse: float, data_range: float) -> float:
    return float("inf") if mse == 0 else float(10.0 * np.log10(data_range**2 / mse))


def psnr(pred: np.ndarray, target: np.ndarray, *, data_range: float) -> float:
    """Peak signal-to-noise ratio in dB, ``10 log10(data_range^2 / MSE)``; inf when equal."""
    pred, target = _check_pair(np.atleast_1d(pred), np.atleast_1d(target), ndim=None)
    return _psnr_from_mse(_sum_squared_error(pred, target) / pred.size, _check_data_range(data_range))


# --------------------------------------------------------------------------- SSIM


def _ssim_map(x: np.ndarray, y: np.ndarray, data_range: float, axes: tuple[int, int]) -> np.ndarray:
    """SSIM map of 2-D images stacked along the axis not in ``axes`` (float64)."""
    x = x.astype(np.float64)
    y = y.astype(np.float64)

    def smooth(a: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(a, SSIM_SIGMA, mode="reflect", truncate=SSIM_TRUNCATE, axes=axes)

    ux, uy = smooth(x), smooth(y)
    vx = smooth(x * x) - ux * ux
    vy = smooth(y * y) - uy * uy
    vxy = smooth(x * y) - ux * uy
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    return ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))


def _check_ssim_plane(shape: tuple[int, ...], slice_axis: int) -> None:
    plane = [shape[a] for a in range(3) if a != slice_axis]
    if min(plane) < SSIM_WIN:
        raise ValueError(
            f"{PLANES[slice_axis].upper()} slices are {plane[0]}x{plane[1]} voxels but SSIM needs at least "
            f"{SSIM_WIN}x{SSIM_WIN} (Gaussian window sigma={SSIM_SIGMA}); use a larger volume")


def _ssim_sum(pred: np.ndarray, target: np.ndarray, data_range: float, slice_axis: int,
              valid: tuple[slice, ...]) -> np.ndarray:
    """[sum, count] of SSIM-map values of slices perpendicular to ``slice_axis``, inside ``valid``.

    ``valid`` crops the two in-plane axes only; slices are independent, so they go in chunks.
    """
    axes = tuple(a for a in range(3) if a != slice_axis)
    out = np.zeros(2)
    for sl in _chunks(pred, slice_axis):
        s = _ssim_map(_take(pred, slice_axis, sl), _take(target, slice_axis, sl), data_range, axes)[valid]
        out += (s.sum(dtype=np.float64), s.size)
    return out


def ssim(pred: np.ndarray, target: np.ndarray, *, data_range: float, axis: int) -> float:
    """Mean 2-D SSIM over all slices perpendicular to ``axis`` (0: XY, 1: XZ, 2: YZ).

    Per slice: Gaussian-weighted statistics (sigma 1.5, radius 5, reflect), K1=0.01, K2=0.03,
    population covariance, mean over the slice minus a 5-pixel border, as skimage's
    ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``.
    All slices have the same size, so this is also the mean over all cropped pixels.
    """
    pred, target = _check_pair(pred, target)
    data_range = _check_data_range(data_range)
    axis = _check_axis(axis)
    _check_ssim_plane(pred.shape, axis)
    crop = tuple(slice(None) if a == axis else slice(SSIM_PAD, n - SSIM_PAD) for a, n in enumerate(pred.shape))
    total, count = _ssim_sum(pred, target, data_range, axis, crop)
    return float(total / count)


# --------------------------------------------------------------------------- FRC


@dataclass(frozen=True)
class FRCCurve:
    """Fourier ring correlation of one orientation, summed over all its slices.

    ``freqs`` are ring radii in cycles/nm (ring ``i`` holds ``|k|`` in ``[(i-1/2), (i+1/2)) * step``,
    the last ring sits at the Nyquist frequency of the plane's coarser axis). ``ring`` uses full
    rings; ``wedges[a]`` only the coefficients within ``wedge_deg`` of the ``k_a`` axis, so
    ``wedges["z"]`` is the resolution along z. Empty bins are NaN.
    """

    plane: str
    freqs: np.ndarray
    ring: np.ndarray
    wedges: Mapping[str, np.ndarray]
    wedge_deg: float

    def resolution(self, curve: str = "ring", *, threshold: float = 1 / 7) -> float:
        """Resolution in nm of ``"ring"`` or a wedge axis name, see :func:`frc_resolution`."""
        frc = self.ring if curve == "ring" else self.wedges[curve]
        return frc_resolution(self.freqs, frc, threshold=threshold)

    def to_dict(self) -> dict:
        return {"plane": self.plane, "wedge_deg": self.wedge_deg, "freqs_per_nm": self.freqs.tolist(),
                "ring": self.ring.tolist(), "wedges": {k: v.tolist() for k, v in self.wedges.items()}}


@dataclass(frozen=True)
class _FRCPlan:
    """Everything about an FRC that depends only on the slice geometry."""

    plane: str
    axis_names: tuple[str, str]
    window: np.ndarray  # (h, w) separable Tukey taper
    bins: tuple[np.ndarray, ...]  # per curve (ring, wedge 1, wedge 2): ring index of each coefficient, -1 = unused
    freqs: np.ndarray
    wedge_deg: float


def _frc_plan(slice_axis: int, shape: tuple[int, int], spacing: tuple[float, float], n_bins: int | None,
              wedge_deg: float, taper: float) -> _FRCPlan:
    h, w = shape
    if min(h, w) < 8:
        raise ValueError(f"{PLANES[slice_axis].upper()} slices of {h}x{w} voxels are too small for an FRC (>= 8x8)")
    if not 0 < wedge_deg <= 90:
        raise ValueError(f"wedge_deg must be in (0, 90], got {wedge_deg!r}")
    if not 0 <= taper <= 1:
        raise ValueError(f"taper (Tukey alpha) must be in [0, 1], got {taper!r}")
    n_bins = min(h, w) // 2 if n_bins is None else int(n_bins)
    if n_bins < 2:
        raise ValueError(f"n_bins must be at least 2, got {n_bins}")
    kh = fft.fftfreq(h, d=spacing[0])[:, None]
    kw = fft.fftfreq(w, d=spacing[1])[None, :]
    radius = np.sqrt(kh**2 + kw**2)
    step = min(0.5 / spacing[0], 0.5 / spacing[1]) / n_bins
    ring = np.rint(radius / step).astype(np.int64)
    ring[(ring < 1) | (ring > n_bins)] = 0
    cos_w = np.cos(np.deg2rad(wedge_deg))
    bins = [ring, np.where(np.abs(kh) >= radius * cos_w, ring, 0), np.where(np.abs(kw) >= radius * cos_w, ring, 0)]
    window = np.outer(tukey(h, taper), tukey(w, taper))
    names = tuple(AXES[a] for a in range(3) if a != slice_axis)
    return _FRCPlan(plane=PLANES[slice_axis], axis_names=names, window=window,
                    bins=tuple((b - 1).ravel() for b in bins), freqs=step * np.arange(1, n_bins + 1),
                    wedge_deg=float(wedge_deg))


def _frc_sums(plan: _FRCPlan, a: np.ndarray, b: np.ndarray, slice_axis: int) -> np.ndarray:
    """Binned sums (curve, [cross, power a, power b], bin) over the slices of ``a``, ``b``."""
    def spectrum(s: np.ndarray) -> np.ndarray:
        s = np.moveaxis(s, slice_axis, 0).astype(np.float64)
        s -= s.mean(axis=(1, 2), keepdims=True)
        return fft.fft2(s * plan.window, axes=(1, 2), workers=1)

    terms = np.zeros((3,) + plan.window.shape)
    for sl in _chunks(a, slice_axis):
        fa, fb = spectrum(_take(a, slice_axis, sl)), spectrum(_take(b, slice_axis, sl))
        terms += ((fa * fb.conj()).real.sum(axis=0), (np.abs(fa) ** 2).sum(axis=0), (np.abs(fb) ** 2).sum(axis=0))
    n_bins = plan.freqs.size
    out = np.zeros((len(plan.bins), 3, n_bins))
    for c, idx in enumerate(plan.bins):
        used = idx >= 0
        for t, term in enumerate(terms):
            out[c, t] = np.bincount(idx[used], weights=term.ravel()[used], minlength=n_bins)
    return out


def _frc_from_sums(plan: _FRCPlan, sums: np.ndarray) -> FRCCurve:
    with np.errstate(invalid="ignore", divide="ignore"):
        frc = sums[:, 0] / np.sqrt(sums[:, 1] * sums[:, 2])
    frc[~np.isfinite(frc)] = np.nan
    return FRCCurve(plane=plan.plane, freqs=plan.freqs, ring=frc[0],
                    wedges={plan.axis_names[0]: frc[1], plan.axis_names[1]: frc[2]}, wedge_deg=plan.wedge_deg)


def _parse_plane(axis_plane: str) -> int:
    plane = str(axis_plane).lower()
    if plane not in PLANES:
        raise ValueError(f"axis_plane must be one of {PLANES}, got {axis_plane!r}")
    return PLANES.index(plane)


def frc_curve(a: np.ndarray, b: np.ndarray, *, axis_plane: str, voxel_size_nm: float | tuple[float, float, float],
              n_bins: int | None = None, wedge_deg: float = 30.0, taper: float = 0.25) -> FRCCurve:
    """FRC between two volumes over all slices of one plane (``"xz"``, ``"yz"`` or ``"xy"``).

    Each slice has its mean removed and a separable Tukey window (``taper`` = alpha) applied;
    cross-spectra and powers are summed over all slices, then over rings (``sum Re(A B*) /
    sqrt(sum |A|^2 sum |B|^2)``). ``n_bins`` defaults to half the smaller slice side.
    """
    a, b = _check_pair(a, b)
    slice_axis = _parse_plane(axis_plane)
    spacing = _voxel_size(voxel_size_nm)
    plane_axes = [ax for ax in range(3) if ax != slice_axis]
    plan = _frc_plan(slice_axis, tuple(a.shape[ax] for ax in plane_axes), tuple(spacing[ax] for ax in plane_axes),
                     n_bins, wedge_deg, taper)
    return _frc_from_sums(plan, _frc_sums(plan, a, b, slice_axis))


def frc_resolution(freqs: np.ndarray, frc: np.ndarray, threshold: float = 1 / 7) -> float:
    """Resolution in nm: ``1 / f`` at the first crossing of ``frc`` below ``threshold``.

    The crossing is linearly interpolated between the last bin at or above the threshold and
    the first below it; NaN (empty) bins are skipped. If the curve never drops below the
    threshold, the result is ``1 / freqs[-1]``, the Nyquist-limited value (twice the coarser
    voxel size of the plane for :func:`frc_curve`'s bins): "at least this good". If it is
    already below the threshold in its first bin, nothing is resolved and the result is inf.
    """
    freqs = np.asarray(freqs, dtype=np.float64)
    frc = np.asarray(frc, dtype=np.float64)
    if freqs.ndim != 1 or freqs.shape != frc.shape:
        raise ValueError(f"freqs and frc must be 1-D of equal length, got {freqs.shape} and {frc.shape}")
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be in (0, 1), got {threshold!r}")
    keep = ~np.isnan(frc)
    f, c = freqs[keep], frc[keep]
    if f.size == 0:
        raise ValueError("frc has no finite values")
    if np.any(f <= 0) or np.any(np.diff(f) <= 0):
        raise ValueError("freqs must be positive and increasing")
    below = np.nonzero(c < threshold)[0]
    if below.size == 0:
        return float(1.0 / f[-1])
    i = int(below[0])
    if i == 0:
        return float("inf")
    crossing = f[i - 1] + (c[i - 1] - threshold) / (c[i - 1] - c[i]) * (f[i] - f[i - 1])
    return float(1.0 / crossing)


# --------------------------------------------------------------------------- accumulator


@dataclass(frozen=True)
class MetricReport:
    """Scores of a prediction against its target; ``frc`` is over slices perpendicular to the slab axis."""

    n_voxels: int
    mse: float
    psnr: float
    ssim: Mapping[str, float]
    frc: FRCCurve

    def to_dict(self) -> dict:
        return {"n_voxels": self.n_voxels, "mse": self.mse, "psnr": self.psnr, "ssim": dict(self.ssim),
                "frc": self.frc.to_dict()}


class MetricAccumulator:
    """PSNR, SSIM (all three orientations) and FRC from consecutive slabs of a volume.

    Feed slabs in order along one axis (``update(pred, target, axis)``; every slab spans the
    full volume along the other two axes), then call :meth:`result`. What is exact:

    - MSE/PSNR: the same squared errors, summed in another order (equal to ~1e-15 relative).
    - SSIM: SSIM-map values are bit-identical to :func:`ssim`'s, because the last
      ``2 * SSIM_PAD`` rows are kept and a row is only scored once its whole window has
      arrived; only the final summation order differs.
    - FRC: slices perpendicular to the slab axis lie whole in one slab, so their spectra are
      those of :func:`frc_curve`; only summation order differs. Hence feed y-slabs (axis 1)
      for the XZ FRC that measures z resolution, x-slabs for YZ; z-slabs give the XY FRC.

    Memory: one slab plus ``2 * SSIM_PAD`` rows, and a few FRC bins.
    """

    def __init__(self, data_range: float, voxel_size_nm: float | tuple[float, float, float], *,
                 n_bins: int | None = None, wedge_deg: float = 30.0, taper: float = 0.25) -> None:
        self.data_range = _check_data_range(data_range)
        self.voxel_size_nm = _voxel_size(voxel_size_nm)
        self.n_bins, self.wedge_deg, self.taper = n_bins, wedge_deg, taper
        self._axis: int | None = None
        self._other: tuple[int, ...] = ()
        self._rows = 0
        self._sse = 0.0
        self._ssim = np.zeros((3, 2))  # per orientation: sum and count of SSIM-map values
        self._tail: tuple[np.ndarray, np.ndarray] | None = None
        self._plan: _FRCPlan | None = None
        self._frc = np.zeros(0)

    def update(self, pred_slab: np.ndarray, target_slab: np.ndarray, axis: int) -> None:
        """Add the next slab (rows ``[rows_seen, rows_seen + thickness)`` along ``axis``)."""
        pred_slab, target_slab = _check_pair(pred_slab, target_slab)
        axis = _check_axis(axis)
        other = tuple(n for a, n in enumerate(pred_slab.shape) if a != axis)
        if self._axis is None:
            self._start(axis, pred_slab.shape)
        elif axis != self._axis or other != self._other:
            raise ValueError(
                f"slabs must all be cut along axis {self._axis} with extents {self._other} across it; "
                f"got axis {axis} with {other}")
        n0 = self._rows
        self._rows += pred_slab.shape[axis]
        self._sse += _sum_squared_error(pred_slab, target_slab)
        self._update_ssim(pred_slab, target_slab, n0)
        self._frc += _frc_sums(self._plan, pred_slab, target_slab, axis)

    def _start(self, axis: int, shape: tuple[int, int, int]) -> None:
        probe = tuple(SSIM_WIN if a == axis else n for a, n in enumerate(shape))
        for o in range(3):  # the extent along the slab axis is checked in result()
            _check_ssim_plane(probe, o)
        plane_axes = [a for a in range(3) if a != axis]
        self._plan = _frc_plan(axis, tuple(shape[a] for a in plane_axes),
                               tuple(self.voxel_size_nm[a] for a in plane_axes), self.n_bins, self.wedge_deg,
                               self.taper)
        self._frc = np.zeros((3, 3, self._plan.freqs.size))
        self._axis = axis
        self._other = tuple(n for a, n in enumerate(shape) if a != axis)

    def _update_ssim(self, pred: np.ndarray, target: np.ndarray, n0: int) -> None:
        s = self._axis
        n1 = self._rows
        # orientation == slab axis: its slices are whole in this slab
        crop = tuple(slice(None) if a == s else slice(SSIM_PAD, n - SSIM_PAD) for a, n in enumerate(pred.shape))
        self._ssim[s] += _ssim_sum(pred, target, self.data_range, s, crop)
        # other orientations filter along the slab axis: prepend the kept tail
        if self._tail is not None:
            pred = np.concatenate([self._tail[0], pred], axis=s)
            target = np.concatenate([self._tail[1], target], axis=s)
        g0 = n1 - pred.shape[s]  # global row of pred's first row along s
        first = max(SSIM_PAD, n0 - SSIM_PAD)  # rows before were scored by earlier updates
        last = n1 - SSIM_PAD  # rows from here on still lack part of their window
        if last > first:
            for o in range(3):
                if o == s:
                    continue
                crop = tuple(
                    slice(first - g0, last - g0) if a == s else
                    slice(None) if a == o else slice(SSIM_PAD, n - SSIM_PAD)
                    for a, n in enumerate(pred.shape))
                self._ssim[o] += _ssim_sum(pred, target, self.data_range, o, crop)
        keep = slice(max(0, pred.shape[s] - 2 * SSIM_PAD), None)
        self._tail = (_take(pred, s, keep).copy(), _take(target, s, keep).copy())

    def result(self) -> MetricReport:
        """Scores of everything fed so far."""
        if self._axis is None:
            raise ValueError("no slabs were added; call update() first")
        shape = list(self._other)
        shape.insert(self._axis, self._rows)
        for o in range(3):
            _check_ssim_plane(tuple(shape), o)
        n_voxels = int(np.prod(shape))
        mse = self._sse / n_voxels
        return MetricReport(n_voxels=n_voxels, mse=mse, psnr=_psnr_from_mse(mse, self.data_range),
                            ssim={PLANES[o]: float(self._ssim[o, 0] / self._ssim[o, 1]) for o in range(3)},
                            frc=_frc_from_sums(self._plan, self._frc))


# --------------------------------------------------------------------------- stripes


STRIPE_PERIODS = 16  # segment length in LR periods: n = s * 16 voxels (fewer if the volume is short)
STRIPE_MIN_PERIODS = 4  # below 4 * s voxels along z (or x) there is no score
STRIPE_CHANNELS = ("intensity", "sharpness")


def _stripe_segment(factor: int, n_z: int, n_x: int) -> tuple[int, str]:
    """Segment length (a multiple of ``factor``) for the stripe spectra, or 0 and the reason why none."""
    if factor < 2:
        return 0, f"factor {factor} has no LR-slice period below the sampling rate (stripes need s >= 2)"
    periods = min(n_z, n_x - 1) // factor
    if periods < STRIPE_MIN_PERIODS:
        return 0, (f"{n_z} z x {n_x} x voxels are too few for stripes at period {factor} "
                   f"(need {STRIPE_MIN_PERIODS * factor} along z and {STRIPE_MIN_PERIODS * factor + 1} along x)")
    return factor * min(periods, STRIPE_PERIODS), ""


def _welch_power(a: np.ndarray, axis: int, n: int, window: np.ndarray) -> np.ndarray:
    """Sum of ``|rfft(window * (segment - mean))|^2`` over all length-``n`` segments along ``axis``
    (half-overlapping, spread evenly from one end to the other) and over all other axes."""
    length = a.shape[axis]
    count = 1 + -(-(length - n) // (n // 2))
    shape = [1] * a.ndim
    shape[axis] = n
    w = window.reshape(shape)
    others = tuple(i for i in range(a.ndim) if i != axis)
    power = np.zeros(n // 2 + 1)
    for start in np.round(np.linspace(0, length - n, count)).astype(np.int64):
        seg = _take(a, axis, slice(start, start + n)).astype(np.float64)
        seg = (seg - seg.mean(axis=axis, keepdims=True)) * w
        power += (np.abs(fft.rfft(seg, axis=axis, workers=1)) ** 2).sum(axis=others)
    return power


def _stripe_power(slab: np.ndarray, n: int, window: np.ndarray) -> np.ndarray:
    """Power sums ``(channel, direction, bin)`` of one slab; direction 0 is along z, 1 along x.

    ``intensity``: the volume itself, spectra along z of its (y, x) columns and along x of its
    (z, y) rows. ``sharpness``: the squared finite difference along x, ``(dv/dx)^2``, spectra
    along z; its reference is ``(dv/dz)^2`` along x, the same construction with x and z swapped.
    """
    v = slab.astype(np.float64)
    dx2 = np.diff(v, axis=2) ** 2
    dz2 = np.diff(v, axis=0) ** 2
    return np.array([[_welch_power(v, 0, n, window), _welch_power(v, 2, n, window)],
                     [_welch_power(dx2, 0, n, window), _welch_power(dz2, 2, n, window)]])


def _peak_ratios(power: np.ndarray, factor: int) -> np.ndarray:
    """Peak-to-local-background ratio at bins ``k n / s`` (frequencies k/s), k = 1 .. s//2.

    The background at the peak is extrapolated from the bins 2 .. D away from it (D = up to 4,
    at most half way to the next LR-slice frequency; never bins 0-1): a quadratic in the offset
    fitted to their log-power, evaluated at the peak, so a smooth spectrum that bends (a
    Gaussian one is a parabola in log) still scores ~1. A bin-centred line leaks only into its
    two adjacent bins under the periodic Hann window, so the bins used are pure background. At
    1/2 cycles/voxel (Nyquist) only the lower side exists; a real signal's spectrum is even
    about Nyquist, so the fit there has no odd term.
    """
    n = 2 * (power.size - 1)
    step = n // factor  # bins between consecutive LR-slice frequencies
    reach = max(2, min(4, step // 2))
    out = np.full(factor // 2, np.nan)
    for k in range(1, factor // 2 + 1):
        m = k * step
        d = np.array([d for d in range(-reach, reach + 1) if abs(d) >= 2 and 2 <= m + d <= n // 2])
        bg = power[m + d]
        if d.size == 0 or not np.all(bg > 0) or power[m] <= 0:
            continue
        if 2 * m == n:  # Nyquist: even in d
            basis = np.stack([np.ones(d.size), d**2.0], axis=1)[:, : min(2, d.size)]
        else:
            basis = np.stack([np.ones(d.size), d, d**2.0], axis=1)[:, : min(3, d.size)]
        coef = np.linalg.lstsq(basis, np.log(bg), rcond=None)[0]
        out[k - 1] = power[m] / np.exp(coef[0])
    return out


@dataclass(frozen=True)
class StripeScore:
    """Periodic z-stripes at the LR-slice period, see :func:`axial_periodicity`.

    ``freqs`` are the LR-slice frequencies ``k / s`` (cycles/voxel). Per channel
    (``"intensity"``, ``"sharpness"``) and frequency: ``ratio_z`` the candidate's
    peak-to-background ratio along z, ``ratio_x`` the same along x, ``ratio_gt`` the ground
    truth's along z (NaN without one). The headline numbers take the worst (largest) value over
    channels and frequencies: ``stripe_ratio_z``, ``stripe_vs_xy`` = max of ratio_z / ratio_x,
    ``stripe_vs_gt`` = max of ratio_z / ratio_gt. All NaN, with ``reason``, when not computable.
    """

    factor: int
    segment: int
    freqs: np.ndarray
    ratio_z: Mapping[str, np.ndarray]
    ratio_x: Mapping[str, np.ndarray]
    ratio_gt: Mapping[str, np.ndarray]
    reason: str = ""

    @staticmethod
    def _worst(values: list[np.ndarray]) -> float:
        v = np.concatenate([np.ravel(a) for a in values]) if values else np.zeros(0)
        v = v[np.isfinite(v)]
        return float(v.max()) if v.size else float("nan")

    @property
    def stripe_ratio_z(self) -> float:
        return self._worst([self.ratio_z[c] for c in self.ratio_z])

    @property
    def stripe_vs_xy(self) -> float:
        with np.errstate(divide="ignore", invalid="ignore"):
            return self._worst([self.ratio_z[c] / self.ratio_x[c] for c in self.ratio_z])

    @property
    def stripe_vs_gt(self) -> float:
        with np.errstate(divide="ignore", invalid="ignore"):
            return self._worst([self.ratio_z[c] / self.ratio_gt[c] for c in self.ratio_z])

    def to_dict(self) -> dict:
        def listed(m: Mapping[str, np.ndarray]) -> dict:
            return {c: [float(x) for x in v] for c, v in m.items()}

        return {"factor": self.factor, "segment": self.segment, "freqs_per_voxel": [float(f) for f in self.freqs],
                "stripe_ratio_z": self.stripe_ratio_z, "stripe_vs_gt": self.stripe_vs_gt,
                "stripe_vs_xy": self.stripe_vs_xy, "ratio_z": listed(self.ratio_z),
                "ratio_x": listed(self.ratio_x), "ratio_gt": listed(self.ratio_gt), "reason": self.reason}


class StripeAccumulator:
    """The power spectra of :func:`axial_periodicity` from y-slabs (or x-slabs) of a volume.

    Every slab must span the full z and x extents (``update(pred, target, axis=1)``, as
    :meth:`MetricAccumulator.update` takes them); the spectra are sums over independent
    (y, x) columns and (z, y) rows, so any split along y gives the whole-volume numbers up to
    summation order. x-slabs (``axis=2``) are taken with y as the in-plane reference
    direction instead of x. Memory: one slab and a few spectra.
    """

    def __init__(self, factor: int) -> None:
        if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or factor < 1:
            raise ValueError(f"factor must be a positive integer, got {factor!r}")
        self.factor = int(factor)
        self._shape: tuple[int, int] | None = None  # (z, x) extents
        self._n = 0
        self._reason = ""
        self._window = np.zeros(0)
        self._pred = np.zeros(0)
        self._target: np.ndarray | None = None

    def update(self, pred_slab: np.ndarray, target_slab: np.ndarray | None = None, axis: int = 1) -> None:
        """Add the next slab of the candidate (and of the ground truth, if there is one)."""
        pred_slab = _check_volume("pred", pred_slab)
        if _check_axis(axis) == 0:
            raise ValueError("stripes need the full z extent in every slab: cut slabs along y (1) or x (2)")
        if axis == 2:  # x-slabs: swap x and y, so z and x stay whole
            pred_slab = pred_slab.transpose(0, 2, 1)
            target_slab = None if target_slab is None else np.asarray(target_slab).transpose(0, 2, 1)
        if target_slab is not None:
            pred_slab, target_slab = _check_pair(pred_slab, target_slab)
        extents = (pred_slab.shape[0], pred_slab.shape[2])
        if self._shape is None:
            self._shape = extents
            self._n, self._reason = _stripe_segment(self.factor, *extents)
            if self._n:
                self._window = windows.hann(self._n, sym=False)
                self._pred = np.zeros((2, 2, self._n // 2 + 1))
                self._target = None if target_slab is None else np.zeros_like(self._pred)
        elif extents != self._shape:
            raise ValueError(f"slabs must all span the same z and x extents {self._shape}, got {extents}")
        elif (target_slab is None) != (self._target is None) and self._n:
            raise ValueError("give a target slab with every update or with none")
        if not self._n:
            return
        self._pred += _stripe_power(pred_slab, self._n, self._window)
        if target_slab is not None:
            self._target += _stripe_power(target_slab, self._n, self._window)

    def result(self) -> StripeScore:
        if self._shape is None:
            raise ValueError("no slabs were added; call update() first")
        s = self.factor
        freqs = np.arange(1, s // 2 + 1) / s
        if not self._n:
            log.info("stripe score skipped: %s", self._reason)
            nan = {c: np.full(freqs.size, np.nan) for c in STRIPE_CHANNELS}
            return StripeScore(s, 0, freqs, nan, nan, nan, self._reason)
        rz = {c: _peak_ratios(self._pred[i, 0], s) for i, c in enumerate(STRIPE_CHANNELS)}
        rx = {c: _peak_ratios(self._pred[i, 1], s) for i, c in enumerate(STRIPE_CHANNELS)}
        rg = {c: (np.full(freqs.size, np.nan) if self._target is None else _peak_ratios(self._target[i, 0], s))
              for i, c in enumerate(STRIPE_CHANNELS)}
        return StripeScore(s, self._n, freqs, rz, rx, rg)


def axial_periodicity(volume: np.ndarray, factor: int, *, reference: np.ndarray | None = None) -> StripeScore:
    """How strongly ``volume`` is modulated at the LR-slice period ``factor`` along z: stripes.

    **What.** A z-super-resolved volume is rebuilt from LR slices every ``s = factor`` HR
    slices. If the method treats voxels at and between LR slices differently, XZ/YZ slices show
    horizontal stripes with period ``s``: the volume's spectrum along z gets lines at the
    LR-slice frequencies ``k / s`` cycles/voxel (k = 1 .. s//2, the last at 1/2 when s is even),
    where an isotropic, unstriped volume has a smooth spectrum.

    **How.** Power spectra (Welch: half-overlapping segments of ``n = s * min(16, z // s)``
    voxels, each with its mean removed and a periodic Hann window, ``|rfft|^2`` summed over all
    segments and columns) in two channels, along z and, as the reference the truth offers
    (the voxels are isotropic), along x over the same segment length:

    - ``intensity``: the volume itself; brightness modulated from slice to slice.
    - ``sharpness``: ``(dv/dx)^2``, along z (reference ``(dv/dz)^2`` along x): in-plane detail
      modulated from slice to slice, e.g. sharp LR slices and blurred slices between them
      (linear interpolation), which leaves the mean brightness, hence the intensity channel, flat.

    Because ``n`` is a multiple of ``s``, every ``k / s`` falls on a bin, and the window keeps
    a line within that bin and its two neighbours. The score per frequency is the power in the
    bin over the background there, extrapolated (quadratic in log-power) from the bins 2..4
    away on either side (see ``_peak_ratios``).

    **Reading the numbers.** A ratio of ~1 means a smooth spectrum: no stripes. 2 means the
    bin holds twice the local background; a visible stripe pattern scores >> 1 (a line's
    ratio grows with ``n``, so compare volumes at the same factor; short volumes are less
    sensitive). Below 1 is a notch (linear interpolation has one at ``k / s``) and is no
    stripe. In :class:`StripeScore`, ``stripe_ratio_z`` is the worst z ratio;
    ``stripe_vs_gt`` divides it by the ground truth's (``reference``) at the same frequency
    and channel (~1: no excess stripes; the truth may have its own acquisition periodicities);
    ``stripe_vs_xy`` divides it by the volume's own x ratio (~1 without ground truth too).
    At Nyquist (1/2) the background comes from one side only (the spectrum is mirrored there).

    Volumes shorter than ``4 s`` along z (or ``4 s + 1`` along x), and ``factor`` 1, give
    NaN everywhere with the reason in ``StripeScore.reason`` (and logged).
    """
    acc = StripeAccumulator(factor)
    acc.update(volume, reference, axis=1)
    return acc.result()


# --------------------------------------------------------------------------- baselines


def interpolate_z(lr: np.ndarray, factor: int, *, mode: str = "decimate", method: str = "linear") -> np.ndarray:
    """Upsample ``lr`` along z by ``factor`` onto the project's HR grid, float32 ``(n*factor, y, x)``.

    HR slice ``j`` sits at LR coordinate ``j / s`` for ``mode="decimate"`` (LR slice ``k`` is HR
    slice ``k s``) and ``(j - (s - 1) / 2) / s`` for ``mode="mean"`` (LR slice ``k`` is the mean
    of HR slices ``k s .. k s + s - 1``). Coordinates outside ``[0, n - 1]`` are clamped
    (edge slices replicated). ``method``: ``"nearest"`` (ties round up), ``"linear"``, or
    ``"cubic"`` (not-a-knot cubic spline interpolation, ``scipy.interpolate.make_interp_spline``;
    needs n >= 4).
    """
    lr = _check_volume("lr", lr)
    if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or factor < 1:
        raise ValueError(f"factor must be a positive integer, got {factor!r}")
    if mode not in ("decimate", "mean"):
        raise ValueError(f"mode must be 'decimate' or 'mean', got {mode!r}")
    n, s = lr.shape[0], int(factor)
    j = np.arange(n * s, dtype=np.float64)
    coord = np.clip(j / s if mode == "decimate" else (j - (s - 1) / 2) / s, 0, n - 1)
    if method == "nearest":
        return lr[np.minimum(np.floor(coord + 0.5).astype(np.int64), n - 1)].astype(np.float32)
    if method == "linear":
        if n == 1:
            return np.repeat(lr.astype(np.float32), s, axis=0)
        i0 = np.minimum(np.floor(coord).astype(np.int64), n - 2)
        t = (coord - i0).astype(np.float32)[:, None, None]
        return lr[i0].astype(np.float32) * (1 - t) + lr[i0 + 1].astype(np.float32) * t
    if method == "cubic":
        if n < 4:
            raise ValueError(f"cubic interpolation needs at least 4 z-slices, got {n}; use 'linear'")
        spline = interpolate.make_interp_spline(np.arange(n), lr.astype(np.float64), k=3, axis=0)
        return spline(coord).astype(np.float32)
    raise ValueError(f"method must be 'nearest', 'linear' or 'cubic', got {method!r}")


# --------------------------------------------------------------------------- downstream check


def boundary_map(volume: np.ndarray, *, sigma: float = 1.5) -> np.ndarray:
    """Membrane strength in [0, 1], float32: a dark-sheet detector for EM.

    The scale-normalised Laplacian of Gaussian ``sigma^2 * LoG_sigma(volume)`` is positive on
    thin dark structures (membranes, 1-3 sigma wide); its positive part is divided by its own
    99th percentile over positive voxels and clipped to 1, so maps of differently scaled
    volumes are comparable. A constant volume gives zeros.
    """
    volume = _check_volume("volume", volume)
    if not np.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma!r}")
    ridge = np.maximum(sigma**2 * ndimage.gaussian_laplace(volume.astype(np.float32), sigma, mode="reflect"), 0)
    positive = ridge[ridge > 0]
    if positive.size == 0:
        return np.zeros(volume.shape, np.float32)
    scale = np.percentile(positive, 99.0)
    return np.minimum(ridge / np.float32(scale), 1.0).astype(np.float32)


def boundary_agreement(a: np.ndarray, b: np.ndarray, *, threshold: float = 0.5) -> float:
    """Dice (= F1) overlap of two boundary maps thresholded at ``threshold``; 1 means identical.

    Use it on :func:`boundary_map` of a result and of the ground truth; a better
    reconstruction puts membranes where the truth has them. Two empty masks score 1.
    """
    a, b = _check_pair(a, b)
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be in (0, 1), got {threshold!r}")
    ma, mb = a >= threshold, b >= threshold
    total = int(ma.sum()) + int(mb.sum())
    return 1.0 if total == 0 else float(2.0 * np.logical_and(ma, mb).sum() / total)
