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

With a Dask client, Stages I and III train on one cluster worker (a GPU one if there is
one; :mod:`.remote`), which writes their checkpoints into the work directory: it must be on
a filesystem the client and the workers share.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from .. import __version__
from ..blockwise.lock import exclusive
from ..errors import InputError, OutputExistsError, ResumeMismatchError
from ..io import stores
from ..io.geometry import Box, region_of
from ..io.stores import Location
from ..io.volume import check_output_path, check_removable, is_complete, open_volume, prepare_output
from .config import RunConfig, config_diff, resolve_auto, upgrade_config

log = logging.getLogger(__name__)
STAGES = ("restorer", "pseudo_hr", "dgean", "sr")


# --- planning -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Paths:
    """The run's volumes (local paths or object-store URLs) and its work directory (always local)."""

    lr: Location
    output: Location
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
    """``SR.d2r-work`` beside a local output; in the current folder for one on an object store."""
    output = stores.location(output)
    name = stores.name(output).removesuffix(".zarr") + ".d2r-work"
    return output.with_name(name) if isinstance(output, Path) else Path(name)


def stage2_roi(shape: Sequence[int], cfg: RunConfig) -> Box:
    """The LR region Stage II restores: ``restore.roi`` or a centred box of at most ``max_roi``."""
    if cfg.restore.roi is not None:
        return region_of(cfg.restore.roi, shape, "restore.roi")
    size = [min(n, m) for n, m in zip(shape, cfg.restore.max_roi)]
    start = tuple((n - s) // 2 for n, s in zip(shape, size))
    return Box(start, tuple(a + s for a, s in zip(start, size)))


@dataclass(frozen=True)
class Sizes:
    """What the stages work on for a given LR volume: Stage II's region, the training patches
    fitted to the data (a default patch larger than a small volume shrinks to it)."""

    roi: Box
    restorer_patch: int
    dgean_patch_xy: int
    dgean_patch_lr_z: int


def fit_sizes(shape: Sequence[int], cfg: RunConfig) -> Sizes:
    """Check every stage's minimum sizes and presets for an LR volume of ``shape`` (``cfg`` resolved).

    Each refusal is an :class:`InputError` stating the number needed and the number found.
    """
    from ..blockwise.layout import Layout
    from ..models.dgean import PRESETS as DGEAN_PRESETS, dgean_config, receptive_field
    from ..models.nafnet import PRESETS as NAFNET_PRESETS
    from .restore import stage2_layout

    shape = tuple(int(n) for n in shape)
    for name, preset, known in (("restorer", cfg.restorer.preset, NAFNET_PRESETS),
                                ("dgean", cfg.dgean.preset, DGEAN_PRESETS)):
        if preset not in known:
            raise InputError(f"unknown {name} preset {preset!r} ({name}.preset); choose one of auto, "
                             f"{', '.join(sorted(known))}")
    s, d = cfg.factor, cfg.dgean
    roi = stage2_roi(shape, cfg)
    net = dgean_config(d.preset, s, cfg.mode)
    if d.patch_lr_z < net.ca_pool:
        raise InputError(f"dgean.patch_lr_z is {d.patch_lr_z} LR slices, thinner than DGEAN's {net.ca_pool}-slice "
                         f"attention window; set it to >= {net.ca_pool}")
    where = "the Stage II region (restore.roi)" if cfg.restore.roi is not None else "the LR volume"
    # Stage III reads one spare LR period (z-flips) and starts on the LR grid: patch + 2 LR slices
    dgean_lr_z = min(d.patch_lr_z, roi.shape[0] - 2)
    if dgean_lr_z < net.ca_pool:
        raise InputError(f"Stage III reads training patches of (dgean.patch_lr_z + 2) LR slices, at least "
                         f"{net.ca_pool + 2} (DGEAN's attention window + 2), but {where} has {roi.shape[0]}; use an "
                         f"LR volume of >= {net.ca_pool + 2} slices (a smaller factor when degrading)")
    restorer_patch = min(cfg.restorer.patch, shape[1], shape[2])
    if restorer_patch < 2 * s:
        raise InputError(f"Stage I trains on XY patches of >= {2 * s} x {2 * s} voxels at factor {s}, but the LR "
                         f"volume is {shape[1]} x {shape[2]} in XY (restorer.patch {cfg.restorer.patch}); use a "
                         "larger volume (or a larger restorer.patch)")
    dgean_patch = min(d.patch_xy, roi.shape[1], roi.shape[2])
    if dgean_patch < 8:
        raise InputError(f"Stage III trains on XY patches of >= 8 x 8 voxels, but {where} is {roi.shape[1]} x "
                         f"{roi.shape[2]} in XY (dgean.patch_xy {d.patch_xy}); use a larger volume or region")
    # the engine's block rules (halo against block), here so that a dry run states them too
    stage2_layout(shape, roi, block=cfg.restore.block, halo=cfg.restore.halo, factor=s)
    if cfg.infer.block is not None:  # None: sized to the device later, always valid
        Layout(roi=Box((0, 0, 0), shape), block=cfg.infer.block, halo=receptive_field(net), scale=(s, 1, 1),
               group=cfg.infer.group or 1)
    return Sizes(roi, restorer_patch, dgean_patch, dgean_lr_z)


def check_run(lr_path: str | os.PathLike, output: str | os.PathLike, cfg: RunConfig, *,
              workdir: str | os.PathLike | None = None, overwrite: bool = False,
              device_here: bool = True) -> Paths:
    """Validate a run before any work (``--dry-run`` too); write nothing, return its paths.

    The device must exist (on this machine if ``device_here``; else, training on a cluster
    worker, its name must be valid and the worker checks the rest); the LR volume must open; the output and the work directory must
    not be, hold or lie inside the LR volume, nor the work directory lie inside the output;
    with ``overwrite`` both must be d2r's to delete; presets and minimum sizes per :func:`fit_sizes`.
    """
    from .train import check_device

    check_device(cfg.device, here=device_here)
    cfg = resolve_run(cfg, cfg.device, workdir, output, overwrite=overwrite)
    if workdir is not None and stores.is_remote(workdir):
        raise InputError(f"the work directory {workdir} must be on a local or shared file system "
                         "(the volumes may be on an object store); choose a local --workdir")
    paths = Paths(stores.location(lr_path), stores.location(output),
                  Path(workdir) if workdir else default_workdir(output))
    lr = open_volume(paths.lr)  # fails early, with a clear message, on a bad input
    check_output_path(paths.output, [paths.lr])
    check_output_path(paths.workdir, [paths.lr], what="work directory")
    if stores.same_or_inside(paths.workdir, paths.output, containing=False):
        raise InputError(f"the work directory {paths.workdir} would lie inside the output {paths.output}; "
                         "choose another --workdir")
    if overwrite:
        for old in (paths.workdir, paths.output):
            check_removable(old)
    elif stores.exists(paths.output) and is_complete(paths.output) and not paths.record.exists():
        raise OutputExistsError(f"{paths.output} already exists; pass --overwrite to replace it")
    fit_sizes(tuple(lr.shape), cfg)
    return paths


def plan(lr_path: str | os.PathLike, cfg: RunConfig) -> dict[str, Any]:
    """What each stage will do: data, blocks, network evaluations (no computation)."""
    from ..models.dgean import dgean_config, flops_per_output_voxel, receptive_field
    from .restore import stage2_layout, stage2_work
    from .sizing import device_info, infer_block

    lr = open_volume(lr_path)
    s = cfg.factor
    shape = tuple(lr.shape)
    cfg = resolve_auto(cfg, cfg.device)
    sizes = fit_sizes(shape, cfg)
    roi = sizes.roi
    sampler, nfe = _restorer_config(cfg).resolved_sampler()
    nfe = nfe or 100  # what Stage II runs, whichever the sampler (sde without steps runs all T)
    copies = 2 ** len(cfg.restore.flips or ())  # each flip restores every slice once more
    tiles = stage2_layout(shape, roi, block=cfg.restore.block, halo=cfg.restore.halo, factor=s)
    work = stage2_work(tiles, nfe=nfe * copies)
    dcfg = dgean_config(cfg.dgean.preset, s, cfg.mode)
    halo = receptive_field(dcfg)
    sized = infer_block(shape, dcfg, device_info(cfg.device), block=cfg.infer.block, tta=cfg.infer.tta)
    blocks = sized["blocks"]
    hr_voxels = shape[0] * s * shape[1] * shape[2]
    return {
        "input": {"path": str(lr_path), "shape": shape, "voxel_size_nm": lr.attrs["voxel_size"],
                  "factor": s, "mode": cfg.mode, "output_shape": (shape[0] * s, *shape[1:])},
        "stages": [
            {"stage": "I train restorer", "steps": cfg.restorer.steps, "batch": cfg.restorer.batch_size,
             "network_evaluations": cfg.restorer.steps * cfg.restorer.batch_size,
             "patch": [sizes.restorer_patch, sizes.restorer_patch], "preset": cfg.restorer.preset},
            {"stage": "II restore XZ/YZ", "roi": [list(roi.start), list(roi.stop)], "tiles": tiles.n_blocks,
             "block": list(tiles.block), "halo": list(tiles.halo), "slices": work["slices"],
             "useful_slices": work["useful_slices"], "network_evaluations": work["slices"] * nfe * copies,
             "pixel_evaluations": work["pixel_evaluations"],
             "useful_pixel_evaluations": work["useful_pixel_evaluations"], "sampler": f"{sampler} x{nfe}",
             "flips": list(cfg.restore.flips or ())},
            {"stage": "III train DGEAN", "steps": cfg.dgean.steps, "batch": cfg.dgean.batch_size,
             "patch": [sizes.dgean_patch_lr_z * s, sizes.dgean_patch_xy, sizes.dgean_patch_xy],
             "network_evaluations": cfg.dgean.steps * cfg.dgean.batch_size, "preset": cfg.dgean.preset},
            {"stage": "IV infer", "blocks": blocks, "halo": list(halo), "block": sized["block"],
             "halo_overhead": sized["halo_overhead"], "device": sized["device"],
             "estimated_seconds": sized["estimated_seconds"], "estimate": sized["estimate"],
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


def _restorer_config(cfg: RunConfig) -> Any:
    from .train import RestorerConfig

    r = cfg.restorer
    return RestorerConfig(factor=cfg.factor, mode=cfg.mode, preset=r.preset, patch=r.patch, recipe=r.recipe,
                          sampler=r.sampler, sampler_steps=r.sampler_steps)


def resolve_run(cfg: RunConfig, device: str | None, workdir: str | os.PathLike | None,
                output: str | os.PathLike, *, overwrite: bool = False) -> RunConfig:
    """``cfg`` resolved for ``device`` (:func:`resolve_auto`); resuming the run recorded in the
    work directory (not ``overwrite``), to what that run resolved."""
    record = (Path(workdir) if workdir else default_workdir(output)) / "run.json"
    recorded = None
    if not overwrite:
        with contextlib.suppress(OSError, ValueError, AttributeError):  # :func:`_run` reports a bad record
            recorded = upgrade_config(json.loads(record.read_text()).get("config", {}), warn=False)
    return resolve_auto(cfg, device, recorded=recorded)


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
    train_on_cluster: bool | None = None,
    loader_workers: int | None = None,
) -> dict[str, Any]:
    """Run Stages I-IV (resuming where a previous run stopped); return the run record.

    Stages II and IV run on ``client`` (else the default client, else here; see
    :func:`~d2r_dask.blockwise.cluster.resolve_client`). Stages I and III train on one worker
    of ``client``'s cluster when ``train_on_cluster`` (None: when a ``client`` is given, not
    ``serial``, and its cluster has a GPU or runs on other hosts -- see
    :func:`~.remote.trains_better_on_cluster`), else in this process; ``loader_workers``
    processes draw their batches (None: :func:`~.loader.default_loader_workers`; the result
    is the same for any number).

    ``auto`` presets and unset steps are resolved for the training device first (:func:`resolve_auto`;
    a resumed run keeps what its record says they resolved to);
    the record holds the resolved configuration, the intensity mapping measured once on the
    LR volume, and each training stage's self-check (``self_check``: the model against
    interpolation on held-out patches degraded like z). Everything is validated before any
    work (:func:`check_run`); the run holds the locks of its work directory and its output,
    so a second run on either is refused while this one lives.
    """
    if train_on_cluster and (client is None or serial):
        raise InputError("training on the cluster needs a Dask client (client=) and serial=False")
    remote = client is not None and not serial and train_on_cluster is not False
    device = cfg.device
    if remote:
        from .remote import trains_better_on_cluster, training_worker

        worker_device = training_worker(client)[1]
        if train_on_cluster is None:
            remote = trains_better_on_cluster(client, worker_device)
        if remote and device is None:
            device = worker_device  # auto presets for the worker that trains, not for this machine
    cfg = resolve_run(cfg, device, workdir, output, overwrite=overwrite)
    paths = check_run(lr_path, output, cfg, workdir=workdir, overwrite=overwrite, device_here=not remote)
    with exclusive(paths.workdir, what="work directory"), exclusive(paths.output):
        return _run(paths, cfg, client=client, serial=serial, overwrite=overwrite, progress=progress, levels=levels,
                    remote=remote, loader_workers=loader_workers)


def _run(paths: Paths, cfg: RunConfig, *, client: Any, serial: bool, overwrite: bool, progress: bool,
         levels: int, remote: bool, loader_workers: int | None) -> dict[str, Any]:
    """:func:`run` after validation, holding the locks."""
    from .infer import infer
    from .remote import train_on_cluster
    from .restore import restore
    from .train import DGEANTrainConfig, TrainConfig, train_dgean, train_restorer
    from ..data.intensity import Intensity
    from ..io.files import write_json

    lr = open_volume(paths.lr)
    sizes = fit_sizes(tuple(lr.shape), cfg)
    record: dict[str, Any] = {}
    if paths.record.exists() and not overwrite:
        record = json.loads(paths.record.read_text())
        record["config"] = upgrade_config(record.get("config", {}), warn=False)  # runs recorded before a rename
        if record.get("config") != cfg.to_dict() or record.get("input") != stores.canonical(paths.lr):
            diff = config_diff(record.get("config", {}), cfg.to_dict())
            raise ResumeMismatchError(
                f"{paths.workdir} holds a run of {record.get('input')} with a different configuration "
                f"(differs in: {'; '.join(diff) or 'input'}); give the recorded values to resume it, "
                "use another --workdir, or pass --overwrite to start over"
            )
    elif overwrite:
        for old in (paths.workdir, paths.output):
            prepare_output(old, overwrite=True)  # d2r's own only (checked by check_run), deleted
    if cfg.infer.block is None:  # sized once, to this device, and recorded: a resume keeps it
        from ..models.dgean import dgean_config
        from .sizing import device_info, infer_block

        sized = infer_block(tuple(lr.shape), dgean_config(cfg.dgean.preset, cfg.factor, cfg.mode),
                            device_info(cfg.device), tta=cfg.infer.tta)
        cfg = replace(cfg, infer=replace(cfg.infer, block=tuple(sized["block"])))
        log.info("Stage IV block %s (halo overhead %.2fx)", sized["block"], sized["halo_overhead"])
    intensity = Intensity(**record["intensity"]) if "intensity" in record else Intensity.for_volume(lr.data)
    paths.workdir.mkdir(parents=True, exist_ok=True)  # after the first LR read (its intensity sample)
    record.update({"input": stores.canonical(paths.lr), "output": stores.canonical(paths.output),
                   "config": cfg.to_dict(), "intensity": intensity.to_dict(), "versions": _versions(),
                   "plan": plan(paths.lr, cfg)})
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

    def trained(name: str, folder: Path) -> None:
        """Record a training stage's self-check (also when the stage was already done)."""
        from ..evaluation.selfcheck import read_self_check

        check = read_self_check(folder)
        record["stages"][name]["self_check"] = check
        if check is not None and not check["beats_interpolation"]:
            record.setdefault("warnings", [])
            msg = (f"{name}: the model scores {check['psnr']:.2f} dB on held-out patches, below "
                   f"{check['interpolation']} interpolation ({check['psnr_interpolation']:.2f} dB)")
            if msg not in record["warnings"]:
                record["warnings"].append(msg)
        write_json(paths.record, record)

    def train(name: str, trainer: Any, *args: Any, **kw: Any) -> None:
        """Train here, or on a cluster worker (recorded in run.json)."""
        if not remote:
            trainer(*args, progress=progress, **kw)
            return
        summary = train_on_cluster(client, trainer, *args, progress=progress, **kw)
        record["stages"][name]["worker"] = summary["worker"]

    r, d = cfg.restorer, cfg.dgean
    rcfg = replace(_restorer_config(cfg), patch=sizes.restorer_patch)
    stage("restorer", _training_done(paths.restorer, r.steps), lambda: train(
        "restorer", train_restorer, paths.lr, paths.restorer, rcfg,
        TrainConfig(steps=r.steps, batch_size=r.batch_size, lr=r.lr, seed=cfg.seed, device=cfg.device,
                    checkpoint_every=max(1, r.steps // 6), val_every=max(1, r.steps // 4),
                    loader_workers=loader_workers),
        resume=True, intensity=intensity))
    trained("restorer", paths.restorer)
    stage("pseudo_hr", is_complete(paths.pseudo_hr), lambda: restore(
        paths.lr, paths.pseudo_hr, paths.restorer, roi=sizes.roi, block=cfg.restore.block, halo=cfg.restore.halo,
        seed=cfg.seed, slice_batch=cfg.restore.slice_batch, flips=cfg.restore.flips or (), client=client,
        serial=serial, progress=progress))
    stage("dgean", _training_done(paths.dgean, d.steps), lambda: train(
        "dgean", train_dgean, paths.pseudo_hr, paths.dgean,
        DGEANTrainConfig(factor=cfg.factor, mode=cfg.mode, preset=d.preset, patch_xy=sizes.dgean_patch_xy,
                         patch_lr_z=sizes.dgean_patch_lr_z, hf_weight=d.hf_weight),
        TrainConfig(steps=d.steps, batch_size=d.batch_size, lr=d.lr, seed=cfg.seed, device=cfg.device,
                    checkpoint_every=max(1, d.steps // 6), val_every=max(1, d.steps // 4),
                    loader_workers=loader_workers),
        resume=True, intensity=intensity))
    trained("dgean", paths.dgean)
    stage("sr", is_complete(paths.output), lambda: infer(
        paths.lr, paths.output, paths.dgean, block=cfg.infer.block, group=cfg.infer.group, tta=cfg.infer.tta,
        client=client, serial=serial, progress=progress, levels=levels))
    record["finished"] = True
    write_json(paths.record, record)
    return record
