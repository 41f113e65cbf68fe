"""The whole D2R pipeline in a work directory: Stages I-IV, resumable, with a plan and a record.

::

    LR.zarr --I--> workdir/restorer/        (diffusion restorer on LR XY patches)
            --II-> workdir/pseudo_hr.zarr   (XZ + YZ slices restored, fused; an ROI is enough)
            --III> workdir/dgean/           (DGEAN on pseudo-HR degraded along z -> pseudo-HR)
            --IV-> SR.zarr                  (DGEAN over the whole LR volume, blockwise)

``workdir/run.json`` records the resolved configuration, versions, the state and
timing of each stage. A rerun skips finished stages and resumes the first
unfinished one where it stopped (training from its last checkpoint, blockwise
stages at their first unfinished chunk); a rerun with a different configuration
is refused rather than mixing results.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import shutil
import time
from dataclasses import InitVar, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

from .. import __version__
from ..errors import InputError, ResumeMismatchError, renamed
from ..io.geometry import Box, check_factor, check_mode, grid_shape
from ..io.volume import is_complete, open_volume

log = logging.getLogger(__name__)
STAGES = ("restorer", "pseudo_hr", "dgean", "sr")


@dataclass(frozen=True)
class RestorerStage:
    """Stage I: diffusion restorer training."""

    preset: str = "tiny"
    patch: int = 64
    steps: int = 1500
    batch_size: int = 8
    lr: float | None = None
    sampler: str = "posterior"  # benchmarks/results/samplers_fib25_x4.md: the fastest within 0.2 dB of sde@100
    sampler_steps: int = 5


@dataclass(frozen=True)
class RestoreStage:
    """Stage II: pseudo-HR by restoring XZ/YZ slices (``roi``: LR voxels z0 y0 x0 z1 y1 x1).

    ``halo``: LR voxels each tile reads beyond its block (tiles overlap by twice it);
    ``slice_batch``: slices per forward pass. ``overlap`` and ``batch`` are their
    deprecated names.
    """

    roi: tuple[int, ...] | None = None
    max_roi: tuple[int, int, int] = (64, 256, 256)
    block: tuple[int, int, int] = (16, 64, 64)
    halo: tuple[int, int, int] = (4, 16, 16)
    slice_batch: int = 64
    overlap: InitVar[tuple[int, int, int] | None] = None
    batch: InitVar[int | None] = None

    def __post_init__(self, overlap: tuple[int, int, int] | None, batch: int | None) -> None:
        if overlap is not None:
            object.__setattr__(self, "halo", renamed("RestoreStage(overlap=...)", "halo", overlap))
        if batch is not None:
            object.__setattr__(self, "slice_batch", renamed("RestoreStage(batch=...)", "slice_batch", batch))


@dataclass(frozen=True)
class DGEANStage:
    """Stage III: DGEAN training on the pseudo-HR."""

    preset: str = "tiny"
    patch_xy: int = 48
    patch_lr_z: int = 8
    steps: int = 1500
    batch_size: int = 4
    lr: float = 2e-4
    hf_weight: float = 0.5


@dataclass(frozen=True)
class InferStage:
    """Stage IV: blockwise DGEAN inference; ``group`` blocks per task, run as one batch
    (``batch`` is its deprecated name)."""

    block: tuple[int, int, int] = (32, 128, 128)
    group: int = 1
    tta: bool = False
    batch: InitVar[int | None] = None

    def __post_init__(self, batch: int | None) -> None:
        if batch is not None:
            object.__setattr__(self, "group", renamed("InferStage(batch=...)", "group", batch))


@dataclass(frozen=True)
class RunConfig:
    """Everything ``d2r run`` does; every field has a default except the factor."""

    factor: int
    mode: str = "decimate"
    seed: int = 0
    device: str | None = None
    restorer: RestorerStage = field(default_factory=RestorerStage)
    restore: RestoreStage = field(default_factory=RestoreStage)
    dgean: DGEANStage = field(default_factory=DGEANStage)
    infer: InferStage = field(default_factory=InferStage)

    def __post_init__(self) -> None:
        check_factor(self.factor)
        check_mode(self.mode)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunConfig:
        """Build from nested mappings (a config file), naming any unknown key or mistyped value."""
        kwargs: dict[str, Any] = {}
        known = {f.name: f for f in fields(cls)}
        for key, value in upgrade_config(data).items():
            if key not in known:
                raise InputError(f"unknown config key {key!r}; known: {', '.join(known)}")
            sub = _SECTIONS.get(key)
            if sub is not None:
                if not isinstance(value, Mapping):
                    raise InputError(f"config section {key!r} must be a mapping of options, got {value!r}")
                sub_known = {f.name: f for f in fields(sub)}
                bad = sorted(set(value) - set(sub_known))
                if bad:
                    raise InputError(f"unknown keys in [{key}]: {bad}; known: {sorted(sub_known)}")
                value = sub(**{k: _parse_option(f"{key}.{k}", v, sub_known[k].default) for k, v in value.items()})
            elif key not in ("factor", "mode"):  # those two are checked with their own messages
                value = _parse_option(key, value, known[key].default)
            kwargs[key] = value
        return cls(**kwargs)


def _parse_option(name: str, value: Any, default: Any) -> Any:
    """``value`` checked against the type of the option's ``default`` (lists become tuples).

    Options that default to None take any value of the right shape (checked where used).
    """
    if isinstance(value, list):
        value = tuple(value)
    if default is None:
        return value
    if isinstance(default, tuple):
        ok = isinstance(value, tuple) and len(value) == len(default) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value)
        want = f"{len(default)} integers (z, y, x), e.g. {list(default)}"
    elif isinstance(default, bool):
        ok, want = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    else:
        ok, want = isinstance(value, type(default)), f"a {type(default).__name__}"
    if not ok:
        raise InputError(f"config option {name} must be {want}, got {value!r}")
    return value


_SECTIONS = {"restorer": RestorerStage, "restore": RestoreStage, "dgean": DGEANStage, "infer": InferStage}

# config keys that were renamed: section -> {old: new}; the old names are still read
RENAMED_KEYS = {"restore": {"overlap": "halo", "batch": "slice_batch"}, "infer": {"batch": "group"}}


def upgrade_config(data: Mapping[str, Any], *, warn: bool = True) -> dict[str, Any]:
    """``data`` with renamed keys under their new names (a warning for each, if ``warn``)."""
    out = dict(data)
    for section, names in RENAMED_KEYS.items():
        if not isinstance(out.get(section), Mapping):
            continue
        sub = dict(out[section])
        for old, new in names.items():
            if old in sub:
                value = sub.pop(old)
                if warn:
                    renamed(f"config key {section}.{old}", f"{section}.{new}", value)
                sub.setdefault(new, value)
        out[section] = sub
    return out


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML or TOML run configuration."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such config file")
    text = path.read_text()
    if path.suffix.lower() == ".toml":
        import tomllib

        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise InputError(f"{path} is not valid TOML ({exc})") from exc
    import yaml

    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise InputError(f"{path} is not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise InputError(f"{path} must hold a mapping of options")
    return data


def merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Nested dict merge: ``overrides`` wins, ``None`` values are ignored."""
    out = dict(base)
    for key, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, Mapping):
            section = out.get(key, {})
            if not isinstance(section, Mapping):
                raise InputError(f"config section {key!r} must be a mapping of options, got {section!r}")
            value = merge(section, value)
        out[key] = value
    return out


# --- planning -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Paths:
    lr: Path
    output: Path
    workdir: Path

    @property
    def restorer(self) -> Path:
        return self.workdir / "restorer"

    @property
    def pseudo_hr(self) -> Path:
        return self.workdir / "pseudo_hr.zarr"

    @property
    def dgean(self) -> Path:
        return self.workdir / "dgean"

    @property
    def record(self) -> Path:
        return self.workdir / "run.json"


def default_workdir(output: str | os.PathLike) -> Path:
    output = Path(output)
    return output.with_name(output.name.removesuffix(".zarr") + ".d2r-work")


def stage2_roi(shape: Sequence[int], cfg: RunConfig) -> Box:
    """The LR region Stage II restores: ``restore.roi`` or a centred box of at most ``max_roi``."""
    if cfg.restore.roi is not None:
        r = tuple(cfg.restore.roi)
        if len(r) != 6:
            raise InputError(f"restore.roi needs six numbers z0 y0 x0 z1 y1 x1, got {r}")
        box = Box(r[:3], r[3:])
        if any(a < 0 or b > n or b <= a for a, b, n in zip(box.start, box.stop, shape)):
            raise InputError(f"restore.roi {r} is empty or outside the LR volume {tuple(shape)}")
        return box
    size = [min(n, m) for n, m in zip(shape, cfg.restore.max_roi)]
    start = tuple((n - s) // 2 for n, s in zip(shape, size))
    return Box(start, tuple(a + s for a, s in zip(start, size)))


def plan(lr_path: str | os.PathLike, cfg: RunConfig) -> dict[str, Any]:
    """What each stage will do: data, blocks, network evaluations (no computation)."""
    from ..models.dgean import dgean_config, flops_per_output_voxel, receptive_field

    lr = open_volume(lr_path)
    s = cfg.factor
    shape = tuple(lr.shape)
    roi = stage2_roi(shape, cfg)
    tiles = math.prod(grid_shape(roi.shape, cfg.restore.block))
    tile = [b + 2 * h for b, h in zip(cfg.restore.block, cfg.restore.halo)]
    slices_per_tile = tile[1] + tile[2]
    nfe = cfg.restorer.sampler_steps  # what Stage II runs, whichever the sampler
    dcfg = dgean_config(cfg.dgean.preset, s, cfg.mode)
    halo = receptive_field(dcfg)
    blocks = math.prod(grid_shape(shape, cfg.infer.block))
    hr_voxels = shape[0] * s * shape[1] * shape[2]
    return {
        "input": {"path": str(lr_path), "shape": shape, "voxel_size_nm": lr.attrs["voxel_size"],
                  "factor": s, "mode": cfg.mode, "output_shape": (shape[0] * s, *shape[1:])},
        "stages": [
            {"stage": "I train restorer", "steps": cfg.restorer.steps, "batch": cfg.restorer.batch_size,
             "network_evaluations": cfg.restorer.steps * cfg.restorer.batch_size,
             "patch": [cfg.restorer.patch, cfg.restorer.patch], "preset": cfg.restorer.preset},
            {"stage": "II restore XZ/YZ", "roi": [list(roi.start), list(roi.stop)], "tiles": tiles,
             "slices": tiles * slices_per_tile,
             "network_evaluations": tiles * slices_per_tile * nfe,
             "pixel_evaluations": tiles * slices_per_tile * nfe * tile[0] * s * max(tile[1], tile[2]),
             "sampler": f"{cfg.restorer.sampler} x{nfe}"},
            {"stage": "III train DGEAN", "steps": cfg.dgean.steps, "batch": cfg.dgean.batch_size,
             "network_evaluations": cfg.dgean.steps * cfg.dgean.batch_size, "preset": cfg.dgean.preset},
            {"stage": "IV infer", "blocks": blocks, "halo": list(halo),
             "network_evaluations": blocks * (8 if cfg.infer.tta else 1),
             "gflop": hr_voxels * flops_per_output_voxel(dcfg) * (8 if cfg.infer.tta else 1) / 1e9},
        ],
    }


# --- running --------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    import dask
    import numpy
    import torch
    import zarr

    return {"d2r_dask": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "dask": dask.__version__, "zarr": zarr.__version__, "numpy": numpy.__version__}


def _training_done(folder: Path, steps: int) -> bool:
    cfg_path = folder / "config.json"
    return cfg_path.exists() and json.loads(cfg_path.read_text()).get("step") == steps


def run(
    lr_path: str | os.PathLike,
    output: str | os.PathLike,
    cfg: RunConfig,
    *,
    workdir: str | os.PathLike | None = None,
    client: Any = None,
    serial: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    levels: int = 3,
) -> dict[str, Any]:
    """Run Stages I-IV (resuming where a previous run stopped); return the run record."""
    from .infer import infer
    from .restore import restore
    from .train import DGEANTrainConfig, RestorerConfig, TrainConfig, train_dgean, train_restorer
    from ..io.files import write_json

    paths = Paths(Path(lr_path), Path(output), Path(workdir) if workdir else default_workdir(output))
    lr = open_volume(paths.lr)  # fails early, with a clear message, on a bad input
    if paths.output.exists() and not overwrite and is_complete(paths.output) and not paths.record.exists():
        raise InputError(f"{paths.output} already exists; pass --overwrite to replace it")
    record: dict[str, Any] = {}
    if paths.record.exists() and not overwrite:
        record = json.loads(paths.record.read_text())
        record["config"] = upgrade_config(record.get("config", {}), warn=False)  # runs recorded before a rename
        if record.get("config") != cfg.to_dict() or record.get("input") != str(paths.lr.resolve()):
            old = record.get("config", {})
            diff = sorted(k for k in set(old) | set(cfg.to_dict()) if old.get(k) != cfg.to_dict().get(k))
            raise ResumeMismatchError(
                f"{paths.workdir} holds a run of {record.get('input')} with a different configuration "
                f"(differs in: {', '.join(diff) or 'input'}); use another --workdir or pass --overwrite"
            )
    elif overwrite:
        for old in (paths.workdir, paths.output):
            if old.exists():
                shutil.rmtree(old)
    paths.workdir.mkdir(parents=True, exist_ok=True)
    record.update({"input": str(paths.lr.resolve()), "output": str(paths.output.resolve()),
                   "config": cfg.to_dict(), "versions": _versions(), "plan": plan(paths.lr, cfg)})
    record.setdefault("stages", {})
    record["finished"] = False  # until the last stage is done again (its output may have been deleted)
    write_json(paths.record, record)

    def stage(name: str, done: bool, fn: Any) -> None:
        entry = record["stages"].setdefault(name, {"status": "pending", "seconds": 0.0})
        if done:
            entry["status"] = "done"
            log.info("stage %s: already done", name)
            return
        entry["status"] = "running"
        write_json(paths.record, record)
        t0 = time.time()
        fn()
        entry["seconds"] = round(entry.get("seconds", 0.0) + time.time() - t0, 2)
        entry["status"] = "done"
        write_json(paths.record, record)

    r, d = cfg.restorer, cfg.dgean
    restorer_lr = r.lr or (4e-5 if r.preset == "full" else 2e-4)
    stage("restorer", _training_done(paths.restorer, r.steps), lambda: train_restorer(
        paths.lr, paths.restorer,
        RestorerConfig(factor=cfg.factor, mode=cfg.mode, preset=r.preset, patch=r.patch, sampler=r.sampler,
                       sampler_steps=r.sampler_steps, val_sampler_steps=r.sampler_steps),
        TrainConfig(steps=r.steps, batch_size=r.batch_size, lr=restorer_lr, seed=cfg.seed, device=cfg.device,
                    checkpoint_every=max(1, r.steps // 6), val_every=max(1, r.steps // 3)),
        resume=True, progress=progress))
    roi = stage2_roi(tuple(lr.shape), cfg)
    stage("pseudo_hr", is_complete(paths.pseudo_hr), lambda: restore(
        paths.lr, paths.pseudo_hr, paths.restorer, roi=roi, block=cfg.restore.block, halo=cfg.restore.halo,
        seed=cfg.seed, slice_batch=cfg.restore.slice_batch, client=client, serial=serial, progress=progress))
    stage("dgean", _training_done(paths.dgean, d.steps), lambda: train_dgean(
        paths.pseudo_hr, paths.dgean,
        DGEANTrainConfig(factor=cfg.factor, mode=cfg.mode, preset=d.preset, patch_xy=d.patch_xy,
                         patch_lr_z=d.patch_lr_z, hf_weight=d.hf_weight),
        TrainConfig(steps=d.steps, batch_size=d.batch_size, lr=d.lr, seed=cfg.seed, device=cfg.device,
                    checkpoint_every=max(1, d.steps // 6), val_every=max(1, d.steps // 3)),
        resume=True, progress=progress))
    stage("sr", is_complete(paths.output), lambda: infer(
        paths.lr, paths.output, paths.dgean, block=cfg.infer.block, group=cfg.infer.group, tta=cfg.infer.tta,
        client=client, serial=serial, progress=progress, levels=levels))
    record["finished"] = True
    write_json(paths.record, record)
    return record


def config_template(factor: int = 4) -> dict[str, Any]:
    """Every option of ``d2r run`` with its default (for ``d2r config show``)."""
    return RunConfig(factor=factor).to_dict()

