"""Job state and resume: what names a job, and which of its groups are done.

``OUTPUT/.d2r/job.json`` ties the output to a hash of the input, layout and model
(:func:`job_identity`); the input's fingerprint comes from its metadata documents
(one per array of the hierarchy), never from a walk over its chunk files. A rerun with
the same identity recomputes only groups not done; a different identity is refused
(:class:`ResumeMismatchError`) unless ``overwrite``. The NGFF metadata is written last,
by :func:`~d2r_dask.io.volume.write_multiscales`, so an unfinished output never looks complete.

Done-state is compact, whatever the number of tasks (``OUTPUT/.d2r/done/``)::

    {phase}.{process}.log   each worker process appends the 8-byte id of each group it
                            finished (one file per process, not per task; a torn last
                            record from a kill is ignored)
    {phase}.bits            the flags of all groups of the phase, one bit each, written
                            atomically when the client compacts the logs (at each phase start)
    {phase}-{group}         done-markers of runs made before this format: still read, and
                            folded into ``{phase}.bits`` by the next compaction

Only losing a record is possible (a group is then recomputed: tasks are idempotent),
never marking an unfinished group done.

On an object store (``s3://``, ``gs://``; :mod:`d2r_dask.io.stores`), which has no
append, a task records itself done as one empty object ``{phase}-{group}`` (the
per-task marker above); the client folds them into ``{phase}.bits`` the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from ..errors import OutputExistsError, ResumeMismatchError
from ..io import stores
from ..io.files import write_json
from ..io.geometry import Geometry
from ..io.stores import Location
from ..io.volume import create_scratch, create_volume, d2r_metadata, is_complete, metadata_digest, open_volume
from ..io.volume import prepare_output as prepare_volume_path
from .layout import BLENDED, Layout
from .processors import ModelSpec

ENGINE_VERSION = 1


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
    def state_dir(self) -> Location:
        return stores.join(self.output, ".d2r")

    def marker(self, phase: str, group_id: int) -> Location:
        return stores.join(self.state_dir, "done", f"{phase}-{group_id}")


def _fingerprint(source: str, level: int) -> dict[str, Any]:
    """The input as a job depends on it: path, level, shape, dtype and a hash of its
    metadata documents (read node by node; the same hash the former walk over every
    file of the store gave, so jobs started before keep their identity)."""
    vol = open_volume(source, level=level)
    return {
        "path": stores.canonical(source),
        "level": level,
        "shape": list(vol.shape),
        "dtype": str(vol.dtype),
        "metadata_sha256": metadata_digest(source),
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


def job_hash(identity: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def prepare_output(job: Job, identity: Mapping[str, Any], geometry: Geometry, overwrite: bool,
                   metadata: Mapping[str, Any] | None, check: Callable[[], Any]) -> bool:
    """Create or validate the output; return True when it is already complete.

    ``check()`` validates the processor against the layout; it runs before anything is
    created, and not at all for a finished job. The job identity (``job.json``) is
    written first, atomically, and the image's attributes last, so a crash at any point
    in between resumes: the rerun finds its own job and (re)makes what is missing.
    """
    out = stores.location(job.output)
    state = stores.join(job.state_dir, "job.json")
    if stores.exists(out) and not overwrite and (stores.exists(state) or not _only_job_state(out)):
        if not stores.exists(state):
            raise OutputExistsError(f"{out} already exists and is not a d2r job output; pass --overwrite to replace it")
        previous = json.loads(stores.read_bytes(state))
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
        if d2r_metadata(out).get("job") != job.token:  # stopped between job.json and the image
            _create(job, geometry, metadata)
        return False
    check()
    prepare_volume_path(out, overwrite=True, inputs=[job.source])  # d2r's own (or absent): checked, cleared
    stores.make_dirs(job.state_dir)
    _write_json(state, {"hash": job.token, "identity": identity})
    _create(job, geometry, metadata)
    return False


def _write_json(path: Location, data: Mapping[str, Any]) -> None:
    """The job identity, atomically: :func:`~d2r_dask.io.files.write_json` locally, one PUT on an object store."""
    if isinstance(path, Path):
        write_json(path, data, indent=1)
    else:
        stores.write_bytes(path, json.dumps(data, indent=1, default=str).encode())


def _only_job_state(out: Location) -> bool:
    """``out`` holds nothing but a job state folder without ``job.json`` (a crash while creating it)."""
    return {stores.name(p) for p, _ in stores.entries(out)} <= {".d2r"}


def _create(job: Job, geometry: Geometry, metadata: Mapping[str, Any] | None) -> None:
    """Make the job's scratch tiles (blend) and its image; the image's attributes come last."""
    layout = job.layout
    if layout.stitch in BLENDED:
        tile = tuple(b + 2 * h * s for b, h, s in zip(layout.out_block, layout.halo, layout.scale))
        create_scratch(stores.join(job.state_dir, "tiles"), shape=tuple(g * t for g, t in zip(layout.grid, tile)),
                       chunks=tile)
    stores.make_dirs(stores.join(job.state_dir, "done"))
    create_volume(job.output, shape=layout.out_shape, dtype=job.out_dtype, geometry=geometry,
                  chunks=layout.out_block, name=Path(stores.name(job.output)).stem, in_job_folder=True,
                  metadata={**dict(metadata or {}), "job": job.token})


_LOG: dict[str, str] = {}


def _process_id() -> str:
    """A name for this process's done-logs, unique across hosts, restarts and forks."""
    pid = str(os.getpid())
    if pid not in _LOG:
        _LOG.clear()
        _LOG[pid] = f"{socket.gethostname()}-{pid}-{uuid.uuid4().hex[:8]}"
    return _LOG[pid]


def mark_done(job: Job, phase: str, group_id: int) -> None:
    """Record that group ``group_id`` of ``phase`` is done: 8 bytes appended to this
    process's log of the phase (``O_APPEND``: no read-modify-write, no file per task);
    on an object store, which cannot append, one empty marker object."""
    done = job.state_dir
    if not isinstance(done, Path):
        stores.write_bytes(job.marker(phase, group_id), b"")
        return
    done = done / "done"
    path = done / f"{phase}.{_process_id()}.log"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except FileNotFoundError:
        done.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, np.array([group_id], dtype="<u8").tobytes())
    finally:
        os.close(fd)


def done_flags(job: Job, phase: str, n_groups: int) -> np.ndarray:
    """Done flags (bool, one per group) of ``phase``; compacts the logs and any old
    per-task markers into ``{phase}.bits`` (run by the client only, before submitting)."""
    done = stores.join(job.state_dir, "done")
    flags = np.zeros(n_groups, dtype=bool)
    listing = stores.entries(done)
    if not listing:
        return flags
    bits = stores.join(done, f"{phase}.bits")
    logs: list[Location] = []
    markers: list[Location] = []
    old = f"{phase}-"
    for child, _ in listing:
        name = stores.name(child)
        if name == f"{phase}.bits":
            packed = np.unpackbits(np.frombuffer(stores.read_bytes(bits), dtype=np.uint8), count=None)
            flags[:min(n_groups, packed.size)] |= packed[:n_groups].astype(bool)
        elif name.startswith(f"{phase}.") and name.endswith(".log"):
            logs.append(child)
        elif name.startswith(old) and name[len(old):].isdigit():  # per-task markers (former format; object stores)
            markers.append(child)
            gid = int(name[len(old):])
            if gid < n_groups:
                flags[gid] = True
    for log_path in logs:
        raw = stores.read_bytes(log_path)
        ids = np.frombuffer(raw[: len(raw) // 8 * 8], dtype="<u8")  # a torn last record is ignored
        flags[ids[ids < n_groups].astype(np.int64)] = True
    if logs or markers:
        stores.write_bytes(bits, np.packbits(flags).tobytes())
        stores.remove_files(logs + markers)  # only now: a crash before this point loses nothing
    return flags


def done_groups(job: Job, phase: str) -> set[int]:
    """Group ids of ``phase`` that are done (small jobs and tests; the scheduler uses
    :func:`done_flags`, which never holds a Python object per group)."""
    return {int(g) for g in np.flatnonzero(done_flags(job, phase, job.layout.n_groups))}


def todo_groups(flags: np.ndarray, batch: int = 1 << 20) -> Iterator[int]:
    """The ids of the groups not done, lazily, in order (a slice of the flags at a time)."""
    for start in range(0, flags.size, batch):
        for gid in np.flatnonzero(~flags[start:start + batch]):
            yield start + int(gid)


def done_block_count(layout: Layout, flags: np.ndarray) -> int:
    """Blocks in the done groups (all full-size but the last)."""
    n = int(flags.sum())
    if n and flags[-1]:
        n_last = layout.group_size(layout.n_groups - 1)
        return (n - 1) * layout.group + n_last
    return n * layout.group
