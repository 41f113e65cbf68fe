"""Evaluation against ground truth: alignment by physical coordinates, blockwise numbers equal
to the one-shot metrics, the interpolation baselines, the report files and ``d2r evaluate``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from conftest import assert_cli_error, assert_cli_ok
from d2r_testkit import synth_array, write

from d2r_dask.io.volume import to_dtype
from d2r_dask.errors import InputError
from d2r_dask.evaluation.evaluate import evaluate
from d2r_dask.evaluation.metrics import interpolate_z, psnr, ssim

V = (10.0, 10.0, 10.0)
T0 = (50.0, -20.0, 30.0)
S = 4


@pytest.fixture(scope="module")
def gt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    data = synth_array((24, 36, 40), seed=31)
    return write(tmp_path_factory.mktemp("eval") / "gt.zarr", data, V, T0, chunks=(8, 16, 16)), data


def noisy(data: np.ndarray, seed: int = 0, sigma: float = 12.0) -> np.ndarray:
    g = np.random.default_rng(seed)
    return np.clip(np.rint(data + g.normal(0, sigma, data.shape)), 0, 255).astype(np.uint8)


def test_ground_truth_against_itself(gt: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    path, data = gt
    summary = evaluate(path, {"sr": path}, out_dir=tmp_path / "report")
    r = summary["results"]["sr"]
    assert r["psnr"] == math.inf
    assert r["ssim"] == {"xy": 1.0, "xz": 1.0, "yz": 1.0}
    assert r["region"] == [[0, 0, 0], list(data.shape)]
    assert r["boundary_dice"] == pytest.approx(1.0)
    saved = json.loads((tmp_path / "report" / "metrics.json").read_text())  # Infinity parses back
    assert saved["results"]["sr"]["psnr"] == math.inf
    assert "| sr | inf |" in (tmp_path / "report" / "report.md").read_text()


def test_blockwise_numbers_equal_one_shot_metrics(gt: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    path, data = gt
    pred = noisy(data)
    cand = write(tmp_path / "sr.zarr", pred, V, T0, chunks=(5, 7, 9))
    for slab in (5, 16, 64):  # uneven y-slabs, and one slab for all
        r = evaluate(path, {"sr": cand}, slab=slab, report=False)["results"]["sr"]
        assert r["psnr"] == pytest.approx(psnr(pred, data, data_range=255), rel=1e-9)
        for axis, plane in enumerate(("xy", "xz", "yz")):
            assert r["ssim"][plane] == pytest.approx(ssim(pred, data, data_range=255, axis=axis), rel=1e-9), plane
    assert 20 < r["psnr"] < 40 and r["ssim"]["xy"] < 0.99


@pytest.mark.parametrize("shift", [(3, 0, 0), (0, 5, -2), (-2, 4, 7)])
def test_candidates_are_aligned_by_physical_coordinates(shift: tuple[int, int, int], gt: tuple[Path, np.ndarray],
                                                        tmp_path: Path) -> None:
    """A result that covers part of the ground truth, placed by its translation, is compared
    with exactly the voxels it covers."""
    path, data = gt
    start = [max(0, s) for s in shift]
    stop = [min(n, n + s) for n, s in zip(data.shape, shift)]
    part = data[tuple(slice(a, b) for a, b in zip(start, stop))]
    here = tuple(t + a * v for t, a, v in zip(T0, start, V))
    placed = write(tmp_path / "placed.zarr", part, V, here)
    misplaced = write(tmp_path / "misplaced.zarr", part, V, T0)  # same data, but at the origin
    results = evaluate(path, {"placed": placed, "misplaced": misplaced}, report=False)["results"]
    assert results["placed"]["region"] == [start, stop]
    assert results["placed"]["psnr"] == math.inf
    assert results["misplaced"]["psnr"] < 30


def test_unaligned_or_disjoint_candidates_are_refused(gt: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    path, data = gt
    half = write(tmp_path / "half.zarr", data, V, (T0[0] + 5.0, *T0[1:]))
    with pytest.raises(InputError, match="not aligned"):
        evaluate(path, {"sr": half}, report=False)
    coarse = write(tmp_path / "coarse.zarr", data[::2], (20.0, 10.0, 10.0), T0)
    with pytest.raises(InputError, match="voxel size"):
        evaluate(path, {"sr": coarse}, report=False)
    far = write(tmp_path / "far.zarr", data, V, (T0[0] + 1000.0, *T0[1:]))
    with pytest.raises(InputError, match="do not overlap"):
        evaluate(path, {"sr": far}, report=False)
    with pytest.raises(InputError, match="nothing to evaluate"):
        evaluate(path, {}, report=False)


@pytest.mark.parametrize("mode", ["decimate", "mean"])
def test_interpolation_baselines(mode: str, gt: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    """The LR's z-interpolations, placed by the geometry rule, scored like stored results."""
    from d2r_dask.data.degrade import AxialDegradation, degrade_volume
    from d2r_dask.io.geometry import Geometry
    from d2r_dask.io.volume import open_volume, write_volume

    path, data = gt
    low = degrade_volume(open_volume(path), AxialDegradation(S, mode))
    lr = write_volume(tmp_path / "lr.zarr", low.data, Geometry.of(low),
                      metadata={"degradation": low.attrs["degradation"]})
    summary = evaluate(path, {}, lr_path=lr, interpolations=("nearest", "linear", "cubic"), report=False)
    assert summary["factor"] == S and summary["mode"] == mode  # from the LR's metadata
    lr_data = open_volume(lr).values
    for method in ("nearest", "linear", "cubic"):
        up = to_dtype(interpolate_z(lr_data, S, mode=mode, method=method), np.uint8)
        r = summary["results"][method]
        assert r["region"] == [[0, 0, 0], list(data.shape)]
        assert r["psnr"] == pytest.approx(psnr(up, data, data_range=255), rel=1e-9), method
    if mode == "decimate":  # the LR slices are GT slices k*s: nearest gets them exactly
        up = to_dtype(interpolate_z(lr_data, S, mode=mode, method="nearest"), np.uint8)
        np.testing.assert_array_equal(up[::S], data[::S])


def test_report_files_and_cli(gt: tuple[Path, np.ndarray], tmp_path: Path, cli_run: Callable[..., Any]) -> None:
    path, data = gt
    sr = write(tmp_path / "sr.zarr", noisy(data, seed=1), V, T0)
    lr = write(tmp_path / "lr.zarr", data[::S], (V[0] * S, V[1], V[2]), T0)
    also = write(tmp_path / "other.zarr", noisy(data, seed=2, sigma=30), V, T0)
    out = tmp_path / "report"
    result = cli_run("evaluate", sr, path, "--lr", lr, "--factor", S, "--also", f"worse={also}", "--out", out,
                     "--slab", 7)
    assert_cli_ok(result)
    assert f"report: {out / 'report.md'}" in result.output
    for name in ("report.md", "metrics.json", "panels.png", "frc.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for name in ("panels.png", "frc.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["results"]) == {"sr", "worse", "nearest", "linear", "cubic"}
    assert metrics["results"]["sr"]["psnr"] > metrics["results"]["worse"]["psnr"]
    report = (out / "report.md").read_text()
    for name in ("sr", "worse", "linear", "panels.png", "frc.png"):
        assert name in report
    assert sum(line.startswith("| ") for line in report.splitlines()) == 1 + 5  # header + one row each
    # user errors: one line, no traceback (a malformed option is a usage error, status 2)
    bad = cli_run("evaluate", sr, path, "--also", "broken")
    assert bad.exit_code == 2 and "NAME=PATH" in bad.output and "Traceback" not in bad.output
    assert_cli_error(cli_run("evaluate", tmp_path / "nope.zarr", path), "nope.zarr")


def test_candidate_thinner_than_the_ssim_window_is_refused(gt: tuple[Path, np.ndarray], tmp_path: Path,
                                                           cli_run: Callable[..., Any]) -> None:
    path, data = gt
    thin = write(tmp_path / "thin.zarr", data[:8], V, T0)
    with pytest.raises(InputError, match="SSIM needs at least 11"):
        evaluate(path, {"sr": thin}, report=False)
    assert_cli_error(cli_run("evaluate", thin, path, "--out", tmp_path / "r"), "score a larger region")
    assert not (tmp_path / "r").exists()


def test_stripes_at_the_lr_period_are_scored(gt: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    """``results[name]["stripes"]``: with the factor known, the LR-period stripe score per candidate,
    accumulated over the same y-slabs as the other metrics; None without a factor."""
    from d2r_dask.evaluation.metrics import axial_periodicity

    path, data = gt
    z = np.arange(data.shape[0])[:, None, None]
    striped = np.clip(np.rint(data * (1 + 0.15 * np.cos(2 * np.pi * z / S))), 0, 255).astype(np.uint8)
    cands = {"striped": write(tmp_path / "striped.zarr", striped, V, T0), "same": path}
    summary = evaluate(path, cands, factor=S, slab=7, out_dir=tmp_path / "report")
    res = summary["results"]
    st, same = res["striped"]["stripes"], res["same"]["stripes"]
    assert st["factor"] == S and st["freqs_per_voxel"] == [0.25, 0.5] and st["reason"] == ""
    assert st["stripe_vs_gt"] > 3 and st["stripe_vs_xy"] > 3 and st["stripe_ratio_z"] > 3, st
    assert same["stripe_vs_gt"] == pytest.approx(1.0, rel=1e-9)
    assert same["stripe_vs_xy"] < 1.5 < st["stripe_vs_xy"]
    whole = axial_periodicity(striped, S, reference=data).to_dict()  # slabs of 7 = the whole volume
    for key in ("stripe_ratio_z", "stripe_vs_gt", "stripe_vs_xy"):
        assert st[key] == pytest.approx(whole[key], rel=1e-9), key
    report = (tmp_path / "report" / "report.md").read_text()
    assert "z-stripes (vs GT / vs x)" in report and "z-stripes: spectral peak" in report
    assert f"| {st['stripe_vs_gt']:.2f} / {st['stripe_vs_xy']:.2f} |" in report
    assert "| 1.00 / " in report
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["results"]["striped"]["stripes"] == st
    # without a factor (none given, none in metadata) there is no stripe score
    assert evaluate(path, {"sr": path}, report=False)["results"]["sr"]["stripes"] is None
    # too short along z for the factor: NaN with the reason, the rest scored
    r = evaluate(path, {"sr": path}, factor=8, report=False)["results"]["sr"]
    assert math.isnan(r["stripes"]["stripe_vs_gt"]) and "too few" in r["stripes"]["reason"] and r["psnr"] == math.inf
