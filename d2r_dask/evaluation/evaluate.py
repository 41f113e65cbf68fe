"""Score results against ground truth, blockwise, and write ``metrics.json`` + a Markdown report.

Every candidate (the SR volume, optionally the pseudo-HR, and interpolations of
the LR along z) is compared with the ground truth on the voxels they share
physically, reading y-slabs of both so memory is bounded by one slab whatever
the volume size. Per candidate: PSNR, SSIM per orientation (XY, XZ, YZ), the
Fourier ring correlation of XZ slices (full rings and the wedge around k_z,
whose 1/7 crossing is the resolution along z, in nm), and a downstream check
(agreement of membrane maps on a central crop), and, when the axial factor s is
known, stripes at the LR-slice period (``metrics.axial_periodicity``: spectral
peaks at k/s cycles/voxel along z, against the ground truth and against x). The report shows XY/XZ/YZ panels
of every candidate at the same crop and the FRC curves.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import InputError
from ..io.geometry import Box, Geometry, central_crop, check_factor, check_mode, sr_transform
from .selfcheck import read_self_check
from ..io.volume import d2r_metadata, open_volume, to_dtype
from .metrics import SSIM_WIN, MetricAccumulator, StripeAccumulator, boundary_agreement, boundary_map, interpolate_z

log = logging.getLogger(__name__)
INTERPOLATIONS = ("nearest", "linear", "cubic")


def overlap_box(geometry: Geometry, shape: Sequence[int], ref: Any, what: str) -> tuple[Box, Box]:
    """Index boxes of a volume (``geometry``, ``shape``) and of ``ref`` that cover the same voxels."""
    r = Geometry.of(ref)
    if not np.allclose(geometry.voxel_size, r.voxel_size, rtol=1e-4):
        raise InputError(
            f"{what} has voxel size {geometry.voxel_size} nm but the ground truth has {r.voxel_size} nm; "
            "compare volumes on the same grid"
        )
    offset = [(a - b) / v for a, b, v in zip(geometry.translation, r.translation, r.voxel_size)]
    if not np.allclose(offset, np.round(offset), atol=1e-3):
        raise InputError(f"{what} is not aligned to the ground truth's voxel grid (offset {offset} voxels)")
    off = [int(round(o)) for o in offset]
    start = [max(0, o) for o in off]
    stop = [min(n_ref, o + n) for o, n, n_ref in zip(off, shape, ref.shape)]
    if any(b <= a for a, b in zip(start, stop)):
        raise InputError(f"{what} and the ground truth do not overlap")
    ref_box = Box(tuple(start), tuple(stop))
    return ref_box.shift(off), ref_box


class _Stored:
    """A stored candidate, read by boxes of ground-truth indices (``offset`` = its index - GT's)."""

    def __init__(self, vol: Any, offset: Sequence[int]) -> None:
        self.vol, self.offset = vol, tuple(offset)

    def read(self, box: Box) -> np.ndarray:
        sl = box.shift(tuple(-o for o in self.offset)).slices
        return np.asarray(self.vol.data[sl].compute(scheduler="synchronous"))


class _Interpolated:
    """The LR volume upsampled along z (``metrics.interpolate_z``), read like :class:`_Stored`.

    Each read interpolates the full z-extent of the LR columns it needs (the cubic
    spline is global along z), then crops. Values are cast to the LR's dtype, as a
    stored interpolation (or the SR volume) would be.
    """

    def __init__(self, lr: Any, factor: int, mode: str, method: str, offset: Sequence[int]) -> None:
        self.lr, self.factor, self.mode, self.method, self.offset = lr, factor, mode, method, tuple(offset)

    def read(self, box: Box) -> np.ndarray:
        sl = box.shift(tuple(-o for o in self.offset)).slices
        cols = np.asarray(self.lr.data[:, sl[1], sl[2]].compute(scheduler="synchronous"))
        # stored like every result: in the LR's dtype (rounded, clipped)
        return to_dtype(interpolate_z(cols, self.factor, mode=self.mode, method=self.method)[sl[0]], cols.dtype)


def evaluate(
    gt_path: str | os.PathLike,
    candidates: Mapping[str, str | os.PathLike],
    *,
    lr_path: str | os.PathLike | None = None,
    factor: int | None = None,
    mode: str | None = None,
    out_dir: str | os.PathLike | None = None,
    slab: int = 16,
    interpolations: Sequence[str] = ("linear", "cubic"),
    report: bool = True,
) -> dict[str, Any]:
    """Score named candidate volumes (and z-interpolations of ``lr_path``) against ``gt_path``.

    ``factor``/``mode`` default to what the candidates' or LR's metadata record.
    A result written by a d2r model also has ``"self_check"``: that model's own verdict against
    interpolation on held-out patches during training (:mod:`.selfcheck`). Each result has ``"stripes"``: :meth:`metrics.StripeScore.to_dict` at that factor
    (``stripe_ratio_z``, ``stripe_vs_gt``, ``stripe_vs_xy``, per-frequency ratios), or
    None when the factor is unknown.
    Returns the metrics; with ``out_dir`` also writes ``metrics.json``, figures and
    ``report.md`` there.
    """
    gt = open_volume(gt_path)
    data_range = float(np.iinfo(gt.dtype).max) if np.issubdtype(gt.dtype, np.integer) else 1.0
    sources: dict[str, tuple[Any, Box]] = {}
    checks: dict[str, Any] = {}
    for name, path in candidates.items():
        vol = open_volume(path)
        vol_box, gt_box = overlap_box(Geometry.of(vol), vol.shape, gt, str(path))
        sources[name] = (_Stored(vol, np.subtract(vol_box.start, gt_box.start)), gt_box)
        meta = d2r_metadata(path)
        if meta.get("model"):  # the model that wrote it: its training self-check (no ground truth)
            checks[name] = read_self_check(meta["model"])
        factor = factor or meta.get("factor")
        mode = mode or meta.get("mode")
    if lr_path is not None:
        lr = open_volume(lr_path)
        deg = d2r_metadata(lr_path).get("degradation", {})
        factor = factor or deg.get("factor")
        mode = mode or deg.get("mode")
        if factor is None:
            raise InputError("give the axial factor (--factor) to interpolate the LR volume")
        factor, mode = check_factor(int(factor)), check_mode(mode or "decimate")
        sr_geom = Geometry(*sr_transform(lr.attrs["voxel_size"], lr.attrs["translation"], factor, mode))
        lr_box, gt_box = overlap_box(sr_geom, (lr.shape[0] * factor, *lr.shape[1:]), gt, "the LR interpolation")
        for method in interpolations:
            sources[method] = (_Interpolated(lr, factor, mode, method, np.subtract(lr_box.start, gt_box.start)),
                               gt_box)
    if not sources:
        raise InputError("nothing to evaluate: give a result volume and/or --lr")
    for name, (_, gt_box) in sources.items():
        if min(gt_box.shape) < SSIM_WIN:  # checked here, before any scoring, to fail with the fix
            raise InputError(f"{name} covers only {gt_box.shape} voxels of the ground truth; SSIM needs at least "
                             f"{SSIM_WIN} along each axis: score a larger region")

    results: dict[str, Any] = {}
    for name, (reader, gt_box) in sources.items():
        log.info("scoring %s on GT region %s..%s", name, gt_box.start, gt_box.stop)
        results[name] = _score(reader, gt, gt_box, data_range, slab, None if factor is None else int(factor))
        r = results[name]
        r["self_check"] = checks.get(name)
        log.info("%s: PSNR %.2f dB, SSIM xy/xz/yz %.3f/%.3f/%.3f, z-resolution %.1f nm, stripes vs GT %s", name,
                 r["psnr"], r["ssim"]["xy"], r["ssim"]["xz"], r["ssim"]["yz"], r["z_resolution_nm"],
                 "n/a" if r["stripes"] is None else f"{r['stripes']['stripe_vs_gt']:.2f}")
    summary = {"ground_truth": str(gt_path), "factor": factor, "mode": mode, "data_range": data_range,
               "voxel_size_nm": gt.attrs["voxel_size"], "results": results}
    if out_dir is not None:
        from .report import write_report

        write_report(Path(out_dir), summary, gt, sources, make_figures=report)
    return summary


def _score(reader: Any, gt: Any, gt_box: Box, data_range: float, slab: int, factor: int | None) -> dict[str, Any]:
    acc = MetricAccumulator(data_range=data_range, voxel_size_nm=gt.attrs["voxel_size"])
    stripes = None if factor is None else StripeAccumulator(factor)  # same slabs: each spans all of z and x
    (z0, y0, x0), (z1, y1, x1) = gt_box.start, gt_box.stop
    for y in range(y0, y1, slab):
        box = Box((z0, y, x0), (z1, min(y + slab, y1), x1))
        pred = reader.read(box).astype(np.float64)
        target = np.asarray(gt.data[box.slices].compute(scheduler="synchronous"), dtype=np.float64)
        if np.issubdtype(gt.dtype, np.integer):
            pred = np.clip(pred, 0, data_range)
        acc.update(pred, target, axis=1)
        if stripes is not None:
            stripes.update(pred, target, axis=1)
    rep = acc.result()
    crop = central_crop(gt_box, (48, 192, 192))
    pred_c = reader.read(crop).astype(np.float32)
    gt_c = np.asarray(gt.data[crop.slices].compute(scheduler="synchronous"), dtype=np.float32)
    return {
        "region": [list(gt_box.start), list(gt_box.stop)],
        "psnr": rep.psnr,
        "ssim": dict(rep.ssim),
        "z_resolution_nm": rep.frc.resolution("z"),
        "xz_ring_resolution_nm": rep.frc.resolution("ring"),
        "x_resolution_nm": rep.frc.resolution("x"),
        "boundary_dice": boundary_agreement(boundary_map(pred_c), boundary_map(gt_c)),
        "frc_xz": rep.frc.to_dict(),
        "stripes": None if stripes is None else stripes.result().to_dict(),
    }
