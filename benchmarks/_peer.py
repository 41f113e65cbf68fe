"""The "2D regression peer" of D2R.md ("The bar every learned stage must clear").

A plain self-supervised 2D CNN, no diffusion, no 3D stage:

* network: 10 convolutions 3x3 (1 -> 32, 8 x 32 -> 32, 32 -> 1), ReLU between them, plus a
  residual connection on its input (it learns a correction of the linear interpolation);
* training data: XY slices of the LR volume only (never the ground truth). Random square
  patches (64^2 by default), random flips and 90-degree rotations, then decimated along y by
  ``s`` exactly as the acquisition decimates z, and linearly upsampled back along y with every
  kept row at its true position (``degrade_along`` / ``upsample_axis(method="linear",
  mode="decimate")``); target = the clean patch;
* L1 loss, AdamW (lr 1e-3, weight decay 1e-4), cosine decay of the learning rate over a
  wall-clock budget in seconds (the decay follows elapsed time, so it ends at the budget);
* inference: the LR volume linearly upsampled along z (``n * s`` slices), every XZ slice and
  every YZ slice through the network, the two orientations averaged.

Intensities are unit range inside (uint8 / 255, uint16 / 65535). Seeded (numpy and torch);
the number of steps reached within the budget depends on the machine.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import nn

from d2r_dask.data.degrade import degrade_along, upsample_axis

MODE = "decimate"


class PeerCNN(nn.Module):
    """``depth`` 3x3 convolutions of ``width`` channels, ReLU between, residual on the input."""

    def __init__(self, depth: int = 10, width: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(depth):
            cin = 1 if i == 0 else width
            cout = 1 if i == depth - 1 else width
            layers.append(nn.Conv2d(cin, cout, 3, padding=1))
            if i < depth - 1:
                layers.append(nn.ReLU(inplace=True))
        self.body = nn.Sequential(*layers)
        self.receptive_field = 2 * depth + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def to_unit(arr: np.ndarray) -> np.ndarray:
    """uint8 / uint16 to float32 in [0, 1]; float data is taken as already in unit range."""
    if np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.float32) / float(np.iinfo(arr.dtype).max)
    return arr.astype(np.float32)


def _augment(patch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if rng.random() < 0.5:
        patch = patch[::-1]
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    return np.rot90(patch, int(rng.integers(4)))


def make_pair(patch: np.ndarray, factor: int) -> np.ndarray:
    """The network input of a clean unit-range patch: decimated along y, linearly upsampled back."""
    lr = degrade_along(patch, factor, axis=0, mode=MODE)
    return upsample_axis(lr, factor, axis=0, mode=MODE, method="linear", length=patch.shape[0])


def train_peer(lr: np.ndarray, factor: int, seconds: float, seed: int = 0, *, patch: int = 64,
               batch_size: int = 16, lr_max: float = 1e-3, weight_decay: float = 1e-4,
               log_every: float = 0.0) -> tuple[PeerCNN, int]:
    """Train the peer on XY patches of the LR volume ``(n, Y, X)`` for ``seconds`` of wall clock.

    Returns ``(model in eval mode, training steps done)``. At least one step is always done.
    """
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    unit = to_unit(np.asarray(lr))
    n, ny, nx = unit.shape
    p = min(patch, ny, nx)
    if p < 2 * factor:
        raise ValueError(f"XY size {ny}x{nx} is too small for factor {factor}")
    model = PeerCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=lr_max, weight_decay=weight_decay)
    model.train()
    steps, t0, last_log, losses = 0, time.perf_counter(), 0.0, []
    while True:
        elapsed = time.perf_counter() - t0
        if steps > 0 and elapsed >= seconds:
            break
        for g in opt.param_groups:  # cosine decay over the time budget
            g["lr"] = lr_max * 0.5 * (1.0 + math.cos(math.pi * min(elapsed / max(seconds, 1e-9), 1.0)))
        tgt = np.empty((batch_size, 1, p, p), np.float32)
        inp = np.empty_like(tgt)
        for b in range(batch_size):
            z, y, x = int(rng.integers(n)), int(rng.integers(ny - p + 1)), int(rng.integers(nx - p + 1))
            clean = np.ascontiguousarray(_augment(unit[z, y:y + p, x:x + p], rng))
            tgt[b, 0] = clean
            inp[b, 0] = make_pair(clean, factor)
        pred = model(torch.from_numpy(inp))
        loss = torch.nn.functional.l1_loss(pred, torch.from_numpy(tgt))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
        losses.append(float(loss.detach()))
        if log_every and elapsed - last_log >= log_every:
            last_log = elapsed
            print(f"  peer step {steps}, {elapsed:.0f} s, L1 {np.mean(losses[-50:]):.4f}", flush=True)
    model.eval()
    return model, steps


@torch.no_grad()
def _run_slices(model: PeerCNN, slices: np.ndarray, batch: int) -> np.ndarray:
    out = np.empty_like(slices)
    for a in range(0, len(slices), batch):
        x = torch.from_numpy(np.ascontiguousarray(slices[a:a + batch, None]))
        out[a:a + batch] = model(x)[:, 0].numpy()
    return out


def apply_peer(model: PeerCNN, lr: np.ndarray, factor: int, *, batch: int = 8) -> np.ndarray:
    """The peer's SR of the LR volume ``(n, Y, X)``: float32 unit range, ``(n * factor, Y, X)``.

    XZ slices (one per y) and YZ slices (one per x) of the linear z-upsampling go through the
    network; the two results are averaged and clipped to [0, 1].
    """
    model.eval()
    up = upsample_axis(to_unit(np.asarray(lr)), factor, axis=0, mode=MODE, method="linear")  # (n*s, Y, X)
    xz = _run_slices(model, up.transpose(1, 0, 2), batch).transpose(1, 0, 2)  # (Y, Z, X) -> (Z, Y, X)
    yz = _run_slices(model, up.transpose(2, 0, 1), batch).transpose(1, 2, 0)  # (X, Z, Y) -> (Z, Y, X)
    out = 0.5 * (xz + yz)
    np.clip(out, 0.0, 1.0, out=out)
    return out.astype(np.float32, copy=False)
