"""Arithmetic and memory layout per device: bf16 autocast on a GPU, channels-last everywhere.

* **bf16 autocast on a GPU only** (training and inference). Fixed filters, interpolation and
  losses run in float32 inside autocast (:mod:`.dgean`, :mod:`.losses`); weights and optimiser
  state stay float32. A CPU with AMX would train DGEAN 2.6x faster in bf16
  (``benchmarks/bench_precision.py``), but there oneDNN's bf16 training gave different weights
  on every run of the same seed (float32 gives the same bits), and one run's loss spiked from
  0.03 to 5 at step 300; its bf16 inference rounds differently for different block shapes, so
  a volume's result would depend on its chunking. The CPU therefore computes in float32.
* **channels-last memory** (``channels_last`` for 2D, ``channels_last_3d`` for 3D networks) on
  every device: oneDNN and cuDNN run convolutions in that layout without reordering. On a CPU,
  in float32, DGEAN's training step is 1.4x faster, its inference 1.7x and the restorer's
  inference 1.3x, with the same results to float32 rounding (tested) and the same bits run to run.
"""

from __future__ import annotations

import torch


def autocast_bf16(device: torch.device | str) -> bool:
    """Whether networks on ``device`` run in bf16 autocast by default: on a GPU."""
    return torch.device(device).type == "cuda"


def memory_format(model: torch.nn.Module) -> torch.memory_format:
    """The channels-last format that fits ``model``'s convolutions (3D or 2D)."""
    dims = {p.dim() for p in model.parameters()}
    return torch.channels_last_3d if 5 in dims else torch.channels_last


def channels_last(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with its convolution weights in channels-last memory (in place, returned)."""
    return model.to(memory_format=memory_format(model))


def channels_last_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` (4D or 5D) in channels-last memory; other ranks unchanged."""
    if x.dim() == 5:
        return x.contiguous(memory_format=torch.channels_last_3d)
    if x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x
