"""The self-check of a training run: does the model beat interpolation without ground truth?

Both trainers validate on held-out patches of their own input degraded like z (Stage I: XY
patches of the LR volume degraded along one axis; Stage III: pseudo-HR patches degraded along
z) and log, next to the model's PSNR/SSIM, those of interpolating the same patches
(``val_psnr_<method>``, ``val_ssim_<method>`` in ``metrics.csv``). :func:`self_check` turns
the last such row into a verdict that ``d2r run``, the CLI and the evaluation report show.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Mapping


def self_check(row: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A verdict from a validation row: does the model beat interpolation on held-out patches?

    ``row`` holds ``val_psnr``/``val_ssim`` of the model and ``val_psnr_<method>`` of each
    interpolation of the same degraded patches; the best interpolation is the bar.
    """
    if not row or "val_psnr" not in row:
        return None
    interp = {k[len("val_psnr_"):]: float(v) for k, v in row.items() if k.startswith("val_psnr_")}
    best = max(interp, key=interp.get)
    margin = float(row["val_psnr"]) - interp[best]
    return {"step": int(row["step"]), "psnr": float(row["val_psnr"]), "ssim": float(row.get("val_ssim", float("nan"))),
            "interpolation": best, "psnr_interpolation": interp[best],
            "ssim_interpolation": float(row.get(f"val_ssim_{best}", float("nan"))),
            "margin_db": margin, "beats_interpolation": bool(margin > 0)}


def _last_row(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    with path.open() as f:
        rows = list(csv.DictReader(f))
    return {k: float(v) for k, v in rows[-1].items() if v not in ("", None)} if rows else None


def read_self_check(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The self-check of a training folder's last validation (None before the first one)."""
    return self_check(_last_row(Path(folder) / "metrics.csv"))
