"""The ``d2r`` command line: a thin click layer over the Python API.

Each command parses its options, calls one API function and prints a result.
Errors caused by the input (:class:`~d2r_dask.errors.D2RError`) are printed as
one line without a traceback, with exit status 1.

Every command is here so ``d2r --help`` reads as one table of contents; each is a few lines
of options around one API call.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import click

from . import __version__
from .errors import D2RError

if TYPE_CHECKING:
    from .io.stores import Location


class D2RGroup(click.Group):
    """A click group that turns user errors into one-line messages."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except D2RError as exc:  # one line: what went wrong and the fix
            raise click.ClickException(" ".join(str(exc).split())) from None


class VolumeType(click.ParamType):
    """A volume argument: a local path (given as a Path) or an object store's URL
    (``s3://``, ``gs://``: kept as its URL; see :mod:`d2r_dask.io.stores`)."""

    name = "path|url"

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        from .io.stores import location

        return location(value)


VOLUME = VolumeType()


class LocalPathType(click.Path):
    """A folder or file that stays on a file system (checkpoints, work directories, reports):
    an object-store URL is refused, naming the option, instead of becoming a local ``s3:`` folder."""

    def __init__(self) -> None:
        super().__init__(path_type=Path)

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        from .errors import InputError
        from .io.stores import scheme

        if not isinstance(value, Path) and scheme(value) not in (None, "file"):
            what = f"--{param.name.replace('_', '-')}" if param is not None and param.name else "this path"
            raise InputError(f"{value}: {what} must be on a local or shared file system (only volumes may be "
                             "on an object store); give a local path")
        return super().convert(value.removeprefix("file://") if isinstance(value, str) else value, param, ctx)


LOCAL = LocalPathType()


def _overwrite_option(f: Any) -> Any:
    return click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")(f)


def _levels_option(f: Any) -> Any:
    return click.option(
        "--levels", default=3, show_default=True, type=click.IntRange(1, 10),
        help="Multiscale pyramid levels to write (fewer where the volume is small).",
    )(f)


voxel_size_option = click.option(
    "--voxel-size", nargs=3, type=float, metavar="Z Y X",
    help="Voxel size in nanometres, z y x (e.g. 40 4 4).",
)


@click.group(cls=D2RGroup, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="d2r")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """d2r: isotropic volume EM from anisotropic stacks with D2R, on Dask over OME-Zarr.

    \b
    Typical use:
      d2r convert stack.tif lr.zarr --voxel-size 40 4 4
      d2r info lr.zarr
      d2r degrade gt.zarr lr.zarr --factor 4 --mode decimate
    """
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("d2r_dask").setLevel(logging.INFO if verbose == 0 else level)


@cli.command()
@click.argument("input_path", metavar="INPUT")
@click.argument("output", type=VOLUME)
@voxel_size_option
@click.option("--translation", nargs=3, type=float, default=(0.0, 0.0, 0.0), metavar="Z Y X",
              help="Physical origin in nm.")
@click.option("--chunks", nargs=3, type=int, default=None, metavar="Z Y X",
              help="Output chunk shape [default: ~128 per axis].")
@click.option("--compression", type=click.Choice(["zstd", "blosc", "none"]), default="zstd")
@_levels_option
@_overwrite_option
def convert(input_path: str, output: Location, voxel_size: tuple[float, float, float] | None,
            translation: tuple[float, float, float], chunks: tuple[int, int, int] | None,
            compression: str, levels: int, overwrite: bool) -> None:
    """Convert a stack to OME-Zarr in bounded memory.

    INPUT is a multi-page TIFF, a folder of PNG/TIFF slices, FILE.h5:DATASET,
    a .npy file or a Zarr volume.
    """
    from .io.convert import convert as run_convert

    run_convert(input_path, output, voxel_size=voxel_size, translation=translation, chunks=chunks,
                levels=levels, overwrite=overwrite, compression=compression, progress=True)
    click.echo(f"wrote {output}")


@cli.command()
@click.argument("store", type=VOLUME)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def info(store: Location, as_json: bool) -> None:
    """Describe a volume: shape, dtype, chunks, voxel size, size on disk, intensities."""
    from .io.volume import describe

    d = describe(store)
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    s = d["intensity_sample"]
    ratio = d["uncompressed_bytes"] / max(d["size_on_disk_bytes"], 1)
    click.echo(
        f"{d['path']}  ({'OME-Zarr ' + d['ngff_version'] if d['ngff_version'] else 'plain Zarr array'})\n"
        f"  shape (z,y,x)   {d['shape']}  {d['dtype']}\n"
        f"  chunks          {d['chunks']}\n"
        f"  voxel size      {_fmt3(d['voxel_size_nm'])} nm\n"
        f"  translation     {_fmt3(d['translation_nm'])} nm\n"
        f"  levels          {len(d['levels']) or 1}\n"
        f"  on disk         {'~' if d['size_on_disk_estimated'] else ''}{_human(d['size_on_disk_bytes'])} "
        f"({ratio:.1f}x compression{', estimated from a sample of chunks' if d['size_on_disk_estimated'] else ''})\n"
        f"  intensity       min {s['min']:g}  p1 {s['p1']:g}  mean {s['mean']:.4g}  "
        f"p99 {s['p99']:g}  max {s['max']:g}  std {s['std']:.4g}  ({s['slices']} slices sampled)"
    )


@cli.command()
@click.argument("gt", type=VOLUME)
@click.argument("output", type=VOLUME)
@click.option("--factor", "-s", type=int, required=True, help="Axial factor s (>= 2).")
@click.option("--mode", type=click.Choice(["decimate", "mean"]), default="decimate",
              help="decimate: keep every s-th slice; mean: average s-slice slabs.")
@click.option("--blur-sigma", type=float, default=0.0, help="Gaussian blur along z (HR slices) before sampling.")
@click.option("--noise", type=click.Choice(["gaussian", "poisson"]), default=None, help="Add noise.")
@click.option("--noise-level", type=float, default=0.0,
              help="Gaussian std as a fraction of the data range, or 1/photons for poisson.")
@click.option("--seed", type=int, default=0)
@click.option("--chunks", nargs=3, type=int, default=None, metavar="Z Y X")
@_levels_option
@_overwrite_option
def degrade(gt: Location, output: Location, factor: int, mode: str, blur_sigma: float, noise: str | None,
            noise_level: float, seed: int, chunks: tuple[int, int, int] | None, levels: int,
            overwrite: bool) -> None:
    """Degrade an isotropic volume along z by FACTOR (makes an LR input from ground truth).

    A factor that leaves fewer LR slices than d2r's stages need (3) is refused.
    """
    from .data.degrade import MIN_LR_SLICES, AxialDegradation, degrade_volume
    from .io.geometry import Geometry
    from .io import stores
    from .io.volume import check_output_path, open_volume, write_volume

    check_output_path(output, [gt])
    lr = degrade_volume(open_volume(gt), AxialDegradation(factor, mode, blur_sigma, noise, noise_level, seed),
                        min_slices=MIN_LR_SLICES)
    write_volume(output, lr.data, Geometry.of(lr), chunks=chunks, levels=levels, overwrite=overwrite,
                 inputs=[gt], name=Path(stores.name(output)).stem,
                 metadata={"degradation": lr.attrs["degradation"], "source": str(gt)})
    click.echo(f"wrote {output}  shape {lr.shape}  voxel size {_fmt3(lr.attrs['voxel_size'])} nm")


def cluster_options(f: Any) -> Any:
    """--scheduler / --workers / --serial: where blockwise work runs."""
    f = click.option("--serial", is_flag=True, help="Run blocks in this process, without a cluster (debugging).")(f)
    f = click.option("--workers", type=int, default=None,
                     help="Workers of the local cluster [default: one per GPU, else min(2, cores)].")(f)
    return click.option("--scheduler", default=None, metavar="ADDRESS",
                        help="Use a running Dask scheduler (tcp://host:8786) instead of a local cluster.")(f)


def _check_cluster(scheduler: str | None, workers: int | None, serial: bool) -> None:
    """Validate the cluster options before any work: a worker count >= 1, a reachable scheduler."""
    from .blockwise.cluster import check_scheduler, check_workers

    check_workers(workers)
    if scheduler and not serial:
        check_scheduler(scheduler)


@contextlib.contextmanager
def _client(scheduler: str | None, workers: int | None, serial: bool) -> Iterator[Any]:
    _check_cluster(scheduler, workers, serial)
    if serial:
        yield None
        return
    from .blockwise.cluster import connect

    with connect(scheduler, n_workers=workers) as client:
        click.echo(f"dask dashboard: {client.dashboard_link}", err=True)
        yield client


_LOADER_WORKERS = click.option(
    "--loader-workers", type=int, default=None,
    help="Processes drawing training batches ahead [default: 0 on a CPU, up to 4 on a GPU]; the trained "
         "weights are the same for any number.")


def _train_options(f: Any) -> Any:
    for opt in reversed([
        click.option("--steps", type=int, default=2000, help="Training steps."),
        click.option("--batch-size", type=int, default=4),
        click.option("--lr", "learning_rate", type=float, default=None,
                     help="AdamW learning rate [default: the recipe's and preset's, see `default_restorer_lr` "
                          "and `default_dgean_lr`]."),
        click.option("--ema", type=float, default=0.995, help="EMA decay of the saved weights."),
        click.option("--checkpoint-every", type=int, default=250),
        click.option("--val-every", type=int, default=250),
        click.option("--seed", type=int, default=0),
        click.option("--device", default=None, help="cpu, cuda, cuda:1 [default: a GPU if present]."),
        _LOADER_WORKERS,
        click.option("--scheduler", default=None, metavar="ADDRESS",
                     help="Train on one worker (a GPU one if any) of this running Dask scheduler "
                          "(tcp://host:8786) instead of in this process; --out must be on a filesystem the "
                          "workers share."),
        click.option("--resume", is_flag=True, help="Continue from the last checkpoint in --out."),
        _overwrite_option,
    ]):
        f = opt(f)
    return f


def _train_config(steps: int, batch_size: int, learning_rate: float | None, ema: float, checkpoint_every: int,
                  val_every: int, seed: int, device: str | None, loader_workers: int | None) -> Any:
    from .stages.train import TrainConfig

    _at_least(1, steps=steps, batch_size=batch_size, checkpoint_every=checkpoint_every, val_every=val_every)
    _at_least(0, loader_workers=loader_workers)
    return TrainConfig(steps=steps, batch_size=batch_size, lr=learning_rate, ema=ema,
                       checkpoint_every=checkpoint_every, val_every=val_every, seed=seed, device=device,
                       loader_workers=loader_workers)


def _train(trainer: Any, scheduler: str | None, *args: Any, **kw: Any) -> dict[str, Any]:
    """``trainer(*args, **kw)`` here, or on a worker of the Dask scheduler at ``scheduler``."""
    if scheduler is None:
        return trainer(*args, **kw)
    from .blockwise.cluster import connect
    from .stages.remote import train_on_cluster

    _check_cluster(scheduler, None, False)
    with connect(scheduler) as client:
        click.echo(f"dask dashboard: {client.dashboard_link}", err=True)
        return train_on_cluster(client, trainer, *args, **kw)


@cli.command("train-restorer")
@click.argument("lr_volume", type=VOLUME)
@click.option("--factor", "-s", type=int, required=True, help="Axial factor s of the LR volume.")
@click.option("--out", type=LOCAL, required=True, help="Checkpoint folder.")
@click.option("--mode", type=click.Choice(["decimate", "mean"]), default="decimate",
              help="How z was acquired (and how XY patches are degraded).")
@click.option("--preset", type=click.Choice(["tiny", "small", "full"]), default="tiny", help="Network size.")
@click.option("--patch", type=int, default=64, help="XY patch side.")
@click.option("--recipe", type=click.Choice(["fast", "authors"]), default="fast", show_default=True,
              help="fast: x0 prediction, predict-and-refine (ours); authors: noise prediction, t uniform in 1..T.")
@click.option("--sampler", type=click.Choice(["sde", "ddim", "posterior"]), default=None,
              help="Stage II sampler saved with the model [default: posterior for fast, sde for authors].")
@click.option("--sampler-steps", type=int, default=None,
              help="Network evaluations of that sampler [default: 1 for fast (its mean prediction), "
                   "100 for authors].")
@_train_options
def train_restorer_cmd(lr_volume: Location, factor: int, out: Path, mode: str, preset: str, patch: int, recipe: str,
                       sampler: str | None, sampler_steps: int | None, steps: int, batch_size: int,
                       learning_rate: float | None, ema: float, checkpoint_every: int, val_every: int, seed: int,
                       device: str | None, loader_workers: int | None, scheduler: str | None, resume: bool,
                       overwrite: bool) -> None:
    """Stage I: train the diffusion restorer on XY patches of LR_VOLUME.

    Every validation scores the restorer on held-out XY patches degraded like z, next to
    linear and cubic interpolation of the same patches (metrics.csv); a restorer that does
    not beat interpolation is reported with a warning.
    """
    from .stages.train import RestorerConfig, train_restorer

    rcfg = RestorerConfig(factor=factor, mode=mode, preset=preset, patch=patch, recipe=recipe, sampler=sampler,
                          sampler_steps=sampler_steps)
    tcfg = _train_config(steps, batch_size, learning_rate, ema, checkpoint_every, val_every, seed, device,
                         loader_workers)
    summary = _train(train_restorer, scheduler, lr_volume, out, rcfg, tcfg, resume=resume, overwrite=overwrite)
    click.echo(f"restorer saved to {out} ({summary['steps']} steps, {summary['seconds']:.0f} s)")
    _echo_self_check("restorer", summary.get("self_check"))


def _echo_self_check(name: str, check: dict[str, Any] | None) -> None:
    """One line: the model against interpolation on its held-out patches (loud if it loses)."""
    if check is None:
        return
    line = (f"  {name} self-check (held-out patches degraded like z): {check['psnr']:.2f} dB / SSIM "
            f"{check['ssim']:.3f} vs {check['interpolation']} {check['psnr_interpolation']:.2f} dB / "
            f"{check['ssim_interpolation']:.3f} ({check['margin_db']:+.2f} dB)")
    if check["beats_interpolation"]:
        click.echo(line)
    else:
        click.secho(line + "  WARNING: does not beat interpolation", fg="red", err=True)


@cli.command("train-dgean")
@click.argument("hr_volume", type=VOLUME, metavar="PSEUDO_HR")
@click.option("--factor", "-s", type=int, required=True, help="Axial factor s.")
@click.option("--out", type=LOCAL, required=True, help="Checkpoint folder.")
@click.option("--mode", type=click.Choice(["decimate", "mean"]), default="decimate",
              help="How the acquisition degrades z (the same as the LR).")
@click.option("--preset", type=click.Choice(["tiny", "small", "medium", "base", "full"]), default="tiny",
              help="Network size.")
@click.option("--patch-xy", type=int, default=48)
@click.option("--patch-lr-z", type=int, default=8, help="LR slices per patch (HR depth = this x factor).")
@click.option("--hf-weight", type=float, default=0.5, help="Weight of the gradient (high-frequency) loss.")
@click.option("--supervised", type=VOLUME, default=None, metavar="GT.zarr",
              help="Train on ground truth instead (the supervised upper bound); PSEUDO_HR is then ignored.")
@_train_options
def train_dgean_cmd(hr_volume: Location, factor: int, out: Path, mode: str, preset: str, patch_xy: int,
                    patch_lr_z: int, hf_weight: float, supervised: Location | None, steps: int, batch_size: int,
                    learning_rate: float | None, ema: float, checkpoint_every: int, val_every: int, seed: int,
                    device: str | None, loader_workers: int | None, scheduler: str | None, resume: bool,
                    overwrite: bool) -> None:
    """Stage III: train DGEAN on the pseudo-HR volume (degraded along z -> original)."""
    from .stages.train import DGEANTrainConfig, train_dgean

    tcfg = _train_config(steps, batch_size, learning_rate, ema, checkpoint_every, val_every, seed, device,
                         loader_workers)
    dcfg = DGEANTrainConfig(factor=factor, mode=mode, preset=preset, patch_xy=patch_xy, patch_lr_z=patch_lr_z,
                            hf_weight=hf_weight, supervised=supervised is not None)
    summary = _train(train_dgean, scheduler, supervised or hr_volume, out, dcfg, tcfg, resume=resume,
                     overwrite=overwrite)
    click.echo(f"DGEAN saved to {out} ({summary['steps']} steps, {summary['seconds']:.0f} s)")
    _echo_self_check("dgean", summary.get("self_check"))


def _deprecated_option(old: str, new: str, old_value: Any, value: Any) -> Any:
    """``old_value`` if the deprecated option ``old`` was given (with a note on stderr), else ``value``."""
    if old_value is None:
        return value
    click.echo(f"d2r: {old} is deprecated and will be removed; use {new}", err=True)
    return old_value


def _at_least(minimum: int, **values: int | tuple[int, ...] | None) -> None:
    """Refuse an option (or any of its values) below ``minimum`` (None: not given), named as on the command line."""
    from .errors import InputError

    for name, value in values.items():
        if value is not None and min(value if isinstance(value, tuple) else (value,)) < minimum:
            got = " ".join(map(str, value)) if isinstance(value, tuple) else value
            raise InputError(f"--{name.replace('_', '-')} must be >= {minimum}"
                             f"{' along every axis' if isinstance(value, tuple) else ''} (got {got})")


def _check_blockwise(kind: str, lr_volume: Location, output: Location, model: Path, roi: tuple[int, ...] | None,
                     block: tuple[int, int, int], halo: tuple[int, int, int] | None, group: int | None = None) -> None:
    """Stage II/IV arguments checked before a cluster starts: the input opens, the model is of
    ``kind``, the output is none of the inputs, and the blocks obey the engine's rules."""
    from .blockwise.layout import Layout
    from .io.geometry import region_of
    from .io.volume import check_output_path, open_volume
    from .models.checkpoint import read_dgean_config, read_restorer_config

    lr = open_volume(lr_volume)
    region = region_of(roi, lr.shape, "--roi")
    if kind == "restorer":
        from .stages.restore import stage2_layout

        config = read_restorer_config(model)[-1]
        stage2_layout(lr.shape, region, block=block, halo=halo or (0, 0, 0), factor=config["factor"])
    else:
        from .models.dgean import receptive_field

        cfg, _ = read_dgean_config(model)
        Layout(roi=region, block=block, halo=receptive_field(cfg), scale=(cfg.factor, 1, 1), group=group or 1)
    check_output_path(output, [lr_volume, model])


def _roi(roi: tuple[int, ...] | None) -> Any:
    from .io.geometry import Box

    return None if roi is None else Box(tuple(roi[:3]), tuple(roi[3:]))


roi_option = click.option("--roi", nargs=6, type=int, default=None, metavar="Z0 Y0 X0 Z1 Y1 X1",
                          help="Process only this LR region (voxel indices, end exclusive).")


@cli.command()
@click.argument("lr_volume", type=VOLUME)
@click.argument("output", type=VOLUME, metavar="PSEUDO_HR")
@click.option("--model", type=LOCAL, required=True, help="Stage I checkpoint folder.")
@roi_option
@click.option("--block", nargs=3, type=int, default=(128, 256, 256), metavar="Z Y X",
              help="LR tile shape (cut to the region; each slice is restored once per tile of its plane).")
@click.option("--halo", nargs=3, type=int, default=(4, 16, 16), metavar="Z Y X",
              help="LR voxels each tile reads beyond its block; tiles are blended over twice this "
                   "(none along an axis the region fits in one block).")
@click.option("--overlap", nargs=3, type=int, default=None, hidden=True, help="Deprecated name of --halo.")
@click.option("--sampler", type=click.Choice(["sde", "ddim", "posterior"]), default=None,
              help="Override the model's sampler.")
@click.option("--steps", type=int, default=None, help="Override the sampler's network evaluations.")
@click.option("--seed", type=int, default=0)
@click.option("--slice-batch", type=int, default=64, help="Slices per forward pass of the restorer.")
@click.option("--batch", type=int, default=None, hidden=True, help="Deprecated name of --slice-batch.")
@click.option("--flip", "flips", type=click.Choice(["z", "lateral"]), multiple=True,
              help="Also restore each slice flipped along this axis and average (repeatable; each doubles "
                   "the work).")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the network (GPU).")
@cluster_options
@_levels_option
@_overwrite_option
def restore(lr_volume: Location, output: Location, model: Path, roi: tuple[int, ...] | None,
            block: tuple[int, int, int], halo: tuple[int, int, int], overlap: tuple[int, int, int] | None,
            sampler: str | None, steps: int | None, seed: int, slice_batch: int, batch: int | None,
            flips: tuple[str, ...], compile_: bool, scheduler: str | None, workers: int | None, serial: bool,
            levels: int, overwrite: bool) -> None:
    """Stage II: restore every XZ and YZ slice of LR_VOLUME and fuse them (pseudo-HR)."""
    from .stages.restore import restore as run_restore

    halo = _deprecated_option("--overlap", "--halo", overlap, halo)
    slice_batch = _deprecated_option("--batch", "--slice-batch", batch, slice_batch)
    _at_least(1, slice_batch=slice_batch, steps=steps, block=tuple(block))
    _at_least(0, halo=tuple(halo))
    _check_blockwise("restorer", lr_volume, output, model, roi, block, halo)

    with _client(scheduler, workers, serial) as client:
        run_restore(lr_volume, output, model, roi=_roi(roi), block=block, halo=halo, sampler=sampler,
                    steps=steps, seed=seed, slice_batch=slice_batch, flips=flips, compile=compile_, client=client,
                    serial=serial, overwrite=overwrite, levels=levels)
    click.echo(f"wrote {output}")


@cli.command()
@click.argument("lr_volume", type=VOLUME)
@click.argument("output", type=VOLUME, metavar="SR")
@click.option("--model", type=LOCAL, required=True, help="Stage III checkpoint folder.")
@roi_option
@click.option("--block", nargs=3, type=int, default=None, metavar="Z Y X",
              help="LR block shape [default: sized to the device's memory and the network's halo].")
@click.option("--group", type=int, default=None,
              help="Blocks per task, run as one batch on the device [default: small blocks grouped so a task "
                   "holds ~32 M voxels, streamed to the device a block at a time].")
@click.option("--batch", type=int, default=None, hidden=True, help="Deprecated name of --group.")
@click.option("--tta", is_flag=True, help="Average the 8 xy flips/rotations (8x slower).")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the network (GPU).")
@cluster_options
@_levels_option
@_overwrite_option
def infer(lr_volume: Location, output: Location, model: Path, roi: tuple[int, ...] | None, block: tuple[int, int, int],
          group: int | None, batch: int | None, tta: bool, compile_: bool, scheduler: str | None, workers: int | None,
          serial: bool, levels: int, overwrite: bool) -> None:
    """Stage IV: super-resolve LR_VOLUME with DGEAN, blockwise (exact halo, crop mode)."""
    from .stages.infer import infer as run_infer

    group = _deprecated_option("--batch", "--group", batch, group)
    if block is None:
        from .io.volume import open_volume
        from .models.checkpoint import read_dgean_config
        from .stages.sizing import device_info, infer_block

        sized = infer_block(open_volume(lr_volume).shape, read_dgean_config(model)[0], device_info(None), tta=tta)
        block = tuple(sized["block"])  # type: ignore[assignment]
        click.echo(f"block {block} (halo overhead {sized['halo_overhead']:.2f}x)", err=True)
    _at_least(1, group=group, block=tuple(block))
    _check_blockwise("dgean", lr_volume, output, model, roi, block, None, group)

    with _client(scheduler, workers, serial) as client:
        run_infer(lr_volume, output, model, roi=_roi(roi), block=block, group=group, tta=tta, compile=compile_,
                  client=client, serial=serial, overwrite=overwrite, levels=levels)
    click.echo(f"wrote {output}")


def _run_overrides(factor: int | None, mode: str | None, seed: int | None, device: str | None,
                   restorer_steps: int | None, dgean_steps: int | None, restorer_preset: str | None,
                   dgean_preset: str | None, roi: tuple[int, ...] | None, tta: bool) -> dict[str, Any]:
    return {
        "factor": factor, "mode": mode, "seed": seed, "device": device,
        "restorer": {"steps": restorer_steps, "preset": restorer_preset},
        "restore": {"roi": list(roi) if roi else None},
        "dgean": {"steps": dgean_steps, "preset": dgean_preset},
        "infer": {"tta": tta or None},
    }


@cli.command()
@click.argument("lr_volume", type=VOLUME)
@click.argument("output", type=VOLUME, metavar="SR")
@click.option("--factor", "-s", type=int, default=None, help="Axial factor s (required unless in --config).")
@click.option("--mode", type=click.Choice(["decimate", "mean"]), default=None,
              help="How z was acquired [default: decimate].")
@click.option("--config", "config_file", type=LOCAL, default=None,
              help="YAML/TOML file with any option of `d2r config show`; flags override it.")
@click.option("--workdir", type=LOCAL, default=None,
              help="Stage artifacts and run.json, on a file system [default: SR name + .d2r-work, next to SR; "
                   "in the current folder if SR is on an object store].")
@click.option("--restorer-steps", type=int, default=None, help="Stage I training steps [default: by device].")
@click.option("--dgean-steps", type=int, default=None,
              help="Stage III training steps [default: by device; on a CPU also by factor].")
@click.option("--restorer-preset", type=click.Choice(["auto", "tiny", "small", "full"]), default=None,
              help="Restorer size [default: auto: tiny on a CPU, full on a GPU].")
@click.option("--dgean-preset", type=click.Choice(["auto", "tiny", "small", "medium", "base", "full"]), default=None,
              help="DGEAN size [default: auto: medium on a CPU, full on a GPU].")
@roi_option
@click.option("--tta", is_flag=True, help="Stage IV test-time averaging (8x slower).")
@click.option("--seed", type=int, default=None)
@click.option("--device", default=None,
              help="Training device [default: a GPU if present; with --scheduler, on the worker that trains].")
@_LOADER_WORKERS
@click.option("--dry-run", is_flag=True,
              help="Check every argument, print the plan (stages, blocks, network evaluations) and stop.")
@cluster_options
@_levels_option
@_overwrite_option
def run(lr_volume: Location, output: Location, factor: int | None, mode: str | None, config_file: Path | None,
        workdir: Path | None, restorer_steps: int | None, dgean_steps: int | None, restorer_preset: str | None,
        dgean_preset: str | None, roi: tuple[int, ...] | None, tta: bool, seed: int | None, device: str | None,
        loader_workers: int | None, dry_run: bool, scheduler: str | None, workers: int | None, serial: bool,
        levels: int, overwrite: bool) -> None:
    """Run Stages I-IV on LR_VOLUME and write SR; a rerun resumes where it stopped.

    \b
    Stage I   train the diffusion restorer on XY patches of LR_VOLUME
    Stage II  restore XZ/YZ slices of (a region of) LR_VOLUME -> pseudo-HR
    Stage III train DGEAN on the pseudo-HR degraded along z
    Stage IV  DGEAN over all of LR_VOLUME, blockwise -> SR

    Stages II and IV run on the cluster. With --scheduler, Stages I and III train on one of
    its workers (a GPU one if any) rather than in this process, so the work directory must
    be on a filesystem the workers share; without it they train in this process.
    """
    from .errors import InputError
    from .stages.config import RunConfig, load_config_file, merge
    from .stages.pipeline import check_run, plan, resolve_run, run as run_pipeline

    base = load_config_file(config_file) if config_file else {}
    merged = merge(base, _run_overrides(factor, mode, seed, device, restorer_steps, dgean_steps,
                                        restorer_preset, dgean_preset, roi, tta))
    if "factor" not in merged:
        raise InputError("the axial factor is missing: give --factor (or factor: in --config)")
    cfg = RunConfig.from_dict(merged)
    remote = scheduler is not None and not serial
    _at_least(0, loader_workers=loader_workers)
    check_run(lr_volume, output, cfg, workdir=workdir, overwrite=overwrite, device_here=not remote)  # before any work
    _check_cluster(scheduler, workers, serial)
    if dry_run:  # the plan of the run that would go on: a resume keeps what `auto` resolved to
        click.echo(json.dumps(plan(lr_volume, resolve_run(cfg, cfg.device, workdir, output, overwrite=overwrite)),
                              indent=2, default=str))
        return
    with _client(scheduler, workers, serial) as client:
        record = run_pipeline(lr_volume, output, cfg, workdir=workdir, client=client, serial=serial,
                              overwrite=overwrite, levels=levels, train_on_cluster=remote,
                              loader_workers=loader_workers)
    for name, entry in record["stages"].items():
        click.echo(f"  {name:10s} {entry['status']:8s} {entry['seconds']:8.1f} s")
    for name in ("restorer", "dgean"):
        _echo_self_check(name, record["stages"].get(name, {}).get("self_check"))
    click.echo(f"wrote {output}")


@cli.group()
def config() -> None:
    """Run configuration files for `d2r run --config`."""


@config.command("show")
@click.option("--factor", "-s", type=int, default=4, help="Factor to put in the template.")
@click.option("--format", "fmt", type=click.Choice(["yaml", "json"]), default="yaml")
def config_show(factor: int, fmt: str) -> None:
    """Print every option of `d2r run` with its default."""
    from .stages.config import config_template

    data = config_template(factor)
    if fmt == "json":
        click.echo(json.dumps(data, indent=2))
    else:
        import yaml

        click.echo(yaml.safe_dump(data, sort_keys=False))


@cli.command()
@click.argument("result", type=VOLUME, metavar="SR")
@click.argument("gt", type=VOLUME)
@click.option("--lr", "lr_path", type=VOLUME, default=None,
              help="The LR input: also score its nearest/linear/cubic z-interpolation.")
@click.option("--pseudo-hr", type=VOLUME, default=None, help="Also score Stage II's pseudo-HR.")
@click.option("--also", multiple=True, metavar="NAME=PATH", help="More results to score (repeatable).")
@click.option("--factor", "-s", type=int, default=None, help="Axial factor [default: from the volumes' metadata].")
@click.option("--mode", type=click.Choice(["decimate", "mean"]), default=None)
@click.option("--out", type=LOCAL, default=None,
              help="Report folder [default: SR name + .report next to SR; in the current folder if SR is "
                   "on an object store].")
@click.option("--slab", type=int, default=16, help="y-slices read at a time (memory).")
def evaluate(result: Location, gt: Location, lr_path: Location | None, pseudo_hr: Location | None,
             also: tuple[str, ...], factor: int | None, mode: str | None, out: Path | None, slab: int) -> None:
    """Score SR against the ground truth GT: PSNR, SSIM per orientation, z-resolution (FRC).

    Writes metrics.json, report.md and figures; works blockwise on large volumes.
    """
    from .evaluation.evaluate import evaluate as run_evaluate
    from .io import stores
    from .io.stores import location
    from .io.volume import check_output_path

    candidates: dict[str, Any] = {"sr": result}
    if pseudo_hr:
        candidates["pseudo_hr"] = pseudo_hr
    for item in also:
        name, sep, path = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r}: use NAME=PATH", param_hint="--also")
        candidates[name] = location(path)
    if out is None:
        report = stores.name(result).removesuffix(".zarr") + ".report"
        out = result.with_name(report) if isinstance(result, Path) else Path(report)

    check_output_path(out, [gt, lr_path, *candidates.values()], containing=False)
    run_evaluate(gt, candidates, lr_path=lr_path, factor=factor, mode=mode, out_dir=out, slab=slab,
                 interpolations=("nearest", "linear", "cubic"))
    click.echo((out / "report.md").read_text())
    click.echo(f"report: {out / 'report.md'}")


@cli.command()
@click.option("--out", type=LOCAL, default=Path("d2r-demo"), help="Demo folder.")
@click.option("--input", "input_path", type=VOLUME, default=None,
              help="Use this isotropic stack as ground truth instead of synthetic data.")
@voxel_size_option
@click.option("--factor", "-s", type=int, default=4, help="Axial factor to simulate.")
@click.option("--quick", is_flag=True, help="A one-minute smoke run (far too short to learn anything).")
@cluster_options
@_overwrite_option
def demo(out: Path, input_path: Location | None, voxel_size: tuple[float, float, float] | None, factor: int,
         quick: bool, scheduler: str | None, workers: int | None, serial: bool, overwrite: bool) -> None:
    """The whole pipeline on synthetic (or given) data, evaluated: a few minutes on 2 CPU cores."""
    from .demo import demo as run_demo

    with _client(scheduler, workers, serial) as client:
        summary = run_demo(out, input_path=input_path, voxel_size=voxel_size, factor=factor, quick=quick,
                           client=client, train_on_cluster=scheduler is not None and not serial, serial=serial,
                           overwrite=overwrite)
    click.echo(Path(summary["report"]).read_text())
    click.echo(f"done in {summary['seconds']:.0f} s; report: {summary['report']}")


def _fmt3(v: Any) -> str:
    return " x ".join(f"{float(x):g}" for x in v)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def main() -> None:
    """Entry point of the ``d2r`` console script."""
    cli()
