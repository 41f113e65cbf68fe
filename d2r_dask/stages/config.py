"""The configuration of ``d2r run``: frozen, validated data, saved beside every output.

One dataclass per stage and :class:`RunConfig` over them; every field has a default
except the factor. :meth:`RunConfig.from_dict` reads a YAML/TOML file's mapping and names
any unknown key or mistyped value; keys renamed since (:data:`RENAMED_KEYS`) are still
read, with a deprecation warning. ``d2r config show`` prints :func:`config_template`.
"""

from __future__ import annotations

import json
import os
from dataclasses import InitVar, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from ..errors import InputError, renamed
from ..io.geometry import check_factor, check_mode


@dataclass(frozen=True)
class RestorerStage:
    """Stage I: diffusion restorer training."""

    preset: str = "tiny"
    patch: int = 64
    steps: int = 1500
    batch_size: int = 8
    lr: float | None = None
    sampler: str = "posterior"  # benchmarks/results/samplers_fib25_x4.md: the fastest within 0.2 dB of sde@100
    sampler_steps: int = 5


@dataclass(frozen=True)
class RestoreStage:
    """Stage II: pseudo-HR by restoring XZ/YZ slices (``roi``: LR voxels z0 y0 x0 z1 y1 x1).

    ``halo``: LR voxels each tile reads beyond its block (tiles overlap by twice it);
    ``slice_batch``: slices per forward pass. ``overlap`` and ``batch`` are their
    deprecated names.
    """

    roi: tuple[int, ...] | None = None
    max_roi: tuple[int, int, int] = (64, 256, 256)
    block: tuple[int, int, int] = (16, 64, 64)
    halo: tuple[int, int, int] = (4, 16, 16)
    slice_batch: int = 64
    overlap: InitVar[tuple[int, int, int] | None] = None
    batch: InitVar[int | None] = None

    def __post_init__(self, overlap: tuple[int, int, int] | None, batch: int | None) -> None:
        if overlap is not None:
            object.__setattr__(self, "halo", renamed("RestoreStage(overlap=...)", "halo", overlap))
        if batch is not None:
            object.__setattr__(self, "slice_batch", renamed("RestoreStage(batch=...)", "slice_batch", batch))


@dataclass(frozen=True)
class DGEANStage:
    """Stage III: DGEAN training on the pseudo-HR."""

    preset: str = "tiny"
    patch_xy: int = 48
    patch_lr_z: int = 8
    steps: int = 1500
    batch_size: int = 4
    lr: float = 2e-4
    hf_weight: float = 0.5


@dataclass(frozen=True)
class InferStage:
    """Stage IV: blockwise DGEAN inference; ``group`` blocks per task, run as one batch
    (``batch`` is its deprecated name)."""

    block: tuple[int, int, int] = (32, 128, 128)
    group: int = 1
    tta: bool = False
    batch: InitVar[int | None] = None

    def __post_init__(self, batch: int | None) -> None:
        if batch is not None:
            object.__setattr__(self, "group", renamed("InferStage(batch=...)", "group", batch))


@dataclass(frozen=True)
class RunConfig:
    """Everything ``d2r run`` does; every field has a default except the factor."""

    factor: int
    mode: str = "decimate"
    seed: int = 0
    device: str | None = None
    restorer: RestorerStage = field(default_factory=RestorerStage)
    restore: RestoreStage = field(default_factory=RestoreStage)
    dgean: DGEANStage = field(default_factory=DGEANStage)
    infer: InferStage = field(default_factory=InferStage)

    def __post_init__(self) -> None:
        check_factor(self.factor)
        check_mode(self.mode)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunConfig:
        """Build from nested mappings (a config file), naming any unknown key or mistyped value."""
        kwargs: dict[str, Any] = {}
        known = {f.name: f for f in fields(cls)}
        for key, value in upgrade_config(data).items():
            if key not in known:
                raise InputError(f"unknown config key {key!r}; known: {', '.join(known)}")
            sub = _SECTIONS.get(key)
            if sub is not None:
                if not isinstance(value, Mapping):
                    raise InputError(f"config section {key!r} must be a mapping of options, got {value!r}")
                sub_known = {f.name: f for f in fields(sub)}
                bad = sorted(set(value) - set(sub_known))
                if bad:
                    raise InputError(f"unknown keys in [{key}]: {bad}; known: {sorted(sub_known)}")
                value = sub(**{k: _parse_option(f"{key}.{k}", v, sub_known[k].default) for k, v in value.items()})
            elif key not in ("factor", "mode"):  # those two are checked with their own messages
                value = _parse_option(key, value, known[key].default)
            kwargs[key] = value
        return cls(**kwargs)


def _parse_option(name: str, value: Any, default: Any) -> Any:
    """``value`` checked against the type of the option's ``default`` (lists become tuples).

    Options that default to None take any value of the right shape (checked where used).
    """
    if isinstance(value, list):
        value = tuple(value)
    if default is None:
        return value
    if isinstance(default, tuple):
        ok = isinstance(value, tuple) and len(value) == len(default) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value)
        want = f"{len(default)} integers (z, y, x), e.g. {list(default)}"
    elif isinstance(default, bool):
        ok, want = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    else:
        ok, want = isinstance(value, type(default)), f"a {type(default).__name__}"
    if not ok:
        raise InputError(f"config option {name} must be {want}, got {value!r}")
    return value


_SECTIONS = {"restorer": RestorerStage, "restore": RestoreStage, "dgean": DGEANStage, "infer": InferStage}

# config keys that were renamed: section -> {old: new}; the old names are still read
RENAMED_KEYS = {"restore": {"overlap": "halo", "batch": "slice_batch"}, "infer": {"batch": "group"}}


def upgrade_config(data: Mapping[str, Any], *, warn: bool = True) -> dict[str, Any]:
    """``data`` with renamed keys under their new names (a warning for each, if ``warn``)."""
    out = dict(data)
    for section, names in RENAMED_KEYS.items():
        if not isinstance(out.get(section), Mapping):
            continue
        sub = dict(out[section])
        for old, new in names.items():
            if old in sub:
                value = sub.pop(old)
                if warn:
                    renamed(f"config key {section}.{old}", f"{section}.{new}", value)
                sub.setdefault(new, value)
        out[section] = sub
    return out


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML or TOML run configuration."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such config file")
    text = path.read_text()
    if path.suffix.lower() == ".toml":
        import tomllib

        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise InputError(f"{path} is not valid TOML ({exc})") from exc
    import yaml

    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise InputError(f"{path} is not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise InputError(f"{path} must hold a mapping of options")
    return data


def merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Nested dict merge: ``overrides`` wins, ``None`` values are ignored."""
    out = dict(base)
    for key, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, Mapping):
            section = out.get(key, {})
            if not isinstance(section, Mapping):
                raise InputError(f"config section {key!r} must be a mapping of options, got {section!r}")
            value = merge(section, value)
        out[key] = value
    return out


def config_template(factor: int = 4) -> dict[str, Any]:
    """Every option of ``d2r run`` with its default (for ``d2r config show``)."""
    return RunConfig(factor=factor).to_dict()

