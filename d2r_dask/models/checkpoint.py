"""Model checkpoints: ``weights.safetensors`` + ``config.json``, written atomically.

A checkpoint directory holds what inference needs (the EMA weights and a JSON
config naming the model kind, preset, factor, degradation and intensity
normalisation) and, for ``--resume``, ``train_state.pt`` (raw weights, optimiser,
scheduler, step). Each file is written to a temporary name and renamed, and
``config.json`` is renamed last, so a crash never leaves a checkpoint that loads
but is half written.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..data.intensity import Intensity
from ..errors import CheckpointError
from ..io.files import atomic_write
from ..io.geometry import check_factor, check_mode

log = logging.getLogger(__name__)

WEIGHTS = "weights.safetensors"
CONFIG = "config.json"
TRAIN_STATE = "train_state.pt"
TRAIN_STATE_FORMAT = 2
"""Version of ``train_state.pt``: 2 holds only tensors and plain values (a safe ``weights_only`` load)."""


def save_checkpoint(
    directory: str | os.PathLike,
    *,
    weights: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    train_state: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint; ``config`` must name the model ``kind``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if "kind" not in config:
        raise ValueError("checkpoint config needs a 'kind'")
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in weights.items()}
    if train_state is not None:
        state = {"format": TRAIN_STATE_FORMAT, **dict(train_state)}
        atomic_write(directory / TRAIN_STATE, lambda p: torch.save(state, p))
    atomic_write(directory / WEIGHTS, lambda p: save_file(tensors, str(p)))
    atomic_write(directory / CONFIG, lambda p: p.write_text(json.dumps(dict(config), indent=2, default=str)))
    return directory


def read_config(directory: str | os.PathLike, kind: str | None = None) -> dict[str, Any]:
    """The config of a checkpoint, checked to be of ``kind`` (clear errors otherwise)."""
    directory = Path(directory)
    path = directory / CONFIG
    if not path.exists():
        raise CheckpointError(
            f"{directory} is not a d2r checkpoint (no {CONFIG}); give the --out folder of a training run"
        )
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is corrupt ({exc}); retrain or restore it from a backup") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is corrupt (not a JSON object); retrain or restore it from a backup")
    if kind is not None and config.get("kind") != kind:
        raise CheckpointError(
            f"{directory} holds a {config.get('kind')!r} model, but a {kind!r} model is needed here"
        )
    return config


def read_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint (CheckpointError when missing or corrupt)."""
    path = Path(directory) / WEIGHTS
    if not path.exists():
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete, retrain or resume training")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is corrupt ({exc}); retrain or resume from an earlier checkpoint") from exc


def load_into(model: torch.nn.Module, directory: str | os.PathLike) -> torch.nn.Module:
    """Load a checkpoint's weights into ``model``; a shape/name mismatch is a CheckpointError."""
    weights = read_weights(directory)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"the weights in {directory} do not fit the model its config describes ({str(exc).splitlines()[0]})"
        ) from exc
    return model


def read_train_state(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The optimiser/step state for resuming, or None when the run has none yet."""
    path = Path(directory) / TRAIN_STATE
    if not path.exists():
        return None
    try:
        # tensors, numbers, strings and containers only: a crafted file cannot run code
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # holds Python objects: an older format, or not d2r's
        raise CheckpointError(
            f"{path} is not a d2r training state of this version (it holds Python objects, which d2r never "
            f"unpickles: {str(exc).splitlines()[0]}); it was written by an older d2r or another program: delete "
            "it to restart training from scratch, or finish that run with the d2r version that wrote it"
        ) from exc
    except Exception as exc:
        raise CheckpointError(f"{path} is corrupt or not a d2r training state ({str(exc).splitlines()[0]}); "
                              "delete it to restart training from scratch") from exc
    if not isinstance(state, dict) or int(state.get("format", TRAIN_STATE_FORMAT)) > TRAIN_STATE_FORMAT:
        raise CheckpointError(f"{path} is not a d2r training state this version can read (format "
                              f"{state.get('format') if isinstance(state, dict) else type(state).__name__}); "
                              "resume with the d2r version that wrote it, or delete it to restart training")
    return state


# --- the two model families' checkpoints ------------------------------------------------


def read_restorer_config(directory: str | os.PathLike) -> tuple[Any, Any, dict[str, Any]]:
    """``(NAFNetConfig, SDEConfig, config)`` of a Stage I checkpoint, checked (CheckpointError)."""
    from .nafnet import NAFNetConfig
    from .sde import SDEConfig

    config = read_config(directory, "restorer")
    try:
        parsed = NAFNetConfig.from_dict(config["model"]), SDEConfig.from_dict(config["sde"])
        check_factor(int(config["factor"]))
        check_mode(config["mode"])
        Intensity(**config["intensity"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{directory}/config.json does not describe a restorer ({exc})") from exc
    return (*parsed, config)


def load_restorer(directory: str | os.PathLike) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """``(network, IRSDE, config)`` of a Stage I checkpoint, network in eval mode on the CPU."""
    from .nafnet import ConditionalNAFNet
    from .sde import IRSDE

    net_cfg, sde_cfg, config = read_restorer_config(directory)
    return load_into(ConditionalNAFNet(net_cfg), directory).eval(), IRSDE(sde_cfg), config


def read_dgean_config(directory: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
    """``(DGEANConfig, config)`` of a Stage III checkpoint, checked (CheckpointError)."""
    from .dgean import DGEANConfig

    config = read_config(directory, "dgean")
    try:
        cfg = DGEANConfig.from_dict(config["model"])
        Intensity(**config["intensity"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{directory}/config.json does not describe a DGEAN ({exc})") from exc
    return cfg, config


def load_dgean(directory: str | os.PathLike) -> tuple[torch.nn.Module, dict[str, Any]]:
    """``(network, config)`` of a Stage III checkpoint, in eval mode on the CPU."""
    from .dgean import DGEAN

    cfg, config = read_dgean_config(directory)
    return load_into(DGEAN(cfg), directory).eval(), config
