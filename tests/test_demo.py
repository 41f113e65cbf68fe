"""``d2r demo --quick``: the whole pipeline plus its evaluation on synthetic data, and a rerun
that resumes without computing anything."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from conftest import assert_cli_ok
from d2r_testkit import one_torch_thread  # noqa: F401  (autouse)

from d2r_dask.blockwise import scheduler
from d2r_dask.evaluation import evaluate as evaluate_mod
from d2r_dask.stages import train as train_mod
from d2r_dask.demo import QUICK_SHAPE
from d2r_dask.io.volume import open_volume

QUIET_MACHINE_BUDGET_S = 90


@pytest.mark.slow
def test_quick_demo_runs_and_reruns_without_computing(tmp_path: Path, cli_run: Callable[..., Any],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "demo"
    t0 = time.monotonic()
    result = cli_run("demo", "--quick", "--serial", "--out", out)
    seconds = time.monotonic() - t0
    assert_cli_ok(result)
    report = out / "report" / "report.md"
    assert f"report: {report}" in result.output
    print(f"d2r demo --quick --serial: {seconds:.0f} s (budget {QUIET_MACHINE_BUDGET_S} s on a quiet machine)")
    assert seconds < 3 * QUIET_MACHINE_BUDGET_S, "far over budget even for a loaded machine"
    text = report.read_text()
    for name in ("nearest", "linear", "cubic", "pseudo_hr", "sr"):
        assert f"| {name} |" in text
    for name in ("panels.png", "frc.png", "metrics.json"):
        assert (out / "report" / name).is_file()
    sr, gt = open_volume(out / "sr.zarr"), open_volume(out / "ground_truth.zarr")
    assert gt.shape == QUICK_SHAPE and sr.shape == gt.shape
    assert tuple(sr.attrs["voxel_size"]) == tuple(gt.attrs["voxel_size"])
    assert tuple(sr.attrs["translation"]) == tuple(gt.attrs["translation"])
    record = json.loads((out / "work" / "run.json").read_text())
    assert record["finished"] and all(s["status"] == "done" for s in record["stages"].values())

    def forbidden(*args: Any, **kw: Any) -> None:
        raise AssertionError("the rerun recomputed something")

    monkeypatch.setattr(train_mod, "fit", forbidden)
    monkeypatch.setattr(scheduler, "run_group", forbidden)
    monkeypatch.setattr(evaluate_mod, "evaluate", forbidden)
    t0 = time.monotonic()
    again = cli_run("demo", "--quick", "--serial", "--out", out)
    assert_cli_ok(again)
    assert time.monotonic() - t0 < 10
    assert f"report: {report}" in again.output
    assert report.read_text() == text
    rerun = json.loads((out / "work" / "run.json").read_text())
    assert rerun["stages"] == record["stages"]
