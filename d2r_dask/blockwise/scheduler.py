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

On the workers, each process loads the processor once per model (keyed by the
hash of its checkpoint), reads boxes straight from Zarr with
:func:`~d2r_dask.volume.open_reader` (a group's blocks along a row in one read,
their outputs in one write) and counts blocks and seconds per stage
(:func:`worker_stats`). The :class:`WorkerSetup` plugin gives every worker,
including one the nanny restarts after a crash, its torch threads and device.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from distributed.diagnostics.plugin import WorkerPlugin

from ..errors import InputError, OutputExistsError, ResumeMismatchError
from ..io.geometry import Box, grid_shape, iter_blocks
from .processors import BlockProcessor, ModelSpec, load_processor
from ..io.volume import (Geometry, create_scratch, create_volume, finalize_volume, is_complete, open_reader,
                     open_scratch, open_volume, output_array)

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

    @property
    def n_groups(self) -> int:
        """Tasks per phase: runs of ``group`` consecutive blocks (C order)."""
        return -(-self.n_blocks // self.group)

    def group_size(self, group_id: int) -> int:
        """Blocks in task ``group_id`` (``group``, fewer for the last)."""
        return max(0, min(self.group, self.n_blocks - group_id * self.group))

    def group_blocks(self, group_id: int) -> list[Triple]:
        """Grid indices of the blocks of task ``group_id``, computed on demand, so a job of
        10^7 blocks never holds a list of them."""
        if not 0 <= group_id < self.n_groups:
            raise IndexError(f"group {group_id} outside 0..{self.n_groups - 1}")
        flat = range(group_id * self.group, min((group_id + 1) * self.group, self.n_blocks))
        return [tuple(int(v) for v in np.unravel_index(i, self.grid)) for i in flat]  # type: ignore[misc]

    def write_box(self, index: Sequence[int]) -> Box:
        """The output voxels the block at ``index`` owns (output units, ROI-relative)."""
        start = tuple(i * b for i, b in zip(index, self.out_block))
        return Box(start, tuple(a + b for a, b in zip(start, self.out_block))).clip(self.out_shape)

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
    if all(a >= 0 and b <= n for a, b, n in zip(box.start, box.stop, volume_shape)):
        return data  # inside the volume: nothing to reflect
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
    model_token: str = field(default="", compare=False)  # hash of the spec and its checkpoint's bytes

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

_WORKER: dict[str, Any] = {"device": None, "threads": None, "processors": {}, "arrays": {}, "loads": 0, "blocks": 0,
                           "seconds": {}}


def configure_worker(device: str | None = None, threads: int | None = None) -> None:
    """Set this process's device and torch thread count (run on each worker)."""
    _WORKER["device"], _WORKER["threads"] = device, threads
    if threads and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(threads))


def worker_stats() -> dict[str, Any]:
    """What this process did: processors loaded, blocks run, seconds per stage (read,
    model, write, marker), and its settings (for tests, logs and benchmarks)."""
    stats = {key: _WORKER[key] for key in ("loads", "blocks", "device", "threads")}
    return stats | {"seconds": dict(_WORKER["seconds"]), "pid": os.getpid()}


@contextlib.contextmanager
def _timed(stage: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        seconds = _WORKER["seconds"]
        seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - t0


def _processor(spec: ModelSpec, token: str = "") -> BlockProcessor:
    """This worker's processor for ``spec``, loaded once. ``token`` (the hash of the
    checkpoint's bytes) makes a retrained checkpoint at the same path load anew."""
    key = json.dumps(spec.to_dict(), sort_keys=True) + token
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


def _array(job: Job, kind: str) -> Any:
    """This process's handle on the job's source reader, output or tile scratch array.

    Keyed by path *and* job hash: a rerun with ``overwrite`` or another layout
    recreates the store, and a stale handle would write with the old chunking.
    """
    key = (job.source if kind == "source" else job.output, job.token, kind)
    arrays = _WORKER["arrays"]
    if key not in arrays:
        if len(arrays) > 8:
            arrays.clear()
        if kind == "output":
            arrays[key] = output_array(job.output)
        elif kind == "tiles":
            arrays[key] = open_scratch(job.state_dir / "tiles")
        elif kind == "source":
            arrays[key] = open_reader(job.source, level=job.level)
        else:
            raise ValueError(f"unknown array kind {kind!r}")
    return arrays[key]


def _read_boxes(job: Job, boxes: Sequence[Box]) -> np.ndarray:
    """Read ``boxes`` (ROI-relative, equal shapes) as a float32 batch, with one Zarr read
    of their bounding box where they are adjacent (a group's blocks along a row)."""
    reader = _array(job, "source")
    glob = [b.shift(tuple(-r for r in job.layout.roi.start)) for b in boxes]  # ROI-relative -> global
    union = Box(tuple(map(min, zip(*(b.start for b in glob)))), tuple(map(max, zip(*(b.stop for b in glob)))))
    if len(glob) > 1 and math.prod(union.shape) <= 1.5 * sum(math.prod(b.shape) for b in glob):
        data = read_reflected(reader, reader.shape, union)
        parts = [data[b.shift(union.start).slices] for b in glob]
    else:
        parts = [read_reflected(reader, reader.shape, b) for b in glob]
    return np.stack(parts).astype(np.float32, copy=False)


def _check_processor(job: Job) -> tuple[Triple, Triple]:
    """Load the job's processor here and check it fits the layout; return ``(halo, scale)``."""
    proc = _processor(job.spec, job.model_token)
    layout = job.layout
    if tuple(proc.scale) != layout.scale:
        raise InputError(f"model {job.spec.kind!r} scales by {tuple(proc.scale)} but the job asks for "
                         f"{layout.scale}; pass scale={tuple(proc.scale)}")
    if layout.stitch == "crop" and any(h < r for h, r in zip(layout.halo, proc.halo)):
        raise InputError(
            f"halo {layout.halo} is smaller than the receptive field {tuple(proc.halo)} of model "
            f"{job.spec.kind!r}: crop mode would show seams; use halo >= {tuple(proc.halo)}"
        )
    return tuple(proc.halo), tuple(proc.scale)  # type: ignore[return-value]


def _predict(job: Job, indices: Sequence[Triple]) -> np.ndarray:
    layout = job.layout
    proc = _processor(job.spec, job.model_token)
    boxes = [layout.read_box(i) for i in indices]
    with _timed("read"):
        batch = _read_boxes(job, boxes)
    origins = [tuple(a + r for a, r in zip(b.start, layout.roi.start)) for b in boxes]
    with _timed("model"):
        out = np.asarray(proc(batch, origins), dtype=np.float32)
    expected = tuple(n * s for n, s in zip(batch.shape[1:], layout.scale))
    if out.shape[1:] != expected:
        raise InputError(f"model returned blocks of shape {out.shape[1:]}, expected {expected}")
    return out


def _write_blocks(job: Job, items: Sequence[tuple[Triple, np.ndarray]]) -> None:
    """Write the owned part of each block's ``values`` (full-block output coordinates).

    Consecutive blocks of one row (a group runs along x in C order) go out in one Zarr
    write; either way every output chunk is written whole, once, by this task.
    """
    from ..data.degrade import to_dtype

    layout = job.layout
    out = _array(job, "output")
    runs: list[list[tuple[Box, np.ndarray]]] = []
    for index, values in items:
        box = layout.write_box(index)
        owned = to_dtype(values[tuple(slice(0, n) for n in box.shape)], job.out_dtype)
        last = runs[-1][-1][0] if runs else None
        if last is not None and last.start[:2] == box.start[:2] and last.stop[2] == box.start[2]:
            runs[-1].append((box, owned))
        else:
            runs.append([(box, owned)])
    for run in runs:
        if len(run) == 1:
            out[run[0][0].slices] = run[0][1]
        else:
            union = Box(run[0][0].start, run[-1][0].stop)
            out[union.slices] = np.concatenate([v for _, v in run], axis=2)


def run_group(job: Job, phase: str, group_id: int) -> int:
    """Process task ``group_id`` of ``phase`` and leave its done-marker. Idempotent."""
    layout = job.layout
    indices = layout.group_blocks(group_id)
    hs = tuple(h * s for h, s in zip(layout.halo, layout.scale))
    cs = tuple(c * s for c, s in zip(layout.context, layout.scale))
    if phase == "write":
        out = _predict(job, indices)
        crop = (slice(None),) + tuple(slice(h + c, n - h - c) for h, c, n in zip(hs, cs, out.shape[1:]))
        with _timed("write"):
            _write_blocks(job, list(zip(indices, out[crop])))
    elif phase == "tiles":
        out = _predict(job, indices)
        out = out[(slice(None),) + tuple(slice(c, n - c) for c, n in zip(cs, out.shape[1:]))]
        tiles = _array(job, "tiles")
        with _timed("write"):
            for index, values in zip(indices, out):
                sl = tuple(slice(i * n, (i + 1) * n) for i, n in zip(index, values.shape))
                tiles[sl] = values * blend_weights(layout, index)
    elif phase == "merge":
        tiles = _array(job, "tiles")
        tile_shape = tuple(b + 2 * h for b, h in zip(layout.out_block, hs))
        items = []
        t0 = time.perf_counter()
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
            items.append((index, acc))
        _WORKER["seconds"]["read"] = _WORKER["seconds"].get("read", 0.0) + time.perf_counter() - t0
        with _timed("write"):
            _write_blocks(job, items)
    else:
        raise ValueError(f"unknown phase {phase!r}")
    marker = job.marker(phase, group_id)
    with _timed("marker"):
        try:
            marker.touch()
        except FileNotFoundError:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
    _WORKER["blocks"] += len(indices)
    return len(indices)


class WorkerSetup(WorkerPlugin):
    """Gives every worker, including ones the nanny restarts after a crash, its torch
    thread count and device: ``threads[host]`` threads, and on hosts with several GPUs
    (without dask-cuda pinning) the GPU numbered by the worker's name."""

    name = "d2r-worker-setup"

    def __init__(self, threads: Mapping[str, int], gpus: Mapping[str, int]) -> None:
        self.threads, self.gpus = dict(threads), dict(gpus)

    def setup(self, worker: Any) -> None:
        host = worker.address.rsplit(":", 1)[0]
        gpus = self.gpus.get(host, 0)
        try:
            position = int(str(worker.name).rsplit("-", 1)[-1])
        except ValueError:
            position = abs(hash(worker.name))
        configure_worker(f"cuda:{position % gpus}" if gpus > 1 else None, self.threads.get(host))


def _configure_workers(client: Any) -> None:
    """Torch threads = cores of each host / workers on it (torch and Dask never
    oversubscribe), one GPU per worker on multi-GPU hosts; kept for restarted workers."""
    from collections import Counter

    workers = client.scheduler_info(n_workers=-1)["workers"]
    per_host = Counter(addr.rsplit(":", 1)[0] for addr in workers)
    info = client.run(lambda: (os.cpu_count() or 1, __import__("d2r_dask.blockwise.cluster", fromlist=["x"]).gpu_count()))
    threads: dict[str, int] = {}
    gpus: dict[str, int] = {}
    for addr, (cpus, n_gpu) in info.items():
        host = addr.rsplit(":", 1)[0]
        threads[host] = max(1, cpus // per_host[host])
        gpus[host] = n_gpu
    client.register_plugin(WorkerSetup(threads, gpus))


# --- client side ------------------------------------------------------------------------


def _prepare_output(job: Job, identity: Mapping[str, Any], geometry: Geometry, overwrite: bool,
                    metadata: Mapping[str, Any] | None, check: Any) -> bool:
    """Create or validate the output; return True when it is already complete.

    ``check()`` validates the processor against the layout; it runs before anything is
    created, and not at all for a finished job.
    """
    out = Path(job.output)
    state = job.state_dir / "job.json"
    if out.exists() and not overwrite:
        if not state.exists():
            raise OutputExistsError(f"{out} already exists and is not a d2r job output; pass --overwrite to replace it")
        previous = json.loads(state.read_text())
        if previous["hash"] != job.token:
            now = json.loads(json.dumps(identity))  # tuples -> lists, as stored
            diff = sorted(k for k in now if previous["identity"].get(k) != now[k])
            raise ResumeMismatchError(
                f"{out} holds results of a different job (differs in: {', '.join(diff)}); "
                "use another output path, or --overwrite to discard them"
            )
        if is_complete(out):
            return True
        check()
        return False
    check()
    layout = job.layout
    create_volume(out, shape=layout.out_shape, dtype=job.out_dtype, geometry=geometry, chunks=layout.out_block,
                  overwrite=overwrite, inputs=[job.source], name=out.stem,
                  metadata={**dict(metadata or {}), "job": job.token})
    if layout.stitch == "blend":
        tile = tuple(b + 2 * h * s for b, h, s in zip(layout.out_block, layout.halo, layout.scale))
        create_scratch(job.state_dir / "tiles", shape=tuple(g * t for g, t in zip(layout.grid, tile)), chunks=tile)
    (job.state_dir / "done").mkdir(parents=True, exist_ok=True)
    tmp = state.with_suffix(".tmp")
    tmp.write_text(json.dumps({"hash": job.token, "identity": identity}, indent=1))
    tmp.replace(state)
    return False


def _done_groups(job: Job, phase: str) -> set[int]:
    """Group ids of ``phase`` with a done-marker (one directory listing, not a stat per group)."""
    done = job.state_dir / "done"
    if not done.is_dir():
        return set()
    prefix = f"{phase}-"
    with os.scandir(done) as it:
        return {int(e.name[len(prefix):]) for e in it if e.name.startswith(prefix) and e.name[len(prefix):].isdigit()}


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
    ``group`` blocks go to the model as one batch (one task); ``window`` bounds the
    tasks the scheduler holds at once (default 4 per worker thread).
    Rerunning with the same arguments resumes; with different ones it refuses.
    A progress bar (``tqdm.auto``: blocks done / total, rate, ETA) shows unless
    ``progress=False``; the dashboard address is logged and printed above it.
    """
    source = str(source)
    vol = open_volume(source)
    roi = roi or Box((0, 0, 0), tuple(vol.shape))
    if any(a < 0 or b > n for a, b, n in zip(roi.start, roi.stop, vol.shape)):
        raise InputError(f"region {roi.start}..{roi.stop} is outside the volume {tuple(vol.shape)}")
    for ax, n, h, c in zip("zyx", vol.shape, halo, context):
        if (h or c) and n < 2:
            raise InputError(
                f"the volume has {n} voxel along {ax}, but the model needs {h + c} voxel(s) of context there "
                f"(read by reflection, which needs >= 2 voxels); use a volume with >= 2 voxels along {ax} "
                f"or halo 0 along {ax} if the model works on single {ax}-slices"
            )
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
    job = Job(source, str(output), spec, layout, out_dtype, token=_hash(identity),
              model_token=identity["model"]["sha256"])
    distributed = client is not None and not serial

    def check() -> None:
        if distributed:
            client.submit(_check_processor, job, pure=False).result()
        else:
            _check_processor(job)

    if distributed:
        _configure_workers(client)
    if _prepare_output(job, identity, geometry, overwrite, metadata, check):
        log.info("%s is already complete", output)
        return Path(output)
    if distributed:
        log.info("dashboard: %s", client.dashboard_link)
        if progress:
            _write_line(f"d2r: {Path(output).name} on {len(client.scheduler_info(n_workers=-1)['workers'])} "
                        f"workers, dashboard {client.dashboard_link}")

    phases = ["write"] if stitch == "crop" else ["tiles", "merge"]
    for phase in phases:
        done = _done_groups(job, phase)
        todo = (gid for gid in range(layout.n_groups) if gid not in done)
        done_blocks = sum(layout.group_size(gid) for gid in done)
        log.info("%s: %d of %d blocks to do (%s)", Path(output).name, layout.n_blocks - done_blocks,
                 layout.n_blocks, phase)
        t0 = time.perf_counter()
        with _progress_bar(progress, layout.n_blocks, done_blocks, f"{Path(output).name} {phase}") as bar:
            if distributed:
                _run_distributed(client, job, phase, todo, bar, window)
            else:
                for gid in todo:
                    bar.update(run_group(job, phase, gid))
        log.info("%s %s: %d blocks in %.1f s", Path(output).name, phase, layout.n_blocks - done_blocks,
                 time.perf_counter() - t0)
    finalize_volume(output, levels=levels)
    shutil.rmtree(job.state_dir / "done", ignore_errors=True)
    shutil.rmtree(job.state_dir / "tiles", ignore_errors=True)
    return Path(output)


def _run_distributed(client: Any, job: Job, phase: str, todo: Iterator[int], bar: Any,
                     window: int | None) -> None:
    """Submit groups in a sliding window so the scheduler never holds more than ``window`` tasks.

    Results are not gathered (a task returns only its block count, known here); a
    failed task raises here after its retries.
    """
    from distributed import as_completed

    n_threads = sum(w["nthreads"] for w in client.scheduler_info(n_workers=-1)["workers"].values()) or 1
    window = window or max(4, 4 * n_threads)
    run_id = uuid.uuid4().hex[:8]
    layout = job.layout
    ac = as_completed()
    sizes: dict[str, int] = {}

    def submit_next() -> bool:
        gid = next(todo, None)
        if gid is None:
            return False
        fut = client.submit(run_group, job, phase, gid, key=f"d2r-{phase}-{run_id}-{gid}", pure=False, retries=2)
        sizes[fut.key] = layout.group_size(gid)
        ac.add(fut)
        return True

    # one slot stays free for a finished task whose release the scheduler has not processed
    # yet, so the scheduler never holds more than ``window`` tasks
    for _ in range(max(1, window - 1)):
        if not submit_next():
            break
    try:
        for fut in ac:
            if fut.status != "finished":
                fut.result()  # raises the task's error
            bar.update(sizes.pop(fut.key))
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


def _write_line(text: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(text, file=sys.stderr)


def _progress_bar(enabled: bool, total: int, initial: int, desc: str) -> Any:
    """A ``tqdm.auto`` bar (a widget in Jupyter) counting blocks, with rate and ETA."""
    if not enabled:
        return _NullBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="block", smoothing=0.1, dynamic_ncols=True)
