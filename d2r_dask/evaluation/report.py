"""The evaluation report: ``metrics.json``, XY/XZ/YZ panels at one crop, FRC curves, ``report.md``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..io.files import write_text
from ..io.geometry import Box, central_crop

ORDER = ("nearest", "linear", "cubic", "pseudo_hr", "sr", "supervised")


def _common_box(boxes: list[Box]) -> Box:
    start = tuple(max(b.start[i] for b in boxes) for i in range(3))
    stop = tuple(min(b.stop[i] for b in boxes) for i in range(3))
    return Box(start, tuple(max(a, b) for a, b in zip(start, stop)))


def _ordered(names: list[str]) -> list[str]:
    return sorted(names, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


def _stripes_cell(stripes: Mapping[str, Any] | None) -> str:
    """``vs GT / vs x`` of the stripe score, or ``n/a`` (factor unknown, or too short along z)."""
    if not stripes:
        return "n/a"
    vals = [stripes.get("stripe_vs_gt"), stripes.get("stripe_vs_xy")]
    if all(v is None or not np.isfinite(v) for v in vals):
        return "n/a"
    return " / ".join("n/a" if v is None or not np.isfinite(v) else f"{v:.2f}" for v in vals)


def write_report(out_dir: Path, summary: Mapping[str, Any], gt: Any, sources: Mapping[str, tuple[Any, Box]],
                 *, make_figures: bool = True) -> Path:
    """Write ``metrics.json``, ``panels.png``, ``frc.png`` and ``report.md`` into ``out_dir``."""

    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "metrics.json", json.dumps(summary, indent=2, default=float))
    names = _ordered(list(sources))
    figures = []
    if make_figures:
        from matplotlib.figure import Figure  # no pyplot: never touches the caller's backend

        common = _common_box([box for _, box in sources.values()])
        if min(common.shape) > 0:
            crop = central_crop(common, (96, 160, 160))
            views = {name: sources[name][0].read(crop).astype(np.float32) for name in names}
            views["ground truth"] = np.asarray(gt.data[crop.slices].compute(scheduler="synchronous"), np.float32)
            lo, hi = np.percentile(views["ground truth"], [0.5, 99.5])
            fig = Figure(figsize=(2.6 * len(views), 7.5))
            axes = fig.subplots(3, len(views), squeeze=False)
            for j, (name, v) in enumerate(views.items()):
                cz, cy, cx = (n // 2 for n in v.shape)
                for i, (img, label) in enumerate(((v[cz], "XY"), (v[:, cy], "XZ"), (v[:, :, cx], "YZ"))):
                    axes[i, j].imshow(img, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
                    axes[i, j].set_xticks([])
                    axes[i, j].set_yticks([])
                    if j == 0:
                        axes[i, j].set_ylabel(label)
                axes[0, j].set_title(name, fontsize=9)
            fig.suptitle(f"crop z {crop.start[0]}:{crop.stop[0]}, y {crop.start[1]}:{crop.stop[1]}, "
                         f"x {crop.start[2]}:{crop.stop[2]} of the ground truth", fontsize=8)
            fig.tight_layout()
            fig.savefig(out_dir / "panels.png", dpi=110)
            figures.append(("XY / XZ / YZ slices at the same crop", "panels.png"))
        fig = Figure(figsize=(6, 4))
        ax = fig.subplots()
        for name in names:
            frc = summary["results"][name]["frc_xz"]
            ax.plot(frc["freqs_per_nm"], frc["wedges"]["z"], label=name)
        ax.axhline(1 / 7, color="k", lw=0.8, ls="--", label="1/7")
        ax.set_xlabel("spatial frequency along z (1/nm)")
        ax.set_ylabel("FRC (XZ slices, k_z wedge)")
        ax.set_ylim(-0.1, 1.05)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "frc.png", dpi=110)
        figures.append(("Fourier ring correlation against the ground truth, along z", "frc.png"))
    lines = [
        "# d2r evaluation",
        "",
        f"Ground truth: `{summary['ground_truth']}` (voxel size {tuple(summary['voxel_size_nm'])} nm); "
        f"factor {summary['factor']}, mode {summary['mode']}.",
        "",
        "| result | PSNR (dB) | SSIM XY | SSIM XZ | SSIM YZ | z-resolution (nm, FRC 1/7) | membrane Dice "
        "| z-stripes (vs GT / vs x) | region (GT voxels) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        r = summary["results"][name]
        lines.append(
            f"| {name} | {r['psnr']:.2f} | {r['ssim']['xy']:.3f} | {r['ssim']['xz']:.3f} | {r['ssim']['yz']:.3f} "
            f"| {r['z_resolution_nm']:.1f} | {r['boundary_dice']:.3f} | {_stripes_cell(r.get('stripes'))} "
            f"| {r['region'][0]}..{r['region'][1]} |"
        )
    lines += ["", "z-stripes: spectral peak at the LR-slice period along z (k/s cycles/voxel) relative to the "
              "ground truth's / to the same result's along x; ~1 is none, above ~1.5 look for stripes in XZ/YZ "
              "(linear interpolation scores ~4); n/a without a factor or with under 4s slices."]
    checked = [n for n in names if summary["results"][n].get("self_check")]
    if checked:
        lines += ["", "## Self-check of the models (no ground truth)", "",
                  "Each model scored during training on held-out patches of its own input degraded like z, "
                  "next to the best interpolation of the same patches.", "",
                  "| result | model PSNR (dB) | interpolation PSNR (dB) | margin (dB) | model SSIM | "
                  "interpolation SSIM | verdict |", "|---|---|---|---|---|---|---|"]
        for name in checked:
            c = summary["results"][name]["self_check"]
            verdict = "beats interpolation" if c["beats_interpolation"] else "**does not beat interpolation**"
            lines.append(f"| {name} | {c['psnr']:.2f} | {c['psnr_interpolation']:.2f} ({c['interpolation']}) "
                         f"| {c['margin_db']:+.2f} | {c['ssim']:.3f} | {c['ssim_interpolation']:.3f} | {verdict} |")
    for caption, fname in figures:
        lines += ["", f"## {caption}", "", f"![{caption}]({fname})"]
    lines += ["", "Metrics are computed blockwise (y-slabs); the full numbers and FRC curves are in `metrics.json`.", ""]
    path = out_dir / "report.md"
    write_text(path, "\n".join(lines))
    return path
