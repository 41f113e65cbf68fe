"""Seeded synthetic volume-EM (neuropil-like) generator that tiles exactly.

Every voxel is a pure function of its *global* ``(z, y, x)`` coordinate and the seed. Random
quantities never come from a stateful RNG but from a counter-based hash (splitmix64) of integer
keys: the grid cell that owns a point, or the voxel itself. A block therefore only needs the
keyed points of the grid cells around it, and a volume generated in any tiling is bit-identical
to the volume generated in one piece. Floating-point work is arranged so that each voxel's
arithmetic never depends on where the block starts (coordinates are taken relative to the
voxel's own grid cell, never to the block origin).

Layers, composed per voxel::

    cells       power-weighted Voronoi regions of jittered seeds, one seed per grid cell of
                ``cell_size`` voxels, in coordinates warped by smooth noise (curved walls)
    membranes   dark line around the cell walls: the exact distance to the nearest faces of the
                power diagram, with corners rounded by a smooth minimum
    cytoplasm   per-cell grey level (some cells dark) + low-frequency value-noise texture
    organelles  mitochondria (dark textured ellipsoids) and vesicle clusters (small dark rims),
                keyed by their cell and clipped to it
    noise       keyed per-voxel Gaussian (Box-Muller), then a Gaussian blur (the PSF)

The blur is computed on the block extended by its kernel radius and cropped, so it too is
independent of the tiling.

One generator in one file: the cell tessellation, membranes, organelles and the imaging
model share the keyed-noise and block-origin bookkeeping that makes blocks agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import dask.array as da
import numpy as np
from dask.base import tokenize
from scipy import ndimage

from .noise import keyed_normal, keyed_uniform

__all__ = ["SynthParams", "synth_block", "synth_dask"]

# Grey levels (uint8 scale) of the clean image, before texture, blur and noise.
_LIGHT_CELL = (135.0, 190.0)
_DARK_CELL = (100.0, 130.0)
_DARK_CELL_FRACTION = 0.2
_MEMBRANE = 62.0
_MITO = 82.0
_VESICLE = 60.0
_TEXTURE_AMPLITUDE = 14.0
_GRAIN_AMPLITUDE = 8.0  # fine mottling a few voxels across (cytoplasm; mitochondria below)
_MITO_TEXTURE_AMPLITUDE = 16.0

# Hash streams: one per independent random quantity (value noise adds 1000 per octave).
_S_SEED = (1, 2, 3)  # seed position inside its grid cell, per axis
_S_WEIGHT = 4  # power-diagram weight
_S_LEVEL = 5  # cytoplasm grey level
_S_DARK = 6  # dark-cell flag
_S_MITO = 7
_S_VESICLE = 8
_S_NOISE = 9
_S_WARP = (10, 11, 12)  # coordinate warp, per axis
_S_TEXTURE = 13
_S_GRAIN = 14

_MITO_SLOTS = 3
_CORNER_ROUNDING = 0.08  # fraction of the cell size
_VESICLE_SLOTS = 16



@dataclass(frozen=True)
class SynthParams:
    """Appearance of the synthetic neuropil; lengths in voxels, grey levels on the uint8 scale.

    ``cell_size`` is the seed-grid spacing (about the mean cell diameter); ``cell_jitter`` and
    ``warp`` are fractions of it. ``noise`` is the standard deviation of the noise in the
    *output* (after the blur). ``mito_density`` is the mean number of mitochondria per cell,
    ``vesicle_density`` the probability that a cell holds a vesicle cluster.
    """

    cell_size: int = 48
    cell_jitter: float = 0.35
    cell_size_spread: float = 0.5
    warp: float = 0.25
    membrane_thickness: float = 2.5
    mito_density: float = 1.0
    vesicle_density: float = 0.25
    noise: float = 10.0
    blur_sigma: float = 0.8

    def __post_init__(self) -> None:
        if not isinstance(self.cell_size, (int, np.integer)) or not 8 <= self.cell_size <= 4096:
            raise ValueError(f"cell_size must be an integer in [8, 4096] voxels, got {self.cell_size!r}")
        _check_range("cell_jitter", self.cell_jitter, 0.0, 0.5)
        _check_range("cell_size_spread", self.cell_size_spread, 0.0, 0.5)
        # Voronoi candidates are the 3x3x3 grid cells around a voxel, so jitter + warp must stay
        # within about one cell. Against 5x5x5 candidates on 96^3 voxels: labels identical and
        # wall distances equal at the defaults; at jitter 0.5 + warp 0.3, < 0.2 % of wall
        # distances differ (never the tiling: the candidate set is a function of the voxel).
        _check_range("warp", self.warp, 0.0, 0.3)
        _check_range("membrane_thickness", self.membrane_thickness, 0.5, self.cell_size / 4)
        _check_range("mito_density", self.mito_density, 0.0, float(_MITO_SLOTS))
        _check_range("vesicle_density", self.vesicle_density, 0.0, 1.0)
        _check_range("noise", self.noise, 0.0, 100.0)
        _check_range("blur_sigma", self.blur_sigma, 0.0, 8.0)


def _check_range(name: str, value: float, lo: float, hi: float) -> None:
    if not np.isfinite(value) or not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value!r}")


# --------------------------------------------------------------------------- hashing
# every random choice is keyed by global coordinates through d2r_dask.data.noise


def _uniform(seed: int, stream: int, *keys: np.ndarray) -> np.ndarray:
    return keyed_uniform(seed, stream, *(np.asarray(k, dtype=np.int64) for k in keys))


def _gaussian_noise(seed: int, stream: int, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Standard normal per voxel (float32)."""
    return keyed_normal(seed, stream, z[:, None, None], y[None, :, None], x[None, None, :])


# --------------------------------------------------------------------------- value noise


def _value_noise(seed: int, stream: int, coords: tuple[np.ndarray, ...], spacing: float) -> np.ndarray:
    """Smooth lattice value noise in [-1, 1] on the grid ``coords`` (global, one array per axis).

    Lattice values are keyed by lattice index; interpolation is separable (x, then y, then z)
    with smoothstep weights, so every output value depends only on global coordinates.
    """
    idx, weights, lattice_axes = [], [], []
    for g in coords:
        t = g / spacing
        i = np.floor(t)
        f = (t - i).astype(np.float32)
        i = i.astype(np.int64)
        lo = int(i.min())
        idx.append(i - lo)
        weights.append(f * f * (3.0 - 2.0 * f))
        lattice_axes.append(lo + np.arange(int(i.max()) - lo + 2))
    lz, ly, lx = lattice_axes
    a = (2.0 * _uniform(seed, stream, lz[:, None, None], ly[None, :, None], lx[None, None, :]) - 1.0)
    a = a.astype(np.float32)
    (iz, iy, ix), (wz, wy, wx) = idx, weights
    a = a[:, :, ix] * (1 - wx) + a[:, :, ix + 1] * wx
    a = a[:, iy, :] * (1 - wy)[:, None] + a[:, iy + 1, :] * wy[:, None]
    return a[iz] * (1 - wz)[:, None, None] + a[iz + 1] * wz[:, None, None]


def _fbm(seed: int, stream: int, coords: tuple[np.ndarray, ...], spacing: float, octaves: int) -> np.ndarray:
    """``octaves`` value-noise layers, halving spacing and amplitude, normalised to [-1, 1]."""
    total = np.zeros(tuple(len(c) for c in coords), np.float32)
    for k in range(octaves):
        total += np.float32(0.5**k) * _value_noise(seed, stream + 1000 * k, coords, spacing / 2**k)
    return total / np.float32(sum(0.5**k for k in range(octaves)))


# --------------------------------------------------------------------------- cells


@dataclass(frozen=True)
class _Cells:
    """Seeds of the grid cells around a region: global grid index and per-cell attributes."""

    lo: np.ndarray  # (3,) global grid index of the first neighbourhood cell
    grid: tuple[np.ndarray, np.ndarray, np.ndarray]  # broadcastable global grid indices
    offset: np.ndarray  # (3, nz, ny, nx) seed position inside its grid cell, voxels
    weight: np.ndarray  # (nz, ny, nx) power-diagram weight, voxels^2


def _cell_neighbourhood(seed: int, p: SynthParams, origin: np.ndarray, shape: np.ndarray) -> _Cells:
    c = p.cell_size
    lo = origin // c - 1
    hi = (origin + shape - 1) // c + 1
    gz, gy, gx = (np.arange(a, b + 1)[tuple(slice(None) if i == j else None for j in range(3))]
                  for i, (a, b) in enumerate(zip(lo, hi)))
    offset = np.stack([
        c * (0.5 + p.cell_jitter * (2.0 * _uniform(seed, s, gz, gy, gx) - 1.0))
        for s in _S_SEED
    ])
    weight = (p.cell_size_spread * c) ** 2 * (2.0 * _uniform(seed, _S_WEIGHT, gz, gy, gx) - 1.0)
    return _Cells(lo=lo, grid=(gz, gy, gx), offset=offset, weight=weight)


def _membrane_reach(p: SynthParams) -> float:
    """Half-width ``R`` of the membrane profile ``(1 - (d/R)^2)^3``, whose FWHM is the thickness.

    The profile is exactly zero beyond ``R``, so walls farther away never need computing.
    """
    return p.membrane_thickness / 0.9083


def _voronoi(cells: _Cells, p: SynthParams, origin: np.ndarray, shape: np.ndarray,
             disp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Label (flat index into the neighbourhood) and distance to the cell wall, per voxel.

    The candidates of a voxel are the seeds of the 3x3x3 grid cells around its (unwarped) grid
    cell, and coordinates are taken relative to that cell, so the result never depends on the
    tiling. Work is done one grid cell ("tile") at a time, where all voxels share candidates.
    """
    c = p.cell_size
    # farther from a wall than this, neither the membrane nor organelle clipping (mitochondria
    # keep 2 voxels off the wall, vesicles of radius <= 4 their radius) depends on it
    cap = max(_membrane_reach(p), 5.0)
    label = np.empty(tuple(shape), np.int32)
    wall = np.empty(tuple(shape), np.float32)
    rel = np.stack(np.meshgrid(*(np.arange(-1, 2),) * 3, indexing="ij")).reshape(3, 27)
    first, last = origin // c, (origin + shape - 1) // c
    for t in np.stack(np.meshgrid(*(np.arange(a, b + 1) for a, b in zip(first, last)), indexing="ij")).reshape(3, -1).T:
        start = np.maximum(origin, t * c) - origin
        stop = np.minimum(origin + shape, (t + 1) * c) - origin
        box = tuple(slice(a, b) for a, b in zip(start, stop))
        # warped voxel coordinates in the frame of grid cell t
        w = [
            ((np.arange(start[a], stop[a]) + origin[a] - t[a] * c).astype(np.float32).reshape(
                [-1 if i == a else 1 for i in range(3)]) + disp[a][box]).ravel()
            for a in range(3)
        ]
        nb = (t - cells.lo)[:, None] + rel  # (3, 27) neighbourhood indices of the candidates
        pos = (rel * c + cells.offset[:, nb[0], nb[1], nb[2]]).astype(np.float32)
        nearest, dist = _power_cells(w, pos, cells.weight[nb[0], nb[1], nb[2]], _CORNER_ROUNDING * c, cap)
        wall[box] = dist.reshape(stop - start)
        label[box] = np.ravel_multi_index(tuple(nb[:, nearest]), cells.weight.shape).reshape(stop - start)
    return label, wall


def _power_cells(w: list[np.ndarray], pos: np.ndarray, weight: np.ndarray, rounding: float,
                 cap: float) -> tuple[np.ndarray, np.ndarray]:
    """Nearest candidate and rounded wall distance for the points ``w`` (3 flat arrays).

    With power distances ``d_k = |w - p_k|^2 - weight_k``, the nearest candidate minimises the
    affine score ``e_k - 2 p_k.w`` (``e_k = |p_k|^2 - weight_k``), and the distance from a point
    of cell ``i`` to its face with cell ``j`` is the affine plane distance
    ``f_ij = (e_j - e_i - 2 (p_j - p_i).w) / (2 |p_j - p_i|)``. The wall distance is a
    polynomial smooth minimum of the two smallest faces (corners rounded by about
    ``rounding`` voxels), clipped at ``cap``. Faces that stay beyond ``cap + 1.25 rounding``
    over a cell's points cannot change the clipped result, so they are skipped.
    """
    pos64 = pos.astype(np.float64)
    e = (pos64**2).sum(axis=0) - weight
    best = np.full(w[0].shape, np.inf, np.float32)
    nearest = np.zeros(w[0].shape, np.int8)
    score = np.empty_like(best)
    tmp = np.empty_like(best)
    closer = np.empty(best.shape, bool)
    for k in range(pos.shape[1]):
        np.multiply(w[0], np.float32(-2 * pos64[0, k]), out=score)
        for a in (1, 2):
            np.multiply(w[a], np.float32(-2 * pos64[a, k]), out=tmp)
            score += tmp
        score += np.float32(e[k])
        np.less(score, best, out=closer)
        np.copyto(best, score, where=closer)
        np.copyto(nearest, np.int8(k), where=closer)

    order = np.argsort(nearest, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(nearest, minlength=pos.shape[1]))])
    ws = [a[order] for a in w]
    sorted_wall = np.empty(w[0].shape, np.float32)
    prune_at = cap + 1.25 * rounding + 0.01
    for i in np.nonzero(np.diff(bounds))[0]:
        seg = slice(bounds[i], bounds[i + 1])
        g = [a[seg] for a in ws]
        lo = np.array([a.min() for a in g], np.float64)[:, None]
        hi = np.array([a.max() for a in g], np.float64)[:, None]
        diff = pos64 - pos64[:, i:i + 1]
        sep = np.sqrt((diff**2).sum(axis=0))
        sep[i] = np.inf  # no face with itself
        slope = -diff / sep
        const = (e - e[i]) / (2 * sep)
        reachable = const + np.minimum(slope * lo, slope * hi).sum(axis=0) < prune_at
        f1 = np.full(g[0].shape, np.inf, np.float32)
        f2 = np.full(g[0].shape, np.inf, np.float32)
        face, tmp = np.empty_like(f1), np.empty_like(f1)
        for j in np.nonzero(reachable & (sep < np.inf))[0]:
            np.multiply(g[0], np.float32(slope[0, j]), out=face)
            for a in (1, 2):
                np.multiply(g[a], np.float32(slope[a, j]), out=tmp)
                face += tmp
            face += np.float32(const[j])
            np.maximum(f1, face, out=tmp)
            np.minimum(f2, tmp, out=f2)
            np.minimum(f1, face, out=f1)
        with np.errstate(invalid="ignore"):  # inf - inf where no face is in reach: no rounding there
            gap = np.where(np.isinf(f2), np.float32(np.inf), f2 - f1)
        h = np.maximum(np.float32(rounding) - gap, 0) / np.float32(rounding)
        sorted_wall[seg] = np.minimum(f1 - h * h * np.float32(rounding / 4), np.float32(cap))
    wall = np.empty_like(sorted_wall)
    wall[order] = sorted_wall
    return nearest, wall


def _cell_uniforms(seed: int, stream: int, cells: _Cells, n_slots: int, n_attr: int) -> np.ndarray:
    """Uniforms keyed by (cell, slot, attribute): shape (n_attr, n_cells, n_slots)."""
    gz, gy, gx = (g[..., None, None] for g in cells.grid)
    slot = np.arange(n_slots)[:, None]
    attr = np.arange(n_attr)[None, :]
    u = _uniform(seed, stream, gz, gy, gx, slot, attr)  # (nz, ny, nx, slots, attrs)
    return np.moveaxis(u.reshape(-1, n_slots, n_attr), -1, 0)


def _seed_positions(cells: _Cells, p: SynthParams) -> np.ndarray:
    """Global seed coordinates, shape (n_cells, 3)."""
    grid = np.stack(np.broadcast_arrays(*cells.grid)).astype(np.float64)
    return (grid * p.cell_size + cells.offset).reshape(3, -1).T


def _box(center: np.ndarray, extent: np.ndarray | float, origin: np.ndarray,
         shape: np.ndarray) -> tuple[slice, ...] | None:
    """Local slices of the voxels within ``extent`` (per axis) of ``center``, or None if empty."""
    start = np.maximum(np.floor(center - extent).astype(np.int64) - origin, 0)
    stop = np.minimum(np.ceil(center + extent).astype(np.int64) + 1 - origin, shape)
    if np.any(stop <= start):
        return None
    return tuple(slice(a, b) for a, b in zip(start, stop))


def _warped(box: tuple[slice, ...], origin: np.ndarray, disp: np.ndarray, center: np.ndarray) -> list[np.ndarray]:
    """Warped coordinates of a box's voxels relative to ``center`` (no block-origin arithmetic)."""
    return [
        (np.arange(box[a].start, box[a].stop) + origin[a] - center[a]).astype(np.float32).reshape(
            [-1 if i == a else 1 for i in range(3)]) + disp[a][box]
        for a in range(3)
    ]


def _mitochondria(seed: int, p: SynthParams, cells: _Cells, origin: np.ndarray, shape: np.ndarray,
                  disp: np.ndarray, label: np.ndarray, wall: np.ndarray) -> np.ndarray:
    """Signed distance (voxels, > 0 inside) to the union of each cell's mitochondria.

    Each cell has ``_MITO_SLOTS`` slots, each filled with probability ``mito_density / slots``
    by a prolate ellipsoid near the seed, clipped to its own cell and kept off the membrane.
    The union is a maximum, so the order of drawing never matters.
    """
    sd = np.full(tuple(shape), -np.inf, np.float32)
    u = _cell_uniforms(seed, _S_MITO, cells, _MITO_SLOTS, 8)
    seeds = _seed_positions(cells, p)
    c = p.cell_size
    reach = p.warp * c
    for cell, slot in zip(*np.nonzero(u[0] < p.mito_density / _MITO_SLOTS)):
        a = u[:, cell, slot]
        center = seeds[cell] + 0.3 * c * (2.0 * a[1:4] - 1.0)
        short = c * (0.10 + 0.16 * a[4])
        long = short * (1.0 + 2.0 * a[5])
        cos_t, phi = 2.0 * a[6] - 1.0, 2.0 * np.pi * a[7]
        sin_t = np.sqrt(1.0 - cos_t**2)
        axis = np.array([cos_t, sin_t * np.sin(phi), sin_t * np.cos(phi)])
        half_extent = np.sqrt(long**2 * axis**2 + short**2 * (1.0 - axis**2))
        box = _box(center, half_extent + 2.0 + reach, origin, shape)
        if box is None:
            continue
        v = _warped(box, origin, disp, center)
        along = v[0] * np.float32(axis[0]) + v[1] * np.float32(axis[1]) + v[2] * np.float32(axis[2])
        across2 = np.maximum(v[0] ** 2 + v[1] ** 2 + v[2] ** 2 - along**2, 0.0)
        inside = (1.0 - np.sqrt(along**2 / np.float32(long**2) + across2 / np.float32(short**2))) * np.float32(short)
        inside = np.minimum(inside, wall[box] - np.float32(1.5))
        inside[label[box] != cell] = -np.inf
        np.maximum(sd[box], inside, out=sd[box])
    return sd


def _vesicles(seed: int, p: SynthParams, cells: _Cells, origin: np.ndarray, shape: np.ndarray,
              disp: np.ndarray, label: np.ndarray, wall: np.ndarray) -> np.ndarray:
    """Darkness in [0, 1] of vesicle rims: clusters of small spheres, at most one per cell."""
    rim = np.zeros(tuple(shape), np.float32)
    u = _cell_uniforms(seed, _S_VESICLE, cells, _VESICLE_SLOTS + 1, 5)
    seeds = _seed_positions(cells, p)
    c = p.cell_size
    reach = p.warp * c
    for cell in np.nonzero(u[0, :, 0] < p.vesicle_density)[0]:
        cluster = seeds[cell] + 0.25 * c * (2.0 * u[1:4, cell, 0] - 1.0)
        for slot in range(1, _VESICLE_SLOTS + 1):
            a = u[:, cell, slot]
            if a[0] >= 0.7:
                continue
            center = cluster + 0.15 * c * (2.0 * a[1:4] - 1.0)
            radius = 2.5 + 1.5 * a[4]
            box = _box(center, radius + 3.0 + reach, origin, shape)
            if box is None:
                continue
            v = _warped(box, origin, disp, center)
            r = np.sqrt(v[0] ** 2 + v[1] ** 2 + v[2] ** 2)
            ring = np.exp(-((r - np.float32(radius)) ** 2))
            ring[(label[box] != cell) | (wall[box] < radius)] = 0.0
            np.maximum(rim[box], ring, out=rim[box])
    return rim


def _gaussian_kernel_norm(sigma: float, radius: int) -> float:
    """L2 norm of scipy's 1-D Gaussian kernel: the factor by which it scales white noise."""
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    k /= k.sum()
    return float(np.sqrt((k**2).sum()))


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    return int(seed)


def _parse_box(offset: tuple[int, int, int], shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    off = np.asarray(offset)
    shp = np.asarray(shape)
    if off.shape != (3,) or shp.shape != (3,) or off.dtype.kind not in "iu" or shp.dtype.kind not in "iu":
        raise ValueError(f"offset and shape must be (z, y, x) integer triples, got {offset!r}, {shape!r}")
    if np.any(shp < 1):
        raise ValueError(f"shape must be positive along every axis, got {shape!r}")
    return off.astype(np.int64), shp.astype(np.int64)


def synth_block(offset: tuple[int, int, int], shape: tuple[int, int, int], *, seed: int = 0,
                params: SynthParams | None = None) -> np.ndarray:
    """The ``shape`` block at global ``offset`` of the infinite synthetic volume, uint8 (z, y, x).

    A pure function of global coordinates and ``seed``: any tiling of a volume into blocks
    reproduces the one-piece volume exactly. Offsets may be negative.
    """
    p = SynthParams() if params is None else params
    seed = _check_seed(seed)
    offset_, shape_ = _parse_box(offset, shape)
    margin = int(4.0 * p.blur_sigma + 0.5)
    origin = offset_ - margin
    ext = shape_ + 2 * margin
    coords = tuple(origin[a] + np.arange(ext[a]) for a in range(3))

    disp = np.stack([
        np.float32(p.warp * p.cell_size) * _fbm(seed, _S_WARP[a], coords, float(p.cell_size), 2)
        for a in range(3)
    ])
    cells = _cell_neighbourhood(seed, p, origin, ext)
    label, wall = _voronoi(cells, p, origin, ext, disp)

    dark = _uniform(seed, _S_DARK, *cells.grid).ravel() < _DARK_CELL_FRACTION
    t = _uniform(seed, _S_LEVEL, *cells.grid).ravel()
    lo, hi = np.where(dark, _DARK_CELL[0], _LIGHT_CELL[0]), np.where(dark, _DARK_CELL[1], _LIGHT_CELL[1])
    level = (lo + t * (hi - lo)).astype(np.float32)
    grain = _value_noise(seed, _S_GRAIN, coords, 4.0)
    img = level[label] + np.float32(_TEXTURE_AMPLITUDE) * _fbm(seed, _S_TEXTURE, coords, p.cell_size / 3, 2)
    img += np.float32(_GRAIN_AMPLITUDE) * grain

    alpha = np.clip(_mitochondria(seed, p, cells, origin, ext, disp, label, wall) + 0.5, 0.0, 1.0)
    img += alpha * (np.float32(_MITO) + np.float32(_MITO_TEXTURE_AMPLITUDE) * grain - img)
    rim = _vesicles(seed, p, cells, origin, ext, disp, label, wall)
    img += rim * (np.float32(_VESICLE) - img)
    membrane = np.maximum(1.0 - (wall / np.float32(_membrane_reach(p))) ** 2, 0.0) ** 3
    img += membrane * (np.float32(_MEMBRANE) - img)

    if p.noise > 0:
        gain = 1.0 if margin == 0 else _gaussian_kernel_norm(p.blur_sigma, margin) ** 3
        img += np.float32(p.noise / gain) * _gaussian_noise(seed, _S_NOISE, *coords)
    if margin > 0:
        img = ndimage.gaussian_filter(img, p.blur_sigma, mode="nearest", radius=margin)
        img = img[margin:-margin, margin:-margin, margin:-margin]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _synth_chunk(seed: int, params: SynthParams, block_info: dict | None = None) -> np.ndarray:
    location = block_info[None]["array-location"]
    return synth_block(tuple(a for a, _ in location), tuple(b - a for a, b in location),
                       seed=seed, params=params)


def synth_dask(shape: tuple[int, int, int], *, chunks: tuple[int, int, int] = (64, 128, 128), seed: int = 0,
               params: SynthParams | None = None) -> da.Array:
    """Lazy synthetic volume of ``shape`` (z, y, x), uint8; each chunk is one ``synth_block``.

    The graph holds no data, so volumes far larger than memory can be generated and written
    chunk by chunk. Chunking never changes the values. Building the graph costs about 40 us
    per chunk (``map_blocks`` with ``block_info``); with millions of chunks, call
    :func:`synth_block` per block directly instead.
    """
    p = SynthParams() if params is None else params
    seed = _check_seed(seed)
    _, shape_ = _parse_box((0, 0, 0), shape)
    shape_t = tuple(int(n) for n in shape_)
    normalized = da.core.normalize_chunks(chunks, shape_t, dtype=np.uint8)
    name = "synth-" + tokenize(shape_t, normalized, seed, p)
    return da.map_blocks(partial(_synth_chunk, seed, p), chunks=normalized, dtype=np.uint8, name=name,
                         meta=np.empty((0, 0, 0), np.uint8))
