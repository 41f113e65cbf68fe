"""Conditional NAFNet: the noise-prediction U-Net of the D2R diffusion restorer.

Top-down, as in the IR-SDE ``ConditionalNAFNet`` of Luo et al. that the D2R authors use:

- ``ConditionalNAFNet`` maps ``concat(x_t - mu, mu)`` and the timestep ``t`` to the predicted
  noise. A sinusoidal embedding of ``t`` goes through an MLP (Linear, SimpleGate, Linear) and
  is handed to every block. The image path is ``intro`` (3x3 conv) -> encoder levels (NAFBlocks,
  then a 2x2 stride-2 conv that doubles the channels) -> middle NAFBlocks -> decoder levels
  (1x1 conv + PixelShuffle that halves the channels, add the encoder skip, NAFBlocks) ->
  ``ending`` (3x3 conv). No self-attention anywhere.
- ``NAFBlock``: LayerNorm, time scale/shift, 1x1 conv, 3x3 depthwise conv, SimpleGate,
  simplified channel attention (SCA), 1x1 conv, residual with a learnable scale ``beta``; then
  LayerNorm, time scale/shift, a SimpleGate FFN, residual with a learnable scale ``gamma``.
- ``ChannelMean`` is the pooling inside SCA: the global mean of the authors, or (``sca_window``)
  a local box mean, so the network's output at a pixel depends on a bounded neighbourhood only
  (``receptive_radius``) and tiled inference can match whole-image inference.

Size rule: inputs are padded at the bottom/right to a multiple of ``size_multiple`` (reflect
where the image is large enough, else replicate) and the output is cropped back, so any
``H, W`` works. Parameter names match the authors' module, so their checkpoints load.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .config import config_from_dict


@dataclass(frozen=True)
class NAFNetConfig:
    """Width and depth of a ConditionalNAFNet.

    ``enc_blocks[l]`` NAFBlocks run at level ``l`` (resolution ``1/2**l``, ``width * 2**l``
    channels) before downsampling; ``dec_blocks[l]`` run after the ``l``-th upsampling, from
    the coarsest level back. ``sca_window`` is None for the authors' global channel pooling,
    or a window side in full-resolution pixels for local pooling (``window // 2**l`` at level
    ``l``), which bounds the receptive field; it has no parameters, so a model trained with
    global pooling can be run with a window.
    """

    width: int
    enc_blocks: tuple[int, ...]
    middle_blocks: int
    dec_blocks: tuple[int, ...]
    in_channels: int = 2
    out_channels: int = 1
    sca_window: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "enc_blocks", tuple(self.enc_blocks))
        object.__setattr__(self, "dec_blocks", tuple(self.dec_blocks))
        if not _is_int(self.width) or self.width < 4 or self.width % 2:
            raise ValueError(f"width must be an even integer >= 4, got {self.width!r}")
        for name in ("enc_blocks", "dec_blocks"):
            blocks = getattr(self, name)
            if not all(_is_int(n) and n >= 0 for n in blocks):
                raise ValueError(f"{name} must be non-negative integers, got {blocks!r}")
        if len(self.enc_blocks) != len(self.dec_blocks):
            raise ValueError(
                f"enc_blocks and dec_blocks need one entry per level, got {len(self.enc_blocks)} "
                f"and {len(self.dec_blocks)} levels"
            )
        if not _is_int(self.middle_blocks) or self.middle_blocks < 0:
            raise ValueError(f"middle_blocks must be an integer >= 0, got {self.middle_blocks!r}")
        for name in ("in_channels", "out_channels"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.sca_window is not None and (not _is_int(self.sca_window) or self.sca_window < 1):
            raise ValueError(f"sca_window must be None or an integer >= 1, got {self.sca_window!r}")

    @property
    def levels(self) -> int:
        """Number of encoder/decoder levels (downsamplings)."""
        return len(self.enc_blocks)

    def sca_window_at(self, level: int) -> int | None:
        """The SCA pooling window at ``level`` (None = global)."""
        return None if self.sca_window is None else max(1, self.sca_window >> level)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (tuples become lists)."""
        d = asdict(self)
        d["enc_blocks"] = list(self.enc_blocks)
        d["dec_blocks"] = list(self.dec_blocks)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NAFNetConfig:
        """Inverse of ``to_dict``; unknown keys are an error, not silently dropped."""
        return config_from_dict(cls, data)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


PRESETS: dict[str, NAFNetConfig] = {
    # CPU tests and smoke runs: 0.34 M parameters; ~0.14 s per AdamW step on 4 x 64² on one core.
    "tiny": NAFNetConfig(width=16, enc_blocks=(1, 1, 1), middle_blocks=1, dec_blocks=(1, 1, 1)),
    # The authors' layout at half width, 2 first-level blocks: 4.9 M parameters, quick GPU runs.
    "small": NAFNetConfig(width=32, enc_blocks=(2, 1, 1, 1), middle_blocks=1, dec_blocks=(1, 1, 1, 1)),
    # The D2R authors' restorer: 20.3 M parameters.
    "full": NAFNetConfig(width=64, enc_blocks=(14, 1, 1, 1), middle_blocks=1, dec_blocks=(1, 1, 1, 1)),
}


def nafnet_config(spec: str | NAFNetConfig | Mapping[str, Any]) -> NAFNetConfig:
    """A config from a preset name, a config, or a ``to_dict`` mapping."""
    if isinstance(spec, NAFNetConfig):
        return spec
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise ValueError(f"unknown NAFNet preset {spec!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[spec]
    return NAFNetConfig.from_dict(spec)


class SimpleGate(nn.Module):
    """Split the channels in two halves and multiply them: NAFNet's activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return a * b


class LayerNorm2d(nn.Module):
    """LayerNorm over channels at each pixel, with a gain only (as the authors' ``LayerNorm``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.g = nn.Parameter(torch.ones(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = 1e-5 if x.dtype == torch.float32 else 1e-3
        var, mean = torch.var_mean(x, dim=1, unbiased=False, keepdim=True)
        return (x - mean) * (var + eps).rsqrt() * self.g


class SinusoidalPosEmb(nn.Module):
    """Transformer-style sin/cos embedding of a (B,) timestep vector -> (B, dim)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        half = dim // 2
        freqs = torch.exp(torch.arange(half, dtype=torch.float32) * (-math.log(10000.0) / (half - 1)))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t.to(self.freqs.dtype)[:, None] * self.freqs[None, :]
        return torch.cat((angles.sin(), angles.cos()), dim=-1)


class ChannelMean(nn.Module):
    """Per-channel mean for SCA: global (``window=None``) or over a ``window``-sided box.

    The box is centred on each pixel and clipped at the image border (the mean is over the
    pixels inside), computed from cumulative sums in float64, so it costs O(1) per pixel
    whatever the window; pixels outside the box change the result only by float64 rounding.
    A window at least ``2 * max(H, W) - 1`` wide equals the global mean.
    """

    def __init__(self, window: int | None = None) -> None:
        super().__init__()
        self.window = window

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.window is None:
            return x.mean(dim=(2, 3), keepdim=True)
        out = x.double()
        for dim in (2, 3):
            out = _box_mean_along(out, dim, self.window)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"window={self.window}"


def _box_mean_along(x: torch.Tensor, dim: int, window: int) -> torch.Tensor:
    """Mean over ``[i - window//2, i - window//2 + window)`` clipped to ``[0, n)`` along ``dim``."""
    n = x.shape[dim]
    first = torch.arange(n, device=x.device) - window // 2
    start, stop = first.clamp(0, n), (first + window).clamp(0, n)
    pad = [0, 0] * (x.ndim - 1 - dim) + [1, 0]
    csum = F.pad(x.cumsum(dim), pad)  # csum[k] = sum of the first k entries
    shape = [1] * x.ndim
    shape[dim] = n
    count = (stop - start).to(x.dtype).view(shape)
    return (csum.index_select(dim, stop) - csum.index_select(dim, start)) / count


class NAFBlock(nn.Module):
    """NAFNet block modulated by the time embedding (scale/shift before both halves)."""

    def __init__(self, channels: int, time_dim: int, sca_window: int | None = None) -> None:
        super().__init__()
        dw = 2 * channels
        self.mlp = nn.Sequential(SimpleGate(), nn.Linear(time_dim // 2, 4 * channels))
        self.norm1 = LayerNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, dw, kernel_size=1)
        self.conv2 = nn.Conv2d(dw, dw, kernel_size=3, padding=1, groups=dw)
        self.sg = SimpleGate()
        self.sca = nn.Sequential(ChannelMean(sca_window), nn.Conv2d(dw // 2, dw // 2, kernel_size=1))
        self.conv3 = nn.Conv2d(dw // 2, channels, kernel_size=1)
        self.norm2 = LayerNorm2d(channels)
        self.conv4 = nn.Conv2d(channels, 2 * channels, kernel_size=1)
        self.conv5 = nn.Conv2d(channels, channels, kernel_size=1)
        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, inp: torch.Tensor, time_emb: torch.Tensor) -> torch.Tensor:
        shift_att, scale_att, shift_ffn, scale_ffn = self.mlp(time_emb)[:, :, None, None].chunk(4, dim=1)

        x = self.norm1(inp) * (scale_att + 1) + shift_att
        x = self.sg(self.conv2(self.conv1(x)))
        x = self.conv3(x * self.sca(x))
        y = inp + x * self.beta

        x = self.norm2(y) * (scale_ffn + 1) + shift_ffn
        x = self.conv5(self.sg(self.conv4(x)))
        return y + x * self.gamma


class ConditionalNAFNet(nn.Module):
    """Noise predictor ``(concat(x_t - mu, mu), t) -> eps``: (B, 2, H, W), (B,) -> (B, 1, H, W)."""

    def __init__(self, config: NAFNetConfig) -> None:
        super().__init__()
        self.config = config
        width, time_dim = config.width, 4 * config.width
        self.time_mlp = nn.Sequential(
            SinusoidalPosEmb(width),
            nn.Linear(width, 2 * time_dim),
            SimpleGate(),
            nn.Linear(time_dim, time_dim),
        )
        self.intro = nn.Conv2d(config.in_channels, width, kernel_size=3, padding=1)
        self.ending = nn.Conv2d(width, config.out_channels, kernel_size=3, padding=1)

        def stage(channels: int, n_blocks: int, level: int) -> nn.ModuleList:
            window = config.sca_window_at(level)
            return nn.ModuleList(NAFBlock(channels, time_dim, window) for _ in range(n_blocks))

        self.encoders, self.downs = nn.ModuleList(), nn.ModuleList()
        chan = width
        for level, n_blocks in enumerate(config.enc_blocks):
            self.encoders.append(stage(chan, n_blocks, level))
            self.downs.append(nn.Conv2d(chan, 2 * chan, kernel_size=2, stride=2))
            chan *= 2
        self.middle_blks = stage(chan, config.middle_blocks, config.levels)
        self.ups, self.decoders = nn.ModuleList(), nn.ModuleList()
        for level, n_blocks in zip(reversed(range(config.levels)), config.dec_blocks):
            self.ups.append(nn.Sequential(nn.Conv2d(chan, 2 * chan, kernel_size=1, bias=False), nn.PixelShuffle(2)))
            chan //= 2
            self.decoders.append(stage(chan, n_blocks, level))

    @property
    def size_multiple(self) -> int:
        """Inputs are padded internally to a multiple of this (one factor 2 per level)."""
        return 2**self.config.levels

    @property
    def receptive_radius(self) -> int | None:
        """Pixels of context each output pixel depends on, per side; None with global SCA.

        Counted on the full-resolution grid: a 3x3 conv at level ``l`` adds ``2**l``, a local
        SCA window ``w`` adds ``(w // 2) * 2**l``, an upsampling into level ``l`` adds ``2**l``
        (a coarse pixel covers its neighbour too), the stride-2 downsampling adds nothing.
        """
        cfg = self.config
        if cfg.sca_window is None:
            return None

        def blocks(n_blocks: int, level: int) -> int:
            return n_blocks * (1 + cfg.sca_window_at(level) // 2) * 2**level

        radius = 1  # intro
        for level, n_blocks in enumerate(cfg.enc_blocks):
            radius += blocks(n_blocks, level)
        radius += blocks(cfg.middle_blocks, cfg.levels)
        for level, n_blocks in zip(reversed(range(cfg.levels)), cfg.dec_blocks):
            radius += 2**level + blocks(n_blocks, level)
        return radius + 1  # ending

    def n_parameters(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        batch, _, height, width = x.shape
        time_emb = self.time_mlp(torch.as_tensor(t, device=x.device).reshape(-1).expand(batch))

        x = self.intro(_pad_to_multiple(x, self.size_multiple))
        skips = []
        for blocks, down in zip(self.encoders, self.downs):
            for block in blocks:
                x = block(x, time_emb)
            skips.append(x)
            x = down(x)
        for block in self.middle_blks:
            x = block(x, time_emb)
        for blocks, up, skip in zip(self.decoders, self.ups, reversed(skips)):
            x = up(x) + skip
            for block in blocks:
                x = block(x, time_emb)
        return self.ending(x)[..., :height, :width]


def _pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad bottom/right up to a multiple: reflect if the image allows it, else replicate."""
    height, width = x.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    if pad_h == 0 and pad_w == 0:
        return x
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
