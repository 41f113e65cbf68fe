"""Degradation and resampling along one axis: pure numpy, plus a lazy whole-volume wrapper.

Axial degradation turns an isotropic volume into what a coarser z-step acquires
(Stage III's inputs, the evaluation protocol's LR); lateral degradation does the
same to an XY slice along one in-plane axis (Stage I's inputs). Both use the
geometry of :mod:`d2r_dask.io.geometry`: ``decimate`` keeps every s-th slice,
``mean`` averages complete s-slice slabs. :func:`upsample_axis` is the inverse
placement (LR sample k at its true HR position) used by every interpolation in
the project: Stage I/II conditions, the interpolation baselines, evaluation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any, Literal

import dask.array as da
import numpy as np
import xarray as xr
from scipy.ndimage import gaussian_filter1d

from ..errors import InputError
from ..io.geometry import Geometry, check_factor, check_mode, degraded_length, hr_to_lr_coord, lr_transform
from ..io.volume import as_dataarray, to_dtype
from .noise import keyed_normal

Method = Literal["nearest", "linear", "cubic"]
METHODS = ("nearest", "linear", "cubic")

MIN_LR_SLICES = 3
"""The fewest LR slices d2r's stages can use: Stage III trains on patches of at least
DGEAN's 3-slice attention window (``DGEANConfig.ca_pool``; a test keeps the two equal)."""


def check_lr_slices(n_hr: int, factor: int, mode: str, need: int = MIN_LR_SLICES) -> int:
    """The LR slices degrading ``n_hr`` slices leaves, refused below ``need`` with the largest factor that works."""
    n_lr = degraded_length(n_hr, factor, mode) if n_hr >= factor or mode == "decimate" else 0
    if n_lr >= need:
        return n_lr
    ok = [s for s in range(2, n_hr + 1) if degraded_length(n_hr, s, mode) >= need] if n_hr >= 2 else []
    fix = (f"use --factor {max(ok)} or less" if ok else
           f"use a volume with more z-slices (>= {need * 2 if mode == 'mean' else 2 * need - 1} for factor 2)")
    raise InputError(f"degrading {n_hr} slices by {factor} ({mode}) leaves {n_lr} LR slice(s), but d2r's stages "
                     f"need >= {need} (Stage III trains on patches of >= {need} LR slices); {fix}")


def degrade_along(arr: np.ndarray, factor: int, *, axis: int, mode: str) -> np.ndarray:
    """Degrade ``arr`` along ``axis`` by ``factor``: keep every s-th sample or average slabs.

    Integer inputs stay integer for ``decimate``; ``mean`` returns float32 (rounding
    is the caller's choice, see :func:`to_dtype`).
    """
    factor, mode = check_factor(factor), check_mode(mode)
    n = arr.shape[axis]
    m = degraded_length(n, factor, mode)
    if mode == "decimate":
        return np.take(arr, np.arange(0, n, factor), axis=axis)
    moved = np.moveaxis(arr[(slice(None),) * (axis % arr.ndim) + (slice(0, m * factor),)], axis, 0)
    slabs = moved.astype(np.float32).reshape((m, factor) + moved.shape[1:]).mean(axis=1)
    return np.moveaxis(slabs, 0, axis)


def degrade_lateral(img: np.ndarray, factor: int, *, axis: int = -2, mode: str = "decimate") -> np.ndarray:
    """Stage I's degradation of XY slices along one in-plane axis (-2 rows, -1 columns)."""
    if axis not in (-2, -1):
        raise InputError(f"lateral axis must be -2 (y) or -1 (x), got {axis}")
    return degrade_along(img, factor, axis=axis, mode=mode)


@lru_cache(maxsize=256)
def interp_weights(n_in: int, factor: int, mode: str, method: str, n_out: int) -> np.ndarray:
    """Weights ``(n_out, n_in)`` that place LR sample k at its HR position and interpolate.

    Output j samples LR coordinate ``hr_to_lr_coord(j)``; neighbours outside
    ``[0, n_in)`` are clamped (replicate edge). ``cubic`` is Keys' cubic convolution
    (a = -0.5), what image libraries call bicubic.
    """
    if method not in METHODS:
        raise InputError(f"unknown interpolation {method!r}; use one of {', '.join(METHODS)}")
    pos = np.asarray(hr_to_lr_coord(np.arange(n_out), factor, mode))
    w = np.zeros((n_out, n_in), dtype=np.float64)
    rows = np.arange(n_out)
    if method == "nearest":
        np.add.at(w, (rows, np.clip(np.floor(pos + 0.5).astype(int), 0, n_in - 1)), 1.0)
        w = w.astype(np.float32)
        w.setflags(write=False)
        return w
    base = np.floor(pos).astype(int)
    frac = pos - base
    if method == "linear":
        taps = {0: 1.0 - frac, 1: frac}
    else:
        a = -0.5

        def keys(d: np.ndarray) -> np.ndarray:
            d = np.abs(d)
            return np.where(
                d <= 1,
                (a + 2) * d**3 - (a + 3) * d**2 + 1,
                np.where(d < 2, a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a, 0.0),
            )

        taps = {o: keys(frac - o) for o in (-1, 0, 1, 2)}
    for offset, weight in taps.items():
        np.add.at(w, (rows, np.clip(base + offset, 0, n_in - 1)), weight)
    w = w.astype(np.float32)
    w.setflags(write=False)  # cached and shared: nobody may change it
    return w


def upsample_axis(
    arr: np.ndarray,
    factor: int,
    *,
    axis: int,
    mode: str,
    method: str = "cubic",
    length: int | None = None,
) -> np.ndarray:
    """Upsample ``arr`` along ``axis`` by ``factor`` (float32), each sample at its true position.

    ``length`` defaults to ``n * factor``; ``mode`` is the degradation that made
    ``arr`` (see :mod:`d2r_dask.io.geometry`).
    """
    factor, mode = check_factor(factor), check_mode(mode)
    n = arr.shape[axis]
    w = interp_weights(n, factor, mode, method, length or n * factor)
    out = np.tensordot(w, np.moveaxis(arr, axis, 0).astype(np.float32), axes=(1, 0))
    return np.moveaxis(out, 0, axis)


# --- acquisition-like degradation of a whole volume ------------------------------------


@dataclass(frozen=True)
class AxialDegradation:
    """How an acquisition degrades z: ``mode`` plus optional blur and noise.

    ``blur_sigma`` is a Gaussian along z in HR slices, applied before sampling.
    ``noise`` is ``"gaussian"`` (std ``noise_level`` in units of the data range) or
    ``"poisson"`` (shot noise in its Gaussian approximation, ``noise_level`` =
    1/photons at full range). Noise is keyed by the LR voxel coordinate and
    ``seed``, so it does not depend on chunking.
    """

    factor: int
    mode: str = "decimate"
    blur_sigma: float = 0.0
    noise: str | None = None
    noise_level: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_factor(self.factor)
        check_mode(self.mode)
        if self.blur_sigma < 0 or self.noise_level < 0:
            raise InputError("blur sigma and noise level must be >= 0")
        if self.noise not in (None, "gaussian", "poisson"):
            raise InputError(f"unknown noise {self.noise!r}; use gaussian or poisson")
        if self.noise is None and self.noise_level > 0:
            raise InputError("a noise level needs a noise model: add --noise gaussian or --noise poisson")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _noise_block(block: np.ndarray, deg: AxialDegradation, data_range: float, block_info: Any = None) -> np.ndarray:
    loc = block_info[0]["array-location"] if block_info else [(0, n) for n in block.shape]
    coords = np.ix_(*(np.arange(a, b, dtype=np.int64) for a, b in loc))
    z = keyed_normal(deg.seed, 1, *coords)
    x = block.astype(np.float32)
    if deg.noise == "gaussian":
        return x + deg.noise_level * data_range * z
    return x + np.sqrt(np.clip(x, 0, None) * deg.noise_level * data_range) * z


def degrade_volume(vol: xr.DataArray, deg: AxialDegradation, *, min_slices: int = 1) -> xr.DataArray:
    """Lazily degrade an HR volume along z; dtype kept, geometry per :func:`lr_transform`.

    A result with fewer than ``min_slices`` LR slices is refused (``d2r degrade`` asks for
    :data:`MIN_LR_SLICES`, what the stages need).
    """
    data: da.Array = vol.data
    if data.ndim != 3:
        raise InputError(f"expected a 3D (z, y, x) volume, got {data.ndim} dimension(s)")
    n_lr = check_lr_slices(data.shape[0], deg.factor, deg.mode, min_slices) if min_slices > 1 else \
        degraded_length(data.shape[0], deg.factor, deg.mode)
    dtype = data.dtype
    x = data.astype(np.float32)
    if deg.blur_sigma > 0:
        depth = int(np.ceil(4 * deg.blur_sigma))
        if depth >= data.shape[0]:  # the kernel spans the whole z extent: filter z in one piece
            x = x.rechunk({0: -1}).map_blocks(
                gaussian_filter1d, sigma=deg.blur_sigma, axis=0, mode="reflect", dtype=np.float32
            )
        else:
            if depth >= min(data.chunks[0]):
                x = x.rechunk({0: max(2 * depth, min(data.shape[0], 64))})
            x = x.map_overlap(
                gaussian_filter1d, depth={0: depth, 1: 0, 2: 0}, boundary="reflect",
                sigma=deg.blur_sigma, axis=0, mode="reflect", dtype=np.float32,
            )
    if deg.mode == "decimate":
        x = x[:: deg.factor]
    else:
        x = da.coarsen(np.mean, x[: n_lr * deg.factor], {0: deg.factor})
    if deg.noise:
        data_range = float(np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else 1.0
        x = x.map_blocks(_noise_block, deg, data_range, dtype=np.float32)
    lr = x.map_blocks(to_dtype, dtype, dtype=dtype)
    geometry = Geometry(*lr_transform(vol.attrs["voxel_size"], vol.attrs["translation"], deg.factor, deg.mode))
    out = as_dataarray(lr, geometry, source=vol.attrs.get("source"))
    out.attrs["degradation"] = deg.to_dict()
    return out
