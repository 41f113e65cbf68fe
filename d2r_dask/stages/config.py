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
from typing import Any, Mapping, Sequence

from ..errors import InputError, renamed
from ..io.geometry import check_factor, check_mode


@dataclass(frozen=True)
class RestorerStage:
    """Stage I: diffusion restorer training.

    ``preset="auto"`` and the options left ``None`` are filled in for the device by
    :func:`resolve_auto` (``AUTO``); ``recipe`` is ``fast`` (ours) or ``authors``.
    """

    preset: str = "auto"
    patch: int = 64
    steps: int | None = None
    batch_size: int = 8
    lr: float | None = None
    recipe: str = "fast"
    sampler: str | None = None
    sampler_steps: int | None = None


FLIPS = ("z", "lateral")
"""The flips Stage II can also restore each slice under (``restore.flips``); each doubles its work."""


def check_flips(flips: str | Sequence[str]) -> tuple[str, ...]:
    """``flips`` (one name or several) as a tuple in canonical order, or an error naming the allowed ones."""
    flips = (flips,) if isinstance(flips, str) else tuple(flips)
    if not set(flips) <= set(FLIPS) or len(set(flips)) != len(flips):
        raise InputError(f"restore flips must be distinct values out of {', '.join(FLIPS)}, got {list(flips)}")
    return tuple(f for f in FLIPS if f in flips)


@dataclass(frozen=True)
class RestoreStage:
    """Stage II: pseudo-HR by restoring XZ/YZ slices (``roi``: LR voxels z0 y0 x0 z1 y1 x1).

    ``halo``: LR voxels each tile reads beyond its block (tiles overlap by twice it; none
    along an axis the region fits in one block); ``slice_batch``: slices per forward pass.
    ``overlap`` and ``batch`` are their deprecated names. The default ``block`` cuts the
    default region in two along y only: two tasks (the two workers of a CPU's local cluster),
    every XZ slice restored once, the YZ slices over 1.25x their length (1.125x in all).
    ``flips``: also restore every slice flipped along ``z`` and/or ``lateral`` and average
    (each doubles Stage II's work; ``None``: :func:`resolve_auto`).
    """

    roi: tuple[int, ...] | None = None
    max_roi: tuple[int, int, int] = (64, 256, 256)
    block: tuple[int, int, int] = (64, 128, 256)
    halo: tuple[int, int, int] = (4, 16, 16)
    slice_batch: int = 64
    flips: tuple[str, ...] | None = None
    overlap: InitVar[tuple[int, int, int] | None] = None
    batch: InitVar[int | None] = None

    def __post_init__(self, overlap: tuple[int, int, int] | None, batch: int | None) -> None:
        if self.flips is not None:
            object.__setattr__(self, "flips", check_flips(self.flips))
        if overlap is not None:
            object.__setattr__(self, "halo", renamed("RestoreStage(overlap=...)", "halo", overlap))
        if batch is not None:
            object.__setattr__(self, "slice_batch", renamed("RestoreStage(batch=...)", "slice_batch", batch))


@dataclass(frozen=True)
class DGEANStage:
    """Stage III: DGEAN training on the pseudo-HR (``preset="auto"`` and the options left
    ``None`` filled in for the device by :func:`resolve_auto`)."""

    preset: str = "auto"
    patch_xy: int = 48
    patch_lr_z: int | None = None
    steps: int | None = None
    batch_size: int = 4
    lr: float | None = None
    hf_weight: float = 0.5


@dataclass(frozen=True)
class InferStage:
    """Stage IV: blockwise DGEAN inference; ``group`` blocks per task, run as one batch
    (None: the engine's default, :func:`~d2r_dask.blockwise.layout.default_group`, streamed a block at a time)
    (``batch`` is its deprecated name). ``block`` None: sized to the device and DGEAN's
    halo (:func:`~d2r_dask.stages.sizing.infer_block`), then recorded in ``run.json``."""

    block: tuple[int, int, int] | None = None
    group: int | None = None
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
                value = sub(**{k: _parse_option(f"{key}.{k}", v, sub_known[k].default, sub_known[k].type)
                               for k, v in value.items()})
            elif key not in ("factor", "mode"):  # those two are checked with their own messages
                value = _parse_option(key, value, known[key].default, known[key].type)
            kwargs[key] = value
        return cls(**kwargs)


_OPTIONAL = {"int | None": 0, "float | None": 0.0, "str | None": "", "tuple[int, int, int] | None": (0, 0, 0)}
"""Options that default to None (``auto``): checked against the type their annotation names."""


def _parse_option(name: str, value: Any, default: Any, annotation: Any = None) -> Any:
    """``value`` checked against the type of the option's ``default`` (lists become tuples).

    Options that default to None take None or a value of their annotated type; other shapes
    (an ROI) are checked where used.
    """
    if isinstance(value, list):
        value = tuple(value)
    if default is None:
        if value is None or annotation not in _OPTIONAL:
            return value
        default = _OPTIONAL[annotation]
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


AUTO: dict[str, dict[str, dict[str, Any]]] = {
    # 2 CPU cores: `d2r run` on a 250^3 volume within the 30-minute bound (README, "Quality"); DGEAN's
    # steps are those of x4, scaled to the same CPU time at other factors (cpu_dgean_steps).
    # DGEAN: thin patches (4 LR slices), which were +0.10 dB at x8 and -0.04 at x4 against 8 deep;
    # medium with channels-last memory (models.precision), the attention pool after the squeeze and
    # the HR conv computed per phase on LR voxels (models.dgean) trains 5000 steps at x4 well within
    # the bound (in the first layout 3000 steps took 30.5 minutes); more steps, higher SR at x8, level
    # at x4 (README). No Stage II flips on either device: a z-flipped copy lifted the x4 pseudo-HR by
    # 0.014 dB but not the SR trained on it (-0.02 dB, two seeds; README).
    "cpu": {"restorer": {"preset": "tiny", "steps": 2000, "sampler_steps": 1},
            "restore": {"flips": ()},
            "dgean": {"preset": "medium", "steps": 5000, "patch_lr_z": 4}},
    # one GPU: the full-size networks; sized for benchmarks/gpu_quality.sh (fib25 x8 in ~10 minutes),
    # not yet measured on a GPU.
    "cuda": {"restorer": {"preset": "full", "steps": 4000, "sampler_steps": 3},
             "restore": {"flips": ()},
             "dgean": {"preset": "full", "steps": 3000, "patch_lr_z": 8}},
}
"""What ``preset: auto`` and the unset steps mean on each device type."""

CPU_DGEAN_STEP_MS = (156.0, 15.1)
"""A CPU DGEAN training step costs about ``a + b * factor`` ms: the upsampling conv and what
follows grow with the factor (``medium``, 4 x 48^2 LR patches 4 slices deep, float32
channels-last, 2 cores, at a quiet moment: 194 / 200 / 208 / 244 / 287 / 305 ms at x2 / x3 / x4 /
x6 / x8 / x10; ``benchmarks/bench_models_speed.py`` part (d) times it). Whole fib25 runs agree:
Stage III took 1114 s at x4 (5000 steps) and 1124 s at x8 (3900 steps)."""


def cpu_dgean_steps(steps_at_x4: int, factor: int) -> int:
    """The DGEAN steps at ``factor`` that take a CPU as long as ``steps_at_x4`` at x4 (to the
    nearest 100), so ``d2r run``'s time on a CPU does not grow with the factor (x8: 0.78x the steps)."""
    a, b = CPU_DGEAN_STEP_MS
    return max(100, round(steps_at_x4 * (a + 4 * b) / (a + factor * b) / 100) * 100)


def resolve_auto(cfg: RunConfig, device: str | None = None, *,
                 recorded: Mapping[str, Any] | None = None) -> RunConfig:
    """``cfg`` with ``auto`` presets and unset steps filled in for ``device`` (default: the
    first GPU if there is one, else the CPU; on a CPU DGEAN's steps follow the factor,
    :func:`cpu_dgean_steps`). Explicit values are kept. ``recorded``: the resolved
    configuration of the run being resumed (its ``run.json``); what it resolved wins over the
    table, and its Stage IV block over sizing one to this device, so a run resumes with the
    networks, steps and blocks it started with, also on another device type or after this
    table changed."""
    from dataclasses import replace

    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    kind = "cuda" if str(device).startswith("cuda") else "cpu"
    table = AUTO[kind]
    if kind == "cpu":
        table = {**table, "dgean": {**table["dgean"], "steps": cpu_dgean_steps(table["dgean"]["steps"], cfg.factor)}}

    def fill(name: str, values: Mapping[str, Any]) -> Any:
        section = getattr(cfg, name)
        before = (recorded or {}).get(name) or {}
        changes = {k: v if before.get(k) is None else before[k] for k, v in values.items()
                   if getattr(section, k) is None or (k == "preset" and getattr(section, k) == "auto")}
        if section is cfg.restorer and section.recipe == "authors":
            changes.pop("sampler_steps", None)  # the authors' sampler: sde over all T steps
        return replace(section, **changes)

    cfg = replace(cfg, **{name: fill(name, values) for name, values in table.items()})
    block = ((recorded or {}).get("infer") or {}).get("block")
    if cfg.infer.block is None and block is not None:
        cfg = replace(cfg, infer=replace(cfg.infer, block=tuple(block)))
    return cfg


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``section.key: <old> recorded, <new> given`` for every value in which two configurations
    (``RunConfig.to_dict`` form) differ."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += [f"{key}.{d}" for d in config_diff(a, b)]
        elif a != b:
            out.append(f"{key}: {a!r} recorded, {b!r} given")
    return out


def config_template(factor: int = 4) -> dict[str, Any]:
    """Every option of ``d2r run`` with its default (for ``d2r config show``)."""
    return RunConfig(factor=factor).to_dict()

