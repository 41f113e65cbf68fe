"""DGEAN: the 3D network that upsamples z by an integer factor (stages III-IV).

The paper describes its 3D network ("DGEAN") without publishing it; this family is **ours**.
It maps an LR block ``(B, 1, D, H, W)`` in [0, 1] to ``(B, 1, D·s, H, W)``: z is upsampled by
the factor ``s`` (2..10), y and x are unchanged. What it learns is added to a fixed z
interpolation of its input (global residual)::

    LR part (D slices, width C)
      x ── HFFilters [|∇x|, ∇²x] (fixed) ── conv─act─conv─act ─────────── g
      x ── head ──(+ fuse(g))──┬── RCAB(·, g) × N ── tail ──(+)── f
                               └─────── long skip ───────────┘
    HR part (D·s slices)
      f ── up: conv → C·s ch. ── act ── HR conv → 1 ch., per phase ──(+)── y
      x ── ZInterp (fixed, float32) ────────────────────────────────────┘

    RCAB(f, g) = f + CA(conv─act─conv(f)) · σ(gate(g))
    CA(u)      = u · σ(1×1─act─1×1(local_mean(u)))      local_mean: AvgPool3d, stride 1
                 (computed as local_mean(1×1(u)): the same, on a quarter of the channels)

* **ZInterp** places HR slice ``j = k·s + p`` at its true LR coordinate ``k + δ_p`` (Geometry in
  D2R.md): ``decimate`` → ``δ_p = p/s``; ``mean`` → ``δ_p = (p − (s−1)/2)/s``. Linear or
  cubic (Keys, a = −0.5) weights per phase form a fixed depthwise z-conv with ``s`` outputs,
  then the phases interleave. Its support is the widest nonzero tap: 1 (linear) or 2 (cubic).
* **HF path**: fixed central-difference gradient magnitude and 7-point Laplacian, encoded by two
  convs into ``g``. ``g`` is added to the head features and gates (sigmoid) every block's
  residual, so edges decide where the trunk writes.
* **RCAB** (3D residual channel-attention block): ``f + CA(conv(act(conv(f)))) · σ(gate(g))``.
  Channel attention squeezes a *local* mean (``AvgPool3d``, stride 1, kernel ``ca_pool``)
  instead of a global one, so the output never depends on the block size. A mean commutes with
  the first 1×1 conv (its weights sum to 1), so the pool runs after the squeeze, on
  ``C / ca_reduction`` channels (``medium``: a 1.15× faster training step on 2 CPU cores).
* **Upsampling**: a conv to ``C·s`` channels, then channel ``c·s + p`` becomes HR slice
  ``k·s + p`` (sub-pixel shuffle along z only), then one HR conv to a single channel. It is
  zero-initialised, so an untrained DGEAN *is* the interpolation and training starts there.
  The shuffled C-channel HR tensor is never built: :func:`hr_conv_by_phase` computes the HR
  conv from the LR-layout channels (the same function to float rounding; the CPU training step
  1.2x faster at x4 and 1.3x at x8, inference of this part 4x faster at x8).

Kernels: the trunk uses ``kernel`` (default 3×3×3); head, HF encoder, tail and the upsampling
conv are always 3×3×3 and the HR conv uses ``hr_kernel`` (in HR voxels). Every trunk conv mixes
the two neighbouring LR slices because z is where the information is missing, and 3 taps are
the smallest support symmetric around the slice being refined. Set ``kernel=(1, 3, 3)`` to
shrink the z halo (head, tail and the upsampler still mix slices).

Receptive field (the blockwise halo). Stride 1 everywhere, so a layer chain adds kernel radii
``(k − 1)·d / 2`` per axis and parallel branches take the maximum; an HR conv of z radius
``h`` (HR voxels) adds ``ceil(h / s)`` LR slices, because HR slice ``k·s + p ± h`` lies in LR
slice ``k + floor((p ± h) / s)``. ``DGEAN.receptive_field`` walks the built modules in
forward order; the tests measure it with autograd and require equality. With the defaults::

    xy radius = 3 (HF path, dominates head) + N·(2 + ca_pool // 2) + 1 (tail) + 1 (up) + 1 (HR)
    z  radius = the same, with ceil(1 / s) = 1 for the HR conv

Blockwise contract: the engine feeds blocks with a halo ≥ ``receptive_field(cfg)`` and crops;
whole-volume inference means reflect-pad by that halo, run, crop. Internal "same" padding
(zeros in learned convs, replicate in fixed ones) only touches voxels inside the halo.

Size per preset, as printed by :func:`size_table` (a test keeps this copy current). FLOPs are
2 × multiply-adds of every conv, fixed ones included, per output HR voxel; activations, pooling
and element-wise ops are not counted. Mode ``decimate``, cubic interpolation::

    preset  factor  halo (z, y, x)  parameters  FLOPs / HR voxel
    tiny         4  (12, 12, 12)        16,925             8,784
    tiny         8  (12, 12, 12)        23,869             6,341
    small        4  (12, 12, 12)        66,137            33,648
    small        8  (12, 12, 12)        93,849            24,173
    medium       4  (15, 15, 15)       176,651            89,116
    medium       8  (15, 15, 15)       238,955            60,763
    base         4  (18, 18, 18)       374,337           188,128
    base         8  (18, 18, 18)       485,057           122,581
    full         4  (30, 30, 30)     2,392,769         1,197,696
    full         8  (30, 30, 30)     2,835,393           711,173

One model family in one file read top-down, smallest part first (as NAFNet's), with its
presets, receptive field and FLOP count next to the layers they are computed from.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..io.geometry import MODES, hr_to_lr_coord
from .config import config_from_dict

__all__ = [
    "DGEAN",
    "DGEANConfig",
    "MODES",
    "INTERPS",
    "PRESETS",
    "dgean_config",
    "flops_per_output_voxel",
    "hr_offsets",
    "n_parameters",
    "receptive_field",
    "size_table",
    "tta_forward",
    "z_shuffle",
]

INTERPS = ("linear", "cubic")
Radius = tuple[int, int, int]


# ---------------------------------------------------------------------------------------------
# Geometry and fixed operators
# ---------------------------------------------------------------------------------------------


def hr_offsets(factor: int, mode: str) -> np.ndarray:
    """LR coordinate of HR slice ``k·s + p`` minus ``k``, for each phase ``p`` (shape ``(s,)``).

    ``decimate``: ``p/s``; ``mean``: ``(p − (s−1)/2)/s`` (see :mod:`d2r_dask.io.geometry`).
    """
    return np.asarray(hr_to_lr_coord(np.arange(factor), factor, mode))


def _keys(t: float) -> float:
    """Keys cubic convolution kernel with a = −0.5 (Catmull-Rom; exact for quadratics)."""
    t = abs(t)
    if t <= 1:
        return 1.5 * t**3 - 2.5 * t**2 + 1
    if t < 2:
        return -0.5 * t**3 + 2.5 * t**2 - 4 * t + 2
    return 0.0


def _zinterp_weights(factor: int, mode: str, interp: str) -> np.ndarray:
    """Per-phase z taps as a depthwise conv weight ``(s, 1, 2r+1, 1, 1)``; r = widest nonzero tap."""
    taps: list[dict[int, float]] = []
    for delta in hr_offsets(factor, mode):
        i0 = math.floor(delta)
        f = delta - i0
        if interp == "linear":
            w = {i0: 1 - f, i0 + 1: f}
        else:
            w = {i0 - 1: _keys(1 + f), i0: _keys(f), i0 + 1: _keys(1 - f), i0 + 2: _keys(2 - f)}
        taps.append({o: v for o, v in w.items() if abs(v) > 1e-12})
    r = max(abs(o) for t in taps for o in t)
    weight = np.zeros((factor, 1, 2 * r + 1, 1, 1))
    for p, t in enumerate(taps):
        for o, v in t.items():
            weight[p, 0, o + r, 0, 0] = v
    return weight


def _hf_weights() -> np.ndarray:
    """Central differences along z, y, x and the 7-point Laplacian, as ``(4, 1, 3, 3, 3)``."""
    weight = np.zeros((4, 1, 3, 3, 3))
    for axis in range(3):
        lo, hi = [1, 1, 1], [1, 1, 1]
        lo[axis], hi[axis] = 0, 2
        weight[(axis, 0, *lo)] = -0.5
        weight[(axis, 0, *hi)] = 0.5
        weight[(3, 0, *lo)] = weight[(3, 0, *hi)] = 1.0
    weight[3, 0, 1, 1, 1] = -6.0
    return weight


def _at_least_f32(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def z_shuffle(x: Tensor, factor: int) -> Tensor:
    """Sub-pixel shuffle along z: ``(B, C·s, D, H, W) → (B, C, D·s, H, W)``.

    Channel ``c·s + p`` at LR slice ``k`` becomes channel ``c`` at HR slice ``k·s + p``.
    """
    b, cs, d, h, w = x.shape
    c = cs // factor
    return x.reshape(b, c, factor, d, h, w).transpose(2, 3).reshape(b, c, d * factor, h, w)


def phase_major(width: int, factor: int) -> Tensor:
    """Channel order that groups ``width·factor`` channels by phase: new ``q·C + c`` ← old ``c·s + q``."""
    return torch.arange(width * factor).reshape(width, factor).t().reshape(-1)


def hr_conv_by_phase(u: Tensor, weight: Tensor, bias: Tensor | None, factor: int) -> Tensor:
    """A single-output conv over the z-shuffled ``u``, computed without building the HR features.

    ``u``: ``(B, s·C, D, H, W)`` phase-major (phase ``q``'s C channels at ``q·C …``), i.e.
    ``z_shuffle(u[:, phase_major(C, s)])`` is the HR tensor the conv ``weight`` ``(1, C, kz, ky,
    kx)`` (zero "same" padding) would run on. Equal to that up to float rounding, but HR slice
    ``k·s + p`` at z-tap ``d`` reads phase ``(p + d) mod s`` of LR slice ``k + floor((p + d) / s)``,
    so each phase's ``kz`` taps are 2D convs on LR voxels (one grouped conv, ``kz`` outputs per
    phase), summed per output phase with z-shifts. No HR tensor with C channels exists.
    """
    s, (kz, ky, kx) = factor, weight.shape[2:]
    taps_w = weight[0].transpose(0, 1).unsqueeze(2).repeat(s, 1, 1, 1, 1)  # (s·kz, C, 1, ky, kx)
    taps = F.conv3d(u, taps_w, padding=(0, ky // 2, kx // 2), groups=s)
    taps = _at_least_f32(taps)
    gather = _phase_gather(s, kz, taps.device, taps.dtype)
    with torch.autocast(taps.device.type, enabled=False):
        y = F.conv3d(taps, gather, padding=(gather.shape[2] // 2, 0, 0))
    y = z_shuffle(y, s)
    return y if bias is None else y + bias.float()


@lru_cache
def _phase_gather(factor: int, kz: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Fixed 0/1 z-conv ``(s, s·kz, 2·mz + 1, 1, 1)`` that sums, for output phase ``p``, tap ``dz``
    of phase ``q`` at LR offset ``m`` where ``divmod(p + dz − kz // 2, s) = (m, q)``. Cached per
    device and dtype: no host-to-device copy in every forward on a GPU."""
    hz = kz // 2
    mz = -(-hz // factor)  # LR slices the taps reach
    w = torch.zeros(factor, factor * kz, 2 * mz + 1, 1, 1)
    for p in range(factor):
        for dz in range(kz):
            m, q = divmod(p + dz - hz, factor)
            w[p, q * kz + dz, m + mz] = 1.0
    return w.to(device, dtype)


class FixedConv3d(nn.Module):
    """A non-learned conv: replicate "same" padding, run in (at least) float32 outside autocast.

    The weight is a non-persistent buffer: it is rebuilt from the config, never saved.
    """

    def __init__(self, weight: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("weight", torch.tensor(weight, dtype=torch.float32), persistent=False)

    @property
    def radius(self) -> Radius:
        return tuple(k // 2 for k in self.weight.shape[2:])  # type: ignore[return-value]

    def forward(self, x: Tensor) -> Tensor:
        rz, ry, rx = self.radius
        with torch.autocast(x.device.type, enabled=False):
            x = F.pad(_at_least_f32(x), (rx, rx, ry, ry, rz, rz), mode="replicate")
            return F.conv3d(x, self.weight.to(x.dtype))


class ZInterp(nn.Module):
    """Fixed linear/cubic z-upsampling ``(B, 1, D, H, W) → (B, 1, D·s, H, W)`` per the geometry."""

    def __init__(self, factor: int, mode: str, interp: str) -> None:
        super().__init__()
        self.factor = factor
        self.phases = FixedConv3d(_zinterp_weights(factor, mode, interp))

    @property
    def radius(self) -> Radius:
        return self.phases.radius

    def forward(self, x: Tensor) -> Tensor:
        return z_shuffle(self.phases(x), self.factor)


class HFFilters(nn.Module):
    """Fixed high-frequency maps: ``[|∇x|, ∇²x]`` (2 channels, float32)."""

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.filters = FixedConv3d(_hf_weights())

    @property
    def radius(self) -> Radius:
        return self.filters.radius

    def forward(self, x: Tensor) -> Tensor:
        d = self.filters(x)
        magnitude = torch.sqrt(d[:, :3].square().sum(1, keepdim=True) + self.eps)
        return torch.cat([magnitude, d[:, 3:]], dim=1)


# ---------------------------------------------------------------------------------------------
# Learned blocks
# ---------------------------------------------------------------------------------------------


def _conv(cin: int, cout: int, kernel: tuple[int, int, int] | int = 3) -> nn.Conv3d:
    kernel = (kernel,) * 3 if isinstance(kernel, int) else kernel
    return nn.Conv3d(cin, cout, kernel, padding=tuple(k // 2 for k in kernel))


def _radius(m: nn.Conv3d | nn.AvgPool3d) -> Radius:
    """Per-axis reach of a stride-1 conv or pool: ``dilation · (kernel − 1) / 2``."""
    k = m.kernel_size if isinstance(m.kernel_size, tuple) else (m.kernel_size,) * 3
    d = getattr(m, "dilation", 1)
    d = d if isinstance(d, tuple) else (d,) * 3
    return tuple(di * (ki - 1) // 2 for di, ki in zip(d, k))  # type: ignore[return-value]


def _add(*rs: Radius) -> Radius:
    return tuple(map(sum, zip(*rs)))  # type: ignore[return-value]


def _max(*rs: Radius) -> Radius:
    return tuple(map(max, zip(*rs)))  # type: ignore[return-value]


def _act() -> nn.Module:
    # never a zero gradient: the receptive-field test relies on it. In place: every activation
    # follows a conv whose output nothing else reads, so one tensor fewer per layer (on 2 CPU
    # cores at x8: training step 1.06x, a Stage IV block 1.2x faster; the same bits).
    return nn.LeakyReLU(0.2, inplace=True)


class LocalChannelAttention(nn.Module):
    """Squeeze-excite on a local mean (stride-1 pool), so blocks of any size agree.

    ``pool(squeeze(x)) == squeeze(pool(x))`` (a 1×1 conv is per voxel and the pool's weights sum
    to 1, pad voxels excluded), so the pool runs on the squeezed channels: the same function and
    the same parameters, with ``reduction``-times less pooling work.
    """

    def __init__(self, width: int, *, pool: int, reduction: int) -> None:
        super().__init__()
        squeeze = max(1, width // reduction)
        self.pool = nn.AvgPool3d(pool, stride=1, padding=pool // 2, count_include_pad=False)
        self.excite = nn.Sequential(
            nn.Conv3d(width, squeeze, 1), _act(), nn.Conv3d(squeeze, width, 1), nn.Sigmoid()
        )

    @property
    def radius(self) -> Radius:
        return _radius(self.pool)

    def forward(self, x: Tensor) -> Tensor:
        squeeze, rest = self.excite[0], self.excite[1:]
        return x * rest(self.pool(squeeze(x)))


class RCAB(nn.Module):
    """3D residual channel-attention block whose residual is gated by the HF features ``g``."""

    def __init__(self, cfg: DGEANConfig) -> None:
        super().__init__()
        c = cfg.width
        self.body = nn.Sequential(_conv(c, c, cfg.kernel), _act(), _conv(c, c, cfg.kernel))
        self.attention = LocalChannelAttention(c, pool=cfg.ca_pool, reduction=cfg.ca_reduction)
        self.gate = nn.Conv3d(cfg.hf_width, c, 1) if cfg.hf_width else None

    def radius(self, r_f: Radius, r_g: Radius | None) -> Radius:
        """Reach of the output, given the reach of the input ``f`` and of ``g``."""
        r = _add(r_f, _radius(self.body[0]), _radius(self.body[2]), self.attention.radius)
        return r if self.gate is None else _max(r, _add(r_g, _radius(self.gate)))

    def forward(self, f: Tensor, g: Tensor | None) -> Tensor:
        r = self.attention(self.body(f))
        if self.gate is not None:
            r = r * torch.sigmoid(self.gate(g))
        return f + r


class HFBranch(nn.Module):
    """Fixed HF maps encoded by two 3×3×3 convs into ``hf_width`` channels."""

    def __init__(self, hf_width: int) -> None:
        super().__init__()
        self.filters = HFFilters()
        self.encode = nn.Sequential(_conv(2, hf_width), _act(), _conv(hf_width, hf_width), _act())

    @property
    def radius(self) -> Radius:
        return _add(self.filters.radius, _radius(self.encode[0]), _radius(self.encode[2]))

    def forward(self, x: Tensor) -> Tensor:
        return self.encode(self.filters(x))


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


def _check_int(
    name: str, value: Any, lo: int, hi: int | None = None, *, odd: bool = False, why: str = ""
) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= lo
    ok = ok and (hi is None or value <= hi) and (not odd or value % 2 == 1)
    if not ok:
        wanted = f"an {'odd ' if odd else ''}int " + (f"in {lo}..{hi}" if hi is not None else f">= {lo}")
        raise ValueError(f"{name}={value!r}: must be {wanted}" + (f" ({why})" if why else ""))


def _triple(name: str, value: Any) -> tuple[int, int, int]:
    t = tuple(value) if isinstance(value, (list, tuple)) else ()
    if len(t) != 3 or not all(isinstance(k, int) and k >= 1 and k % 2 for k in t):
        raise ValueError(f"{name}={value!r}: expected three odd positive ints (z, y, x), e.g. (3, 3, 3)")
    return t  # type: ignore[return-value]


@dataclass(frozen=True)
class DGEANConfig:
    """Everything that defines a DGEAN; saved beside every checkpoint and output.

    ``factor``: z upsampling (2..10). ``mode``: how the acquisition degrades z ("decimate" |
    "mean"), which places the HR slices. ``width``/``n_blocks``: trunk channels and RCABs.
    ``hf_width``: channels of the HF branch (0 disables it, for ablations). ``interp``: the
    global residual ("linear" | "cubic"). ``kernel``/``hr_kernel``: trunk and HR conv kernels
    (z, y, x). ``ca_pool``/``ca_reduction``: local pool size and squeeze of channel attention.
    """

    factor: int
    mode: str = "decimate"
    width: int = 32
    n_blocks: int = 4
    hf_width: int = 16
    interp: str = "cubic"
    kernel: tuple[int, int, int] = (3, 3, 3)
    hr_kernel: tuple[int, int, int] = (3, 3, 3)
    ca_pool: int = 3
    ca_reduction: int = 4

    def __post_init__(self) -> None:
        _check_int("factor", self.factor, 2, 10, why="the z step over the xy step")
        for name, minimum in (("width", 1), ("n_blocks", 0), ("hf_width", 0), ("ca_reduction", 1)):
            _check_int(name, getattr(self, name), minimum)
        _check_int("ca_pool", self.ca_pool, 1, odd=True, why="1 = pointwise attention")
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}: use one of {MODES} (how LR slices were acquired)")
        if self.interp not in INTERPS:
            raise ValueError(f"interp={self.interp!r}: use one of {INTERPS}")
        object.__setattr__(self, "kernel", _triple("kernel", self.kernel))
        object.__setattr__(self, "hr_kernel", _triple("hr_kernel", self.hr_kernel))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: tuples become lists."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DGEANConfig:
        """Inverse of ``to_dict``; unknown keys are an error, not silently dropped."""
        return config_from_dict(cls, data)


PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"width": 8, "n_blocks": 2, "hf_width": 4},  # CPU tests
    "small": {"width": 16, "n_blocks": 2, "hf_width": 8},
    "medium": {"width": 24, "n_blocks": 3, "hf_width": 8},  # CPU runs
    "base": {"width": 32, "n_blocks": 4, "hf_width": 16},
    "full": {"width": 64, "n_blocks": 8, "hf_width": 32},  # GPUs
}


def dgean_config(preset: str, factor: int, mode: str = "decimate", **overrides: Any) -> DGEANConfig:
    """A preset's named values, then ``overrides`` (any :class:`DGEANConfig` field)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown DGEAN preset {preset!r}; choose one of {sorted(PRESETS)}")
    return DGEANConfig.from_dict({**PRESETS[preset], "factor": factor, "mode": mode, **overrides})


# ---------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------


class DGEAN(nn.Module):
    """``(B, 1, D, H, W)`` LR in [0, 1] → ``(B, 1, D·s, H, W)``; see the module docstring."""

    def __init__(self, cfg: DGEANConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c, s = cfg.width, cfg.factor
        self.zinterp = ZInterp(s, cfg.mode, cfg.interp)
        self.hf = HFBranch(cfg.hf_width) if cfg.hf_width else None
        self.head = _conv(1, c)
        self.fuse = nn.Conv3d(cfg.hf_width, c, 1) if cfg.hf_width else None
        self.blocks = nn.ModuleList(RCAB(cfg) for _ in range(cfg.n_blocks))
        self.tail = _conv(c, c)
        self.up = _conv(c, c * s)
        self.act = _act()
        self.hr_conv = _conv(c, 1, cfg.hr_kernel)  # on HR voxels, computed by hr_conv_by_phase
        nn.init.zeros_(self.hr_conv.weight)
        nn.init.zeros_(self.hr_conv.bias)
        self.register_buffer("phase_major", phase_major(c, s), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 5 or x.shape[1] != 1:
            shape = tuple(x.shape)
            raise ValueError(f"DGEAN expects (B, 1, D, H, W), got {shape}; add the batch/channel axes")
        base = self.zinterp(x)
        g = self.hf(x) if self.hf is not None else None
        f = self.head(x)
        if self.fuse is not None:
            f = f + self.fuse(g)
        skip = f
        for block in self.blocks:
            f = block(f, g)
        f = skip + self.tail(f)
        up = self.up
        u = self.act(F.conv3d(f, up.weight[self.phase_major], up.bias[self.phase_major], padding=up.padding))
        return base + hr_conv_by_phase(u, self.hr_conv.weight, self.hr_conv.bias, self.cfg.factor)

    def receptive_field(self) -> Radius:
        """Exact halo (z, y, x) in LR voxels, walked through the modules in forward order."""
        r_g = self.hf.radius if self.hf is not None else None
        r = _radius(self.head)
        if self.fuse is not None:
            r = _max(r, _add(r_g, _radius(self.fuse)))
        skip = r
        for block in self.blocks:
            r = block.radius(r, r_g)
        r = _max(skip, _add(r, _radius(self.tail)))
        r = _add(r, _radius(self.up))
        hz, hy, hx = _radius(self.hr_conv)
        r = _add(r, (-(-hz // self.cfg.factor), hy, hx))
        return _max(r, self.zinterp.radius)

    def flops_per_output_voxel(self) -> float:
        """2 × multiply-adds of every conv per output HR voxel (LR convs count 1/s per HR voxel)."""
        lr = hr = 0
        for m in self.modules():
            if isinstance(m, (nn.Conv3d, FixedConv3d)):
                macs = m.weight.numel()  # per output voxel of that conv, groups included
                if m is self.hr_conv:
                    hr += macs
                else:
                    lr += macs
        return 2.0 * (hr + lr / self.cfg.factor)

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ---------------------------------------------------------------------------------------------
# Config-level helpers and test-time augmentation
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _skeleton(cfg: DGEANConfig) -> DGEAN:
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        return DGEAN(cfg)


def receptive_field(cfg: DGEANConfig) -> Radius:
    """Halo per side (z, y, x), in LR voxels, that makes blockwise inference exact."""
    return _skeleton(cfg).receptive_field()


def flops_per_output_voxel(cfg: DGEANConfig) -> float:
    return _skeleton(cfg).flops_per_output_voxel()


def n_parameters(cfg: DGEANConfig) -> int:
    return _skeleton(cfg).n_parameters()


def size_table(factors: tuple[int, ...] = (4, 8), mode: str = "decimate") -> str:
    """The preset table of the module docstring: halo, parameters, FLOPs per HR voxel."""
    rows = ["preset  factor  halo (z, y, x)  parameters  FLOPs / HR voxel"]
    for preset in PRESETS:
        for s in factors:
            cfg = dgean_config(preset, s, mode)
            halo, params = str(receptive_field(cfg)), n_parameters(cfg)
            flops = flops_per_output_voxel(cfg)
            rows.append(f"{preset:<6}  {s:>6}  {halo:<14}  {params:>10,}  {flops:>16,.0f}")
    return "\n".join(rows)


def tta_forward(model: nn.Module, x: Tensor) -> Tensor:
    """Mean over the 8 xy symmetries (4 rotations × optional x flip); z is never transformed."""
    total = None
    for flip in (False, True):
        xf = x.flip(-1) if flip else x
        for k in range(4):
            y = torch.rot90(model(torch.rot90(xf, k, dims=(-2, -1))), -k, dims=(-2, -1))
            y = y.flip(-1) if flip else y
            total = y if total is None else total + y
    return total / 8
