"""Blockwise execution of a model over a stored volume, on dask.distributed.

Vocabulary (after daisy): the input region ``roi`` is cut into ``block`` s on a
fixed grid from the ROI's origin (block ids are grid positions, stable across
runs); a block's *write box* is the part of the output it owns, its *read box*
is the full-size block grown by the ``halo``. Read boxes reaching outside the
volume are filled by reflection, exactly like ``np.pad(mode="reflect")`` of the
whole volume, so blockwise and whole-volume results agree::

        halo   block (write box)   halo
      |<---->|<------------------>|<---->|        read box = block + 2 * halo
              ^ output chunk = write box * scale (one task writes it, once)

Two ways to stitch:

* ``crop`` — halo >= the model's receptive field, halos cropped: for a
  deterministic model the result equals whole-volume inference.
* ``blend`` — neighbouring tiles overlap by ``2 * halo`` and are cross-faded
  with weights ``sin^2`` / ``cos^2`` that sum to one everywhere (a partition of
  unity). Phase 1 writes each tile's weighted prediction to a scratch array,
  phase 2 sums the (up to 27) tiles covering each output chunk. For models whose
  tiles disagree (stochastic samplers, position-dependent networks).

Tasks are groups of consecutive blocks (batched on the device), submitted in a
sliding window so the scheduler holds a bounded number of tasks whatever the
volume size. Each finished group leaves a done-marker in ``OUTPUT/.d2r/done``;
``OUTPUT/.d2r/job.json`` ties them to a hash of the input, layout and model,
so a rerun recomputes only unfinished groups and refuses to mix different jobs.
The NGFF metadata is written last, by :func:`~d2r_dask.volume.finalize_volume`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from .errors import InputError, OutputExistsError, ResumeMismatchError
from .geometry import Box, grid_shape, iter_blocks
from .processors import BlockProcessor, ModelSpec, load_processor
from .volume import Geometry, create_volume, finalize_volume, is_complete, open_volume, output_array

log = logging.getLogger(__name__)

Triple = tuple[int, int, int]
STITCH_MODES = ("crop", "blend")
ENGINE_VERSION = 1


# --- layout: pure geometry of a blockwise job ------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Blocks over an input region. Sizes in input voxels; ``scale`` is output/input per axis."""

    roi: Box
    block: Triple
    halo: Triple
    scale: Triple = (1, 1, 1)
    stitch: str = "crop"
    group: int = 1
    context: Triple = (0, 0, 0)

    def __post_init__(self) -> None:
        for name in ("block", "halo", "scale", "context"):
            value = tuple(int(v) for v in getattr(self, name))
            if len(value) != 3:
                raise InputError(f"{name} needs three values (z, y, x), got {value}")
            object.__setattr__(self, name, value)
        if min(self.block) < 1 or min(self.scale) < 1 or min(self.halo) < 0 or min(self.context) < 0:
            raise InputError(f"block {self.block} and scale {self.scale} must be >= 1, halo {self.halo} >= 0")
        if self.stitch not in STITCH_MODES:
            raise InputError(f"unknown stitch mode {self.stitch!r}; use crop or blend")
        if self.group < 1:
            raise InputError("blocks per task (group) must be >= 1")
        if min(self.roi.shape) < 1:
            raise InputError(f"region {self.roi} is empty")
        if self.stitch == "blend":
            for ax, b, h, n in zip("zyx", self.block, self.halo, self.roi.shape):
                if h and n > b and b < 2 * h:
                    raise InputError(
                        f"blend mode needs blocks at least twice the halo: block {ax}={b} < 2 x {h}; "
                        f"use a block of >= {2 * h} along {ax} or a smaller overlap"
                    )

    @property
    def shape(self) -> Triple:
        return self.roi.shape  # type: ignore[return-value]

    @property
    def out_shape(self) -> Triple:
        return tuple(n * s for n, s in zip(self.shape, self.scale))  # type: ignore[return-value]

    @property
    def out_block(self) -> Triple:
        return tuple(b * s for b, s in zip(self.block, self.scale))  # type: ignore[return-value]

    @property
    def grid(self) -> Triple:
        return grid_shape(self.shape, self.block)  # type: ignore[return-value]

    @property
    def n_blocks(self) -> int:
        return math.prod(self.grid)

    def blocks(self) -> Iterator[tuple[Triple, Box]]:
        """``(index, write box)`` per block, ROI-relative input coordinates, C order."""
        return iter_blocks(self.shape, self.block)  # type: ignore[return-value]

    def read_box(self, index: Sequence[int]) -> Box:
        """The full-size block at ``index`` grown by halo and context (ROI-relative; may leave the ROI)."""
        start = tuple(i * b for i, b in zip(index, self.block))
        margin = tuple(h + c for h, c in zip(self.halo, self.context))
        return Box(start, tuple(a + b for a, b in zip(start, self.block))).grow(margin)

    def groups(self) -> list[list[Triple]]:
        """Consecutive blocks (C order) processed by one task."""
        indices = [index for index, _ in self.blocks()]
        return [indices[i : i + self.group] for i in range(0, len(indices), self.group)]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["roi"] = {"start": list(self.roi.start), "stop": list(self.roi.stop)}
        return d


def reflect_index(idx: np.ndarray, n: int) -> np.ndarray:
    """Map indices outside ``[0, n)`` inside by mirror reflection (``np.pad`` ``reflect``)."""
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    idx = np.mod(idx, period)
    return np.where(idx >= n, period - idx, idx)


def read_reflected(read: Any, volume_shape: Sequence[int], box: Box) -> np.ndarray:
    """Read ``box`` (global coordinates) from a volume, reflecting outside its bounds.

    ``read(slices)`` returns the array inside the volume; only the bounding box of
    the needed voxels is read.
    """
    idx = [reflect_index(np.arange(a, b), n) for a, b, n in zip(box.start, box.stop, volume_shape)]
    lo = [int(i.min()) for i in idx]
    hi = [int(i.max()) + 1 for i in idx]
    data = np.asarray(read(tuple(slice(a, b) for a, b in zip(lo, hi))))
    return data[np.ix_(*(i - a for i, a in zip(idx, lo)))]


def blend_weights_1d(n_out: int, start: int, full: int, halo: int, length: int) -> np.ndarray:
    """Weights along one axis of the tile whose block starts at ``start`` (output units).

    The tile spans ``[start - halo, start + full + halo)``. Where two tiles overlap,
    ``sin^2`` rises as ``cos^2`` falls, so the weights of all tiles sum to one at
    every position inside ``[0, length)``; at the volume's ends the weight stays 1.
    """
    pos = np.arange(start - halo, start + full + halo) + 0.5
    w = np.zeros(n_out, dtype=np.float64)
    stop = min(start + full, length)
    inside = (pos >= start) & (pos < stop)
    w[inside] = 1.0
    if halo:
        if start > 0:
            u = (pos - (start - halo)) / (2 * halo)
            rise = (u >= 0) & (u < 1)
            w[rise] = np.sin(np.pi / 2 * u[rise]) ** 2
        if stop < length:
            u = (pos - (stop - halo)) / (2 * halo)
            fall = (u >= 0) & (u < 1)
            w[fall] = np.cos(np.pi / 2 * u[fall]) ** 2
    w[(pos < 0) | (pos >= length)] = 0.0
    return w.astype(np.float32)


def blend_weights(layout: Layout, index: Sequence[int]) -> np.ndarray:
    """The 3D partition-of-unity weight of the tile at ``index`` (output units)."""
    ws = []
    for i, b, h, s, n in zip(index, layout.block, layout.halo, layout.scale, layout.shape):
        full, halo = b * s, h * s
        ws.append(blend_weights_1d(full + 2 * halo, i * full, full, halo, n * s))
    return ws[0][:, None, None] * ws[1][None, :, None] * ws[2][None, None, :]


def apply_whole(processor: BlockProcessor, volume: np.ndarray, halo: Sequence[int]) -> np.ndarray:
    """Whole-volume inference: reflect-pad by ``halo``, run once, crop (the crop-mode reference)."""
    padded = np.pad(volume.astype(np.float32), [(h, h) for h in halo], mode="reflect")
    out = processor(padded[None], [tuple(-h for h in halo)])[0]  # type: ignore[arg-type]
    crop = tuple(slice(h * s, out.shape[i] - h * s) for i, (h, s) in enumerate(zip(halo, processor.scale)))
    return out[crop]


# --- the job --------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """Everything a worker needs for one blockwise run (small and picklable)."""

    source: str
    output: str
    spec: ModelSpec
    layout: Layout
    out_dtype: str
    level: int = 0
    token: str = field(default="", compare=False)

    @property
    def state_dir(self) -> Path:
        return Path(self.output) / ".d2r"

    def marker(self, phase: str, group_id: int) -> Path:
        return self.state_dir / "done" / f"{phase}-{group_id}"


def _fingerprint(source: str, level: int) -> dict[str, Any]:
    vol = open_volume(source, level=level)
    meta = hashlib.sha256()
    for f in sorted(Path(source).rglob("zarr.json")) + sorted(Path(source).rglob(".zarray")):
        meta.update(f.read_bytes())
    return {
        "path": str(Path(source).resolve()),
        "level": level,
        "shape": list(vol.shape),
        "dtype": str(vol.dtype),
        "metadata_sha256": meta.hexdigest(),
    }


def job_identity(source: str, spec: ModelSpec, layout: Layout, out_dtype: str, level: int = 0) -> dict[str, Any]:
    """What a result depends on; its hash names the job (input, layout, model, dtype)."""
    return {
        "engine": ENGINE_VERSION,
        "input": _fingerprint(source, level),
        "layout": layout.to_dict(),
        "model": {**spec.to_dict(), "sha256": spec.token()},
        "out_dtype": out_dtype,
    }


def _hash(identity: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


# --- worker side ------------------------------------------------------------------------

_WORKER: dict[str, Any] = {"device": None, "threads": None, "processors": {}, "arrays": {}, "loads": 0}


def configure_worker(device: str | None = None, threads: int | None = None) -> None:
    """Set this process's device and torch thread count (run on each worker)."""
    _WORKER["device"], _WORKER["threads"] = device, threads


def worker_stats() -> dict[str, Any]:
    """How many processors this process loaded, and its settings (for tests and logs)."""
    return {"loads": _WORKER["loads"], "device": _WORKER["device"], "threads": _WORKER["threads"], "pid": os.getpid()}


def _processor(spec: ModelSpec) -> BlockProcessor:
    key = json.dumps(spec.to_dict(), sort_keys=True)
    procs = _WORKER["processors"]
    if key not in procs:
        import torch

        if _WORKER["threads"]:
            torch.set_num_threads(int(_WORKER["threads"]))
        device = _WORKER["device"] or os.environ.get("D2R_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
        procs.clear()  # one model per worker at a time: a new job replaces the old one
        procs[key] = load_processor(spec, device)
        _WORKER["loads"] += 1
        log.info("loaded %s on %s (pid %d)", spec.kind, device, os.getpid())
    return procs[key]


def _array(path: str, kind: str) -> Any:
    key = (path, kind)
    arrays = _WORKER["arrays"]
    if key not in arrays:
        if len(arrays) > 8:
            arrays.clear()
        if kind == "output":
            arrays[key] = output_array(path)
        elif kind == "tiles":
            import zarr

            arrays[key] = zarr.open_array(str(Path(path) / ".d2r" / "tiles"), mode="r+")
        else:
            vol = open_volume(path, level=int(kind.split(":")[1]))
            arrays[key] = vol.data
    return arrays[key]


def _read_source(job: Job, box: Box) -> np.ndarray:
    data = _array(job.source, f"source:{job.level}")
    box = box.shift(tuple(-r for r in job.layout.roi.start))  # ROI-relative -> global
    return read_reflected(lambda sl: data[sl].compute(scheduler="synchronous"), data.shape, box).astype(np.float32)


def _predict(job: Job, proc: BlockProcessor, indices: Sequence[Triple]) -> np.ndarray:
    layout = job.layout
    if tuple(proc.scale) != layout.scale:
        raise InputError(f"model scales by {proc.scale} but the job expects {layout.scale}")
    if layout.stitch == "crop" and any(h < r for h, r in zip(layout.halo, proc.halo)):
        raise InputError(
            f"halo {layout.halo} is smaller than the model's receptive field {proc.halo}; "
            "crop mode needs halo >= receptive field"
        )
    boxes = [layout.read_box(i) for i in indices]
    batch = np.stack([_read_source(job, b) for b in boxes])
    origins = [tuple(a + r for a, r in zip(b.start, layout.roi.start)) for b in boxes]
    out = np.asarray(proc(batch, origins), dtype=np.float32)
    expected = tuple(n * s for n, s in zip(batch.shape[1:], layout.scale))
    if out.shape[1:] != expected:
        raise InputError(f"model returned blocks of shape {out.shape[1:]}, expected {expected}")
    return out


def _write_block(job: Job, index: Triple, values: np.ndarray) -> None:
    """Write the owned part of ``values`` (full-block output coords) to the output."""
    from .degrade import to_dtype

    layout = job.layout
    start = tuple(i * b for i, b in zip(index, layout.out_block))
    box = Box(start, tuple(a + b for a, b in zip(start, layout.out_block))).clip(layout.out_shape)
    _array(job.output, "output")[box.slices] = to_dtype(values[tuple(slice(0, n) for n in box.shape)], job.out_dtype)


def run_group(job: Job, phase: str, group_id: int, indices: Sequence[Triple]) -> int:
    """Process one group of blocks for ``phase`` and leave its done-marker. Idempotent."""
    layout = job.layout
    hs = tuple(h * s for h, s in zip(layout.halo, layout.scale))
    cs = tuple(c * s for c, s in zip(layout.context, layout.scale))
    if phase == "write":
        out = _predict(job, _processor(job.spec), indices)
        for index, values in zip(indices, out):
            _write_block(job, index, values[tuple(slice(h + c, n - h - c) for h, c, n in zip(hs, cs, values.shape))])
    elif phase == "tiles":
        out = _predict(job, _processor(job.spec), indices)
        out = out[(slice(None),) + tuple(slice(c, n - c) for c, n in zip(cs, out.shape[1:]))]
        tiles = _array(job.output, "tiles")
        for index, values in zip(indices, out):
            sl = tuple(slice(i * n, (i + 1) * n) for i, n in zip(index, values.shape))
            tiles[sl] = values * blend_weights(layout, index)
    elif phase == "merge":
        tiles = _array(job.output, "tiles")
        tile_shape = tuple(b + 2 * h for b, h in zip(layout.out_block, hs))
        for index in indices:
            acc = np.zeros(layout.out_block, dtype=np.float32)
            for off in np.ndindex(*(3 if h else 1 for h in layout.halo)):
                nb = tuple(i + (o - 1 if h else 0) for i, o, h in zip(index, off, layout.halo))
                if any(n < 0 or n >= g for n, g in zip(nb, layout.grid)):
                    continue
                # the neighbour's tile, in this block's full-size output frame
                lo = tuple((n - i) * b - h for n, i, b, h in zip(nb, index, layout.out_block, hs))
                dst = Box(lo, tuple(a + t for a, t in zip(lo, tile_shape))).clip(layout.out_block)
                src = dst.shift(lo)
                origin = tuple(n * t for n, t in zip(nb, tile_shape))
                acc[dst.slices] += tiles[src.shift(tuple(-o for o in origin)).slices]
            _write_block(job, index, acc)
    else:
        raise ValueError(f"unknown phase {phase!r}")
    marker = job.marker(phase, group_id)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    return len(indices)


# --- client side ------------------------------------------------------------------------


def _prepare_output(job: Job, identity: Mapping[str, Any], geometry: Geometry, overwrite: bool,
                    metadata: Mapping[str, Any] | None) -> bool:
    """Create or validate the output; return True when it is already complete."""
    out = Path(job.output)
    state = job.state_dir / "job.json"
    if out.exists() and not overwrite:
        if not state.exists():
            raise OutputExistsError(f"{out} already exists and is not a d2r job output; pass --overwrite to replace it")
        previous = json.loads(state.read_text())
        if previous["hash"] != job.token:
            diff = sorted(k for k in identity if previous["identity"].get(k) != identity[k])
            raise ResumeMismatchError(
                f"{out} holds results of a different job (differs in: {', '.join(diff)}); "
                "use another output path, or --overwrite to discard them"
            )
        return is_complete(out)
    layout = job.layout
    create_volume(out, shape=layout.out_shape, dtype=job.out_dtype, geometry=geometry, chunks=layout.out_block,
                  overwrite=overwrite, inputs=[job.source], name=out.stem,
                  metadata={**dict(metadata or {}), "job": job.token})
    if layout.stitch == "blend":
        import zarr

        tile = tuple(b + 2 * h * s for b, h, s in zip(layout.out_block, layout.halo, layout.scale))
        zarr.create_array(str(job.state_dir / "tiles"), shape=tuple(g * t for g, t in zip(layout.grid, tile)),
                          chunks=tile, dtype="float32", compressors=None, fill_value=0)
    job.state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state.with_suffix(".tmp")
    tmp.write_text(json.dumps({"hash": job.token, "identity": identity}, indent=1))
    tmp.replace(state)
    return False


def _configure_workers(client: Any) -> None:
    """One device per worker where workers share a host with several GPUs; torch threads
    = cores of the host / workers on it, so torch and Dask never oversubscribe."""
    from collections import defaultdict

    workers = client.scheduler_info(n_workers=-1)["workers"]
    by_host: dict[str, list[str]] = defaultdict(list)
    for addr, w in workers.items():
        by_host[w["host"]].append(addr)
    gpus = client.run(lambda: __import__("d2r_dask.cluster", fromlist=["gpu_count"]).gpu_count())
    for host, addrs in by_host.items():
        for i, addr in enumerate(sorted(addrs)):
            cores = workers[addr].get("nthreads", 1)
            n_cpu = max(1, (os.cpu_count() or 1) // len(addrs)) if host in ("127.0.0.1", "localhost") else None
            device = f"cuda:{i % gpus[addr]}" if gpus.get(addr, 0) > 1 else None
            client.run(configure_worker, device, n_cpu or cores, workers=[addr])


def run_blockwise(
    source: str | os.PathLike,
    output: str | os.PathLike,
    spec: ModelSpec,
    *,
    block: Sequence[int],
    halo: Sequence[int],
    scale: Sequence[int] = (1, 1, 1),
    stitch: str = "crop",
    group: int = 1,
    context: Sequence[int] = (0, 0, 0),
    roi: Box | None = None,
    geometry: Geometry | None = None,
    out_dtype: str | None = None,
    client: Any = None,
    serial: bool = False,
    overwrite: bool = False,
    levels: int = 1,
    progress: bool = True,
    metadata: Mapping[str, Any] | None = None,
    window: int | None = None,
) -> Path:
    """Run ``spec``'s processor over every block of ``source`` and write ``output``.

    ``client`` is a ``distributed.Client``; ``serial=True`` runs the same tasks in
    this process (debugging, tests). ``geometry`` is the output's physical
    placement (default: the input's, with the voxel size divided by ``scale``).
    In blend mode ``halo`` is the overlap and ``context`` extra input read around
    each tile and cropped from its prediction before blending (>= the model's
    receptive field for a convolutional model, so tile borders never show).
    Rerunning with the same arguments resumes; with different ones it refuses.
    """
    source = str(source)
    vol = open_volume(source)
    roi = roi or Box((0, 0, 0), tuple(vol.shape))
    if any(a < 0 or b > n for a, b, n in zip(roi.start, roi.stop, vol.shape)):
        raise InputError(f"region {roi.start}..{roi.stop} is outside the volume {tuple(vol.shape)}")
    for ax, n, h in zip("zyx", vol.shape, halo):
        if h and n < 2:
            raise InputError(f"the volume has {n} voxel along {ax}; the model needs context there (>= 2)")
    layout = Layout(roi=roi, block=tuple(block), halo=tuple(halo), scale=tuple(scale),  # type: ignore[arg-type]
                    stitch=stitch, group=group, context=tuple(context))  # type: ignore[arg-type]
    out_dtype = str(np.dtype(out_dtype or vol.dtype))
    if geometry is None:
        g = Geometry.of(vol)
        geometry = Geometry(
            tuple(v / s for v, s in zip(g.voxel_size, layout.scale)),  # type: ignore[arg-type]
            tuple(t + a * v for t, a, v in zip(g.translation, roi.start, g.voxel_size)),  # type: ignore[arg-type]
        )
    identity = job_identity(source, spec, layout, out_dtype)
    job = Job(source, str(output), spec, layout, out_dtype, token=_hash(identity))
    if _prepare_output(job, identity, geometry, overwrite, metadata):
        log.info("%s is already complete", output)
        return Path(output)

    phases = ["write"] if stitch == "crop" else ["tiles", "merge"]
    groups = layout.groups()
    if client is not None and not serial:
        log.info("dashboard: %s", client.dashboard_link)
        _configure_workers(client)
    for phase in phases:
        todo = [(gid, g) for gid, g in enumerate(groups) if not job.marker(phase, gid).exists()]
        done_blocks = layout.n_blocks - sum(len(g) for _, g in todo)
        log.info("%s: %d of %d blocks to do (%s)", Path(output).name, layout.n_blocks - done_blocks,
                 layout.n_blocks, phase)
        with _progress_bar(progress, layout.n_blocks, done_blocks, f"{Path(output).name} {phase}") as bar:
            if client is None or serial:
                for gid, g in todo:
                    bar.update(run_group(job, phase, gid, g))
            else:
                _run_distributed(client, job, phase, todo, bar, window)
    finalize_volume(output, levels=levels)
    shutil.rmtree(job.state_dir / "done", ignore_errors=True)
    shutil.rmtree(job.state_dir / "tiles", ignore_errors=True)
    return Path(output)


def _run_distributed(client: Any, job: Job, phase: str, todo: list[tuple[int, list[Triple]]], bar: Any,
                     window: int | None) -> None:
    """Submit groups in a sliding window so the scheduler never holds more than ``window`` tasks."""
    from distributed import as_completed

    n_threads = sum(w["nthreads"] for w in client.scheduler_info(n_workers=-1)["workers"].values()) or 1
    window = window or max(4, 4 * n_threads)
    run_id = uuid.uuid4().hex[:8]
    pending = iter(todo)
    ac = as_completed()

    def submit_next() -> bool:
        item = next(pending, None)
        if item is None:
            return False
        gid, g = item
        ac.add(client.submit(run_group, job, phase, gid, g, key=f"d2r-{phase}-{run_id}-{gid}", pure=False, retries=2))
        return True

    for _ in range(window):
        if not submit_next():
            break
    try:
        for fut in ac:
            bar.update(fut.result())
            fut.release()
            submit_next()
    except BaseException:
        ac.clear()
        raise


class _NullBar:
    def __enter__(self) -> _NullBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def update(self, n: int = 1) -> None:
        return None


def _progress_bar(enabled: bool, total: int, initial: int, desc: str) -> Any:
    if not enabled:
        return _NullBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="block", smoothing=0.1)
