"""The ``d2r`` command line: a thin click layer over the Python API.

Each command parses its options, calls one API function and prints a result.
Errors caused by the input (:class:`~d2r_dask.errors.D2RError`) are printed as
one line without a traceback, with exit status 1.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import click

from . import __version__
from .errors import D2RError


class D2RGroup(click.Group):
    """A click group that turns user errors into one-line messages."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except D2RError as exc:
            raise click.ClickException(str(exc)) from None


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
@click.argument("output", type=click.Path(path_type=Path))
@voxel_size_option
@click.option("--translation", nargs=3, type=float, default=(0.0, 0.0, 0.0), metavar="Z Y X",
              help="Physical origin in nm.")
@click.option("--chunks", nargs=3, type=int, default=None, metavar="Z Y X",
              help="Output chunk shape [default: ~128 per axis].")
@click.option("--compression", type=click.Choice(["zstd", "blosc", "none"]), default="zstd")
@_levels_option
@_overwrite_option
def convert(input_path: str, output: Path, voxel_size: tuple[float, float, float] | None,
            translation: tuple[float, float, float], chunks: tuple[int, int, int] | None,
            compression: str, levels: int, overwrite: bool) -> None:
    """Convert a stack to OME-Zarr in bounded memory.

    INPUT is a multi-page TIFF, a folder of PNG/TIFF slices, FILE.h5:DATASET,
    a .npy file or a Zarr volume.
    """
    from .convert import convert as run_convert

    run_convert(input_path, output, voxel_size=voxel_size, translation=translation, chunks=chunks,
                levels=levels, overwrite=overwrite, compression=compression, progress=True)
    click.echo(f"wrote {output}")


@cli.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def info(store: Path, as_json: bool) -> None:
    """Describe a volume: shape, dtype, chunks, voxel size, size on disk, intensities."""
    from .volume import describe

    d = describe(store)
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    s = d["intensity_sample"]
    ratio = d["uncompressed_bytes"] / max(d["size_on_disk_bytes"], 1)
    click.echo(
        f"{d['path']}  (OME-Zarr {d['ngff_version'] or '-, plain Zarr array'})\n"
        f"  shape (z,y,x)   {d['shape']}  {d['dtype']}\n"
        f"  chunks          {d['chunks']}\n"
        f"  voxel size      {_fmt3(d['voxel_size_nm'])} nm\n"
        f"  translation     {_fmt3(d['translation_nm'])} nm\n"
        f"  levels          {len(d['levels']) or 1}\n"
        f"  on disk         {_human(d['size_on_disk_bytes'])} ({ratio:.1f}x compression)\n"
        f"  intensity       min {s['min']:g}  p1 {s['p1']:g}  mean {s['mean']:.4g}  "
        f"p99 {s['p99']:g}  max {s['max']:g}  std {s['std']:.4g}  ({s['slices']} slices sampled)"
    )


@cli.command()
@click.argument("gt", type=click.Path(path_type=Path))
@click.argument("output", type=click.Path(path_type=Path))
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
def degrade(gt: Path, output: Path, factor: int, mode: str, blur_sigma: float, noise: str | None,
            noise_level: float, seed: int, chunks: tuple[int, int, int] | None, levels: int,
            overwrite: bool) -> None:
    """Degrade an isotropic volume along z by FACTOR (makes an LR input from ground truth)."""
    from .degrade import AxialDegradation, degrade_volume
    from .volume import Geometry, open_volume, write_volume

    lr = degrade_volume(open_volume(gt), AxialDegradation(factor, mode, blur_sigma, noise, noise_level, seed))
    write_volume(output, lr.data, Geometry.of(lr), chunks=chunks, levels=levels, overwrite=overwrite,
                 inputs=[gt], name=output.stem, metadata={"degradation": lr.attrs["degradation"], "source": str(gt)})
    click.echo(f"wrote {output}  shape {lr.shape}  voxel size {_fmt3(lr.attrs['voxel_size'])} nm")


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
