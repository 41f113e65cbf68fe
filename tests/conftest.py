"""Shared fixtures: small random volumes on disk, the real data beside the repo, CLI helpers."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data() -> Callable[[str], Path]:
    """``shared_data(name)`` -> path of a real vEM file in ``../shared/data``, or skip.

    The folder sits beside the repository (CI has it, a fresh clone does not).
    """

    def get(name: str) -> Path:
        if not SHARED_DATA.is_dir():
            pytest.skip(f"real test data absent: no folder {SHARED_DATA} (the 'shared' folder beside the repo)")
        path = SHARED_DATA / name
        if not path.is_file():
            pytest.skip(f"real test data absent: {path} does not exist")
        return path

    return get


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def random_volume(shape: Sequence[int], dtype: Any = np.uint8, seed: int = 0) -> np.ndarray:
    """Random data spanning the dtype's range (floats in [0, 1))."""
    g = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        return g.integers(0, np.iinfo(dtype).max, size=tuple(shape), endpoint=True).astype(dtype)
    return g.random(tuple(shape)).astype(dtype)


@pytest.fixture
def write_random_volume(tmp_path: Path) -> Callable[..., tuple[Path, np.ndarray]]:
    """``write_random_volume(name, shape, dtype, voxel_size, translation, chunks, levels)``
    -> ``(path, data)``: a finished OME-Zarr image in ``tmp_path``."""
    from d2r_dask.io.geometry import Geometry
    from d2r_dask.io.volume import write_volume

    def make(
        name: str = "vol.zarr",
        shape: Sequence[int] = (11, 13, 17),
        dtype: Any = np.uint8,
        voxel_size: Sequence[float] = (40.0, 5.0, 5.0),
        translation: Sequence[float] = (0.0, 0.0, 0.0),
        chunks: Sequence[int] | None = (4, 8, 8),
        levels: int = 1,
        seed: int = 0,
    ) -> tuple[Path, np.ndarray]:
        data = random_volume(shape, dtype, seed)
        path = tmp_path / name
        write_volume(path, data, Geometry(tuple(voxel_size), tuple(translation)), chunks=chunks, levels=levels)
        return path, data

    return make


@pytest.fixture
def cli_run() -> Callable[..., Any]:
    """``cli_run(*args)`` -> click Result of ``d2r ARGS`` (stdout and stderr in ``.output``)."""
    from click.testing import CliRunner

    from d2r_dask.cli import cli

    def run(*args: Any) -> Any:
        return CliRunner().invoke(cli, [str(a) for a in args])

    return run


def assert_cli_error(result: Any, *fragments: str) -> None:
    """A user error: exit status 1, one clear message, no traceback."""
    out = result.output
    assert result.exit_code == 1, f"exit {result.exit_code}: {out}\n{result.exception!r}"
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}"
    assert "Traceback" not in out
    assert "Error: " in out
    for fragment in fragments:
        assert fragment.lower() in out.lower(), f"{fragment!r} not in {out!r}"


def assert_cli_ok(result: Any) -> None:
    assert result.exit_code == 0, f"exit {result.exit_code}: {result.output}\n{result.exception!r}"
