"""Stage IV's default block, sized to the device and to DGEAN's halo, and its estimated time.

The halo DGEAN needs (its receptive field, 12-30 LR voxels per side) is computed again
by every block; small blocks spend most of their time on it (the former default
32 x 128 x 128 computed 2.5x / 3.5x / 6.2x the voxels it kept for tiny / base / full).
:func:`infer_block` picks the smallest cube whose overhead is <= 1.3x on a GPU (1.5x on a
CPU), or, where that does not fit the memory, the largest cube that does
(:func:`~d2r_dask.blockwise.layout.choose_block`): 60 % of a GPU's memory; on a CPU a quarter
of the memory per worker, at most 4 GiB (tiny: blocks of about a minute on 2 cores; the full
preset, halo 30, cannot reach a low overhead in CPU memory and is slow there anyway).

The memory model counts the largest tensors alive at once (the upsampling convolution's
``factor x width`` channels twice, which its in-place activation has made an upper bound, the
HR output), x1.5 for
convolution workspaces (on a CPU within 10-20 % of the peak RSS measured for base and
full). The time model is per computed HR voxel (halo included): on a CPU a memory-bound floor
plus the convolutions' flops at a fitted rate, fitted by ``benchmarks/bench_models_speed.py``
(``benchmarks/results/models_speed.json``: 2 cores, float32 channels-last as Stage IV runs,
tiny/medium/base at x4 and x8 within 23 %, on a shared machine under varying load; for fib25's
Stage IV with the CPU default it estimates 38 s at x4 and 30 s at x8, measured 43 s and 29 s in
the same session's runs); on a GPU an assumed 100 TFLOP/s
of bf16 convolution, not yet measured.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from ..blockwise.layout import choose_block, halo_overhead
from ..io.geometry import grid_shape

TARGET_OVERHEAD = {"cuda": 1.3, "cpu": 1.5}
"""The halo overhead each device type aims for."""
CPU_BLOCK_BYTES = 4 << 30
GPU_MEMORY_FRACTION = 0.6
CPU_SECONDS_PER_VOXEL_CORE = 2.0e-7  # memory-bound floor per HR voxel, one core
CPU_FLOPS_PER_CORE = 60e9
GPU_FLOPS = 100e12  # assumed, not measured
GPU_SECONDS_PER_VOXEL = 0.2e-9


def dgean_bytes_per_voxel(cfg: Any, device_type: str) -> float:
    """Peak memory per LR voxel of a block's read box (bf16 on a GPU, fp32 on a CPU)."""
    s, c = cfg.factor, cfg.width
    itemsize = 2 if device_type == "cuda" else 4
    return 1.5 * itemsize * ((2 * s + 1) * c + 2 * s + 4)


def device_info(device: str | None) -> dict[str, Any]:
    """``{"type", "memory_bytes", "cores", "name"}`` of ``device`` (default: a GPU if present)."""
    import psutil
    import torch
    from dask.system import CPU_COUNT

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        return {"type": "cuda", "memory_bytes": int(props.total_memory), "cores": CPU_COUNT, "name": props.name}
    return {"type": "cpu", "memory_bytes": int(psutil.virtual_memory().total), "cores": CPU_COUNT, "name": "cpu"}


def estimate_seconds(hr_voxels: float, flops_per_voxel: float, device: dict[str, Any]) -> float:
    """Estimated model time for ``hr_voxels`` computed HR voxels (halo included) on one device."""
    if device["type"] == "cuda":
        return hr_voxels * (GPU_SECONDS_PER_VOXEL + flops_per_voxel / GPU_FLOPS)
    return hr_voxels * (CPU_SECONDS_PER_VOXEL_CORE + flops_per_voxel / CPU_FLOPS_PER_CORE) / max(1, device["cores"])


def infer_block(shape: Sequence[int], cfg: Any, device: dict[str, Any], *, workers: int = 1,
                block: Sequence[int] | None = None, tta: bool = False) -> dict[str, Any]:
    """Stage IV's block for an LR volume of ``shape`` and the DGEAN ``cfg`` on ``device``
    (:func:`device_info`): ``block`` if given, else chosen; with its halo overhead, block
    count and estimated time (``workers`` devices of this kind working in parallel)."""
    from ..models.dgean import flops_per_output_voxel, receptive_field

    halo = tuple(receptive_field(cfg))
    kind = device["type"]
    if block is None:
        budget = (device["memory_bytes"] * GPU_MEMORY_FRACTION if kind == "cuda"
                  else min(CPU_BLOCK_BYTES, device["memory_bytes"] / max(1, workers) / 4))
        block = choose_block(shape, halo, max_voxels=budget / dgean_bytes_per_voxel(cfg, kind),
                             target=TARGET_OVERHEAD[kind])
    block = tuple(int(b) for b in block)
    n_blocks = math.prod(grid_shape(shape, block))
    computed = n_blocks * math.prod(b + 2 * h for b, h in zip(block, halo)) * cfg.factor * (8 if tta else 1)
    seconds = estimate_seconds(computed, flops_per_output_voxel(cfg), device)
    if kind == "cuda":  # one GPU per worker; CPU workers share the host's cores
        seconds /= max(1, workers)
    return {"block": list(block), "halo": list(halo), "halo_overhead": round(halo_overhead(block, halo), 3),
            "blocks": n_blocks, "device": f"{kind} ({device['name']})", "estimated_seconds": round(seconds, 1),
            "estimate": "CPU: fitted to benchmarks/results/models_speed.json; GPU: assumed 100 TFLOP/s, "
                        "not yet measured"}
