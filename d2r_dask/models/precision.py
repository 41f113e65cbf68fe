"""Where bf16 and channels-last memory pay, per device (training and inference differ).

* **Training in bf16 autocast** on a GPU, and on a CPU that computes bf16 natively (AMX or
  AVX512-BF16, recent Xeons) for the 3D network: there DGEAN's training step is 2x faster
  (2.6x with channels-last; ``benchmarks/bench_precision.py``) at the same quality. The 2D
  restorer gains nothing from it on a CPU (its step time is unchanged) and stays float32; a
  CPU without native bf16 would emulate it, slower than float32. Fixed filters,
  interpolation and losses run in float32 inside autocast (:mod:`.dgean`, :mod:`.losses`);
  weights and optimiser state stay float32. ``D2R_BF16=0`` (or ``1``) overrides the CPU test.
* **Inference in bf16 on a GPU only.** On a CPU, oneDNN's bf16 kernels round differently
  for different batch and block shapes by far more than its float32 ones, so a volume's
  result would depend on its chunking; Stages II and IV stay float32 there.
* **channels-last memory** (``channels_last`` for 2D, ``channels_last_3d`` for 3D nets) on
  every device: oneDNN and cuDNN run convolutions in that layout without reordering. On a CPU
  it makes DGEAN's step 1.3x and the restorer's inference 1.3x faster in float32.

The same inputs give the same bits on the same machine and thread count; a different CPU
family or precision rule rounds differently, as float32 kernels already do between ISAs.
"""

from __future__ import annotations

import os

import torch


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` runs bf16 natively (``D2R_BF16=0/1`` overrides, on any device)."""
    forced = os.environ.get("D2R_BF16", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    kind = torch.device(device).type
    if kind == "cuda":
        return True
    if kind != "cpu":
        return False
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    try:
        return any(check() for check in checks if check is not None)
    except RuntimeError:  # a build without the CPU capability query: stay in float32
        return False


def train_bf16(device: torch.device | str, model: torch.nn.Module) -> bool:
    """Whether ``model`` trains in bf16 autocast on ``device``: on a GPU, or on a native-bf16
    CPU when it is a 3D network."""
    kind = torch.device(device).type
    return kind == "cuda" or (kind == "cpu" and native_bf16(device) and memory_format(model) == torch.channels_last_3d)


def inference_bf16(device: torch.device | str) -> bool:
    """Whether Stages II and IV run in bf16 autocast on ``device`` by default: on a GPU."""
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
