"""Model specifications and the block processors that the engine runs on workers.

The engine never holds a model: it ships a :class:`ModelSpec` (what to load, a few
bytes) to workers, and each worker process turns it into a
:class:`BlockProcessor` once, caches it, and reuses it for every block. A
processor maps a batch of input blocks (float32, raw intensities, halo included)
to output blocks, ``scale`` times larger per axis, and declares its own ``halo``
(the receptive field it needs in crop mode).

Built-in kinds: ``dgean`` and ``restorer`` (checkpoints written by the trainers)
and three small deterministic ones for tests and benchmarks: ``conv3d`` (a fixed
random 3D convolution + nearest z-upsampling), ``tile-variant`` (``conv3d`` whose
output also depends on the position inside the tile, so its blocks disagree like
a stochastic sampler's) and ``noop``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from ..errors import InputError
from ..io.geometry import Triple

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """What a worker should load: a registered ``kind``, an optional checkpoint
    directory ``path`` and JSON-able ``options`` (sampler, seed, tta, ...)."""

    kind: str
    path: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in _REGISTRY and self.kind not in _BUILTIN_MODULES:
            known = sorted(set(_REGISTRY) | set(_BUILTIN_MODULES))
            raise InputError(f"unknown model kind {self.kind!r}; known: {', '.join(known)}")
        object.__setattr__(self, "options", dict(self.options))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": self.path, "options": dict(self.options)}

    def token(self) -> str:
        """A hash of the kind, options and the checkpoint's bytes (names a result)."""
        h = hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, default=str).encode())
        if self.path is not None:
            for f in sorted(Path(self.path).glob("*")):
                if f.is_file() and f.suffix in (".json", ".safetensors"):
                    h.update(f.name.encode())
                    h.update(f.read_bytes())
        return h.hexdigest()


class BlockProcessor(Protocol):
    """Maps ``(B, Z, Y, X)`` float32 blocks (with halo) to ``(B, Z*sz, Y*sy, X*sx)``.

    ``origins`` are the global input coordinates of each block's first voxel, so
    stochastic processors can key their noise by position. A processor for the ``slices``
    stitch mode also declares ``slice_axes`` (one per part of its output), is called with a
    third argument, the box each block owns (in its block's coordinates), and returns
    ``(B, P, Z*sz, Y*sy, X*sx)``: part ``p`` made slice by slice along ``slice_axes[p]``, on
    the owned slices.

    A processor that declares ``device_io = True`` is given the blocks in their stored dtype
    (uint8, uint16 or float32) instead, and in ``crop`` mode an ``out_dtype`` keyword: it then
    returns the blocks rounded and cast to it (:func:`~d2r_dask.io.volume.to_dtype`'s rule),
    so that only stored bytes cross to and from its device.
    """

    halo: Triple
    scale: Triple

    def __call__(self, blocks: np.ndarray, origins: Sequence[Triple]) -> np.ndarray: ...


Loader = Callable[[ModelSpec, str], BlockProcessor]
_REGISTRY: dict[str, Loader] = {}
# the stages' processors register themselves when their module is imported
_BUILTIN_MODULES = {"restorer": "d2r_dask.stages.restore", "dgean": "d2r_dask.stages.infer"}


def register(kind: str) -> Callable[[Loader], Loader]:
    """Register a loader ``(spec, device) -> BlockProcessor`` under ``kind``."""

    def deco(fn: Loader) -> Loader:
        _REGISTRY[kind] = fn
        return fn

    return deco


def register_checkpoint(kind: str, what: str) -> Callable[[type], type]:
    """Register a processor class built as ``cls(checkpoint_dir, device, **spec.options)``."""

    def deco(cls: type) -> type:
        def load(spec: ModelSpec, device: str) -> BlockProcessor:
            if spec.path is None:
                raise InputError(f"a {what} model spec needs the checkpoint directory (--model)")
            return cls(spec.path, device, **spec.options)

        _REGISTRY[kind] = load
        return cls

    return deco


def load_processor(spec: ModelSpec, device: str = "cpu") -> BlockProcessor:
    """Build the processor for ``spec`` on ``device`` (the engine caches it per worker)."""
    if spec.kind not in _REGISTRY:
        importlib.import_module(_BUILTIN_MODULES[spec.kind])
    return _REGISTRY[spec.kind](spec, device)


# --- small deterministic processors for tests and benchmarks ----------------------------


class Conv3dProcessor:
    """A fixed, seeded 3D conv stack + nearest upsampling along z: deterministic and
    translation invariant, receptive field ``depth * (k // 2)`` per side."""

    def __init__(self, *, scale_z: int = 1, channels: int = 8, depth: int = 2, kernel: int = 3,
                 seed: int = 0, device: str = "cpu", position_strength: float = 0.0) -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)
        g = torch.Generator().manual_seed(seed)
        chans = [1] + [channels] * (depth - 1) + [1]
        self.weights = [
            (torch.randn(co, ci, kernel, kernel, kernel, generator=g) / (ci * kernel**3) ** 0.5).to(self.device)
            for ci, co in zip(chans[:-1], chans[1:])
        ]
        r = depth * (kernel // 2)
        self.halo: Triple = (r, r, r)
        self.scale: Triple = (scale_z, 1, 1)
        self.position_strength = position_strength

    def __call__(self, blocks: np.ndarray, origins: Sequence[Triple]) -> np.ndarray:
        torch = self.torch
        with torch.no_grad():
            x = torch.from_numpy(np.ascontiguousarray(blocks, dtype=np.float32))[:, None].to(self.device)
            for i, w in enumerate(self.weights):
                x = torch.nn.functional.conv3d(x, w, padding=w.shape[-1] // 2)
                if i < len(self.weights) - 1:
                    x = torch.tanh(x)
            x = x + torch.from_numpy(np.ascontiguousarray(blocks, dtype=np.float32))[:, None].to(self.device)
            if self.scale[0] > 1:
                x = torch.repeat_interleave(x, self.scale[0], dim=2)
            if self.position_strength:
                # a tile-local ramp: the same voxel gets a different value in each tile
                ramp = [torch.linspace(-1, 1, n, device=self.device) for n in x.shape[2:]]
                zz, yy, xx = torch.meshgrid(*ramp, indexing="ij")
                x = x * (1 + self.position_strength * (zz + yy + xx) / 3)
            return x[:, 0].float().cpu().numpy()


class NoopProcessor:
    """Returns its input (cropped by the engine): measures the engine's own overhead."""

    def __init__(self, scale_z: int = 1) -> None:
        self.halo: Triple = (0, 0, 0)
        self.scale: Triple = (scale_z, 1, 1)

    def __call__(self, blocks: np.ndarray, origins: Sequence[Triple]) -> np.ndarray:
        return np.repeat(blocks, self.scale[0], axis=1) if self.scale[0] > 1 else blocks


@register("conv3d")
def _load_conv3d(spec: ModelSpec, device: str) -> BlockProcessor:
    return Conv3dProcessor(device=device, **spec.options)


@register("tile-variant")
def _load_tile_variant(spec: ModelSpec, device: str) -> BlockProcessor:
    opts = {"position_strength": 0.2, **spec.options}
    return Conv3dProcessor(device=device, **opts)


@register("noop")
def _load_noop(spec: ModelSpec, device: str) -> BlockProcessor:
    return NoopProcessor(**spec.options)
