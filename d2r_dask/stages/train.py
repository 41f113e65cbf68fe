"""Training: one loop for both networks, and the Stage I / Stage III trainers on top of it.

:func:`fit` is the loop (AdamW, cosine decay, EMA, bf16 autocast on GPU and channels-last
memory, :mod:`~d2r_dask.models.precision`; progress,
validation log, atomic checkpoints, ``resume``). Its batches come from a data loader
(:mod:`.loader`: drawn ahead, in worker processes). Everything random in a step is
keyed by ``(seed, step)``, and the optimiser, scheduler and EMA are checkpointed,
so a resumed run ends with the same weights as an uninterrupted one, with any number
of loader workers.

* :func:`train_restorer` — Stage I: the IR-SDE + conditional NAFNet restorer on XY
  patches of the LR volume, degraded along one in-plane axis.
* :func:`train_dgean` — Stage III: DGEAN on 3D patches of the pseudo-HR volume
  (or of ground truth with ``supervised``), degraded along z like the acquisition.

Both trainers stay beside the loop they share (the patch sources, validation and
checkpoint configs differ only in what they hold). With a Dask client they run on a
cluster worker instead (:mod:`.remote`).
"""

from __future__ import annotations

import copy
import csv
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from .. import __version__
from ..data.intensity import Intensity
from ..data.patches import AxialBatches, LateralBatches, PatchSource, step_rng
from ..errors import CheckpointError, InputError, OutputExistsError
from ..evaluation.selfcheck import read_self_check
from ..io.files import atomic_write
from ..io.geometry import check_factor, check_mode
from ..io.volume import check_output_path
from ..models.checkpoint import TRAIN_STATE, read_config, read_train_state, save_checkpoint
from ..models.precision import autocast_bf16, channels_last
from .loader import Batches, step_loader

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by both trainers (saved in every checkpoint).

    ``loader_workers``: processes drawing training batches ahead (None: 0 on a CPU, up to 4
    on a GPU; :func:`~.loader.default_loader_workers`), ``prefetch`` batches each. They
    change the speed, never the result.
    """

    steps: int = 2000
    batch_size: int = 4
    lr: float | None = None  # None: the trainer's measured default (default_restorer_lr, default_dgean_lr)
    weight_decay: float = 1e-4
    ema: float = 0.995
    min_lr_fraction: float = 0.01
    checkpoint_every: int = 250
    val_every: int = 250
    val_patches: int = 8
    seed: int = 0
    amp: bool = True
    device: str | None = None
    loader_workers: int | None = None
    prefetch: int = 2

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.checkpoint_every < 1 or self.val_every < 1:
            raise InputError("steps, batch size, checkpoint and validation intervals must be >= 1")
        if (self.loader_workers is not None and self.loader_workers < 0) or self.prefetch < 1:
            raise InputError(f"--loader-workers must be >= 0 (got {self.loader_workers}) and prefetch >= 1 "
                             f"(got {self.prefetch})")
        if not 0 <= self.ema < 1 or (self.lr is not None and self.lr <= 0):
            raise InputError("need 0 <= ema < 1 and lr > 0")
        check_device(self.device, here=False)  # its GPU is checked where training runs (pick_device)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def bf16_on(self, device: torch.device) -> bool:
        """Whether training and validation on ``device`` run in bf16 autocast: ``amp`` and a GPU."""
        return self.amp and autocast_bf16(device)


def check_device(device: str | None, *, here: bool = True) -> None:
    """Refuse a device torch does not know, or (``here``) a GPU this machine does not have
    (None: pick one). ``here=False`` checks the name only: for a device on a cluster worker."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"--device {device!r} is not a torch device; use cpu, cuda or cuda:N") from exc
    if dev.type == "cuda" and here:
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (dev.index or 0) >= n:
            raise InputError(f"--device {device}: this machine has {n} CUDA GPU(s); "
                             + (f"use cuda:0 to cuda:{n - 1}" if n else "use --device cpu (or leave it out)"))


def pick_device(device: str | None = None) -> torch.device:
    """``device`` if given (and present, :func:`check_device`), else the current GPU, else the CPU."""
    check_device(device)
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1.0 - decay)
        for e, b in zip(ema.buffers(), model.buffers()):
            e.copy_(b)


LossFn = Callable[[torch.nn.Module, tuple[torch.Tensor, ...], int], torch.Tensor]
ValidateFn = Callable[[torch.nn.Module, int], Mapping[str, float]]
ReportFn = Callable[[Mapping[str, Any]], None]


def fit(
    model: torch.nn.Module,
    loss_fn: LossFn,
    *,
    batches: Batches,
    cfg: TrainConfig,
    out: str | os.PathLike,
    checkpoint_config: Mapping[str, Any],
    validate: ValidateFn | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    report: ReportFn | None = None,
) -> dict[str, Any]:
    """Train ``model`` for ``cfg.steps`` steps of ``loss_fn(model, batch, step)``; return a summary.

    Step ``k``'s batch is ``batches(step_rng(cfg.seed, k), cfg.batch_size)``, drawn by the
    data loader (:func:`~.loader.step_loader`) and moved to the device. Checkpoints (EMA
    weights + ``checkpoint_config``) go to ``out`` every ``cfg.checkpoint_every`` steps and
    at the end; validation metrics are appended to ``out/metrics.csv``. ``resume`` continues
    from ``out/train_state.pt``. ``report``, if given, receives the progress after every step:
    ``step``, ``steps``, ``loss`` and the validation rows this call has written (``rows``).
    """
    out = Path(out)
    device = pick_device(cfg.device)
    channels_last(model.to(device))
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    floor = cfg.min_lr_fraction

    def cosine(step: int) -> float:
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(step, cfg.steps) / cfg.steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine)
    start, losses = 0, []  # recent training losses: saved with the state, so logs match across a resume
    state = read_train_state(out) if out.exists() else None
    if (state is not None or (out / "config.json").exists()) and not resume and not overwrite:
        raise OutputExistsError(f"{out} holds a training run; pass --resume to continue it or --overwrite to restart")
    if resume and state is None and (out / "config.json").exists() and not overwrite:
        raise CheckpointError(f"{out} holds a checkpoint without its training state ({TRAIN_STATE}), so it cannot be "
                              "resumed; use another --out, or --overwrite to train from scratch")
    if resume and state is not None:
        # the state carries its config: a crash between writing it and config.json still resumes
        previous = state.get("config") or read_config(out)
        for key in ("kind", "model", "factor", "mode", "intensity"):
            if previous.get(key) != checkpoint_config.get(key):
                raise CheckpointError(
                    f"cannot resume {out}: its {key} is {previous.get(key)!r}, this run's is "
                    f"{checkpoint_config.get(key)!r}; use another --out or drop --resume"
                )
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start = int(state["step"])
        losses = list(state.get("losses", []))  # the logged train_loss averages span the resume
        log.info("resuming %s at step %d", out, start)
    elif resume:
        log.info("nothing to resume in %s; starting from step 0", out)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.csv"
    _truncate_log(metrics_path, start)

    use_amp = cfg.bf16_on(device)
    t0, keep = time.time(), max(cfg.val_every, 50)
    from tqdm.auto import tqdm

    def checkpoint(done: int) -> None:
        save_checkpoint(
            out,
            weights=ema.state_dict(),
            config={**checkpoint_config, "step": done, "train": cfg.to_dict(), "d2r_version": __version__},
            train_state={"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                         "scheduler": sched.state_dict(), "step": done, "losses": losses,
                         "config": dict(checkpoint_config)},
        )

    bar = tqdm(total=cfg.steps, initial=start, desc=f"train {out.name}", unit="step", disable=not progress)
    if start >= cfg.steps:  # killed while writing the last checkpoint: finish writing it
        checkpoint(start)
    rows: list[dict[str, Any]] = []  # the validation rows this call writes
    loader = step_loader(batches, seed=cfg.seed, batch_size=cfg.batch_size, start=start, steps=cfg.steps,
                         workers=cfg.loader_workers, prefetch=cfg.prefetch, device=device)
    try:
        for step, batch in zip(range(start, cfg.steps), loader):
            batch = tuple(t.to(device, non_blocking=True) for t in batch)
            model.train()
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss = loss_fn(model, batch, step)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at step {step}; lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            _ema_update(ema, model, min(cfg.ema, (1 + step) / (10 + step)))  # warm-up: early EMA follows the model
            losses = [*losses[1 - keep:], float(loss.detach())]
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4g}")
            done = step + 1
            if validate is not None and (done % cfg.val_every == 0 or done == cfg.steps):
                row = {"step": done, "train_loss": float(np.mean(losses[-cfg.val_every:])), **validate(ema, done)}
                _append_row(metrics_path, row)
                rows.append(row)
                log.info("step %d: %s", done, ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "step"))
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                checkpoint(done)
            if report is not None:
                report({"step": done, "steps": cfg.steps, "loss": float(np.mean(losses[-50:])), "rows": rows})
    finally:
        loader.close()  # stops the loader's processes, however the loop ended
    bar.close()
    check = read_self_check(out)
    if check is not None and not check["beats_interpolation"]:
        log.warning("SELF-CHECK FAILED: %s scores %.2f dB on held-out patches, %.2f dB below %s interpolation of the "
                    "same patches; train longer (--steps) or a larger preset", out, check["psnr"],
                    -check["margin_db"], check["interpolation"])
    return {"steps": cfg.steps, "started_at_step": start, "seconds": time.time() - t0,
            "final_loss": float(np.mean(losses[-50:])) if losses else None, "out": str(out), "self_check": check}


def _append_row(path: Path, row: Mapping[str, Any]) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def _truncate_log(path: Path, step: int) -> None:
    """Drop log rows past ``step`` (a resumed run rewrites them)."""
    if not path.exists():
        return
    with path.open() as f:
        rows = list(csv.DictReader(f))
    path.unlink()
    for row in rows:
        if int(row["step"]) <= step:
            _append_row(path, row)


def _on(device: torch.device, arrays: tuple[np.ndarray, ...]) -> tuple[torch.Tensor, ...]:
    """``arrays`` as tensors on ``device``."""
    return tuple(torch.from_numpy(a).to(device) for a in arrays)


def _validation_split(n_slices: int, fraction: float = 0.1, min_slices: int = 1,
                      keep: int = 1) -> tuple[tuple[int, int], tuple[int, int]]:
    """Train on the first slices, validate on the last ``fraction``: at least ``min_slices`` (one
    validation patch deep) where ``keep`` slices remain to train on. A volume too thin to hold
    anything out trains and validates on all of it."""
    n_val = max(1, int(round(n_slices * fraction)))
    if n_val < min_slices <= n_slices - keep:
        n_val = min_slices
    if n_slices - n_val < keep:
        return (0, n_slices), (0, n_slices)
    return (0, n_slices - n_val), (n_slices - n_val, n_slices)


def _sources(path: str | os.PathLike, z_range: tuple[int, int] | None = None,
             intensity: Intensity | None = None, min_val_slices: int = 1,
             min_train_slices: int = 1) -> tuple[PatchSource, PatchSource]:
    """Training and validation patch sources: the last tenth of ``z_range`` (see
    :func:`_validation_split`) is held out."""
    probe = PatchSource(path, intensity=intensity)
    z0, z1 = z_range or (0, probe.shape[0])
    (a, b), (c, d) = _validation_split(z1 - z0, min_slices=min_val_slices, keep=min_train_slices)
    return (PatchSource(path, z_range=(z0 + a, z0 + b), intensity=probe.intensity),
            PatchSource(path, z_range=(z0 + c, z0 + d), intensity=probe.intensity))


# --- Stage I: the diffusion restorer ---------------------------------------------------


RECIPES = ("fast", "authors")


@dataclass(frozen=True)
class RestorerConfig:
    """What Stage I trains: network preset, factor, lateral degradation, patch size, recipe, sampler.

    ``recipe``: ``"fast"`` (ours: x0 prediction, predict-and-refine, trained at the timesteps
    of a 3-step grid and mostly at ``t = T``; learns on a CPU in minutes) or ``"authors"``
    (noise prediction, ``t`` uniform in ``1..T``, the IR-SDE maximum-likelihood loss).
    ``sampler_steps=None`` takes the recipe's sampler: ``posterior`` with 1 network evaluation
    (the mean prediction) for ``fast``, the 100-step ``sde`` for ``authors``.
    """

    factor: int
    mode: str = "decimate"
    preset: str = "tiny"
    patch: int = 64
    recipe: str = "fast"
    sampler: str | None = None
    sampler_steps: int | None = None

    def __post_init__(self) -> None:
        check_factor(self.factor)
        check_mode(self.mode)
        if self.patch < 2 * self.factor:
            raise InputError(f"patch {self.patch} is too small for factor {self.factor}; use --patch >= {2 * self.factor}")
        if self.recipe not in RECIPES:
            raise InputError(f"unknown restorer recipe {self.recipe!r}; choose one of {', '.join(RECIPES)}")

    @property
    def prediction(self) -> str:
        return "x0" if self.recipe == "fast" else "noise"

    def resolved_sampler(self) -> tuple[str, int | None]:
        """``(sampler, steps)``: the explicit ones, else the recipe's default."""
        if self.recipe == "fast":
            return self.sampler or "posterior", self.sampler_steps or 1
        return self.sampler or "sde", self.sampler_steps


FAST_TRAIN_GRID = 3
"""The fast recipe trains the timesteps of this many posterior steps, so 1-3 step sampling works."""


def train_restorer(
    lr_volume: str | os.PathLike,
    out: str | os.PathLike,
    rcfg: RestorerConfig,
    tcfg: TrainConfig | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    intensity: Intensity | None = None,
    report: ReportFn | None = None,
) -> dict[str, Any]:
    """Stage I: train the restorer on XY patches of the LR volume (never loaded whole).

    The last tenth of the LR slices is held out: every validation restores its XY patches,
    degraded like z, and scores them next to linear and cubic interpolation (the self-check,
    in ``metrics.csv`` and the returned summary's ``self_check``).
    """
    from ..data.degrade import degrade_along, upsample_axis
    from ..evaluation.metrics import ssim
    from ..models.nafnet import ConditionalNAFNet, nafnet_config
    from ..models.sde import IRSDE, SDEConfig

    tcfg = _with_default_lr(tcfg, default_restorer_lr(rcfg))
    device = pick_device(tcfg.device)  # first: a missing GPU is refused before any read
    check_output_path(out, [lr_volume], containing=False)
    source, val_source = _sources(lr_volume, intensity=intensity)
    side = min(source.shape[1], source.shape[2])
    source.check_fits((1, rcfg.patch, rcfg.patch), "XY", fix=(
        f"use --patch {side} or less (>= {2 * rcfg.factor} for factor {rcfg.factor})" if side >= 2 * rcfg.factor
        else f"use a volume of at least {2 * rcfg.factor} x {2 * rcfg.factor} voxels in XY"))
    sde_cfg = SDEConfig(prediction=rcfg.prediction)
    sde = IRSDE(sde_cfg)
    sampler, sampler_steps = rcfg.resolved_sampler()
    sde.n_evaluations(sampler, sampler_steps)  # validates the pair before any training
    train_times = sde.time_grid(FAST_TRAIN_GRID)[:-1] if rcfg.recipe == "fast" else None
    torch.manual_seed(tcfg.seed)
    net_cfg = nafnet_config(rcfg.preset)
    model = ConditionalNAFNet(net_cfg)

    batches = LateralBatches(source, rcfg.patch, rcfg.factor, rcfg.mode)  # (x0, mu)

    def loss_fn(net: torch.nn.Module, batch: tuple[torch.Tensor, ...], step: int) -> torch.Tensor:
        x0, mu = batch
        gen = torch.Generator(device=device).manual_seed(tcfg.seed * 1_000_003 + step)
        return sde.training_loss(net, x0, mu, generator=gen, train_times=train_times)

    val_x0, val_mu = _on(device, LateralBatches(val_source, rcfg.patch, rcfg.factor, rcfg.mode)(
        step_rng(tcfg.seed, 0, stream=1), tcfg.val_patches))
    target, cond = val_x0.cpu().numpy()[:, 0], val_mu.cpu().numpy()[:, 0]
    linear = upsample_axis(degrade_along(target, rcfg.factor, axis=1, mode=rcfg.mode), rcfg.factor, axis=1,
                           mode=rcfg.mode, method="linear", length=target.shape[1])
    out = Path(out)

    def validate(ema: torch.nn.Module, step: int) -> dict[str, float]:
        gen = torch.Generator(device=device).manual_seed(tcfg.seed)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=tcfg.bf16_on(device)):
            pred = sde.sample(ema, val_mu, sampler=sampler, steps=sampler_steps, generator=gen, x0_range=sde.X0_RANGE)
        pred = pred.float().cpu().numpy()[:, 0]
        _save_panels(out / "validation.png", [cond, pred, target], ["condition (cubic)", "restored", "target"])
        return {"val_psnr": _psnr01(pred, target), "val_ssim": ssim(pred, target, data_range=1.0, axis=0),
                "val_psnr_linear": _psnr01(linear, target), "val_ssim_linear": ssim(linear, target, data_range=1.0, axis=0),
                "val_psnr_cubic": _psnr01(cond, target), "val_ssim_cubic": ssim(cond, target, data_range=1.0, axis=0)}

    config = {
        "kind": "restorer",
        "model": net_cfg.to_dict(),
        "preset": rcfg.preset,
        "recipe": rcfg.recipe,
        "sde": sde_cfg.to_dict(),
        "factor": rcfg.factor,
        "mode": rcfg.mode,
        "degradation": {"lateral": rcfg.mode, "condition": "cubic"},
        "patch": rcfg.patch,
        "train_times": train_times,
        "sampler": {"name": sampler, "steps": sampler_steps},
        "intensity": source.intensity.to_dict(),
        "source": str(lr_volume),
    }
    return fit(model, loss_fn, batches=batches, cfg=tcfg, out=out, checkpoint_config=config, validate=validate,
               resume=resume, overwrite=overwrite, progress=progress, report=report)


def default_restorer_lr(rcfg: RestorerConfig) -> float:
    """Learning rates measured to work: the authors' 4e-5 for their recipe on the full network,
    2e-3 / 1e-3 / 5e-4 for the fast recipe on the tiny / small / full presets."""
    if rcfg.recipe == "authors":
        return 4e-5 if rcfg.preset == "full" else 2e-4
    return {"tiny": 2e-3, "small": 1e-3}.get(rcfg.preset, 5e-4)


def default_dgean_lr(preset: str) -> float:
    """DGEAN's learning rate: 3e-3 / 2e-3 / 2e-3 for the tiny / small / medium presets (measured
    on fib25 x4 at 1500 steps: 1e-3 left tiny and small undertrained, 0.08 / 0.14 dB lower),
    1e-3 for base and full."""
    return {"tiny": 3e-3, "small": 2e-3, "medium": 2e-3}.get(preset, 1e-3)


def _with_default_lr(tcfg: TrainConfig | None, lr: float) -> TrainConfig:
    """``tcfg`` (default settings if None) with ``lr`` where it leaves the learning rate unset."""
    tcfg = tcfg or TrainConfig()
    return tcfg if tcfg.lr is not None else replace(tcfg, lr=lr)


def _psnr01(pred: np.ndarray, target: np.ndarray) -> float:
    """PSNR of unit-range images as they would be stored (clipped to the range)."""
    from ..evaluation.metrics import psnr

    return psnr(np.clip(pred, 0, 1), target, data_range=1.0)


# --- Stage III: DGEAN -------------------------------------------------------------------


@dataclass(frozen=True)
class DGEANTrainConfig:
    """What Stage III trains: DGEAN preset, factor, degradation mode, patch, loss weights."""

    factor: int
    mode: str = "decimate"
    preset: str = "tiny"
    patch_xy: int = 48
    patch_lr_z: int = 8
    hf_weight: float = 0.5
    fourier_weight: float = 0.0
    supervised: bool = False

    def __post_init__(self) -> None:
        check_factor(self.factor)
        check_mode(self.mode)
        if self.patch_xy < 8 or self.patch_lr_z < 2:
            raise InputError("DGEAN patches need >= 8 voxels in xy and >= 2 LR slices")


def train_dgean(
    hr_volume: str | os.PathLike,
    out: str | os.PathLike,
    dcfg: DGEANTrainConfig,
    tcfg: TrainConfig | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    z_range: tuple[int, int] | None = None,
    intensity: Any = None,
    report: ReportFn | None = None,
) -> dict[str, Any]:
    """Stage III: train DGEAN on (degraded, original) 3D patches of an (pseudo-)HR volume.

    ``z_range`` limits the HR slices used (e.g. to keep a ground-truth evaluation
    region out of supervised training); its last tenth is held out for validation.
    """
    from ..data.degrade import upsample_axis
    from ..evaluation.metrics import ssim
    from ..models.dgean import DGEAN, dgean_config
    from ..models.losses import hf_loss

    tcfg = _with_default_lr(tcfg, default_dgean_lr(dcfg.preset))
    device = pick_device(tcfg.device)  # first: a missing GPU is refused before any read
    check_output_path(out, [hr_volume], containing=False)
    s = dcfg.factor
    depth = dcfg.patch_lr_z * s
    # Patches are read one LR period deeper (z-flips keep the acquisition grid) and start on the
    # grid (up to s-1 slices of slack). Validation patches may be thinner than training ones, down
    # to 3 LR slices (the attention window), so that a tenth of a thin volume can be held out.
    val_lr_z, need = 3, depth + 2 * s - 1
    source, val_source = _sources(hr_volume, z_range, intensity, min_val_slices=(val_lr_z + 2) * s - 1,
                                  min_train_slices=need)
    z0, z1 = z_range or (0, source.shape[0])
    size = dcfg.patch_xy
    usable, side = source.z_range[1] - source.z_range[0], min(source.shape[1:])
    most_lr_z = (usable + 1) // s - 2
    fixes = ([f"--patch-xy {side} or less"] if size > side else []) + (
        [f"--patch-lr-z {most_lr_z} or less (factor {s})"] if need > usable and most_lr_z >= 2 else [])
    source.check_fits((need, size, size), "3D", fix=f"use {' and '.join(fixes)}, or a larger volume" if fixes
                      else "use a volume with more slices")
    val_depth = min(depth, ((val_source.z_range[1] - val_source.z_range[0] - s + 1) // s - 1) * s)
    if val_depth < val_lr_z * s or val_source.z_range == source.z_range:
        val_source, val_depth = source, depth  # too few slices to hold out: validate on training slices
        log.warning("%s is too thin to hold out a validation patch; validating on training slices", hr_volume)
    torch.manual_seed(tcfg.seed)
    net_cfg = dgean_config(dcfg.preset, s, dcfg.mode)
    if dcfg.patch_lr_z < net_cfg.ca_pool:  # torch's pooling refuses inputs thinner than its window
        raise InputError(f"patch of {dcfg.patch_lr_z} LR slices is thinner than DGEAN's {net_cfg.ca_pool}-slice "
                         f"attention window; use --patch-lr-z >= {net_cfg.ca_pool}")
    model = DGEAN(net_cfg)

    batches = AxialBatches(source, depth, size, s, dcfg.mode)  # (lr, hr)

    def loss_fn(net: torch.nn.Module, batch: tuple[torch.Tensor, ...], step: int) -> torch.Tensor:
        lr, hr = batch
        return hf_loss(net(lr).float(), hr, weight=dcfg.hf_weight, fourier_weight=dcfg.fourier_weight)

    val_lr, val_hr = _on(device, AxialBatches(val_source, val_depth, size, s, dcfg.mode)(
        step_rng(tcfg.seed, 0, stream=1), max(1, tcfg.val_patches // 2)))
    out = Path(out)

    def validate(ema: torch.nn.Module, step: int) -> dict[str, float]:
        with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                                             enabled=tcfg.bf16_on(device)):
            pred = ema(val_lr).float().cpu().numpy()[:, 0]
        target = val_hr.cpu().numpy()[:, 0]
        lin = upsample_axis(val_lr.cpu().numpy()[:, 0], s, axis=1, mode=dcfg.mode, method="linear")
        xz = lambda v: v.transpose(0, 2, 1, 3).reshape(-1, v.shape[1], v.shape[3])  # noqa: E731
        _save_panels(out / "validation.png", [xz(lin)[:4], xz(pred)[:4], xz(target)[:4]],
                     ["linear (XZ)", "DGEAN (XZ)", "target (XZ)"])
        xz_ssim = lambda v: ssim(v.reshape(-1, *v.shape[2:]), target.reshape(-1, *target.shape[2:]),  # noqa: E731
                                 data_range=1.0, axis=1)
        return {"val_psnr": _psnr01(pred, target), "val_ssim": xz_ssim(pred),
                "val_psnr_linear": _psnr01(lin, target), "val_ssim_linear": xz_ssim(lin)}

    config = {
        "kind": "dgean",
        "model": net_cfg.to_dict(),
        "preset": dcfg.preset,
        "factor": s,
        "mode": dcfg.mode,
        "degradation": {"axial": dcfg.mode},
        "patch": [depth, size, size],
        "loss": {"l1": 1.0, "gradient": dcfg.hf_weight, "fourier": dcfg.fourier_weight},
        "supervised": dcfg.supervised,
        "intensity": source.intensity.to_dict(),
        "source": str(hr_volume),
        "z_range": [z0, z1],
    }
    return fit(model, loss_fn, batches=batches, cfg=tcfg, out=out, checkpoint_config=config, validate=validate,
               resume=resume, overwrite=overwrite, progress=progress, report=report)


def _save_panels(path: Path, rows: list[np.ndarray], titles: list[str]) -> None:
    """A PNG grid: one column per entry of ``rows`` (each ``(n, h, w)``), one row per patch."""
    from matplotlib.figure import Figure  # no pyplot: never touches the caller's backend

    n = min(4, len(rows[0]))
    fig = Figure(figsize=(2.2 * len(rows), 2.2 * n))
    axes = fig.subplots(n, len(rows), squeeze=False)
    for j, (imgs, title) in enumerate(zip(rows, titles)):
        for i in range(n):
            axes[i, j].imshow(imgs[i], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            axes[i, j].set_axis_off()
        axes[0, j].set_title(title, fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
