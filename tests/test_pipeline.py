"""``d2r run``: the plan, a run end to end, its record, configuration files, and resuming after
a ``kill -9`` in any of the four stages (bit-identical to an uninterrupted run).

The kill tests run the pipeline in a subprocess that pauses right after the stage of interest
has written its first partial result (a training checkpoint, a finished block), so the kill
always lands mid-stage; the test SIGKILLs it there, reruns in this process and compares with
one uninterrupted reference run shared by the module. To stay affordable, the killed run's
workdir starts with the stages before the one killed as the reference finished them (the
subprocess skips them by the same checks any rerun uses).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
import yaml
from conftest import assert_cli_error, assert_cli_ok
from d2r_testkit import one_torch_thread, synth_array, write  # noqa: F401  (autouse fixture)

from d2r_dask.blockwise import scheduler
from d2r_dask.stages import train as train_mod
from d2r_dask.errors import InputError, ResumeMismatchError
from d2r_dask.stages.config import (
    AUTO,
    DGEANStage,
    InferStage,
    RestorerStage,
    RestoreStage,
    RunConfig,
    config_template,
    load_config_file,
    resolve_auto,
    upgrade_config,
)
from d2r_dask.stages.pipeline import STAGES, default_workdir, plan, run
from d2r_dask.models.dgean import dgean_config, receptive_field
from d2r_dask.io.volume import is_complete, open_volume

S = 4
VOXEL, ORIGIN = (40.0, 5.0, 5.0), (100.0, 20.0, -10.0)


def tiny_config(**overrides: Any) -> RunConfig:
    """Every stage at its smallest: 2 Stage II tiles and 2 Stage IV blocks, so both
    blockwise stages can be caught half done."""
    return replace(RunConfig(
        factor=S,
        restorer=RestorerStage(patch=32, steps=4, batch_size=2, sampler_steps=2),
        restore=RestoreStage(max_roi=(8, 32, 32), block=(8, 16, 32), halo=(2, 4, 4)),
        dgean=DGEANStage(patch_xy=16, patch_lr_z=3, steps=4, batch_size=2),
        infer=InferStage(block=(8, 16, 32)),
    ), **overrides)


RUN = {"serial": True, "progress": False, "levels": 1}


@pytest.fixture(scope="module")
def lr(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write(tmp_path_factory.mktemp("pipeline") / "lr.zarr", synth_array((8, 32, 32), seed=21), VOXEL, ORIGIN,
                 chunks=(4, 16, 16))


@pytest.fixture(scope="module")
def reference(lr: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One uninterrupted run of :func:`tiny_config` (in this process)."""
    out = tmp_path_factory.mktemp("reference") / "sr.zarr"
    record = run(lr, out, tiny_config(), **RUN)
    return {"out": out, "record": record, "sr": open_volume(out).values}


# --- plan and dry run -------------------------------------------------------------------------


def test_plan_counts_blocks_tiles_and_evaluations(tmp_path: Path) -> None:
    path = write(tmp_path / "lr.zarr", np.zeros((8, 40, 40), np.uint8), VOXEL, ORIGIN)
    cfg = replace(tiny_config(), restore=RestoreStage(max_roi=(8, 32, 32), block=(4, 16, 16), halo=(1, 4, 4),
                                                      flips=()), infer=InferStage(block=(4, 16, 16)))
    p = plan(path, cfg)
    assert p["input"]["shape"] == (8, 40, 40) and p["input"]["output_shape"] == (32, 40, 40)
    one, two, three, four = p["stages"]
    assert one["network_evaluations"] == 4 * 2 and one["patch"] == [32, 32]
    assert two["roi"] == [[0, 4, 4], [8, 36, 36]]  # centred, at most max_roi
    assert two["tiles"] == 2 * 2 * 2 and two["block"] == [4, 16, 16] and two["halo"] == [1, 4, 4]
    # each of the 32 XZ slices (one per y) once per tile of its plane (2 in z x 2 in x), over the
    # 6 x 24 LR voxels of a tile; the YZ slices likewise: not once per 3D tile that overlaps them
    assert two["slices"] == 2 * 32 * 4 and two["useful_slices"] == 64
    assert two["network_evaluations"] == 256 * 2
    assert two["pixel_evaluations"] == 256 * (6 * S) * 24 * 2
    assert two["useful_pixel_evaluations"] == 64 * (8 * S) * 32 * 2
    flipped = plan(path, replace(cfg, restore=replace(cfg.restore, flips=("z", "lateral"))))["stages"][1]
    assert flipped["flips"] == ["z", "lateral"] and flipped["network_evaluations"] == 4 * 256 * 2
    assert flipped["pixel_evaluations"] == 4 * two["pixel_evaluations"]
    whole = plan(path, replace(cfg, restore=RestoreStage(max_roi=(8, 32, 32), block=(8, 32, 32))))["stages"][1]
    assert whole["tiles"] == 1 and whole["halo"] == [0, 0, 0]  # one tile: nothing to blend, no halo
    assert whole["pixel_evaluations"] == whole["useful_pixel_evaluations"]
    assert three["network_evaluations"] == 4 * 2
    halo = list(receptive_field(dgean_config(resolve_auto(cfg).dgean.preset, S)))  # auto, as plan() resolves it
    assert four["blocks"] == 2 * 3 * 3 and four["halo"] == halo
    assert four["network_evaluations"] == 18
    sde = plan(path, replace(cfg, restorer=replace(cfg.restorer, sampler="sde")))["stages"][1]
    assert sde["network_evaluations"] == 256 * 2 and sde["sampler"] == "sde x2"  # the steps Stage II runs
    tta = plan(path, replace(cfg, infer=InferStage(block=(4, 16, 16), tta=True)))["stages"][3]
    assert tta["network_evaluations"] == 8 * 18 and tta["gflop"] == pytest.approx(8 * four["gflop"])


def test_dry_run_prints_the_plan_and_computes_nothing(tmp_path: Path, lr: Path, cli_run: Callable[..., Any]) -> None:
    out = tmp_path / "sr.zarr"
    result = cli_run("run", lr, out, "--factor", S, "--dry-run")
    assert_cli_ok(result)
    printed = json.loads(result.output)
    assert printed == json.loads(json.dumps(plan(lr, RunConfig(factor=S)), default=str))
    assert not out.exists() and not default_workdir(out).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# --- a run end to end --------------------------------------------------------------------------


def test_run_writes_sr_and_a_record(reference: dict[str, Any], lr: Path) -> None:
    out = reference["out"]
    sr = open_volume(out)
    assert sr.shape == (8 * S, 32, 32) and sr.dtype == np.uint8
    np.testing.assert_allclose(sr.attrs["voxel_size"], (VOXEL[0] / S, *VOXEL[1:]))
    np.testing.assert_allclose(sr.attrs["translation"], ORIGIN)  # decimate: SR slice k*s is LR slice k
    assert 10 < reference["sr"].mean() < 245 and reference["sr"].std() > 5
    record = json.loads((default_workdir(out) / "run.json").read_text())
    assert record == json.loads(json.dumps(reference["record"], default=str))
    assert record["finished"] is True
    assert record["config"] == resolve_auto(tiny_config(), "cpu").to_dict()  # presets resolved for the device
    assert record["input"] == str(lr.resolve()) and record["output"] == str(out.resolve())
    assert {"d2r_dask", "python", "torch", "dask", "zarr", "numpy"} <= set(record["versions"])
    assert record["versions"]["torch"] == torch.__version__
    assert list(record["stages"]) == list(STAGES)
    for name, entry in record["stages"].items():
        assert entry["status"] == "done", name
        assert entry["seconds"] > 0, name
    assert [s["stage"][:3] for s in record["plan"]["stages"]] == ["I t", "II ", "III", "IV "]
    work = default_workdir(out)
    assert is_complete(work / "pseudo_hr.zarr")
    assert json.loads((work / "restorer" / "config.json").read_text())["step"] == 4
    assert json.loads((work / "dgean" / "config.json").read_text())["step"] == 4


def test_run_with_a_client_trains_on_a_worker(reference: dict[str, Any], lr: Path, tmp_path: Path) -> None:
    """Asked to, Stages I and III train on a cluster worker (recorded in run.json), and the SR
    equals the serial run's bit for bit (two workers: one torch thread each, as here). Not
    asked, a local CPU cluster leaves training here (its workers have one thread each)."""
    from distributed import Client, LocalCluster

    from d2r_dask.stages.remote import trains_better_on_cluster

    out = tmp_path / "sr.zarr"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      memory_limit="2GiB") as cluster, Client(cluster) as client:
        assert not trains_better_on_cluster(client)
        record = run(lr, out, tiny_config(), client=client, train_on_cluster=True, progress=False, levels=1,
                     loader_workers=1)
        workers = set(client.scheduler_info()["workers"])
    for name in ("restorer", "dgean"):
        assert record["stages"][name]["worker"] in workers, name
        assert "worker" not in reference["record"]["stages"][name]  # the serial run trained here
    assert record["config"] == reference["record"]["config"]
    np.testing.assert_array_equal(open_volume(out).values, reference["sr"])


def test_training_goes_to_a_remote_or_gpu_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unasked, training goes to the cluster when its workers run on other hosts or a worker has a GPU."""
    from d2r_dask.stages import remote

    class FakeClient:
        def __init__(self, *addresses: str) -> None:
            self.workers = {a: {} for a in addresses}

        def scheduler_info(self, n_workers: int = 5) -> dict[str, Any]:
            return {"workers": self.workers}

    monkeypatch.setattr(remote, "training_worker", lambda client: ({}, "cpu"))
    assert remote.trains_better_on_cluster(FakeClient("tcp://10.255.0.7:40000"))
    assert not remote.trains_better_on_cluster(FakeClient("tcp://127.0.0.1:40000", "tcp://127.0.0.1:40001"))
    monkeypatch.setattr(remote, "training_worker", lambda client: ({"workers": ["tcp://127.0.0.1:40000"]}, "cuda"))
    assert remote.trains_better_on_cluster(FakeClient("tcp://127.0.0.1:40000"))


def test_rerun_with_another_config_is_refused(reference: dict[str, Any], lr: Path) -> None:
    record = default_workdir(reference["out"]) / "run.json"
    before = record.read_bytes()
    other = tiny_config(seed=1)
    with pytest.raises(ResumeMismatchError, match="seed"):
        run(lr, reference["out"], other, **RUN)
    with pytest.raises(ResumeMismatchError, match=r"restorer\.steps: 4 recorded, 5 given\); give the recorded values"):
        run(lr, reference["out"], replace(other, seed=0, restorer=replace(other.restorer, steps=5)), **RUN)
    assert record.read_bytes() == before


def test_finished_run_reruns_without_computing(reference: dict[str, Any], lr: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: Any, **kw: Any) -> None:
        raise AssertionError("a finished run computed something")

    monkeypatch.setattr(train_mod, "fit", forbidden)
    monkeypatch.setattr(scheduler, "run_group", forbidden)
    record = run(lr, reference["out"], tiny_config(), **RUN)
    assert {k: v["seconds"] for k, v in record["stages"].items()} == \
        {k: v["seconds"] for k, v in reference["record"]["stages"].items()}
    # what `auto` resolved to is recorded, and a resume keeps it, also after the table changed
    # (a new version) or on another device type: DGEAN's preset and steps left to auto here
    monkeypatch.setitem(AUTO["cpu"], "dgean", {**AUTO["cpu"]["dgean"], "preset": "small"})
    auto = tiny_config()
    record = run(lr, reference["out"], replace(auto, dgean=replace(auto.dgean, steps=None)), **RUN)
    assert record["config"] == reference["record"]["config"]


def test_dry_run_of_a_resume_plans_what_was_recorded(reference: dict[str, Any], lr: Path,
                                                     cli_run: Callable[..., Any]) -> None:
    """``--dry-run`` beside a recorded run plans its networks and steps, not the table's."""
    result = cli_run("run", lr, reference["out"], "--factor", S, "--dry-run")
    assert_cli_ok(result)
    stage3 = next(st for st in json.loads(result.output)["stages"] if st["stage"] == "III train DGEAN")
    recorded = reference["record"]["config"]["dgean"]["steps"]
    assert stage3["steps"] == recorded != resolve_auto(RunConfig(factor=S), "cpu").dgean.steps


# --- kill -9 in any stage ------------------------------------------------------------------------

_PAUSING_RUN = """
import json, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)  # as the test process: the same floating-point results
from d2r_dask.blockwise import scheduler
from d2r_dask.stages import pipeline, train
from d2r_dask.stages.config import RunConfig

lr, out, config, stage, flag = sys.argv[1:6]

def pause():  # the stage has a partial result on disk: wait here to be killed
    Path(flag).write_text("paused")
    time.sleep(600)

if stage in ("restorer", "dgean"):
    real_save = train.save_checkpoint
    def save(directory, **kw):
        real_save(directory, **kw)
        if Path(directory).name == stage:
            pause()
    train.save_checkpoint = save
else:
    real_group = scheduler.run_group
    target = "pseudo_hr.zarr" if stage == "pseudo_hr" else Path(out).name
    def group(job, phase, gid):
        n = real_group(job, phase, gid)
        if Path(job.output).name == target:
            pause()
        return n
    scheduler.run_group = group
pipeline.run(lr, out, RunConfig.from_dict(json.loads(config)), serial=True, progress=False, levels=1)
"""

ARTIFACTS = {"restorer": "restorer/weights.safetensors", "pseudo_hr": "pseudo_hr.zarr/zarr.json",
             "dgean": "dgean/weights.safetensors"}


def seed_workdir(reference: Path, out: Path, stage: str) -> None:
    """Give ``out``'s workdir the stages before ``stage`` as the reference run finished them,
    with their run.json entries, so the killed run starts at ``stage`` (each stage costs
    seconds; the subprocess still skips them by the same checks as any rerun)."""
    ref_work, work = default_workdir(reference), default_workdir(out)
    earlier = STAGES[:STAGES.index(stage)]
    work.mkdir(parents=True)
    for s in earlier:
        name = ARTIFACTS[s].split("/")[0]
        shutil.copytree(ref_work / name, work / name)
    record = json.loads((ref_work / "run.json").read_text())
    record["stages"] = {s: record["stages"][s] for s in earlier}
    record["output"] = str(out.resolve())  # "finished": true stays, as after deleting a finished run's outputs
    (work / "run.json").write_text(json.dumps(record))


def kill_mid_stage(tmp_path: Path, lr: Path, out: Path, cfg: RunConfig, stage: str, timeout: float = 120) -> None:
    script = tmp_path / "pausing_run.py"
    script.write_text(textwrap.dedent(_PAUSING_RUN))
    flag = tmp_path / "paused"
    proc = subprocess.Popen([sys.executable, str(script), str(lr), str(out), json.dumps(cfg.to_dict()), stage,
                             str(flag)], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while not flag.exists():
            assert proc.poll() is None, f"the run ended before reaching {stage}: {proc.stderr.read().decode()[-3000:]}"
            assert time.monotonic() < deadline, f"the run did not reach {stage} in {timeout} s"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()  # type: ignore[union-attr]


def resume_and_check(lr: Path, out: Path, cfg: RunConfig, stage: str, reference: np.ndarray,
                     monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Rerun after the kill; check that only the killed stage's rest and later stages ran."""
    work = default_workdir(out)
    killed_record = json.loads((work / "run.json").read_text())
    assert killed_record["finished"] is False
    killed = killed_record["stages"]
    earlier = list(STAGES[:STAGES.index(stage)])
    assert killed[stage]["status"] == "running"
    assert [k for k, v in killed.items() if v["status"] == "done"] == earlier
    mtimes = {s: (work / ARTIFACTS[s]).stat().st_mtime_ns for s in earlier}
    if stage in ("restorer", "dgean"):
        assert json.loads((work / stage / "config.json").read_text())["step"] == 1  # one checkpoint of 4
    else:
        partial = work / "pseudo_hr.zarr" if stage == "pseudo_hr" else out
        assert partial.exists() and not is_complete(partial)

    fits: list[dict[str, Any]] = []
    groups: Counter[str] = Counter()
    real_fit, real_group = train_mod.fit, scheduler.run_group

    def spy_fit(*args: Any, **kw: Any) -> dict[str, Any]:
        summary = real_fit(*args, **kw)
        fits.append(summary)
        return summary

    def spy_group(job: Any, phase: str, gid: int) -> int:
        groups[Path(job.output).name] += 1
        return real_group(job, phase, gid)

    monkeypatch.setattr(train_mod, "fit", spy_fit)
    monkeypatch.setattr(scheduler, "run_group", spy_group)
    record = run(lr, out, cfg, **RUN)

    assert record["finished"] is True
    assert all(v["status"] == "done" for v in record["stages"].values())
    for s in earlier:  # not recomputed
        assert record["stages"][s]["seconds"] == killed[s]["seconds"], s
        assert (work / ARTIFACTS[s]).stat().st_mtime_ns == mtimes[s], s
    trained = [Path(f["out"]).name for f in fits]
    assert trained == [s for s in ("restorer", "dgean") if STAGES.index(s) >= STAGES.index(stage)]
    if stage in ("restorer", "dgean"):
        assert fits[0]["started_at_step"] == 1, "training restarted instead of resuming"
    if stage == "pseudo_hr":  # 2 tiles + 2 merges fresh; the first tile was done before the kill
        assert groups["pseudo_hr.zarr"] == 3
    if STAGES.index(stage) <= STAGES.index("pseudo_hr"):
        assert groups["pseudo_hr.zarr"] > 0
    else:
        assert groups["pseudo_hr.zarr"] == 0
    assert groups[out.name] == (1 if stage == "sr" else 2)
    np.testing.assert_array_equal(open_volume(out).values, reference)
    return record


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_resume_after_kill_9_in_any_stage(stage: str, tmp_path: Path, lr: Path, reference: dict[str, Any],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "sr.zarr"
    cfg = tiny_config()
    seed_workdir(reference["out"], out, stage)
    kill_mid_stage(tmp_path, lr, out, cfg, stage)
    resume_and_check(lr, out, cfg, stage, reference["sr"], monkeypatch)


@pytest.mark.slow
@pytest.mark.realdata
def test_resume_after_kill_9_on_fib25_x4(tmp_path: Path, shared_data: Callable[[str], Path],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """fib25 (10 nm isotropic), a 32 x 64 x 64 crop decimated x4 along z, killed in Stage II."""
    from d2r_dask.io.convert import convert

    tif = shared_data("fib25_sample1_10nm.tif")
    gt = convert(tif, tmp_path / "gt.zarr", voxel_size=(10.0, 10.0, 10.0), levels=1)
    crop = open_volume(gt).values[100:132, 90:154, 90:154]
    lr = write(tmp_path / "lr.zarr", crop[::S], (10.0 * S, 10.0, 10.0), chunks=(8, 32, 32))
    cfg = tiny_config(restore=RestoreStage(max_roi=(8, 32, 32), block=(8, 16, 32), halo=(2, 4, 4)),
                      infer=InferStage(block=(8, 32, 64)))
    run(lr, tmp_path / "ref.zarr", cfg, **RUN)
    reference = open_volume(tmp_path / "ref.zarr").values
    out = tmp_path / "sr.zarr"
    seed_workdir(tmp_path / "ref.zarr", out, "pseudo_hr")
    kill_mid_stage(tmp_path, lr, out, cfg, "pseudo_hr")
    resume_and_check(lr, out, cfg, "pseudo_hr", reference, monkeypatch)
    assert reference.shape == (32, 64, 64)
    # decimation keeps LR slice k as HR slice k*s; the SR starts from a cubic fit through them
    assert np.abs(reference[::S].astype(float) - crop[::S]).mean() < 20


# --- configuration files ---------------------------------------------------------------------------

PARTIAL = {"factor": 8, "mode": "mean", "restorer": {"steps": 5, "preset": "small"},
           "restore": {"block": [8, 32, 32], "roi": [0, 0, 0, 4, 16, 16], "flips": ["lateral"]},
           "infer": {"tta": True}}


def test_config_files_yaml_and_toml(tmp_path: Path) -> None:
    expected = replace(RunConfig(factor=8, mode="mean"),
                       restorer=RestorerStage(steps=5, preset="small"),
                       restore=RestoreStage(block=(8, 32, 32), roi=(0, 0, 0, 4, 16, 16), flips=("lateral",)),
                       infer=InferStage(tta=True))
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(PARTIAL))
    (tmp_path / "run.toml").write_text(textwrap.dedent("""
        factor = 8
        mode = "mean"
        [restorer]
        steps = 5
        preset = "small"
        [restore]
        block = [8, 32, 32]
        roi = [0, 0, 0, 4, 16, 16]
        flips = ["lateral"]
        [infer]
        tta = true
    """))
    for name in ("run.yaml", "run.toml"):
        cfg = RunConfig.from_dict(load_config_file(tmp_path / name))
        assert cfg == expected, name
        assert cfg.restore.block == (8, 32, 32)  # a tuple, as the defaults: configs compare equal


@pytest.mark.parametrize("text, fragment", [
    ("factor: 4\nfactr: 8\n", "unknown config key 'factr'"),
    ("factor: 4\nrestorer:\n  stepz: 3\n", "stepz"),
    ("factor: 4\nrestorer: 5\n", "restorer"),
    ("factor: 4\nrestore:\n  block: 16\n", "block"),
    ("factor: 4\nrestore:\n  flips: [x]\n", "flips must be distinct values out of z, lateral"),
    ("factor: 4\ndgean:\n  steps: many\n", "steps"),
    ("factor: 4\ninfer:\n  block: [16, 128]\n", "block"),
    ("factor: 1\n", "factor"),
    ("factor: 4\nmode: slab\n", "mode"),
    ("- 4\n", "mapping"),
    ("factor: [4\n", "run.yaml"),
])
def test_bad_config_file_is_a_clear_error(text: str, fragment: str, tmp_path: Path,
                                          cli_run: Callable[..., Any], lr: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match=fragment):
        RunConfig.from_dict(load_config_file(path))
    result = cli_run("run", lr, tmp_path / "sr.zarr", "--config", path, "--dry-run")
    assert_cli_error(result, fragment)


def test_bad_toml_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text("factor = \n")
    with pytest.raises(InputError, match="run.toml"):
        load_config_file(path)
    with pytest.raises(InputError, match="no such config file"):
        load_config_file(tmp_path / "missing.yaml")


def test_renamed_config_keys_still_read_with_a_warning() -> None:
    """``restore.overlap``/``restore.batch``/``infer.batch`` were renamed ``halo``/``slice_batch``/``group``."""
    with pytest.warns(FutureWarning) as warned:
        cfg = RunConfig.from_dict({"factor": 4, "restore": {"overlap": [1, 2, 3], "batch": 8}, "infer": {"batch": 2}})
    assert sorted(str(w.message) for w in warned) == [
        f"config key {old} is deprecated and will be removed; use {new}"
        for old, new in [("infer.batch", "infer.group"), ("restore.batch", "restore.slice_batch"),
                         ("restore.overlap", "restore.halo")]]
    assert (cfg.restore.halo, cfg.restore.slice_batch, cfg.infer.group) == ((1, 2, 3), 8, 2)
    with pytest.warns(FutureWarning, match="use halo"):
        assert RestoreStage(overlap=(1, 2, 3)).halo == (1, 2, 3)
    with pytest.warns(FutureWarning, match="use group"):
        assert InferStage(batch=3) == InferStage(group=3)
    # a run recorded under the old names resumes: its stored config reads as today's
    old = RunConfig(factor=4).to_dict()
    old["restore"]["overlap"], old["restore"]["batch"] = old["restore"].pop("halo"), old["restore"].pop("slice_batch")
    old["infer"]["batch"] = old["infer"].pop("group")
    assert upgrade_config(old, warn=False) == RunConfig(factor=4).to_dict()


def test_config_show_is_the_template_and_a_valid_config(tmp_path: Path, lr: Path,
                                                        cli_run: Callable[..., Any]) -> None:
    result = cli_run("config", "show")
    assert_cli_ok(result)
    shown = yaml.safe_load(result.output)
    assert shown == config_template() == RunConfig(factor=4).to_dict()
    assert RunConfig.from_dict(shown) == RunConfig(factor=4)
    as_json = cli_run("config", "show", "--format", "json", "--factor", 8)
    assert json.loads(as_json.output) == config_template(8)
    # what it prints runs as a config file
    (tmp_path / "template.yaml").write_text(result.output)
    dry = cli_run("run", lr, tmp_path / "sr.zarr", "--config", tmp_path / "template.yaml", "--dry-run")
    assert_cli_ok(dry)
    assert json.loads(dry.output) == json.loads(json.dumps(plan(lr, RunConfig(factor=4)), default=str))


def test_cli_uses_one_name_per_concept(cli_run: Callable[..., Any]) -> None:
    """``--halo``/``--slice-batch`` (Stage II) and ``--group`` (Stage IV); the former names
    are hidden but still accepted."""
    restore_help, infer_help = cli_run("restore", "--help").output, cli_run("infer", "--help").output
    assert "--halo" in restore_help and "--slice-batch" in restore_help and "--group" in infer_help
    assert "--overlap" not in restore_help and "--batch " not in restore_help and "--batch " not in infer_help
    from d2r_dask.cli import cli

    params = {p.name for p in cli.commands["restore"].params} | {p.name for p in cli.commands["infer"].params}
    assert {"overlap", "batch"} <= params
