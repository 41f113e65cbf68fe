"""Training: what a run writes, checkpoint round trips, bit-exact resume, corrupt checkpoints,
and the patch pairs both trainers learn from.

Every run is tiny (32² XY patches, 12 x 16² 3D patches, 4-6 steps); the two trained models
that several tests read are trained once per session (``d2r_testkit.trained``).
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
import zarr
from conftest import assert_cli_error
from d2r_testkit import (
    dgean_checkpoint,
    one_torch_thread,  # noqa: F401  (autouse)
    restorer_checkpoint,
    synth_array,
    tiny_dgean_cfg,
    tiny_restorer_cfg,
    tiny_train,
    trained,
    write,
)

from d2r_dask.stages import train as train_mod
from d2r_dask.models.checkpoint import CONFIG, TRAIN_STATE, WEIGHTS, load_dgean, load_restorer, read_config, read_weights
from d2r_dask.data.degrade import degrade_along, upsample_axis
from d2r_dask.data.intensity import Intensity
from d2r_dask.errors import CheckpointError, InputError, OutputExistsError
from d2r_dask.data.patches import PatchSource, axial_pair, lateral_pair, step_rng
from d2r_dask.stages.train import train_dgean, train_restorer

KINDS = ("restorer", "dgean")
VAL_COLUMNS = {"restorer": ("val_psnr", "val_ssim", "val_psnr_linear", "val_psnr_cubic"),
               "dgean": ("val_psnr", "val_ssim", "val_psnr_linear", "val_ssim_linear")}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.getbasetemp()
    return {kind: trained(kind, base) for kind in KINDS}


def rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def train_run(kind: str, data: Path, out: Path, **kw: Any) -> dict[str, Any]:
    tcfg = tiny_train(**kw.pop("tcfg", {}))
    if kind == "restorer":
        return train_restorer(data, out, tiny_restorer_cfg(**kw.pop("cfg", {})), tcfg, progress=False, **kw)
    return train_dgean(data, out, tiny_dgean_cfg(**kw.pop("cfg", {})), tcfg, progress=False, **kw)


def training_data(kind: str, tmp_path: Path) -> Path:
    if kind == "restorer":
        return write(tmp_path / "lr.zarr", synth_array((12, 40, 40), seed=5))
    return write(tmp_path / "hr.zarr", synth_array((32, 32, 32), seed=6), voxel_size=(10.0, 10.0, 10.0))


# --- what a run writes ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_training_run_writes_checkpoint_metrics_and_panels(kind: str, models: dict[str, Path]) -> None:
    out = models[kind]
    for name in (WEIGHTS, CONFIG, TRAIN_STATE, "metrics.csv", "validation.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert not list(out.glob("*.tmp*")), "temporary files left behind"
    config = json.loads((out / CONFIG).read_text())
    assert config["kind"] == kind
    assert config["preset"] == "tiny"
    assert config["factor"] == 4 and config["mode"] == "decimate"
    low, high = config["intensity"]["low"], config["intensity"]["high"]  # robust percentiles of the volume
    assert 0.0 <= low < high <= 255.0 and high - low > 50
    assert config["step"] == 4 and config["train"]["steps"] == 4
    state = torch.load(out / TRAIN_STATE, weights_only=True)
    assert {"model", "ema", "optimizer", "scheduler", "step"} <= set(state) and state["step"] == 4
    assert (out / "validation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = rows(out / "metrics.csv")
    assert [int(r["step"]) for r in log] == [2, 4]
    psnr_col, ssim_col = VAL_COLUMNS[kind][:2]
    for r in log:
        assert np.isfinite(float(r["train_loss"])) and float(r["train_loss"]) >= 0
        assert 0 < float(r[psnr_col]) < 100
        assert -1 <= float(r[ssim_col]) <= 1


# --- checkpoint round trip --------------------------------------------------------------------


def _probe(kind: str, net: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if kind == "restorer":
            return net(torch.rand(2, 2, 32, 32, generator=g), torch.tensor([3, 70]))
        return net(torch.rand(1, 1, 4, 16, 16, generator=g))


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_round_trip_gives_the_ema_network(kind: str, models: dict[str, Path]) -> None:
    out = models[kind]
    if kind == "restorer":
        loaded, sde, config = load_restorer(out)
        assert sde.config.to_dict() == config["sde"]
    else:
        loaded, config = load_dgean(out)
    assert not loaded.training
    state = torch.load(out / TRAIN_STATE, weights_only=True)
    # the saved weights are the EMA's, not the raw model's
    assert all(torch.equal(v, state["ema"][k]) for k, v in read_weights(out).items())
    assert any(not torch.equal(state["ema"][k], state["model"][k]) for k in state["model"])
    ema = type(loaded)(loaded.cfg if kind == "dgean" else loaded.config)  # type: ignore[arg-type]
    ema.load_state_dict(state["ema"])
    ema.eval()
    assert torch.equal(_probe(kind, loaded), _probe(kind, ema))
    raw = type(loaded)(loaded.cfg if kind == "dgean" else loaded.config)  # type: ignore[arg-type]
    raw.load_state_dict(state["model"])
    assert not torch.equal(_probe(kind, loaded), _probe(kind, raw.eval()))


# --- resume -----------------------------------------------------------------------------------


def _tensors(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a nested state (optimiser moments included), by path."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    out: dict[str, torch.Tensor] = {}
    for k, v in items:
        out.update(_tensors(v, f"{prefix}/{k}"))
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_resume_after_a_crash_is_bit_identical(kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """6 steps straight vs a crash during step 4 (last checkpoint: step 2) and ``resume=True``.

    Validation every 3 steps and checkpoints every 2 put a logged row (step 3) between the
    checkpoint resumed from and the crash, so the resumed run must rewrite it identically.
    """
    data = training_data(kind, tmp_path)
    schedule = {"steps": 6, "checkpoint_every": 2, "val_every": 3}
    train_run(kind, data, tmp_path / "straight", tcfg=schedule)

    real_update = train_mod._ema_update
    calls = {"n": 0}

    def crash_in_step_4(*args: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("simulated crash")
        real_update(*args)

    monkeypatch.setattr(train_mod, "_ema_update", crash_in_step_4)
    with pytest.raises(KeyboardInterrupt):
        train_run(kind, data, tmp_path / "resumed", tcfg=schedule)
    monkeypatch.setattr(train_mod, "_ema_update", real_update)
    assert json.loads((tmp_path / "resumed" / CONFIG).read_text())["step"] == 2
    summary = train_run(kind, data, tmp_path / "resumed", tcfg=schedule, resume=True)
    assert summary["started_at_step"] == 2

    a, b = tmp_path / "straight", tmp_path / "resumed"
    wa, wb = read_weights(a), read_weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "EMA weights differ after resume"
    sa, sb = (_tensors(torch.load(p / TRAIN_STATE, weights_only=True)) for p in (a, b))
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"train state differs after resume: {different[:5]}"
    assert rows(b / "metrics.csv") == rows(a / "metrics.csv")
    assert [int(r["step"]) for r in rows(b / "metrics.csv")] == [3, 6]


def test_resume_refuses_another_factor_or_kind(tmp_path: Path, models: dict[str, Path]) -> None:
    out = tmp_path / "run"
    shutil.copytree(models["restorer"], out)
    data = write(tmp_path / "lr.zarr", synth_array((12, 40, 40), seed=5))
    before = (out / WEIGHTS).read_bytes()
    with pytest.raises(CheckpointError, match="factor"):
        train_run("restorer", data, out, cfg={"factor": 8}, resume=True)
    hr = write(tmp_path / "hr.zarr", synth_array((32, 32, 32), seed=6), voxel_size=(10.0, 10.0, 10.0))
    with pytest.raises(CheckpointError, match="kind"):
        train_run("dgean", hr, out, resume=True)
    with pytest.raises(OutputExistsError, match="--resume"):
        train_run("restorer", data, out)
    assert (out / WEIGHTS).read_bytes() == before, "a refused run changed the checkpoint"


def test_training_never_silently_replaces_a_checkpoint(tmp_path: Path) -> None:
    """A folder with an inference-only checkpoint (no train_state.pt) is an existing output too."""
    model = dgean_checkpoint(tmp_path / "model")
    before = (model / WEIGHTS).read_bytes()
    hr = training_data("dgean", tmp_path)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        train_run("dgean", hr, model)
    with pytest.raises(CheckpointError, match="training state"):
        train_run("dgean", hr, model, resume=True)
    assert (model / WEIGHTS).read_bytes() == before


# --- corrupt checkpoints -------------------------------------------------------------------------


def _truncate(d: Path) -> None:
    w = d / WEIGHTS
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])


def _garbage(d: Path) -> None:
    (d / WEIGHTS).write_bytes(b"\x00\x01not a safetensors file" * 50)


def _empty(d: Path) -> None:
    (d / WEIGHTS).write_bytes(b"")


def _missing_weights(d: Path) -> None:
    (d / WEIGHTS).unlink()


def _bad_json(d: Path) -> None:
    (d / CONFIG).write_text('{"kind": "dgean", "model": ')


def _json_list(d: Path) -> None:
    (d / CONFIG).write_text("[1, 2, 3]")


def _missing_config(d: Path) -> None:
    (d / CONFIG).unlink()


def _misfit(d: Path) -> None:
    """Valid weights of a narrower network than the config describes."""
    config = json.loads((d / CONFIG).read_text())
    config["model"]["width"] = 12
    (d / CONFIG).write_text(json.dumps(config))


def _bad_model_section(d: Path) -> None:
    config = json.loads((d / CONFIG).read_text())
    config["model"]["no_such_option"] = 1
    (d / CONFIG).write_text(json.dumps(config))


def _wrong_kind(d: Path) -> None:
    shutil.rmtree(d)
    restorer_checkpoint(d)


CORRUPTIONS: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated weights": (_truncate, "corrupt"),
    "garbage weights": (_garbage, "corrupt"),
    "empty weights": (_empty, "corrupt"),
    "missing weights": (_missing_weights, "missing"),
    "invalid config.json": (_bad_json, "corrupt"),
    "config.json not a mapping": (_json_list, "corrupt"),
    "no config.json": (_missing_config, "not a d2r checkpoint"),
    "weights do not fit the config": (_misfit, "do not fit"),
    "config does not describe a DGEAN": (_bad_model_section, "does not describe"),
    "a restorer, not a DGEAN": (_wrong_kind, "'restorer' model"),
}


@pytest.fixture
def lr_float(tmp_path: Path) -> Path:
    return write(tmp_path / "lr.zarr", synth_array((6, 20, 20), seed=7))


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupt_checkpoint_is_a_clear_error(corruption: str, tmp_path: Path, lr_float: Path,
                                             cli_run: Callable[..., Any]) -> None:
    damage, fragment = CORRUPTIONS[corruption]
    model = dgean_checkpoint(tmp_path / "model")
    load_dgean(model)  # intact, it loads
    damage(model)
    with pytest.raises(CheckpointError, match=fragment) as info:
        load_dgean(model)
    assert str(model) in str(info.value)
    out = tmp_path / "sr.zarr"
    result = cli_run("infer", lr_float, out, "--model", model, "--serial", "--levels", 1)
    assert_cli_error(result, fragment)
    assert not out.exists(), "a refused run left an output behind"


def test_restorer_loader_refuses_a_dgean_and_bad_config(tmp_path: Path) -> None:
    model = dgean_checkpoint(tmp_path / "dgean")
    with pytest.raises(CheckpointError, match="'dgean' model, but a 'restorer'"):
        load_restorer(model)
    rest = restorer_checkpoint(tmp_path / "restorer")
    config = json.loads((rest / CONFIG).read_text())
    del config["sde"]
    (rest / CONFIG).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="does not describe a restorer"):
        load_restorer(rest)
    assert read_config(model)["kind"] == "dgean"


# --- patches ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["decimate", "mean"])
@pytest.mark.parametrize("factor", [3, 4])
def test_lateral_pair_conditions_on_the_degraded_target(mode: str, factor: int) -> None:
    patch = np.random.default_rng(0).random((32, 32)).astype(np.float32)
    for seed in range(8):  # covers all 8 flips/rotations
        x0, mu = lateral_pair(patch, factor, mode, np.random.default_rng(seed))
        assert x0.shape == mu.shape == (32, 32) and x0.dtype == mu.dtype == np.float32
        # x0 is the augmented patch (same values), mu is *x0* degraded along rows and upsampled
        np.testing.assert_array_equal(np.sort(x0, axis=None), np.sort(patch, axis=None))
        expected = upsample_axis(degrade_along(x0, factor, axis=0, mode=mode), factor, axis=0, mode=mode,
                                 method="cubic", length=32)
        np.testing.assert_array_equal(mu, expected)
        if mode == "decimate":  # rows k*s were acquired: the condition keeps them exactly
            np.testing.assert_array_equal(mu[::factor], x0[::factor])
        assert not np.allclose(mu, x0)


@pytest.mark.parametrize("mode", ["decimate", "mean"])
def test_axial_pair_degrades_the_target_like_the_acquisition(mode: str) -> None:
    # each slice holds its own index (plus xy texture < 1), so the source slice of every output is known
    z = np.arange(16, dtype=np.float32)[:, None, None]
    block = z + np.random.default_rng(1).random((1, 16, 16)).astype(np.float32) * 0.5
    flipped = 0
    for seed in range(12):
        lr, hr = axial_pair(block, 4, mode, np.random.default_rng(seed))
        assert lr.shape == (3, 16, 16) and hr.shape == (12, 16, 16)
        assert lr.dtype == hr.dtype == np.float32
        source = np.floor(hr[:, 0, 0]).astype(int)
        flipped += source[0] > source[1]
        assert np.all(np.abs(np.diff(source)) == 1), "hr must be 12 consecutive slices of the block"
        if mode == "decimate":
            np.testing.assert_array_equal(lr, hr[::4])
            # the network's inputs are acquired slices (multiples of s), flipped or not
            assert set(source[::4] % 4) == {0}
        else:
            np.testing.assert_allclose(lr, hr.reshape(3, 4, 16, 16).mean(axis=1), rtol=1e-6)
            # each LR slice averages one acquired section k*s .. k*s+s-1
            assert set(source.reshape(3, 4).min(axis=1) % 4) == {0}
    assert 0 < flipped < 12, "z-flips are one augmentation among others"
    with pytest.raises(InputError, match="multiple of the factor"):
        axial_pair(block[:10], 4, mode, np.random.default_rng(0))


def test_patch_source_starts_on_the_acquisition_grid(tmp_path: Path) -> None:
    path = write(tmp_path / "v.zarr", synth_array((40, 16, 16), seed=3), chunks=(8, 16, 16))
    source = PatchSource(path, z_range=(5, 38), intensity=Intensity(0.0, 255.0))
    data = np.asarray(source.data) / 255.0
    for step in range(8):
        block = source.read(step_rng(0, step), (12, 16, 16), z_align=4)
        starts = [z for z in range(40 - 11) if np.allclose(data[z:z + 12], block, atol=1e-6)]
        assert starts and starts[0] % 4 == 0 and 5 <= starts[0] and starts[0] + 12 <= 38
    with pytest.raises(InputError, match="multiple of 4"):
        PatchSource(path, z_range=(5, 18), intensity=Intensity(0.0, 255.0)).read(step_rng(0, 0), (12, 16, 16),
                                                                                 z_align=4)


def test_patch_source_reads_the_chunks_a_patch_touches_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each patch is a box of the volume assembled from the chunks it touches, read straight
    from Zarr (no Dask), each chunk decoded once while it stays in the source's cache."""
    data = synth_array((12, 40, 40), seed=8)
    path = write(tmp_path / "v.zarr", data, chunks=(4, 8, 8))
    requested: list[tuple[int, ...]] = []
    real_getitem = zarr.Array.__getitem__

    def spy(self: Any, selection: Any) -> Any:
        out = real_getitem(self, selection)
        requested.append(tuple(s.start // c for s, c in zip(selection, (4, 8, 8))))
        assert out.shape == (4, 8, 8), "a read that is not one whole chunk"
        return out

    monkeypatch.setattr(zarr.Array, "__getitem__", spy)
    patch, chunks = (3, 16, 24), (4, 8, 8)
    source = PatchSource(path, intensity=Intensity(0.0, 255.0))
    seen: set[tuple[int, ...]] = set()
    for step in range(5):
        requested.clear()
        block = source.read(step_rng(0, step), patch)
        assert block.shape == patch and block.dtype == np.float32
        rng = step_rng(0, step)  # where the patch lies (read() draws z0, y0, x0 in this order)
        start = [int(rng.integers(0, n - p + 1)) for n, p in zip(data.shape, patch)]
        np.testing.assert_allclose(block * 255, data[tuple(slice(a, a + p) for a, p in zip(start, patch))], atol=1e-3)
        touched = {tuple(idx) for idx in np.ndindex(*[-(-(a + p) // c) - a // c for a, p, c in zip(start, patch, chunks)])}
        touched = {tuple(i + a // c for i, a, c in zip(idx, start, chunks)) for idx in touched}
        assert set(requested) == touched - seen and len(requested) == len(set(requested))
        seen |= touched
    assert source.reader.decoded == len(seen) < 3 * 5 * 5

    small = PatchSource(path, intensity=Intensity(0.0, 255.0), cache_bytes=2 * 4 * 8 * 8)  # room for two chunks
    requested.clear()
    for _ in range(2):
        small.read(step_rng(0, 0), (4, 8, 16))  # three chunks per patch at most: the cache cannot hold them
    assert len(requested) > len(set(requested)), "an evicted chunk must be read again"


def test_volume_reader_cache_gives_the_stored_boxes(tmp_path: Path) -> None:
    """Boxes through the chunk cache equal Zarr's, on uneven chunks and on a 4D array stored
    (x, c, z, y); a pickled reader (a loader process's copy) starts with an empty cache."""
    import pickle

    from d2r_dask.io.volume import open_reader

    data = synth_array((13, 21, 19), seed=2)
    path = write(tmp_path / "v.zarr", data, chunks=(5, 8, 7))
    four = tmp_path / "cz.zarr"
    arr = zarr.create_array(four, shape=(19, 1, 13, 21), chunks=(5, 1, 4, 9), dtype="uint8",
                            dimension_names=("x", "c", "z", "y"))
    arr[:] = data.transpose(2, 0, 1)[:, None]
    g = np.random.default_rng(0)
    for store, expected in ((path, data), (four, data)):
        reader = open_reader(store, cache_bytes=1 << 20)
        for _ in range(20):
            a = [int(g.integers(0, n)) for n in expected.shape]
            b = [int(g.integers(x + 1, n + 1)) for x, n in zip(a, expected.shape)]
            box = tuple(slice(x, y) for x, y in zip(a, b))
            np.testing.assert_array_equal(reader(box), expected[box])
        assert reader.decoded > 0
        copy = pickle.loads(pickle.dumps(reader))
        assert copy.decoded == 0 and not copy._chunks
        np.testing.assert_array_equal(copy((slice(0, 13), slice(0, 21), slice(0, 19))), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_loader_workers_do_not_change_training(kind: str, tmp_path: Path, models: dict[str, Path]) -> None:
    """Two loader processes drawing batches ahead train the same weights, metrics and
    validation as drawing them in the training process (the session's model, 0 workers)."""
    out = tmp_path / "two-loaders"
    root = models[kind].parent
    data = root / ("lr.zarr" if kind == "restorer" else "hr.zarr")
    assert json.loads((models[kind] / CONFIG).read_text())["train"]["loader_workers"] is None  # 0 on a CPU
    train_run(kind, data, out, tcfg={"loader_workers": 2, "prefetch": 3})
    wa, wb = read_weights(models[kind]), read_weights(out)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), "weights differ"
    assert rows(out / "metrics.csv") == rows(models[kind] / "metrics.csv")


def test_loader_batches_are_the_steps_batches_in_order() -> None:
    """Item i of the loader is step start+i's batch, whichever process drew it."""
    from d2r_dask.stages.loader import step_loader

    def batches(rng: np.random.Generator, n: int) -> tuple[np.ndarray]:
        return (rng.random((n, 3)).astype(np.float32),)

    expected = [batches(step_rng(7, k), 2)[0] for k in range(3, 9)]
    for workers in (0, 2):
        got = [b[0].numpy() for b in step_loader(batches, seed=7, batch_size=2, start=3, steps=9, workers=workers)]
        assert len(got) == 6 and all(np.array_equal(g, e) for g, e in zip(got, expected)), workers


def test_patch_larger_than_the_volume_is_a_clear_error(tmp_path: Path) -> None:
    thin = write(tmp_path / "thin.zarr", synth_array((8, 24, 24), seed=9), voxel_size=(10.0, 10.0, 10.0))
    with pytest.raises(InputError, match=r"3D training patch needs 19 x 16 x 16 voxels .* 8 usable slices x 24 x 24; "
                                         r"use a volume with more slices"):
        train_dgean(thin, tmp_path / "d", tiny_dgean_cfg(), tiny_train(), progress=False)
    with pytest.raises(InputError, match=r"needs 11 x 32 x 32 .* use --patch-xy 24 or less and --patch-lr-z 2 or "
                                         r"less \(factor 2\), or a larger volume"):
        train_dgean(thin, tmp_path / "d", tiny_dgean_cfg(patch_xy=32, patch_lr_z=4, factor=2), tiny_train(),
                    progress=False)
    with pytest.raises(InputError, match="XY training patch needs 1 x 32 x 32 voxels"):
        PatchSource(thin).check_fits((1, 32, 32), "XY")
    assert not (tmp_path / "d").exists()


def test_dgean_patch_too_shallow_for_the_network_is_a_clear_error(tmp_path: Path) -> None:
    hr = write(tmp_path / "hr.zarr", synth_array((16, 24, 24), seed=9), voxel_size=(10.0, 10.0, 10.0))
    with pytest.raises(InputError, match="patch"):
        train_dgean(hr, tmp_path / "d", tiny_dgean_cfg(patch_lr_z=2), tiny_train(steps=1), progress=False)


class _Payload:
    """Unpickling this would run code: it must never be unpickled from a training state."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (Path.touch, (str(_MARKER),))


_MARKER = Path("/tmp/d2r-unsafe-unpickle-ran")


def test_training_state_is_loaded_without_running_pickled_code(tmp_path: Path) -> None:
    from d2r_dask.models.checkpoint import read_train_state

    _MARKER.unlink(missing_ok=True)
    torch.save({"step": 3, "payload": _Payload()}, tmp_path / TRAIN_STATE)
    with pytest.raises(CheckpointError, match="not a d2r training state"):
        read_train_state(tmp_path)
    assert not _MARKER.exists(), "a crafted train_state.pt ran code"
    torch.save({"step": 3, "model": {"w": torch.ones(2)}, "losses": [0.1], "config": {"kind": "dgean"}},
               tmp_path / TRAIN_STATE)
    assert read_train_state(tmp_path)["step"] == 3  # plain state dicts and values still load
