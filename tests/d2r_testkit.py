"""Small building blocks shared by the stage, training, pipeline and evaluation tests.

Not a test module: tiny synthetic volumes on disk, tiny training settings and
checkpoints with random weights written exactly as the trainers write them (so
Stage II/IV tests need no training), plus a once-per-session trained pair of tiny
models for the tests that need real training output.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import textwrap
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pytest
import torch

from d2r_dask.models.checkpoint import save_checkpoint
from d2r_dask.io.geometry import Geometry
from d2r_dask.io.volume import write_volume

# the cheapest settings that still exercise every code path of fit(): two validations, two checkpoints
TINY_TRAIN: dict[str, Any] = {"steps": 4, "batch_size": 2, "checkpoint_every": 2, "val_every": 2,
                              "val_patches": 2, "amp": False, "device": "cpu"}


# the LR geometry of the Stage II/IV tests: anisotropic voxels and an origin off zero, so a
# misplaced output shows; S, the SR factor along z
VOXEL = (40.0, 5.0, 5.0)
ORIGIN = (100.0, 20.0, -10.0)
S = 4


def tiny_train(**overrides: Any) -> Any:
    from d2r_dask.stages.train import TrainConfig

    return TrainConfig(**{**TINY_TRAIN, **overrides})


def tiny_restorer_cfg(factor: int = 4, mode: str = "decimate", **overrides: Any) -> Any:
    from d2r_dask.stages.train import RestorerConfig

    return RestorerConfig(**{"factor": factor, "mode": mode, "patch": 32, "sampler_steps": 2, **overrides})


def tiny_dgean_cfg(factor: int = 4, mode: str = "decimate", **overrides: Any) -> Any:
    from d2r_dask.stages.train import DGEANTrainConfig

    return DGEANTrainConfig(**{"factor": factor, "mode": mode, "patch_xy": 16, "patch_lr_z": 3, **overrides})


def slowed_engine_script(body: str, pause: float) -> str:
    """A Python script that runs ``body`` with every engine task slowed by ``pause`` seconds,
    so a test can kill it midway (the values it writes are unchanged)."""
    return "\n".join([
        "import sys, time",
        "from d2r_dask.blockwise import scheduler",
        "real = scheduler.run_group",
        "def slow(job, phase, gid):",
        f"    time.sleep({pause})",
        "    return real(job, phase, gid)",
        "scheduler.run_group = slow",
        textwrap.dedent(body),
    ])


def kill_after(proc: "subprocess.Popen[bytes]", n_done: Callable[[], int], at_least: int, timeout: float) -> None:
    """``kill -9`` ``proc`` once ``n_done()`` reaches ``at_least`` (fails if it ends first)."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None and n_done() < at_least:
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()


def synth_array(shape: Sequence[int], seed: int = 0) -> np.ndarray:
    """Synthetic neuropil (uint8): structured like EM, so restorers and metrics see real edges."""
    from d2r_dask.data.synth import synth_dask

    return np.asarray(synth_dask(tuple(shape), chunks=tuple(shape), seed=seed))


def write(path: Path, data: np.ndarray, voxel_size: Sequence[float] = (40.0, 5.0, 5.0),
          translation: Sequence[float] = (0.0, 0.0, 0.0), chunks: Sequence[int] | None = None,
          **kw: Any) -> Path:
    return write_volume(path, data, Geometry(tuple(voxel_size), tuple(translation)), chunks=chunks, **kw)


def _perturbed(net: torch.nn.Module, seed: int, scale: float) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return net


def dgean_checkpoint(directory: Path, *, factor: int = 4, mode: str = "decimate", preset: str = "tiny",
                     intensity: tuple[float, float] = (0.0, 255.0), seed: int = 0) -> Path:
    """A DGEAN checkpoint with random weights (its HR conv too, which starts at zero when
    trained, so the output is not just the cubic upsampling)."""
    from d2r_dask.models.dgean import DGEAN, dgean_config

    torch.manual_seed(seed)
    cfg = dgean_config(preset, factor, mode)
    net = _perturbed(DGEAN(cfg), seed, 0.05)
    config = {"kind": "dgean", "model": cfg.to_dict(), "preset": preset, "factor": factor, "mode": mode,
              "intensity": {"low": intensity[0], "high": intensity[1]}, "step": 0}
    return save_checkpoint(directory, weights=net.state_dict(), config=config)


def restorer_checkpoint(directory: Path, *, factor: int = 4, mode: str = "decimate", steps: int = 2,
                        intensity: tuple[float, float] = (0.0, 255.0), seed: int = 0) -> Path:
    """A tiny restorer checkpoint with random weights (ddim sampler, ``steps`` evaluations)."""
    from d2r_dask.models.nafnet import ConditionalNAFNet, nafnet_config
    from d2r_dask.models.sde import SDEConfig

    torch.manual_seed(seed)
    cfg = nafnet_config("tiny")
    net = _perturbed(ConditionalNAFNet(cfg), seed, 0.02)
    config = {"kind": "restorer", "model": cfg.to_dict(), "preset": "tiny", "sde": SDEConfig().to_dict(),
              "factor": factor, "mode": mode, "sampler": {"name": "ddim", "steps": steps},
              "intensity": {"low": intensity[0], "high": intensity[1]}, "step": 0}
    return save_checkpoint(directory, weights=net.state_dict(), config=config)


_TRAINED: dict[str, Path] = {}


def trained(kind: str, base: Path) -> Path:
    """A tiny model of ``kind`` ('restorer' or 'dgean') trained once per session under ``base``;
    callers copy it before changing anything."""
    from d2r_dask.stages.train import train_dgean, train_restorer

    if kind not in _TRAINED:
        root = base / f"trained-{kind}"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        if kind == "restorer":
            lr = write(root / "lr.zarr", synth_array((12, 40, 40), seed=3))
            train_restorer(lr, root / "model", tiny_restorer_cfg(), tiny_train(), progress=False)
        else:
            hr = write(root / "hr.zarr", synth_array((32, 40, 40), seed=4), voxel_size=(10.0, 10.0, 10.0))
            train_dgean(hr, root / "model", tiny_dgean_cfg(), tiny_train(), progress=False)
        _TRAINED[kind] = root / "model"
    return _TRAINED[kind]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread in these tests: on a machine shared with other jobs, two threads
    spin against each other and run tiny networks 10-50x slower (results are unchanged)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
