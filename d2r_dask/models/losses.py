"""Training losses that reward high frequencies (DGEAN, stage III and the supervised baseline).

A plain L1 on intensities lets a z-upsampler stay blurry: a smooth guess is cheap. The gradient
term compares 3D finite differences, so a missing edge costs twice (value and slope); the
optional Fourier term compares amplitude spectra, which penalises a missing band regardless of
where in the patch the detail sits.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _gradient_l1(pred: Tensor, target: Tensor) -> Tensor:
    """Mean over z, y, x of the L1 between forward differences along that axis."""
    return sum(
        (torch.diff(pred, dim=d) - torch.diff(target, dim=d)).abs().mean() for d in (-3, -2, -1)
    ) / 3


def _fourier_l1(pred: Tensor, target: Tensor) -> Tensor:
    """L1 between 3D amplitude spectra (orthonormal FFT, so the scale matches the voxels')."""
    with torch.autocast(pred.device.type, enabled=False):
        a = torch.fft.rfftn(pred.float(), dim=(-3, -2, -1), norm="ortho").abs()
        b = torch.fft.rfftn(target.float(), dim=(-3, -2, -1), norm="ortho").abs()
    return (a - b).abs().mean()


def hf_loss(pred: Tensor, target: Tensor, *, weight: float = 1.0, fourier_weight: float = 0.0) -> Tensor:
    """``L1 + weight · L1(∇pred, ∇target) + fourier_weight · L1(|F pred|, |F target|)``.

    ``pred`` and ``target`` are ``(..., Z, Y, X)`` with at least 2 voxels per axis; a scalar
    comes back. Both weights must be >= 0 (0 switches the term off).
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ; crop them alike")
    if pred.ndim < 3 or min(pred.shape[-3:]) < 2:
        raise ValueError(f"need (..., Z, Y, X) with >= 2 voxels per axis, got {tuple(pred.shape)}")
    if weight < 0 or fourier_weight < 0:
        raise ValueError(f"weight={weight}, fourier_weight={fourier_weight}: weights must be >= 0")
    loss = (pred - target).abs().mean()
    if weight:
        loss = loss + weight * _gradient_l1(pred, target)
    if fourier_weight:
        loss = loss + fourier_weight * _fourier_l1(pred, target)
    return loss
