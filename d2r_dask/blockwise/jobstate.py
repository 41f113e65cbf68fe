"""Job state and resume: what names a job, and which of its groups are done.

``OUTPUT/.d2r/job.json`` ties the output to a hash of the input, layout and model
(:func:`job_identity`); each finished group of blocks leaves a done-marker
``OUTPUT/.d2r/done/{phase}-{group}``. A rerun with the same identity recomputes only
groups without a marker; a different identity is refused (:class:`ResumeMismatchError`)
unless ``overwrite``. The NGFF metadata is written last, by
:func:`~d2r_dask.io.volume.finalize_volume`, so an unfinished output never looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from ..errors import OutputExistsError, ResumeMismatchError
from ..io.files import write_json
from ..io.geometry import Geometry
from ..io.volume import create_scratch, create_volume, d2r_metadata, is_complete, open_volume
from ..io.volume import prepare_output as prepare_volume_path
from .layout import Layout
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
    out = Path(job.output)
    state = job.state_dir / "job.json"
    if out.exists() and not overwrite and (state.exists() or not _only_job_state(out)):
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
        if d2r_metadata(out).get("job") != job.token:  # stopped between job.json and the image
            _create(job, geometry, metadata)
        return False
    check()
    prepare_volume_path(out, overwrite=True, inputs=[job.source])  # d2r's own (or absent): checked, cleared
    job.state_dir.mkdir(parents=True, exist_ok=True)
    write_json(state, {"hash": job.token, "identity": identity}, indent=1)
    _create(job, geometry, metadata)
    return False


def _only_job_state(out: Path) -> bool:
    """``out`` holds nothing but a job state folder without ``job.json`` (a crash while creating it)."""
    return {p.name for p in out.iterdir()} <= {".d2r"}


def _create(job: Job, geometry: Geometry, metadata: Mapping[str, Any] | None) -> None:
    """Make the job's scratch tiles (blend) and its image; the image's attributes come last."""
    layout = job.layout
    if layout.stitch == "blend":
        tile = tuple(b + 2 * h * s for b, h, s in zip(layout.out_block, layout.halo, layout.scale))
        create_scratch(job.state_dir / "tiles", shape=tuple(g * t for g, t in zip(layout.grid, tile)), chunks=tile)
    (job.state_dir / "done").mkdir(parents=True, exist_ok=True)
    create_volume(job.output, shape=layout.out_shape, dtype=job.out_dtype, geometry=geometry,
                  chunks=layout.out_block, name=Path(job.output).stem, in_job_folder=True,
                  metadata={**dict(metadata or {}), "job": job.token})


def mark_done(job: Job, phase: str, group_id: int) -> None:
    """Leave the done-marker of group ``group_id`` of ``phase``."""
    marker = job.marker(phase, group_id)
    try:
        marker.touch()
    except FileNotFoundError:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()


def done_groups(job: Job, phase: str) -> set[int]:
    """Group ids of ``phase`` with a done-marker (one directory listing, not a stat per group)."""
    done = job.state_dir / "done"
    if not done.is_dir():
        return set()
    prefix = f"{phase}-"
    with os.scandir(done) as it:
        return {int(e.name[len(prefix):]) for e in it if e.name.startswith(prefix) and e.name[len(prefix):].isdigit()}
